"""Replicas through a real daemon: two model drivers for one model, balanced and cache-aware,
scaled up and down, and a replica killed mid-generation losing nothing."""
from __future__ import annotations

import os
import signal
import time

import pytest

from daemon_harness import Daemon, stream_many

SHARED = "You are a careful assistant. " * 30   # a long common prefix (~900 characters)


def ps(d: Daemon) -> dict:
    return {p["name"]: p for p in d.ps()["processes"]}


def served_tokens(d: Daemon) -> dict:
    with d.http() as c:
        mem = c.get("/llmos/v1/memory").json()
    return {name: m["steps"]["tokens_computed"] for name, m in mem.items() if "steps" in m}


def complete(d: Daemon, prompt: str, max_tokens: int = 8, model: str = "tl") -> str:
    with d.http() as c:
        r = c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                            "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_llama_dir):
    d = Daemon(tmp_path_factory.mktemp("replicas"), [f"tl={tiny_llama_dir}"], "--replicas", "2",
               "--max-model-len", "512").wait_ready()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def reference(tiny_daemon):
    """The same prompts on one replica (the shared daemon's `tiny`: the same weights): what
    every replica must answer."""
    return {p: complete(tiny_daemon, p, 24, model="tiny") for p in [f"story {i}:" for i in range(8)]}


def test_two_replicas_run_and_share_the_work_with_identical_outputs(daemon, reference):
    procs = ps(daemon)
    assert all(procs[n]["state"] == "running" for n in ("model-tl", "model-tl~1", "tokenizer-tl", "tokenizer-tl~1"))
    with daemon.http() as c:
        entry = next(m for m in c.get("/v1/models").json()["data"] if m["id"] == "tl")
    assert entry["state"] == "loaded"
    before = served_tokens(daemon)
    prompts = list(reference)
    texts = stream_many(daemon, "tl", prompts, 24)
    assert dict(zip(prompts, texts)) == reference            # either replica answers as one would
    after = served_tokens(daemon)
    work = {n: after[n] - before.get(n, 0) for n in ("tl", "tl~1")}
    assert all(w > 0 for w in work.values()), work            # at once, both got some


def test_a_shared_prefix_goes_where_it_is_cached(daemon):
    with daemon.http() as c:
        mem = c.get("/llmos/v1/memory").json()
    hits = {n: mem[n]["prefix_cache"]["hit_tokens"] for n in ("tl", "tl~1")}
    for i in range(6):   # one at a time: no load to balance, so the prefix decides
        complete(daemon, SHARED + f"question {i}?")
    with daemon.http() as c:
        mem = c.get("/llmos/v1/memory").json()
    gained = {n: mem[n]["prefix_cache"]["hit_tokens"] - hits[n] for n in ("tl", "tl~1")}
    assert sorted(gained.values())[0] == 0 and max(gained.values()) > 5 * 100, gained   # all on one replica


def test_a_replica_killed_mid_generation_loses_nothing(daemon, reference):
    prompts = list(reference)

    def kill():
        os.kill(ps(daemon)["model-tl~1"]["pid"], signal.SIGKILL)
    texts = stream_many(daemon, "tl", prompts, 24, during=kill)
    assert dict(zip(prompts, texts)) == reference
    assert ps(daemon)["model-tl~1"]["restarts"] >= 1


def test_scale_down_and_up(daemon):
    with daemon.http() as c:
        r = c.post("/llmos/v1/models/tl/scale", json={"replicas": 1})
        assert r.status_code == 200 and r.json()["engines"] == ["tl"]
        deadline = time.monotonic() + 60
        while "model-tl~1" in ps(daemon):
            assert time.monotonic() < deadline, "the removed replica never stopped"
            time.sleep(0.1)
        assert complete(daemon, "story 0:", 24)
        assert c.post("/llmos/v1/models/tl/scale", json={"replicas": 9}).status_code == 409   # past the slots
        assert c.post("/llmos/v1/models/tl/scale", json={"replicas": "2"}).status_code == 400
        assert c.post("/llmos/v1/models/nope/scale", json={"replicas": 2}).status_code == 404
        r = c.post("/llmos/v1/models/tl/scale", json={"replicas": 2})
        assert r.status_code == 200 and len(r.json()["engines"]) == 2, r.text
    assert complete(daemon, "story 1:", 24)


def test_replicas_spread_over_devices_one_per_device_first():
    from llmos.kernel.deployments import Deployment
    d = Deployment("m", "m", None)
    where = {}
    for _ in range(5):
        eid = d.new_engine_id(where)
        where[eid] = d.place(["cuda:0", "cuda:1"], where.get)
        d.serving.append(eid)
    assert [where[e] for e in d.serving] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert list(where) == ["m", "m~1", "m~2", "m~3", "m~4"]
