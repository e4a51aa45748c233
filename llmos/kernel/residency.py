"""Which models are in memory, and which must leave: keep-alive and least-recently-used.

Pure decisions on a clock the caller passes; the kernel (model_host.py) does what they
say: starts drivers, stops them, releases pools. A model is

    unloaded -> loading -> loaded -> unloading -> unloaded      (failed: its load failed)

Room is counted two ways, both known before a load starts:
  - slots: at most `max_loaded` engines at once (a model with N replicas, or in the middle of
    an upgrade, holds several), since each gets kv_memory / max_loaded of KV (a pool is sized
    at load and does not grow);
  - memory: its weights (estimated from the registry) plus that KV must fit in what the
    device has free, or under `--memory-limit` when one is set.
What does not fit evicts idle models, least recently used first; a busy model is never
evicted. If that is still not enough, `plan_load` says why, with the numbers.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from llmos.keep_alive import FOREVER



class Residency(enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass
class Resident:
    name: str
    state: Residency = Residency.UNLOADED
    keep_alive_s: float = 300.0       # this model's current keep-alive (the last request's, or its default)
    last_used: float = 0.0            # when its last request ended (or it finished loading)
    weight_bytes: int = 0             # estimate before the load, the driver's figure after
    kv_bytes: int = 0                 # its pools, once created
    error: str | None = None          # why its last load failed
    busy: bool = False                # holds requests now (set by the caller before each decision)
    engines: int = 1                  # slots it holds: its replicas (and an upgrade's candidates)

    @property
    def footprint(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def expired(self, now: float) -> bool:
        return (self.state is Residency.LOADED and not self.busy and self.keep_alive_s >= 0
                and now >= self.last_used + self.keep_alive_s)


@dataclass
class LoadPlan:
    ok: bool
    evict: list[str] = field(default_factory=list)   # idle models to unload first, LRU first
    reason: str = ""                                  # why not, with the numbers (when not ok)


class ResidencyTable:
    def __init__(self, max_loaded: int, memory_limit: int | None = None):
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, not {max_loaded}")
        self.max_loaded = max_loaded
        self.memory_limit = memory_limit
        self.models: dict[str, Resident] = {}

    def get(self, name: str) -> Resident:
        if name not in self.models:
            self.models[name] = Resident(name)
        return self.models[name]

    def state(self, name: str) -> str:
        r = self.models.get(name)
        return r.state.value if r else Residency.UNLOADED.value

    def in_memory(self) -> list[Resident]:
        return [r for r in self.models.values() if r.state in (Residency.LOADING, Residency.LOADED,
                                                                Residency.UNLOADING)]

    def plan_load(self, name: str, need_bytes: int, kv_bytes: int, device_free: int, engines: int = 1,
                  growing: bool = False) -> LoadPlan:
        """Can `engines` more engines of `name` load (weights estimate `need_bytes` plus
        `kv_bytes` of pools, for all of them), with `device_free` bytes free on the device now?
        Says whom to evict first. `growing`: `name` is in memory and stays (more replicas, an
        upgrade's candidate): it counts as held and busy."""
        held = [r for r in self.in_memory() if r.name != name or growing]
        want = need_bytes + kv_bytes
        free = device_free if self.memory_limit is None else \
            min(device_free, self.memory_limit - sum(r.footprint for r in held))
        idle = sorted((r for r in held if r.state is Residency.LOADED and not r.busy and r.name != name),
                      key=lambda r: r.last_used)
        evict: list[str] = []
        slots = self.max_loaded - sum(r.engines for r in held)
        while (slots < engines or free < want) and idle:
            victim = idle.pop(0)
            evict.append(victim.name)
            slots += victim.engines
            free += victim.footprint
        if slots >= engines and free >= want:
            return LoadPlan(True, evict)
        busy = [r.name for r in held if r not in idle and r.name not in evict]
        if slots < engines:
            reason = (f"{len(held)} model(s) are in memory ({', '.join(sorted(busy))}) with "
                      f"{sum(r.engines for r in held)} engine(s), {engines} more would pass the most at once, "
                      f"{self.max_loaded} (--max-loaded-models), and none is idle")
        else:
            limit = "" if self.memory_limit is None else f" (--memory-limit {_mib(self.memory_limit)})"
            reason = (f"model '{name}' needs {_mib(want)} ({_mib(need_bytes)} weights + {_mib(kv_bytes)} KV) but "
                      f"{_mib(max(0, free))} is free{limit}"
                      + (f"; busy models hold the rest: {', '.join(sorted(busy))}" if busy else ""))
        return LoadPlan(False, [], reason)

    def expired(self, now: float) -> list[str]:
        return [r.name for r in self.models.values() if r.expired(now)]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
