"""Models come and go: load on demand, unload when idle, evict to make room, replicas.

The ResidencyTable decides what fits (residency.py); a Deployment says which engines a
model has (deployments.py); this module acts. Loading a model creates its engines (one per
replica) and starts their model drivers; the kernel's Ready handling sizes each pool and
starts its tokenizer, and `ready()` here releases the requests that waited. Unloading stops
the drivers, releases the pools and forgets the engines. Requests for a model that is
loading wait in the front door (`FrontDoor.parking`), so nothing fails for a cold model.
Upgrades (upgrades.py) add a candidate version's engines next to the serving ones.
"""
from __future__ import annotations

import asyncio
import logging
import time

from llmos.keep_alive import FOREVER
from llmos.kernel.deployments import Deployment
from llmos.kernel.residency import Residency, ResidencyTable
from llmos.kernel.router import prompt_key
from llmos.models.catalog import Catalog
from llmos.models.names import model_name

log = logging.getLogger(__name__)
REGISTRY_TTL_S = 1.0
BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "int4": 2, "int8": 3}   # int4 keeps a bf16 copy for large batches (int8: and an int8 one)
DEFAULT_MAX_TOKENS = 256     # what an unbounded request is assumed to cost, for balancing


class ModelHost:
    def __init__(self, config, paths, engines: dict, front, supervisor, new_engine, load_specs,
                 start_loop, kv_share, device_free, devices: list[str], clock=time.monotonic):
        self.config, self.paths, self.engines, self.front, self.supervisor = config, paths, engines, front, supervisor
        self._new_engine = new_engine                 # (engine id, model, spec, device) -> ModelEngine
        self.devices = devices                        # where engines may run; replicas spread over them
        self._load_specs = load_specs   # (engine) -> DriverSpecs to start: its model driver first
        self._start_loop = start_loop                 # (name, coroutine) -> asyncio.Task
        self._kv_share = kv_share                     # () -> bytes of KV one engine gets
        self._device_free = device_free               # () -> bytes free on the device now
        self.clock = clock
        self.table = ResidencyTable(config.max_loaded_models, config.memory_limit_bytes)
        self.specs: dict[str, str] = {}               # preloaded name -> spec (--model)
        self.deployments: dict[str, Deployment] = {}  # model -> its engines, while in memory
        self.loops: dict[str, asyncio.Task] = {}      # engine id -> its step loop
        self.ever_loaded: set[str] = set()            # the daemon is ready once every preload got here
        self.outstanding: dict[str, int] = {}         # engine id -> tokens of work routed to it, not done
        self._costs: dict[str, tuple[str, int]] = {}  # request id -> (engine id, its cost)
        # Set by upgrades.py: an engine came up, an engine failed to load, the periodic tick.
        self.on_engine_ready = lambda model, engine: None
        self.on_engine_failed = lambda model, engine, error: None
        self.on_tick = lambda: None
        self.on_event = lambda kind, **fields: None   # the audit log (kernel/auditing.py), set by the kernel
        self.catalog = Catalog(paths, busy_timeout_s=2.0)   # locked longer: a 503, not a stalled loop
        self._registered_names, self._registered_at = frozenset(), float("-inf")

    # ------------------------------------------------------------ what exists
    def preload(self) -> None:
        """The --model models: load them all now (refusing to start if they cannot fit)."""
        for spec in self.config.models:
            name = model_name(spec)
            if name in self.specs:
                raise ValueError(f"model {name!r} given twice")
            self.specs[name] = spec
        for name in self.specs:
            refusal = self.ensure(name)
            if refusal is not None:
                raise ValueError(refusal[1])

    def known(self, name: str) -> bool:
        return name in self.specs or name in self.deployments or name in self._registered()

    def _registered(self) -> frozenset:
        """The registry's names, read at most once a second: a batch file of 50,000 lines or a
        stream of requests naming models that do not exist must not each cost a database read."""
        now = self.clock()
        if now - self._registered_at >= REGISTRY_TTL_S:
            try:
                self._registered_names = frozenset(e.name for e in self.catalog.list())
            except Exception:   # an unreadable registry: serve what we have
                log.exception("the model registry cannot be read")
            self._registered_at = now
        return self._registered_names

    def registry_changed(self) -> None:
        """The registry was just written: read its names on the next look."""
        self._registered_at = float("-inf")

    def state(self, name: str) -> str:
        return self.table.state(name)

    def names(self) -> list[str]:
        """Every model a request may name: the preloaded (--model) ones first, in the order
        given, then the registered or in-memory others by name. A router that takes a worker's
        first listed model as its model (SGLang's smg does) then gets the one it serves."""
        others = (self._registered() | set(self.deployments)) - set(self.specs)
        return [*self.specs, *sorted(others)]

    def model_of(self, engine_id: str) -> str | None:
        engine = self.engines.get(engine_id)
        return engine.model if engine is not None else None

    # ------------------------------------------------------------ routing
    def route(self, m) -> object | None:
        """The engine for a Submit: among the model's loaded serving replicas, the one whose
        prefix cache likely holds the prompt unless it is overloaded, else the least loaded.
        None when none is loaded yet (the caller parks the request)."""
        d = self.deployments.get(m.model)
        if d is None:
            return None
        live = [e for e in d.routable() if e in self.engines and self.engines[e].loaded]
        if not live:
            return None
        if len(live) == 1:
            return self.engines[live[0]]
        d.router.set_replicas(live)
        return self.engines[d.router.pick(prompt_key(m.prompt, m.messages, m.prompt_token_ids), self.outstanding)]

    def routed(self, req, m) -> None:
        """Count the work just bound to req.engine (the balance's measure)."""
        ids = m.prompt_token_ids
        prompt = len(ids) if ids is not None else len(prompt_key(m.prompt, m.messages, None)) // 4
        cost = m.n * (prompt + (req.params.max_tokens or DEFAULT_MAX_TOKENS))
        self._costs[req.id] = (req.engine, cost)
        self.outstanding[req.engine] = self.outstanding.get(req.engine, 0) + cost

    # ------------------------------------------------------------ loading
    def ensure(self, name: str) -> tuple[int, str] | None:
        """Make `name` loaded or loading. None: it is (its requests may wait); else the
        (status, message) to refuse a request with."""
        if not self.known(name):
            return 404, f"The model '{name:.256}' does not exist"
        r = self.table.get(name)
        if r.state in (Residency.LOADING, Residency.LOADED):
            return None
        if r.state is Residency.UNLOADING:
            return 503, f"model '{name}' is being unloaded; try again in a moment"
        replicas = self._default_replicas(name)
        refusal = self._make_room(name, replicas, growing=False)
        if refusal is not None:
            return refusal
        spec, version = self._spec_of(name)
        d = self.deployments[name] = Deployment(name, spec, version, replicas)
        r.state, r.error, r.engines = Residency.LOADING, None, replicas
        r.keep_alive_s = self._default_keep_alive(name)
        d.serving = [self.start_engine(d, spec) for _ in range(replicas)]
        d.router.set_replicas(d.serving)
        return None

    def _make_room(self, name: str, engines: int, growing: bool) -> tuple[int, str] | None:
        self._mark_busy()
        kv, weights = self._kv_share() * engines, self._weight_estimate(name) * engines
        plan = self.table.plan_load(name, weights, kv, self._device_free(), engines=engines, growing=growing)
        if not plan.ok:
            log.warning("cannot load model %s: %s", name, plan.reason)
            return 503, f"model '{name}' cannot be loaded: {plan.reason}"
        for victim in plan.evict:
            log.info("unloading idle model %s to make room for %s", victim, name)
            self.unload_now(victim, f"evicted for {name}")
        r = self.table.get(name)
        if growing:
            r.weight_bytes, r.kv_bytes = r.weight_bytes + weights, r.kv_bytes + kv
        else:
            r.weight_bytes, r.kv_bytes = weights, kv
        return None

    def start_engine(self, d: Deployment, spec: str) -> str:
        """A new engine of `d`: its model driver starts now."""
        eid = d.new_engine_id(self.engines)
        device = d.place(self.devices, lambda e: self.engines[e].device if e in self.engines else None)
        engine = self.engines[eid] = self._new_engine(eid, d.model, spec, device)
        self.supervisor.remove(engine.driver)   # the row of a failed earlier load, kept to be read in ps
        for spec in self._load_specs(engine):
            self.supervisor.add(spec)
        self.loops[eid] = self._start_loop(f"model {eid} step loop", engine.run())
        log.info("loading %s (engine %s on %s)", d.model, eid, device)
        return eid

    def ready(self, eid: str) -> None:
        """An engine's model driver is up: the model's waiting requests go in."""
        engine = self.engines.get(eid)
        if engine is None:
            return
        model, r = engine.model, self.table.get(engine.model)
        self.on_engine_ready(model, eid)
        if r.state is Residency.LOADING and eid in self.deployments[model].serving:
            r.state, r.last_used = Residency.LOADED, self.clock()
            self.ever_loaded.add(model)
            log.info("model %s loaded", model)
            self.on_event("model.load", model=model, version=self.deployments[model].version, status="ok")
        if r.state is Residency.LOADED:
            self.front.release(model)

    def failed(self, eid: str, error: str) -> None:
        """An engine's model driver could not load its model."""
        engine = self.engines.get(eid)
        if engine is None:
            return
        d = self.deployments.get(engine.model)
        if d is None or eid not in d.serving:   # a candidate of an upgrade, or leaving anyway
            self.on_engine_failed(engine.model, eid, error)
            self.drop_engine(eid, keep_driver_row=True)
            return
        others = [e for e in d.serving if e != eid and self.engines.get(e) and self.engines[e].loaded]
        if others:   # the other replicas go on serving; this one is gone
            log.error("replica %s of %s failed to load: %s", eid, engine.model, error)
            d.serving.remove(eid)
            self.drop_engine(eid, keep_driver_row=True)
            return
        r = self.table.get(engine.model)
        log.error("model %s failed to load: %s", engine.model, error)
        self.on_event("model.load", model=engine.model, status="failed", error=error[:500])
        self.front.fail_parked(engine.model, 503, "model_unavailable", f"model '{engine.model}' failed to load: {error}")
        self._teardown(engine.model, failed_engine=eid)
        r.state, r.error = Residency.FAILED, error

    # ------------------------------------------------------------ unloading
    def request_done(self, req, server_failed: bool) -> bool | None:
        """A request left the table. Returns the upgrade's verdict, if its engine is on trial."""
        eid, cost = self._costs.pop(req.id, (None, 0))
        if eid is not None:
            self.outstanding[eid] = self.outstanding.get(eid, 0) - cost
        r = self.table.models.get(req.model)
        if r is not None:
            r.last_used = self.clock()
            if req.keep_alive_s is not None:
                r.keep_alive_s = req.keep_alive_s

    def unload_now(self, name: str, why: str) -> None:
        """Stop its drivers and release its memory (the caller made sure it holds no requests)."""
        r = self.table.get(name)
        if r.state not in (Residency.LOADED, Residency.LOADING):
            return
        log.info("unloading model %s: %s", name, why)
        self.on_event("model.unload", model=name, reason=why, status="ok")
        self._teardown(name)
        r.state = Residency.UNLOADED

    def _teardown(self, name: str, failed_engine: str | None = None) -> None:
        d = self.deployments.pop(name, None)
        for eid in d.engines() if d else []:
            self.drop_engine(eid, keep_driver_row=eid == failed_engine)

    def drop_engine(self, eid: str, keep_driver_row: bool = False) -> None:
        engine = self.engines.pop(eid, None)
        task = self.loops.pop(eid, None)
        if task is not None:
            task.cancel()
        self.outstanding.pop(eid, None)
        if engine is None:
            return
        if engine.kv_events is not None:   # its prefix cache is gone: subscribers forget it
            engine.kv_events.detach(eid)
        pools = [p for p in (engine.pool, engine.host_pool) if p is not None]

        def release() -> None:   # once the model driver is gone: it maps them until it exits
            for pool in pools:
                pool.release()
        self.supervisor.remove(engine.tokenizer)
        if keep_driver_row:   # it failed and exited: `llmos ps` keeps showing it, with its last error
            release()
        else:
            self.supervisor.remove(engine.driver, on_exit=release)

    def held(self, eid: str) -> int:
        return sum(r.engine == eid for r in self.front.table.values())

    async def watch(self, interval: float = 0.5) -> None:
        """Unload models whose keep-alive ran out; retire idle engines that were leaving."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.tick()
            except Exception:
                log.exception("model host: the idle check failed")

    def tick(self) -> None:
        self.on_tick()
        self._mark_busy()
        for name in self.table.expired(self.clock()):
            self.unload_now(name, "keep-alive expired")
        for d in self.deployments.values():
            for eid in [e for e in d.retiring if not self.held(e)]:
                d.retiring.remove(eid)
                self.drop_engine(eid)
                r = self.table.get(d.model)
                r.engines = max(1, r.engines - 1)

    def _mark_busy(self) -> None:
        busy = {r.model for r in self.front.table.values()} | self.front.parking.models()
        for r in self.table.models.values():
            r.busy = r.name in busy or (r.name in self.deployments and self.deployments[r.name].upgrade is not None)

    # ------------------------------------------------------------ replicas
    def scale(self, name: str, replicas: int) -> dict:
        if not 1 <= replicas <= self.config.max_loaded_models:
            raise ValueError(f"replicas must be from 1 to {self.config.max_loaded_models} (--max-loaded-models)")
        d = self.deployments.get(name)
        if d is None:
            raise ValueError(f"model {name!r} is not loaded; it loads with the registry's replicas")
        if d.upgrade is not None:
            raise ValueError(f"model {name!r} is being upgraded; scale it afterwards")
        more = replicas - len(d.serving)
        if more > 0:
            refusal = self._make_room(name, more, growing=True)
            if refusal is not None:
                raise ValueError(refusal[1])
            d.serving += [self.start_engine(d, d.spec) for _ in range(more)]
            self.table.get(name).engines += more
        elif more < 0:   # the newest leave: they finish what they hold first
            leaving, d.serving = d.serving[more:], d.serving[:more]
            d.retiring += leaving
        d.replicas = replicas
        d.router.set_replicas(d.serving)
        return {"model": name, "replicas": replicas, "engines": list(d.serving)}

    # ------------------------------------------------------------ estimates
    def _spec_of(self, name: str) -> tuple[str, int | None]:
        """What its model drivers load: a registered model's active version is pinned now, so a
        restarted driver loads the same weights even if the registry moved on meanwhile."""
        if name in self.specs and self.specs[name] != name:   # a path (name=/dir): not the registry's
            return self.specs[name], None
        try:
            entry = self.catalog.get(name)
        except Exception:
            return self.specs.get(name, name), None
        return (name if entry.builtin else f"{name}={entry.current.prepared}"), entry.active

    def _registry_entry(self, name: str):
        try:
            return self.catalog.get(name)
        except Exception:
            return None

    def _default_keep_alive(self, name: str) -> float:
        entry = self._registry_entry(name) if name not in self.specs else None
        if entry is not None and entry.keep_alive_s is not None:
            return entry.keep_alive_s
        return FOREVER if name in self.specs else self.config.keep_alive_s

    def _default_replicas(self, name: str) -> int:
        if name in self.specs:
            return self.config.replicas
        entry = self._registry_entry(name)
        return max(1, entry.replicas) if entry is not None else 1

    def _weight_estimate(self, name: str) -> int:
        """Bytes one engine's weights will take, from the registry's parameter count (0 if unknown)."""
        try:
            params = self.catalog.facts(name).parameters or 0
        except Exception:
            return 0
        return params * BYTES_PER_PARAM.get(self.config.dtype, 4)


class KnownModels:
    """The models a request may name, as a container: `name in known`, and the names."""
    def __init__(self, host: ModelHost):
        self.host = host

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and self.host.known(name)

    def __iter__(self):
        return iter(self.host.names())
