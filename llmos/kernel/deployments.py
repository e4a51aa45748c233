"""A model's engines: the replicas that take its requests, and an upgrade in progress.

A model in memory is a Deployment: one or more engines (replicas; each a model driver, a
tokenizer driver, a KV pool and a scheduler) of one registry version. Engine ids are the
model's name for the first, `name~k` for later ones; a request is bound to one engine at
submit and finishes there, so a stream never changes version or replica halfway.

An upgrade moves through phases, each with one exit to rollback:

    loading  --all candidate engines up-->  canary  --canary answers-->  watching  --N ok-->  done
       |  a candidate fails to load             | no text, an error         | error rate over the threshold
       v                                        v                           v
    rollback: the candidate engines go; the old version serves as if nothing happened

At the switch (canary -> watching) new requests go to the candidate; the old version's
engines stand by: they finish what they hold and take nothing new, and stay loaded so that a
rollback during the watch is instant. When the watch ends well they retire (torn down once idle).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from llmos.kernel.router import Router

DRAINING, LOADING, CANARY, WATCHING = "draining", "loading", "canary", "watching"
WATCH_REQUESTS = 16        # requests the new version serves before the old one retires
MAX_WATCH_FAILURES = 2     # server-side failures among them that roll it back
WATCH_MAX_S = 60.0         # a watch with too little traffic to judge ends well after this long


@dataclass
class Upgrade:
    version: int | None        # the registry version being tried (None: a path given directly)
    spec: str                  # what its model drivers load
    engines: list[str]
    started: float
    phase: str = LOADING
    ready: set = field(default_factory=set)       # candidate engines up so far
    canary_left: set = field(default_factory=set) # engines whose canary has not answered
    served_ok: int = 0
    served_failed: int = 0
    switched_at: float | None = None
    previous: list[str] = field(default_factory=list)   # the old version's engines (standing by)
    previous_version: int | None = None
    in_place: bool = False     # both versions do not fit: drain the old, then load the new (draining first)
    previous_spec: str = ""


@dataclass
class Deployment:
    model: str
    spec: str                  # what the serving engines' drivers load
    version: int | None        # registry version served (None: a --model path)
    replicas: int = 1
    serving: list[str] = field(default_factory=list)    # engines taking new requests
    retiring: list[str] = field(default_factory=list)   # engines finishing what they hold, then torn down
    upgrade: Upgrade | None = None
    router: Router = field(default_factory=Router)
    _next: int = 0

    def place(self, devices: list[str], device_of) -> str:
        """The device for a new engine: the one of `devices` holding fewest of this model's
        engines (one replica per GPU on a workstation with several), the first on a tie."""
        counts = {dev: 0 for dev in devices}
        for eid in self.engines():
            dev = device_of(eid)
            if dev in counts:
                counts[dev] += 1
        return min(devices, key=lambda dev: counts[dev])

    def new_engine_id(self, taken) -> str:
        while True:
            eid = self.model if self._next == 0 else f"{self.model}~{self._next}"
            self._next += 1
            if eid not in taken:
                return eid

    def engines(self) -> list[str]:
        """Every engine of this model, in memory or on its way."""
        up = self.upgrade.engines if self.upgrade else []
        return list(dict.fromkeys(self.serving + self.retiring + up))

    def routable(self) -> list[str]:
        return list(self.serving)

    def switch(self) -> None:
        """The candidate passed its canary: it serves from now; the old version stands by."""
        u = self.upgrade
        u.previous, u.previous_version = list(self.serving), self.version
        self.serving, self.spec, self.version = list(u.engines), u.spec, u.version
        u.phase = WATCHING
        self.router.set_replicas(self.serving)

    def roll_back(self) -> list[str]:
        """Back to the old version; returns the candidate's engines, which must go."""
        u, self.upgrade = self.upgrade, None
        if u.phase == WATCHING:
            self.serving, self.version = list(u.previous), u.previous_version
            self.router.set_replicas(self.serving)
        return [e for e in u.engines if e not in self.serving]

    def finish_upgrade(self) -> list[str]:
        """The watch ended well: the old version's engines retire."""
        u, self.upgrade = self.upgrade, None
        old = [e for e in u.previous if e not in self.serving]
        self.retiring += old
        return old

    def judge(self, engine: str, server_failed: bool) -> str | None:
        """A request on `engine` ended. During the watch: "rollback", "done" or None."""
        u = self.upgrade
        if u is None or u.phase != WATCHING or engine not in u.engines:
            return None
        if server_failed:
            u.served_failed += 1
        else:
            u.served_ok += 1
        if u.served_failed >= MAX_WATCH_FAILURES:
            return "rollback"
        if u.served_ok + u.served_failed >= WATCH_REQUESTS:
            return "done"
        return None
