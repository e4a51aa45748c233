"""Host swap tier: exact block moves, cost choice, and recovery when a step is lost."""
import pytest
from scheduler_kit import apply, expected_output, make_request, run_step, token_at

from llmos.kernel.blocks import BlockPool
from llmos.kernel.kv_manager import KVCacheManager
from llmos.kernel.requests import State
from llmos.kernel.scheduler import Scheduler
from llmos.kernel.swap import SwapSpace


def req(i, n):
    return make_request([100 * i + t for t in range(n)], i=i, max_tokens=50)


def setup(mode="swap"):
    pool = BlockPool(4, 4)
    sched = Scheduler(KVCacheManager(pool, prefix_caching=False), max_batched_tokens=64,
                      swap=SwapSpace(BlockPool(8, 4), block_bytes=1024, mode=mode))
    old, new = req(1, 8), req(2, 8)
    sched.add(old)
    sched.add(new)
    run_step(sched)                          # both prefilled: the pool is full
    return pool, sched, old, new


def test_preemption_swaps_out_keeps_progress_and_swaps_back_in():
    pool, sched, old, new = setup()
    new_blocks = list(new.kv.blocks)
    batch = sched.schedule()                 # both need a third block: the newest is swapped out
    assert [s.req.id for s in batch] == ["r1"]
    out, inn = sched.swap.ops()
    assert out == list(zip(new_blocks, [0, 1])) and inn == []
    assert new.kv.host_blocks == [0, 1] and new.kv.num_computed == 8 and new.kv.blocks == []
    assert new.summary().state == "swapped"
    apply(sched, batch)
    sched.finish_requests([old], "abort")
    batch = sched.schedule()                 # swapped back in: only its next token is computed
    assert [(s.req.id, s.num_new) for s in batch] == [("r2", 1)]
    out, inn = sched.swap.ops()
    assert out == [] and [h for h, _ in inn] == [0, 1] and [d for _, d in inn] == new.kv.blocks[:2]
    assert sched.swap.host.num_used == 2     # host blocks are held until the step succeeded
    apply(sched, batch)
    assert sched.swap.host.num_used == 0 and sched.swap.stats()["swap_ins"] == 1
    assert new.output.ids == [token_at(2, 8), token_at(2, 9)] and new.kv.num_computed == 9
    assert old.output.ids == expected_output(old) and len(old.output.ids) == 2
    sched.check_integrity()


def test_recompute_mode_drops_progress():
    pool, sched, old, new = setup("recompute")
    sched.schedule()
    assert new.kv.host_blocks == [] and new.kv.num_computed == 0 and sched.swap.stats()["swap_outs"] == 0


def test_auto_mode_swaps_when_copying_is_cheaper_than_recomputing():
    space = SwapSpace(BlockPool(8, 4), block_bytes=1000, copy_bytes_per_s=1e6, recompute_tokens_per_s=1000)
    r = req(1, 8)
    r.kv.blocks, r.kv.num_computed = [0, 1], 8
    assert space.should_swap(r)              # copy 2 x 2 KB at 1 MB/s = 4 ms < recompute 8 tokens = 8 ms
    space.recompute_tokens_per_s = 100000    # recompute 0.08 ms: cheaper than copying
    assert not space.should_swap(r)
    space.recompute_tokens_per_s = 100
    assert space.should_swap(r)


def test_a_lost_step_turns_swap_out_victims_into_recompute_and_reissues_swap_ins():
    pool, sched, old, new = setup()
    run_step(sched, lost=True)               # the driver died before or while copying
    assert new.kv.host_blocks == [] and new.kv.num_computed == 0 and sched.swap.host.num_used == 0
    assert sched.swap.stats()["fallbacks_to_recompute"] == 1
    assert old.kv.num_computed == 8 and [len(r.output.ids) for r in (old, new)] == [1, 1]   # nothing applied
    run_step(sched)                          # the lost step again: old decodes, new waits
    sched.finish_requests([old], "abort")
    assert [(s.req, s.num_new) for s in run_step(sched).batch] == [(new, 9)]   # recomputed, token kept
    assert new.output.ids == [token_at(2, 8), token_at(2, 9)]


def test_aborting_a_swapped_request_frees_its_host_blocks():
    pool, sched, old, new = setup()
    run_step(sched)
    assert sched.finish_requests([new], "abort") == [new] and new.state is State.FINISHING
    assert sched.swap.host.num_used == 0 and new.kv.host_blocks == []


def test_a_victim_that_cannot_grow_after_its_swap_in_keeps_its_host_copy():
    pool = BlockPool(5, 4)                    # old and new take 2 blocks each; one is free
    sched = Scheduler(KVCacheManager(pool, prefix_caching=False), max_batched_tokens=64,
                      swap=SwapSpace(BlockPool(8, 4), block_bytes=1024, mode="swap"))
    old, new = req(1, 8), req(2, 8)
    sched.add(old)
    sched.add(new)
    run_step(sched)
    sched.schedule()                          # old takes the free block; new, the victim, is swapped out
    assert new.kv.host_blocks == [0, 1] and new.kv.num_computed == 8   # and waits for 3 blocks, swapped
    assert sched.step_ops()["swap_in"] == []
