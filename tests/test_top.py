"""`llmos top`: one frame rendered from canned API answers, and `top --once` against the
real daemon while a batch job runs (it uses the socket API only)."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest
from click.testing import CliRunner
from rich.console import Console

from llmos.cli import main as cli_main
import llmos.cli.top as top_module
from llmos.cli.top import render, tokens_per_s
from llmos.client import Client

SNAP = {
    "health": {"status": "ok", "pid": 42, "uptime_s": 75.0, "device": "cpu", "requests_in_flight": 3,
               "failed_drivers": []},
    "ps": {"processes": [{"name": "model-tiny", "role": "model", "pid": 43, "state": "running", "uptime_s": 70,
                          "restarts": 1}],
           "requests": [{"id": "job-batch_1-1", "model": "tiny", "tenant": "batch", "state": "running",
                         "prompt_tokens": 9, "output_tokens": 4, "age_s": 0.5, "priority": "batch:0"},
                        {"id": "cmpl-1", "model": "tiny", "tenant": "local", "state": "waiting",
                         "prompt_tokens": 5, "output_tokens": 0, "age_s": 0.1, "priority": "interactive:0"}]},
    "memory": {"tiny": {"blocks_total": 100, "blocks_used": 25, "preemptions": 2,
                        "steps": {"steps": 10, "tokens_computed": 1500, "kernel_share": 0.05}}},
    "jobs": [{"id": "batch_1", "status": "in_progress", "request_counts": {"total": 10, "completed": 4, "failed": 1},
              "llmos": {"throughput": {"requests_per_s": 2.5}, "eta_s": 2.0}}],
    "job_errors": [{"at": 0.0, "job": "batch_1", "line": 3, "status": 400, "code": "context_length_exceeded",
                    "message": "too long"}],
}


def text_of(renderable) -> str:
    console = Console(record=True, width=140)
    console.print(renderable)
    return console.export_text()


def test_a_frame_shows_every_section():
    before = {"tiny": {"steps": {"tokens_computed": 1000}}}
    rates = tokens_per_s(SNAP["memory"], before, 2.0)
    assert rates == {"tiny": 250.0} and tokens_per_s(SNAP["memory"], None, 1.0) == {"tiny": None}
    out = text_of(render(SNAP, rates))
    assert "llmosd ok  pid 42" in out and "model-tiny" in out and "Drivers" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert lines["interactive"][1:] == ["0", "0", "1", "0", "0", "0", "0"]
    assert lines["batch"][1:] == ["0", "0", "0", "0", "0", "1", "0"] and lines["realtime"][1:] == ["0"] * 7
    assert "25/100" in out and "25%" in out and "KV memory" in out
    assert "Throughput (tokens/s)" in out and "250.0" in out
    assert "batch_1" in out and "5/10" in out
    assert "restarted 1 time(s)" in out and "400 context_length_exceeded: too long" in out


@pytest.fixture(scope="module")
def daemon(tiny_daemon):
    return tiny_daemon


MAX_TOKENS = 200   # per job line; prompt + MAX_TOKENS fits the daemon's 2048-token context


class TopTime:
    """Stands in for the time module in llmos.cli.top, with its own sleep."""
    def __init__(self, sleep):
        self.sleep = sleep

    def __getattr__(self, name):
        return getattr(time, name)


def wait_for(what: str, condition, timeout: float = 120.0):
    """Poll until condition() is truthy; the timeout only turns a broken daemon into a
    failure instead of a hang."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


def test_top_once_on_the_real_daemon(daemon, monkeypatch):
    """top --once samples the daemon twice and renders the second sample with the tokens/s
    between them. Nothing here depends on speed: the model driver is held (SIGSTOP) except
    while the test lets it compute, so the job cannot end before the test cancels it; top's
    sleep lets the model run until it has computed more tokens than at top's first sample,
    then holds it with a job line at least 2 tokens from its end (a step adds at most 1, and
    one step may still be applied), so the second sample sees that line in flight, its
    blocks in use and the job in progress. The console width is pinned (COLUMNS)."""
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "tiny", "prompt": f"Count to {i}", "max_tokens": MAX_TOKENS, "ignore_eos": True,
                       "temperature": 0}}
             for i in range(40)]
    with Client(daemon.home) as c:
        pid = next(p["pid"] for p in c.ps()["processes"] if p["name"] == "model-tiny")

        def tokens_computed() -> int:
            return c.memory()["tiny"]["steps"]["tokens_computed"]

        def lines_in_flight(room: int) -> list[dict]:
            """The job's requests with at least `room` tokens still to generate."""
            return [r for r in c.ps()["requests"] if r["id"].startswith(f"job-{job['id']}-")
                    and r["output_tokens"] <= MAX_TOKENS - room]

        def sleep(_seconds):   # top, between its two samples
            first = tokens_computed()           # >= what top's first sample read
            while tokens_computed() == first:   # let the model run a little, until it has computed more
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.005)
                os.kill(pid, signal.SIGSTOP)
            wait_for("a job line 2 tokens from its end", lambda: [r for r in lines_in_flight(2)
                                                                  if r["state"] == "running"])

        job = c.submit_batch(lines)
        try:
            wait_for("decoding to begin", lambda: [r for r in lines_in_flight(0) if r["output_tokens"]])
            os.kill(pid, signal.SIGSTOP)        # from here the model computes only when the test lets it
            monkeypatch.setattr(top_module, "time", TopTime(sleep))
            r = CliRunner(env={"COLUMNS": "200"}).invoke(cli_main.cli, ["--home", str(daemon.home), "top", "--once"])
        finally:
            os.kill(pid, signal.SIGCONT)
            c.cancel(job["id"])
    assert r.exit_code == 0, r.output
    out = r.output
    for section in ("Drivers", "Queues by class", "Running batch", "KV memory", "Throughput (tokens/s)",
                    "Batch jobs", "Recent errors"):
        assert section in out
    assert all(name in out for name in ("model-tiny", "tokenizer-tiny", "io", job["id"]))
    assert int(re.search(r"Running batch \((\d+) sequences\)", out).group(1)) > 0
    memory_row = next(line for line in out.splitlines() if line.startswith("tiny") and "/" in line)
    speed_row = next(line for line in out.splitlines() if line.startswith("tiny") and "%" in line and "/" not in line)
    assert int(memory_row.split()[1].split("/")[0]) > 0           # blocks in use while the job runs
    assert float(speed_row.split()[1]) > 0                         # tokens/s from two samples
    batch = next(line for line in out.splitlines() if line.startswith("batch "))
    assert sum(map(int, batch.split()[1:])) > 0
    job_row = next(line for line in out.splitlines() if line.startswith(job["id"]))
    assert job_row.split()[1] == "in_progress"


def test_top_without_a_daemon(tmp_path):
    r = CliRunner().invoke(cli_main.cli, ["--home", str(tmp_path), "top", "--once"])
    assert r.exit_code == 1 and "not running" in r.output
