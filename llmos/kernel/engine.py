"""One served model inside the kernel: its KV pool, its scheduler and its step loop.

The loop reads aloud, and control flows one way:

    schedule -> plan -> send, await the result -> scheduler.update_from_output -> emit

`emit` hands the outputs (requests that progressed, requests that failed, as values) to
the front door; nothing calls back. Overlap: the progressed requests of step N are emitted
right after step N+1's plan is sent, so their detokenizing and delivery run while the
model driver computes N+1 instead of between the two steps (failures go at once). Safe
because N+1's plan needs only the scheduler's state, which update_from_output settled; the
front door only reads what it emits, and a request it ends meanwhile is one the scheduler
already knows to skip. If the model driver dies mid-step, or answers with a
result that does not fit its plan, the step is not applied (scheduler.step_lost): the
requests keep their tokens and blocks, and the step is planned again.

The front door asks the engine, never the scheduler: submit, stop (a stop string, a
cancel), drop (an abort), and the admission questions.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

from llmos import protocol
from llmos.kernel.blocks import BlockPool
from llmos.kernel.kv_events import chunk_hash
from llmos.kernel.kv_manager import KVCacheManager
from llmos.kernel.mem.geometry import KVGeometry, KVPool
from llmos.kernel.mem.pool import SharedKVPool, make_pool
from llmos.kernel.fcfs import FCFSPolicy
from llmos.kernel.outputs import EngineOutputs, Failure
from llmos.kernel.policy import Priority, PriorityPolicy, QuotaExceeded
from llmos.kernel import run_ahead
from llmos.kernel.requests import Request, State
from llmos.kernel.scheduler import ScheduledSeq, Scheduler
from llmos.kernel.stats import StepStats
from llmos.kernel.step_check import BadStepResult, check_result
from llmos.kernel.step_plan import build_plan
from llmos.kernel.stopping import StopRule
from llmos.kernel.swap import SwapSpace
from llmos.kernel.tenants import TenantBook
from llmos.kernel.waiting import wait_event

log = logging.getLogger(__name__)
MAX_BAD_RESULTS = 3   # invalid step results in a row before the step's requests fail
# Emit step N's progress after sending N+1's plan (module docstring). "0" turns it off, so
# benchmarks/step_gap.py can measure what it gives side by side.
EMIT_OVERLAP = os.environ.get("LLMOS_EMIT_OVERLAP", "1") != "0"


def make_policy(config):
    if config.scheduler == "fcfs":
        return FCFSPolicy()
    return PriorityPolicy(TenantBook(dict(config.tenants)))


class DriverLost(Exception):
    """The model driver went away while a step was in flight."""


class ModelEngine:
    def __init__(self, name: str, spec: str, config, kv_budget, send, on_outputs, model: str | None = None,
                 device: str = "cpu", kv_events=None):
        self.name, self.spec, self.config = name, spec, config   # name: the engine id (a replica, a version)
        self.kv_events = kv_events        # kv_events.KVEventStream, or None: the prefix cache is not published
        self.model = model or name        # the model's name, as requests give it
        self.device = device              # where its model driver runs and its pool lives
        self.driver = f"model-{name}"
        self.tokenizer = f"tokenizer-{name}"
        self._kv_budget = kv_budget       # (driver info, device) -> how this engine's pool is sized
        self.accounting: dict = {}
        self._send = send                 # (peer, message) -> None
        self._on_outputs = on_outputs     # (engine, EngineOutputs) -> None: the front door's intake
        self.info: protocol.ModelInfo | None = None   # from the model driver's Ready
        self.pool: KVPool | None = None
        self.host_pool: SharedKVPool | None = None
        self.scheduler: Scheduler | None = None
        self.driver_ready = False
        self.wakeup = asyncio.Event()
        self._pending: dict[int, tuple[asyncio.Future, int]] = {}   # step id -> (its result, its tokens)
        self._ahead: tuple[list[ScheduledSeq], protocol.StepPlan] | None = None   # sent ahead (run_ahead.py)
        self._ahead_void = False               # the step it follows was not applied: neither is it
        self._down_at: float | None = None     # when the model driver was lost, until the next step
        self._recomputed = 0                   # tokens of the steps lost with it
        self.recoveries: list[dict] = []       # per driver loss: recovery time, recomputed tokens
        self._step_id = 0
        self._ops_queued = False               # a step's copies/swaps are queued and not yet settled
        self._bad_results = 0                  # invalid results in a row (step_check)
        self.bad_results_total = 0
        self.step_crashes = 0                  # steps that raised inside the kernel
        self.stats = StepStats()
        self._held: list[Request] = []         # progressed in the last step, emitted after the next plan
        self._result_at: float | None = None   # when the last result arrived, if a step may follow at once

    # ------------------------------------------------------------ driver lifecycle
    @property
    def max_model_len(self) -> int:
        limit = self.info.max_model_len
        return min(limit, self.config.max_model_len) if self.config.max_model_len else limit

    @property
    def loaded(self) -> bool:
        """Whether the model driver has been up once (the pool and scheduler exist)."""
        return self.info is not None and self.scheduler is not None

    def driver_up(self, info: protocol.ModelInfo) -> None:
        """The model driver is loaded: create the pool once, then (re)map it."""
        self.info = info
        if self.pool is None:
            geo = KVGeometry(info.num_layers, info.num_kv_heads, info.head_dim, info.dtype, self.config.block_size)
            self.accounting = self._kv_budget(info, self.device)
            budget = self.accounting["kv_budget_bytes"]
            num_blocks = budget // geo.block_bytes
            if num_blocks < 2:
                raise RuntimeError(f"KV budget {budget} bytes holds fewer than 2 blocks of {geo.block_bytes}")
            self.pool = make_pool(self.name, geo, num_blocks, self.accounting.get("device", "cpu"))
            kv = self._kv_manager(num_blocks, geo.block_size)
            swap = None
            host_blocks = self.accounting.get("swap_budget_bytes", 0) // geo.block_bytes
            if host_blocks >= 1 and self.config.preemption_mode != "recompute":
                self.host_pool = SharedKVPool(f"{self.name}.host", geo, host_blocks)
                swap = SwapSpace(BlockPool(host_blocks, geo.block_size), geo.block_bytes,
                                 self.config.preemption_mode)
            stops = StopRule(frozenset(int(t) for t in info.eos_token_ids), self.max_model_len)
            self.scheduler = Scheduler(kv, self.config.max_num_seqs, self.config.max_batched_tokens,
                                       policy=make_policy(self.config), swap=swap, stop_rule=stops)
        g = self.pool.geometry
        self._send(self.driver, protocol.MapKVPool(
            path=str(self.pool.path), device=self.pool.device, dtype=g.dtype, num_blocks=self.pool.num_blocks,
            block_size=g.block_size, num_layers=g.num_layers, num_kv_heads=g.num_kv_heads, head_dim=g.head_dim,
            host_path=str(self.host_pool.path) if self.host_pool else None,
            host_blocks=self.host_pool.num_blocks if self.host_pool else 0, cuda_ipc=self.pool.ipc_handle()))

    def _kv_manager(self, num_blocks: int, block_size: int) -> KVCacheManager:
        blocks = BlockPool(num_blocks, block_size)
        if self.kv_events is None:
            return KVCacheManager(blocks, self.config.prefix_caching)
        blocks.events = self.kv_events.attach(self.name, self.model, block_size)   # named as llm-d names them
        return KVCacheManager(blocks, self.config.prefix_caching, chunk_hash, self.kv_events.root)

    def pool_mapped(self, error: str | None) -> None:
        if error:
            log.error("model driver %s could not map the KV pool: %s", self.driver, error)
            return
        self.driver_ready = True
        self.wakeup.set()

    def driver_down(self) -> None:
        self.driver_ready = False
        self._down_at = self._down_at or time.monotonic()
        for fut, tokens in self._pending.values():
            if not fut.done():
                self._recomputed += tokens  # that step's KV writes are redone by the new driver
                fut.set_exception(DriverLost())

    def step_result(self, msg) -> None:
        fut = self._pending.get(msg.step_id, (None, 0))[0]
        if fut is not None and not fut.done():
            fut.set_result(msg)

    # ------------------------------------------------------------ what the front door may ask
    def submit(self, req: Request) -> None:
        self.scheduler.add(req)
        self.wakeup.set()

    def stop(self, reqs: list[Request], reason: str) -> list[Request]:
        """End generation now for a reason found outside the step (a stop string in the
        text, a cancel): the one entry for it. Returns the requests ended; their final
        text is the caller's to deliver."""
        ended = self.scheduler.finish_requests(reqs, reason)
        self.wakeup.set()
        return ended

    def drop(self, req: Request) -> None:
        """Forget a request without output (its client went away): free its memory now."""
        if req.state in (State.WAITING, State.RUNNING):
            self.scheduler.finish(req)
            self.wakeup.set()

    def check_admission(self, tenant: str, now: float) -> QuotaExceeded | None:
        return self.scheduler.policy.check_admission(tenant, now)

    def parse_priority(self, value, tenant: str) -> Priority:
        return self.scheduler.policy.parse(value, tenant)

    @property
    def capacity(self) -> tuple[int, int]:
        """(blocks in the whole pool, tokens per block)."""
        return self.scheduler.pool.num_blocks, self.scheduler.pool.block_size

    # ------------------------------------------------------------ reports (read only)
    def policy_snapshot(self) -> dict:
        return self.scheduler.policy.snapshot(time.monotonic())

    def memory_report(self) -> protocol.MemoryReport:
        s, pool = self.scheduler, self.scheduler.pool
        return protocol.MemoryReport(
            device=self.pool.device, block_size=pool.block_size, blocks_total=pool.num_blocks,
            blocks_used=pool.num_used, blocks_free=pool.num_free, blocks_cached_free=pool.num_cached_free,
            blocks_shared=pool.num_shared, prefix_cache=s.kv.stats(), accounting=self.accounting,
            pool_bytes=self.pool.nbytes, swap=s.swap.stats() if s.swap else None, scheduler=self.policy_snapshot(),
            block_bytes=self.pool.geometry.block_bytes, preemptions=s.preemptions,
            requests={r.id: len(r.kv.blocks) for r in s.running + s.waiting},
            steps={**self.stats.to_dict(), "in_flight": len(self._pending)},
            recoveries=list(self.recoveries), integrity=self._integrity())

    def _integrity(self) -> str:
        try:
            self.scheduler.check_integrity()
            return "ok"
        except AssertionError as exc:
            log.error("model %s: KV pool integrity check failed: %s", self.name, exc)
            return f"broken: {exc}"

    # ------------------------------------------------------------ the loop
    async def run(self) -> None:
        """The step loop. A step that fails in any way fails that step's requests (500
        internal_error naming the cause); the loop goes on with the next one."""
        while True:
            if self._ahead is None:   # (a step sent ahead is taken at once, whoever is left in it)
                if not self._held:   # (held outputs go out now, or with the next plan: never wait on them)
                    await wait_event(self.wakeup, 0.5)   # at least every half second: deadlines expire
                if not (self.driver_ready and self.scheduler.has_work()):
                    self._release_held()
                    self.wakeup.clear()
                    continue
            batch: list[ScheduledSeq] = []
            try:
                t0 = time.perf_counter()
                self._end_expired()
                if self._ahead is not None:   # sent with the last step: its result is next
                    (batch, plan), void = self._ahead, self._ahead_void
                    self._ahead, self._ahead_void = None, False
                    await self._step(batch, t0, plan, void)
                    continue
                self._ops_queued = True   # schedule() may queue copies and swaps for this step
                batch = self.scheduler.schedule()
                if not batch:
                    self._release_held()
                    self.wakeup.clear()  # everything waits for memory; a finish will wake us
                    continue
                await self._step(batch, t0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._step_crashed(batch, exc)
                self._release_held()

    async def _step(self, batch: list[ScheduledSeq], t0: float, plan: protocol.StepPlan | None = None,
                    void: bool = False) -> None:
        """plan -> send, await -> check -> update -> emit, for one scheduled batch, or for the
        run-ahead `plan` sent with the step before (`void`: that step was not applied)."""
        sent = plan is not None
        if not sent:
            self._step_id += 1
            plan = build_plan(self._step_id, batch, self.scheduler.step_ops())
        try:
            result = await self._run_on_driver(plan, batch, sent, chain=not void)
        except DriverLost:
            log.warning("step %d lost with the model driver; it will be replayed", plan.step_id)
            self._lost()
            return
        t1 = time.perf_counter()
        if void:   # it follows a step that was not applied, so its input tokens are not theirs
            self._lost()
            return
        if isinstance(result, protocol.StepResult):
            try:
                check_result(plan, result, self.info.vocab_size)
            except BadStepResult as exc:
                return self._bad_result(batch, exc)
        self._bad_results = 0
        self._note_recovery()
        self._ops_queued = False
        if isinstance(result, protocol.StepFailed):
            self._ahead_void = True
            self.scheduler.step_done()
            self._fail([s.req for s in batch], f"model driver failed the step: {result.error}")
        else:
            self._fail_grammars(batch, result.grammar_errors)
            self._held = self.scheduler.update_from_output(batch, result)
            if not EMIT_OVERLAP:
                self._release_held()
            self._learn_speed(plan, result)
        self.stats.record(time.perf_counter() - t0, getattr(result, "forward_ms", 0.0) / 1e3,
                          sum(s.num_new for s in batch), t1)
        self._result_at = t1

    async def _run_on_driver(self, plan: protocol.StepPlan, batch: list[ScheduledSeq], sent: bool, chain: bool):
        """Send the plan (unless it went ahead already), send the next one ahead where that is
        safe, and wait for this one's StepResult or StepFailed (DriverLost if the driver dies)."""
        if not sent:
            self._send_plan(plan)
            if self._result_at is not None:   # the gap the model driver waited between two steps
                self.stats.record_gap(time.perf_counter() - self._result_at)
        if chain:
            self._send_ahead(batch, plan)
        self._release_held()   # the last step's progress, delivered while this one computes
        try:
            return await self._pending[plan.step_id][0]
        finally:
            del self._pending[plan.step_id]

    def _send_plan(self, plan: protocol.StepPlan) -> None:
        self._pending[plan.step_id] = (asyncio.get_running_loop().create_future(), len(plan.tokens))
        try:
            self._send(self.driver, plan)
        except BaseException:
            del self._pending[plan.step_id]
            raise

    def _send_ahead(self, batch: list[ScheduledSeq], plan: protocol.StepPlan) -> None:
        if not run_ahead.ENABLED or self._ahead is not None:
            return
        ahead = run_ahead.plan_ahead(self.scheduler, batch, plan)
        if ahead:
            self._step_id += 1
            nxt = run_ahead.build_ahead_plan(self._step_id, plan, ahead)
            self._send_plan(nxt)
            self._ahead, self._ahead_void = (ahead, nxt), False
            self.stats.ahead += 1

    def _emit(self, out: EngineOutputs) -> None:
        if out:
            self._on_outputs(self, out)

    def _release_held(self) -> None:
        """Emit the last step's progressed requests, once. Past this point the loop may idle,
        so the next step's gap is not the driver waiting on us."""
        held, self._held, self._result_at = self._held, [], None
        if held:
            self._emit(EngineOutputs(progressed=held))

    def _lost(self) -> None:
        self._ops_queued = False
        self._ahead_void = True   # a step sent ahead of this one is not applied either
        self.scheduler.step_lost()

    def _note_recovery(self) -> None:
        if self._down_at is not None:
            self.recoveries.append({"recovery_s": round(time.monotonic() - self._down_at, 3),
                                    "recomputed_tokens": self._recomputed})
            log.info("model %s recovered: %s", self.name, self.recoveries[-1])
            self._down_at, self._recomputed = None, 0

    def _bad_result(self, batch: list[ScheduledSeq], exc: BadStepResult) -> None:
        """A result that does not answer its plan is a lost step. A driver that keeps
        answering badly is not helped by replays: after MAX_BAD_RESULTS the step's requests fail."""
        self._ahead_void = True
        self._bad_results += 1
        self.bad_results_total += 1
        log.error("model driver %s: %s (%d in a row)", self.driver, exc, self._bad_results)
        self._lost()
        if self._bad_results >= MAX_BAD_RESULTS:
            self._bad_results = 0
            self._fail([s.req for s in batch], f"the model driver kept answering with invalid results: {exc}")

    def _step_crashed(self, batch: list[ScheduledSeq], exc: Exception) -> None:
        """An exception escaped scheduling, planning, sending or applying a step: fail that
        step's requests (or, if scheduling itself failed, every request this model holds,
        since none of them could be served) and keep the loop."""
        self.step_crashes += 1
        self._ahead_void = True   # what was sent ahead of the crashed step follows it
        log.exception("model %s: step crashed", self.name)
        victims = [s.req for s in batch] or list(self.scheduler.running + self.scheduler.waiting)
        try:
            if self._ops_queued:   # it never ran, or we cannot tell what of it was applied
                self._lost()
            self._fail(victims, f"internal error while running a step: {type(exc).__name__}: {exc}")
        except Exception:
            log.exception("model %s: could not fail the requests of a crashed step", self.name)

    def _learn_speed(self, plan, result) -> None:
        """Keep the swap-or-recompute estimate honest: measured tokens per second of the forward."""
        swap = self.scheduler.swap
        if swap is not None and result.forward_ms > 0 and len(plan.tokens) >= 16:
            tps = len(plan.tokens) / (result.forward_ms / 1e3)
            swap.recompute_tokens_per_s = 0.8 * swap.recompute_tokens_per_s + 0.2 * tps

    def _end_expired(self) -> None:
        """Requests past their deadline end with a clear error (408) and free their memory."""
        failed = []
        for req, reason in self.scheduler.find_expired():
            message = (f"request {req.id} expired: {reason} (waited {time.monotonic() - req.sched.arrival:.1f} s, "
                       f"{len(req.output.ids)} tokens generated)")
            failed += [(r, Failure(408, reason.replace(" ", "_"), message))
                       for r in self.scheduler.finish_requests([req], "error")]
        self._emit(EngineOutputs(failed=failed))

    def _fail_grammars(self, batch: list[ScheduledSeq], errors: list) -> None:
        """Sequences whose output grammar the driver could not build or follow end alone (400),
        before the step is applied: their token of this step is not theirs to keep."""
        if not errors:
            return
        by_seq = {s.req.seq_id: s.req for s in batch}
        failed = []
        for seq_id, message in errors:
            req = by_seq[seq_id]
            failure = Failure(400, "invalid_grammar", f"request {req.id}: the output grammar failed: {message}")
            failed += [(r, failure) for r in self.scheduler.finish_requests([req], "error")]
        self._emit(EngineOutputs(failed=failed))

    def _fail(self, reqs: list[Request], error: str) -> None:
        """End these requests with a 500 naming `error`; their memory is freed now."""
        log.error("step failed: %s", error)
        failure = Failure(500, "internal_error", error)
        self._emit(EngineOutputs(failed=[(r, failure) for r in self.scheduler.finish_requests(reqs, "error")]))
