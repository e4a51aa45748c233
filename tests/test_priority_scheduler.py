"""The priority scheduler on a fake clock with a fake model: admission order, preemption
victims, fair shares over many steps, the aging bound, deadlines."""
from __future__ import annotations

from collections import Counter

from scheduler_kit import expected_output, make_request, priority_scheduler, run_step, token_at

from llmos.kernel.requests import State
from llmos.kernel.tenants import TenantConfig

ONE_TO_THREE = {"a": TenantConfig(weight=1), "b": TenantConfig(weight=3)}


def test_admission_order_is_class_then_level_then_arrival():
    sched, clock = priority_scheduler(seqs=1)
    prios = ("batch", "interactive:2", "realtime", "interactive", "batch:0", "realtime:5")
    reqs = [make_request(priority=p) for p in prios]
    for r in reqs:
        sched.add(r)
    order = []
    for _ in range(6):
        (s,) = [b for b in sched.schedule() if b.req.state is State.RUNNING and b.req.kv.num_computed == 0]
        order.append(s.req.priority.name)
        sched.finish_requests([s.req], "abort")
    assert order == ["realtime:0", "realtime:5", "interactive:0", "interactive:2", "batch:0", "batch:0"]


def test_a_waiting_higher_priority_request_preempts_the_lowest_running_one():
    sched, clock = priority_scheduler(seqs=2, min_run_s=0.0)
    low, mid = make_request(priority="batch:5"), make_request(priority="batch:1")
    sched.add(low)
    sched.add(mid)
    run_step(sched)
    hi = make_request(priority="realtime")
    sched.add(hi)
    batch = run_step(sched).batch
    assert low.state is State.WAITING and low.sched.preemptions == 1
    assert [s.req for s in batch] == [mid, hi]
    assert sched.policy.stats.snapshot()["preemptions"]["priority"] == 1


def test_no_preemption_for_equal_priority_or_recently_admitted_work():
    sched, clock = priority_scheduler(seqs=1, min_run_s=5.0)
    a = make_request(priority="batch:3")
    sched.add(a)
    run_step(sched)
    sched.add(make_request(priority="batch:3"))   # equal: never
    sched.add(make_request(priority="batch:0"))   # a higher level of its class: once `a` ran min_run_s
    run_step(sched)
    assert a.state is State.RUNNING and a.sched.preemptions == 0
    clock.advance(5)
    run_step(sched)
    assert a.state is State.WAITING and a.sched.preemptions == 1


def test_a_higher_class_preempts_at_once_and_then_the_protection_doubles():
    sched, clock = priority_scheduler(seqs=1, min_run_s=5.0)
    a = make_request(priority="batch", max_tokens=50)
    sched.add(a)
    run_step(sched)
    first = make_request(priority="interactive", max_tokens=2)
    sched.add(first)
    run_step(sched)                  # no wait for `a`'s min_run_s: interactive TTFT is not batch's business
    assert a.state is State.WAITING and a.sched.preemptions == 1
    for _ in range(10):
        run_step(sched)
    assert first.state is State.FINISHING and a.state is State.RUNNING
    second = make_request(priority="interactive", max_tokens=2)
    sched.add(second)
    run_step(sched)                  # preempted once: protected min_run_s * (2 - 1) since readmitted
    assert a.state is State.RUNNING and a.sched.preemptions == 1
    clock.advance(5)
    run_step(sched)
    assert a.state is State.WAITING and a.sched.preemptions == 2


def test_preempted_request_finishes_with_all_its_tokens():
    sched, clock = priority_scheduler(seqs=1, min_run_s=0.0)
    low = make_request(priority="batch", max_tokens=6)
    sched.add(low)
    run_step(sched)
    run_step(sched)
    urgent = make_request(priority="realtime", max_tokens=3)
    sched.add(urgent)
    for _ in range(20):
        run_step(sched)
    assert low.sched.preemptions == 1
    for r in (low, urgent):
        assert (r.state, r.output.finish_reason, len(r.output.ids)) == (State.FINISHING, "length", r.max_tokens)
        assert r.output.ids == expected_output(r)   # none lost or repeated across the preemption


def test_weighted_fair_share_between_two_saturating_tenants():
    sched, clock = priority_scheduler(blocks=400, seqs=4, tenants=ONE_TO_THREE)
    served = Counter()
    for _ in range(12):
        sched.add(make_request(tenant="a", max_tokens=8))
        sched.add(make_request(tenant="b", max_tokens=8))
    for _ in range(600):
        for s in run_step(sched).batch:
            served[s.req.tenant] += s.num_new
        for t in "ab":                # both tenants keep a backlog
            if sum(1 for r in sched.waiting if r.tenant == t) < 6:
                sched.add(make_request(tenant=t, max_tokens=8))
    ratio = served["b"] / served["a"]
    assert 2.7 < ratio < 3.3, served


def test_aging_bound_under_sustained_realtime_load():
    sched, clock = priority_scheduler(seqs=1, max_wait_s={"interactive": 2.0, "batch": 3.0})
    old = make_request(priority="batch", max_tokens=1)
    sched.add(old)
    bound = sched.policy.aging_bound_s(2)       # 5 s
    admitted_at = None
    for _ in range(200):
        sched.add(make_request(priority="realtime", max_tokens=1))  # a new realtime request every step
        batch = run_step(sched, dt=0.25).batch
        if any(s.req is old for s in batch):
            admitted_at = clock.t - 0.25
            break
    assert admitted_at is not None and admitted_at - old.sched.queued_at <= bound + 0.5


def test_deadlines_are_found_for_queued_and_running_requests():
    sched, clock = priority_scheduler(seqs=1)
    running = make_request(priority="interactive", arrival=clock())
    queued = make_request(priority="batch", arrival=clock())
    running.sched.timeout_s, queued.sched.queue_timeout_s = 10.0, 2.0
    sched.add(running)
    sched.add(queued)
    run_step(sched)
    assert sched.find_expired() == []
    clock.advance(3)
    assert sched.find_expired() == [(queued, "queue timeout")]
    clock.advance(8)
    assert (running, "total timeout") in sched.find_expired()


def test_tenant_quota_refuses_with_retry_after():
    sched, clock = priority_scheduler(tenants={"q": TenantConfig(max_concurrent=1)})
    sched.add(make_request(tenant="q"))
    refused = sched.policy.check_admission("q", clock())
    assert refused is not None and refused.limit == "max_concurrent" and refused.retry_after_s > 0
    assert sched.policy.check_admission("other", clock()) is None


def test_batch_slots_are_shared_by_weight_when_requests_are_long():
    sched, clock = priority_scheduler(blocks=400, seqs=8, tenants=ONE_TO_THREE)
    for _ in range(16):
        sched.add(make_request(tenant="a", max_tokens=1000))
        sched.add(make_request(tenant="b", max_tokens=1000))
    run_step(sched)
    assert Counter(r.tenant for r in sched.running) == {"a": 2, "b": 6}


def test_a_higher_priority_prompt_is_admitted_while_a_long_lower_priority_prompt_is_chunked():
    sched, clock = priority_scheduler(blocks=1024)
    long = make_request(priority="batch", prompt=2000, max_tokens=4)
    sched.add(long)
    assert [(s.req, s.num_new) for s in run_step(sched).batch] == [(long, 256)]
    urgent = make_request(priority="interactive", prompt=100, max_tokens=4)
    sched.add(urgent)
    # The long prompt yields the head its 100 tokens instead of taking all 256 again.
    step = run_step(sched).batch
    assert [(s.req, s.num_new, s.sample) for s in step] == [(long, 156, False), (urgent, 100, True)]
    assert urgent.output.ids == [token_at(urgent.seq_id, 100)]
    # A long head gets at most half the budget; the long prompt keeps the rest.
    other = make_request(priority="interactive", prompt=1000, max_tokens=4)
    sched.add(other)
    assert [(s.req, s.num_new) for s in run_step(sched).batch] == [(long, 128), (urgent, 1), (other, 127)]
    # Equal priorities: no reserve, first come first served within the budget.
    fcfs, _ = priority_scheduler(blocks=1024)
    a, b = make_request(priority="batch", prompt=2000), make_request(priority="batch", prompt=100)
    fcfs.add(a)
    run_step(fcfs)
    fcfs.add(b)
    assert [(s.req, s.num_new) for s in run_step(fcfs).batch] == [(a, 256)]
