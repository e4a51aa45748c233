"""Hostile input against the real daemon (issue 10): every input gets a precise 4xx naming
its field, and a normal request right after still gets the answer transformers gives."""
from __future__ import annotations

import json

import pytest
import torch

from daemon_harness import serving
from llmos.client import Client

PROMPT_IDS = [1, 17, 42, 99, 7]
NORMAL = {"model": "tiny", "prompt": PROMPT_IDS, "max_tokens": 8, "temperature": 0, "return_token_ids": True}


@pytest.fixture(scope="module")
def reference(tiny_llama_dir) -> list[int]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32).eval()
    with torch.inference_mode():
        ids = torch.tensor([PROMPT_IDS])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(PROMPT_IDS):].tolist()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_llama_dir):
    with serving(tmp_path_factory.mktemp("hostile"), [f"tiny={tiny_llama_dir}"], "--max-model-len", "256") as d:
        yield d


def normal_answer_is_correct(daemon, reference) -> None:
    with daemon.http(timeout=60) as c:
        r = c.post("/v1/completions", json={**NORMAL, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == reference
        assert c.get("/health").json()["status"] == "ok"


def post_raw(daemon, path: str, raw: bytes, headers: dict | None = None):
    with daemon.http(timeout=60) as c:
        return c.post(path, content=raw, headers={"content-type": "application/json", **(headers or {})})


def body(**fields) -> bytes:
    return json.dumps({"model": "tiny", "prompt": "hi", **fields}).encode()


LONE = b'"\\ud800"'
CASES = {   # name: (path, raw body, the param the 400 names)
    "top_k past int32": ("/v1/completions", body(top_k=2**31), "top_k"),
    "top_k past the vocabulary": ("/v1/completions", body(top_k=100_000), "top_k"),
    "max_tokens 2**64": ("/v1/completions", body(max_tokens=2**64), "max_tokens"),
    "max_tokens past the context": ("/v1/completions", body(max_tokens=100_000), "max_tokens"),
    "min_tokens past int32": ("/v1/completions", body(min_tokens=2**40), "min_tokens"),
    "min_tokens past the context": ("/v1/completions", body(min_tokens=10_000, max_tokens=20_000), "max_tokens"),
    "seed past 64 bits": ("/v1/completions", body(seed=2**64), "seed"),
    "priority level past 32 bits": ("/v1/completions", body(priority=2**70), "priority"),
    "negative priority level": ("/v1/completions", body(priority=-1), "priority"),
    "n x max_tokens": ("/v1/completions", body(n=128, max_tokens=2**16), "max_tokens"),
    "logprobs x n": ("/v1/chat/completions", json.dumps({"model": "tiny", "messages": [{"role": "user", "content":
                     "hi"}], "logprobs": True, "top_logprobs": 20, "n": 16}).encode(), "top_logprobs"),
    "lone surrogate prompt": ("/v1/completions", b'{"model": "tiny", "prompt": ' + LONE + b'}', "prompt"),
    "lone surrogate in a message": ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", '
                                    b'"content": ' + LONE + b'}]}', "messages"),
    "lone surrogate stop": ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stop": [' + LONE + b']}', "stop"),
    "lone surrogate model": ("/v1/completions", b'{"model": ' + LONE + b', "prompt": "x"}', "model"),
    "lone surrogate tenant": ("/v1/completions", b'{"model": "tiny", "prompt": "x", "tenant": ' + LONE + b'}',
                              "tenant"),
    "five stop strings": ("/v1/completions", body(stop=["a", "b", "c", "d", "e"]), "stop"),
    "a long stop string": ("/v1/completions", body(stop=["x" * 10_000]), "stop"),
    "many stop token ids": ("/v1/completions", body(stop_token_ids=list(range(100_000))), "stop_token_ids"),
    "stop token id past int32": ("/v1/completions", body(stop_token_ids=[2**40]), "stop_token_ids"),
    "prompt of 5M characters": ("/v1/completions", body(prompt="a" * 5_000_000), "prompt"),
    "3000 messages": ("/v1/chat/completions", json.dumps({"model": "tiny", "messages": [
                      {"role": "user", "content": "x"}] * 3000}).encode(), "messages"),
    "prompt ids past the count": ("/v1/completions", body(prompt=[1] * ((1 << 20) + 1)), "prompt"),
    "a million bad prompt ids (one error, not a million)": ("/v1/completions", body(prompt=[None] * (1 << 20)),
                                                            "prompt"),
    "a message with a bad part deep in it": ("/v1/chat/completions", json.dumps({"model": "tiny", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {}}]}]
    }).encode(), "messages"),
    "prompt id past int32": ("/v1/completions", body(prompt=[1, 2**40]), "prompt"),
    "prompt id past the vocabulary": ("/v1/completions", body(prompt=[1, 2**20]), "prompt"),
    "timeout NaN": ("/v1/completions", b'{"model": "tiny", "prompt": "x", "timeout": NaN}', None),
    "timeout of a century": ("/v1/completions", body(timeout=3.2e9), "timeout"),
    "nested 100,000 deep": ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, None),
    "nested in a field": ("/v1/completions", b'{"model": "tiny", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                          None),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_gets_a_precise_400_and_the_next_request_is_served(daemon, reference, name):
    path, raw, param = CASES[name]
    r = post_raw(daemon, path, raw)
    assert r.status_code == 400, (name, r.status_code, r.text[:500])
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", (name, error)
    if name == "a message with a bad part deep in it":
        assert error["message"].startswith("messages[0].content[1].type"), error
    normal_answer_is_correct(daemon, reference)


def test_a_failed_request_frees_its_request_id(daemon, reference):
    """A 400 (here: a body the io driver could not send before) must not leave the id
    registered: the same X-Request-Id is served right after, not refused with 409."""
    headers = {"X-Request-Id": "reused-id-1"}
    for raw in (b'{"model": "tiny", "prompt": ' + LONE + b'}', body(max_tokens=2**64), body(top_k=2**31)):
        assert post_raw(daemon, "/v1/completions", raw, headers).status_code == 400
    with daemon.http(timeout=60) as c:
        r = c.post("/v1/completions", json={**NORMAL, "ignore_eos": True}, headers=headers)
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == reference
    assert r.headers["X-Request-Id"] == "reused-id-1"


def test_a_huge_purpose_field_is_refused_without_reading_it_whole(daemon, reference):
    with daemon.http(timeout=60) as c:
        r = c.post("/v1/files", data={"purpose": "b" * 5_000_000},
                   files={"file": ("x.jsonl", b"", "application/jsonl")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    normal_answer_is_correct(daemon, reference)


def test_a_batch_line_the_kernel_refuses_is_that_lines_error_and_the_job_finishes(daemon, reference):
    """top_k 100,000 passes the upload (the io driver does not know the vocabulary) and
    the kernel refuses it: that line fails with 400, every other line is served."""
    lines = [{"custom_id": f"ok{i}", "method": "POST", "url": "/v1/completions",
              "body": {**NORMAL, "ignore_eos": True}} for i in range(3)]
    lines.insert(1, {"custom_id": "bad", "method": "POST", "url": "/v1/completions",
                     "body": {**NORMAL, "top_k": 100_000}})
    with Client(daemon.home) as c:
        job = c.wait(c.submit_batch(lines)["id"], timeout=120)
        assert job["status"] == "completed"
        assert job["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
        out = [json.loads(x) for x in c.results(job["id"])]
        errors = [json.loads(x) for x in c.results(job["id"], errors=True)]
    assert [o["custom_id"] for o in out] == ["ok0", "ok1", "ok2"]
    assert all(o["response"]["body"]["choices"][0]["token_ids"] == reference for o in out)
    assert errors[0]["custom_id"] == "bad" and errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "top_k"
    normal_answer_is_correct(daemon, reference)


def test_an_x_request_id_used_again_after_its_request_finished_is_served(daemon, reference):
    """The tokenizer remembered finished ids to ignore their late tokens, and so ignored the
    new request's tokens too: the second request with the id never got an answer."""
    for stream in (False, True, False):
        with daemon.http(timeout=60) as c:
            r = c.post("/v1/completions", json={**NORMAL, "ignore_eos": True, "stream": stream},
                       headers={"X-Request-Id": "used-again"})
        assert r.status_code == 200, r.text
        if not stream:
            assert r.json()["choices"][0]["token_ids"] == reference
        else:
            chunks = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
            assert sum((ch["choices"][0].get("token_ids") or [] for ch in chunks if ch["choices"]), []) == reference


def test_a_top_p_below_float32_keeps_the_top_token_instead_of_failing_the_step(daemon, reference):
    with daemon.http(timeout=60) as c:
        r = c.post("/v1/completions", json={**NORMAL, "ignore_eos": True, "temperature": 1, "top_p": 1e-300})
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == reference


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_a_compressed_body_is_a_415_and_the_connection_is_not_left_broken(daemon, reference, encoding):
    with daemon.http(timeout=60) as c:
        r = c.post("/v1/completions", content=b"{}", headers={"content-type": "application/json",
                                                               "Content-Encoding": encoding})
        if encoding == "gzip":
            assert r.status_code == 415 and r.json()["error"]["param"] == "Content-Encoding"
        else:   # aiohttp's own parser refuses these before the handler runs (plain-text 400)
            assert r.status_code in (400, 415), r.text
        assert c.get("/health").json()["status"] == "ok"   # the same client, a new connection if needed
    normal_answer_is_correct(daemon, reference)
