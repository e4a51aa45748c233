"""Fuzz the whole daemon (issue 10, point 7): hypothesis-generated hostile request bodies
for /v1/completions and /v1/chat/completions, raw garbage bodies and hostile batch files,
sent to a real llmosd serving the tiny model, and bodies derived from the daemon's own
GET /openapi.json (tests/fuzz_schema.py: each a valid body with one field changed; one the
schema refuses must be a 400 naming that field, and every 4xx must name a field). After
every case: the answer is < 500 (or a documented 503/504), it came within 60 s, no driver
restarted, nothing is left in flight, and a normal greedy request still answers the
reference text. The strategies and checks
live in tests/fuzz_bodies.py (shared with benchmarks/fuzz.py, which runs a bigger budget).

Cases are drawn with fixed seeds (the same cases every run); findings are collected over
the whole campaign and listed when a test fails, each with the daemon's log lines.
"""
from __future__ import annotations

import json
import os

import pytest

import fuzz_bodies as fb
import fuzz_schema as fs
from daemon_harness import Daemon
from fuzz_bodies import CHAT, COMPLETIONS, Case, encode

EXAMPLES = 150          # per endpoint
RAW_EXAMPLES = 80
BATCH_EXAMPLES = 40
SCHEMA_EXAMPLES = 100   # per endpoint, from the served /openapi.json
SCHEMA_BATCH_EXAMPLES = 12
MAX_WEDGES = 1          # a wedge costs two timeouts and a restart: stop a campaign after the first


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory, tiny_llama_dir):
    def start(home):
        return Daemon(home, [f"tiny={tiny_llama_dir}"], "--max-model-len", "256", "--drain-timeout", "5").wait_ready()
    f = fb.Fuzzer(start, tmp_path_factory.mktemp("fuzz"), timeout=60.0, max_wedges=MAX_WEDGES,
                  verbose=bool(os.environ.get("FUZZ_VERBOSE")))
    yield f
    f.close()


def assert_clean(fuzzer, before: dict) -> None:
    fuzzer.memory_back_to_empty()
    new = fuzzer.since(before)
    skipped = f" ({fuzzer.skipped} cases skipped after a wedge)" if fuzzer.skipped else ""
    fuzzer.skipped = 0
    if new:
        pytest.fail(f"{len(new)} distinct finding(s){skipped}:\n{fuzzer.report(new)}", pytrace=False)


def _raw(path, raw, label, headers=None):
    return Case(path, raw, headers or {"Content-Type": "application/json"}, style="raw", label=label)


def _json(path, body, **headers):
    return Case(path, encode(body), {"Content-Type": "application/json", **headers}, body)


_P = {"model": "tiny", "prompt": "Hello", "max_tokens": 4}
_M = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}

# Hand-picked hostile cases, run first every time (the known bugs of issue 10 among them).
CORPUS = [
    _json(COMPLETIONS, {**_P, "top_k": 2**31}),
    _json(COMPLETIONS, {**_P, "prompt": "\ud800"}),
    _json(CHAT, {**_M, "messages": [{"role": "user", "content": "a\udfffb"}]}),
    _json(COMPLETIONS, {**_P, "max_tokens": 2**64}),
    _json(COMPLETIONS, {**_P, "seed": 2**64}),
    _json(COMPLETIONS, {**_P, "min_tokens": 2**64}),
    _json(COMPLETIONS, {**_P, "stop_token_ids": [2**64]}),
    _json(COMPLETIONS, {**_P, "prompt": [2**64]}),
    _json(COMPLETIONS, {**_P, "prompt": [fb.VOCAB]}),
    _json(COMPLETIONS, {**_P, "priority": 2**64}),
    _json(COMPLETIONS, {**_P, "priority": "batch:99999999999999999999"}),
    _json(COMPLETIONS, {**_P, "timeout": 10**400}),
    _json(COMPLETIONS, {**_P, "timeout": float("nan")}),
    _json(COMPLETIONS, {**_P, "queue_timeout": float("inf")}),
    _json(COMPLETIONS, {**_P, "temperature": float("nan")}),
    _json(COMPLETIONS, {**_P, "top_p": 1e-300, "temperature": 1}),    # 0 once a float32
    _json(COMPLETIONS, {**_P, "temperature": 5e-324}),
    _json(COMPLETIONS, {**_P, "top_k": fb.VOCAB + 1, "temperature": 1}),
    _json(CHAT, {**_M, "top_logprobs": 20, "logprobs": True, "n": 4}),
    _json(COMPLETIONS, {**_P, "n": 128, "max_tokens": 2, "logprobs": 20, "stream": True}),
    _json(COMPLETIONS, {**_P, "n": 12, "max_tokens": 4, "logprobs": 20, "stream": True}),
    _json(COMPLETIONS, {**_P, "n": 128, "max_tokens": 4, "ignore_eos": True}),
    _json(COMPLETIONS, {**_P, "stop": ["x"] * 1000}),
    _json(COMPLETIONS, _P, **{"X-Request-Id": "x" * 129}),
    _raw(COMPLETIONS, fb.deep(100_000), "100,000 nested arrays"),
    _raw(CHAT, fb.deep(100_000, "object"), "100,000 nested objects"),
    _raw(COMPLETIONS, b'{"model":"tiny","max_tokens":4,"prompt":' + fb.deep(100_000) + b"}", "deep prompt"),
    _raw(COMPLETIONS, b'{"model":"tiny","prompt":"x","max_tokens":4,"temperature":NaN}', "NaN literal"),
    _raw(COMPLETIONS, b'{"model":"tiny","prompt":"x","max_tokens":4,"top_p":-Infinity}', "-Infinity literal"),
    _raw(COMPLETIONS, b'{"model":"tiny","prompt":"x","max_tokens":' + b"9" * 5000 + b"}", "5000-digit int"),
    _raw(COMPLETIONS, b'{"model":"tiny","prompt":"\\ud800","max_tokens":4}', "lone surrogate escape"),
    _raw(COMPLETIONS, b'{"model":"tiny","prompt":"\xed\xa0\x80","max_tokens":4}', "surrogate as UTF-8 bytes"),
    _raw(COMPLETIONS, b'{"model":"tiny","prompt":"\xff","max_tokens":4}', "invalid UTF-8"),
    _raw(CHAT, b"", "empty body"),
    _raw(CHAT, b"[" * 5000, "unclosed arrays"),
    _raw(COMPLETIONS, b'{"model":"tiny","prompt":"' + b"a" * (33 * 2**20) + b'"}', "33 MiB body"),
    _json(COMPLETIONS, _P, **{"Content-Encoding": "gzip"}),
    # an X-Request-Id used again once its request has ended
    _json(COMPLETIONS, _P, **{"X-Request-Id": "corpus-reused"}),
    _json(COMPLETIONS, _P, **{"X-Request-Id": "corpus-reused"}),
]


def test_the_checks_themselves_see_a_healthy_daemon(fuzzer):
    """The oracle: plain valid cases break no invariant (else every finding is suspect)."""
    before = fuzzer.snapshot()
    for path, body in ((COMPLETIONS, _P), (CHAT, _M), (COMPLETIONS, {**_P, "stream": True, "n": 2})):
        assert fuzzer.check(_json(path, body)).kind is None
    good = fb.BatchCase(CHAT, [("good", fb.good_line(CHAT, f"ok{i}", i), f"ok{i}", i) for i in range(3)])
    fuzzer.check_batch(good)
    bad = fb.BatchCase(COMPLETIONS, [("good", fb.good_line(COMPLETIONS, "a", 0), "a", 0),
                                     ("bad", b"{oops", None, None), ("blank", b"", None, None),
                                     ("bad", json.dumps({"custom_id": "a"}).encode(), None, None)])
    fuzzer.check_batch(bad)
    assert_clean(fuzzer, before)


def test_corpus_of_hostile_bodies(fuzzer):
    before = fuzzer.snapshot()
    fuzzer.wedges_now, fuzzer.max_wedges = 0, 3
    try:
        for case in CORPUS:
            fuzzer.check(case, dedupe=False)
    finally:
        fuzzer.max_wedges = MAX_WEDGES
    assert_clean(fuzzer, before)


def test_fuzz_completions(fuzzer):
    before = fuzzer.snapshot()
    fb.campaign(fuzzer.check, fb.completion_cases(), EXAMPLES, seed=1, fuzzer=fuzzer)
    assert fuzzer.cases["completions"] >= EXAMPLES // 2 or fuzzer.skipped
    assert_clean(fuzzer, before)


def test_fuzz_chat_completions(fuzzer):
    before = fuzzer.snapshot()
    fb.campaign(fuzzer.check, fb.chat_cases(), EXAMPLES, seed=2, fuzzer=fuzzer)
    assert fuzzer.cases["chat"] >= EXAMPLES // 2 or fuzzer.skipped
    assert_clean(fuzzer, before)


def test_fuzz_raw_bodies(fuzzer):
    before = fuzzer.snapshot()
    fb.campaign(fuzzer.check, fb.raw_cases(), RAW_EXAMPLES, seed=3, fuzzer=fuzzer)
    assert_clean(fuzzer, before)


def test_fuzz_batch_files(fuzzer):
    before = fuzzer.snapshot()
    fb.campaign(fuzzer.check_batch, fb.batch_cases(), BATCH_EXAMPLES, seed=4, fuzzer=fuzzer)
    assert fuzzer.cases["batch"] >= BATCH_EXAMPLES // 2 or fuzzer.skipped
    assert_clean(fuzzer, before)


def test_fuzz_bodies_derived_from_the_served_openapi_json(fuzzer):
    doc = fuzzer.http.get("/openapi.json").json()
    before, counted = fuzzer.snapshot(), dict(fuzzer.schema_cases)
    for seed, path in ((5, COMPLETIONS), (6, CHAT)):
        fb.campaign(fuzzer.check, fs.request_cases(doc, path), SCHEMA_EXAMPLES, seed=seed, fuzzer=fuzzer)
    fb.campaign(fuzzer.check_batch, fs.batch_cases(doc), SCHEMA_BATCH_EXAMPLES, seed=7, fuzzer=fuzzer)
    ran = {k: fuzzer.schema_cases[k] - counted.get(k, 0) for k in ("valid", "invalid")}
    assert min(ran.values()) >= SCHEMA_EXAMPLES // 4 or fuzzer.skipped, ran
    assert_clean(fuzzer, before)
