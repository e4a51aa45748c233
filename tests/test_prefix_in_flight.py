"""Requests that arrive together behind the same prompt prefix compute it once: a waiting
request whose next blocks a running request is computing waits a step for the prefix cache
(scheduler._waits_for_prefix, kv_manager.in_flight). The real Scheduler and KV manager,
driven by scheduler_kit's fake model: every output is checked token by token."""
from __future__ import annotations

from llmos.kernel.blocks import BlockPool
from llmos.kernel.kv_manager import KVCacheManager
from llmos.kernel.policy import PriorityPolicy
from llmos.kernel.requests import State
from llmos.kernel.scheduler import MIN_SHARED_TOKENS, Scheduler
from llmos.kernel.tenants import TenantBook
from scheduler_kit import FakeClock, apply, drain, expected_output, make_request, run_step

BS = 4


def scheduler(budget: int = 1024) -> Scheduler:
    return Scheduler(KVCacheManager(BlockPool(2048, BS), prefix_caching=True), max_num_seqs=64,
                     max_batched_tokens=budget, policy=PriorityPolicy(TenantBook({})), clock=FakeClock())


def prompts(n: int, shared: int, own: int, base: int = 0) -> list[list[int]]:
    prefix = [5 + (base + t) % 900 for t in range(shared)]
    return [prefix + [1000 + 100 * i + t for t in range(own)] for i in range(n)]


def prefill_tokens(sched: Scheduler, reqs, **kw) -> int:
    """Run to the end; the prompt tokens computed (prefill rows), every output checked."""
    computed = 0
    for r in reqs:
        sched.add(r)
    while sched.has_work():
        step = run_step(sched)
        computed += sum(min(s.num_new, len(s.req.prompt_ids) - (s.req.kv.num_computed - s.num_new))
                        for s in step.batch if s.req.kv.num_computed - s.num_new < len(s.req.prompt_ids))
    for r in reqs:
        assert r.output.ids == expected_output(r) and r.output.finish_reason == "length", r.id
    sched.check_integrity()
    return computed


def test_eight_chats_behind_one_prefix_compute_it_once():
    shared, own = 128, 12                      # 32 whole blocks shared, 3 of each its own
    sched = scheduler()
    reqs = [make_request(p, max_tokens=3) for p in prompts(8, shared, own)]
    assert prefill_tokens(sched, reqs) == shared + 8 * own
    stats = sched.kv.stats()
    assert stats["waits_for_prefix"] == 7 and stats["lookups"] == 8   # one lookup per admission
    assert stats["hit_tokens"] == 7 * shared
    assert all(r.kv.cached_prompt_tokens == shared for r in reqs[1:])   # what usage reports as cached


def test_without_the_wait_they_would_compute_it_again():
    """The same workload split so that no two share a prefix: nothing waits, all is computed."""
    sched = scheduler()
    reqs = [make_request(p, max_tokens=3) for i in range(8) for p in prompts(1, 128, 12, base=97 * i)]
    assert prefill_tokens(sched, reqs) == 8 * (128 + 12)
    assert sched.kv.stats()["waits_for_prefix"] == 0


def test_a_short_shared_run_is_computed_again_rather_than_waited_for():
    shared = MIN_SHARED_TOKENS - BS
    sched = scheduler()
    reqs = [make_request(p, max_tokens=3) for p in prompts(4, shared, 8)]
    assert prefill_tokens(sched, reqs) == 4 * (shared + 8)
    assert sched.kv.stats()["waits_for_prefix"] == 0


def test_a_higher_priority_request_never_waits_behind_a_lower_one():
    sched = scheduler(budget=64)               # the 136-token prompts take several steps
    (p_low, p_high) = prompts(2, 128, 8)
    low = make_request(p_low, max_tokens=3, priority="batch")
    high = make_request(p_high, max_tokens=3, priority="interactive")
    sched.add(low)
    run_step(sched)
    assert low.state is State.RUNNING and low.kv.num_computed < len(low.prompt_ids)   # mid-prompt
    sched.add(high)
    step = run_step(sched)
    assert high in [s.req for s in step.batch] and sched.kv.stats()["waits_for_prefix"] == 0
    drain(sched)
    assert high.output.ids == expected_output(high) and low.output.ids == expected_output(low)


def test_a_request_waits_for_a_long_prompt_that_is_computed_in_chunks():
    sched = scheduler(budget=200)              # 300-token prompts: two chunks each
    first, second = (make_request(p, max_tokens=3) for p in prompts(2, 288, 12))
    sched.add(first)
    sched.add(second)
    assert [s.req for s in run_step(sched).batch] == [first]     # its first chunk takes the budget
    step = run_step(sched)                                        # its second leaves 100 tokens
    assert [s.req for s in step.batch] == [first] and sched.kv.stats()["waits_for_prefix"] == 1
    drain(sched)
    assert second.kv.cached_prompt_tokens == 288 and second.output.ids == expected_output(second)
    assert sched.kv.stats()["lookups"] == 2


def test_a_waiting_request_goes_on_when_the_producer_is_cancelled_mid_step():
    """No one waits forever: the producer's blocks leave the in-flight set with it."""
    sched = scheduler()
    a, b = (make_request(p, max_tokens=3) for p in prompts(2, 128, 8))
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert [s.req for s in batch] == [a] and sched.kv.stats()["waits_for_prefix"] == 1
    sched.finish_requests([a], "error")        # a cancel while its prompt is being computed
    apply(sched, batch)
    drain(sched)
    assert b.output.ids == expected_output(b) and b.output.finish_reason == "length"
    assert b.kv.cached_prompt_tokens == 0      # it computed the prefix itself
    sched.check_integrity()
    assert sched.pool.num_used == 0
