"""The request table: admission, tokenizer round trips and outputs to the io driver.

Every request is in this table from the moment the kernel accepts its Submit until
its final output (or error) has been sent: a request is never silently dropped
(design.md, rule 5).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time

from llmos import names, protocol
from llmos.kernel.auth import KERNEL, Principal
from llmos.kernel.requests import Request, SchedState, State
from llmos.kernel.admission import check_submit
from llmos.kernel.blocks import blocks_needed
from llmos.kernel.parking import Parking
from llmos.sampling_params import InvalidParam

log = logging.getLogger(__name__)
MAX_IN_FLIGHT = 10_000   # requests in the table (each choice counts); past it new ones get a 503


class FrontDoor:
    def __init__(self, engines: dict, send, driver_state):
        self.engines = engines            # model name -> ModelEngine
        self._send = send                 # (peer, message)
        self._driver_state = driver_state  # driver name -> (state, last error or None)
        self.table: dict[str, Request] = {}
        self.groups: dict[str, list[Request]] = {}   # n > 1: client id -> its choices still in the table
        self.named: dict[tuple[str, str], str] = {}   # (owner, the client's X-Request-Id) -> our request id
        self._seq_ids = itertools.count(1)
        self.draining = False
        self.tokenizer_epoch: dict[str, int] = {}   # tokenizer driver -> incarnation counter
        self.parking = Parking()          # submits waiting for their model to load
        # Set by the kernel (model_host.py): start loading a model that is not in memory, or say
        # why not; and hear of each request's end (keep-alive counts from the last one).
        self.ensure_loaded = lambda model: (404, f"The model '{model:.256}' does not exist")
        self.route = lambda m: self.engines.get(m.model)   # the engine (replica) a Submit goes to
        self.on_routed = lambda req, m: None
        self.on_done = lambda req, status: None   # status: 200, the error's, or None (the client left)
        self.on_rejected = lambda m, principal, status, code: None

    # ------------------------------------------------------------ io -> kernel
    def submit(self, peer: str, m: protocol.Submit, principal: Principal = KERNEL) -> None:
        """Admit or refuse one Submit from `principal` (in-kernel clients are KERNEL).
        Whatever goes wrong in here fails this request alone."""
        try:
            self._submit(peer, m, principal=principal)
        except Exception as exc:
            log.exception("submit %.64r failed", m.request_id)
            cause = f"internal error while admitting the request: {type(exc).__name__}: {exc}"
            req = self.table.get(m.request_id)
            if req is not None and req.state is not State.DONE:
                self._end_with_error(req, 500, "internal_error", cause)
            elif m.request_id not in self.table and m.request_id not in self.groups:
                self._send(peer, protocol.Rejected(request_id=m.request_id, status=500, code="internal_error",
                                                   message=cause, param=None))

    def submit_to(self, engine_id: str, peer: str, m: protocol.Submit) -> None:
        """Submit to one engine, bypassing routing (an upgrade's canary)."""
        self._submit(peer, m, self.engines.get(engine_id))

    def _submit(self, peer: str, m: protocol.Submit, pinned=None, principal: Principal = KERNEL) -> None:
        def reject(status, code, message, param=None, retry_after=None):
            self.on_rejected(m, principal, status, code)
            self._send(peer, protocol.Rejected(request_id=m.request_id, status=status, code=code,
                                               message=message, param=param, retry_after=retry_after))
        if self.draining:
            return reject(503, "shutting_down", "the daemon is shutting down and admits no new requests")
        if self._live(m.request_id) and m.request_id not in self.parking:   # (a parked one comes back)
            return reject(400, "duplicate_request_id", f"request id {m.request_id!r:.300} is already in flight")
        name = m.client_request_id
        if name is not None:   # the client's own id: one namespace per principal, so it reveals nothing
            if not isinstance(name, str) or not 1 <= len(name) <= 128:
                return reject(400, "invalid_parameter", "X-Request-Id must be 1 to 128 characters", "X-Request-Id")
            holder = self.named.get((principal.name, name))
            if holder is not None and holder != m.request_id and self._live(holder):
                return reject(409, "duplicate_request_id", f"request id {name!r} is already in flight",
                              "X-Request-Id")
            self._name(principal.name, name, m.request_id)
        if not principal.may_use(m.model):
            return reject(403, "permission_denied", f"{principal.name} may not use model '{m.model:.256}'", "model")
        tenant = m.tenant
        if principal.tenant is not None:   # a key's tenant: the body may only repeat it
            if m.tenant not in (principal.tenant, "local"):
                return reject(403, "permission_denied", f"{principal.name} is tenant '{principal.tenant}', "
                              f"not '{m.tenant:.64}'", "tenant")
            tenant = principal.tenant
        engine = pinned or self.route(m)
        if engine is None or not engine.loaded:   # cold or loading: wait for it (release())
            refusal = self.ensure_loaded(m.model)
            if refusal is not None:
                status, message = refusal
                return reject(status, "model_not_found" if status == 404 else "model_unavailable", message,
                              "model" if status == 404 else None)
            if not self.parking.park(peer, m, principal):
                return reject(503, "server_busy", f"{len(self.parking)} requests already wait for models to "
                              "load; try again later", retry_after=1.0)
            return
        try:   # the io driver checked all of this; the kernel never trusts a driver
            params = check_submit(m, engine.max_model_len, engine.info.vocab_size)
        except InvalidParam as exc:
            return reject(400, exc.code, str(exc), exc.param)
        if len(self.table) + m.n > MAX_IN_FLIGHT:
            return reject(503, "server_busy", f"the daemon holds {len(self.table)} requests, its limit is "
                          f"{MAX_IN_FLIGHT}; try again later", retry_after=1.0)
        quota = engine.check_admission(tenant, time.monotonic())
        if quota is not None:
            return reject(429, "quota_exceeded", f"tenant '{tenant}' is over its {quota.limit} quota: "
                          f"{quota.reason}", None, retry_after=quota.retry_after_s)
        try:
            priority = engine.parse_priority(m.priority, tenant)
        except InvalidParam as exc:
            return reject(400, "invalid_parameter", str(exc), "priority")
        if priority.klass < principal.max_class:
            return reject(403, "permission_denied", f"{principal.name} may ask for {names.PRIORITY_CLASSES[principal.max_class]} "
                          f"priority at most, not {priority.class_name}", "priority")
        cfg = engine.config
        req = Request(id=m.request_id, seq_id=next(self._seq_ids), model=m.model, tenant=tenant, owner=principal.name,
                      client_request_id=m.client_request_id,
                      params=params, prompt=m.prompt, messages=m.messages, tools=m.tools, client=peer,
                      priority=priority,
                      keep_alive_s=m.keep_alive_s, engine=engine.name,
                      sched=SchedState(timeout_s=m.timeout_s or cfg.request_timeout_s,
                                       queue_timeout_s=m.queue_timeout_s or cfg.queue_timeout_s))
        self._enter(req)
        self.on_routed(req, m)
        if m.n > 1:   # the other choices are made once the prompt is tokenized (_admit)
            req.group, self.groups[req.id] = req.id, [req]
            req.forks = [None] * (m.n - 1)
        if m.prompt_token_ids is not None:
            self._admit(req, m.prompt_token_ids)   # (check_submit bounded its length and ids)
        else:
            self._send(engine.tokenizer, protocol.Encode(request_id=req.id, prompt=m.prompt, messages=m.messages,
                                                         tools=m.tools))

    def encoded(self, m: protocol.Encoded) -> None:
        req = self.table.get(m.request_id)
        if req is None or req.state is not State.TOKENIZING:
            return
        if m.error:
            return self._end_with_error(req, 400, "invalid_prompt", m.error, "messages" if req.messages else "prompt")
        self._admit(req, m.token_ids.tolist())

    def _admit(self, req: Request, prompt_ids: list[int]) -> None:
        engine = self.engines[req.engine]
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
        num_blocks, block_size = engine.capacity
        need = blocks_needed(n + req.max_tokens, block_size)
        if need > num_blocks:
            return self._end_with_error(
                req, 400, "kv_capacity_exceeded",
                f"prompt ({n} tokens) plus max_tokens ({req.max_tokens}) needs {need} KV blocks but the "
                f"whole pool has {num_blocks}; lower max_tokens", "max_tokens")
        self._send(req.client, protocol.Accepted(request_id=req.id, prompt_tokens=n))
        if req.forks:
            req.forks = [self._choice(req, i) for i in range(1, len(req.forks) + 1)]
        engine.submit(req)

    def _enter(self, req: Request) -> None:
        self.table[req.id] = req

    def _live(self, request_id: str) -> bool:
        return request_id in self.table or request_id in self.groups or request_id in self.parking

    def _name(self, owner: str, name: str, request_id: str) -> None:
        """Remember a client's own id. Entries whose request ended before it was entered (a
        refusal) are swept here, in bulk, rather than tracked through every way out."""
        if len(self.named) > 2 * (len(self.table) + len(self.parking)) + 1024:
            self.named = {k: v for k, v in self.named.items() if self._live(v)}
        self.named[(owner, name)] = request_id

    def resolve(self, request_id: str, principal: Principal) -> str:
        """Our id for what a principal calls `request_id`: its own X-Request-Id first, then our
        id; an admin may also name another principal's request by that client's id."""
        own = self.named.get((principal.name, request_id))
        if own is not None and self._live(own):
            return own
        if principal.admin and not self._live(request_id):
            return next((v for (_, name), v in self.named.items() if name == request_id and self._live(v)),
                        request_id)
        return request_id

    def _choice(self, first: Request, index: int) -> Request:
        """Choice `index` of an n > 1 request: same prompt and limits, its own seed; it waits
        (FORKING) until the engine forks it from choice 0 once the prompt's KV exists."""
        params = first.params
        if params.seed is not None:
            params = dataclasses.replace(params, seed=(params.seed + index) % 2**63)
        req = Request(id=f"{first.id}#{index}", seq_id=next(self._seq_ids), model=first.model, engine=first.engine,
                      tenant=first.tenant, params=params, client=first.client, priority=first.priority,
                      sched=SchedState(arrival=first.sched.arrival, timeout_s=first.sched.timeout_s,
                                       queue_timeout_s=first.sched.queue_timeout_s),
                      prompt_ids=first.prompt_ids, max_tokens=first.max_tokens, state=State.FORKING,
                      group=first.group, index=index, owner=first.owner, client_request_id=first.client_request_id)
        self._enter(req)
        self.groups[first.group].append(req)
        return req

    def forget_failed_submit(self, request_id: str) -> None:
        """A Submit whose handling raised outside submit()'s own guard: drop what it left."""
        self.parking.remove(request_id)
        req = self.table.get(request_id)
        if req is not None and req.state is not State.DONE:
            self._drop(req, 500)

    # ------------------------------------------------------------ models coming and going
    def release(self, model: str) -> None:
        """`model` is up: the submits that waited for it go in, oldest first."""
        for p in self.parking.take(model):
            self.submit(p.peer, p.submit, p.principal)

    def fail_parked(self, model: str, status: int, code: str, message: str) -> None:
        for p in self.parking.take(model):
            self._send(p.peer, protocol.Rejected(request_id=p.submit.request_id, status=status, code=code,
                                                 message=message, param=None))

    def abort(self, m: protocol.Abort) -> None:
        if self.parking.remove(m.request_id) is not None:
            log.info("abort %s (waiting for its model): %s", m.request_id, m.reason)
            return
        members = self._members(m.request_id)
        if members:
            log.info("abort %s: %s", m.request_id, m.reason)
        for req in members:
            self._drop(req)

    def cancel(self, request_id: str, principal: Principal = KERNEL) -> dict:
        """The client's abort call: generation stops now (the next step no longer has it) and
        the request ends normally with what it has, finish_reason "cancelled". Unlike Abort
        (the client is gone) an answer is still owed. Raises KeyError for an unknown id."""
        client_id = self.resolve(request_id, principal)
        parked = self.parking.get(client_id)
        if parked is not None and principal.owns(parked.principal.name):
            self.parking.remove(client_id)
            self._send(parked.peer, protocol.Rejected(request_id=client_id, status=409, code="cancelled", param=None,
                                                      message=f"request {request_id:.200} was cancelled before it started"))
            return {"id": request_id, "cancelled": 1}
        members = self._members(client_id)
        if not members or not principal.owns(members[0].owner):   # another's is none of its business
            raise KeyError(f"no request {request_id!r:.200} in flight")
        first = members[0]
        if first.state is State.TOKENIZING:   # not accepted yet: it ends as an error
            self._end_with_error(first, 409, "cancelled", f"request {request_id:.200} was cancelled before it started")
            return {"id": request_id, "cancelled": len(members)}
        engine = self.engines[first.engine]
        ended = engine.stop(members, "cancelled")   # (a FORKING choice never ran: it finishes empty)
        self.tokens_ready(engine, ended)
        return {"id": request_id, "cancelled": len(ended)}

    def _members(self, client_id: str) -> list[Request]:
        """Every request still in the table for this client id (n of them for n > 1)."""
        if client_id in self.groups:
            return list(self.groups[client_id])
        req = self.table.get(client_id)
        return [req] if req is not None else []

    def _drop(self, req: Request, status: int | None = None) -> None:
        """End a request without output: free its memory and its tokenizer state."""
        engine = self.engines[req.engine]
        engine.drop(req)
        if req.detok.epoch == self.tokenizer_epoch.get(engine.tokenizer) and req.state is not State.DONE:
            self._send(engine.tokenizer, protocol.Detokenize(items=[protocol.DetokItem(
                rid=req.id, ids=[], prior=None, lp=None, stop=None, finish="abort")]))
        self._forget(req, status)

    # ------------------------------------------------------------ model tokens -> tokenizer -> io
    def engine_outputs(self, engine, out) -> None:
        """What a step loop emits (outputs.EngineOutputs): failures go to their clients now,
        new tokens and finishes to the tokenizer."""
        for req, failure in out.failed:
            if req.state is not State.DONE:   # (one failed choice ends its whole group)
                self._end_with_error(req, failure.status, failure.code, failure.message)
        self.tokens_ready(engine, out.progressed)

    def tokens_ready(self, engine, reqs: list[Request]) -> None:
        """Hand new output tokens (and finishes) to the tokenizer driver, in one message."""
        if self._driver_state(engine.tokenizer)[0] != "running":
            return  # held: a new incarnation gets everything from detok.acked on when it is ready
        epoch = self.tokenizer_epoch.get(engine.tokenizer, 0)
        items = []
        for req in reqs:
            if req.state is State.DONE:
                continue   # ended with its group (n > 1) earlier in this list
            prior = None
            if req.detok.epoch != epoch:   # this tokenizer has no state for us: resend the acked prefix
                prior, req.detok.sent, req.detok.epoch = req.output.ids[: req.detok.acked], req.detok.acked, epoch
            visible = len(req.output.ids) - (req.output.hidden_tail if req.output.finish_reason else 0)
            ids = req.output.ids[req.detok.sent:visible]
            lp = req.output.logprobs[req.detok.sent:visible] if req.params.logprobs is not None else None
            # The stop strings travel once per tokenizer incarnation: with the item that starts its state.
            items.append(protocol.DetokItem(rid=req.id, ids=ids, prior=prior, lp=lp, finish=req.output.finish_reason,
                                            stop=req.params.stop if prior is not None else None))
            req.detok.sent = len(req.output.ids)
        if items:
            self._send_items(engine.tokenizer, protocol.Detokenize, items)

    def text_deltas(self, m: protocol.TextDeltas) -> None:
        out: dict[str, list] = {}
        for item in m.items:
            req = self._delta_request(item)
            if req is None:
                continue
            n, stop_hit = item.n, item.stop_hit
            start = req.detok.acked
            req.detok.acked += n
            if stop_hit and req.state is not State.FINISHING:
                self.engines[req.engine].stop([req], "stop")
            final = req.output.finish_reason if (item.finish or stop_hit) else None
            # The final item also carries the hidden stop token, as transformers' generate returns it.
            ids = req.output.ids[start:] if final and not stop_hit else req.output.ids[start:start + n]
            usage = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.output.ids),
                     "cached_tokens": req.kv.cached_prompt_tokens or 0} if final else None
            out.setdefault(req.client, []).append(protocol.OutputItem(
                rid=req.client_id, index=req.index, text=item.text, n=n, ids=ids, lp=item.lp, finish=final, usage=usage))
            if final:
                self._forget(req)
        for client, items in out.items():
            self._send_items(client, protocol.Outputs, items)

    def _delta_request(self, item: protocol.TextDelta) -> Request | None:
        """The live request a TextDelta is for, if it fits it (its types were checked on
        decode): a tokenizer may report no more tokens than it was sent."""
        req = self.table.get(item.rid)
        if req is None or req.state is State.DONE:
            return None
        if not 0 <= item.n <= req.detok.sent - req.detok.acked:
            log.warning("dropped a TextDelta that does not fit request %s (%d tokens, %d sent, %d acked)",
                        item.rid, item.n, req.detok.sent, req.detok.acked)   # (never the text: logs carry no user data)
            return None
        return req

    def _send_items(self, peer: str, cls, items: list) -> None:
        """Send a per-request items message. If it cannot be encoded, send the items one by
        one, so that only the requests whose item cannot be written fail."""
        try:
            return self._send(peer, cls(items=items))
        except protocol.Unencodable as exc:
            log.error("%s to %s cannot be encoded (%s); sending its %d items one by one", cls.__name__, peer,
                      exc, len(items))
        for item in items:
            try:
                self._send(peer, cls(items=[item]))
            except protocol.Unencodable as exc:
                self._unencodable(peer, cls, item, str(exc))

    def _unencodable(self, peer: str, cls, item, why: str) -> None:
        cause = f"internal error: a message for this request cannot be encoded: {why}"
        if cls is protocol.Outputs:   # the request may be gone from the table: tell its client directly
            req = next((r for r in self.table.values() if r.client_id == item.rid), None)
            if req is not None:
                return self._end_with_error(req, 500, "internal_error", cause)
            self._send(peer, protocol.Rejected(request_id=item.rid, status=500, code="internal_error",
                                               message=cause, param=None))
        elif (req := self.table.get(item.rid)) is not None:
            self._end_with_error(req, 500, "internal_error", cause)

    # ------------------------------------------------------------ endings
    def _end_with_error(self, req: Request, status: int, code: str, message: str, param: str | None = None):
        """One answer for the client; for n > 1 every choice ends with it."""
        for member in self._members(req.client_id) or [req]:
            self._drop(member, status)
        self._send(req.client, protocol.Rejected(request_id=req.client_id, status=status, code=code,
                                                 message=message, param=param))

    def _forget(self, req: Request, status: int | None = 200) -> None:
        if req.state is not State.DONE:
            req.to(State.DONE)
        known = self.table.pop(req.id, None) is not None
        group = self.groups.get(req.group)
        if group is not None:
            group[:] = [r for r in group if r is not req]
            if not group:
                del self.groups[req.group]
        key = (req.owner, req.client_request_id)
        if req.client_request_id and self.named.get(key) == req.client_id and not self._live(req.client_id):
            del self.named[key]
        if known:
            self.on_done(req, status)

    def fail_all(self, status: int, code: str, message: str) -> None:
        for model in self.parking.models():
            self.fail_parked(model, status, code, message)
        for req in list(self.table.values()):
            if req.state is not State.DONE:   # an earlier choice of its group may have ended it
                self._end_with_error(req, status, code, message)

    def tokenizer_restarted(self, engine) -> None:
        """A new tokenizer incarnation: re-send pending encodes and rebuild detok state."""
        self.tokenizer_epoch[engine.tokenizer] = self.tokenizer_epoch.get(engine.tokenizer, -1) + 1
        pending = []
        for req in self.table.values():
            if req.engine != engine.name:
                continue
            if req.state is State.TOKENIZING:
                self._send(engine.tokenizer, protocol.Encode(request_id=req.id, prompt=req.prompt,
                                                             messages=req.messages, tools=req.tools))
            elif req.output.ids or req.state is State.FINISHING:   # (a cancelled choice may have none)
                pending.append(req)
        if pending:
            self.tokens_ready(engine, pending)
