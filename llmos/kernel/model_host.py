"""Models come and go: load one on demand, unload it when idle, evict to make room.

The ResidencyTable decides (residency.py); this module acts. Loading a model creates its
ModelEngine and starts its model driver; the kernel's Ready handling then sizes the pool and
starts the tokenizer, and `ready()` here releases the requests that waited for it. Unloading
stops both drivers, releases the pools and forgets the engine. Requests for a model that is
loading wait in the front door (`FrontDoor.park`), so nothing fails for a cold model.
"""
from __future__ import annotations

import asyncio
import logging
import time

from llmos.keep_alive import FOREVER
from llmos.kernel.residency import Residency, ResidencyTable
from llmos.models.catalog import Catalog
from llmos.models.names import model_name

log = logging.getLogger(__name__)
REGISTRY_TTL_S = 1.0
BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "int4": 2}   # int4 keeps a bf16 copy for large batches


class ModelHost:
    def __init__(self, config, paths, engines: dict, front, supervisor, new_engine, model_driver_spec,
                 start_loop, kv_share, device_free, clock=time.monotonic):
        self.config, self.paths, self.engines, self.front, self.supervisor = config, paths, engines, front, supervisor
        self._new_engine = new_engine                 # (name, spec) -> ModelEngine
        self._model_driver_spec = model_driver_spec   # (engine) -> DriverSpec of its model driver
        self._start_loop = start_loop                 # (name, coroutine) -> asyncio.Task
        self._kv_share = kv_share                     # () -> bytes of KV one model gets
        self._device_free = device_free               # () -> bytes free on the device now
        self.clock = clock
        self.table = ResidencyTable(config.max_loaded_models, config.memory_limit_bytes)
        self.specs: dict[str, str] = {}               # preloaded name -> spec (--model)
        self.loops: dict[str, asyncio.Task] = {}
        self.ever_loaded: set[str] = set()            # the daemon is ready once every preload got here
        self.catalog = Catalog(paths)
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
        return name in self.specs or name in self.engines or name in self._registered()

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

    def state(self, name: str) -> str:
        return self.table.state(name)

    def names(self) -> list[str]:
        """Every model a request may name: preloaded, registered, or in memory."""
        return sorted(set(self.specs) | self._registered() | set(self.engines))

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
        self._mark_busy()
        kv = self._kv_share()
        weights = self._weight_estimate(name)
        plan = self.table.plan_load(name, weights, kv, self._device_free())
        if not plan.ok:
            log.warning("cannot load model %s: %s", name, plan.reason)
            return 503, f"model '{name}' cannot be loaded: {plan.reason}"
        for victim in plan.evict:
            log.info("unloading idle model %s to make room for %s", victim, name)
            self.unload_now(victim, f"evicted for {name}")
        r.state, r.error, r.weight_bytes, r.kv_bytes = Residency.LOADING, None, weights, kv
        r.keep_alive_s = self._default_keep_alive(name)
        engine = self._new_engine(name, self._spec_of(name))
        self.engines[name] = engine
        self.supervisor.remove(engine.driver)   # the row of a failed earlier load, kept to be read in ps
        self.supervisor.add(self._model_driver_spec(engine))
        self.loops[name] = self._start_loop(f"model {name} step loop", engine.run())
        log.info("loading model %s (%.1f MiB of weights expected)", name, weights / 2**20)
        return None

    def ready(self, name: str) -> None:
        """Its model driver mapped the pool: requests that waited for it go in now."""
        r, engine = self.table.get(name), self.engines.get(name)
        if engine is None or r.state is not Residency.LOADING:
            return
        r.state, r.last_used = Residency.LOADED, self.clock()
        self.ever_loaded.add(name)
        r.weight_bytes = engine.info.weight_bytes
        r.kv_bytes = engine.pool.nbytes   # (the host swap pool is not device memory)
        log.info("model %s loaded", name)
        self.front.release(name)

    def failed(self, name: str, error: str) -> None:
        """Its model driver could not load the model: fail what waited, tear it down."""
        r = self.table.get(name)
        if r.state is not Residency.LOADING:
            return
        log.error("model %s failed to load: %s", name, error)
        self.front.fail_parked(name, 503, "model_unavailable", f"model '{name}' failed to load: {error}")
        self._teardown(name, keep_driver_row=True)
        r.state, r.error = Residency.FAILED, error

    # ------------------------------------------------------------ unloading
    def request_done(self, model: str, keep_alive_s: float | None) -> None:
        r = self.table.models.get(model)
        if r is None:
            return
        r.last_used = self.clock()
        if keep_alive_s is not None:
            r.keep_alive_s = keep_alive_s

    def unload_now(self, name: str, why: str) -> None:
        """Stop its drivers and release its memory (the caller made sure it holds no requests)."""
        r = self.table.get(name)
        if r.state not in (Residency.LOADED, Residency.LOADING):
            return
        log.info("unloading model %s: %s", name, why)
        self._teardown(name)
        r.state = Residency.UNLOADED

    def _teardown(self, name: str, keep_driver_row: bool = False) -> None:
        engine = self.engines.pop(name, None)
        task = self.loops.pop(name, None)
        if task is not None:
            task.cancel()
        if engine is None:
            return
        pools = [p for p in (engine.pool, engine.host_pool) if p is not None]

        def release() -> None:   # once the model driver is gone: it maps them until it exits
            for pool in pools:
                pool.release()
        self.supervisor.remove(engine.tokenizer)
        if keep_driver_row:   # it failed and exited: `llmos ps` keeps showing it, with its last error
            release()
        else:
            self.supervisor.remove(engine.driver, on_exit=release)

    async def watch(self, interval: float = 0.5) -> None:
        """Unload models whose keep-alive ran out."""
        while True:
            await asyncio.sleep(interval)
            try:
                self._mark_busy()
                for name in self.table.expired(self.clock()):
                    self.unload_now(name, "keep-alive expired")
            except Exception:
                log.exception("model host: the idle check failed")

    def _mark_busy(self) -> None:
        busy = {r.model for r in self.front.table.values()} | self.front.parking.models()
        for r in self.table.models.values():
            r.busy = r.name in busy

    # ------------------------------------------------------------ estimates
    def _spec_of(self, name: str) -> str:
        """What its model driver loads: a registered model's active version is pinned now, so a
        restarted driver loads the same weights even if the registry moved on meanwhile."""
        if name in self.specs:
            return self.specs[name]
        try:
            entry = self.catalog.get(name)
        except Exception:
            return name
        return name if entry.builtin else f"{name}={entry.current.prepared}"

    def _default_keep_alive(self, name: str) -> float:
        try:
            registered = self.catalog.get(name).keep_alive_s if name not in self.specs else None
        except Exception:
            registered = None
        if registered is not None:
            return registered
        return FOREVER if name in self.specs else self.config.keep_alive_s

    def _weight_estimate(self, name: str) -> int:
        """Bytes its weights will take, from the registry's parameter count (0 if unknown)."""
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
