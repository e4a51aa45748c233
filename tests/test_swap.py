"""Host swap tier: exact block moves, cost choice, and recovery when a step is lost."""
from llmos.kernel.blocks import BlockPool
from llmos.kernel.kv_manager import KVCacheManager
from llmos.kernel.requests import Request
from llmos.kernel.scheduler import Scheduler
from llmos.kernel.swap import SwapSpace
from llmos.sampling_params import SamplingParams


def req(i, n):
    r = Request(id=f"r{i}", seq_id=i, model="m", tenant="t", params=SamplingParams(temperature=0))
    r.prompt_ids = [100 * i + t for t in range(n)]
    r.max_tokens = 50
    r.arrival = float(i)
    return r


def step(sched, batch):
    for s in batch:
        s.req.num_computed += s.num_new
        sched.kv.commit(s.req)
        if s.sample:
            s.req.output_ids.append(1)
    sched.swap.step_done()


def setup(mode="swap"):
    pool = BlockPool(4, 4)
    sched = Scheduler(KVCacheManager(pool, prefix_caching=False), max_batched_tokens=64,
                      swap=SwapSpace(BlockPool(8, 4), block_bytes=1024, mode=mode))
    old, new = req(1, 8), req(2, 8)
    sched.add(old)
    sched.add(new)
    step(sched, sched.schedule())            # both prefilled: the pool is full
    return pool, sched, old, new


def test_preemption_swaps_out_keeps_progress_and_swaps_back_in():
    pool, sched, old, new = setup()
    new_blocks = list(new.blocks)
    batch = sched.schedule()                 # both need a third block: the newest is swapped out
    assert [s.req.id for s in batch] == ["r1"]
    out, inn = sched.swap.ops()
    assert out == list(zip(new_blocks, [0, 1])) and inn == []
    assert new.host_blocks == [0, 1] and new.num_computed == 8 and new.blocks == []
    assert new.summary()["state"] == "swapped"
    step(sched, batch)
    sched.finish(old)
    batch = sched.schedule()                 # swapped back in: only its next token is computed
    assert [(s.req.id, s.num_new) for s in batch] == [("r2", 1)]
    out, inn = sched.swap.ops()
    assert out == [] and [h for h, _ in inn] == [0, 1] and [d for _, d in inn] == new.blocks[:2]
    assert sched.swap.host.num_used == 2     # host blocks are held until the step succeeded
    step(sched, batch)
    assert sched.swap.host.num_used == 0 and sched.swap.stats()["swap_ins"] == 1
    sched.check_integrity()


def test_recompute_mode_drops_progress():
    pool, sched, old, new = setup("recompute")
    sched.schedule()
    assert new.host_blocks == [] and new.num_computed == 0 and sched.swap.stats()["swap_outs"] == 0


def test_auto_mode_swaps_when_copying_is_cheaper_than_recomputing():
    space = SwapSpace(BlockPool(8, 4), block_bytes=1000, copy_bytes_per_s=1e6, recompute_tokens_per_s=1000)
    r = req(1, 8)
    r.blocks, r.num_computed = [0, 1], 8
    assert space.should_swap(r)              # copy 2 x 2 KB at 1 MB/s = 4 ms < recompute 8 tokens = 8 ms
    space.recompute_tokens_per_s = 100000    # recompute 0.08 ms: cheaper than copying
    assert not space.should_swap(r)
    space.recompute_tokens_per_s = 100
    assert space.should_swap(r)


def test_a_lost_step_turns_swap_out_victims_into_recompute_and_reissues_swap_ins():
    pool, sched, old, new = setup()
    sched.schedule()
    sched.swap.step_lost()                   # the driver died before or while copying
    assert new.host_blocks == [] and new.num_computed == 0 and sched.swap.host.num_used == 0
    assert sched.swap.stats()["fallbacks_to_recompute"] == 1
    sched.check_integrity()


def test_aborting_a_swapped_request_frees_its_host_blocks():
    pool, sched, old, new = setup()
    batch = sched.schedule()
    step(sched, batch)
    sched.finish(new)
    assert sched.swap.host.num_used == 0 and new.host_blocks == []
