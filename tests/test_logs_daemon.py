"""Structured logs of a real daemon: a request with a known X-Request-Id is found by that id
in the kernel's JSON lines (tenant, model, status) and in the io driver's access log; no prompt
text is logged; rotation with a tiny size keeps a bounded, gapless tail; `llmos logs` reads it,
-f included. Every wait polls with a generous deadline."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from daemon_harness import Daemon
from llmos.cli.logs import chain
from llmos.cli.main import cli

MAX_BYTES, BACKUPS = 16384, 3
PROMPT = "the secret prompt PXQ-7731 must never reach a log"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_llama_dir):
    d = Daemon(tmp_path_factory.mktemp("logs"), [f"tiny={tiny_llama_dir}"], "--max-model-len", "512",
               env={"LLMOS_LOG_MAX_BYTES": str(MAX_BYTES), "LLMOS_LOG_BACKUPS": str(BACKUPS)})
    try:
        yield d.wait_ready()
    finally:
        d.stop()


def records(home: Path, process: str) -> list[dict]:
    """Every complete line of the process's log files, oldest first, each parsed as JSON (or the
    test fails). A file rotated away while read: read them all again."""
    while True:
        try:
            texts = [f.read_text() for f in chain(home / "logs", process)]
            return [json.loads(line) for text in texts for line in text.split("\n")[:-1]]
        except FileNotFoundError:
            continue


def poll(find, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"not found within {timeout:g} s: {what}")


def _mine(rid: str):
    return lambda r: rid in (r.get("request_id"), r.get("client_request_id"))


def test_a_request_is_found_by_its_id_in_the_kernel_and_access_logs(daemon):
    with daemon.http() as c:
        r = c.post("/v1/completions", headers={"X-Request-Id": "log-known-1"},
                   json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "tenant": "alice"})
        assert r.status_code == 200, r.text
        refused = c.post("/v1/completions", headers={"X-Request-Id": "log-refused-1"},
                         json={"model": "no-such-model", "prompt": PROMPT, "max_tokens": 4, "tenant": "bob"})
        assert refused.status_code == 404, refused.text
    ended = poll(lambda: [r for r in records(daemon.home, "kernel") if _mine("log-known-1")(r)], "the kernel's line")
    assert {(r["tenant"], r["model"], r["status"], r["finish_reason"]) for r in ended} == {("alice", "tiny", 200, "length")}
    assert ended[0]["output_tokens"] == 4 and ended[0]["process"] == "kernel"
    no = poll(lambda: [r for r in records(daemon.home, "kernel") if _mine("log-refused-1")(r)], "the refusal")
    assert (no[0]["tenant"], no[0]["model"], no[0]["status"]) == ("bob", "no-such-model", 404)
    def access_lines():   # both, or keep polling: the two lines need not be written together
        found = {r["request_id"]: r for r in records(daemon.home, "io") if r["logger"] == "llmos.access"
                 and r.get("request_id") in ("log-known-1", "log-refused-1")}
        return found if len(found) == 2 else None
    by_id = poll(access_lines, "both access lines")
    line = by_id["log-known-1"]
    assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/completions", 200)
    assert line["bytes"] > 0 and line["duration_s"] >= 0 and line["principal"].startswith("uid:")
    assert by_id["log-refused-1"]["status"] == 404
    for f in (daemon.home / "logs").iterdir():   # ids, tenants and counts; never what was asked
        assert "PXQ-7731" not in f.read_text(errors="replace"), f.name


def test_rotation_keeps_a_bounded_tail_with_nothing_missing(daemon):
    with daemon.http() as c:
        for i in range(300):
            assert c.get("/health", headers={"X-Request-Id": f"flood-{i:04d}"}).status_code == 200

    def flood():
        lines = records(daemon.home, "io")
        ids = [r["request_id"] for r in lines if str(r.get("request_id")).startswith("flood-")]
        return ids if ids and ids[-1] == "flood-0299" else None
    ids = poll(flood, "the last flood line")
    files = chain(daemon.home / "logs", "io")
    assert [f.name for f in files] == [f"io.log.{k}" for k in range(BACKUPS, 0, -1)] + ["io.log"]
    assert all(f.stat().st_size <= MAX_BYTES for f in files)
    first = int(ids[0].split("-")[1])
    assert first > 0 and ids == [f"flood-{i:04d}" for i in range(first, 300)]   # old ones went, none in between


def test_llmos_logs_prints_them_and_follows(daemon):
    run = CliRunner().invoke
    io = run(cli, ["--home", str(daemon.home), "logs", "io", "-n", "2"])
    assert io.exit_code == 0 and "request_id=flood-0299" in io.output, io.output
    kernel = run(cli, ["--home", str(daemon.home), "logs", "-n", "-1"])
    assert "request " in kernel.output and "client_request_id=log-known-1" in kernel.output
    raw = run(cli, ["--home", str(daemon.home), "logs", "io", "-n", "5", "--json"]).output.splitlines()
    assert len(raw) == 5 and all(json.loads(x)["process"] == "io" for x in raw)

    llmos = Path(sys.executable).parent / "llmos"
    follower = subprocess.Popen([str(llmos), "--home", str(daemon.home), "logs", "io", "-f", "-n", "0"],
                                stdout=subprocess.PIPE, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(follower.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        def followed():   # asked again until it shows: the follower may open its file after the first ask
            with daemon.http() as c:
                c.get("/health", headers={"X-Request-Id": "follow-me"})
            return any("request_id=follow-me" in line for line in seen)
        poll(followed, "the followed line", timeout=90)
    finally:
        follower.terminate()
        follower.wait(10)
