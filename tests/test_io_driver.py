"""The real io driver process against the fake kernel of tests/fake_kernel.py."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from fake_kernel import MODEL, REPLY, health_report, io_stack, memory_report
from llmos import protocol


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with io_stack(tmp_path_factory.mktemp("io")) as s:
        yield s


@pytest.fixture
def http(stack):
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(stack[2])), base_url="http://llmos", timeout=10) as c:
        yield c


@pytest.fixture
def oai(stack):
    client = openai.OpenAI(base_url="http://llmos/v1", api_key="x", max_retries=0,
                           http_client=httpx.Client(transport=httpx.HTTPTransport(uds=str(stack[2]))))
    yield client
    client.close()


def test_socket_is_private_and_ready_reported(stack):
    kernel, proc, sock = stack
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    hello = kernel.wait_for(lambda m: isinstance(m, protocol.Hello))
    assert (hello.role, hello.name, hello.pid) == ("io", "io", proc.pid)
    ready = kernel.of(protocol.Ready)[0]
    assert ready.io == protocol.IoInfo(socket=str(sock), pid=proc.pid) and ready.model is ready.tokenizer is None


def test_health_models_admin(http, stack):
    health = http.get("/health").json()
    assert health == dataclasses.asdict(stack[0].health) and list(health)[:3] == ["status", "pid", "uptime_s"]
    models = http.get("/v1/models").json()
    assert models == {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 1700000000,
                                                  "owned_by": "llmos", "max_model_len": 2048, "state": "loaded"}]}
    ps = http.get("/llmos/v1/ps").json()
    assert ps == dataclasses.asdict(stack[0].ps) and ps["requests"][0]["state"] == "running"
    memory = http.get("/llmos/v1/memory").json()
    assert memory == {MODEL: dataclasses.asdict(memory_report()), "loading-model": {"state": "loading"}}
    r = http.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    stack[0].health = health_report("degraded")
    try:
        assert http.get("/health").status_code == 503
    finally:
        stack[0].health = health_report()


def test_openai_chat_and_completion(oai, stack):
    chat = oai.chat.completions.create(model=MODEL, messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}],
        temperature=0, extra_body={"tenant": "alice", "ignore_eos": True, "top_k": 5})
    assert chat.choices[0].message.content == "".join(REPLY)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason == "stop"
    assert chat.id.startswith("cmpl-") and chat.object == "chat.completion" and chat.model == MODEL
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens) == (7, 6, 13)
    sub = stack[0].wait_for(lambda m: isinstance(m, protocol.Submit) and m.request_id == chat.id)
    assert sub.tenant == "alice" and sub.params["top_k"] == 5 and sub.params["ignore_eos"] is True
    assert sub.messages[1] == {"role": "user", "content": "hi\nthere"}

    cmpl = oai.completions.create(model=MODEL, prompt="Once", max_tokens=3, logprobs=1)
    assert cmpl.choices[0].text == "Hello world," and cmpl.choices[0].finish_reason == "length"
    assert cmpl.choices[0].logprobs.tokens == ["Hello", " world", ","]
    assert cmpl.choices[0].logprobs.text_offset == [0, 5, 11]
    assert cmpl.choices[0].logprobs.top_logprobs[0] == {"Hello": -0.5}
    ids = oai.completions.create(model=MODEL, prompt=[1, 2, 3])
    sub = stack[0].wait_for(lambda m: isinstance(m, protocol.Submit) and m.request_id == ids.id)
    assert sub.prompt_token_ids == [1, 2, 3] and sub.prompt is None and sub.tenant == "local"


def test_openai_streams(oai):
    chunks = list(oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              stream=True, stream_options={"include_usage": True},
                                              logprobs=True, top_logprobs=1))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(REPLY)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 13
    assert chunks[1].choices[0].logprobs.content[0].token == "Hello"
    text = [c.choices[0].text for c in oai.completions.create(model=MODEL, prompt="x", stream=True)]
    assert "".join(text) == "".join(REPLY)


def test_n_choices_are_shaped_by_index_and_usage_counts_each_completion(oai, stack):
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert [c.message.content for c in chat.choices] == ["".join(f"{p}/{i}" for p in REPLY) for i in range(3)]
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (7, 18)
    assert stack[0].wait_for(lambda m: isinstance(m, protocol.Submit) and m.request_id == chat.id).n == 3

    chunks = list(oai.completions.create(model=MODEL, prompt="x", n=2, stream=True,
                                         stream_options={"include_usage": True}))
    text = {0: "", 1: ""}
    for c in chunks[:-1]:
        text[c.choices[0].index] += c.choices[0].text
    assert text == {i: "".join(f"{p}/{i}" for p in REPLY) for i in (0, 1)}
    assert sorted(c.choices[0].index for c in chunks[:-1] if c.choices[0].finish_reason) == [0, 1]
    assert chunks[-1].usage.completion_tokens == 12


@pytest.mark.parametrize("body,param", [
    ({"temperature": 5}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"top_p": 0}, "top_p"), ({"stop": 3}, "stop"), ({"n": 0}, "n"), ({"n": 129}, "n"), ({"n": "2"}, "n"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logprobs": 3}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"), ({"stream": "yes"}, "stream"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"model": 7}, "model"), ({"tools": [{"type": "function"}]}, "tools[0].function"), ({"bogus": 1}, "bogus"),
    ({"tenant": ""}, "tenant"), ({"seed": 1.5}, "seed"),
])
def test_chat_bad_params(http, body, param):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                **body})
    err = r.json()["error"]
    assert (r.status_code, err["param"], err["type"]) == (400, param, "invalid_request_error"), err
    if param == "n":
        assert err["message"] == "n must be an integer from 1 to 128"


@pytest.mark.parametrize("prompt", [None, "", [], ["a", "b"], [1, "a"], [-1], {"a": 1}])
def test_completion_bad_prompt(http, prompt):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_invalid_json_and_huge_body(http):
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = http.post("/v1/completions", content=b"[1]")
    assert r.status_code == 400
    r = http.post("/v1/completions", content=b"x" * (33 * 1024 * 1024))
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


def test_rejections_pass_through(oai):
    with pytest.raises(openai.NotFoundError) as exc:
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.body["code"] == "model_not_found" and exc.value.body["param"] == "model"
    with pytest.raises(openai.InternalServerError, match="model driver crashed"):
        oai.completions.create(model=MODEL, prompt="fail")
    with pytest.raises(openai.APIError, match="model driver crashed"):
        list(oai.completions.create(model=MODEL, prompt="fail", stream=True))


def _aborted(kernel, timeout=60.0):   # (returns as soon as the Abort is seen)
    sub = kernel.of(protocol.Submit)[-1]
    return sub, kernel.wait_for(lambda m: isinstance(m, protocol.Abort) and m.request_id == sub.request_id, timeout)


def test_kernel_silence_is_an_error_and_aborts(http, stack):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "silent"})
    assert r.status_code == 504   # the io driver's own 2 s --timeout answered (the client's is 10 s)
    sub, abort = _aborted(stack[0])
    assert abort is not None and "timed out" in abort.reason
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "stall", "stream": True}) as r:
        events = [line for line in r.iter_lines() if line]
    assert '"error"' in events[-2] and events[-1] == "data: [DONE]"
    assert _aborted(stack[0])[1] is not None


def _raw_request(sock: Path, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: llmos\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return s


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts(stack, stream):
    kernel, _, sock = stack
    submitted = len(kernel.of(protocol.Submit))
    s = _raw_request(sock, {"model": MODEL, "prompt": "slow", "stream": stream})
    if stream:
        got = b""
        while b"data: " not in got:
            got += s.recv(4096)
    else:
        assert kernel.wait_for(lambda m: len(kernel.of(protocol.Submit)) > submitted, 60.0)
        time.sleep(0.2)
    s.close()
    sub, abort = _aborted(kernel)
    assert abort is not None and abort.reason == "client disconnected"


def test_garbage_does_not_crash(stack, http):
    for junk in (b"\x00\xff garbage\r\n\r\n", b"GET / HTTP/9.9\r\nHost\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\n"
                 b"Content-Length: -5\r\n\r\n", os.urandom(4096)):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(stack[2]))
        s.sendall(junk)
        s.settimeout(2)
        with contextlib.suppress(OSError):
            s.recv(1024)
        s.close()
    assert stack[1].poll() is None
    assert http.get("/health").status_code == 200


def test_shutdown_message_stops_driver(tmp_path):
    with io_stack(tmp_path) as (kernel, proc, sock):
        kernel._later("io", protocol.Shutdown(reason="test"))
        assert proc.wait(10) == 0
        assert not sock.exists()


def test_kernel_gone_fails_requests_fast(tmp_path):
    with io_stack(tmp_path, timeout=30) as (kernel, proc, sock):
        http = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://llmos", timeout=10)
        result = {}

        def call():
            result["r"] = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [
                {"role": "user", "content": "stall"}]})
        t = threading.Thread(target=call)
        t.start()
        assert kernel.wait_for(lambda m: isinstance(m, protocol.Submit))
        time.sleep(0.1)
        kernel.close()
        t.join(60)
        # 503 kernel_unavailable, not the 504 its 30 s --timeout would give (nor the client's
        # own 10 s timeout): the lost connection answered, without waiting out the request.
        assert result["r"].status_code == 503
        assert result["r"].json()["error"]["code"] == "kernel_unavailable"
        r = http.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        assert proc.poll() is None  # the io driver itself survives; the kernel's death is what stops it
