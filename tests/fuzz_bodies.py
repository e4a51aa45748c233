"""Fuzzing the whole daemon: hostile request bodies and batch files (hypothesis strategies)
and the campaign that sends them to a real llmosd and checks its invariants after each.

Used by tests/test_fuzz_daemon.py (bounded, derandomized: CI) and benchmarks/fuzz.py (a
bigger budget from the command line). These strategies know the fields themselves (and so
reach past what a schema says: NaN literals, duplicate keys, encodings); fuzz_schema.py
derives more cases from the daemon's own GET /openapi.json.

Invariants after every case (`Fuzzer.check`):
  - a case derived from the served /openapi.json (fuzz_schema.py): every 4xx names a field
    (error.param), and a body the schema refuses is a 400 naming the field that was changed
    ("unnamed" otherwise);
  - the answer's status is < 500, or a documented 503/504 ("crash" otherwise; a dropped
    connection, a 5xx-typed error event inside a 200 stream, or a driver restart are crashes too);
  - an answer comes within `timeout` seconds ("wedge" otherwise);
  - error answers have OpenAI's shape ({"error": {"message": ...}}), unless the HTTP layer
    refused the request (bad header bytes, a Content-Encoding); 200 answers have choices;
  - the case's kept-alive connection answers the next request properly ("connection");
  - no request stays in flight, and a normal greedy request then answers exactly the text
    the daemon gave it at the start ("wedge" otherwise; the daemon is restarted to go on;
    a request that got no answer while the daemon still serves others is a "hang");
  - a case that reached the model (200 or 5xx) is sent again beside a running greedy
    stream, which must still answer its own text ("collateral" otherwise).
A batch case (`Fuzzer.check_batch`): the upload is rejected with a 400 naming exactly its
bad lines, or accepted and then its job completes with the right results; after it a job
of valid lines completes with the right results.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import psutil
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

MODEL = "tiny"
VOCAB = 49152          # the tiny models' (SmolLM2's) vocabulary
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
ENDPOINTS = {COMPLETIONS: "completions", CHAT: "chat"}
REFERENCE = {COMPLETIONS: {"model": MODEL, "prompt": "Hello", "max_tokens": 8, "temperature": 0},
             CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8,
                    "temperature": 0}}
# A request running while a case that reached the model is sent again: the case must not
# hurt it (design.md: a bad request fails that request alone).
BYSTANDER = {"model": MODEL, "prompt": "The bystander says", "max_tokens": 32, "temperature": 0,
             "ignore_eos": True, "stream": True}
ALLOWED_5XX = (503, 504)
TOKEN_BUDGET = 128     # n x max_tokens of one generated body is kept under this (time, not validity)

NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------- building blocks


def weighted(*pairs):
    """One of the strategies, chosen with the given integer weights."""
    index = [i for i, (w, _) in enumerate(pairs) for _ in range(w)]
    return st.sampled_from(index).flatmap(lambda i: pairs[i][1])


EDGE_INTS = [0, 1, -1, 2, 255, 256, 257, 2**15, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63,
             2**64, 10**30, 10**400, -2**31, -2**63, -2**63 - 1, -2**64, -10**400]
EDGE_FLOATS = [NAN, INF, -INF, 0.0, -0.0, 5e-324, 1e-300, 0.5, 1.0, 1.5, 2.0, 2.0000000000000004, 1e16,
               1e308, -1e-300, -1.0]
SPECIAL_STRINGS = [
    "", " ", "\x00", "\ud800", "\udfff", "a\ud800b", "\udc80\ud800", "\ufeff", "\u2028\u2029", "\U0001F4A5",
    "e\u0301", "\x1b[2J", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_start|>system\nx<|im_end|>",
    "{{ raise_exception('x') }}", "{% for x in y %}", "null", "NaN", "\\", '"', "\r\n", "\t", MODEL, "TINY",
    "batch", "batch:3", "interactive", "realtime", "batch:-1", "batch:99999999999999999999", "batch:nan",
    "batch:", ":", "::", "interactive:2147483648", "local", "../../etc/passwd", "%s%n", "\u202e",
]
SURROGATE_TEXT = st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010), min_size=1, max_size=6)
LONG_STRINGS = st.builds(lambda unit, n: unit * n,
                         st.sampled_from(["a", "word ", "\ud800", "\u00e9", "<|im_end|>", "\x00", "\U0001F4A5"]),
                         st.sampled_from([65, 129, 513, 5000, 100_000]))

ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-300, 300), st.integers())
floats = st.one_of(st.sampled_from(EDGE_FLOATS), st.floats())
strings = st.one_of(st.text(max_size=20), st.sampled_from(SPECIAL_STRINGS), SURROGATE_TEXT, LONG_STRINGS)
scalars = st.one_of(st.none(), st.booleans(), ints, floats, strings)
any_json = st.recursive(scalars, lambda ch: st.one_of(st.lists(ch, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), ch, max_size=4)),
                        max_leaves=10)


def field_value(valid, invalid=st.nothing()):
    """Mostly values a validator should accept (but at their edges), then wrong ones, then anything."""
    return weighted((12, valid), (2, st.one_of(invalid, scalars)), (1, any_json))


def repeated(element, counts):
    """[x] * k without drawing k elements (big lists stay cheap to generate)."""
    return st.builds(lambda x, k: [x] * k, element, st.sampled_from(counts))


# ---------------------------------------------------------------- request fields


token_ids = st.integers(0, VOCAB - 1)
edge_token_ids = st.sampled_from([VOCAB - 1, VOCAB, VOCAB + 1, 10**6, 2**31 - 1, 2**31, 2**32, 2**63 - 1,
                                  2**63, 2**64, 10**30])
max_tokens = weighted((8, st.integers(1, 16)), (1, st.sampled_from([64, 200, 255, 256, 257, 512])),
                      (2, st.one_of(st.sampled_from(EDGE_INTS), st.sampled_from([8.0, "8", True, [8]]), scalars)))
stop_strings = st.one_of(st.sampled_from(["\n", ".", " the", "a", "<|im_end|>", "\ud800", "\U0001F4A5"]),
                         st.text(min_size=1, max_size=8), SURROGATE_TEXT, LONG_STRINGS)
prompts = weighted(
    (6, st.one_of(st.sampled_from(["Hello", "Once upon a time", "a", " ", "\n", "1 2 3"]),
                  st.text(min_size=1, max_size=30))),
    (2, st.one_of(st.sampled_from(SPECIAL_STRINGS), SURROGATE_TEXT, LONG_STRINGS)),
    (2, st.one_of(st.lists(token_ids, min_size=1, max_size=10),
                  st.lists(st.one_of(token_ids, edge_token_ids), min_size=1, max_size=4),
                  repeated(token_ids, [255, 256, 300, 10_000]),
                  st.lists(st.sampled_from([-1, -2**63, True, 1.0, "1", None]), min_size=1, max_size=3),
                  st.just([]))),
    (1, st.one_of(st.lists(st.text(max_size=10), min_size=0, max_size=3), st.just([[1, 2]]),
                  repeated(st.just("x"), [2, 1000]))),
    (1, any_json),
)
ROLES = ["user", "system", "assistant", "tool", "developer"]
text_parts = st.lists(st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=10), strings)}),
    st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio", "file", "", "TEXT"]),
                           "image_url": any_json}),
    any_json), max_size=3)
message_extras = weighted((8, st.just({})), (1, st.fixed_dictionaries({}, optional={
    "name": strings, "tool_calls": any_json, "tool_call_id": strings, "refusal": any_json, "x-unknown": any_json})))
message = st.builds(lambda m, extra: {**m, **extra}, st.fixed_dictionaries(
    {"role": weighted((12, st.sampled_from(ROLES)), (1, st.one_of(strings, any_json))),
     "content": weighted((12, st.one_of(st.sampled_from(["Hello", "Hi", ""]), st.text(max_size=30))),
                         (2, st.one_of(st.sampled_from(SPECIAL_STRINGS), SURROGATE_TEXT, LONG_STRINGS)),
                         (2, text_parts), (1, st.none()), (1, any_json))}), message_extras)
short_message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.text(max_size=10)})
messages = weighted(
    (8, st.lists(message, min_size=1, max_size=4)),
    (1, repeated(short_message, [100, 1000, 10_000])),
    (1, st.one_of(st.just([]), st.lists(scalars, min_size=1, max_size=3), any_json)),
)
priorities = st.one_of(st.sampled_from(["batch", "batch:0", "batch:3", "interactive", "interactive:1", "realtime",
                                        "realtime:0", 0, 1, -1, 2, 3, 100, 2**31, 2**63, 2**64, -2**64, 10**400,
                                        "batch:99999999999999999999", "batch:-1", "batch:nan", "batch:1e3",
                                        "nope", "", ":", "batch:3:4", " batch", "BATCH"]),
                       st.integers(), strings)
seconds = st.one_of(st.floats(1e-3, 1e3), st.sampled_from([1e-300, 5e-324, 0.001, 0.5, 30, 60, 1e308, INF, NAN,
                                                           2**64, 10**400, 1]))

COMMON = {
    "temperature": field_value(st.one_of(st.sampled_from([0, 0.0, 0.7, 1, 2, 2.0, 1e-300, 5e-324]),
                                         st.floats(0, 2)), st.sampled_from(EDGE_FLOATS)),
    "top_p": field_value(st.one_of(st.sampled_from([1, 1.0, 0.5, 1e-300, 5e-324, 1e-9]), st.floats(1e-9, 1)),
                         st.sampled_from([0, -0.0, NAN, INF, 1.0000001, -1])),
    "top_k": field_value(st.one_of(st.sampled_from([-1, 0, 1, 2, 50, VOCAB - 1, VOCAB, VOCAB + 1, 10**6,
                                                    2**31 - 1, 2**31, 2**32, 2**63 - 1]), st.integers(-1, 100)),
                         st.sampled_from([-2, 2**63, 2**64, -2**63, 1.0, "5"])),
    "seed": field_value(st.one_of(st.integers(-2**63, 2**63 - 1),
                                  st.sampled_from([0, -1, 2**31, 2**32, 2**63 - 1, -2**63])),
                        st.sampled_from([2**63, 2**64, -2**63 - 1, 10**400, 1.5, "7"])),
    "stop": field_value(st.one_of(stop_strings, st.lists(stop_strings, min_size=0, max_size=16)),
                        st.one_of(st.just([""]), repeated(st.just("x"), [17, 1000]),
                                  st.lists(st.one_of(stop_strings, scalars), min_size=1, max_size=3))),
    "stop_token_ids": field_value(st.one_of(st.lists(token_ids, max_size=5), st.lists(edge_token_ids, min_size=1,
                                                                                   max_size=3),
                                            repeated(token_ids, [1000, 100_000])),
                                  st.lists(st.sampled_from([-1, True, 1.0, "1", None]), min_size=1, max_size=2)),
    "ignore_eos": field_value(st.booleans()),
    "min_tokens": field_value(st.one_of(st.integers(0, 16), st.sampled_from([0, 255, 256, 2**31, 2**63 - 1])),
                              st.sampled_from([-1, 2**64, 10**400, 1.0])),
    "n": field_value(st.one_of(st.integers(1, 4), st.sampled_from([1, 2, 8, 128])),
                     st.sampled_from([0, -1, 129, 2**31, 2**64, 1.0, True, "2"])),
    "stream": weighted((6, st.booleans()), (1, st.sampled_from(["true", 1, 0, None, [], {}]))),
    "stream_options": field_value(st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), st.just({})),
                                  st.sampled_from([{"include_usage": "yes"}, [], "x", {"x": 1}])),
    "tenant": field_value(st.one_of(st.text(min_size=1, max_size=64), st.sampled_from(SPECIAL_STRINGS[1:]),
                                    st.just("t" * 64), SURROGATE_TEXT),
                          st.sampled_from(["", "t" * 65, 1, []])),
    "priority": field_value(priorities, st.sampled_from([True, 1.5, [], {}])),
    "timeout": field_value(seconds, st.sampled_from([0, -1, -INF, "1", True])),
    "queue_timeout": field_value(seconds, st.sampled_from([0, -1, -INF, "1", True])),
    "return_token_ids": field_value(st.booleans()),
    # OpenAI fields without effect, and fields accepted only at their no-op value
    **{name: any_json for name in ("user", "store", "metadata", "service_tier", "parallel_tool_calls",
                                   "prompt_cache_key", "safety_identifier", "reasoning_effort", "verbosity")},
    "use_beam_search": field_value(st.just(False), st.sampled_from([True, 0, "false"])),
    # sampling controls (issue 16): in range and at the edges, then past them
    **{name: field_value(st.one_of(st.floats(-2, 2), st.sampled_from([0, 2, -2, -0.0])),
                         st.sampled_from([2.01, -3, NAN, INF, False, "0"]))
       for name in ("presence_penalty", "frequency_penalty")},
    "repetition_penalty": field_value(st.one_of(st.floats(1e-3, 2), st.sampled_from([1, 2, 5e-324])),
                                      st.sampled_from([0, -1, 2.5, NAN, True])),
    "min_p": field_value(st.one_of(st.floats(0, 1), st.sampled_from([0, 1, 5e-324])),
                         st.sampled_from([-0.1, 1.5, NAN, "0"])),
    "logit_bias": field_value(
        st.dictionaries(st.one_of(st.builds(str, token_ids), st.sampled_from(["0", "0049151"])),
                        st.one_of(st.floats(-100, 100), st.sampled_from([-100, 100])), max_size=300),
        st.dictionaries(st.sampled_from(["-1", "x", "49152", "99999999999", " 1", "1.0"]), ints,
                        min_size=1, max_size=3)),
}
COMPLETION_FIELDS = {
    **COMMON,
    "logprobs": field_value(st.one_of(st.integers(0, 20), st.sampled_from([0, 1, 5, 20])),
                            st.sampled_from([21, -1, 2**64, True, 1.5, "1"])),
    "best_of": field_value(st.just(1), st.sampled_from([2, 0, 2**64, True])),
    "echo": field_value(st.just(False), st.sampled_from([True, 0])),
    "suffix": field_value(st.just(""), st.sampled_from(["x", "\ud800"])),
}
CHAT_FIELDS = {
    **COMMON,
    "logprobs": field_value(st.booleans(), st.sampled_from([0, 1, 5, "true"])),
    "top_logprobs": field_value(st.integers(0, 20), st.sampled_from([21, -1, 2**31, 2**64, True, 1.0])),
    "response_format": field_value(st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
                                   st.sampled_from([{"type": "json_schema"}, {}, {"type": "yaml"}])),
    "tools": field_value(st.just([]), st.just([{"type": "function", "function": {"name": "f"}}])),
    "tool_choice": field_value(st.sampled_from(["none", "auto"]), st.sampled_from(["required", {"type": "x"}])),
    "functions": field_value(st.just([]), st.just([{"name": "f"}])),
    "function_call": field_value(st.sampled_from(["none", "auto"]), st.just({"name": "f"})),
    "modalities": field_value(st.just(["text"]), st.sampled_from([["audio"], ["text", "audio"], []])),
    **{name: any_json for name in ("audio", "prediction", "web_search_options")},
}
KNOWN_FIELDS = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", *COMPLETION_FIELDS,
                *CHAT_FIELDS}
unknown_fields = st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda k: k not in KNOWN_FIELDS),
                                 any_json, min_size=1, max_size=2)
models = weighted((12, st.just(MODEL)), (1, st.sampled_from(["nope", "", "TINY", " tiny", "tiny\x00", "smollm3",
                                                             "tiny\ud800", "t" * 100_000])),
                  (1, st.one_of(strings, any_json)))


def _valid_int(v, lo, hi):
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def bound_cost(body, budget: int = TOKEN_BUDGET):
    """Keep n x max_tokens of a body that would be accepted under `budget` tokens: the point
    is hostile values, not minutes of generation. Invalid values are left as they are."""
    if not isinstance(body, dict):
        return body
    n = body.get("n") if _valid_int(body.get("n"), 1, 128) else 1
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    mt = body.get(key)
    if mt is None:
        mt = 256
    if _valid_int(mt, 1, 256) and n * mt > budget:
        body = {**body, key: max(1, budget // n)}
    return body


def _body(inputs_key: str, inputs, fields: dict, budget: int):
    names = sorted(fields)
    extra = st.lists(st.sampled_from(names), unique=True, max_size=5).flatmap(
        lambda chosen: st.fixed_dictionaries({k: fields[k] for k in chosen}))
    limit = (st.fixed_dictionaries({"max_tokens": max_tokens}) if inputs_key == "prompt" else
             weighted((3, st.fixed_dictionaries({"max_tokens": max_tokens})),
                      (2, st.fixed_dictionaries({"max_completion_tokens": max_tokens})),
                      (1, st.fixed_dictionaries({"max_tokens": max_tokens, "max_completion_tokens": max_tokens}))))
    limit = weighted((19, limit), (1, st.just({})))   # no max_tokens: up to the model's context (or budget)
    base = weighted((12, st.fixed_dictionaries({"model": models, inputs_key: inputs})),
                    (1, st.fixed_dictionaries({}, optional={"model": models, inputs_key: inputs})))
    unknown = weighted((8, st.just({})), (1, unknown_fields))

    def merge(b, lim, ex, unk):
        return bound_cost({**b, **lim, **ex, **unk}, budget)
    body = st.builds(merge, base, limit, extra, unknown)
    return weighted((30, body), (1, any_json))   # now and then not even an object


def completion_bodies(budget: int = TOKEN_BUDGET):
    return _body("prompt", prompts, COMPLETION_FIELDS, budget)


def chat_bodies(budget: int = TOKEN_BUDGET):
    return _body("messages", messages, CHAT_FIELDS, budget)


# ---------------------------------------------------------------- cases (what goes on the wire)


@dataclass
class Case:
    path: str
    raw: bytes
    headers: dict = field(default_factory=dict)
    body: object = None        # the JSON value behind raw, when there is one
    style: str = "ascii"       # how body became raw (see encode)
    label: str = ""            # what a raw case is
    expect: tuple | None = None   # (field, valid by the schema) of a case from /openapi.json (fuzz_schema.py)

    def describe(self, limit: int = 400) -> str:
        what = (f"{self.label}: {clip_bytes(self.raw)}" if self.style == "raw" else
                describe(self.body) + (" (sent as raw UTF-8)" if self.style == "utf8" else ""))
        hdrs = {k: v for k, v in self.headers.items() if k.lower() != "content-type" or v != "application/json"}
        return f"POST {self.path} {what[:limit]}" + (f" headers={hdrs!r}"[:200] if hdrs else "")


def encode(value, style: str = "ascii") -> bytes:
    """ascii: json.dumps as it is (NaN/Infinity literals, lone surrogates as \\ud800 escapes);
    utf8: the characters themselves, a lone surrogate becoming (invalid) UTF-8 bytes."""
    if style == "utf8":
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(value).encode()


request_ids = weighted(
    (2, st.from_regex(r"\A[A-Za-z0-9._:-]{1,128}\Z")),
    (1, st.sampled_from(["fuzz-1", "fuzz-2", "x" * 128])),   # ids that come back: reuse after a request ended
    (1, st.one_of(st.sampled_from(["", " ", "a b", "x" * 129, "x" * 5000, "caf\u00e9", "\x7f", "id\t1", "/", "%00",
                                   "cmpl-fixed"]),
                  st.binary(max_size=20).filter(lambda b: not set(b) & {0, 10, 13}),
                  st.text(st.characters(min_codepoint=32, max_codepoint=0x10FFFF), max_size=20).map(
                      lambda t: t if t.isascii() else t.encode("utf-8", "surrogatepass")))),
)
content_types = weighted((12, st.just("application/json")),
                         (1, st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "",
                                              "multipart/form-data; boundary=x", "application/json; charset=utf-16",
                                              None])))


def _headers(rid, ctype, encoding):
    out = {}
    if ctype is not None:
        out["Content-Type"] = ctype
    if rid is not None:
        out["X-Request-Id"] = rid
    if encoding is not None:
        out["Content-Encoding"] = encoding
    return out


def headers(request_id: bool = True):
    """Content-Type (mostly JSON's), sometimes X-Request-Id and, rarely, a Content-Encoding."""
    rid = weighted((1, st.none()), (1, request_ids)) if request_id else st.none()
    return st.builds(_headers, rid, content_types,
                     weighted((30, st.none()), (1, st.sampled_from(["gzip", "deflate", "br", "identity", "x-nope"]))))


styles = weighted((8, st.just("ascii")), (1, st.just("utf8")))


def json_cases(path: str, bodies, request_id: bool = True):
    return st.builds(lambda b, s, h: Case(path, encode(b, s), h, b, s), bodies, styles, headers(request_id))


def completion_cases(budget: int = TOKEN_BUDGET, request_id: bool = True):
    """POST /v1/completions with a generated body. `request_id`: send X-Request-Id headers too."""
    return json_cases(COMPLETIONS, completion_bodies(budget), request_id)


def chat_cases(budget: int = TOKEN_BUDGET, request_id: bool = True):
    return json_cases(CHAT, chat_bodies(budget), request_id)


def deep(depth: int, kind: str = "array", closed: bool = True) -> bytes:
    if kind == "array":
        return b"[" * depth + (b"]" * depth if closed else b"")
    return b'{"a":' * depth + b"1" + (b"}" * depth if closed else b"")


def _splice(raw: bytes, at: int, junk: bytes) -> bytes:
    at = at % (len(raw) + 1)
    return raw[:at] + junk + raw[at:]


_OK = b'{"model":"tiny","prompt":"Hello","max_tokens":4}'
_OK_CHAT = b'{"model":"tiny","messages":[{"role":"user","content":"Hi"}],"max_tokens":4}'
LITERALS = [b"NaN", b"Infinity", b"-Infinity", b"nan", b"inf", b"1e999", b"-1e999", b"1E400", b"-0", b"0e0",
            b"9" * 20, b"9" * 400, b"9" * 4300, b"9" * 4301, b"9" * 10_000, b"1." + b"0" * 5000, b"0x10", b"+1",
            b"01", b".5", b"1_000", b"true", b"null", b'"\\ud800"', b'"\\udfff\\ud800"', b'"\\u0000"', b'"\\x00"',
            b'"\xff"', b'"\xed\xa0\x80"', b'"\xc0\xaf"', b'"\xf4\x90\x80\x80"', b'"\\u12"',
            b'"' + b"a" * 200_000 + b'"']
FIELDS_FOR_LITERALS = ["max_tokens", "temperature", "top_p", "top_k", "seed", "n", "logprobs", "min_tokens",
                       "timeout", "queue_timeout", "priority", "tenant", "stop", "prompt", "model", "stop_token_ids"]


def _with_literal(path: str, name: str, lit: bytes) -> Case:
    if path == CHAT and name == "prompt":
        name = "messages"
    base = _OK if path == COMPLETIONS else _OK_CHAT
    raw = base[:-1] + b',"' + name.encode() + b'":' + lit + b"}"
    if name in ("prompt", "messages", "model", "max_tokens"):    # replace rather than duplicate the key
        obj = json.loads(base)
        obj.pop(name, None)
        raw = encode(obj)[:-1] + b',"' + name.encode() + b'":' + lit + b"}"
    return Case(path, raw, {"Content-Type": "application/json"}, style="raw", label=f"{name}={clip_bytes(lit, 40)}")


def raw_cases():
    """Bodies that are not (valid) JSON, or JSON that json.dumps cannot produce."""
    path = st.sampled_from([COMPLETIONS, CHAT])
    base = path.map(lambda p: _OK if p == COMPLETIONS else _OK_CHAT)
    invalid_utf8 = st.sampled_from([b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80",
                                    b"\xe2\x82", b"\x00"])

    def case(label):
        return lambda p, raw: Case(p, raw, {"Content-Type": "application/json"}, style="raw", label=label)
    nesting = st.builds(lambda d, k, c: deep(d, k, c), st.sampled_from([1000, 10_000, 100_000]),
                        st.sampled_from(["array", "object"]), st.booleans())
    return st.one_of(
        st.builds(case("random bytes"), path, st.binary(max_size=64)),
        st.builds(case("invalid UTF-8 inside a valid body"), path,
                  st.builds(_splice, base, st.integers(0, 200), invalid_utf8)),
        st.builds(case("truncated"), path, st.builds(lambda b, i: b[:i % len(b)], base, st.integers(0, 200))),
        st.builds(case("deep nesting"), path, nesting),
        st.builds(case("deep nesting as prompt"), path,
                  nesting.map(lambda d: b'{"model":"tiny","max_tokens":4,"prompt":' + d + b"}")),
        st.builds(case("deep nesting as messages"), path,
                  nesting.map(lambda d: b'{"model":"tiny","max_tokens":4,"messages":' + d + b"}")),
        st.builds(_with_literal, path, st.sampled_from(FIELDS_FOR_LITERALS), st.sampled_from(LITERALS)),
        st.builds(case("top-level scalar"), path, st.sampled_from([b"", b" ", b"\n", b"null", b"[]", b"{}", b'"x"',
                                                                   b"0", b"true", b"NaN", b"[{}]", b"\xef\xbb\xbf{}"])),
        st.builds(case("duplicate keys"), path, st.just(b'{"model":"tiny","model":"nope","prompt":"x","prompt":[1],'
                                                        b'"messages":[],"max_tokens":4,"max_tokens":-1}')),
        st.builds(case("other encodings"), path, st.builds(lambda b, enc: b.decode().encode(enc), base,
                                                          st.sampled_from(["utf-16", "utf-16-le", "utf-32",
                                                                           "utf-8-sig", "latin-1"]))),
        st.builds(case("any JSON"), path, st.builds(encode, any_json)),
    )


# ---------------------------------------------------------------- batch files

GOOD_PROMPTS = ["Question one?", "Tell me about the sea", "1 2 3 4"]
BATCH_MAX_TOKENS = 6


def good_body(url: str, i: int) -> dict:
    p = GOOD_PROMPTS[i % len(GOOD_PROMPTS)]
    inputs = {"prompt": p} if url == COMPLETIONS else {"messages": [{"role": "user", "content": p}]}
    return {"model": MODEL, **inputs, "max_tokens": BATCH_MAX_TOKENS, "temperature": 0}


def good_line(url: str, custom_id: str, i: int) -> bytes:
    return encode({"custom_id": custom_id, "method": "POST", "url": url, "body": good_body(url, i)})


@dataclass
class BatchCase:
    url: str
    lines: list      # [(kind, bytes, custom_id or None, prompt index)]; kind: good, bad, unknown, blank
    trailing_newline: bool = True

    @property
    def data(self) -> bytes:
        return b"\n".join(raw for _, raw, _, _ in self.lines) + (b"\n" if self.trailing_newline else b"")

    def numbers(self, kind: str) -> set:
        return {n for n, (k, *_) in enumerate(self.lines, start=1) if k == kind}

    def describe(self) -> str:
        return "batch file " + "; ".join(f"{n}:{k}:{clip_bytes(raw, 80)}"
                                         for n, (k, raw, _, _) in enumerate(self.lines, start=1))


def _other(url: str) -> str:
    return CHAT if url == COMPLETIONS else COMPLETIONS


def _bad_line_makers():
    """Each: (url, custom_id) -> bytes of a line that no valid batch file contains."""
    def env(**over):
        return lambda url, cid: encode({"custom_id": cid, "method": "POST", "url": url,
                                        **{k: v for k, v in over.items() if v is not ...}})
    garbage = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" "))
    return st.one_of(
        garbage.map(lambda g: lambda url, cid: b"{oops " + g),
        st.sampled_from([b"\xff", b"\xed\xa0\x80", b"\xc0\xaf"]).map(
            lambda junk: lambda url, cid: good_line(url, cid, 0)[:-2] + junk + b"}}"),
        st.just(lambda url, cid: good_line(url, cid, 0)[:-3]),                      # truncated
        st.just(lambda url, cid: good_line(url, cid, 0).replace(b'"Question', b'"\x00Question')),  # raw control char
        st.sampled_from([b"[]", b"1", b'"x"', b"null", b"NaN", b"true", deep(100_000)]).map(lambda j: lambda u, c: j),
        st.sampled_from(["custom_id", "method", "url", "body"]).map(
            lambda k: lambda url, cid: encode({x: v for x, v in json.loads(good_line(url, cid, 0)).items() if x != k})),
        st.just(lambda url, cid: encode({**json.loads(good_line(url, cid, 0)), "extra": 1})),
        st.sampled_from([1, "", "c" * 513, None, ["x"], {"a": 1}]).map(
            lambda bad: lambda url, cid: encode({**json.loads(good_line(url, cid, 0)), "custom_id": bad})),
        st.sampled_from(["GET", "post", "", None, 1]).map(
            lambda m: lambda url, cid: encode({**json.loads(good_line(url, cid, 0)), "method": m})),
        st.sampled_from(["/v1/embeddings", "", "/v1/completions/", "v1/completions", None, 1, "\ud800"]).map(
            lambda u: lambda url, cid: encode({**json.loads(good_line(url, cid, 0)), "url": u})),
        st.just(lambda url, cid: good_line(_other(url), cid, 0)),                   # the other endpoint
        st.sampled_from([[], "x", 1, None, [{"model": MODEL}]]).map(
            lambda b: lambda url, cid: encode({**json.loads(good_line(url, cid, 0)), "body": b})),
        st.sampled_from([{"stream": True}, {"model": "missing"}, {"temperature": 7}, {"max_tokens": -1},
                         {"top_p": 0}, {"n": 0}, {"model": None}]).map(
            lambda over: lambda url, cid: encode({**json.loads(good_line(url, cid, 0)),
                                                  "body": {**good_body(url, 0), **over}})),
    )


HUGE_LINE = (b'{"custom_id":"huge","method":"POST","url":"/v1/completions","body":{"prompt":"'
             + b"a" * (4 * 2**20) + b'"}}')


def batch_cases(budget: int = TOKEN_BUDGET):
    """A batch file: a valid first line, then a mix of valid, invalid, blank and doubtful lines."""
    line = weighted(
        (4, st.tuples(st.just("good"), st.integers(0, len(GOOD_PROMPTS) - 1))),
        (3, st.tuples(st.just("bad"), _bad_line_makers())),
        (1, st.tuples(st.just("dup"), st.none())),
        (1, st.tuples(st.just("blank"), st.sampled_from([b"", b" ", b"\t", b"\r", b"  \r"]))),
        (3, st.tuples(st.just("unknown"), st.one_of(completion_bodies(budget), chat_bodies(budget)),
                      styles)),
        (1, st.tuples(st.just("unknown-envelope"), any_json)),
    )
    huge = weighted((40, st.just(False)), (1, st.just(True)))

    def assemble(url, first_prompt, specs, huge_line, crlf, trailing):
        lines = [("good", good_line(url, "g1", first_prompt), "g1", first_prompt)]
        for i, spec in enumerate(specs, start=2):
            kind = spec[0]
            if kind == "good":
                lines.append(("good", good_line(url, f"g{i}", spec[1]), f"g{i}", spec[1]))
            elif kind == "bad":
                lines.append(("bad", spec[1](url, f"b{i}"), None, None))
            elif kind == "dup":      # the first line's custom_id again
                lines.append(("bad", good_line(url, "g1", 1), None, None))
            elif kind == "blank":
                lines.append(("blank", spec[1], None, None))
            elif kind == "unknown":  # a valid envelope around a hostile body: valid or not, we do not say
                lines.append(("unknown", encode({"custom_id": f"u{i}", "method": "POST", "url": url,
                                                 "body": spec[1]}, spec[2]), f"u{i}", None))
            else:
                lines.append(("unknown", encode(spec[1]), None, None))
        if huge_line:
            lines.insert(1, ("bad", HUGE_LINE, None, None))
        if crlf:
            lines = [(k, raw + b"\r", c, p) for k, raw, c, p in lines]
        return BatchCase(url, lines, trailing)
    return st.builds(assemble, st.sampled_from([COMPLETIONS, CHAT]), st.integers(0, len(GOOD_PROMPTS) - 1),
                     st.lists(line, min_size=1, max_size=12), huge, weighted((6, st.just(False)), (1, st.just(True))),
                     st.booleans())


# ---------------------------------------------------------------- describing what failed


def safe(text: str) -> str:
    """Printable anywhere: lone surrogates (from the daemon's error messages) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def clip_bytes(raw: bytes, limit: int = 120) -> str:
    if len(raw) <= limit:
        return repr(raw)
    return f"{raw[:limit // 2]!r}...{raw[-limit // 4:]!r} ({len(raw)} bytes)"


def describe(value, depth: int = 0) -> str:
    """A short JSON-like rendering: long strings and lists and deep nesting are summarized."""
    if depth > 6:
        return "..."
    if isinstance(value, str):
        if len(value) > 60:
            unit = value[:1]
            if value == unit * len(value):
                return f"{unit!r}*{len(value)}"
            return f"{value[:40]!r}... ({len(value)} chars)"
        return repr(value)
    if isinstance(value, list):
        if len(value) > 8:
            if all(v == value[0] for v in value):
                return f"[{describe(value[0], depth + 1)}]*{len(value)}"
            return "[" + ", ".join(describe(v, depth + 1) for v in value[:3]) + f", ... ({len(value)} items)]"
        return "[" + ", ".join(describe(v, depth + 1) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{describe(k)}: {describe(v, depth + 1)}" for k, v in value.items()) + "}"
    if isinstance(value, float) and not math.isfinite(value):
        return {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}[repr(value)]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**20:
        return f"{'-' if value < 0 else ''}10**{len(str(abs(value))) - 1}ish({str(value)[:12]}...)"
    return json.dumps(value) if isinstance(value, (bool, type(None))) else repr(value)


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Overflow|Warning)\b.*")
_LOG_PROBLEM = re.compile(r" (ERROR|CRITICAL|WARNING) ")


@dataclass
class Outcome:
    status: object              # an HTTP status, or "timeout", "dropped", "unsendable"
    kind: str | None = None     # None: every invariant held; else crash, wedge, shape, leak
    detail: str = ""
    log: list = field(default_factory=list)
    seconds: float = 0.0
    param: str | None = None    # error.param of a 4xx answer (else its code or message, for the counts)
    named: str | None = None    # error.param of a 4xx answer as it came
    message: str = ""           # error.message of a 4xx answer

    @property
    def signature(self) -> tuple:
        """What tells two findings apart: their kind, status and first exception (digits dropped)."""
        first = next((line for line in self.log if _EXC_LINE.match(line)), self.log[0] if self.log else "")
        first = first.split(" ", 4)[-1] if _LOG_PROBLEM.search(first) else first
        norm = re.sub(r"0x[0-9a-f]+|\d+|'[^']*'|\"[^\"]*\"", "#", first or self.detail)[:100]
        return (self.kind, self.status, norm)


@dataclass
class Finding:
    kind: str
    endpoint: str
    status: object
    case: str
    detail: str
    log: list
    count: int = 1
    minimal: str | None = None
    last: str | None = None      # the latest case that failed this way, when it was another

    def __str__(self) -> str:
        log = "".join(f"\n      log: {line[:300]}" for line in self.log[:4])
        minimal = f"\n      minimal: {self.minimal}" if self.minimal and self.minimal != self.case else ""
        minimal += f"\n      latest: {self.last[:600]}" if self.last and self.last != self.case else ""
        return (f"[{self.kind}] {self.endpoint} -> {self.status} (x{self.count}): {self.detail[:300]}\n"
                f"      case: {self.case[:600]}{minimal}{log}")


# ---------------------------------------------------------------- the campaign


class Fuzzer:
    """Sends cases to a real daemon and checks the invariants after each. `start(home)`
    returns a ready Daemon (tests/daemon_harness.py); a wedged daemon is replaced by a
    fresh one under `root`. Findings are collected (one per distinct signature), not raised."""

    def __init__(self, start: Callable, root: Path, timeout: float = 60.0, minimize: bool = True,
                 max_wedges: int | None = None, verbose: bool = False):
        self.start, self.root, self.timeout = start, Path(root), timeout
        self.minimize, self.max_wedges, self.verbose = minimize, max_wedges, verbose
        self.findings: dict[tuple, Finding] = {}
        self.cases: Counter = Counter()        # per endpoint
        self.statuses: Counter = Counter()     # (endpoint, status)
        self.counts: Counter = Counter()       # per finding kind, every occurrence
        self.params: Counter = Counter()       # (endpoint, error.param) of 4xx answers
        self.schema_cases: Counter = Counter()  # cases from /openapi.json: "valid" / "invalid" by the schema
        self.wedges_now = 0                    # of the current campaign (see max_wedges)
        self.skipped = 0
        self.seen: set = set()
        self.duplicates = 0
        self.starts = 0
        self.restart_reasons: list = []
        self.daemon = None
        self._boot()
        self.reference = {path: self._reference_text(path) for path in REFERENCE}
        self.batch_reference = {(url, i): self._text(self._post_json(url, good_body(url, i)), url)
                                for url in (COMPLETIONS, CHAT) for i in range(len(GOOD_PROMPTS))}
        thread, result = self._bystander()
        thread.join(self.timeout)
        assert "text" in result, result
        self.bystander_text = result["text"]

    # -- the daemon

    def _boot(self) -> None:
        self.daemon = self.start(self.root / f"d{self.starts}")
        self.starts += 1
        self.http = self.daemon.http(timeout=self.timeout)
        self.restarts = self._restarts()

    def restart(self, reason: str = "") -> None:
        """Replace a daemon that does not answer any more; kill whatever of it is left."""
        self.restart_reasons.append(reason)
        if self.verbose:
            print(safe(f"  restarting the daemon: {reason[:300]}"), flush=True)
        try:
            kids = psutil.Process(self.daemon.proc.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        self.http.close()
        self.daemon.stop(timeout=15)
        for p in kids:  # a driver stuck in a computation may not notice that its kernel is gone
            try:
                p.kill()
            except psutil.Error:
                pass
        self._boot()

    def close(self) -> None:
        self.http.close()
        self.daemon.stop(timeout=15)

    def _restarts(self) -> dict:
        ps = self.http.get("/llmos/v1/ps").json()
        return {p["name"]: (p["restarts"], p["state"]) for p in ps["processes"]}

    # -- requests

    def _post_json(self, path: str, body: dict) -> httpx.Response:
        return self.http.post(path, json=body)

    @staticmethod
    def _text(r: httpx.Response, path: str) -> str:
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["text"] if path == COMPLETIONS else choice["message"]["content"]

    def _reference_text(self, path: str) -> str:
        return self._text(self._post_json(path, REFERENCE[path]), path)

    def _fresh_connection(self) -> None:
        self.http.close()
        self.http = self.daemon.http(timeout=self.timeout)

    def send(self, case: Case, retry: bool = True) -> Outcome:
        """One request; its status and whether its answer keeps the invariants. A request
        that finds its connection dropped is sent once more on a fresh one (the server may
        have closed a kept-alive connection after the previous answer)."""
        out = self._send(case)
        if retry and out.status == "dropped":
            self._fresh_connection()
            out = self._send(case)
        return out

    def _send(self, case: Case) -> Outcome:
        t0 = time.monotonic()
        deadline = t0 + self.timeout
        try:
            with self.http.stream("POST", case.path, content=case.raw, headers=case.headers) as r:
                chunks = []
                for chunk in r.iter_bytes():
                    chunks.append(chunk)
                    if time.monotonic() > deadline:
                        return Outcome("timeout", "wedge", f"the answer did not end within {self.timeout:g} s",
                                       seconds=time.monotonic() - t0)
                status, ctype, data = r.status_code, r.headers.get("content-type", ""), b"".join(chunks)
        except httpx.TimeoutException:
            return Outcome("timeout", "wedge", f"no answer within {self.timeout:g} s", seconds=time.monotonic() - t0)
        except (httpx.LocalProtocolError, UnicodeEncodeError) as exc:   # a header value h11 will not send
            return Outcome("unsendable", None, str(exc))
        except httpx.TransportError as exc:
            return Outcome("dropped", "crash", f"the connection ended without an answer: {exc!r}",
                           seconds=time.monotonic() - t0)
        out = Outcome(status, seconds=time.monotonic() - t0)
        out.kind, out.detail = _judge(status, ctype, data)
        if out.kind == "invalid_response" and 400 <= status < 500 and _http_level(case.headers):
            out.kind, out.detail = None, ""   # refused by the HTTP layer (aiohttp's parser), in its own words
        if isinstance(status, int) and 400 <= status < 500 and out.kind is None:
            out.param, (out.named, out.message) = _error_param(data), _error_fields(data)
        return out

    # -- one case

    def _log_sizes(self) -> dict:
        home = self.daemon.home
        return {f: f.stat().st_size for f in [*home.glob("logs/*.log"), home / "llmosd.out"] if f.exists()}

    def _new_log(self, sizes: dict) -> list:
        """Problem lines the daemon logged since `sizes`: ERROR/WARNING lines and exception lines."""
        out = []
        for f in sorted([*self.daemon.home.glob("logs/*.log"), self.daemon.home / "llmosd.out"]):
            if not f.exists():
                continue
            with open(f, "rb") as fh:
                fh.seek(sizes.get(f, 0))
                text = fh.read(2_000_000).decode("utf-8", "replace")
            for line in text.splitlines():
                if _LOG_PROBLEM.search(line) or _EXC_LINE.match(line):
                    out.append(f"{f.stem}: {line.strip()}")
        return out

    def after(self, path: str, answered: bool = True) -> Outcome | None:
        """The daemon after a case: the case's kept-alive connection still serves the next
        request, no driver restarted, nothing left in flight, and the reference request still
        gives the reference text. None when all holds."""
        connection = self._connection_check() if answered else None
        out = self._after(path)
        if out is not None and out.status == "dropped":   # a stale kept-alive connection?
            self._fresh_connection()
            out = self._after(path)
        return out or connection

    def _connection_check(self) -> Outcome | None:
        """GET /health on the connection the case used. A server may close a kept-alive
        connection (then a fresh one is used), but it must not answer it wrongly or late."""
        try:
            r = self.http.get("/health")
            ok = r.status_code == 200 or "status" in r.json()
        except httpx.TimeoutException:
            self._fresh_connection()
            return Outcome("timeout", "connection", f"the next request on the case's kept-alive connection "
                                                    f"(GET /health) got no answer within {self.timeout:g} s")
        except httpx.TransportError:
            self._fresh_connection()
            return None
        except (ValueError, AttributeError, TypeError):
            ok = False
        if ok:
            return None
        self._fresh_connection()
        return Outcome(r.status_code, "connection", f"the next request on the case's kept-alive connection "
                                                    f"(GET /health) was answered {r.status_code}: {r.text[:200]}")

    def _after(self, path: str) -> Outcome | None:
        try:
            now = self._restarts()
            if now != self.restarts:
                changed = {k: v for k, v in now.items() if self.restarts.get(k) != v}
                self.restarts = now
                return Outcome("-", "crash", f"driver restarted or not running: {changed}")
            deadline = time.monotonic() + 60   # (milliseconds normally; a loaded machine, seconds)
            while (left := self.http.get("/llmos/v1/ps").json()["requests"]) and time.monotonic() < deadline:
                time.sleep(0.05)
            if left:
                return Outcome("-", "leak", f"still in flight 60 s after the answer: {describe(left)[:300]}")
            r = self._post_json(path, REFERENCE[path])
            if r.status_code != 200:
                return Outcome(r.status_code, "wedge", f"the reference request then failed: {r.text[:300]}")
            text = self._text(r, path)
            if text != self.reference[path]:
                return Outcome(200, "wedge", f"the reference request then answered {text!r}, "
                                             f"not {self.reference[path]!r}")
        except httpx.TimeoutException:
            return Outcome("timeout", "wedge", f"the reference request then got no answer within {self.timeout:g} s")
        except httpx.TransportError as exc:
            return Outcome("dropped", "wedge", f"the daemon then failed to answer: {exc!r}")
        except (ValueError, KeyError) as exc:
            return Outcome("-", "wedge", f"the daemon then answered nonsense: {exc!r}")
        return None

    def _bystander(self):
        """Start the BYSTANDER stream in a thread; returns once it produced text (or failed)
        with the thread and its result: {"text": ...} or {"error": ...}."""
        result, started = {}, threading.Event()

        def run():
            try:
                with self.daemon.http(timeout=self.timeout) as c, \
                        c.stream("POST", COMPLETIONS, json=BYSTANDER) as r:
                    if r.status_code != 200:
                        result["error"] = f"HTTP {r.status_code}: {r.read()[:300]!r}"
                        return
                    text = ""
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        obj = json.loads(line[6:])
                        if "error" in obj:
                            result["error"] = f"error event: {line[6:306]}"
                            return
                        text += obj["choices"][0]["text"]
                        started.set()
                    result["text"] = text
            except Exception as exc:  # what ended it is the finding
                result["error"] = repr(exc)
            finally:
                started.set()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        started.wait(self.timeout)
        return thread, result

    def probe(self, case: Case, bystander: bool = False) -> Outcome:
        """Send a case, check the daemon after it (restarting a wedged one); the outcome of both.
        `bystander`: with the BYSTANDER request running meanwhile; its failure, or another
        text than alone, is a "collateral" outcome."""
        sizes = self._log_sizes()
        if bystander:
            thread, result = self._bystander()
        out = self.send(case)
        if bystander:
            thread.join(self.timeout)
            if thread.is_alive():
                result["error"] = f"no end within {self.timeout:g} s"
            if "error" in result or result.get("text") != self.bystander_text:
                why = result.get("error") or f"it answered {result.get('text')!r}, alone {self.bystander_text!r}"
                out.kind, out.detail = "collateral", f"a concurrent request failed: {why}"
        after = self.after(case.path, answered=isinstance(out.status, int))
        if after is not None and out.kind is None:
            out.kind, out.detail = after.kind, after.detail
        elif after is not None:
            out.detail += f"; then: {after.detail}"
        out.log = self._new_log(sizes)
        if after is not None and after.kind == "wedge":
            out.kind = "wedge"
            self.restart(f"after {case.describe(200)}: {out.detail}")
        elif out.kind == "wedge":   # that request got no answer, but the daemon serves the next one
            out.kind = "hang"
        return out

    def check(self, case: Case, dedupe: bool = True) -> Outcome:
        """Run a case as part of the campaign: counted, and recorded when it breaks an invariant."""
        if self.max_wedges is not None and self.wedges_now >= self.max_wedges:
            self.skipped += 1
            return Outcome("skipped")
        endpoint = ENDPOINTS.get(case.path, case.path) + (" (raw)" if case.style == "raw" else "")
        key = hashlib.sha1(repr((case.path, case.raw, sorted(case.headers.items()))).encode()).digest()
        if dedupe and key in self.seen:   # hypothesis draws some cases more than once: each runs once
            self.duplicates += 1
            return Outcome("duplicate")
        self.seen.add(key)
        out = self.probe(case)
        if case.expect is not None:
            self.schema_cases["valid" if case.expect[1] else "invalid"] += 1
            if out.kind is None and (problem := expectation_problem(case.expect, out)):
                out.kind, out.detail = "unnamed", problem
        self.cases[endpoint] += 1
        self.statuses[(endpoint, out.status)] += 1
        if isinstance(out.status, int) and 400 <= out.status < 500:
            self.params[(endpoint, out.param)] += 1
        if self.verbose:
            print(safe(f"  {out.status} {out.seconds:5.2f}s {out.kind or ''} [{out.param or ''}] "
                       f"{case.describe(160)}"), flush=True)
        if out.kind is not None:
            self._record(endpoint, out, case.describe(), lambda: self._minimal(case, out.signature))
        if isinstance(out.status, int) and (out.status == 200 or out.status >= 500) and out.kind != "wedge":
            # it reached the model: once more, with a request running beside it
            again = Case(case.path, case.raw, {k: v for k, v in case.headers.items() if k.lower() != "x-request-id"},
                         case.body, case.style, case.label)
            side = self.probe(again, bystander=True)
            if side.kind == "collateral":
                self._record(endpoint, side, again.describe())
        return out
        return out

    def _record(self, endpoint: str, out: Outcome, case: str, minimal: Callable | None = None) -> None:
        self.counts[out.kind] += 1
        if out.kind in ("wedge", "hang"):
            self.wedges_now += 1
        key = (endpoint, *out.signature)
        if key in self.findings:
            self.findings[key].count += 1
            self.findings[key].last = case
            return
        f = self.findings[key] = Finding(out.kind, endpoint, out.status, case, out.detail, out.log)
        if minimal is not None and self.minimize and out.kind not in ("wedge", "hang"):
            f.minimal = minimal()

    def _minimal(self, case: Case, signature: tuple) -> str | None:
        """Drop the body's fields one at a time while the case still fails the same way."""
        body = case.body
        if case.style == "raw" or not isinstance(body, dict):
            return None
        tries = 0
        for key in list(body):
            if tries >= 25:
                break
            smaller = {k: v for k, v in body.items() if k != key}
            tries += 1
            out = self.probe(Case(case.path, encode(smaller, case.style), case.headers, smaller, case.style))
            if self.verbose:
                print(safe(f"    probe {out.status} {out.kind or ''} {describe(smaller)[:160]}"), flush=True)
            if out.signature == signature:
                body = smaller
        hdrs = dict(case.headers)
        for key in list(hdrs):
            if key.lower() == "content-type" and hdrs[key] == "application/json":
                continue
            fewer = {k: v for k, v in hdrs.items() if k != key}
            if self.probe(Case(case.path, encode(body, case.style), fewer, body, case.style)).signature == signature:
                hdrs = fewer
        return Case(case.path, encode(body, case.style), hdrs, body, case.style).describe()

    # -- batch files

    def check_batch(self, case: BatchCase) -> Outcome | None:
        if self.max_wedges is not None and self.wedges_now >= self.max_wedges:
            self.skipped += 1
            return None
        key = hashlib.sha1(case.url.encode() + case.data).digest()
        if key in self.seen:
            self.duplicates += 1
            return Outcome("duplicate")
        self.seen.add(key)
        endpoint = "batch"
        sizes = self._log_sizes()
        t0 = time.monotonic()
        problem, status, ran_job = self._guarded(lambda: self._batch_case(case), "the upload")
        then = None
        if problem is not None or not ran_job:
            then = self._guarded(lambda: (self._valid_job(case.url),), "a valid batch job")[0]
        if then is None:
            after = self.after(case.url)
            then = None if after is None else (after.kind, after.detail)
        if problem is None:
            problem = then
        elif then is not None:
            problem = ("wedge" if then[0] == "wedge" else problem[0], f"{problem[1]}; then: {then[1]}")
        self.cases[endpoint] += 1
        self.statuses[(endpoint, status)] += 1
        if self.verbose:
            print(safe(f"  batch {status} {time.monotonic() - t0:5.2f}s {problem or ''} {case.describe()[:160]}"),
                  flush=True)
        if problem is not None:
            kind, detail = problem
            self._record(endpoint, Outcome(status, kind, detail, self._new_log(sizes)), case.describe())
            if kind == "wedge":
                self.restart(f"after {case.describe()[:200]}: {detail}")

    def _guarded(self, fn: Callable, what: str):
        """fn(), with a daemon that stops answering (or answers nonsense) as a finding."""
        try:
            return fn()
        except httpx.TimeoutException:
            return ("wedge", f"{what} got no answer within {self.timeout:g} s"), "timeout", False
        except httpx.TransportError as exc:
            return ("crash", f"{what}: the connection ended without an answer: {exc!r}"), "dropped", False
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return ("invalid_response", f"{what}: unexpected answer: {exc!r}"), "-", False

    def _upload(self, data: bytes) -> httpx.Response:
        return self.http.post("/v1/files", data={"purpose": "batch"},
                              files={"file": ("fuzz.jsonl", data, "application/jsonl")})

    def _batch_case(self, case: BatchCase):
        """(problem or None, upload status, whether a job of the file ran)."""
        good, bad, unknown = case.numbers("good"), case.numbers("bad"), case.numbers("unknown")
        r = self._upload(case.data)
        status = r.status_code
        kind, detail = _judge(status, r.headers.get("content-type", ""), r.content, stream=False)
        if kind is not None:
            return (kind, f"upload: {detail}"), status, False
        body = r.json()
        if status == 400 and body["error"].get("code") == "invalid_batch_file":
            named = set(body["error"].get("lines") or [])
            msg = body["error"]["message"]
            wrong = []
            if bad - named:
                wrong.append(f"bad lines {sorted(bad - named)} not named")
            if named & good:
                wrong.append(f"valid lines {sorted(named & good)} named as bad")
            if named - bad - unknown:
                wrong.append(f"lines {sorted(named - bad - unknown)} named but blank or valid")
            if missing := [n for n in sorted(named)[:20] if f"line {n}:" not in msg]:
                wrong.append(f"the message does not say what is wrong with lines {missing}")
            return (("invalid_response", "upload 400: " + "; ".join(wrong) + f" ({msg[:300]})") if wrong else None,
                    status, False)
        if status != 200:
            return ("invalid_response", f"upload answered {status}: {r.text[:300]}"), status, False
        if bad:
            return ("invalid_response", f"upload accepted a file with bad lines {sorted(bad)}"), status, False
        problem = self._run_job(r.json(), case, good | unknown)
        return problem, status, True

    def _run_job(self, file: dict, case: BatchCase, expected: set):
        r = self.http.post("/v1/batches", json={"input_file_id": file["id"], "endpoint": case.url,
                                                "completion_window": "24h"})
        if r.status_code != 200:
            return ("invalid_response", f"POST /v1/batches answered {r.status_code}: {r.text[:300]}")
        job = r.json()
        wait = max(120.0, self.timeout)
        deadline = time.monotonic() + wait
        while job["status"] not in ("completed", "failed", "cancelled", "expired"):
            if time.monotonic() > deadline:
                return ("wedge", f"job {job['id']} is still {job['status']} after {wait:g} s: "
                                 f"{job['request_counts']}")
            time.sleep(0.1)
            job = self.http.get(f"/v1/batches/{job['id']}").json()
        if job["status"] != "completed":
            return ("invalid_response", f"job {job['id']} ended {job['status']}: {job.get('errors')}")
        results = {}
        for fid in (job["llmos"].get("output_file_id"), job["llmos"].get("error_file_id")):
            if fid:
                for line in self.http.get(f"/v1/files/{fid}/content").text.splitlines():
                    obj = json.loads(line)
                    if obj["custom_id"] in results:
                        return ("invalid_response", f"custom_id {obj['custom_id']} has two results")
                    results[obj["custom_id"]] = obj
        by_line = {n: (cid, prompt) for n, (k, _, cid, prompt) in enumerate(case.lines, start=1)}
        want = {by_line[n][0] for n in expected if by_line[n][0] is not None}
        if not want <= set(results) or len(results) != len(expected):
            return ("invalid_response", f"results for {sorted(results)}, expected {len(expected)} "
                                        f"including {sorted(want)}")
        for n in sorted(expected):
            cid, prompt = by_line[n]
            res = results.get(cid)
            if res is None:
                continue
            code = (res.get("response") or {}).get("status_code")
            if prompt is not None:   # a valid line: its greedy answer, as asked interactively
                try:
                    text = _result_text(res, case.url)
                except (KeyError, IndexError, TypeError):
                    return ("invalid_response", f"line {n} ({cid}) has no answer: {json.dumps(res)[:300]}")
                if text != self.batch_reference[(case.url, prompt)]:
                    return ("wedge", f"line {n} ({cid}) answered {text!r}, not "
                                     f"{self.batch_reference[(case.url, prompt)]!r}")
            elif isinstance(code, int) and code >= 500 and code not in ALLOWED_5XX:
                return ("crash", f"line {n} ({cid}) failed with {code}: {json.dumps(res)[:300]}")
        return None

    def _valid_job(self, url: str):
        """A job of valid lines, after a rejected upload: it must complete, answers exact."""
        case = BatchCase(url, [("good", good_line(url, f"v{i}", i), f"v{i}", i) for i in range(len(GOOD_PROMPTS))])
        r = self._upload(case.data)
        if r.status_code != 200:
            return ("wedge", f"a valid batch file was then refused: {r.status_code} {r.text[:300]}")
        return self._run_job(r.json(), case, case.numbers("good"))

    # -- the end of a campaign

    def memory_back_to_empty(self) -> None:
        """Every block back in the pool once nothing runs (a leak finding otherwise)."""
        deadline = time.monotonic() + 60
        while (mem := self.http.get("/llmos/v1/memory").json()[MODEL])["blocks_used"] and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        if mem["blocks_used"]:
            self._record("memory", Outcome("-", "leak", f"{mem['blocks_used']} KV blocks still used with nothing "
                                                        f"running"), "after the campaign")

    def snapshot(self) -> dict:
        return {key: f.count for key, f in self.findings.items()}

    def since(self, snapshot: dict) -> list:
        """The findings that are new, or seen again, since `snapshot`."""
        return [f for key, f in self.findings.items() if f.count > snapshot.get(key, 0)]

    def report(self, findings=None) -> str:
        findings = list(self.findings.values()) if findings is None else findings
        return safe("\n".join(f"  {i}. {f}" for i, f in enumerate(findings, start=1)))


def _result_text(res: dict, url: str) -> str:
    choice = res["response"]["body"]["choices"][0]
    return choice["text"] if url == COMPLETIONS else choice["message"]["content"]


_FIELD_VALUE = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*$")


def _http_level(headers: dict) -> bool:
    """Whether the HTTP layer may refuse the request before the API sees it: a header value
    that is not a field-value of RFC 9110 (VCHAR, obs-text, SP, HTAB), or a Content-Encoding."""
    return any(k.lower() == "content-encoding" for k in headers) or not all(
        _FIELD_VALUE.match(v if isinstance(v, bytes) else v.encode("utf-8", "surrogatepass"))
        for v in headers.values())


def _error_fields(data: bytes) -> tuple:
    """(error.param, error.message) of an error answer."""
    try:
        err = json.loads(data)["error"]
        return err.get("param"), str(err.get("message"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None, ""


def names_field(field: str, param, message: str) -> bool:
    """Whether an error names `field`: its param is the field (or a path into it) and its
    message says the field."""
    return isinstance(param, str) and (param == field or param.startswith((f"{field}.", f"{field}["))) \
        and field in message


def expectation_problem(expect: tuple, out: Outcome) -> str | None:
    """What a case from the schema (fuzz_schema.py) got wrong: a 4xx that names no field, or
    a body the schema refuses that is not a 400 naming the field that was changed."""
    field, valid = expect
    if not isinstance(out.status, int):
        return None
    if 400 <= out.status < 500 and out.status not in (408, 413, 429) and not out.named:
        return f"a {out.status} that names no field: {out.message[:200]!r}"
    if valid:
        return None
    if out.status != 400:
        return f"the schema refuses this {field}, the daemon answered {out.status}"
    if not names_field(field, out.named, out.message):
        return f"the schema refuses this {field}, the 400 names {out.named!r}: {out.message[:200]!r}"
    return None


def _error_param(data: bytes):
    try:
        err = json.loads(data)["error"]
        return err.get("param") or err.get("code") or (err.get("message") or "")[:40]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _judge(status: int, ctype: str, data: bytes, stream: bool = True) -> tuple:
    """(kind or None, detail) of one HTTP answer."""
    if status >= 500 and status not in ALLOWED_5XX:
        return "crash", f"HTTP {status}: {data[:300].decode('utf-8', 'replace')}"
    if stream and status == 200 and ctype.startswith("text/event-stream"):
        events = [line[6:] for line in data.decode("utf-8", "replace").split("\n") if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return "invalid_response", f"the stream did not end with [DONE]: ...{data[-200:]!r}"
        for ev in events[:-1]:
            try:
                obj = json.loads(ev)
            except ValueError:
                return "invalid_response", f"a stream event is not JSON: {ev[:200]!r}"
            err = obj.get("error") if isinstance(obj, dict) else None
            if isinstance(err, dict) and (err.get("type") == "server_error" or err.get("code") == "internal_error"):
                return "crash", f"error event in the stream: {ev[:300]}"
        return None, ""
    try:
        obj = json.loads(data)
    except ValueError:
        return "invalid_response", f"HTTP {status} with a body that is not JSON: {data[:200]!r}"
    if status == 200:
        if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list) or not obj["choices"]:
            if not stream:   # (other routes answer other objects)
                return None, ""
            return "invalid_response", f"HTTP 200 without choices: {data[:200]!r}"
        return None, ""
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        return "invalid_response", f"HTTP {status} error not in OpenAI's shape: {data[:200]!r}"
    return None, ""


FUZZ_SETTINGS = dict(deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                     suppress_health_check=list(HealthCheck), report_multiple_bugs=False)


def campaign(check: Callable, strategy, max_examples: int, seed: int, fuzzer: Fuzzer | None = None,
             rounds: int = 4):
    """Run `check(case)` on `max_examples` cases drawn from `strategy` with a fixed seed (the
    same cases every run). No shrinking: every case is checked and the Fuzzer collects the
    findings instead of the first one failing the run. With a fuzzer, cases hypothesis draws
    twice run once, and further rounds (seed + 1000 each) make up for them."""
    if fuzzer is not None:
        fuzzer.wedges_now = 0
    done = [0]

    def one(case):
        if done[0] >= max_examples:
            return
        out = check(case)
        if not (isinstance(out, Outcome) and out.status == "duplicate"):
            done[0] += 1
    for r in range(rounds if fuzzer is not None else 1):
        @hypothesis_seed(seed + 1000 * r)
        @settings(max_examples=max_examples, derandomize=False, **FUZZ_SETTINGS)
        @given(strategy)
        def run(case):
            one(case)
        run()
        if done[0] >= max_examples:
            break
    return done[0]
