"""Models loaded on demand and unloaded when idle, through a real daemon and real drivers.

Two tiny models of different architectures: `tl` (llama) is preloaded with --model, `qw`
(qwen2) is only registered, and `broken` is registered with its weights deleted.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from daemon_harness import Daemon, stream_text
from llmos.cli.main import cli
from llmos.models.catalog import Catalog
from llmos.paths import Paths

HELLO = {"prompt": "Hello there", "max_tokens": 6, "temperature": 0, "ignore_eos": True}


def register(home, tiny_qwen2_dir, tmp_path_factory) -> None:
    catalog = Catalog(Paths.from_env(home))
    catalog.add("qw", tiny_qwen2_dir)
    broken = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(tiny_qwen2_dir, broken)
    catalog.add("broken", broken)
    (broken / "model.safetensors").unlink()   # registered, then its weights went missing


def state(d: Daemon, name: str) -> str:
    with d.http() as c:
        return next(m["state"] for m in c.get("/v1/models").json()["data"] if m["id"] == name)


def wait_state(d: Daemon, name: str, want: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := state(d, name)) != want:
        assert time.monotonic() < deadline, f"{name} stayed {now}, never {want}"
        time.sleep(0.1)


def complete(d: Daemon, model: str, **extra):
    with d.http() as c:
        return c.post("/v1/completions", json={"model": model, **HELLO, **extra})


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_llama_dir, tiny_qwen2_dir):
    home = tmp_path_factory.mktemp("lifecycle")
    register(home, tiny_qwen2_dir, tmp_path_factory)
    d = Daemon(home, [f"tl={tiny_llama_dir}"], "--max-loaded-models", "2", "--keep-alive", "10m").wait_ready()
    yield d
    d.stop()


def test_a_registered_model_loads_on_demand_and_answers(daemon):
    assert state(daemon, "qw") == "unloaded" and state(daemon, "tl") == "loaded"
    cold = complete(daemon, "qw")
    assert cold.status_code == 200, cold.text
    warm = complete(daemon, "qw")
    assert warm.json()["choices"][0]["text"] == cold.json()["choices"][0]["text"]   # same model, same greedy
    assert cold.json()["usage"]["completion_tokens"] == 6 and state(daemon, "qw") == "loaded"
    names = {p["name"] for p in daemon.ps()["processes"]}
    assert {"model-qw", "tokenizer-qw", "model-tl", "tokenizer-tl"} <= names


def test_keep_alive_zero_unloads_right_after_and_frees_the_drivers(daemon):
    assert complete(daemon, "qw", keep_alive=0).status_code == 200
    wait_state(daemon, "qw", "unloaded")
    names = {p["name"] for p in daemon.ps()["processes"]}
    assert "model-qw" not in names and "tokenizer-qw" not in names
    with daemon.http() as c:
        assert "qw" not in c.get("/llmos/v1/memory").json()
    assert complete(daemon, "tl").status_code == 200   # the other model never noticed


def test_load_and_unload_commands_and_loading_is_visible(daemon):
    with daemon.http() as c:
        assert c.post("/llmos/v1/models/qw/load").json()["state"] == "loading"
        assert state(daemon, "qw") == "loading"   # its driver cannot have imported torch yet
        wait_state(daemon, "qw", "loaded")
        assert c.post("/llmos/v1/models/qw/unload").json()["state"] == "unloaded"
        assert c.post("/llmos/v1/models/nope/load").status_code == 404
        assert c.post("/llmos/v1/models/qw/unload").status_code == 409   # not loaded
    r = CliRunner().invoke(cli, ["--home", str(daemon.home), "load", "qw"])
    assert r.exit_code == 0 and "qw: loaded" in r.output, r.output
    assert state(daemon, "qw") == "loaded"


def test_a_model_that_cannot_load_fails_its_requests_at_once_and_nothing_else(daemon):
    r = complete(daemon, "broken")
    assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
    assert state(daemon, "broken") == "failed"
    rows = {p["name"]: p for p in daemon.ps()["processes"]}
    row = rows["model-broken"]   # kept, to be read: failed at its first try, not restarting in a loop
    assert (row["state"], row["restarts"], row["pid"]) == ("failed", 0, None) and row["last_error"]
    assert "tokenizer-broken" not in rows
    assert complete(daemon, "tl").status_code == 200
    assert complete(daemon, "nope").status_code == 404


@pytest.fixture()
def one_slot(tmp_path, tiny_llama_dir, tiny_qwen2_dir, tmp_path_factory):
    register(tmp_path, tiny_qwen2_dir, tmp_path_factory)
    d = Daemon(tmp_path, [f"tl={tiny_llama_dir}"]).wait_ready()   # one --model: one model at a time
    yield d
    d.stop()


def test_an_idle_model_is_evicted_and_a_busy_one_refuses_with_the_numbers(one_slot):
    d = one_slot
    assert complete(d, "qw").status_code == 200            # tl was idle: evicted for qw
    assert state(d, "tl") == "unloaded" and state(d, "qw") == "loaded"
    first = threading.Event()
    streamed: list = []
    busy = threading.Thread(target=lambda: streamed.append(stream_text(d, "qw", "Once", 1500, first)))
    busy.start()
    assert first.wait(120)
    refused = complete(d, "tl")                            # qw is busy: nothing to evict
    with d.http() as c:
        c.post(f"/llmos/v1/requests/{d.ps()['requests'][0]['id']}/cancel")
    busy.join(120)
    assert refused.status_code == 503, refused.text
    message = refused.json()["error"]["message"]
    assert "model 'tl' cannot be loaded" in message and "(qw)" in message and "--max-loaded-models" in message
    assert complete(d, "tl").status_code == 200            # qw is idle again: evicted for tl


@pytest.mark.parametrize("args, says", [
    (["--model", "nosuchmodel"], "nosuchmodel"),
    (["--kv-memory", "lots"], "--kv-memory"),
    (["--kv-memory", "-1GiB"], "--kv-memory"),
    (["--keep-alive", "soon"], "--keep-alive"),
    (["--max-loaded-models", "0"], "--max-loaded-models"),
    (["--memory-limit", "infGiB"], "--memory-limit"),
])
def test_bad_options_exit_at_once_naming_the_option(tmp_path, args, says):
    r = subprocess.run([sys.executable, "-m", "llmos.cli.daemon", "--home", str(tmp_path), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.fixture()
def small_memory(tmp_path, tiny_llama_dir, tiny_qwen2_dir, tmp_path_factory):
    register(tmp_path, tiny_qwen2_dir, tmp_path_factory)
    # Each tiny model takes ~13 MiB of weights and 32 MiB of KV (64 MiB over 2 slots): one fits in 60.
    d = Daemon(tmp_path, [f"tl={tiny_llama_dir}"], "--max-loaded-models", "2", "--memory-limit", "60MiB").wait_ready()
    yield d
    d.stop()


def test_memory_limit_decides_busy_means_503_with_the_numbers_idle_means_evicted(small_memory):
    d = small_memory
    first = threading.Event()
    busy = threading.Thread(target=lambda: stream_text(d, "tl", "Once", 1500, first))
    busy.start()
    assert first.wait(120)
    refused = complete(d, "qw")
    with d.http() as c:
        c.post(f"/llmos/v1/requests/{d.ps()['requests'][0]['id']}/cancel")
    busy.join(120)
    assert refused.status_code == 503, refused.text
    message = refused.json()["error"]["message"]
    assert "model 'qw' cannot be loaded: model 'qw' needs" in message and "weights" in message
    assert "(--memory-limit 60.0 MiB); busy models hold the rest: tl" in message
    assert complete(d, "qw").status_code == 200            # tl is idle now: evicted for qw
    assert state(d, "tl") == "unloaded"
    with d.http() as c:
        mem = c.get("/llmos/v1/memory").json()["qw"]
    assert mem["accounting"]["weight_bytes"] > 0 and mem["pool_bytes"] == 32 * 2**20
