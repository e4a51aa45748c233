"""Priority scheduling policy: which waiting request runs next, and who gives way.

Pure decisions for the kernel's scheduler: no torch, no I/O, no clock of its own. Every
time-dependent call takes `now` (seconds on the monotonic clock, like Request.sched.arrival).

Priority: a class, realtime (0) < interactive (1, the default) < batch (2), and a level
inside it; lower runs first on both. Clients send "batch", "batch:3", or an int (vLLM's
extension), which is a level inside their tenant's default class.

Admission order (order, admit_key): effective class, level, the tenant's batch slots per
unit of weight (running / weight), its virtual time (weighted fair share, tenants.py),
arrival.

Aging, and the bound. Waiting time counts from req.sched.queued_at. Waiting max_wait_s[c] in
class c promotes a request to class c-1 (for realtime: within realtime) and makes it
*aged* (rank); each further max_wait_s of the class it is then in promotes it again, down
to realtime. Aging promotes a queue, not a request: the waiting requests of one base
priority (class and level) all take the rank of the oldest among them (queue_ranks).
Aged requests rank ahead of every level of their effective class; among themselves they
keep the tenant shares (slots per weight, virtual time), then oldest queued_at first.
Why a queue: a tenant with a small weight waits longer by design, so its requests age
first; aged one by one they would jump the other tenants' requests of the same priority
and undo the weights (1:3 fell to 1:2.6 in tests/test_fairness.py), and fairness
preemption would then take the slot back, again and again. Aging is there so that a
priority that is not served gets served; inside a priority the weights decide who. With
one tenant this is the same as aging each request (its oldest goes first, and the order
is recomputed after every admission); the price with several is that, while a queue is
aged, other tenants' fresh requests in it that are under their share go ahead of higher
classes too, as many as the shares put before the old request.
So a request of class c is an aged realtime request D(c) seconds after queued_at
(aging_bound_s): D(batch) = W[batch] + W[interactive], D(interactive) = W[interactive],
D(realtime) = W[realtime], with defaults 40 s, 10 s, never.
Bound: from queued_at + D(c) on, only aged realtime requests rank ahead of it, and
among those its own tenant's earlier ones and other tenants' within their shares, so it
is admitted within its tenant's fair share of the admissions after that time; per-tenant
max_queued bounds how many of its own requests can be ahead of it. An admission needs
room: aging orders admission only, it never justifies a preemption (preemption_candidates).

Fair shares of the batch (fairness_candidates). Under contention, decode tokens are what
a tenant receives, one per running sequence per step, so a tenant's share of the batch
slots is its share of the tokens. Admission already gives a free slot to the tenant with
the fewest running requests per unit of weight; fairness preemption makes the running set
converge to those shares when it was filled otherwise (arrival order, a tenant arriving
late, a weight change). When the head has no room and no lower-priority work can give it,
it may preempt a running request of another tenant, of the head's priority or lower and
not protected, if that tenant keeps at least as many slots per weight as the head's tenant
will have: (running_v - 1) / w_v >= (running_h + 1) / w_h. A move is one whole slot each
way and never inverts the two tenants' order, so the victim cannot take it back (its
re-queued request ranks behind the head: admit_key sorts by running / weight), and every
move lowers sum(running_t**2 / w_t) by at least 1/w_v + 1/w_h: the preemptions between two
changes of the running set are bounded, with no ping-pong. The stable state is the
weighted share to within one slot (1:3 over 16 slots: 4:12). Counts are running requests
of every class, as in admit_key. When everything fits, nobody is preempted: the shares
apply only while someone waits (work-conserving: a tenant is never slowed down to leave
slots idle).

Request attributes this module reads (never writes):
  priority: Priority          base priority, from parse_priority at submission
  tenant: str
  sched (requests.SchedState):
    arrival: float            submission time: tie-break, total-timeout origin
    queued_at: float          when it last entered the waiting queue (= arrival, or the
                              time of its last preemption): aging origin
    started_at: float | None  time of its current/last admission to the running batch;
                              None until first admitted (kept on preemption)
    preemptions: int          times preempted so far, any cause
    timeout_s, queue_timeout_s: float | None   only for expired()/deadline(); None = no limit
  kv.num_computed: int        tokens in KV now: the cost of preempting it (fairness victims)
(.num_tokens and .output are not used.)

Scheduler contract (who calls what, when; `policy` is a PriorityPolicy):
  submit:    q = policy.check_admission(tenant, now); if q: answer 429, Retry-After:
             ceil(q.retry_after_s). Else req.priority = policy.parse(value, tenant)
             (InvalidParam -> 400), req.sched.queued_at = now, policy.on_queued(req).
  schedule(): waiting = policy.order(waiting, now) (keys move with time and service: re-sort
             every step). Admitting one: req.sched.started_at = now, policy.on_started(req, now).
             If the head does not fit and nothing can grow: for victim in
             policy.preemption_candidates(head, running, now) until it fits (check the
             candidates' blocks suffice before preempting any), cause "priority"; if that
             finds no room, policy.fairness_candidates(head, running, now) the same way,
             cause "fairness". Memory
             pressure while running: v = policy.pick_victim(candidates, now), cause "memory".
             Each victim v: v.sched.queued_at = now, policy.on_preempted(v, cause).
  each step: policy.charge(req, num_new, now) per scheduled sequence (prefer not to charge
             recompute after a memory preemption: the tenant did not cause it).
  leaving:   policy.on_finished(req, running=<was it in the running batch>).
  timeouts:  each step (or on a timer at min(deadline(r))), expired(req, now) -> finish with
             that reason.
  idle/tests: policy.check_integrity(waiting, running).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping

from llmos.kernel.tenants import QuotaExceeded, TenantBook, TenantConfig
from llmos.names import PRIORITY_CLASSES
from llmos.sampling_params import InvalidParam

__all__ = ["Priority", "parse_priority", "PriorityPolicy", "PolicyStats", "expired", "deadline",
           "TenantBook", "TenantConfig", "QuotaExceeded", "REALTIME", "INTERACTIVE", "BATCH", "MAX_LEVEL"]

REALTIME, INTERACTIVE, BATCH = 0, 1, 2
MAX_LEVEL = 2**31 - 1     # levels are 0..MAX_LEVEL (an int32 on the bus)
DEFAULT_MAX_WAIT_S = {"realtime": None, "interactive": 10.0, "batch": 30.0}
PREEMPTION_CAUSES = ("priority", "memory", "fairness")


@dataclass(frozen=True, order=True)
class Priority:
    """Base priority. Ordered by (klass, level); the smaller runs first."""
    klass: int
    level: int = 0

    def __post_init__(self):
        if self.klass not in (REALTIME, INTERACTIVE, BATCH) or not 0 <= self.level <= MAX_LEVEL:
            raise ValueError(f"no such priority: class {self.klass}, level {self.level}")

    @property
    def class_name(self) -> str:
        return PRIORITY_CLASSES[self.klass]

    @property
    def name(self) -> str:
        """Canonical text, e.g. "batch:3"; parse_priority(p.name) == p."""
        return f"{self.class_name}:{self.level}"

    def __str__(self) -> str:
        return self.name


def parse_priority(value, tenant_default: str = "interactive") -> Priority:
    """A client's priority: None (the tenant's default class, level 0), "batch",
    "batch:3", or an int level inside the tenant's default class. Anything else raises
    InvalidParam("priority", ...). A bad tenant_default is a config error: ValueError."""
    if tenant_default not in PRIORITY_CLASSES:
        raise ValueError(f"tenant default priority must be one of {PRIORITY_CLASSES}, got {tenant_default!r}")
    if value is None:
        return Priority(PRIORITY_CLASSES.index(tenant_default))
    if isinstance(value, Priority):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Priority(PRIORITY_CLASSES.index(tenant_default), _level(value))
    if not isinstance(value, str):
        raise InvalidParam("priority", f"priority must be a string like 'batch' or 'batch:3', or an integer "
                                       f"level, got {type(value).__name__}")
    name, sep, level = value.partition(":")
    if name not in PRIORITY_CLASSES:
        raise InvalidParam("priority", f"unknown priority class {name!r}; expected one of "
                                       f"{', '.join(PRIORITY_CLASSES)}, optionally followed by ':<level>'")
    if not sep:
        return Priority(PRIORITY_CLASSES.index(name))
    if not (level.isascii() and level.isdigit()):
        raise InvalidParam("priority", f"priority level must be an integer in [0, {MAX_LEVEL}], got {level!r}")
    return Priority(PRIORITY_CLASSES.index(name), _level(int(level)))


def _level(n: int) -> int:
    if not 0 <= n <= MAX_LEVEL:
        raise InvalidParam("priority", f"priority level must be in [0, {MAX_LEVEL}] (lower runs first), got {n}")
    return n


@dataclass
class PolicyStats:
    preemptions: dict = field(default_factory=lambda: dict.fromkeys(PREEMPTION_CAUSES, 0))
    # admissions of requests that aging had promoted, by base class
    promotions: dict = field(default_factory=lambda: dict.fromkeys(PRIORITY_CLASSES, 0))

    def snapshot(self) -> dict:
        return {"preemptions": dict(self.preemptions), "promotions": dict(self.promotions)}


class PriorityPolicy:
    """Ordering, aging, preemption and tenant accounting for one scheduler.

    max_wait_s: class name -> seconds before aging promotes (None: never); unnamed classes
    keep DEFAULT_MAX_WAIT_S. min_run_s: a running request is protected from priority and
    fairness preemption for min_run_s * 2**preemptions after its admission, so it always
    makes progress and a request preempted again and again is eventually left to finish."""

    name = "priority"

    def __init__(self, tenants: TenantBook | None = None, max_wait_s: Mapping[str, float | None] | None = None,
                 min_run_s: float = 0.5):
        waits = {**DEFAULT_MAX_WAIT_S, **(max_wait_s or {})}
        if set(waits) != set(PRIORITY_CLASSES):
            raise ValueError(f"max_wait_s names unknown classes: {sorted(set(waits) - set(PRIORITY_CLASSES))}")
        for k, v in waits.items():
            if v is not None and not v > 0:
                raise ValueError(f"max_wait_s[{k!r}] must be > 0 or None, got {v!r}")
        if not min_run_s >= 0:
            raise ValueError("min_run_s must be >= 0")
        self._wait = tuple(math.inf if waits[c] is None else float(waits[c]) for c in PRIORITY_CLASSES)
        self.min_run_s = min_run_s
        self.tenants = tenants or TenantBook()
        self.stats = PolicyStats()

    # ------------------------------------------------------------ submission
    def parse(self, value, tenant: str) -> Priority:
        return parse_priority(value, self.tenants.config(tenant).default_priority)

    def check_admission(self, tenant: str, now: float) -> QuotaExceeded | None:
        return self.tenants.check_admission(tenant, now)

    # ------------------------------------------------------------ ordering and aging
    def rank(self, req, now: float) -> tuple[int, bool]:
        """(effective class, aged) of a waiting request at `now`, by its own wait."""
        c = req.priority.klass
        waited = now - req.sched.queued_at
        if not waited >= self._wait[c]:
            return c, False
        waited -= self._wait[c]
        c = max(c - 1, REALTIME)
        while c > REALTIME and waited >= self._wait[c]:
            waited -= self._wait[c]
            c -= 1
        return c, True

    def aging_bound_s(self, klass: int) -> float:
        """D(klass): seconds after queued_at when a request of this class is aged realtime
        (math.inf if aging is off on its path)."""
        if klass == REALTIME:
            return self._wait[REALTIME]
        return sum(self._wait[1:klass + 1])

    def queue_ranks(self, waiting: list, now: float) -> dict:
        """Base priority -> (effective class, aged) of its queue: the rank of its oldest
        waiting request (smallest queued_at)."""
        oldest: dict = {}
        for r in waiting:
            o = oldest.get(r.priority)
            if o is None or r.sched.queued_at < o.sched.queued_at:
                oldest[r.priority] = r
        return {p: self.rank(r, now) for p, r in oldest.items()}

    def admit_key(self, req, now: float, ranks: dict | None = None) -> tuple:
        """Sort key of a waiting request; smaller is admitted first. Valid at `now` and for
        the waiting queue `ranks` came from (queue_ranks; None: the request's own rank)."""
        c, aged = ranks[req.priority] if ranks is not None else self.rank(req, now)
        # Batch slots are what a tenant holds while its requests run: share them by weight
        # first (running / weight), then tokens served (virtual time) among equals. Aged
        # requests go before every level of their effective class but keep the tenant
        # shares among themselves: under a deep backlog everything ages, and plain FIFO
        # there would erase the weights.
        running = self.tenants.counts(req.tenant)[1]
        slots = running / self.tenants.config(req.tenant).weight
        if aged:
            return (c, -1, slots, self.tenants.vtime(req.tenant), req.sched.queued_at, req.sched.arrival)
        return (c, req.priority.level, slots, self.tenants.vtime(req.tenant), req.sched.arrival, req.sched.queued_at)

    def order(self, waiting: list, now: float) -> list:
        """The waiting requests in admission order (a new list)."""
        ranks = self.queue_ranks(waiting, now)
        return sorted(waiting, key=lambda r: self.admit_key(r, now, ranks))

    # ------------------------------------------------------------ preemption
    def _victim_key(self, req) -> tuple:
        # Largest = first to go: lowest base priority, then the tenant most over its
        # fair share (highest virtual time), then the newest.
        return (req.priority.klass, req.priority.level, self.tenants.vtime(req.tenant), req.sched.arrival)

    def pick_victim(self, running: list, now: float):
        """The running request to preempt under memory pressure (no protection applies:
        memory must be found). `running` must be non-empty. `now` is unused today."""
        return max(running, key=self._victim_key)

    def protected(self, req, now: float, by=None) -> bool:
        """Too recently admitted to be preempted for priority or fairness (by the waiting
        request `by`). Against a head of a higher class the first preemption is free (the
        window is min_run_s * (2**preemptions - 1)): an interactive request must not wait out
        a batch request's protection, which, with batch requests admitted in waves, held
        interactive TTFT near min_run_s. The window still doubles, so a victim finishes."""
        if req.sched.started_at is None:
            return False
        doubled = 2 ** min(req.sched.preemptions, 20)
        if by is not None and by.priority.klass < req.priority.klass:
            doubled -= 1
        return now - req.sched.started_at < self.min_run_s * doubled

    def preemption_candidates(self, head, running: list, now: float) -> list:
        """Running requests the waiting `head` may preempt, first victim first: those of
        strictly lower *base* priority than the head's and not protected. Base, not aged:
        a re-queued victim must not age its way into preempting back."""
        found = [r for r in running if r.priority > head.priority and not self.protected(r, now, head)]
        return sorted(found, key=self._victim_key, reverse=True)

    def fairness_candidates(self, head, running: list, now: float) -> list:
        """Running requests the waiting `head` may preempt to move its tenant toward its
        weighted share of the batch slots, first victim first (see "Fair shares" above):
        other tenants' requests of the head's base priority or lower, not protected, taken
        one at a time from the tenant holding the most slots per weight while it would keep
        (running - 1) / weight >= the head tenant's (running + 1) / weight; within a tenant
        the cheapest first (lowest priority, fewest tokens in KV, newest). Empty when the
        head's tenant already has its share."""
        book = self.tenants
        weight = {t: book.config(t).weight for t in {r.tenant for r in running} | {head.tenant}}
        after = (book.counts(head.tenant)[1] + 1) / weight[head.tenant]
        pools: dict[str, list] = {}
        for r in running:
            if r.tenant != head.tenant and r.priority >= head.priority and not self.protected(r, now):
                pools.setdefault(r.tenant, []).append(r)
        for reqs in pools.values():
            reqs.sort(key=lambda r: (r.priority, -r.kv.num_computed, r.sched.arrival))   # pop() = cheapest
        held = {t: book.counts(t)[1] for t in pools}
        found = []
        while pools:
            t = max(pools, key=lambda t: ((held[t] - 1) / weight[t], book.vtime(t), t))
            if (held[t] - 1) / weight[t] < after:
                break
            found.append(pools[t].pop())
            held[t] -= 1
            if not pools[t]:
                del pools[t]
        return found

    # ------------------------------------------------------------ moves (see the contract above)
    def on_queued(self, req) -> None:
        self.tenants.on_queued(req.tenant)

    def on_started(self, req, now: float) -> None:
        if self.rank(req, now)[1]:
            self.stats.promotions[req.priority.class_name] += 1
        self.tenants.on_started(req.tenant)

    def on_preempted(self, req, cause: str) -> None:
        if cause not in PREEMPTION_CAUSES:
            raise ValueError(f"preemption cause must be one of {PREEMPTION_CAUSES}, got {cause!r}")
        self.stats.preemptions[cause] += 1
        self.tenants.on_preempted(req.tenant)

    def on_finished(self, req, running: bool) -> None:
        self.tenants.on_finished(req.tenant, running)

    def charge(self, req, tokens: int, now: float) -> None:
        self.tenants.charge(req.tenant, tokens, now)

    def check_integrity(self, waiting: list, running: list) -> None:
        self.tenants.check_integrity(Counter(r.tenant for r in waiting), Counter(r.tenant for r in running))

    def snapshot(self, now: float) -> dict:
        return {"policy": self.name, **self.stats.snapshot(), "tenants": self.tenants.snapshot(now)}


# ------------------------------------------------------------ deadlines
def deadline(req) -> tuple[float, str] | None:
    """(time, reason) of the request's earliest pending deadline, or None. The queue
    timeout covers only the wait for the first admission (started_at is None)."""
    due = []
    if req.sched.queue_timeout_s is not None and req.sched.started_at is None:
        due.append((req.sched.arrival + req.sched.queue_timeout_s, "queue timeout"))
    if req.sched.timeout_s is not None:
        due.append((req.sched.arrival + req.sched.timeout_s, "total timeout"))
    return min(due) if due else None


def expired(req, now: float) -> str | None:
    """"queue timeout" or "total timeout" once `now` is past that deadline, else None."""
    d = deadline(req)
    return d[1] if d is not None and now > d[0] else None
