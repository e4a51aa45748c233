"""/tokenize, /detokenize and the render routes through a real daemon: the ids are Hugging Face's
for the same model directory, and exactly what a generation request counts as its prompt."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from transformers import AutoConfig, AutoTokenizer

from daemon_harness import Daemon
from llmos.sampling_params import MAX_PROMPT_TOKEN_IDS

CHAT = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a colour."}]
PROMPT = "The quick brown fox jumps over the lazy dog, twice."


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_llama_dir):
    d = Daemon(tmp_path_factory.mktemp("tokenize"), [f"tl={tiny_llama_dir}"]).wait_ready()
    d.hf = AutoTokenizer.from_pretrained(tiny_llama_dir)
    d.vocab_size = AutoConfig.from_pretrained(tiny_llama_dir).vocab_size
    yield d
    d.stop()


def post(d: Daemon, path: str, body) -> tuple[int, dict]:
    with d.http() as c:   # (ASCII JSON: a lone surrogate travels as its escape)
        r = c.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    return r.status_code, r.json()


def ok(d: Daemon, path: str, body):
    status, out = post(d, path, body)
    assert status == 200, out
    return out


def hf_chat_ids(tok, messages, add_generation_prompt=True) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_a_prompt_is_tokenized_as_hugging_face_and_as_generation_counts_it(daemon):
    out = ok(daemon, "/tokenize", {"model": "tl", "prompt": PROMPT})
    assert out["tokens"] == daemon.hf(PROMPT)["input_ids"] and out["count"] == len(out["tokens"])
    with daemon.http() as c:
        [entry] = [m for m in c.get("/v1/models").json()["data"] if m["id"] == "tl"]
    assert out["max_model_len"] == entry["max_model_len"]
    gen = ok(daemon, "/v1/completions", {"model": "tl", "prompt": PROMPT, "max_tokens": 2})
    assert gen["usage"]["prompt_tokens"] == out["count"]
    strs = ok(daemon, "/tokenize", {"model": "tl", "prompt": PROMPT, "return_token_strs": True})
    assert strs["token_strs"] == daemon.hf.convert_ids_to_tokens(out["tokens"])
    assert "token_strs" not in out


def test_a_chat_is_tokenized_through_its_template_as_generation_does(daemon):
    out = ok(daemon, "/tokenize", {"model": "tl", "messages": CHAT})
    assert out["tokens"] == hf_chat_ids(daemon.hf, CHAT)
    gen = ok(daemon, "/v1/chat/completions", {"model": "tl", "messages": CHAT, "max_tokens": 2})
    assert gen["usage"]["prompt_tokens"] == out["count"]
    bare = ok(daemon, "/tokenize", {"model": "tl", "messages": CHAT, "add_generation_prompt": False})
    assert bare["tokens"] == hf_chat_ids(daemon.hf, CHAT, add_generation_prompt=False) != out["tokens"]
    special = ok(daemon, "/tokenize", {"model": "tl", "messages": CHAT, "add_special_tokens": True})
    text = daemon.hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert special["tokens"] == daemon.hf(text, add_special_tokens=True)["input_ids"]


def test_detokenize_round_trips(daemon):
    ids = ok(daemon, "/tokenize", {"model": "tl", "prompt": PROMPT})["tokens"]
    assert ok(daemon, "/detokenize", {"model": "tl", "tokens": ids}) == {"prompt": daemon.hf.decode(ids)}
    assert daemon.hf.decode(ids).endswith(PROMPT)
    chat = ok(daemon, "/tokenize", {"model": "tl", "messages": CHAT})["tokens"]
    text = ok(daemon, "/detokenize", {"model": "tl", "tokens": chat})["prompt"]
    assert text == daemon.hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert ok(daemon, "/detokenize", {"model": "tl", "tokens": []}) == {"prompt": ""}


def test_render_routes_answer_the_ids_tokenize_gives(daemon):
    prompt_ids = ok(daemon, "/tokenize", {"model": "tl", "prompt": PROMPT})["tokens"]
    chat_ids = ok(daemon, "/tokenize", {"model": "tl", "messages": CHAT})["tokens"]
    [one] = ok(daemon, "/v1/completions/render", {"model": "tl", "prompt": PROMPT, "max_tokens": 5, "stream": True})
    assert (one["token_ids"], one["count"], one["model"], one["stream"]) == (prompt_ids, len(prompt_ids), "tl", True)
    assert one["sampling_params"]["max_tokens"] == 5 and one["request_id"].startswith("cmpl-")
    chat = ok(daemon, "/v1/chat/completions/render", {"model": "tl", "messages": CHAT, "temperature": 0})
    assert (chat["token_ids"], chat["count"]) == (chat_ids, len(chat_ids))
    [given] = ok(daemon, "/v1/completions/render", {"model": "tl", "prompt": [5, 6, 7]})
    assert given["token_ids"] == [5, 6, 7]


BAD = [   # (path, body, the field the 400 names)
    ("/tokenize", {"model": "tl"}, "prompt"),
    ("/tokenize", {"model": "tl", "prompt": "a", "messages": CHAT}, "prompt"),
    ("/tokenize", {"model": "tl", "prompt": 5}, "prompt"),
    ("/tokenize", {"model": "tl", "prompt": ""}, "prompt"),
    ("/tokenize", {"model": "tl", "prompt": "\ud800"}, "prompt"),
    ("/tokenize", {"model": "tl", "prompt": "x" * 4_000_001}, "prompt"),
    ("/tokenize", {"prompt": "hi"}, "model"),
    ("/tokenize", {"model": 7, "prompt": "hi"}, "model"),
    ("/tokenize", {"model": "tl", "prompt": "hi", "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/tokenize", {"model": "tl", "prompt": "hi", "add_generation_prompt": True}, "add_generation_prompt"),
    ("/tokenize", {"model": "tl", "prompt": "hi", "tools": []}, "tools"),
    ("/tokenize", {"model": "tl", "messages": []}, "messages"),
    ("/tokenize", {"model": "tl", "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/tokenize", {"model": "tl", "messages": [{"role": "user", "content": 3}]}, "messages"),
    ("/tokenize", {"model": "tl", "messages": CHAT, "add_generation_prompt": True, "continue_final_message": True},
     "continue_final_message"),
    ("/detokenize", {"model": "tl"}, "tokens"),
    ("/detokenize", {"model": "tl", "tokens": "1 2"}, "tokens"),
    ("/detokenize", {"model": "tl", "tokens": [1, "a"]}, "tokens"),
    ("/detokenize", {"model": "tl", "tokens": [-1]}, "tokens"),
    ("/detokenize", {"model": "tl", "tokens": [True]}, "tokens"),
    ("/detokenize", {"model": "tl", "tokens": [2**31]}, "tokens"),
    ("/detokenize", {"model": "tl", "tokens": [0] * (MAX_PROMPT_TOKEN_IDS + 1)}, "tokens"),
    ("/detokenize", {"model": "tl", "tokens": [1], "skip": True}, "skip"),
    ("/v1/completions/render", {"model": "tl", "prompt": "hi", "wizard": 1}, "wizard"),
    ("/v1/completions/render", {"model": "tl", "prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/chat/completions/render", {"model": "tl", "messages": "hi"}, "messages"),
]


@pytest.mark.parametrize("path, body, field", BAD)
def test_bad_bodies_are_400_naming_the_field_and_the_daemon_serves_on(daemon, path, body, field):
    status, out = post(daemon, path, body)
    assert status == 400 and out["error"]["param"] == field, out
    assert ok(daemon, "/tokenize", {"model": "tl", "prompt": "still here"})["count"] > 0


def test_ids_outside_the_vocabulary_are_400(daemon):
    v = daemon.vocab_size
    for path, body, field in (("/detokenize", {"model": "tl", "tokens": [1, v]}, "tokens"),
                              ("/v1/completions/render", {"model": "tl", "prompt": [v]}, "prompt")):
        status, out = post(daemon, path, body)
        assert status == 400 and out["error"]["param"] == field and str(v) in out["error"]["message"], out
    assert ok(daemon, "/detokenize", {"model": "tl", "tokens": [v - 1]})["prompt"] is not None


def test_a_body_that_is_not_an_object_is_400(daemon):
    for path in ("/tokenize", "/detokenize", "/v1/completions/render", "/v1/chat/completions/render"):
        with daemon.http() as c:
            r = c.post(path, content=b"[1, 2")
            assert r.status_code == 400, r.text
            assert c.post(path, json=[1, 2]).status_code == 400


@pytest.mark.parametrize("path, body", [
    ("/tokenize", {"model": "nope", "prompt": "hi"}), ("/detokenize", {"model": "nope", "tokens": [1]}),
    ("/v1/completions/render", {"model": "nope", "prompt": "hi"}),
    ("/v1/chat/completions/render", {"model": "nope", "messages": CHAT})])
def test_an_unknown_model_is_404(daemon, path, body):
    status, out = post(daemon, path, body)
    assert status == 404 and out["error"]["param"] == "model" and out["error"]["code"] == "model_not_found", out


def cached(usage: dict) -> int:
    return usage["prompt_tokens_details"]["cached_tokens"]


def test_cached_tokens_count_the_prompt_the_prefix_cache_held(daemon):
    block = daemon.memory("tl")["block_size"]
    shared = " ".join(f"cached{i}" for i in range(60))   # a prefix no other test sent
    first = ok(daemon, "/v1/completions", {"model": "tl", "prompt": shared + " one", "max_tokens": 2})
    assert cached(first["usage"]) == 0 and first["usage"]["prompt_tokens"] > 3 * block
    body = {"model": "tl", "prompt": shared + " two", "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    with daemon.http() as c, c.stream("POST", "/v1/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    usage = chunks[-1]["usage"]
    assert 0 < cached(usage) < usage["prompt_tokens"] and cached(usage) % block == 0, usage
    system = {"role": "system", "content": " ".join(f"chat{i}" for i in range(60))}
    a = ok(daemon, "/v1/chat/completions", {"model": "tl", "max_tokens": 2,
                                            "messages": [system, {"role": "user", "content": "a"}]})
    b = ok(daemon, "/v1/chat/completions", {"model": "tl", "max_tokens": 2,
                                            "messages": [system, {"role": "user", "content": "b"}]})
    assert cached(a["usage"]) == 0 and 0 < cached(b["usage"]) and cached(b["usage"]) % block == 0


def test_a_tokenizer_killed_with_queries_pending_answers_them_then_serves_again(daemon):
    """A pending query gets a 503 when its tokenizer dies (or a 200 if it answered first), never a hang."""
    pid = next(p["pid"] for p in daemon.ps()["processes"] if p["name"] == "tokenizer-tl")
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(post(daemon, "/tokenize", {
        "model": "tl", "prompt": "many words " * 200_000})[0])) for _ in range(3)]
    for t in threads:
        t.start()
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads) and set(answers) <= {200, 503}, answers
    deadline = time.monotonic() + 120
    while post(daemon, "/tokenize", {"model": "tl", "prompt": PROMPT})[0] != 200:
        assert time.monotonic() < deadline, "the tokenizer did not come back"
        time.sleep(0.2)


def test_max_completion_tokens_and_stream_options_work_as_openai_documents(daemon):
    body = {"model": "tl", "messages": CHAT, "max_completion_tokens": 3, "ignore_eos": True}
    assert ok(daemon, "/v1/chat/completions", body)["usage"]["completion_tokens"] == 3
    status, out = post(daemon, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert status == 400 and out["error"]["param"] == "stream_options"   # only with stream: true
    with daemon.http() as c, c.stream("POST", "/v1/chat/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["usage"] is None for c in chunks[:-1])
