"""Continuous batching decisions, on tiny pools with a fake model (no processes)."""
from scheduler_kit import expected_output, make_request, run_step, token_at

from llmos.kernel.blocks import BlockPool
from llmos.kernel.kv_manager import KVCacheManager
from llmos.kernel.requests import State
from llmos.kernel.scheduler import Scheduler


def make(i: int, prompt_len: int):
    return make_request(list(range(1, prompt_len + 1)), i=i, max_tokens=100)


def test_new_requests_join_a_running_batch_each_step():
    sched = Scheduler(KVCacheManager(BlockPool(64, 4), prefix_caching=False), max_batched_tokens=64)
    a = make(1, 5)
    sched.add(a)
    run_step(sched)
    b = make(2, 3)
    sched.add(b)
    batch = sched.schedule()
    assert [(s.req.id, s.num_new, s.sample) for s in batch] == [("r1", 1, True), ("r2", 3, True)]
    sched.check_integrity()


def test_long_prompt_is_chunked_under_the_token_budget_and_decodes_keep_going():
    sched = Scheduler(KVCacheManager(BlockPool(64, 4), prefix_caching=False), max_batched_tokens=8)
    short = make(1, 2)
    sched.add(short)
    run_step(sched)
    long = make(2, 20)
    sched.add(long)
    chunks = []
    for _ in range(4):
        batch = run_step(sched).batch
        assert batch[0].req is short and batch[0].num_new == 1  # the decode never waits
        chunks.append([(s.num_new, s.sample) for s in batch[1:]])
    assert chunks == [[(7, False)], [(7, False)], [(6, True)], [(1, True)]]
    assert long.kv.num_computed == 21 and long.output.ids == [token_at(2, 20), token_at(2, 21)]
    assert short.output.ids == expected_output(short) and len(short.output.ids) == 5


def test_blocks_grow_on_demand_and_are_freed_on_finish():
    pool = BlockPool(8, 4)
    sched = Scheduler(KVCacheManager(pool, prefix_caching=False), max_batched_tokens=64)
    r = make(1, 4)
    sched.add(r)
    run_step(sched)
    assert r.kv.blocks == [0]
    run_step(sched)                     # position 4 needs a second block
    assert r.kv.blocks == [0, 1]
    assert sched.finish_requests([r], "abort") == [r]
    assert pool.num_free == 8 and r.kv.blocks == [] and r.state is State.FINISHING
    sched.check_integrity()


def test_memory_pressure_preempts_the_newest_by_recompute():
    pool = BlockPool(4, 4)
    sched = Scheduler(KVCacheManager(pool, prefix_caching=False), max_batched_tokens=64)
    old, new = make(1, 8), make(2, 8)
    sched.add(old)
    sched.add(new)
    run_step(sched)                            # both prefilled: 2 blocks each, pool full
    assert pool.num_free == 0
    batch = run_step(sched).batch              # both need a third block: the newer is preempted
    assert [s.req.id for s in batch] == ["r1"]
    assert new.state is State.WAITING and new.kv.num_computed == 0 and new.kv.blocks == []
    assert sched.waiting[0] is new and sched.preemptions == 1
    sched.finish_requests([old], "abort")
    batch = run_step(sched).batch              # recompute prompt + the token it had generated
    assert [(s.req.id, s.num_new, s.sample) for s in batch] == [("r2", 9, True)]
    assert new.output.ids == [token_at(2, 8), token_at(2, 9)]   # kept its token, sampled the next


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


def test_the_step_result_ends_requests_by_the_stop_rule_and_carries_logprobs():
    sched = Scheduler(KVCacheManager(BlockPool(64, 4), prefix_caching=False), max_batched_tokens=64)
    by_length = make_request(4, i=1, max_tokens=3)
    by_stop = make_request(4, i=2, max_tokens=10, stop_token_ids=[token_at(2, 6)], logprobs=2)
    for r in (by_length, by_stop):
        sched.add(r)
    assert run_step(sched).changed == [by_length, by_stop]
    for _ in range(2):
        run_step(sched)
    assert (by_length.state, by_length.output.finish_reason, by_length.output.ids) == \
        (State.FINISHING, "length", expected_output(by_length)) and len(by_length.output.ids) == 3
    assert (by_stop.state, by_stop.output.finish_reason, by_stop.output.hidden_tail) == (State.FINISHING, "stop", 1)
    assert by_stop.output.ids == [token_at(2, 4), token_at(2, 5), token_at(2, 6)]
    assert [len(top) for _, top in by_stop.output.logprobs] == [2, 2, 2] and by_length.output.logprobs == []
    assert not sched.has_work()
    sched.check_integrity()


def test_a_lost_step_applies_nothing_and_is_planned_again():
    sched = Scheduler(KVCacheManager(BlockPool(64, 4), prefix_caching=False), max_batched_tokens=64)
    r = make(1, 6)
    sched.add(r)
    run_step(sched)
    lost = run_step(sched, lost=True)
    assert lost.changed == [] and r.kv.num_computed == 6 and r.output.ids == [token_at(1, 6)]
    again = run_step(sched)
    assert [(s.num_new, s.sample) for s in again.batch] == [(s.num_new, s.sample) for s in lost.batch] == [(1, True)]
    assert r.output.ids == [token_at(1, 6), token_at(1, 7)]
