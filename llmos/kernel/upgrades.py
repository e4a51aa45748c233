"""Upgrade a model without interrupting it, and roll back by itself when the new version is bad.

    start(name, version)    load the new version's engines next to the old (if memory allows)
    -> every candidate up   run the canary prompts on each (canary.py)
    -> all answered         switch: new requests go to the new version; the old stands by
    -> WATCH_REQUESTS done  the old version retires (finishes what it holds, then stops)

A candidate that fails to load, fails its canary, or fails MAX_WATCH_FAILURES of its first
WATCH_REQUESTS requests is rolled back: traffic stays on (or returns to) the old version,
and the registry records why. Requests are bound to an engine at submit, so every stream
finishes on the version that started it. Batch jobs go through the same routing.
"""
from __future__ import annotations

import logging
import time

from llmos.kernel.deployments import CANARY, DRAINING, LOADING, WATCH_MAX_S, WATCHING, Upgrade
from llmos.models.catalog import UPGRADE_FAILED

log = logging.getLogger(__name__)
CANARY_TIMEOUT_S = 300.0


class Upgrades:
    def __init__(self, host, canary, clock=time.monotonic):
        self.host, self.canary, self.clock = host, canary, clock
        self.catalog = host.catalog
        self.log: list[dict] = []                  # each upgrade's outcome, newest last
        host.on_engine_ready, host.on_engine_failed, host.on_tick = self._engine_ready, self.engine_failed, self.tick

    # ------------------------------------------------------------ commands
    def start(self, name: str, version: int, in_place: bool = False) -> dict:
        entry = self.catalog.get(name)
        target = entry.version(version)            # raises UnknownModel for a version it lacks
        d = self.host.deployments.get(name)
        if d is None:                              # not in memory: the next load takes it
            self.catalog.set_active(name, version, "upgrade (the model was not loaded)")
            return self._record(name, entry.active, version, "switched", "the model was not loaded")
        if d.upgrade is not None:
            raise ValueError(f"model {name!r} is already being upgraded to v{d.upgrade.version}")
        if d.version == version:
            raise ValueError(f"model {name!r} already serves v{version}")
        spec = f"{name}={target.prepared}"
        refusal = self.host._make_room(name, d.replicas, growing=True)
        if refusal is not None and in_place:
            return self._start_in_place(d, version, spec)
        if refusal is not None:
            raise ValueError(f"{refusal[1]}; both versions must fit while the new one is tried (unload other "
                             "models), or upgrade in place (new requests wait while the old version drains)")
        self.host.table.get(name).engines += d.replicas
        d.upgrade = Upgrade(version, spec, [], self.clock())
        d.upgrade.engines = [self.host.start_engine(d, spec) for _ in range(d.replicas)]
        log.info("upgrading %s from v%s to v%d: loading %s", name, d.version, version, d.upgrade.engines)
        return {"model": name, "from": d.version, "to": version, "phase": LOADING, "engines": d.upgrade.engines}

    def _start_in_place(self, d, version: int, spec: str) -> dict:
        """Nothing new goes to the old version (new requests wait in the parking); once it holds
        nothing it stops, and the new one loads in its memory (tick)."""
        d.upgrade = Upgrade(version, spec, [], self.clock(), phase=DRAINING, in_place=True,
                            previous=list(d.serving), previous_version=d.version, previous_spec=d.spec)
        d.serving = []
        log.info("upgrading %s in place to v%d: draining %s", d.model, version, d.upgrade.previous)
        return {"model": d.model, "from": d.version, "to": version, "phase": DRAINING, "engines": []}

    def rollback(self, name: str) -> dict:
        """During an upgrade: abandon it now. After one: upgrade back to the version before."""
        d = self.host.deployments.get(name)
        if d is not None and d.upgrade is not None:
            self._roll_back(name, "asked to")
            return {"model": name, "phase": "rolled back", "serving": d.version}
        previous = self._previous_version(name)
        if previous is None:
            raise ValueError(f"model {name!r} has no earlier version to roll back to")
        return self.start(name, previous)

    def status(self, name: str) -> dict:
        d = self.host.deployments.get(name)
        u = d.upgrade if d else None
        current = {"model": name, "serving": d.version if d else None, "engines": list(d.serving) if d else [],
                   "upgrade": None if u is None else {
                       "to": u.version, "phase": u.phase, "engines": u.engines, "served_ok": u.served_ok,
                       "served_failed": u.served_failed, "switched_at_s": None if u.switched_at is None
                       else round(u.switched_at - u.started, 3)}}
        current["last"] = next((e for e in reversed(self.log) if e["model"] == name), None)
        return current

    # ------------------------------------------------------------ events
    def _engine_ready(self, model: str, eid: str) -> None:
        d = self.host.deployments.get(model)
        u = d.upgrade if d else None
        if u is None or eid not in u.engines or u.phase != LOADING:
            return
        u.ready.add(eid)
        if u.ready == set(u.engines):
            u.phase, u.canary_left = CANARY, set(u.engines)
            for e in u.engines:
                self.canary.start(model, e, lambda engine, error, m=model: self._verdict(m, engine, error))

    def _verdict(self, model: str, eid: str, error: str | None) -> None:
        d = self.host.deployments.get(model)
        u = d.upgrade if d else None
        if u is None or u.phase != CANARY or eid not in u.canary_left:
            return
        if error:
            return self._roll_back(model, f"canary failed: {error}")
        u.canary_left.discard(eid)
        if u.canary_left:
            return
        d.switch()
        u.switched_at = self.clock()
        self.catalog.set_active(model, u.version, f"canary passed on {', '.join(u.engines)}")
        self.host.front.release(model)   # an in-place upgrade's waiting requests go in now
        log.info("model %s: switched to v%s after %.1f s", model, u.version, u.switched_at - u.started)
        self.host.on_event("model.upgrade", model=model, from_version=u.previous_version, to_version=u.version,
                           status="switched")

    def engine_failed(self, model: str, eid: str, error: str) -> bool:
        """A candidate's driver could not load: roll back. False if `eid` is no candidate."""
        d = self.host.deployments.get(model)
        if d is None or d.upgrade is None or eid not in d.upgrade.engines:
            return False
        self._roll_back(model, f"v{d.upgrade.version} failed to load: {error}")
        return True

    def request_done(self, req, server_failed: bool) -> None:
        d = self.host.deployments.get(req.model)
        if d is None:
            return
        verdict = d.judge(req.engine, server_failed)
        if verdict == "rollback":
            self._roll_back(req.model, f"{d.upgrade.served_failed} of its first "
                                       f"{d.upgrade.served_ok + d.upgrade.served_failed} requests failed")
        elif verdict == "done":
            self._finish(req.model, f"{d.upgrade.served_ok} requests served")

    def _finish(self, model: str, why: str) -> None:
        d = self.host.deployments[model]
        u = d.upgrade
        old = d.finish_upgrade()
        log.info("model %s: v%s kept (%s); retiring %s", model, u.version, why, old)
        self._record(model, u.previous_version, u.version, "switched", why, u.switched_at - u.started)

    def tick(self) -> None:
        """A canary that never answers fails."""
        now = self.clock()
        for model, d in list(self.host.deployments.items()):
            u = d.upgrade
            if u is not None and u.phase == DRAINING and not any(self.host.held(e) for e in u.previous):
                for e in u.previous:
                    self.host.drop_engine(e)
                u.engines = [self.host.start_engine(d, u.spec) for _ in range(d.replicas)]
                u.phase, u.started = LOADING, now   # (the canary's clock starts now)
                log.info("model %s: v%s drained; loading v%s in its place", model, u.previous_version, u.version)
            if u is not None and u.phase == CANARY and now - u.started > CANARY_TIMEOUT_S:
                self._roll_back(model, f"the canary did not answer within {CANARY_TIMEOUT_S:.0f} s")
            elif u is not None and u.phase == WATCHING and now - u.switched_at > WATCH_MAX_S:
                self._finish(model, f"{u.served_ok} requests served, {u.served_failed} failed in "
                                    f"{WATCH_MAX_S:.0f} s")

    # ------------------------------------------------------------ rollback
    def _roll_back(self, model: str, reason: str) -> None:
        d = self.host.deployments[model]
        u = d.upgrade
        for e in u.engines:
            self.canary.give_up(e, "rolled back")
        switched = u.phase not in (DRAINING, LOADING, CANARY)
        leaving = d.roll_back()
        d.retiring += [e for e in leaving if e in self.host.engines]   # they finish what they hold
        if u.in_place and not d.serving:   # the old version: still there (draining), or loaded again
            alive = [e for e in u.previous if e in self.host.engines]
            d.spec = u.previous_spec
            d.serving = alive or [self.host.start_engine(d, u.previous_spec) for _ in range(d.replicas)]
            d.router.set_replicas(d.serving)
        if switched:
            self.catalog.set_active(model, u.previous_version, f"v{u.version} rolled back: {reason}")
        else:
            self.catalog.record(model, UPGRADE_FAILED, u.version, reason)
        log.error("model %s: upgrade to v%s rolled back: %s", model, u.version, reason)
        self.host.on_event("model.rollback", model=model, from_version=u.version, to_version=d.version,
                           status="rolled back", reason=reason[:500])
        self._record(model, u.previous_version if switched else d.version, u.version, "rolled back", reason)
        self.host.front.release(model)   # (nothing waits on a candidate; this keeps the order simple)

    def _previous_version(self, name: str) -> int | None:
        """The version that was active before the current one, from the registry's history."""
        actives = [e.version for e in self.catalog.history(name)
                   if e.kind in ("added", "upgraded", "rolled back") and e.version]
        current = self.catalog.get(name).active
        earlier = [v for v in actives if v != current]
        return earlier[-1] if earlier else None

    def _record(self, model, frm, to, outcome, reason, switch_s=None) -> dict:
        entry = {"model": model, "from": frm, "to": to, "outcome": outcome, "reason": reason, "at": time.time(),
                 "switch_s": None if switch_s is None else round(switch_s, 3)}
        self.log = (self.log + [entry])[-100:]
        return entry
