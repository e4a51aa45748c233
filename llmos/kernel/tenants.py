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
"""
from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field

# Priority classes, index = class number (lower runs first). They live here, not in
# policy.py, because tenant configs name a default class and policy.py imports this module.
PRIORITY_CLASSES = ("realtime", "interactive", "batch")
WINDOW_S = 60.0   # tokens_per_minute is counted over a sliding window this long


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
    served: int = 0          # tokens, all time
    queued: int = 0
    running: int = 0
    window: deque = field(default_factory=deque)   # [time, tokens], oldest first, within WINDOW_S
    window_tokens: int = 0

    @property
    def active(self) -> bool:
        return self.queued + self.running > 0


class TenantBook:
    """Tenants are created on their first on_queued (or configure) and kept: their virtual
    time must survive idle periods. Query methods never create one."""

    def __init__(self, configs: dict[str, TenantConfig] | None = None, default: TenantConfig | None = None,
                 busy_retry_after_s: float = 1.0):
        if not busy_retry_after_s > 0:
            raise ValueError("busy_retry_after_s must be > 0")
        self.default = default or TenantConfig()
        self.busy_retry_after_s = busy_retry_after_s   # Retry-After for the count quotas (no exact answer)
        self._tenants: dict[str, _Tenant] = {}
        self._floor = 0.0   # system virtual time; never decreases
        for name, cfg in (configs or {}).items():
            self.configure(name, cfg)

    # ------------------------------------------------------------ configuration and queries
    def configure(self, tenant: str, config: TenantConfig) -> None:
        """Set or replace a tenant's config; its accounting is kept."""
        t = self._tenants.get(tenant)
        if t is None:
            self._tenants[tenant] = _Tenant(config, vtime=self._floor)
        else:
            t.config = config

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
            t = self._tenants[tenant] = _Tenant(self.default)
        if not t.active:
            t.vtime = max(t.vtime, self._system_vtime(exclude=t))
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
            self._system_vtime(exclude=None)  # record the clock while t still counts
        if running:
            t.running -= 1
        else:
            t.queued -= 1

    def charge(self, tenant: str, tokens: int, now: float) -> None:
        """Account `tokens` served to the tenant at `now` (virtual time and the minute window)."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be an integer >= 0, got {tokens!r}")
        t = self._tenants.get(tenant)
        if t is None:
            t = self._tenants[tenant] = _Tenant(self.default, vtime=self._floor)
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

    def snapshot(self, now: float) -> dict:
        return {name: {"weight": t.config.weight, "default_priority": t.config.default_priority,
                       "vtime": round(t.vtime, 3), "served_tokens": t.served, "queued": t.queued,
                       "running": t.running, "tokens_last_minute": self.tokens_last_minute(name, now)}
                for name, t in self._tenants.items()}

    # ------------------------------------------------------------ internals
    def _system_vtime(self, exclude: _Tenant | None) -> float:
        active = [t.vtime for t in self._tenants.values() if t.active and t is not exclude]
        if active:
            self._floor = max(self._floor, min(active))
        return self._floor

    def _must(self, tenant: str, queued: int = 0, running: int = 0) -> _Tenant:
        t = self._tenants.get(tenant)
        if t is None or t.queued < queued or t.running < running:
            raise RuntimeError(f"tenant {tenant!r}: books out of balance (no such request in flight)")
        return t

    @staticmethod
    def _expire(t: _Tenant, now: float) -> None:
        while t.window and t.window[0][0] + WINDOW_S <= now:
            t.window_tokens -= t.window.popleft()[1]
