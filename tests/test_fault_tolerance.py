"""Drivers crash, nothing is lost: real processes, real signals (design.md, section 5)."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from daemon_harness import Daemon, serving, stream_many, wait_for
from daemon_harness import stream_text as harness_stream_text

PROMPTS = [f"Story number {i}: once upon a time" for i in range(16)]
MAX_TOKENS = 300


def stream_text(daemon, prompt, first_chunk=None, max_tokens=MAX_TOKENS) -> str:
    return harness_stream_text(daemon, "tiny", prompt, max_tokens, first_chunk)


def run_all(daemon: Daemon, during=None) -> list[str]:
    results = stream_many(daemon, "tiny", PROMPTS, MAX_TOKENS, during)
    errors = [r for r in results if not isinstance(r, str)]
    assert not errors, errors[:3]
    return results


def pid_of(daemon: Daemon, name: str) -> int:
    return next(p["pid"] for p in daemon.ps()["processes"] if p["name"] == name)


def wait_running(daemon: Daemon, name: str) -> None:
    def up():
        try:
            return any(p["name"] == name and p["state"] == "running" for p in daemon.ps()["processes"])
        except (httpx.HTTPError, json.JSONDecodeError):
            return False
    wait_for(up, 120, f"{name} running again")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_llama_dir):
    with serving(tmp_path_factory.mktemp("ft"), [f"tiny={tiny_llama_dir}"], "--max-model-len", "512") as d:
        yield d


@pytest.fixture(scope="module")
def reference(daemon):
    return run_all(daemon)


def test_decode_steps_are_sent_ahead_through_the_real_processes(daemon, reference):
    # kernel/run_ahead.py over the real bus and ModelRunner: the reference outputs (checked
    # against HF elsewhere, and equal after every kill below) came with steps sent ahead
    steps = daemon.memory("tiny")["steps"]
    assert steps["ahead"] > 0 and steps["ahead"] < steps["steps"]


def test_model_driver_kill_9_mid_generation_loses_nothing(daemon, reference):
    killed = {}

    def kill_model():
        killed["pid"] = pid_of(daemon, "model-tiny")
        os.kill(killed["pid"], signal.SIGKILL)
    outputs = run_all(daemon, during=kill_model)
    assert outputs == reference
    proc = next(p for p in daemon.ps()["processes"] if p["name"] == "model-tiny")
    assert proc["restarts"] >= 1 and proc["pid"] != killed["pid"]
    mem = daemon.memory("tiny")
    (recovery,) = mem["recoveries"][-1:]
    # only the steps in flight are recomputed (the running one and the one sent ahead of it,
    # kernel/run_ahead.py), never a sequence's whole history
    assert recovery["recomputed_tokens"] <= 2 * len(PROMPTS)
    assert mem["blocks_used"] == 0 and mem["integrity"] == "ok"


def test_tokenizer_kill_9_mid_stream_leaves_no_gap_and_no_repeat(daemon, reference):
    def kill_tokenizer():
        os.kill(pid_of(daemon, "tokenizer-tiny"), signal.SIGKILL)
    assert run_all(daemon, during=kill_tokenizer) == reference
    wait_running(daemon, "tokenizer-tiny")


def test_io_driver_kill_closes_connections_frees_requests_and_comes_back(daemon):
    errors = []
    got_text = threading.Event()

    def client():
        try:
            stream_text(daemon, "a long one", got_text, max_tokens=500)
        except (httpx.HTTPError, RuntimeError) as exc:
            errors.append(exc)
    t = threading.Thread(target=client)
    t.start()
    assert got_text.wait(60)
    os.kill(pid_of(daemon, "io"), signal.SIGKILL)
    t.join(10)
    assert not t.is_alive(), "the client hung after the io driver died"
    assert errors, "the stream should have been cut"
    wait_running(daemon, "io")
    wait_for(lambda: daemon.memory("tiny")["blocks_used"] == 0 and not daemon.ps()["requests"], 20,
             "aborted request freed")
    with daemon.http() as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "new", "max_tokens": 4})
    assert r.status_code == 200


def test_hostile_bus_traffic_changes_nothing(daemon):
    import zmq
    from hypothesis import given, settings
    from hypothesis import strategies as st

    with daemon.http() as c:
        before = c.get("/health").json()["rejected_bus_messages"]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{daemon.home / 'run' / 'kernel.bus'}")
    sent = []

    @settings(max_examples=150, deadline=None, database=None)
    @given(st.lists(st.binary(max_size=40), min_size=1, max_size=4))
    def fuzz(frames):
        if len(frames) >= 2 and len(frames[0]) == 1:
            frames[0] = bytes([0x30 + frames[0][0] % 8])  # aim at real opcodes now and then
        sock.send_multipart(frames)
        sent.append(frames)
    fuzz()
    sock.close()

    def rejected():
        health = _health(daemon)
        return health if health["rejected_bus_messages"] >= before + len(sent) // 2 else None
    health = wait_for(rejected, 60, "the kernel counted at least half the frames as rejected")
    assert health["status"] == "ok"
    assert daemon.ps()["requests"] == [] and daemon.memory("tiny")["blocks_used"] == 0


def test_kernel_kill_9_drivers_exit_and_next_start_is_clean(tmp_path, tiny_llama_dir):
    d = Daemon(tmp_path, [f"tiny={tiny_llama_dir}"]).wait_ready()
    drivers = {p["pid"]: p["name"] for p in d.ps()["processes"] if p["role"] != "kernel"}
    (pool,) = Path("/dev/shm").glob(f"llmos-{os.getuid()}-{d.proc.pid}-*-tiny.kv")   # (its name is unguessable)
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()

    def alive() -> dict:
        left = {}
        for pid, name in drivers.items():
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left[name] = pid
            except psutil.NoSuchProcess:
                pass
        return left
    try:
        wait_for(lambda: not alive(), 30, "drivers exit with their kernel")
    except TimeoutError:
        raise AssertionError(f"drivers outlived their kernel: {alive()}") from None
    assert (tmp_path / "run" / "llmosd.pid").exists()  # stale files left behind by the kill
    d2 = Daemon(tmp_path, [f"tiny={tiny_llama_dir}"]).wait_ready()
    try:
        assert not pool.exists()
        with d2.http() as c:
            assert c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3}).status_code == 200
    finally:
        d2.stop()


def test_sigterm_drains_in_flight_requests_then_stops_in_reverse_order(tmp_path, tiny_llama_dir):
    d = Daemon(tmp_path, [f"tiny={tiny_llama_dir}"], "--drain-timeout", "60").wait_ready()
    pids = [p["pid"] for p in d.ps()["processes"] if p["role"] != "kernel"]
    out, started = {}, threading.Event()
    t = threading.Thread(target=lambda: out.setdefault("text", stream_text(d, "drain me", started, 300)))
    t.start()
    assert started.wait(60)
    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with d.http() as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "late", "max_tokens": 3})
    assert r.status_code == 503
    t.join(120)
    assert len(out.get("text", "")) > 0
    assert d.proc.wait(60) == 0
    assert not any(psutil.pid_exists(p) for p in pids)
    assert not list(Path("/dev/shm").glob(f"llmos-{os.getuid()}-{d.proc.pid}-*"))
    log = (tmp_path / "llmosd.out").read_text()
    names = ("tokenizer-tiny", "io", "model-tiny")
    starts = [name for line in log.splitlines() for name in names if f"driver {name} started" in line]
    stops = [line for line in log.splitlines() if "-> exited" in line or "stopping" in line]
    order = [name for line in stops for name in names if f"driver {name}:" in line]
    assert sorted(starts) == sorted(names) and order[::2] == starts[::-1], (starts, order)
    d.stop()


def test_driver_that_cannot_start_is_failed_and_the_rest_serves(tmp_path, tiny_llama_dir):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{ this is not json")
    d = Daemon(tmp_path / "home", [f"tiny={tiny_llama_dir}", f"broken={broken}"], "--max-restarts", "1")
    try:
        def failed():
            procs = {p["name"]: p for p in d.ps()["processes"]} if d.socket.exists() else {}
            return procs.get("model-broken", {}).get("state") == "failed"
        wait_for(lambda: _quiet(failed), 120, "broken driver marked failed")
        proc = next(p for p in d.ps()["processes"] if p["name"] == "model-broken")
        assert "broken" in proc["last_error"] and "config" in proc["last_error"].lower()
        wait_for(lambda: _quiet(lambda: d.ps() and _health(d)["models"]["tiny"] == "ready"), 120, "tiny ready")
        health = _health(d)
        assert health["status"] == "degraded" and "model-broken" in health["failed_drivers"]
        with d.http() as c:
            r = c.post("/v1/completions", json={"model": "broken", "prompt": "x", "max_tokens": 3})
            assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]   # (tried again)
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3})
            assert r.status_code == 200
    finally:
        d.stop()


def _health(d: Daemon) -> dict:
    with d.http() as c:
        return c.get("/health").json()


def _quiet(cond) -> bool:
    try:
        return bool(cond())
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, StopIteration):
        return False


def test_llmos_restart_and_mem_commands(daemon):
    from click.testing import CliRunner

    from llmos.cli.main import cli
    old = pid_of(daemon, "tokenizer-tiny")
    runner = CliRunner()
    r = runner.invoke(cli, ["--home", str(daemon.home), "restart", "tokenizer-tiny"])
    assert r.exit_code == 0, r.output
    wait_for(lambda: _quiet(lambda: pid_of(daemon, "tokenizer-tiny") not in (None, old)), 60, "new tokenizer pid")
    wait_running(daemon, "tokenizer-tiny")
    r = runner.invoke(cli, ["--home", str(daemon.home), "restart", "nope"])
    assert r.exit_code != 0 and "nope" in r.output
    r = runner.invoke(cli, ["--home", str(daemon.home), "mem"])
    assert r.exit_code == 0 and "prefix cache: hit rate" in r.output and "cached-free" in r.output
