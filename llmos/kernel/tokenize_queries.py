"""The io driver's "tokenize" and "detokenize" queries (/tokenize, /detokenize, the render
routes): the kernel forwards them to the model's tokenizer driver and answers when it replies.

Tokenizing is the tokenizer driver's job; the kernel only checks the arguments (it never
trusts the bus), picks the model's tokenizer and keeps each pending query by an id of its
own, apart from the generation requests (FrontDoor). The ids come from the same Encode a
generation request uses, so they are exactly the ids generation would see.

Every query is answered, never left hanging: a tokenizer that is down or dies with queries
pending answers 503; a query older than STALE_S is dropped (the io driver gave up on it long
before). The answer is QueryReply.data: on success vLLM's body ({"count", "max_model_len",
"tokens"[, "token_strs"]} or {"prompt"}); on failure {"error": {"status", "code", "message",
"param"}}, which the io driver serves as that status.
"""
from __future__ import annotations

import itertools
import logging
import time
import types
from dataclasses import dataclass

from llmos import protocol
from llmos.openai_format.tools import parse_tools
from llmos.sampling_params import MAX_MESSAGES, MAX_PROMPT_CHARS, MAX_PROMPT_TOKEN_IDS, InvalidParam

log = logging.getLogger(__name__)
MAX_PENDING = 1024     # queries waiting for a tokenizer; past it new ones get a 503
STALE_S = 300.0        # a query still unanswered this long is forgotten
MAX_MODEL_CHARS = 256
_FLAGS = ("add_special_tokens", "add_generation_prompt", "continue_final_message", "return_token_strs")


class QueryError(Exception):
    """A query answered with an error: its HTTP status, code and the field it names."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param

    def data(self) -> dict:
        return {"error": {"status": self.status, "code": self.code, "message": str(self), "param": self.param}}


@dataclass
class _Pending:
    peer: str              # the io driver that asked
    query_id: str          # its id for the query
    tokenizer: str         # the driver asked: only its answer counts
    max_model_len: int
    field: str             # what the client sent ("prompt", "messages", "tokens"): an error names it
    since: float


class TokenizeQueries:
    QUERIES = ("tokenize", "detokenize")

    def __init__(self, host, engines: dict, send, driver_state, clock=time.monotonic):
        self.host = host                  # ModelHost: known models and their serving engine
        self.engines = engines
        self._send = send                 # (peer, message)
        self._driver_state = driver_state  # driver name -> (state, last error)
        self.clock = clock
        self.pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)

    # ------------------------------------------------------------ io -> kernel
    def ask(self, peer: str, m: protocol.Query, principal) -> None:
        """Forward a tokenize or detokenize query to its model's tokenizer, or answer it now
        with an error. Whatever goes wrong fails this query alone."""
        try:
            self._ask(peer, m, principal)
        except QueryError as exc:
            self._reply(peer, m.query_id, exc.data())
        except Exception as exc:
            log.exception("%s query failed", m.what)
            self._reply(peer, m.query_id, QueryError(500, "internal_error", f"{m.what}: internal error: "
                                                     f"{type(exc).__name__}: {exc}").data())

    def _ask(self, peer: str, m: protocol.Query, principal) -> None:
        args = m.args if isinstance(m.args, dict) else {}
        model = args.get("model")
        if not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_CHARS:
            raise QueryError(400, "invalid_parameter", f"model must be a string of 1 to {MAX_MODEL_CHARS} "
                             "characters", "model")
        if principal is not None and not principal.may_use(model):
            raise QueryError(403, "permission_denied", f"{principal.name} may not use model '{model:.256}'", "model")
        engine = self._engine(model)
        self._sweep()
        if len(self.pending) >= MAX_PENDING:
            raise QueryError(503, "server_busy", f"{len(self.pending)} tokenizer queries are pending; try again")
        qid = f"tokenize-query:{next(self._ids)}"   # the kernel's own ids: no client names them
        if m.what == "detokenize":
            ids = _token_ids(args.get("tokens"), engine.info.vocab_size, "tokens")
            self._forward(peer, m, engine, qid, "tokens", protocol.Decode(request_id=qid, token_ids=protocol.i32(ids)))
            return
        flags = {k: args[k] for k in _FLAGS if args.get(k) is not None}
        if any(type(v) is not bool for v in flags.values()):
            raise QueryError(400, "invalid_parameter", f"{', '.join(_FLAGS)} must be booleans",
                             next(k for k, v in flags.items() if type(v) is not bool))
        prompt, messages, ids = args.get("prompt"), args.get("messages"), args.get("prompt_token_ids")
        if sum(x is not None for x in (prompt, messages, ids)) != 1:
            raise QueryError(400, "invalid_parameter", "give exactly one of prompt and messages", "prompt")
        if ids is not None:   # a prompt of token ids: already tokenized, only checked
            ids = _token_ids(ids, engine.info.vocab_size, "prompt")
            return self._reply(peer, m.query_id, {"count": len(ids), "max_model_len": engine.max_model_len,
                                                  "tokens": ids})
        if prompt is not None and (not isinstance(prompt, str) or not 0 < len(prompt) <= MAX_PROMPT_CHARS):
            raise QueryError(400, "invalid_parameter", f"prompt must be a string of 1 to {MAX_PROMPT_CHARS} "
                             "characters", "prompt")
        if messages is not None and (not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES):
            raise QueryError(400, "invalid_parameter", f"messages must be a list of 1 to {MAX_MESSAGES} messages",
                             "messages")
        try:   # a chat's tools (the render route's): in the prompt as a generation request has them
            tools = parse_tools(args.get("tools")) if messages is not None else None
        except InvalidParam as exc:
            raise QueryError(400, "invalid_parameter", str(exc), exc.param) from None
        self._forward(peer, m, engine, qid, "prompt" if prompt is not None else "messages",
                      protocol.Encode(request_id=qid, prompt=prompt, messages=messages, tools=tools, **flags))

    def _engine(self, model: str):
        """The loaded engine serving `model`. A cold model is not loaded for a query: tokenizing
        is cheap and must not evict a model that serves (the tokenizer starts with its model)."""
        if not self.host.known(model):
            raise QueryError(404, "model_not_found", f"The model '{model:.256}' does not exist", "model")
        engine = self.host.route(types.SimpleNamespace(model=model, prompt=None, messages=None,
                                                       prompt_token_ids=None))
        if engine is None or not engine.loaded:
            raise QueryError(503, "model_unavailable", f"model '{model:.256}' is not loaded (its tokenizer starts "
                             "with it): send a generation request or load it, then try again")
        if self._driver_state(engine.tokenizer)[0] != "running":
            raise QueryError(503, "tokenizer_unavailable", f"the tokenizer of model '{model:.256}' is restarting; "
                             "try again in a moment")
        return engine

    def _forward(self, peer: str, m: protocol.Query, engine, qid: str, field: str, msg) -> None:
        self.pending[qid] = _Pending(peer, m.query_id, engine.tokenizer, engine.max_model_len, field, self.clock())
        try:
            self._send(engine.tokenizer, msg)
        except protocol.Unencodable as exc:
            del self.pending[qid]
            raise QueryError(400, "invalid_parameter", f"the {field} cannot be sent to the tokenizer: {exc}",
                             field) from None

    # ------------------------------------------------------------ tokenizer -> kernel
    def encoded(self, peer: str, m: protocol.Encoded) -> bool:
        """Answer the query this Encoded is for. False: it is not one of ours (a generation
        request's, FrontDoor.encoded)."""
        p = self._take(peer, m.request_id)
        if p is None:
            return m.request_id in self.pending   # ours, from the wrong driver: dropped
        if m.error:
            data = QueryError(400, "invalid_prompt", m.error, p.field).data()
        else:
            ids = m.token_ids.tolist()
            data = {"count": len(ids), "max_model_len": p.max_model_len, "tokens": ids}
            if m.token_strs is not None:
                data["token_strs"] = m.token_strs
        self._reply(p.peer, p.query_id, data)
        return True

    def decoded(self, peer: str, m: protocol.Decoded) -> None:
        p = self._take(peer, m.request_id)
        if p is not None:
            self._reply(p.peer, p.query_id, QueryError(400, "invalid_parameter", m.error, p.field).data()
                        if m.error else {"prompt": m.text})

    def tokenizer_down(self, name: str) -> None:
        """A tokenizer died: what it was asked will never be answered by it."""
        for qid in [q for q, p in self.pending.items() if p.tokenizer == name]:
            p = self.pending.pop(qid)
            self._reply(p.peer, p.query_id, QueryError(503, "tokenizer_unavailable", "the model's tokenizer "
                                                       "restarted before it answered; try again").data())

    def _take(self, peer: str, qid: str) -> _Pending | None:
        p = self.pending.get(qid)
        if p is None or p.tokenizer != peer:
            return None
        return self.pending.pop(qid)

    def _sweep(self) -> None:
        now = self.clock()
        for qid in [q for q, p in self.pending.items() if now - p.since > STALE_S]:
            p = self.pending.pop(qid)
            log.warning("tokenizer %s did not answer query %s within %g s", p.tokenizer, qid, STALE_S)
            self._reply(p.peer, p.query_id, QueryError(504, "tokenizer_timeout", "the model's tokenizer did "
                                                       f"not answer within {STALE_S:g} s").data())

    def _reply(self, peer: str, query_id: str, data: dict) -> None:
        try:
            self._send(peer, protocol.QueryReply(query_id=query_id, data=data))
        except protocol.Unencodable as exc:
            self._send(peer, protocol.QueryReply(query_id=query_id, data=QueryError(
                500, "internal_error", f"the answer cannot be encoded: {exc}").data()))


def _token_ids(ids, vocab_size: int, field: str) -> list[int]:
    """A list of token ids, each in the model's vocabulary, or QueryError(400) naming `field`."""
    if not isinstance(ids, list) or len(ids) > MAX_PROMPT_TOKEN_IDS:
        raise QueryError(400, "invalid_parameter", f"{field} must be a list of at most {MAX_PROMPT_TOKEN_IDS} "
                         "token ids", field)
    for i, t in enumerate(ids):
        if type(t) is not int or not 0 <= t < vocab_size:
            raise QueryError(400, "invalid_parameter", f"{field}[{i}] is not a token id of this model "
                             f"(integers in [0, {vocab_size}))", field)
    return ids
