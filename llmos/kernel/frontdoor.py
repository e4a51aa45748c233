"""The request table: admission, tokenizer round trips and outputs to the io driver.

Every request is in this table from the moment the kernel accepts its Submit until
its final output (or error) has been sent: a request is never silently dropped
(design.md, rule 5).
"""
from __future__ import annotations

import itertools
import logging
import time

from llmos import protocol
from llmos.kernel.requests import Request, State
from llmos.sampling_params import InvalidParam, SamplingParams

log = logging.getLogger(__name__)


class FrontDoor:
    def __init__(self, engines: dict, send, driver_state):
        self.engines = engines            # model name -> ModelEngine
        self._send = send                 # (peer, message)
        self._driver_state = driver_state  # driver name -> (state, last error or None)
        self.table: dict[str, Request] = {}
        self.by_seq: dict[int, Request] = {}
        self._seq_ids = itertools.count(1)
        self.draining = False
        self.tokenizer_epoch: dict[str, int] = {}   # tokenizer driver -> incarnation counter

    # ------------------------------------------------------------ io -> kernel
    def submit(self, peer: str, m: protocol.Submit) -> None:
        def reject(status, code, message, param=None, retry_after=None):
            self._send(peer, protocol.Rejected(request_id=m.request_id, status=status, code=code,
                                               message=message, param=param, retry_after=retry_after))
        if self.draining:
            return reject(503, "shutting_down", "the daemon is shutting down and admits no new requests")
        if m.request_id in self.table:
            return reject(400, "duplicate_request_id", f"request id {m.request_id!r} is already in flight")
        engine = self.engines.get(m.model)
        if engine is None:
            return reject(404, "model_not_found", f"The model '{m.model}' does not exist", "model")
        if engine.info is None or engine.scheduler is None:
            state, error = self._driver_state(engine.driver)
            return reject(503, "model_unavailable", f"model '{m.model}' is not loaded (driver {engine.driver} "
                          f"is {state}{': ' + error if error else ''})")
        try:
            params = SamplingParams.from_dict(m.params)
        except (InvalidParam, TypeError) as exc:
            return reject(400, "invalid_parameter", str(exc), getattr(exc, "param", "params"))
        policy = engine.scheduler.policy
        quota = policy.check_admission(m.tenant, time.monotonic())
        if quota is not None:
            return reject(429, "quota_exceeded", f"tenant '{m.tenant}' is over its {quota.limit} quota: "
                          f"{quota.reason}", None, retry_after=quota.retry_after_s)
        try:
            priority = policy.parse(m.priority, m.tenant)
        except InvalidParam as exc:
            return reject(400, "invalid_parameter", str(exc), "priority")
        for name in ("timeout_s", "queue_timeout_s"):
            value = getattr(m, name)
            if value is not None and not value > 0:
                return reject(400, "invalid_parameter", f"{name} must be positive", name.removesuffix("_s"))
        sources = [x is not None for x in (m.prompt, m.messages, m.prompt_token_ids)]
        if sum(sources) != 1:
            return reject(400, "invalid_prompt", "exactly one of prompt, messages, prompt_token_ids is required",
                          "prompt")
        cfg = engine.config
        req = Request(id=m.request_id, seq_id=next(self._seq_ids), model=m.model, tenant=m.tenant,
                      params=params, prompt=m.prompt, messages=m.messages, client=peer, priority=priority,
                      timeout_s=m.timeout_s or cfg.request_timeout_s,
                      queue_timeout_s=m.queue_timeout_s or cfg.queue_timeout_s)
        self.table[req.id] = req
        self.by_seq[req.seq_id] = req
        if m.prompt_token_ids is not None:
            ids = m.prompt_token_ids
            vocab = int(engine.info.get("vocab_size", 0))
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
                return self._end_with_error(req, 400, "invalid_prompt",
                                            f"prompt token ids must be integers in [0, {vocab})", "prompt")
            self._admit(req, list(ids))
        else:
            self._send(engine.tokenizer, protocol.Encode(request_id=req.id, prompt=m.prompt, messages=m.messages))

    def encoded(self, m: protocol.Encoded) -> None:
        req = self.table.get(m.request_id)
        if req is None or req.state is not State.TOKENIZING:
            return
        if m.error:
            return self._end_with_error(req, 400, "invalid_prompt", m.error, "messages" if req.messages else "prompt")
        self._admit(req, m.token_ids.tolist())

    def _admit(self, req: Request, prompt_ids: list[int]) -> None:
        engine = self.engines[req.model]
        n, ctx = len(prompt_ids), engine.max_model_len
        field = "messages" if req.messages is not None else "prompt"
        if n == 0:
            return self._end_with_error(req, 400, "invalid_prompt", "the prompt is empty (0 tokens)", field)
        if n >= ctx:
            return self._end_with_error(
                req, 400, "context_length_exceeded",
                f"This model's maximum context length is {ctx} tokens, but the prompt has {n} tokens "
                f"(at least one token must remain for the completion).", field)
        wanted = req.params.max_tokens
        if wanted is not None and n + wanted > ctx:
            return self._end_with_error(
                req, 400, "context_length_exceeded",
                f"This model's maximum context length is {ctx} tokens. However, you requested {n + wanted} "
                f"tokens ({n} in the prompt, {wanted} for the completion). Reduce the prompt or max_tokens.",
                "max_tokens")
        req.prompt_ids = prompt_ids
        req.max_tokens = wanted if wanted is not None else ctx - n
        pool = engine.scheduler.pool
        need = -(-(n + req.max_tokens) // pool.block_size)
        if need > pool.num_blocks:
            return self._end_with_error(
                req, 400, "kv_capacity_exceeded",
                f"prompt ({n} tokens) plus max_tokens ({req.max_tokens}) needs {need} KV blocks but the "
                f"whole pool has {pool.num_blocks}; lower max_tokens", "max_tokens")
        self._send(req.client, protocol.Accepted(request_id=req.id, prompt_tokens=n))
        engine.submit(req)

    def abort(self, m: protocol.Abort) -> None:
        req = self.table.get(m.request_id)
        if req is None:
            return
        log.info("abort %s: %s", req.id, m.reason)
        engine = self.engines[req.model]
        if req.state in (State.WAITING, State.RUNNING):
            engine.scheduler.finish(req)
            engine.wakeup.set()
        if req.detok_epoch == self.tokenizer_epoch.get(engine.tokenizer):
            self._send(engine.tokenizer, protocol.Detokenize(items=[{
                "rid": req.id, "ids": [], "prior": None, "lp": None, "stop": [], "finish": "abort"}]))
        self._forget(req)

    # ------------------------------------------------------------ model tokens -> tokenizer -> io
    def tokens_ready(self, engine, reqs: list[Request]) -> None:
        """Hand new output tokens (and finishes) to the tokenizer driver, in one message."""
        if self._driver_state(engine.tokenizer)[0] != "running":
            return  # held: a new incarnation gets everything from text_acked on when it is ready
        epoch = self.tokenizer_epoch.get(engine.tokenizer, 0)
        items = []
        for req in reqs:
            if req.error:
                self._end_with_error(req, req.error_status, req.error_code, req.error)
                continue
            prior = None
            if req.detok_epoch != epoch:   # this tokenizer has no state for us: resend the acked prefix
                prior, req.detok_sent, req.detok_epoch = req.output_ids[: req.text_acked], req.text_acked, epoch
            visible = len(req.output_ids) - (req.hidden_tail if req.finish_reason else 0)
            ids = req.output_ids[req.detok_sent:visible]
            lp = req.logprobs[req.detok_sent:visible] if req.params.logprobs is not None else None
            items.append({"rid": req.id, "ids": ids, "prior": prior, "lp": lp, "stop": req.params.stop,
                          "finish": req.finish_reason})
            req.detok_sent = len(req.output_ids)
        if items:
            self._send(engine.tokenizer, protocol.Detokenize(items=items))

    def text_deltas(self, m: protocol.TextDeltas) -> None:
        out: dict[str, list] = {}
        for item in m.items:
            try:
                rid, text, n, finish, stop_hit = item["rid"], item["text"], item["n"], item["finish"], item["stop_hit"]
            except (KeyError, TypeError):
                log.warning("dropped malformed TextDeltas item %r", item)
                continue
            req = self.table.get(rid)
            if req is None or req.state is State.DONE:
                continue
            start = req.text_acked
            req.text_acked += n
            if stop_hit and req.state is not State.FINISHING:
                self.engines[req.model].finish(req, "stop")
            final = req.finish_reason if (finish or stop_hit) else None
            # The final item also carries the hidden stop token, as transformers' generate returns it.
            ids = req.output_ids[start:] if final and not stop_hit else req.output_ids[start:start + n]
            usage = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.output_ids)} if final else None
            out.setdefault(req.client, []).append({"rid": rid, "text": text, "n": n, "ids": ids, "lp": item.get("lp"),
                                                   "finish": final, "usage": usage})
            if final:
                self._forget(req)
        for client, items in out.items():
            self._send(client, protocol.Outputs(items=items))

    # ------------------------------------------------------------ endings
    def _end_with_error(self, req: Request, status: int, code: str, message: str, param: str | None = None):
        engine = self.engines[req.model]
        if req.state in (State.WAITING, State.RUNNING):
            engine.scheduler.finish(req)
        self._send(req.client, protocol.Rejected(request_id=req.id, status=status, code=code,
                                                 message=message, param=param))
        self._forget(req)

    def _forget(self, req: Request) -> None:
        if req.state is not State.DONE:
            req.to(State.DONE)
        self.table.pop(req.id, None)
        self.by_seq.pop(req.seq_id, None)

    def fail_all(self, status: int, code: str, message: str) -> None:
        for req in list(self.table.values()):
            self._end_with_error(req, status, code, message)

    def tokenizer_restarted(self, engine) -> None:
        """A new tokenizer incarnation: re-send pending encodes and rebuild detok state."""
        self.tokenizer_epoch[engine.tokenizer] = self.tokenizer_epoch.get(engine.tokenizer, -1) + 1
        pending = []
        for req in self.table.values():
            if req.model != engine.name:
                continue
            if req.state is State.TOKENIZING:
                self._send(engine.tokenizer, protocol.Encode(request_id=req.id, prompt=req.prompt,
                                                             messages=req.messages))
            elif req.output_ids:
                pending.append(req)
        if pending:
            self.tokens_ready(engine, pending)
