"""BlockPool: exact ids, reference counts and invariants under random use."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmos.kernel.blocks import BlockPool, blocks_needed


def test_allocate_hands_out_lowest_free_ids_in_order():
    pool = BlockPool(4, 16)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(1) == [2]
    assert pool.num_free == 1
    assert [pool.ref_count(b) for b in range(4)] == [1, 1, 1, 0]


def test_allocate_returns_none_when_short_and_changes_nothing():
    pool = BlockPool(3, 16)
    pool.allocate(2)
    assert pool.allocate(2) is None
    assert pool.num_free == 1
    pool.check_integrity()


def test_freed_blocks_are_reused_after_the_never_used_ones():
    pool = BlockPool(4, 16)
    a = pool.allocate(2)
    pool.free(a)
    assert pool.allocate(4) == [2, 3, 1, 0]  # a sequence's tail goes first


def test_double_free_is_an_error():
    pool = BlockPool(2, 16)
    a = pool.allocate(1)
    pool.free(a)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(a)


def test_integrity_detects_owner_mismatch():
    pool = BlockPool(3, 16)
    a = pool.allocate(2)
    pool.check_integrity({"r1": a})
    with pytest.raises(AssertionError):
        pool.check_integrity({"r1": a[:1]})


def test_blocks_needed():
    assert [blocks_needed(n, 16) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5), st.integers(0, 10)), max_size=60))
def test_random_alloc_free_keeps_books_balanced(ops):
    pool = BlockPool(12, 4)
    owners: dict[int, list[int]] = {}
    for i, (alloc, n, pick) in enumerate(ops):
        if alloc:
            got = pool.allocate(n)
            if got is None:
                assert pool.num_free < n
            else:
                assert len(set(got)) == n
                owners[i] = got
        elif owners:
            key = sorted(owners)[pick % len(owners)]
            pool.free(owners.pop(key))
        pool.check_integrity(owners)
        assert pool.num_free + sum(map(len, owners.values())) == pool.num_blocks
    for blocks in owners.values():
        pool.free(blocks)
    assert pool.num_free == pool.num_blocks
