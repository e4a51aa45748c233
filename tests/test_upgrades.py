"""Upgrades through a real daemon under a steady load of streams: zero failed requests, each
stream answered wholly by one version, a broken version rolled back, and rollback on demand.

Model `qw` v1 is a tiny qwen2 (seed 0), v2 the same architecture with other weights (seed 1),
so every answer says which version produced it."""
from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
from click.testing import CliRunner

from conftest import tiny_model_dir
from daemon_harness import Daemon, stream_text
from llmos.cli.main import cli
from llmos.client import Client
from llmos.models.catalog import Catalog
from llmos.paths import Paths

PROMPTS = [f"line {i}:" for i in range(16)]
TOKENS = 12


@pytest.fixture(scope="module")
def versions(model_cache, smollm2_dir, tiny_qwen2_dir, tmp_path_factory) -> dict:
    broken = tmp_path_factory.mktemp("broken") / "qw-v3"
    shutil.copytree(tiny_qwen2_dir, broken)
    (broken / "model.safetensors").unlink()   # its weights are missing: it cannot load
    return {1: tiny_qwen2_dir, 2: tiny_model_dir("qwen2", model_cache, smollm2_dir, seed=1), 3: broken}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, versions):
    home = tmp_path_factory.mktemp("upgrades")
    Catalog(Paths.from_env(home)).add("qw", versions[1])
    d = Daemon(home, ["qw"], "--max-loaded-models", "2", "--max-model-len", "256").wait_ready()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def answers(tmp_path_factory, versions) -> dict:
    """What each version answers to each prompt, from one daemon serving both side by side
    (as qw1 and qw2: a completion's text depends on the weights, not on the model's name)."""
    d = Daemon(tmp_path_factory.mktemp("v1-v2"), [f"qw{v}={versions[v]}" for v in (1, 2)],
               "--max-model-len", "256").wait_ready()
    try:
        out = {v: {p: stream_text(d, f"qw{v}", p, TOKENS) for p in PROMPTS} for v in (1, 2)}
    finally:
        d.stop()
    assert out[1] != out[2]
    return out


class Load:
    """16 client threads, each streaming its prompt again and again until stopped."""
    def __init__(self, d: Daemon):
        self.d, self.stop, self.results, self.errors = d, threading.Event(), [], []
        self.threads = [threading.Thread(target=self._client, args=(p,)) for p in PROMPTS]

    def _client(self, prompt: str) -> None:
        while not self.stop.is_set():
            try:
                self.results.append((prompt, stream_text(self.d, "qw", prompt, TOKENS)))
            except Exception as exc:   # any failure is what the test counts
                self.errors.append(repr(exc))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(120)


def status(d: Daemon) -> dict:
    with d.http() as c:
        return c.get("/llmos/v1/models/qw/upgrade").json()


def wait_idle_upgrade(d: Daemon, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while (s := status(d))["upgrade"] is not None:
        assert time.monotonic() < deadline, f"upgrade still running: {s}"
        time.sleep(0.2)
    return s


def llmos(d: Daemon, *args):
    return CliRunner().invoke(cli, ["--home", str(d.home), *args])


def test_upgrade_under_load_fails_nothing_and_every_stream_is_one_version(daemon, answers, versions):
    lines = [{"custom_id": f"j{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "qw", "prompt": PROMPTS[i % 16], "max_tokens": 24, "ignore_eos": True}}
             for i in range(48)]
    with Load(daemon) as load:
        while len(load.results) < 32:   # steady state first
            time.sleep(0.05)
        with Client(daemon.home) as c:   # a batch job on the model runs across the upgrade
            job_id = c.submit_batch(lines)["id"]
        r = llmos(daemon, "models", "upgrade", "qw", "--to", str(versions[2]), "--note", "seed 1")
        assert r.exit_code == 0 and "switched to v2" in r.output, r.output
        s = wait_idle_upgrade(daemon)      # the watch: v2 serves its first requests, then v1 retires
        switched_at = len(load.results)
        while len(load.results) < switched_at + 32:
            time.sleep(0.05)
    assert load.errors == []
    with Client(daemon.home) as c:
        job = c.wait(job_id, timeout=300, poll=0.2)
        results = [json.loads(x) if isinstance(x, str) else x for x in c.results(job_id)]
    assert job["status"] == "completed" and job["request_counts"] == {"total": 48, "completed": 48, "failed": 0}
    assert sorted(x["custom_id"] for x in results) == sorted(f"j{i}" for i in range(48))
    by_version = {1: 0, 2: 0}
    for prompt, text in load.results:
        assert text in (answers[1][prompt], answers[2][prompt]), (prompt, text)   # never a mix
        by_version[1 if text == answers[1][prompt] else 2] += 1
    assert by_version[1] >= 32 and by_version[2] >= 32, by_version
    assert s["serving"] == 2 and s["last"]["outcome"] == "switched"
    names = {p["name"] for p in daemon.ps()["processes"]}
    assert "model-qw" not in names                     # v1's engine retired
    assert Catalog(Paths.from_env(daemon.home)).get("qw").active == 2


def test_a_broken_version_rolls_back_with_no_failed_request(daemon, answers, versions):
    with Load(daemon) as load:
        while len(load.results) < 16:
            time.sleep(0.05)
        r = llmos(daemon, "models", "upgrade", "qw", "--to", str(versions[3]))
        assert r.exit_code == 1 and "rolled back" in r.output and "failed to load" in r.output, r.output
        n = len(load.results)
        while len(load.results) < n + 16:
            time.sleep(0.05)
    assert load.errors == []
    assert all(text == answers[2][p] for p, text in load.results)   # v2 served throughout
    s = status(daemon)
    assert s["serving"] == 2 and s["last"]["outcome"] == "rolled back"
    assert Catalog(Paths.from_env(daemon.home)).get("qw").active == 2
    assert [e.kind for e in Catalog(Paths.from_env(daemon.home)).history("qw")][-1] == "upgrade failed"


def test_rollback_goes_back_to_the_version_before_and_history_shows_it(daemon, answers):
    r = llmos(daemon, "models", "rollback", "qw")
    assert r.exit_code == 0 and "rolling back to v1" in r.output, r.output
    deadline = time.monotonic() + 240
    while (u := status(daemon)["upgrade"]) is not None and u["phase"] != "watching":   # switched back
        assert time.monotonic() < deadline, u
        time.sleep(0.2)
    assert stream_text(daemon, "qw", PROMPTS[0], TOKENS) == answers[1][PROMPTS[0]]
    out = llmos(daemon, "models", "history", "qw").output
    assert "upgraded" in out and "upgrade failed" in out and "rolled back" in out


def test_bad_upgrade_requests_are_refused_precisely(daemon):
    with daemon.http() as c:
        assert c.post("/llmos/v1/models/qw/upgrade", json={"version": 99}).status_code == 409
        assert c.post("/llmos/v1/models/qw/upgrade", json={"version": "2"}).status_code == 400
        assert c.post("/llmos/v1/models/qw/upgrade", json={}).status_code == 400
        assert c.post("/llmos/v1/models/nope/upgrade", json={"version": 2}).status_code == 404
        assert c.get("/llmos/v1/models/nope/upgrade").status_code == 404
    assert stream_text(daemon, "qw", PROMPTS[1], TOKENS)   # and it still serves


@pytest.fixture()
def one_slot(tmp_path, versions):
    Catalog(Paths.from_env(tmp_path)).add("qw", versions[1])
    d = Daemon(tmp_path, ["qw"], "--max-model-len", "256").wait_ready()   # room for one engine only
    yield d
    d.stop()


def test_in_place_upgrade_drains_then_loads_and_its_rollback_reloads_the_old(one_slot, answers, versions):
    d = one_slot
    refused = llmos(d, "models", "upgrade", "qw", "--to", str(versions[2]))
    assert refused.exit_code == 1 and "in place" in refused.output, refused.output
    with Load(d) as load:
        while len(load.results) < 16:
            time.sleep(0.05)
        r = llmos(d, "models", "upgrade", "qw", "--to", str(versions[2]), "--in-place")   # v3: v2 was refused
        assert r.exit_code == 0 and "draining v3" in r.output and "switched to v3" in r.output, r.output
        n = len(load.results)
        while len(load.results) < n + 16:
            time.sleep(0.05)
    assert load.errors == []
    assert all(text in (answers[1][p], answers[2][p]) for p, text in load.results)
    assert stream_text(d, "qw", PROMPTS[0], TOKENS) == answers[2][PROMPTS[0]]
    with Load(d) as load:   # a broken version in place: the old one comes back, nothing fails
        while len(load.results) < 16:
            time.sleep(0.05)
        r = llmos(d, "models", "upgrade", "qw", "--to", str(versions[3]), "--in-place")
        assert r.exit_code == 1 and "rolled back" in r.output, r.output
        n = len(load.results)
        while len(load.results) < n + 16:
            time.sleep(0.05)
    assert load.errors == []
    assert all(text == answers[2][p] for p, text in load.results[n:])
