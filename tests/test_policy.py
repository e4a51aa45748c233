"""The priority policy on a fake clock with fake requests: no scheduler, no processes."""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import InitVar, dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmos.kernel.policy import (BATCH, INTERACTIVE, MAX_LEVEL, REALTIME, Priority, PriorityPolicy,
                                 QuotaExceeded, TenantBook, TenantConfig, deadline, expired, parse_priority)
from llmos.kernel.requests import KVState, SchedState
from llmos.sampling_params import InvalidParam


@dataclass(eq=False)
class Req:
    name: str
    priority: Priority
    tenant: str = "t"
    arrival: InitVar[float] = 0.0
    timeout_s: InitVar[float | None] = None
    queue_timeout_s: InitVar[float | None] = None
    started_at: InitVar[float | None] = None
    tokens: int = 100   # what serving it costs, in the simulations
    kv: KVState = field(default_factory=KVState)   # the real types: the policy reads kv and sched
    sched: SchedState = field(init=False)

    def __post_init__(self, arrival, timeout_s, queue_timeout_s, started_at):
        self.sched = SchedState(arrival=arrival, queued_at=arrival, started_at=started_at,
                                timeout_s=timeout_s, queue_timeout_s=queue_timeout_s)


def P(text: str) -> Priority:
    return parse_priority(text)


def names(reqs) -> list[str]:
    return [r.name for r in reqs]


# ------------------------------------------------------------------ parsing
def test_parse_names_levels_and_ints():
    assert parse_priority("realtime") == Priority(REALTIME, 0)
    assert parse_priority("interactive:7") == Priority(INTERACTIVE, 7)
    assert parse_priority("batch:3") == Priority(BATCH, 3)
    assert parse_priority("batch:3").name == "batch:3"
    assert parse_priority(None) == Priority(INTERACTIVE, 0)
    assert parse_priority(None, tenant_default="batch") == Priority(BATCH, 0)
    # vLLM's int: a level inside the tenant's default class
    assert parse_priority(5) == Priority(INTERACTIVE, 5)
    assert parse_priority(5, tenant_default="batch") == Priority(BATCH, 5)
    assert parse_priority(MAX_LEVEL, "realtime") == Priority(REALTIME, MAX_LEVEL)
    for p in (Priority(REALTIME, 0), Priority(BATCH, 12), Priority(INTERACTIVE, MAX_LEVEL)):
        assert parse_priority(p.name) == p
        assert parse_priority(p) is p


def test_priority_orders_by_class_then_level():
    ps = [P("batch:0"), P("realtime:9"), P("interactive:2"), P("interactive:1"), P("realtime:0")]
    assert [p.name for p in sorted(ps)] == ["realtime:0", "realtime:9", "interactive:1", "interactive:2", "batch:0"]
    assert P("interactive:1000") < P("batch")


@pytest.mark.parametrize("bad", [True, False, -1, MAX_LEVEL + 1, 1.5, "urgent", "Batch", " batch", "batch:",
                                 "batch:-1", "batch:x", "batch:1.5", "batch:٣", "batch:3:4", "", [], {"a": 1}])
def test_parse_errors_name_the_priority_field(bad):
    with pytest.raises(InvalidParam) as err:
        parse_priority(bad)
    assert err.value.param == "priority"


def test_bad_tenant_default_is_a_config_error():
    with pytest.raises(ValueError):
        parse_priority(3, tenant_default="urgent")
    with pytest.raises(ValueError):
        TenantConfig(default_priority="urgent")
    with pytest.raises(ValueError):
        TenantConfig(weight=0)


# ------------------------------------------------------------------ admission order
def test_exact_admission_order_across_classes_levels_and_arrival():
    pol = PriorityPolicy()
    reqs = [Req("b0", P("batch"), arrival=0), Req("i3", P("interactive:3"), arrival=1),
            Req("r1", P("realtime:1"), arrival=2), Req("i0", P("interactive"), arrival=3),
            Req("r0", P("realtime"), arrival=4), Req("i0-late", P("interactive"), arrival=5),
            Req("b2", P("batch:2"), arrival=6)]
    for r in reqs:
        pol.on_queued(r)
    assert names(pol.order(reqs, now=6)) == ["r0", "r1", "i0", "i0-late", "i3", "b0", "b2"]


def test_int_priorities_are_levels_inside_the_tenant_default_class():
    book = TenantBook({"bulk": TenantConfig(default_priority="batch"), "app": TenantConfig()})
    pol = PriorityPolicy(book)
    reqs = [Req("bulk-0", pol.parse(0, "bulk"), tenant="bulk", arrival=0),
            Req("app-9", pol.parse(9, "app"), tenant="app", arrival=1),
            Req("app-2", pol.parse(2, "app"), tenant="app", arrival=2),
            Req("bulk-rt", pol.parse("realtime", "bulk"), tenant="bulk", arrival=3)]
    assert [r.priority.name for r in reqs] == ["batch:0", "interactive:9", "interactive:2", "realtime:0"]
    for r in reqs:
        pol.on_queued(r)
    assert names(pol.order(reqs, now=3)) == ["bulk-rt", "app-2", "app-9", "bulk-0"]


def test_equal_priority_goes_to_the_tenant_with_less_service():
    pol = PriorityPolicy()
    a, b = Req("a", P("interactive"), tenant="a", arrival=0), Req("b", P("interactive"), tenant="b", arrival=1)
    pol.on_queued(a)
    pol.on_queued(b)
    assert names(pol.order([a, b], now=1)) == ["a", "b"]   # equal virtual time: arrival
    pol.charge(a, 50, now=1)
    assert names(pol.order([a, b], now=1)) == ["b", "a"]


# ------------------------------------------------------------------ preemption
def running(pol, *reqs, now=0.0):
    for r in reqs:
        pol.on_queued(r)
        r.sched.started_at = r.sched.arrival
        pol.on_started(r, now)
    return list(reqs)


def test_pick_victim_lowest_priority_then_most_served_tenant_then_newest():
    pol = PriorityPolicy()
    rt = Req("rt", P("realtime"), tenant="x", arrival=0)
    b1_x = Req("b1-x", P("batch:1"), tenant="x", arrival=1)
    b1_y_old = Req("b1-y-old", P("batch:1"), tenant="y", arrival=2)
    b1_y_new = Req("b1-y-new", P("batch:1"), tenant="y", arrival=3)
    b0 = Req("b0", P("batch:0"), tenant="z", arrival=4)
    run = running(pol, rt, b1_x, b1_y_old, b1_y_new, b0)
    pol.charge(b1_y_old, 10, now=5)   # y is now the most served
    assert pol.pick_victim(run, now=10).name == "b1-y-new"
    pol.charge(b1_x, 20, now=5)
    assert pol.pick_victim(run, now=10).name == "b1-x"
    assert pol.pick_victim([rt, b0], now=10).name == "b0"
    assert pol.pick_victim([rt], now=10) is rt    # memory must be found: no protection


def test_preemption_only_for_strictly_higher_priority():
    pol = PriorityPolicy(min_run_s=0)
    inter = Req("inter", P("interactive"), arrival=0)
    batch = Req("batch", P("batch"), arrival=1)
    run = running(pol, inter, batch)
    assert pol.preemption_candidates(Req("rt", P("realtime")), run, now=5)[0] is batch
    assert names(pol.preemption_candidates(Req("rt", P("realtime")), run, now=5)) == ["batch", "inter"]
    assert pol.preemption_candidates(Req("i", P("interactive")), run, now=5)[0] is batch
    assert pol.preemption_candidates(Req("i", P("interactive")), [inter], now=5) == []   # equal
    assert pol.preemption_candidates(Req("b", P("batch")), run, now=5) == []              # equal or lower
    assert pol.preemption_candidates(Req("b9", P("batch:9")), run, now=5) == []
    assert names(pol.preemption_candidates(Req("b0", P("batch:0")), [Req("b1", P("batch:1"), started_at=0)], now=5)) == ["b1"]


def test_aged_head_does_not_preempt():
    pol = PriorityPolicy(min_run_s=0)
    run = running(pol, Req("i", P("interactive:5"), arrival=0))
    old_batch = Req("old", P("batch"), arrival=0)
    assert pol.rank(old_batch, now=100) == (REALTIME, True)
    assert pol.preemption_candidates(old_batch, run, now=100) == []


def test_min_run_protects_recent_admissions_with_backoff():
    pol = PriorityPolicy(min_run_s=2.0)
    victim = Req("v", P("batch:3"), arrival=0)
    running(pol, victim)
    victim.sched.started_at = 10.0
    head = Req("rt", P("realtime"), arrival=10)
    same_class = Req("b0", P("batch:0"), arrival=10)   # a higher level of the victim's class
    assert pol.preemption_candidates(same_class, [victim], now=11.9) == []
    assert pol.preemption_candidates(same_class, [victim], now=12.0)[:1] == [victim]
    # A higher class's first preemption is free: min_run_s * (2**0 - 1).
    assert pol.preemption_candidates(head, [victim], now=10.0)[:1] == [victim]
    # A request preempted before is protected for min_run_s * 2**preemptions (a higher
    # class's head: min_run_s * (2**preemptions - 1)).
    victim.sched.preemptions = 2
    assert pol.preemption_candidates(same_class, [victim], now=17.9) == []
    assert pol.preemption_candidates(same_class, [victim], now=18.0)[:1] == [victim]
    assert pol.preemption_candidates(head, [victim], now=15.9) == []
    assert pol.preemption_candidates(head, [victim], now=16.0)[:1] == [victim]
    # A protected victim is skipped for an unprotected one.
    other = Req("o", P("interactive"), arrival=1, started_at=0.0)
    pol.on_queued(other)
    pol.on_started(other, 0)
    assert pol.preemption_candidates(head, [victim, other], now=11)[:1] == [other]


def test_preemption_counters_and_books():
    pol = PriorityPolicy()
    a = Req("a", P("batch"))
    running(pol, a)
    pol.on_preempted(a, "priority")
    pol.on_started(a, now=1)
    pol.on_preempted(a, "memory")
    assert pol.stats.preemptions == {"priority": 1, "memory": 1, "fairness": 0}
    assert pol.tenants.counts("t") == (1, 0)
    pol.check_integrity([a], [])
    with pytest.raises(AssertionError):
        pol.check_integrity([], [a])
    with pytest.raises(ValueError):
        pol.on_preempted(a, "boredom")
    pol.on_finished(a, running=False)
    with pytest.raises(RuntimeError):
        pol.on_finished(a, running=False)   # books out of balance


# ------------------------------------------------------------------ aging
def test_aging_promotes_one_class_per_period():
    pol = PriorityPolicy(max_wait_s={"realtime": 5, "interactive": 10, "batch": 30})
    b, i, r = Req("b", P("batch:7")), Req("i", P("interactive:3")), Req("r", P("realtime:2"))
    assert [pol.rank(b, t) for t in (0, 29.9, 30, 39.9, 40, 1e6)] == [
        (BATCH, False), (BATCH, False), (INTERACTIVE, True), (INTERACTIVE, True), (REALTIME, True), (REALTIME, True)]
    assert [pol.rank(i, t) for t in (9.9, 10)] == [(INTERACTIVE, False), (REALTIME, True)]
    assert [pol.rank(r, t) for t in (4.9, 5)] == [(REALTIME, False), (REALTIME, True)]
    assert [pol.aging_bound_s(c) for c in (REALTIME, INTERACTIVE, BATCH)] == [5, 10, 40]
    # Defaults: realtime is not aged; batch 30 + interactive 10.
    assert [PriorityPolicy().aging_bound_s(c) for c in (REALTIME, INTERACTIVE, BATCH)] == [float("inf"), 10, 40]
    # Aging restarts from queued_at (a preempted request's re-queue time).
    b.sched.queued_at = 35
    assert pol.rank(b, 40) == (BATCH, False)


def test_aged_requests_go_first_and_oldest_first():
    pol = PriorityPolicy()
    fresh_rt = Req("fresh-rt", P("realtime"), arrival=50)
    old_batch = Req("old-batch", P("batch:9"), arrival=0)        # aged realtime at 40
    old_inter = Req("old-inter", P("interactive:5"), arrival=30)  # aged realtime at 40
    mid_batch = Req("mid-batch", P("batch"), arrival=15)         # aged interactive at 45
    fresh_inter = Req("fresh-inter", P("interactive"), arrival=50)
    reqs = [fresh_rt, old_batch, old_inter, mid_batch, fresh_inter]
    for r in reqs:
        pol.on_queued(r)
    assert names(pol.order(reqs, now=50)) == ["old-batch", "old-inter", "fresh-rt", "mid-batch", "fresh-inter"]


def test_aging_promotes_a_queue_and_the_weights_decide_inside_it():
    book = TenantBook({"a": TenantConfig(weight=1), "b": TenantConfig(weight=3)})
    pol = PriorityPolicy(book)
    old_a = Req("old-a", P("interactive"), tenant="a", arrival=0)       # aged realtime at 10
    fresh_b = Req("fresh-b", P("interactive"), tenant="b", arrival=20)
    fresh_rt = Req("fresh-rt", P("realtime"), tenant="c", arrival=20)
    other = Req("other-level", P("interactive:1"), tenant="b", arrival=19)
    reqs = [old_a, fresh_b, fresh_rt, other]
    running(pol, *[Req(f"a{i}", P("batch"), tenant="a") for i in range(2)],
            *[Req(f"b{i}", P("batch"), tenant="b") for i in range(3)])     # slots per weight a 2, b 1
    for r in reqs:
        pol.on_queued(r)
    assert pol.rank(fresh_b, now=20) == (INTERACTIVE, False)
    assert pol.queue_ranks(reqs, now=20)[P("interactive")] == (REALTIME, True)
    # The interactive:0 queue is aged: it goes before fresh realtime work, and inside it b,
    # under its share, before a's older request; interactive:1 is another queue, not aged.
    assert names(pol.order(reqs, now=20)) == ["fresh-b", "old-a", "fresh-rt", "other-level"]


def test_aging_bound_under_a_sustained_realtime_stream():
    """Two realtime requests arrive every second, one request is admitted per second: the
    realtime backlog grows forever, yet the batch request is admitted by its bound, even
    though its tenant has had far more service than the realtime tenant."""
    pol = PriorityPolicy(max_wait_s={"realtime": 5, "interactive": 10, "batch": 30})
    bound = pol.aging_bound_s(BATCH)
    victim = Req("batch", P("batch:9"), tenant="bulk", arrival=0.0)
    pol.on_queued(victim)
    pol.charge(victim, 10**6, now=0.0)
    waiting, admitted_at, n = [victim], None, 0
    for step in range(1, 200):
        now = float(step)
        for _ in range(2):
            n += 1
            r = Req(f"rt{n}", P("realtime"), tenant="rt", arrival=now)
            pol.on_queued(r)
            waiting.append(r)
        head = pol.order(waiting, now)[0]
        waiting.remove(head)
        head.sched.started_at = now
        pol.on_started(head, now)
        pol.charge(head, head.tokens, now)
        if head is victim:
            admitted_at = now
            break
    # It is the oldest request, so k = 0: admitted at the first admission at or after the bound.
    assert admitted_at == bound == 40.0
    assert pol.stats.promotions["batch"] == 1
    assert pol.stats.promotions["realtime"] > 0   # the realtime backlog aged too


def test_aging_bound_counts_older_waiting_requests():
    """At queued_at + D(c) the k older requests still waiting may go first, and no more."""
    pol = PriorityPolicy()   # defaults: interactive ages after 10 s, realtime never
    olds = [Req(f"old{i}", P("interactive"), tenant="app", arrival=i * 0.1) for i in range(3)]
    victim = Req("victim", P("interactive:9"), tenant="app", arrival=1.0)
    waiting = [*olds, victim]
    for r in waiting:
        pol.on_queued(r)
    due = victim.sched.queued_at + pol.aging_bound_s(INTERACTIVE)
    k, after, order = None, 0, []
    for step in range(1, 100):
        now = float(step)
        for j in range(2):   # a realtime stream the system cannot keep up with
            r = Req(f"rt{step}.{j}", P("realtime"), tenant="rt", arrival=now)
            pol.on_queued(r)
            waiting.append(r)
        if now >= due and k is None:
            k = sum(w.sched.queued_at < victim.sched.queued_at for w in waiting)
        head = pol.order(waiting, now)[0]
        waiting.remove(head)
        pol.on_started(head, now)
        order.append(head.name)
        after += now >= due
        if head is victim:
            break
    assert order[-4:] == ["old0", "old1", "old2", "victim"]
    assert k == 2 and after == k + 1   # old0 went at 10 s; old1, old2, then the victim


# ------------------------------------------------------------------ fairness preemption
def weighted(**weights) -> PriorityPolicy:
    return PriorityPolicy(TenantBook({t: TenantConfig(weight=w) for t, w in weights.items()}), min_run_s=1.0)


def test_fairness_takes_whole_slots_from_the_most_over_share_tenant_cheapest_first():
    pol = weighted(a=1, b=3)
    run = running(pol, *[Req(f"a{i}", P("interactive"), tenant="a", arrival=i, kv=KVState(num_computed=50 - i)) for i in range(8)])
    head = Req("b0", P("interactive"), tenant="b", arrival=10)
    # b gains one slot per head, so a gives while it keeps (running - 1) / 1 >= 1/3, the
    # cheapest first (fewest tokens in KV). The scheduler takes only what makes room.
    assert names(pol.fairness_candidates(head, run, now=20)) == ["a7", "a6", "a5", "a4", "a3", "a2", "a1"]
    for r in run[3:]:       # 3:5, then 2:6 (the share)
        pol.on_preempted(r, "fairness")
        pol.on_finished(r, running=False)
    bs = running(pol, *[Req(f"b{i}", P("interactive"), tenant="b", arrival=10 + i) for i in range(1, 6)])
    assert names(pol.fairness_candidates(head, run[:3] + bs, now=20)) == ["a2"]    # 3 - 1 >= (5 + 1) / 3
    pol.on_preempted(run[2], "fairness")
    bs += running(pol, Req("b6", P("interactive"), tenant="b", arrival=16))
    assert pol.fairness_candidates(head, run[:2] + bs, now=20) == []             # 2 - 1 < (6 + 1) / 3
    # a below its share does not take back from b: (6 - 1) / 3 < (2 + 1) / 1.
    assert pol.fairness_candidates(Req("a9", P("interactive"), tenant="a"), run[:2] + bs, now=20) == []


def test_fairness_with_three_tenants_stops_within_one_slot_of_the_share():
    pol = weighted(a=1, b=1, c=1)
    run = running(pol, *[Req(f"a{i}", P("batch"), tenant="a", arrival=i) for i in range(4)])
    assert names(pol.fairness_candidates(Req("b0", P("batch"), tenant="b"), run, now=5)) == ["a3", "a2", "a1"]
    pol.on_preempted(run[3], "fairness")
    run = run[:3] + running(pol, Req("b1", P("batch"), tenant="b", arrival=5))
    # 3:1:0: c takes from a only (b would keep 0 < c's 1); then 2:1:1 is stable.
    assert names(pol.fairness_candidates(Req("c0", P("batch"), tenant="c"), run, now=5)) == ["a2", "a1"]
    pol.on_preempted(run[2], "fairness")
    run = run[:2] + run[3:] + running(pol, Req("c1", P("batch"), tenant="c", arrival=6))
    for t in "abc":
        assert pol.fairness_candidates(Req(f"{t}9", P("batch"), tenant=t), run, now=5) == []


def test_fairness_never_takes_higher_priority_or_protected_work():
    pol = weighted(a=1, b=3)
    run = running(pol, Req("rt", P("realtime"), tenant="a", arrival=0),
                  Req("i0", P("interactive"), tenant="a", arrival=1),
                  Req("b5", P("batch:5"), tenant="a", arrival=2),
                  Req("fresh", P("batch:5"), tenant="a", arrival=3))
    run[3].sched.started_at = 4.5   # admitted 0.5 s ago: protected (min_run_s 1)
    # An interactive head of b: only a's interactive and lower; the fresh one is protected,
    # and a keeps (4 - 2) / 1 >= 1/3 after two moves, so both unprotected ones go, lowest first.
    assert names(pol.fairness_candidates(Req("h", P("interactive"), tenant="b"), run, now=5)) == ["b5", "i0"]
    assert names(pol.fairness_candidates(Req("h", P("batch:5"), tenant="b"), run, now=5)) == ["b5"]
    assert names(pol.fairness_candidates(Req("h", P("batch:5"), tenant="b"), run, now=6)) == ["fresh", "b5"]
    assert pol.fairness_candidates(Req("h", P("batch:6"), tenant="b"), run, now=6) == []
    assert pol.fairness_candidates(Req("h", P("interactive"), tenant="a"), run, now=6) == []   # own tenant


# ------------------------------------------------------------------ weighted fair share
def test_weighted_fair_share_one_to_three():
    book = TenantBook({"a": TenantConfig(weight=1), "b": TenantConfig(weight=3)})
    pol = PriorityPolicy(book)
    rng = random.Random(0)
    waiting, n = [], 0
    for step in range(4000):
        now = step * 0.001       # well under any aging period
        for tenant in ("a", "b"):  # both saturate: always 4 queued
            while sum(r.tenant == tenant for r in waiting) < 4:
                n += 1
                r = Req(f"{tenant}{n}", P("interactive"), tenant=tenant, arrival=now, tokens=rng.randint(20, 200))
                pol.on_queued(r)
                waiting.append(r)
        head = pol.order(waiting, now)[0]
        waiting.remove(head)
        pol.on_started(head, now)
        pol.charge(head, head.tokens, now)
        pol.on_finished(head, running=True)
    ratio = book.served("b") / book.served("a")
    assert abs(ratio - 3) / 3 < 0.10, ratio


def test_latecomer_starts_at_the_minimum_active_virtual_time():
    book = TenantBook()
    book.on_queued("a")
    book.on_queued("b")
    book.charge("a", 500, now=0)
    book.charge("b", 800, now=0)
    book.on_queued("c")
    assert book.vtime("c") == 500
    # A tenant back from idle does not bank credit either; one that was ahead keeps its place.
    book.on_finished("b", running=False)     # b idle at 800
    book.charge("a", 1000, now=1)            # a at 1500
    book.charge("c", 1000, now=1)            # c at 1500
    book.on_queued("b")
    assert book.vtime("b") == 1500
    book.on_finished("a", running=False)
    book.on_finished("b", running=False)
    book.on_finished("c", running=False)     # everyone idle: the clock is remembered
    book.on_queued("d")
    assert book.vtime("d") == 1500
    book.charge("d", 5000, now=2)            # d is ahead (6500); it keeps that on return
    book.on_finished("d", running=False)
    book.on_queued("d")
    assert book.vtime("d") == 6500


# ------------------------------------------------------------------ quotas
def test_concurrent_and_queued_quotas():
    book = TenantBook({"t": TenantConfig(max_concurrent=3, max_queued=2)}, busy_retry_after_s=2.0)
    assert book.check_admission("t", 0) is None
    book.on_queued("t")
    book.on_queued("t")
    q = book.check_admission("t", 0)
    assert isinstance(q, QuotaExceeded) and q.limit == "max_queued" and q.retry_after_s == 2.0
    book.on_started("t")
    assert book.check_admission("t", 0) is None
    book.on_queued("t")                      # 1 running + 2 queued = 3 in flight
    q = book.check_admission("t", 0)
    assert q.limit in ("max_concurrent", "max_queued") and q.retry_after_s > 0
    book.on_started("t")                     # 2 running + 1 queued
    q = book.check_admission("t", 0)
    assert q.limit == "max_concurrent" and "max_concurrent=3" in q.reason
    book.on_finished("t")
    assert book.check_admission("t", 0) is None
    assert book.check_admission("someone-else", 0) is None


def test_tokens_per_minute_retry_after_matches_the_window():
    book = TenantBook({"t": TenantConfig(tokens_per_minute=1000)})
    book.on_queued("t")
    book.charge("t", 600, now=0.0)
    book.charge("t", 300, now=10.0)
    assert book.check_admission("t", 15.0) is None           # 900 < 1000
    book.charge("t", 250, now=20.0)                          # 1150 in the window
    q = book.check_admission("t", 30.0)
    # Dropping the 600 from t=0 gets under the quota: at t=60.
    assert q.limit == "tokens_per_minute" and q.retry_after_s == 30.0
    assert book.check_admission("t", 59.999) is not None
    assert book.check_admission("t", 30.0 + q.retry_after_s) is None
    assert book.tokens_last_minute("t", 60.0) == 550
    # Needs more than the oldest entry to expire: 600+300+250+400 = 1550 at t=50.
    book2 = TenantBook({"t": TenantConfig(tokens_per_minute=500)})
    for ts, n in ((0, 600), (10, 300), (20, 250), (50, 400)):
        book2.charge("t", n, now=ts)
    q = book2.check_admission("t", 55.0)
    assert q.retry_after_s == 25.0                           # at 80 only the 400 from t=50 remains
    assert book2.check_admission("t", 79.0) is not None and book2.check_admission("t", 80.0) is None


# ------------------------------------------------------------------ deadlines
def test_expired_reasons():
    r = Req("r", P("interactive"), arrival=100.0, queue_timeout_s=5.0, timeout_s=30.0)
    assert expired(r, 105.0) is None
    assert expired(r, 105.1) == "queue timeout"
    assert deadline(r) == (105.0, "queue timeout")
    r.sched.started_at = 104.0                                     # admitted: only the total limit remains
    assert expired(r, 120.0) is None and deadline(r) == (130.0, "total timeout")
    assert expired(r, 130.5) == "total timeout"
    free = Req("f", P("batch"), arrival=0.0)
    assert expired(free, 1e9) is None and deadline(free) is None
    both = Req("b", P("batch"), arrival=0.0, queue_timeout_s=50.0, timeout_s=20.0)
    assert expired(both, 60.0) == "total timeout"            # the earlier deadline names it


# ------------------------------------------------------------------ property: a total order
prio = st.builds(Priority, st.integers(0, 2), st.integers(0, 5))


@settings(max_examples=200, deadline=None)
@given(items=st.lists(st.tuples(prio, st.sampled_from("xyz"), st.integers(0, 3)), min_size=1, max_size=25),
       charges=st.lists(st.tuples(st.sampled_from("xyz"), st.integers(0, 500)), max_size=10),
       seed=st.integers(0, 2**32 - 1), now=st.floats(0, 100))
def test_order_is_a_total_order_consistent_with_class_then_level(items, charges, seed, now):
    pol = PriorityPolicy(max_wait_s={"realtime": 3, "interactive": 7, "batch": 11})
    reqs = [Req(f"r{i}", p, tenant=t, arrival=i * 0.5 + j * 0.001) for i, (p, t, j) in enumerate(items)]
    for r in reqs:
        pol.on_queued(r)
    for t, n in charges:
        pol.charge(Req("c", P("batch"), tenant=t), n, now=0)
    order = pol.order(reqs, now)
    shuffled = reqs[:]
    random.Random(seed).shuffle(shuffled)
    assert names(pol.order(shuffled, now)) == names(order)            # independent of input order
    queues = pol.queue_ranks(reqs, now)
    keys = [pol.admit_key(r, now, queues) for r in order]
    assert len(set(keys)) == len(keys)                                 # no ties: a total order
    ranks = [queues[r.priority] for r in order]
    assert [c for c, _ in ranks] == sorted(c for c, _ in ranks)        # effective class first
    for a, b in zip(order, order[1:]):
        ra, rb = queues[a.priority], queues[b.priority]
        if ra[0] == rb[0] and not ra[1] and not rb[1]:
            assert a.priority <= b.priority                            # then level (same class)
        if ra[0] == rb[0] and ra[1] != rb[1]:
            assert ra[1]                                               # aged before native
    if now < 3:   # nothing has aged: the order is exactly (class, level), then fair share
        assert [r.priority for r in order] == sorted(r.priority for r in reqs)
        assert Counter(r.name for r in order) == Counter(r.name for r in reqs)
