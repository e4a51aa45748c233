"""End to end on the real daemon (kernel + model, tokenizer and io driver processes)
serving tiny random models: fast enough for every CI run."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import socket
import stat
import time

import httpx
import pytest
import zmq

from daemon_harness import serving, wait_for


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_llama_dir, tiny_qwen2_dir):
    with serving(tmp_path_factory.mktemp("home"), [f"tiny={tiny_llama_dir}", f"tinyq={tiny_qwen2_dir}"],
               "--max-batched-tokens", "256", "--max-model-len", "512") as d:
        yield d


def completion(daemon, **body):
    with daemon.http() as c:
        return c.post("/v1/completions", json=body)


def test_processes_and_sockets(daemon):
    ps = daemon.ps()
    roles = sorted(p["role"] for p in ps["processes"])
    assert roles == ["io", "kernel", "model", "model", "tokenizer", "tokenizer"]
    for p in ps["processes"]:
        assert p["state"] == "running" and p["pid"] > 0 and p["restarts"] == 0
    pids = {p["pid"] for p in ps["processes"]}
    assert len(pids) == 6  # every driver is its own OS process
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(daemon.home / "run").st_mode) == 0o700
    assert (daemon.home / "run" / "kernel.bus").exists()


def test_tokenizers_start_beside_their_model_drivers(daemon):
    """The models' files were ready, so each tokenizer started with its model driver, not
    after it was up: seconds off every load."""
    msgs = [json.loads(line)["msg"] for line in (daemon.home / "logs" / "kernel.log").read_text().splitlines()]
    for model in ("tiny", "tinyq"):
        started = next(i for i, m in enumerate(msgs) if m.startswith(f"driver tokenizer-{model} started"))
        up = msgs.index(f"driver model-{model}: starting -> running")
        assert started < up, msgs


def test_both_model_families_generate(daemon):
    for model in ("tiny", "tinyq"):
        r = completion(daemon, model=model, prompt="Hello there", max_tokens=8, temperature=0)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["finish_reason"] == "length"


def test_seed_gives_the_same_output_and_greedy_is_deterministic(daemon):
    def text(**kw):
        r = completion(daemon, model="tiny", prompt="Once upon", max_tokens=12, **kw)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    assert text(temperature=1.0, seed=7) == text(temperature=1.0, seed=7)
    assert len({text(temperature=1.0, seed=s) for s in range(4)}) > 1
    assert text(temperature=0) == text(temperature=0)


def test_stop_strings_and_stop_token_ids(daemon):
    full = completion(daemon, model="tiny", prompt="abc", max_tokens=16, temperature=0).json()
    text = full["choices"][0]["text"]
    stop = text[3:6]
    r = completion(daemon, model="tiny", prompt="abc", max_tokens=16, temperature=0, stop=[stop]).json()
    assert r["choices"][0]["text"] == text[: text.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"


def test_errors_are_precise(daemon):
    r = completion(daemon, model="nope", prompt="x")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = completion(daemon, model="tiny", prompt="word " * 600, max_tokens=4)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "512" in msg and str(len("word " * 600) // 5) in msg or "prompt has" in msg
    r = completion(daemon, model="tiny", prompt="x", temperature=9)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = completion(daemon, model="tiny", prompt="x", max_tokens=10_000)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_concurrent_requests_all_finish_and_the_pool_returns_to_full(daemon):
    def one(i):
        return completion(daemon, model="tiny", prompt=f"request {i} says", max_tokens=10 + i, temperature=0)
    with cf.ThreadPoolExecutor(24) as ex:
        results = list(ex.map(one, range(24)))
    assert all(r.status_code == 200 for r in results)
    assert [r.json()["usage"]["completion_tokens"] for r in results] == [10 + i for i in range(24)]
    mem = daemon.memory("tiny")
    assert mem["blocks_used"] == 0 and mem["blocks_free"] == mem["blocks_total"]


def test_client_disconnect_mid_stream_aborts_and_frees_blocks(daemon):
    with daemon.http() as c:
        with c.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 400,
                                                       "stream": True, "ignore_eos": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
    deadline = time.monotonic() + 60   # (a cleanup takes milliseconds; a loaded CI machine, seconds)
    while time.monotonic() < deadline:
        mem = daemon.memory("tiny")
        if mem["blocks_used"] == 0 and not daemon.ps()["requests"]:
            break
        time.sleep(0.1)
    assert mem["blocks_used"] == 0
    assert daemon.ps()["requests"] == []


def test_garbage_on_the_bus_and_http_socket_does_not_crash(daemon):
    before = httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket)), base_url="http://x")
    rejected0 = before.get("/health").json()["rejected_bus_messages"]
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"ipc://{daemon.home / 'run' / 'kernel.bus'}")
    for frames in ([b"\x99"], [b"\x30", b"not msgpack"], [b"\x30", b"\x80"], [b"\x12", b"\x93\x01\x02\x03", b"x"]):
        s.send_multipart(frames)
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(str(daemon.socket))
    raw.sendall(b"\x00\xff GARBAGE \r\n\r\n" * 50)
    raw.close()

    def rejected():
        health = before.get("/health").json()
        return health if health["rejected_bus_messages"] >= rejected0 + 4 else None
    health = wait_for(rejected, 60, "the kernel counted the 4 bad messages as rejected")
    assert health["status"] == "ok"
    r = completion(daemon, model="tiny", prompt="still alive", max_tokens=3)
    assert r.status_code == 200
    s.close()
