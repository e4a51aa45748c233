"""`llmos start` with a real llmosd: progress until ready, a failure named as soon as a driver
fails (not at the timeout), options refused while a daemon runs. Every start is given a
timeout of 600 s, so a start that waited it out instead of failing fast would say so."""
from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from llmos.cli.main import cli

SLOW = "600"


def llmos(home, *args):
    return CliRunner().invoke(cli, ["--home", str(home), *args])


@pytest.fixture(scope="module")
def started(tmp_path_factory, tiny_llama_dir):
    home = tmp_path_factory.mktemp("start")
    r = llmos(home, "start", "--timeout", SLOW, "--model", f"tl={tiny_llama_dir}", "--kv-memory", "64MiB")
    yield home, r
    llmos(home, "stop")


def test_a_good_start_shows_progress_and_ends_ready(started):
    home, r = started
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("starting llmosd (pid ")
    assert "model tl: ready" in lines   # ("loading weights" before it only if a poll caught the load)
    assert lines.index("model tl: ready") < len(lines) - 1 and lines[-1].startswith("llmosd started (pid ")
    assert llmos(home, "status").exit_code == 0


def test_options_while_running_are_not_applied(started, tiny_llama_dir):
    home, _ = started
    r = llmos(home, "start", "--model", "other", "--dtype", "bfloat16", "--max-num-seqs", "4")
    assert r.exit_code == 1
    assert "already running" in r.output and "NOT applied" in r.output
    assert "--model other --dtype bfloat16 --max-num-seqs 4" in r.output and "llmos stop" in r.output
    r = llmos(home, "start")   # nothing asked for: nothing to refuse
    assert r.exit_code == 0 and "already running" in r.output
    with_status = llmos(home, "status")
    assert with_status.exit_code == 0 and "tl" in with_status.output and "other" not in with_status.output


def test_a_model_that_cannot_load_fails_the_start_at_once(tmp_path, tiny_llama_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").unlink()   # config.json passes llmosd's check; the driver fails
    home = tmp_path / "home"
    r = llmos(home, "start", "--timeout", SLOW, "--model", f"broken={broken}", "--kv-memory", "64MiB")
    assert r.exit_code == 1, r.output
    assert "not healthy after" not in r.output   # it did not wait out the timeout
    assert "driver model-broken failed" in r.output and "model.safetensors" in r.output
    assert "stopped llmosd" in r.output and "model-broken.log" in r.output
    assert "Traceback" not in r.output
    assert llmos(home, "status").exit_code == 1   # nothing left running


def test_a_daemon_that_exits_shows_its_log(tmp_path):
    r = llmos(tmp_path, "start", "--timeout", SLOW, "--model", "no-such-model")
    assert r.exit_code == 1
    assert "exited with code" in r.output and "--model" in r.output and "no-such-model" in r.output
