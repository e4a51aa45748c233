"""Continuous batching decisions, on tiny pools with a fake model (no processes)."""
from llmos.kernel.blocks import BlockPool
from llmos.kernel.kv_manager import KVCacheManager
from llmos.kernel.requests import Request, State
from llmos.kernel.scheduler import Scheduler
from llmos.sampling_params import SamplingParams


def make(i: int, prompt_len: int, arrival: float | None = None) -> Request:
    r = Request(id=f"r{i}", seq_id=i, model="m", tenant="t", params=SamplingParams(temperature=0))
    r.prompt_ids = list(range(1, prompt_len + 1))
    r.max_tokens = 100
    r.arrival = float(i) if arrival is None else arrival
    return r


def run_step(sched: Scheduler, batch) -> None:
    """What the engine does with a step result: advance computed, append a token when sampled."""
    for s in batch:
        s.req.num_computed += s.num_new
        if s.sample:
            s.req.output_ids.append(7)


def test_new_requests_join_a_running_batch_each_step():
    sched = Scheduler(KVCacheManager(BlockPool(64, 4), prefix_caching=False), max_batched_tokens=64)
    a = make(1, 5)
    sched.add(a)
    run_step(sched, sched.schedule())
    b = make(2, 3)
    sched.add(b)
    batch = sched.schedule()
    assert [(s.req.id, s.num_new, s.sample) for s in batch] == [("r1", 1, True), ("r2", 3, True)]
    sched.check_integrity()


def test_long_prompt_is_chunked_under_the_token_budget_and_decodes_keep_going():
    sched = Scheduler(KVCacheManager(BlockPool(64, 4), prefix_caching=False), max_batched_tokens=8)
    short = make(1, 2)
    sched.add(short)
    run_step(sched, sched.schedule())
    long = make(2, 20)
    sched.add(long)
    chunks = []
    for _ in range(4):
        batch = sched.schedule()
        assert batch[0].req is short and batch[0].num_new == 1  # the decode never waits
        chunks.append([(s.num_new, s.sample) for s in batch[1:]])
        run_step(sched, batch)
    assert chunks == [[(7, False)], [(7, False)], [(6, True)], [(1, True)]]
    assert long.num_computed == 21 and len(long.output_ids) == 2


def test_blocks_grow_on_demand_and_are_freed_on_finish():
    pool = BlockPool(8, 4)
    sched = Scheduler(KVCacheManager(pool, prefix_caching=False), max_batched_tokens=64)
    r = make(1, 4)
    sched.add(r)
    run_step(sched, sched.schedule())
    assert r.blocks == [0]
    run_step(sched, sched.schedule())   # position 4 needs a second block
    assert r.blocks == [0, 1]
    sched.finish(r)
    assert pool.num_free == 8 and r.blocks == []
    sched.check_integrity()


def test_memory_pressure_preempts_the_newest_by_recompute():
    pool = BlockPool(4, 4)
    sched = Scheduler(KVCacheManager(pool, prefix_caching=False), max_batched_tokens=64)
    old, new = make(1, 8), make(2, 8)
    sched.add(old)
    sched.add(new)
    run_step(sched, sched.schedule())          # both prefilled: 2 blocks each, pool full
    assert pool.num_free == 0
    batch = sched.schedule()                   # both need a third block: the newer is preempted
    assert [s.req.id for s in batch] == ["r1"]
    assert new.state is State.WAITING and new.num_computed == 0 and new.blocks == []
    assert sched.waiting[0] is new and sched.preemptions == 1
    sched.check_integrity()
    run_step(sched, batch)
    sched.finish(old)
    batch = sched.schedule()                   # recompute prompt + the token it had generated
    assert [(s.req.id, s.num_new, s.sample) for s in batch] == [("r2", 9, True)]


def test_head_of_line_waits_when_memory_is_short():
    pool = BlockPool(3, 4)
    sched = Scheduler(KVCacheManager(pool, prefix_caching=False), max_batched_tokens=64)
    big, small = make(1, 12), make(2, 2)
    sched.add(big)
    sched.add(small)
    batch = sched.schedule()
    assert [s.req.id for s in batch] == ["r1"]
    assert sched.waiting == [small]


def test_max_num_seqs_limits_the_batch():
    sched = Scheduler(KVCacheManager(BlockPool(64, 4), prefix_caching=False), max_num_seqs=2, max_batched_tokens=64)
    for i in range(3):
        sched.add(make(i, 2))
    assert len(sched.schedule()) == 2
