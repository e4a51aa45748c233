"""The kernel: llmosd's main process. One event loop; it decides, drivers compute.

    receive a message -> route it (supervisor, front door, an engine) -> engines step on their own

Startup spawns, per model, a model driver (then, once it has prepared the model
directory, a tokenizer driver), and one io driver. Shutdown drains, then stops drivers
in reverse order and releases every shared-memory segment.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time

from llmos import protocol
from llmos.bus import KernelBus
from llmos.config import DaemonConfig
from llmos.kernel.engine import ModelEngine
from llmos.kernel.frontdoor import FrontDoor
from llmos.kernel.jobs import JobManager, JobStore
from llmos.kernel.jobs.manager import PEER as JOBS_PEER
from llmos.kernel.mem.device import cpu_memory, gpu_memories, select_device
from llmos.kernel.mem.pool import parse_memory, remove_stale_pools
from llmos.audit import AuditLog, audit_dir, key_file_setting, load_key
from llmos.kernel.access import Access
from llmos.kernel.alert_delivery import delivery_of
from llmos.kernel.alert_figures import KernelFigures
from llmos.kernel.alert_rules import rules_or_defaults
from llmos.kernel.alerts import Alerts
from llmos.kernel.answers import KernelAnswers, key_change
from llmos.kernel.auditing import Auditor
from llmos.kernel.auth import AuthError, Authority, KeyStore
from llmos.kernel.canary import PEER as CANARY_PEER, Canary
from llmos.kernel import request_log
from llmos.kernel.job_owners import JobOwners
from llmos.kernel.kv_events import KVEventStream
from llmos.kernel.metrics import Metrics
from llmos.kernel.model_commands import ModelCommands
from llmos.kernel.model_host import KnownModels, ModelHost
from llmos.kernel.upgrades import Upgrades
from llmos.kernel.registry_admin import RegistryAdmin
from llmos.kernel.reload import reload_config
from llmos.kernel.supervisor import DriverSpec, DState, Supervisor
from llmos.kernel.tokenize_queries import TokenizeQueries
from llmos.models.registry import prepared_model_dir
from llmos.paths import Paths
from llmos.service.notify import ServiceNotifier

log = logging.getLogger(__name__)
CUDA_CONTEXT_BYTES = 1 << 30   # left free on a GPU for the kernel's CUDA context and allocator slack


class Kernel(KernelAnswers):
    def __init__(self, config: DaemonConfig, paths: Paths):
        self.config, self.paths = config, paths
        self.device = select_device(config.device)
        log.info("serving on %s (%s)", self.device.device, self.device.name)
        self.started = time.monotonic()
        self.stopped = asyncio.Event()
        self.bus: KernelBus | None = None
        self.engines: dict[str, ModelEngine] = {}
        self.supervisor = Supervisor(paths.logs_dir, self._driver_ready, self._driver_down)
        self.front = FrontDoor(self.engines, self.send, self.supervisor.state_of)
        self.local_clients: dict = {}       # "@name" -> callable(message): in-kernel request sources
        # Command.what -> handler(args) -> data
        self.commands: dict = {"restart": self._restart_driver, "cancel": lambda a: self.front.cancel(a["id"]),
                               "keys.changed": key_change}   # the CLI edited keys.db: the audit log says so
        self.queries: dict = {}             # Query.what -> handler(args) -> data: read-only subsystem queries
        self.jobs: JobManager | None = None
        self.host = ModelHost(config, paths, self.engines, self.front, self.supervisor, self._new_engine,
                              self._load_specs, self._long_lived, self._kv_share, self._device_free,
                              self._engine_devices())
        self.canary = Canary(self.front.submit_to)
        self.local_clients[CANARY_PEER] = self.canary.deliver
        self.upgrades = Upgrades(self.host, self.canary)
        self.front.ensure_loaded, self.front.route, self.front.on_routed = self.host.ensure, self.host.route, \
            self.host.routed
        self.front.on_done = self._request_done
        self.auditor = Auditor(None)   # opened in run(), where the home is known to exist
        self.metrics = Metrics(self.engines, self.front, self.supervisor, lambda: self.jobs)
        self.front.on_rejected = self._rejected
        self.alert_delivery = delivery_of(config.alert_command, config.alert_webhook)   # (off the loop)
        self.alerts = Alerts(rules_or_defaults(config.alert_rules), self.alert_delivery.deliver)
        self.alert_figures = KernelFigures(self.metrics, self.host, lambda: self.jobs)
        self.model_commands = ModelCommands(self.host, self.upgrades, self.front)
        self.authority = Authority(KeyStore(paths.home / "keys.db"), os.getuid(), config.allow_local_users)
        self.access = Access(self.authority, open_too=set(TokenizeQueries.QUERIES))
        self.tokenize = TokenizeQueries(self.host, self.engines, self.send, self.supervisor.state_of)
        self.commands.update(self.model_commands.commands)
        self.queries.update(self.model_commands.queries)
        registry = RegistryAdmin(self.host.catalog, lambda n: self.host.state(n) in ("loading", "loaded", "unloading"),
                                 self.host.state, self.host.registry_changed)
        self.commands.update(registry.commands)
        self.queries.update(registry.queries)
        self.dead_loops: dict[str, str] = {}  # long-lived kernel loop -> why it ended (health: degraded)
        self.kv_events: KVEventStream | None = None   # --kv-events: the prefix cache published (kv_events.py)
        self.service = ServiceNotifier(self.health)   # systemd's Type=notify: READY=1, WATCHDOG=1, STOPPING=1

    def send(self, peer: str, msg) -> None:
        """Send to a driver over the bus, or to an in-kernel client (peer names starting with @)."""
        local = self.local_clients.get(peer)
        if local is not None:
            local(msg)
        else:
            self.bus.send(peer, msg)

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        self.paths.ensure()
        self.auditor = Auditor(self._open_audit())
        self.host.on_event = self.auditor.event   # loads, unloads, upgrades, rollbacks the kernel makes itself
        remove_stale_pools()
        self.bus = KernelBus(self.paths.kernel_endpoint)
        if self.config.kv_events_endpoint:   # before any engine: each one's pool reports from its first block
            self.kv_events = KVEventStream(self.config.kv_events_endpoint, self.config.kv_events_pod,
                                           self.config.kv_events_hash_seed)
        # The job store first: a storage key that does not open it must stop us before any driver starts.
        self.jobs = JobManager(JobStore(self.paths.jobs_db), self.front, self.engines, self.supervisor.is_running,
                               models=KnownModels(self.host), retention_days=self.config.job_retention_days)
        if self.auditor.audit is not None:   # prompts the operator asked to keep are sealed like the jobs'
            self.auditor.audit.seal = self.jobs.store.keys.seal
        self.host.preload()   # their model drivers start loading now
        self.local_clients[JOBS_PEER] = self.jobs.deliver
        self.commands.update(self.jobs.commands)
        self.queries.update(self.jobs.queries)
        self.access.open |= (set(self.jobs.commands) | set(self.jobs.queries)) - self.jobs.admin_only
        self.job_owners = JobOwners(self.paths.jobs_db)   # ...each principal its own (job_owners.py)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.shutdown()))
        loop.add_signal_handler(signal.SIGHUP, lambda: reload_config(self))   # re-read the config file
        self.supervisor.add(self._spec("io", "io", "llmos.drivers.io", "--socket", str(self.paths.api_socket),
                                       "--socket-mode", self.config.socket_mode,
                                       *(["--socket-group", self.config.socket_group] if self.config.socket_group else []),
                                       *(["--listen", self.config.listen] if self.config.listen else []),
                                       *(["--tls-cert", self.config.tls_cert, "--tls-key", self.config.tls_key]
                                         if self.config.tls_cert else []),
                                       "--timeout", str(self.config.first_answer_timeout)))
        loops = {"bus receiver": self._receive(), "supervisor": self.supervisor.watch(),
                 "job manager": self.jobs.run(),   # resumes unfinished jobs first
                 "model host": self.host.watch(), "service notifier": self.service.run(),
                 "alerts": self.alerts.run(self.alert_figures.read)}
        if self.kv_events is not None:
            loops["kv events"] = self.kv_events.run()
        tasks = [self._long_lived(name, coro) for name, coro in loops.items()]
        try:
            await self.stopped.wait()
        finally:
            for t in tasks:
                t.cancel()
            self._release()

    def _long_lived(self, name: str, coro) -> asyncio.Task:
        """A loop that must run as long as the kernel. Each one catches what one request or
        message can raise; if one ends anyway, the daemon says so on /health (degraded)
        rather than look healthy while it cannot serve."""
        task = asyncio.ensure_future(coro)

        def ended(t: asyncio.Task) -> None:
            if t.cancelled() or self.stopped.is_set() or self.front.draining:   # (shutting down)
                return
            exc = t.exception()
            why = f"{type(exc).__name__}: {exc}" if exc else "returned"
            log.critical("kernel loop %r ended: %s", name, why, exc_info=exc)
            self.dead_loops[name] = why
        task.add_done_callback(ended)
        return task

    def _new_engine(self, eid: str, model: str, spec: str, device: str) -> ModelEngine:
        return ModelEngine(eid, spec, self.config, self._kv_budget, self.send, self._engine_outputs, model, device,
                           kv_events=self.kv_events)

    def _engine_outputs(self, engine: ModelEngine, out) -> None:
        self.metrics.outputs(out)   # (first tokens and token gaps, before the front door ends any)
        self.front.engine_outputs(engine, out)

    def _engine_devices(self) -> list[str]:
        """Where engines run: --replica-devices ("all": every GPU), else the daemon's device."""
        wanted = self.config.replica_devices
        if wanted == ["all"]:
            return [g.device for g in gpu_memories()] or [self.device.device]
        return [select_device(d).device for d in wanted] or [self.device.device]

    def _rejected(self, m, principal, status: int, code: str) -> None:
        self.auditor.rejected(m, principal, status, code)
        request_log.rejected(m, principal, status, code)
        self.metrics.rejected(status, code)

    def _request_done(self, req, status: int | None) -> None:
        self.metrics.request_done(req, status)
        request_log.done(req, status)   # one JSON line: ids, tenant, model, status, tokens, times
        server_failed = status is not None and status >= 500
        self.host.request_done(req, server_failed)
        self.upgrades.request_done(req, server_failed)
        if req.group and req.group in self.front.groups:   # one record per client request
            self.auditor.choice_done(req)
        else:
            self.auditor.request(req, status)

    def _load_specs(self, engine: ModelEngine) -> list[DriverSpec]:
        """The drivers that start when `engine` loads: its model driver, and its tokenizer too
        when the model's files are ready (otherwise the tokenizer starts once the model driver
        has prepared them: _driver_ready). Each takes seconds to import and load, so side by
        side they are ready sooner."""
        specs = [self._spec(engine.driver, "model", "llmos.drivers.model", "--model", engine.spec, "--models-dir",
                            str(self.paths.models_dir), "--dtype", self.config.dtype, "--device", engine.device)]
        model_dir = prepared_model_dir(engine.spec, self.paths.models_dir, self.paths)
        if model_dir is not None:
            specs.append(self._tokenizer_spec(engine, str(model_dir)))
        return specs

    def _tokenizer_spec(self, engine: ModelEngine, model_dir: str) -> DriverSpec:
        return self._spec(engine.tokenizer, "tokenizer", "llmos.drivers.tokenizer", "--model-dir", model_dir)

    def _kv_share(self) -> int:
        """Bytes of KV one model gets, as far as it can be known before its load."""
        return parse_memory(self.config.kv_memory, self._device_free()) // self.config.max_loaded_models

    def _device_free(self) -> int:
        return select_device(self.device.device).available

    def _kv_budget(self, info: protocol.ModelInfo, device_name: str) -> dict:
        """Size a model's KV pool once its driver has loaded the weights: a fraction applies to
        the device memory still free now (weights and the driver's working memory already
        taken); each of the --max-loaded-models models gets an equal share."""
        device = select_device(device_name)
        share = self.config.max_loaded_models
        budget = parse_memory(self.config.kv_memory, device.available) // share
        if device.device != "cpu":   # the kernel's own CUDA context comes with its first pool
            budget = min(budget, max(0, device.available - CUDA_CONTEXT_BYTES) // share)
        swap = 0 if self.config.swap_memory in ("0", "") else \
            parse_memory(self.config.swap_memory, cpu_memory().available) // share
        return {"swap_budget_bytes": swap, "device": device.device, "device_total_bytes": device.total,
                "device_available_bytes": device.available, "weight_bytes": info.weight_bytes,
                "kv_budget_bytes": budget, "kv_memory": self.config.kv_memory}

    def _spec(self, name: str, role: str, module: str, *args: str) -> DriverSpec:
        argv = [sys.executable, "-m", module, "--endpoint", self.paths.kernel_endpoint, "--name", name, *args]
        return DriverSpec(name=name, role=role, argv=argv, max_restarts=self.config.max_restarts,
                          fail_fast_start=True)

    async def shutdown(self) -> None:
        """SIGTERM: stop admitting, drain up to the timeout, stop drivers in reverse order."""
        if self.front.draining:
            return
        log.info("shutting down: draining %d request(s)", len(self.front.table))
        self.front.draining = True
        self.service.stopping()
        deadline = time.monotonic() + self.config.drain_timeout
        while self.front.table and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.front.fail_all(503, "shutting_down", "the daemon shut down before this request finished")
        await asyncio.sleep(0.1)  # let the io driver deliver those errors
        await self.supervisor.stop_all()
        self.stopped.set()

    def _open_audit(self):
        kp = key_file_setting(self.config.audit_key_file)
        return AuditLog(audit_dir(self.paths.home), hmac_key=load_key(kp) if kp else None,
                        record_prompts=self.config.audit_record_prompts)

    def _release(self) -> None:
        self.alert_delivery.close()
        if self.jobs is not None:
            self.jobs.close()
        self.auditor.close()
        for engine in self.engines.values():
            for pool in (engine.pool, engine.host_pool):
                if pool is not None:
                    pool.release()
        if self.kv_events is not None:
            self.kv_events.close()
        if self.bus is not None:
            self.bus.close()

    # ------------------------------------------------------------ drivers
    def _driver_ready(self, name: str, info) -> None:
        """`info`: a ModelInfo from a model driver, a TokenizerInfo from a tokenizer (checked by
        the supervisor against the driver's role)."""
        for engine in self.engines.values():
            if name == engine.driver:
                try:
                    engine.driver_up(info)
                except Exception as exc:  # e.g. a budget too small for the model
                    log.error("model %s cannot be served: %s", engine.name, exc)
                    self.supervisor.driver_error(name, str(exc))
                    self.host.failed(engine.name, str(exc))
                    return
                if engine.tokenizer not in self.supervisor.table:
                    self.supervisor.add(self._tokenizer_spec(engine, info.model_dir))
                self.host.ready(engine.name)
                return
            elif name == engine.tokenizer:
                self.front.tokenizer_restarted(engine)

    def _driver_down(self, name: str) -> None:
        self.tokenize.tokenizer_down(name)   # its pending queries answer 503 now
        for engine in list(self.engines.values()):
            if name == engine.driver:
                engine.driver_down()
                d = self.supervisor.table.get(name)
                if d is not None and d.state is DState.FAILED and not engine.loaded:   # it never loaded
                    self.host.failed(engine.name, d.last_error or "its driver failed")
        # The requests of a dead io driver have no client any more: free them now.
        for req in [r for r in self.front.table.values() if r.client == name]:
            self.front.abort(protocol.Abort(request_id=req.id, reason=f"{name} driver died"))

    # ------------------------------------------------------------ the bus
    async def _receive(self) -> None:
        while True:
            peer, msg = await self.bus.recv()   # (any frame that fails to decode is a BadMessage, dropped)
            try:
                self._dispatch(peer, msg)
            except Exception as exc:  # one bad message must not stop the kernel
                self.bus.rejected += 1
                log.exception("error handling %s from %s", type(msg).__name__, peer)
                if isinstance(msg, protocol.Submit):   # its client waits: a request is never silently dropped
                    self._reject_submit(peer, msg, exc)

    def _reject_submit(self, peer: str, m: protocol.Submit, exc: Exception) -> None:
        try:
            self.front.forget_failed_submit(m.request_id)
            self.send(peer, protocol.Rejected(request_id=m.request_id, status=500, code="internal_error", param=None,
                                              message=f"internal error while admitting the request: "
                                                      f"{type(exc).__name__}: {exc}"))
        except Exception:
            log.exception("could not answer the failed submit %.64r", m.request_id)

    def _dispatch(self, peer: str, m) -> None:
        if isinstance(m, protocol.StepResult) or isinstance(m, protocol.StepFailed):
            engine = self._engine_of(peer)
            if engine:
                engine.step_result(m)
        elif isinstance(m, protocol.TextDeltas):
            self.front.text_deltas(m)
        elif isinstance(m, protocol.Submit):
            try:
                principal = self.access.submit(m)
            except AuthError as exc:
                self.auditor.auth_failure("submit", m.auth, str(exc))
                self.metrics.rejected(exc.status, "invalid_api_key")
                return self.send(peer, protocol.Rejected(request_id=m.request_id, status=exc.status, param=None,
                                                         code="invalid_api_key", message=str(exc)))
            self.front.submit(peer, m, principal)
        elif isinstance(m, protocol.Encoded):
            if not self.tokenize.encoded(peer, m):   # a /tokenize query's, else a generation request's
                self.front.encoded(m)
        elif isinstance(m, protocol.Decoded):
            self.tokenize.decoded(peer, m)
        elif isinstance(m, protocol.Abort):
            self.front.abort(m)
        elif isinstance(m, (protocol.Query, protocol.Command)):
            self._answer(peer, m)
        elif isinstance(m, protocol.Heartbeat):
            self.supervisor.heartbeat(m.name)
        elif isinstance(m, protocol.Ready) and m.name == peer:
            self.supervisor.ready(m.name, m.info)
        elif isinstance(m, protocol.PoolMapped):
            engine = self._engine_of(peer)
            if engine:
                engine.pool_mapped(m.error)
        elif isinstance(m, protocol.DriverError) and m.name == peer:
            self.supervisor.driver_error(m.name, m.error)
        elif isinstance(m, protocol.Hello):
            log.info("hello from %s (%s, pid %d)", m.name, m.role, m.pid)
        else:
            self.bus.rejected += 1
            log.warning("unexpected %s from %s", type(m).__name__, peer)

    def _engine_of(self, peer: str) -> ModelEngine | None:
        return next((e for e in self.engines.values() if e.driver == peer), None)
