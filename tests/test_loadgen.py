"""The pure parts of benchmarks/loadgen.py (the streaming load generator of peers.py and
throughput.py): SSE parsing, folding chunks into a record, the summary. No timing assertions."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import loadgen  # noqa: E402


def test_parse_sse_skips_non_data_and_done():
    assert loadgen.parse_sse(": keep-alive") is None
    assert loadgen.parse_sse("") is None
    assert loadgen.parse_sse("data: [DONE]") is None
    assert loadgen.parse_sse('data: {"a": 1}') == {"a": 1}
    assert loadgen.parse_sse('data:{"a": 2}') == {"a": 2}  # the space after the colon is optional


def delta(text):
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


def test_chunks_fold_into_ttft_last_and_usage_tokens():
    s = loadgen.Stream()
    loadgen.apply_chunk(s, {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}, 0.1)  # no content yet
    loadgen.apply_chunk(s, delta("Hel"), 0.5)
    loadgen.apply_chunk(s, delta("lo"), 0.7)
    loadgen.apply_chunk(s, delta(""), 0.8)   # empty content is not a token's arrival
    loadgen.apply_chunk(s, {"choices": [], "usage": {"completion_tokens": 5}}, 0.9)
    assert (s.ttft, s.last, s.chunks, s.tokens) == (0.5, 0.7, 2, 5)
    assert s.inter_token() == pytest.approx(0.2 / 4)


def test_error_chunk_raises():
    with pytest.raises(RuntimeError):
        loadgen.apply_chunk(loadgen.Stream(), {"error": {"message": "boom"}}, 0.0)


def test_summarize():
    streams = [loadgen.Stream(ttft=t, last=t + 1.0, chunks=11, tokens=11) for t in (0.1, 0.2, 0.3)]
    streams.append(loadgen.Stream())  # a stream that produced nothing still counts as a request
    out = loadgen.summarize(streams, wall=2.0)
    assert out["requests"] == 4 and out["tokens"] == 33 and out["tok_s"] == 16.5
    assert out["ttft_p50"] == 0.2 and out["itl_p50"] == pytest.approx(0.1)


def test_chat_body_is_the_standard_request():
    body = loadgen.chat_body("m", "hi", 128)
    assert body["temperature"] == 0 and body["ignore_eos"] is True and body["max_tokens"] == 128
    assert body["stream"] is True and body["messages"] == [{"role": "user", "content": "hi"}]
