"""Per-tenant books: configuration, quotas, and the service each tenant has received.

Pure bookkeeping for the priority policy (policy.py): no torch, no I/O, no clock of its
own. Every method that depends on time takes `now` (seconds on the monotonic clock).
The scheduler, through the policy, is the only writer: it reports each request's moves
(on_queued / on_started / on_preempted / on_finished) and the tokens it serves (charge).

Weighted fair share: a tenant's virtual time grows by tokens / weight for every token it
is served, and among requests of equal priority the tenant with the lowest virtual time
goes first, so saturating tenants are served tokens in the ratio of their weights. The
policy ranks batch slots per weight (counts(): running / weight) before virtual time,
and preempts for fairness on the same measure (policy.py, "Fair shares of the batch"):
a decode step gives each running sequence one token, so slots are the tokens' share.
A tenant that becomes active (its first request in flight, after none) starts no lower
than the system virtual time, the minimum virtual time of the tenants active at that
moment; a latecomer, or a tenant back from idle, cannot claim a backlog of credit
(start-time fair queuing; Linux CFS's min_vruntime does the same).

Bounded memory: any tenant name a client sends gets books, so the book forgets what it
need not remember. Tenants named in the configuration are kept for the book's life; any
other tenant gets the default config (DEFAULT_TENANT, or the "*" entry of the configs:
bounded queues) and is forgotten once it is idle (nothing queued or running) and
  - its virtual time is at most the system virtual time: it would return there anyway,
    so forgetting it changes no decision, unless a tokens_per_minute quota still counts
    tokens in its window; or
  - its minute window is empty: it was served nothing for WINDOW_S. A tenant that was
    ahead of the others then returns at the system virtual time: no credit banked, and
    no debt kept for service received more than a minute ago.
The book sweeps for such tenants when it has doubled in size since the last sweep (and
holds at least SWEEP_MIN), so it holds at most max(SWEEP_MIN, twice the tenants it must
keep) and a sweep costs O(1) amortized per new tenant. A forgotten tenant loses only
statistics (its served-token count; its minute window when no tokens_per_minute quota
reads it); queries answer for it as for a new tenant.
"""
from __future__ import annotations

import heapq
import math
from collections import Counter, deque
from dataclasses import dataclass, field

from llmos.names import PRIORITY_CLASSES   # (tenant configs name a default class)

WINDOW_S = 60.0   # tokens_per_minute is counted over a sliding window this long
ALL = "*"         # the configs entry (and `llmosd --tenant '*:...'`) that sets the default config
SWEEP_MIN = 1024  # the book never sweeps while it holds fewer tenants than this


@dataclass(frozen=True)
class TenantConfig:
    weight: float = 1.0                   # share of tokens relative to other tenants
    default_priority: str = "interactive"  # class for requests that name none, or only an int level
    max_concurrent: int | None = None     # requests in flight (waiting + running); None: unlimited
    max_queued: int | None = None         # requests waiting to run; None: unlimited
    tokens_per_minute: int | None = None  # tokens served in the last 60 s; None: unlimited

    def __post_init__(self):
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (math.isfinite(w) and w > 0):
            raise ValueError(f"tenant weight must be a finite number > 0, got {w!r}")
        if self.default_priority not in PRIORITY_CLASSES:
            raise ValueError(f"default_priority must be one of {PRIORITY_CLASSES}, got {self.default_priority!r}")
        for name in ("max_concurrent", "max_queued", "tokens_per_minute"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be an integer >= 0 or None, got {v!r}")


# Tenants nobody configured: one of them cannot fill the queues alone (a batch job keeps
# at most 64 lines in flight, jobs/manager.py; 32 concurrent streams is the benchmark).
# Configured tenants are trusted: their unset quotas are unlimited.
DEFAULT_TENANT = TenantConfig(max_concurrent=1024, max_queued=512)


@dataclass(frozen=True)
class QuotaExceeded:
    """Why a tenant's new request is refused now (HTTP 429), and when to try again.
    retry_after_s > 0; send Retry-After as ceil(retry_after_s)."""
    reason: str
    retry_after_s: float
    limit: str = ""   # the quota: "max_concurrent", "max_queued" or "tokens_per_minute"


@dataclass
class _Tenant:
    config: TenantConfig
    vtime: float = 0.0
    configured: bool = False  # named in the configuration: never forgotten
    served: int = 0          # tokens, all time
    queued: int = 0
    running: int = 0
    window: deque = field(default_factory=deque)   # [time, tokens], oldest first, within WINDOW_S
    window_tokens: int = 0

    @property
    def active(self) -> bool:
        return self.queued + self.running > 0


class TenantBook:
    """Tenants are created on their first on_queued or charge (or configure); unconfigured
    ones are forgotten when idle (see the module docstring). Query methods never create
    one, and answer for an unknown tenant as for a new one (default config, the system
    virtual time, no counts). configs[ALL], if given, is the default config (then
    `default` must be None); without either it is DEFAULT_TENANT."""

    def __init__(self, configs: dict[str, TenantConfig] | None = None, default: TenantConfig | None = None,
                 busy_retry_after_s: float = 1.0):
        if not busy_retry_after_s > 0:
            raise ValueError("busy_retry_after_s must be > 0")
        configs = dict(configs or {})
        if ALL in configs:
            if default is not None:
                raise ValueError(f"the default tenant config is given twice (default= and configs[{ALL!r}])")
            default = configs.pop(ALL)
        self.default = default or DEFAULT_TENANT
        self.busy_retry_after_s = busy_retry_after_s   # Retry-After for the count quotas (no exact answer)
        self._tenants: dict[str, _Tenant] = {}
        self._floor = 0.0   # system virtual time; never decreases
        self._active: dict[str, _Tenant] = {}          # tenants with requests in flight
        self._heap: list[tuple[float, str]] = []       # (vtime, name) of active tenants, lower bounds (lazy)
        self._now = -math.inf                          # the latest `now` seen (expires windows in sweeps)
        self._sweep_at = SWEEP_MIN                     # sweep when a new tenant would make the book this big
        self.forgotten = 0                             # tenants forgotten, all time
        for name, cfg in configs.items():
            self.configure(name, cfg)

    # ------------------------------------------------------------ configuration and queries
    def configure(self, tenant: str, config: TenantConfig) -> None:
        """Set or replace a tenant's config (it is then kept for the book's life); its
        accounting is kept. configure(ALL, c) replaces the default config, also for the
        unconfigured tenants the book holds now."""
        if tenant == ALL:
            old, self.default = self.default, config
            for t in self._tenants.values():
                if not t.configured and t.config is old:
                    t.config = config
            return
        t = self._tenants.get(tenant)
        if t is None:
            t = self._add(tenant, config)
        t.config, t.configured = config, True

    @property
    def num_tenants(self) -> int:
        """Tenants the book holds now (configured, active, and idle ones not yet forgotten)."""
        return len(self._tenants)

    def __contains__(self, tenant: str) -> bool:
        return tenant in self._tenants

    def config(self, tenant: str) -> TenantConfig:
        t = self._tenants.get(tenant)
        return t.config if t else self.default

    def vtime(self, tenant: str) -> float:
        t = self._tenants.get(tenant)
        return t.vtime if t else self._floor

    def counts(self, tenant: str) -> tuple[int, int]:
        """(queued, running)."""
        t = self._tenants.get(tenant)
        return (t.queued, t.running) if t else (0, 0)

    def served(self, tenant: str) -> int:
        t = self._tenants.get(tenant)
        return t.served if t else 0

    def tokens_last_minute(self, tenant: str, now: float) -> int:
        self._now = max(self._now, now)
        t = self._tenants.get(tenant)
        if t is None:
            return 0
        self._expire(t, now)
        return t.window_tokens

    def check_admission(self, tenant: str, now: float) -> QuotaExceeded | None:
        """None if the tenant may put one more request in flight now. Call before on_queued.
        tokens_per_minute refuses once the window holds >= the quota; requests already in
        flight are never stopped, so a tenant can overshoot by what they generate."""
        cfg = self.config(tenant)
        queued, running = self.counts(tenant)
        if cfg.max_concurrent is not None and queued + running >= cfg.max_concurrent:
            return QuotaExceeded(f"tenant {tenant!r} has {queued + running} requests in flight "
                                 f"(max_concurrent={cfg.max_concurrent})", self.busy_retry_after_s, "max_concurrent")
        if cfg.max_queued is not None and queued >= cfg.max_queued:
            return QuotaExceeded(f"tenant {tenant!r} has {queued} requests queued (max_queued={cfg.max_queued})",
                                 self.busy_retry_after_s, "max_queued")
        limit = cfg.tokens_per_minute
        if limit is not None and self.tokens_last_minute(tenant, now) >= limit:
            t = self._tenants[tenant]
            # Wait until enough of the oldest tokens leave the window to get under the quota.
            left = t.window_tokens
            for ts, n in t.window:
                left -= n
                if left < limit:
                    break
            return QuotaExceeded(f"tenant {tenant!r} used {t.window_tokens} tokens in the last minute "
                                 f"(tokens_per_minute={limit})", ts + WINDOW_S - now, "tokens_per_minute")
        return None

    # ------------------------------------------------------------ moves, reported by the scheduler
    def on_queued(self, tenant: str) -> None:
        """A new request entered the waiting queue (not a preempted one: see on_preempted)."""
        t = self._tenants.get(tenant)
        if t is None:
            t = self._add(tenant, self.default)
        if not t.active:
            t.vtime = max(t.vtime, self._system_vtime())
            self._active[tenant] = t
            heapq.heappush(self._heap, (t.vtime, tenant))
            if len(self._heap) > 2 * len(self._active) + 64:   # drop stale entries: O(1) amortized
                self._heap = [(a.vtime, name) for name, a in self._active.items()]
                heapq.heapify(self._heap)
        t.queued += 1

    def on_started(self, tenant: str) -> None:
        """waiting -> running."""
        t = self._must(tenant, queued=1)
        t.queued -= 1
        t.running += 1

    def on_preempted(self, tenant: str) -> None:
        """running -> waiting."""
        t = self._must(tenant, running=1)
        t.running -= 1
        t.queued += 1

    def on_finished(self, tenant: str, running: bool = True) -> None:
        """The request left the scheduler (finished, aborted, expired) from the running batch,
        or from the waiting queue if running=False."""
        t = self._must(tenant, running=1) if running else self._must(tenant, queued=1)
        if t.queued + t.running == 1:
            self._system_vtime()  # record the clock while t still counts
            del self._active[tenant]
        if running:
            t.running -= 1
        else:
            t.queued -= 1

    def charge(self, tenant: str, tokens: int, now: float) -> None:
        """Account `tokens` served to the tenant at `now` (virtual time and the minute window)."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be an integer >= 0, got {tokens!r}")
        self._now = max(self._now, now)
        t = self._tenants.get(tenant)
        if t is None:
            t = self._add(tenant, self.default)
        t.vtime += tokens / t.config.weight
        t.served += tokens
        if tokens:
            if t.window and t.window[-1][0] == now:
                t.window[-1][1] += tokens
            else:
                t.window.append([now, tokens])
            t.window_tokens += tokens
        self._expire(t, now)

    # ------------------------------------------------------------ checks and views
    def check_integrity(self, queued: Counter, running: Counter) -> None:
        """Raise AssertionError unless the books match the scheduler's queues (tenant -> count)."""
        for name in set(queued) | set(running) | set(self._tenants):
            if self.counts(name) != (queued.get(name, 0), running.get(name, 0)):
                raise AssertionError(f"tenant {name!r}: books say (queued, running)={self.counts(name)}, "
                                     f"scheduler has ({queued.get(name, 0)}, {running.get(name, 0)})")
        active = {name for name, t in self._tenants.items() if t.active}
        if set(self._active) != active or any(self._tenants[n] is not t for n, t in self._active.items()):
            raise AssertionError(f"active tenants {sorted(self._active)} != tenants in flight {sorted(active)}")
        if not active <= {name for _, name in self._heap}:
            raise AssertionError("an active tenant is missing from the virtual-time heap")

    def snapshot(self, now: float) -> dict:
        self._now = max(self._now, now)
        return {name: {"weight": t.config.weight, "default_priority": t.config.default_priority,
                       "vtime": round(t.vtime, 3), "served_tokens": t.served, "queued": t.queued,
                       "running": t.running, "tokens_last_minute": self.tokens_last_minute(name, now)}
                for name, t in self._tenants.items()}

    # ------------------------------------------------------------ internals
    def _system_vtime(self) -> float:
        """Raise the floor to the least virtual time of the active tenants; return it.
        Each active tenant has a heap entry at most its virtual time (pushed when it became
        active; virtual times only grow while it is): fix the top until it is exact. Each
        charge makes at most one entry stale, so this is O(log n) amortized per call."""
        heap, active = self._heap, self._active
        while heap:
            v, name = heap[0]
            t = active.get(name)
            if t is None:            # went idle (and maybe was forgotten) since it was pushed
                heapq.heappop(heap)
            elif v != t.vtime:       # charged since (or an entry of a forgotten namesake)
                heapq.heapreplace(heap, (t.vtime, name))
            else:
                self._floor = max(self._floor, v)
                break
        return self._floor

    def _add(self, tenant: str, config: TenantConfig) -> _Tenant:
        if len(self._tenants) >= self._sweep_at:
            self._sweep()
        t = self._tenants[tenant] = _Tenant(config, vtime=self._floor)
        return t

    def _sweep(self) -> None:
        """Forget the tenants that need no remembering (module docstring). O(tenants), run
        when the book has doubled since the last sweep."""
        floor = self._system_vtime()
        for name in [name for name, t in self._tenants.items() if self._forgettable(t, floor)]:
            del self._tenants[name]
            self.forgotten += 1
        self._sweep_at = max(SWEEP_MIN, 2 * len(self._tenants))

    def _forgettable(self, t: _Tenant, floor: float) -> bool:
        if t.configured or t.active:
            return False
        self._expire(t, self._now)
        return not t.window or (t.vtime <= floor and t.config.tokens_per_minute is None)

    def _must(self, tenant: str, queued: int = 0, running: int = 0) -> _Tenant:
        t = self._tenants.get(tenant)
        if t is None or t.queued < queued or t.running < running:
            raise RuntimeError(f"tenant {tenant!r}: books out of balance (no such request in flight)")
        return t

    @staticmethod
    def _expire(t: _Tenant, now: float) -> None:
        while t.window and t.window[0][0] + WINDOW_S <= now:
            t.window_tokens -= t.window.popleft()[1]
