"""The priority scheduler on a fake clock with a fake model: admission order, preemption
victims, fair shares over many steps, the aging bound, deadlines."""
from __future__ import annotations

import itertools
from collections import Counter

from llmos.kernel.blocks import BlockPool
from llmos.kernel.kv_manager import KVCacheManager
from llmos.kernel.policy import PriorityPolicy, parse_priority
from llmos.kernel.requests import Request, State
from llmos.kernel.scheduler import Scheduler
from llmos.kernel.tenants import TenantBook, TenantConfig
from llmos.sampling_params import SamplingParams


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


ids = itertools.count(1)


def make(prio="interactive", tenant="t", prompt=4, max_tokens=50, clock=None):
    i = next(ids)
    r = Request(id=f"r{i}", seq_id=i, model="m", tenant=tenant, params=SamplingParams(temperature=0))
    r.prompt_ids = [i % 50 + 1] * prompt
    r.max_tokens = max_tokens
    r.priority = parse_priority(prio)
    r.arrival = clock() if clock else float(i)
    return r


def scheduler(blocks=64, seqs=8, tenants=None, clock=None, **policy_kw):
    clock = clock or Clock()
    policy = PriorityPolicy(TenantBook(tenants or {}), **policy_kw)
    return Scheduler(KVCacheManager(BlockPool(blocks, 4), prefix_caching=False), max_num_seqs=seqs,
                     max_batched_tokens=256, policy=policy, clock=clock), clock


def run_step(sched, clock, dt=0.1):
    """What the engine does: apply the step, finish requests that reached max_tokens."""
    batch = sched.schedule()
    for s in batch:
        s.req.num_computed += s.num_new
        sched.kv.commit(s.req)
        if s.sample:
            s.req.output_ids.append(7)
            if len(s.req.output_ids) >= s.req.max_tokens:
                sched.finish(s.req)
                s.req.to(State.FINISHING)
    clock.t += dt
    sched.check_integrity()
    return batch


def test_admission_order_is_class_then_level_then_arrival():
    sched, clock = scheduler(seqs=1)
    reqs = [make(p) for p in ("batch", "interactive:2", "realtime", "interactive", "batch:0", "realtime:5")]
    for r in reqs:
        sched.add(r)
    order = []
    for _ in range(6):
        (s,) = [b for b in sched.schedule() if b.req.state is State.RUNNING and b.req.num_computed == 0]
        order.append(s.req.priority.name)
        sched.finish(s.req)
        s.req.to(State.FINISHING)
    assert order == ["realtime:0", "realtime:5", "interactive:0", "interactive:2", "batch:0", "batch:0"]


def test_a_waiting_higher_priority_request_preempts_the_lowest_running_one():
    sched, clock = scheduler(seqs=2, min_run_s=0.0)
    low, mid = make("batch:5"), make("batch:1")
    sched.add(low)
    sched.add(mid)
    run_step(sched, clock)
    hi = make("realtime")
    sched.add(hi)
    batch = run_step(sched, clock)
    assert low.state is State.WAITING and low.preemptions == 1
    assert [s.req for s in batch] == [mid, hi]
    assert sched.policy.stats.snapshot()["preemptions"]["priority"] == 1


def test_no_preemption_for_equal_priority_or_recently_admitted_work():
    sched, clock = scheduler(seqs=1, min_run_s=5.0)
    a = make("batch")
    sched.add(a)
    run_step(sched, clock)
    sched.add(make("batch"))
    sched.add(make("realtime"))
    run_step(sched, clock)           # realtime waits: `a` ran for less than min_run_s
    assert a.state is State.RUNNING and a.preemptions == 0
    clock.t += 5
    run_step(sched, clock)
    assert a.state is State.WAITING and a.preemptions == 1


def test_preempted_request_finishes_with_all_its_tokens():
    sched, clock = scheduler(seqs=1, min_run_s=0.0)
    low = make("batch", max_tokens=6)
    sched.add(low)
    run_step(sched, clock)
    run_step(sched, clock)
    sched.add(make("realtime", max_tokens=3))
    for _ in range(20):
        run_step(sched, clock)
    assert low.state is State.FINISHING and len(low.output_ids) == 6


def test_weighted_fair_share_between_two_saturating_tenants():
    sched, clock = scheduler(blocks=400, seqs=4, tenants={"a": TenantConfig(weight=1), "b": TenantConfig(weight=3)})
    served = Counter()
    for _ in range(12):
        sched.add(make(tenant="a", max_tokens=8))
        sched.add(make(tenant="b", max_tokens=8))
    for _ in range(600):
        for s in run_step(sched, clock):
            served[s.req.tenant] += s.num_new
        for t in "ab":                # both tenants keep a backlog
            if sum(1 for r in sched.waiting if r.tenant == t) < 6:
                sched.add(make(tenant=t, max_tokens=8))
    ratio = served["b"] / served["a"]
    assert 2.7 < ratio < 3.3, served


def test_aging_bound_under_sustained_realtime_load():
    sched, clock = scheduler(seqs=1, max_wait_s={"interactive": 2.0, "batch": 3.0})
    old = make("batch", max_tokens=1)
    sched.add(old)
    bound = sched.policy.aging_bound_s(2)       # 5 s
    admitted_at = None
    for _ in range(200):
        sched.add(make("realtime", max_tokens=1))  # a new realtime request every step
        batch = run_step(sched, clock, dt=0.25)
        if any(s.req is old for s in batch):
            admitted_at = clock.t - 0.25
            break
    assert admitted_at is not None and admitted_at - old.queued_at <= bound + 0.5


def test_deadlines_are_found_for_queued_and_running_requests():
    sched, clock = scheduler(seqs=1)
    running, queued = make("interactive", clock=clock), make("batch", clock=clock)
    running.timeout_s, queued.queue_timeout_s = 10.0, 2.0
    sched.add(running)
    sched.add(queued)
    run_step(sched, clock)
    assert sched.find_expired() == []
    clock.t += 3
    assert sched.find_expired() == [(queued, "queue timeout")]
    clock.t += 8
    assert (running, "total timeout") in sched.find_expired()


def test_tenant_quota_refuses_with_retry_after():
    sched, clock = scheduler(tenants={"q": TenantConfig(max_concurrent=1)})
    sched.add(make(tenant="q"))
    refused = sched.policy.check_admission("q", clock())
    assert refused is not None and refused.limit == "max_concurrent" and refused.retry_after_s > 0
    assert sched.policy.check_admission("other", clock()) is None


def test_batch_slots_are_shared_by_weight_when_requests_are_long():
    sched, clock = scheduler(blocks=400, seqs=8, tenants={"a": TenantConfig(weight=1), "b": TenantConfig(weight=3)})
    for _ in range(16):
        sched.add(make(tenant="a", max_tokens=1000))
        sched.add(make(tenant="b", max_tokens=1000))
    run_step(sched, clock)
    assert Counter(r.tenant for r in sched.running) == {"a": 2, "b": 6}


def test_a_higher_priority_prompt_is_admitted_while_a_long_lower_priority_prompt_is_chunked():
    sched, clock = scheduler(blocks=1024)
    long = make("batch", prompt=2000, max_tokens=4)
    sched.add(long)
    assert [(s.req, s.num_new) for s in run_step(sched, clock)] == [(long, 256)]
    urgent = make("interactive", prompt=100, max_tokens=4)
    sched.add(urgent)
    # The long prompt yields the head its 100 tokens instead of taking all 256 again.
    step = run_step(sched, clock)
    assert [(s.req, s.num_new, s.sample) for s in step] == [(long, 156, False), (urgent, 100, True)]
    assert urgent.output_ids == [7]
    # A long head gets at most half the budget; the long prompt keeps the rest.
    other = make("interactive", prompt=1000, max_tokens=4)
    sched.add(other)
    assert [(s.req, s.num_new) for s in run_step(sched, clock)] == [(long, 128), (urgent, 1), (other, 127)]
    # Equal priorities: no reserve, first come first served within the budget.
    fcfs, clock2 = scheduler(blocks=1024)
    a, b = make("batch", prompt=2000), make("batch", prompt=100)
    fcfs.add(a)
    run_step(fcfs, clock2)
    fcfs.add(b)
    assert [(s.req, s.num_new) for s in run_step(fcfs, clock2)] == [(a, 256)]
