"""One served model inside the kernel: its KV pool, its scheduler and its step loop.

The loop reads aloud: schedule -> send the step plan -> await the result -> apply it
(append tokens, check stops, free finished requests) -> hand new tokens to the tokenizer.
If the model driver dies mid-step, the step is simply not applied: the requests keep
their tokens and blocks, and the same plan is rebuilt for the restarted driver.
"""
from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from llmos import protocol
from llmos.kernel.blocks import BlockPool
from llmos.kernel.kv_manager import KVCacheManager
from llmos.kernel.mem.geometry import KVGeometry, KVPool
from llmos.kernel.mem.pool import SharedKVPool, make_pool
from llmos.kernel.requests import Request, State
from llmos.kernel.policy import PriorityPolicy
from llmos.kernel.scheduler import FCFSPolicy, ScheduledSeq, Scheduler
from llmos.kernel.tenants import TenantBook
from llmos.kernel.swap import SwapSpace
from llmos.kernel.stats import StepStats
from llmos.kernel.step_check import BadStepResult, check_result

log = logging.getLogger(__name__)
MAX_BAD_RESULTS = 3   # invalid step results in a row before the step's requests fail


def make_policy(config):
    if config.scheduler == "fcfs":
        return FCFSPolicy()
    return PriorityPolicy(TenantBook(dict(config.tenants)))


class DriverLost(Exception):
    """The model driver went away while a step was in flight."""


class ModelEngine:
    def __init__(self, name: str, spec: str, config, kv_budget, send, on_tokens):
        self.name, self.spec, self.config = name, spec, config
        self.driver = f"model-{name}"
        self.tokenizer = f"tokenizer-{name}"
        self._kv_budget = kv_budget       # (driver info) -> bytes for this model's pool
        self.accounting: dict = {}
        self._send = send                 # (peer, message) -> None
        self._on_tokens = on_tokens       # (engine, [Request]) -> None: new tokens to detokenize
        self.info: dict | None = None
        self.pool: KVPool | None = None
        self.host_pool: SharedKVPool | None = None
        self.scheduler: Scheduler | None = None
        self.driver_ready = False
        self.wakeup = asyncio.Event()
        self._pending: tuple[int, asyncio.Future] | None = None
        self._pending_tokens = 0
        self._down_at: float | None = None     # when the model driver was lost, until the next step
        self._recomputed = 0                   # tokens of the steps lost with it
        self.recoveries: list[dict] = []       # per driver loss: recovery time, recomputed tokens
        self._step_id = 0
        self._ops_queued = False               # a step's copies/swaps are queued and not yet settled
        self._bad_results = 0                  # invalid results in a row (step_check)
        self.bad_results_total = 0
        self.step_crashes = 0                  # steps that raised inside the kernel
        self._eos: frozenset[int] = frozenset()
        self.stats = StepStats()

    # ------------------------------------------------------------ driver lifecycle
    @property
    def max_model_len(self) -> int:
        limit = int(self.info["max_model_len"])
        return min(limit, self.config.max_model_len) if self.config.max_model_len else limit

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos

    def driver_up(self, info: dict) -> None:
        """The model driver is loaded: create the pool once, then (re)map it."""
        self.info = info
        self._eos = frozenset(int(t) for t in info.get("eos_token_ids") or [])
        if self.pool is None:
            geo = KVGeometry(int(info["num_layers"]), int(info["num_kv_heads"]), int(info["head_dim"]),
                             str(info["dtype"]), self.config.block_size)
            self.accounting = self._kv_budget(info)
            budget = self.accounting["kv_budget_bytes"]
            num_blocks = budget // geo.block_bytes
            if num_blocks < 2:
                raise RuntimeError(f"KV budget {budget} bytes holds fewer than 2 blocks of {geo.block_bytes}")
            self.pool = make_pool(self.name, geo, num_blocks, self.accounting.get("device", "cpu"))
            kv = KVCacheManager(BlockPool(num_blocks, geo.block_size), self.config.prefix_caching)
            swap = None
            host_blocks = self.accounting.get("swap_budget_bytes", 0) // geo.block_bytes
            if host_blocks >= 1 and self.config.preemption_mode != "recompute":
                self.host_pool = SharedKVPool(f"{self.name}.host", geo, host_blocks)
                swap = SwapSpace(BlockPool(host_blocks, geo.block_size), geo.block_bytes,
                                 self.config.preemption_mode)
            self.scheduler = Scheduler(kv, self.config.max_num_seqs, self.config.max_batched_tokens,
                                       policy=make_policy(self.config), swap=swap)
        g = self.pool.geometry
        self._send(self.driver, protocol.MapKVPool(
            path=str(self.pool.path), device=self.pool.device, dtype=g.dtype, num_blocks=self.pool.num_blocks,
            block_size=g.block_size, num_layers=g.num_layers, num_kv_heads=g.num_kv_heads, head_dim=g.head_dim,
            host_path=str(self.host_pool.path) if self.host_pool else None,
            host_blocks=self.host_pool.num_blocks if self.host_pool else 0, cuda_ipc=self.pool.ipc_handle()))

    def pool_mapped(self, error: str | None) -> None:
        if error:
            log.error("model driver %s could not map the KV pool: %s", self.driver, error)
            return
        self.driver_ready = True
        self.wakeup.set()

    def driver_down(self) -> None:
        self.driver_ready = False
        self._down_at = self._down_at or time.monotonic()
        if self._pending and not self._pending[1].done():
            self._recomputed += self._pending_tokens  # that step's KV writes are redone by the new driver
            self._pending[1].set_exception(DriverLost())

    def step_result(self, msg) -> None:
        if self._pending and self._pending[0] == msg.step_id and not self._pending[1].done():
            self._pending[1].set_result(msg)

    # ------------------------------------------------------------ the loop
    def submit(self, req: Request) -> None:
        self.scheduler.add(req)
        self.wakeup.set()

    async def run(self) -> None:
        """The step loop. A step that fails in any way fails that step's requests (500
        internal_error naming the cause); the loop goes on with the next one."""
        while True:
            try:  # wake at least every half second: deadlines expire even when nothing moves
                await asyncio.wait_for(self.wakeup.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            if not (self.driver_ready and self.scheduler.has_work()):
                self.wakeup.clear()
                continue
            batch: list[ScheduledSeq] = []
            try:
                t0 = time.perf_counter()
                self._end_expired()
                self._ops_queued = True   # schedule() may queue copies and swaps for this step
                batch = self.scheduler.schedule()
                if not batch:
                    self.wakeup.clear()  # everything waits for memory; a finish will wake us
                    continue
                await self._step(batch, t0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._step_crashed(batch, exc)

    async def _step(self, batch: list[ScheduledSeq], t0: float) -> None:
        """Plan, send, await, check and apply one step."""
        plan = self._plan(batch)
        fut = asyncio.get_running_loop().create_future()
        self._pending = (plan.step_id, fut)
        self._pending_tokens = len(plan.tokens)
        try:
            self._send(self.driver, plan)
            result = await fut
        except DriverLost:
            log.warning("step %d lost with the model driver; it will be replayed", plan.step_id)
            self._rollback()
            return
        finally:
            self._pending = None
        t1 = time.perf_counter()
        if isinstance(result, protocol.StepResult):
            try:
                check_result(plan, result, int(self.info.get("vocab_size") or 0))
            except BadStepResult as exc:
                self._bad_result(batch, exc)
                return
        self._bad_results = 0
        if self._down_at is not None:
            self.recoveries.append({"recovery_s": round(time.monotonic() - self._down_at, 3),
                                    "recomputed_tokens": self._recomputed})
            log.info("model %s recovered: %s", self.name, self.recoveries[-1])
            self._down_at, self._recomputed = None, 0
        if self.scheduler.swap:
            self.scheduler.swap.step_done()
        self.scheduler.kv.step_done()
        self._ops_queued = False
        if isinstance(result, protocol.StepFailed):
            self._fail(batch, f"model driver failed the step: {result.error}")
        else:
            self._apply(batch, result)
            self._learn_speed(plan, result)
        self.stats.record(time.perf_counter() - t0, getattr(result, "forward_ms", 0.0) / 1e3,
                          sum(s.num_new for s in batch), t1)

    def _rollback(self) -> None:
        """The step did not run (or its result is not trusted): undo what it queued, as
        for a driver lost mid-step; the requests keep their tokens and are planned again."""
        self._ops_queued = False
        if self.scheduler.swap:
            self.scheduler.swap.step_lost()
        self.scheduler.kv.step_lost()

    def _bad_result(self, batch: list[ScheduledSeq], exc: BadStepResult) -> None:
        """A result that does not answer its plan is a lost step. A driver that keeps
        answering badly is not helped by replays: after MAX_BAD_RESULTS the step's requests fail."""
        self._bad_results += 1
        self.bad_results_total += 1
        log.error("model driver %s: %s (%d in a row)", self.driver, exc, self._bad_results)
        self._rollback()
        if self._bad_results >= MAX_BAD_RESULTS:
            self._bad_results = 0
            self._fail(batch, f"the model driver kept answering with invalid results: {exc}")

    def _step_crashed(self, batch: list[ScheduledSeq], exc: Exception) -> None:
        """An exception escaped planning, sending or applying a step: fail that step's
        requests (or, if scheduling itself failed, every request this model holds, since
        none of them could be served) and keep the loop."""
        self.step_crashes += 1
        log.exception("model %s: step crashed", self.name)
        victims = [s.req for s in batch] or list(self.scheduler.running + self.scheduler.waiting)
        cause = f"internal error while running a step: {type(exc).__name__}: {exc}"
        try:
            if self._ops_queued:   # it never ran, or we cannot tell what of it was applied
                self._rollback()
            self._fail_requests(victims, cause)
        except Exception:
            log.exception("model %s: could not fail the requests of a crashed step", self.name)

    def _learn_speed(self, plan, result) -> None:
        """Keep the swap-or-recompute estimate honest: measured tokens per second of the forward."""
        swap = self.scheduler.swap
        if swap is not None and result.forward_ms > 0 and len(plan.tokens) >= 16:
            tps = len(plan.tokens) / (result.forward_ms / 1e3)
            swap.recompute_tokens_per_s = 0.8 * swap.recompute_tokens_per_s + 0.2 * tps

    def _plan(self, batch: list[ScheduledSeq]) -> protocol.StepPlan:
        self._step_id += 1
        width = max(len(s.req.blocks) for s in batch)
        tables = np.full((len(batch), width), -1, dtype=np.int32)
        tokens = []
        for i, s in enumerate(batch):
            tables[i, : len(s.req.blocks)] = s.req.blocks
            tokens.extend(s.req.token_at(s.req.num_computed, s.req.num_computed + s.num_new))
        p = [s.req.params for s in batch]
        return protocol.StepPlan(
            step_id=self._step_id,
            seq_ids=protocol.i32([s.req.seq_id for s in batch]),
            num_new=protocol.i32([s.num_new for s in batch]),
            start_pos=protocol.i32([s.req.num_computed for s in batch]),
            tokens=protocol.i32(tokens),
            block_tables=tables,
            sample=protocol.i32([s.sample for s in batch]),
            temperature=np.asarray([x.temperature for x in p], dtype=np.float32),
            top_p=np.asarray([x.top_p for x in p], dtype=np.float32),
            top_k=protocol.i32([x.top_k for x in p]),
            seed=np.asarray([-1 if x.seed is None else x.seed & (2**62 - 1) for x in p], dtype=np.int64),
            gen_index=protocol.i32([len(s.req.output_ids) for s in batch]),
            top_logprobs=protocol.i32([-1 if x.logprobs is None else x.logprobs for x in p]),
            copy=_pairs(self.scheduler.kv.copy_ops()),
            **self._swap_ops(),
        )

    def _swap_ops(self) -> dict:
        if self.scheduler.swap is None:
            return {}
        out, inn = self.scheduler.swap.ops()
        return {"swap_out": _pairs(out), "swap_in": _pairs(inn)}

    def _apply(self, batch: list[ScheduledSeq], result) -> None:
        sampled = iter(range(len(result.tokens)))
        changed = []
        now = time.monotonic()
        for s in batch:
            i = next(sampled) if s.sample else None
            req = s.req
            if req.state is not State.RUNNING:
                continue  # aborted while the step ran; its blocks are already free
            req.num_computed += s.num_new
            self.scheduler.kv.commit(req)
            if i is None:
                continue
            if req.forks:   # the prompt is in the pool: the other choices share it from here
                self.scheduler.fork_choices(req)
            token = int(result.tokens[i])
            req.output_ids.append(token)
            if req.params.logprobs is not None:
                k = req.params.logprobs
                top = [[int(t), float(v)] for t, v in zip(result.top_ids[i][:k], result.top_lps[i][:k])]
                req.logprobs.append([float(result.logprobs[i]), top])
            req.first_token_at = req.first_token_at or now
            reason = self._finish_reason(req, token)
            if reason:
                self.finish(req, reason)
            changed.append(req)
        if changed:
            self._on_tokens(self, changed)

    def _finish_reason(self, req: Request, token: int) -> str | None:
        p = req.params
        n = len(req.output_ids)
        if n >= p.min_tokens and (token in p.stop_id_set or (not p.ignore_eos and token in self.eos_ids)):
            req.hidden_tail = 1  # the stop token itself is not part of the text
            return "stop"
        if n >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def finish(self, req: Request, reason: str) -> None:
        """Stop generating: free the blocks now; the final text is still on its way."""
        self.scheduler.finish(req)
        req.finish_reason = reason
        req.to(State.FINISHING)
        self.wakeup.set()

    def _end_expired(self) -> None:
        """Requests past their deadline end with a clear error and free their memory."""
        ended = []
        for req, reason in self.scheduler.find_expired():
            if req.state in (State.WAITING, State.RUNNING):
                req.error, req.error_status, req.error_code = (
                    f"request {req.id} expired: {reason} (waited {time.monotonic() - req.arrival:.1f} s, "
                    f"{len(req.output_ids)} tokens generated)", 408, reason.replace(" ", "_"))
                self.finish(req, "error")
                ended.append(req)
        if ended:
            self._on_tokens(self, ended)

    def _fail(self, batch: list[ScheduledSeq], error: str) -> None:
        self._fail_requests([s.req for s in batch], error)

    def _fail_requests(self, reqs: list[Request], error: str) -> None:
        """End these requests with a 500 naming `error`; their memory is freed now."""
        log.error("step failed: %s", error)
        failed = []
        for req in reqs:
            if req.state in (State.WAITING, State.RUNNING):
                req.error, req.error_status, req.error_code = error, 500, "internal_error"
                self.finish(req, "error")
                failed.append(req)
        if failed:
            self._on_tokens(self, failed)


def _pairs(pairs: list) -> np.ndarray:
    return np.asarray(pairs, dtype=np.int32).reshape(-1, 2)
