"""Prefix cache: exact block ids, reference counts, eviction order; leaks under churn."""
import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from scheduler_kit import expected_output, make_request, run_step

from llmos.kernel.blocks import BlockPool
from llmos.kernel.kv_manager import KVCacheManager
from llmos.kernel.requests import State
from llmos.kernel.scheduler import Scheduler


def req(i, prompt, max_tokens=100):
    return make_request(list(prompt), i=i, max_tokens=max_tokens)


def prefill(kv, r):
    """The KV manager alone (no scheduler): the whole prompt is written and committed."""
    assert kv.allocate_slots(r, r.num_tokens - r.kv.num_computed)
    r.kv.num_computed = r.num_tokens
    kv.commit(r)


def test_second_request_reuses_the_cached_prefix_blocks():
    pool = BlockPool(8, 4)
    kv = KVCacheManager(pool)
    a = req(1, range(10))                 # 2 full blocks + 2 tokens
    assert kv.attach_prefix(a) == 0
    prefill(kv, a)
    assert a.kv.blocks == [0, 1, 2] and a.kv.cached_blocks == 2
    b = req(2, list(range(8)) + [99, 98, 97])
    assert kv.attach_prefix(b) == 8       # both full blocks reused
    assert b.kv.blocks == [0, 1] and [pool.ref_count(x) for x in (0, 1, 2)] == [2, 2, 1]
    c = req(3, [5] + list(range(1, 10)))  # differs in the first token: nothing reused
    assert kv.attach_prefix(c) == 0 and c.kv.blocks == []
    assert kv.stats()["hit_tokens"] == 8 and kv.stats()["lookups"] == 3


def test_a_fully_cached_prompt_still_computes_its_last_token():
    kv = KVCacheManager(BlockPool(8, 4))
    a = req(1, range(8))
    prefill(kv, a)
    b = req(2, range(8))
    assert kv.attach_prefix(b) == 4       # the second block holds the last token: recompute it
    assert b.kv.blocks == [0]


def test_freed_cached_blocks_stay_reusable_until_evicted_lru_first():
    pool = BlockPool(4, 4)
    kv = KVCacheManager(pool)
    a, b = req(1, range(9)), req(2, range(100, 109))
    prefill(kv, a)                        # blocks 0,1 (+2 partial)
    kv.free(a)                            # freed tail first: queue 3, 2, 1, 0
    assert pool.num_free == 4 and pool.num_cached_free == 2
    prefill(kv, b)                        # takes 3, 2, 1: evicts cached block 1
    assert b.kv.blocks == [3, 2, 1] and pool.evictions == 1
    again = req(3, range(9))
    assert kv.attach_prefix(again) == 4 and again.kv.blocks == [0]


def test_tokens_are_confirmed_not_just_hashes():
    pool = BlockPool(4, 4)
    pool.cache(0, 12345, (1, 2, 3, 4))
    pool.free(pool.allocate(0) or [])
    assert pool.lookup(12345, (1, 2, 3, 4)) == 0
    assert pool.lookup(12345, (1, 2, 3, 5)) is None


def test_preempted_request_recomputes_only_what_was_evicted():
    pool = BlockPool(6, 4)
    sched = Scheduler(KVCacheManager(pool), max_batched_tokens=64)
    a = req(1, range(8))
    sched.add(a)
    run_step(sched)
    sched._preempt(a, "memory", 0.0)
    (s,) = sched.schedule()               # its 2 full blocks are still cached
    assert s.num_new == 1 and a.kv.num_computed == 8


def test_leak_200_requests_random_lengths_cancellations_and_preemption():
    rng = random.Random(0)
    pool = BlockPool(40, 4)
    sched = Scheduler(KVCacheManager(pool), max_num_seqs=16, max_batched_tokens=64)
    shared = list(range(12))
    live, next_id, finished, reasons = [], 0, 0, Counter()
    while finished < 200:
        while len(live) < 24 and next_id < 200:
            prompt = (shared if rng.random() < 0.5 else []) + [rng.randrange(1000) for _ in range(rng.randint(1, 20))]
            r = req(next_id, prompt, max_tokens=rng.randint(1, 30))
            next_id += 1
            sched.add(r)
            live.append(r)
        run_step(sched)
        for r in list(live):
            if r.state is not State.FINISHING and rng.random() < 0.02:   # cancel, waiting or running
                sched.finish_requests([r], "abort")
            if r.state is State.FINISHING:
                assert r.output.ids == expected_output(r), r.id
                assert r.output.finish_reason == "abort" or len(r.output.ids) == r.max_tokens, r.id
                reasons[r.output.finish_reason] += 1
                r.to(State.DONE)
                live.remove(r)
                finished += 1
        sched.check_integrity()
    assert pool.num_free == pool.num_blocks and pool.num_used == 0
    assert sched.preemptions > 0 and sched.kv.hit_tokens > 0 and reasons["length"] > 50
    pool.check_integrity({})


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("afs"), st.integers(0, 5), st.integers(1, 12)), max_size=50))
def test_random_attach_grow_commit_free_keep_invariants(ops):
    pool = BlockPool(10, 2)
    kv = KVCacheManager(pool)
    reqs = {}
    for op, key, n in ops:
        r = reqs.get(key)
        if op == "a" and r is None:
            r = reqs[key] = req(key, [t % 3 for t in range(n)])
            kv.attach_prefix(r)
        elif op == "f" and r is not None:
            kv.free(reqs.pop(key))
        elif op == "s" and r is not None:
            grow = min(n, r.num_tokens - r.kv.num_computed)
            if grow and kv.allocate_slots(r, grow):
                r.kv.num_computed += grow
                kv.commit(r)
        pool.check_integrity({k: v.kv.blocks for k, v in reqs.items()})
        assert pool.num_free + len({b for v in reqs.values() for b in v.kv.blocks}) == pool.num_blocks
