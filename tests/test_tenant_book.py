"""TenantBook's memory stays bounded whatever tenant names clients send: unconfigured
idle tenants are forgotten, configured ones never; forgetting changes no scheduling
decision; unconfigured tenants get the default quotas. Pure bookkeeping, no clock."""
from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from scheduler_kit import expected_output, make_request, priority_scheduler, run_step

from llmos.cli.daemon import parse_tenant
from llmos.kernel import tenants as tenants_module
from llmos.kernel.requests import State
from llmos.kernel.tenants import ALL, DEFAULT_TENANT, SWEEP_MIN, WINDOW_S, QuotaExceeded, TenantBook, TenantConfig


def one_request(book: TenantBook, tenant: str, tokens: int, now: float) -> None:
    """What the scheduler reports for a request that is queued, runs and finishes."""
    assert book.check_admission(tenant, now) is None
    book.on_queued(tenant)
    book.on_started(tenant)
    book.charge(tenant, tokens, now)
    book.on_finished(tenant)


def test_100k_one_shot_tenants_leave_a_bounded_book():
    book = TenantBook({"alice": TenantConfig(weight=2)})
    most = 0
    for i in range(100_000):
        one_request(book, f"user-{i}", 10, now=i * 0.001)
        most = max(most, book.num_tenants)
    assert most <= SWEEP_MIN and book.forgotten >= 100_000 - SWEEP_MIN
    assert "alice" in book
    book.check_integrity(Counter(), Counter())


def test_tenants_in_flight_together_leave_a_bounded_book():
    """20 x SWEEP_MIN tenants, 64 requests of distinct tenants in flight at once, each served one token a step:
    finishers ahead of the system virtual time are forgotten once it passes them."""
    book, rng = TenantBook(), random.Random(0)
    names, in_flight, most, step = (f"u{i}" for i in range(20 * SWEEP_MIN)), {}, 0, 0
    for name in names:
        book.on_queued(name)
        book.on_started(name)
        in_flight[name] = rng.randint(1, 50)
        while len(in_flight) == 64:
            step += 1
            for t in list(in_flight):
                book.charge(t, 1, now=step * 0.01)
                in_flight[t] -= 1
                if not in_flight[t]:
                    book.on_finished(t)
                    del in_flight[t]
            most = max(most, book.num_tenants)
    assert most <= SWEEP_MIN
    book.check_integrity(Counter(), Counter(list(in_flight)))


def test_with_the_system_clock_pinned_idle_tenants_are_forgotten_a_window_after_their_last_token():
    """A tenant that waits unserved holds the system virtual time down, so every other
    tenant finishes ahead of it; those are kept while their minute window holds tokens."""
    book = TenantBook()
    book.on_queued("stuck")                    # queued, never served
    per_window = 100                           # one request every WINDOW_S / 100 seconds
    most = 0
    for i in range(20_000):
        one_request(book, f"u{i}", 10, now=i * WINDOW_S / per_window)
        most = max(most, book.num_tenants)
    assert most <= SWEEP_MIN
    assert "stuck" in book and book.counts("stuck") == (1, 0)


def test_configured_tenants_are_never_forgotten():
    book = TenantBook({"alice": TenantConfig(weight=2), "bob": TenantConfig(max_queued=3)})
    one_request(book, "alice", 500, now=0.0)
    book.configure("carol", TenantConfig())                 # configured later, never used
    for i in range(5 * SWEEP_MIN):
        one_request(book, f"u{i}", 10, now=1000.0 + i)      # alice's window long expired
    assert book.forgotten > 3 * SWEEP_MIN
    assert {"alice", "bob", "carol"} <= {name for name in book.snapshot(now=1e6)}
    assert book.served("alice") == 500 and book.config("alice").weight == 2
    assert book.config("bob").max_queued == 3


def test_forgetting_changes_no_decision(monkeypatch):
    """Two books see the same random moves of many tenants; one forgets (a small SWEEP_MIN),
    one never does. With no window expiring (one `now`) only tenants at or below the
    system virtual time are forgotten, and every answer the policy reads is the same (an
    idle tenant's own virtual time is read only through max(it, the system's))."""
    monkeypatch.setattr(tenants_module, "SWEEP_MIN", 8)
    forgetful = TenantBook(default=TenantConfig())
    keeper = TenantBook(default=TenantConfig())
    keeper._sweep_at = 10**9
    rng = random.Random(1)
    queued, running = Counter(), Counter()
    names = [f"t{i}" for i in range(1000)]
    returned = 0                                # queued again after being forgotten
    floor, live = 0.0, set()
    for _ in range(20_000):
        name = rng.choice(names)
        move = rng.random()
        if move < 0.3:
            returned += name not in forgetful and name in keeper
            for b in (forgetful, keeper):
                b.on_queued(name)
            queued[name] += 1
        elif move < 0.5 and queued[name]:
            for b in (forgetful, keeper):
                b.on_started(name)
            queued[name] -= 1
            running[name] += 1
        elif move < 0.7 and running[name]:
            tokens = rng.randint(0, 40)
            for b in (forgetful, keeper):
                b.charge(name, tokens, now=5.0)
        elif move < 0.85 and running[name]:
            for b in (forgetful, keeper):
                b.on_finished(name)
            running[name] -= 1
        elif queued[name]:
            for b in (forgetful, keeper):
                b.on_finished(name, running=False)
            queued[name] -= 1
        for t in (name, rng.choice(names)):
            assert forgetful.vtime(t) == keeper.vtime(t) or not (queued[t] or running[t])
            assert forgetful.counts(t) == keeper.counts(t)
            assert forgetful.check_admission(t, 5.0) == keeper.check_admission(t, 5.0)
        (live.add if queued[name] or running[name] else live.discard)(name)
        if live:                                  # the system virtual time, by brute force
            floor = max(floor, min(keeper.vtime(t) for t in live))
        assert forgetful._system_vtime() == keeper._system_vtime() == floor
    assert forgetful.forgotten > 300 and returned > 100 and keeper.forgotten == 0
    for b in (forgetful, keeper):
        b.check_integrity(+queued, +running)


def test_a_forgotten_tenant_returns_as_a_newcomer_at_the_system_virtual_time():
    book = TenantBook()
    book.on_queued("steady")                          # active all along: sets the system clock
    book.charge("steady", 100, now=0.0)
    one_request(book, "ahead", 900, now=0.0)          # idle at 1000 while the system clock is 100
    assert book.vtime("ahead") == 1000
    for i in range(SWEEP_MIN):                        # a sweep within the minute keeps it
        one_request(book, f"u{i}", 1, now=1.0)
    assert "ahead" in book and book.served("ahead") == 900
    for i in range(2 * SWEEP_MIN):                    # its window is empty a minute on: forgotten
        one_request(book, f"v{i}", 1, now=WINDOW_S + 1.0)
    assert "ahead" not in book
    assert book.vtime("ahead") == book.vtime("steady") == 100 and book.counts("ahead") == (0, 0)
    assert book.served("ahead") == 0 and book.config("ahead") is book.default
    # It comes back like any newcomer: at the system virtual time, and runs normally.
    book.on_queued("ahead")
    assert book.vtime("ahead") == 100
    book.on_started("ahead")
    book.charge("ahead", 30, now=WINDOW_S + 2.0)
    assert book.vtime("ahead") == 130 and book.tokens_last_minute("ahead", WINDOW_S + 2.0) == 30
    book.on_finished("ahead")
    book.check_integrity(Counter({"steady": 1}), Counter())


def test_a_tokens_per_minute_quota_survives_sweeps_until_its_window_empties():
    book = TenantBook({ALL: TenantConfig(tokens_per_minute=100)})
    one_request(book, "hog", 150, now=0.0)
    for i in range(3 * SWEEP_MIN):                    # sweeps in the same minute
        one_request(book, f"u{i}", 1, now=1.0)
    q = book.check_admission("hog", 1.0)
    assert isinstance(q, QuotaExceeded) and q.limit == "tokens_per_minute" and q.retry_after_s == WINDOW_S - 1.0
    for i in range(3 * SWEEP_MIN):
        one_request(book, f"v{i}", 1, now=WINDOW_S + 5.0)
    assert "hog" not in book and book.check_admission("hog", WINDOW_S + 5.0) is None


def test_unconfigured_tenants_get_the_default_quotas():
    book = TenantBook({"vip": TenantConfig()}, busy_retry_after_s=2.0)
    assert book.default == DEFAULT_TENANT
    assert DEFAULT_TENANT.max_queued is not None and DEFAULT_TENANT.max_concurrent is not None
    for _ in range(DEFAULT_TENANT.max_queued):
        assert book.check_admission("anon", 0.0) is None
        book.on_queued("anon")
        book.on_queued("vip")
    q = book.check_admission("anon", 0.0)
    assert isinstance(q, QuotaExceeded) and q.limit == "max_queued" and q.retry_after_s == 2.0
    assert "max_queued=512" in q.reason
    assert book.check_admission("vip", 0.0) is None          # configured: its unset quotas are unlimited
    assert book.check_admission("someone-new", 0.0) is None  # the quota is per tenant
    while sum(book.counts("anon")) < DEFAULT_TENANT.max_concurrent:
        book.on_started("anon")                              # running leaves room in the queue...
        assert book.check_admission("anon", 0.0) is None
        book.on_queued("anon")
    q = book.check_admission("anon", 0.0)                    # ...up to max_concurrent in flight
    assert q.limit == "max_concurrent" and "max_concurrent=1024" in q.reason


def test_the_default_config_is_the_star_entry():
    book = TenantBook({ALL: TenantConfig(max_queued=1, default_priority="batch"), "vip": TenantConfig()})
    assert book.config("anyone").default_priority == "batch" and ALL not in book
    book.on_queued("anyone")
    assert book.check_admission("anyone", 0.0).limit == "max_queued"
    book.on_queued("vip")
    assert book.check_admission("vip", 0.0) is None
    book.configure(ALL, TenantConfig(max_queued=5))        # replaces the default, for those held too
    assert book.check_admission("anyone", 0.0) is None and book.config("vip") == TenantConfig()
    with pytest.raises(ValueError, match="twice"):
        TenantBook({ALL: TenantConfig()}, default=TenantConfig())


def test_llmosd_tenant_option_sets_the_default():
    name, cfg = parse_tenant("*:max_queued=8")
    assert name == ALL and cfg.max_queued == 8 and cfg.max_concurrent == DEFAULT_TENANT.max_concurrent
    assert parse_tenant("*:max_concurrent=none")[1].max_concurrent is None
    assert parse_tenant("alice:weight=3")[1] == TenantConfig(weight=3.0)   # named: unset is unlimited
    with pytest.raises(ValueError):
        parse_tenant("*:max_queued=lots")


def test_the_scheduler_with_thousands_of_one_shot_tenants():
    """Through the real scheduler and policy: every request of 5 x SWEEP_MIN distinct
    tenants is served, the books stay in balance and bounded."""
    sched, clock = priority_scheduler(blocks=256, seqs=16)
    clock.step_s = 0.01
    policy = sched.policy
    ids, reqs, most = itertools.count(1), [], 0
    total = 5 * SWEEP_MIN
    while sched.has_work() or len(reqs) < total:
        while len(sched.waiting) < 16 and (i := next(ids)) <= total:
            r = make_request(4, i=i, tenant=f"client-{i}", max_tokens=3, arrival=clock())
            assert policy.check_admission(r.tenant, clock()) is None
            sched.add(r)
            reqs.append(r)
        run_step(sched)
        most = max(most, policy.tenants.num_tenants)
    assert len(reqs) == total and all(r.state is State.FINISHING and r.output.ids == expected_output(r) for r in reqs)
    assert most <= SWEEP_MIN and policy.tenants.forgotten >= total - SWEEP_MIN


def test_the_daemon_config_wires_the_default():
    from llmos.config import DaemonConfig
    from llmos.kernel.engine import make_policy
    policy = make_policy(DaemonConfig(tenants=dict(map(parse_tenant, ["*:max_queued=1", "vip:weight=2"]))))
    book = policy.tenants
    assert book.default.max_queued == 1 and book.config("vip") == TenantConfig(weight=2.0)
    assert make_policy(DaemonConfig()).tenants.default == DEFAULT_TENANT
