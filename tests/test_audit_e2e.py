"""The kernel's audit records through a real daemon: one per request (no prompt text), auth
failures, admin commands; the chain verifies; the CLI reads it."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from daemon_harness import Daemon
from llmos.audit import audit_dir, read_records, verify
from llmos.cli.main import cli
from llmos.kernel.auth import KeyStore

MARKER = "zebra-quartz-7741"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_llama_dir):
    home = tmp_path_factory.mktemp("audited")
    d = Daemon(home, [f"tl={tiny_llama_dir}"]).wait_ready()
    d.key = KeyStore(home / "keys.db").create("alice", ["tl"], "interactive")[0]
    yield d
    d.stop()


def test_requests_failures_and_commands_are_recorded_and_the_chain_verifies(daemon):
    with daemon.http() as c:
        ok = c.post("/v1/completions", json={"model": "tl", "prompt": f"say {MARKER}", "max_tokens": 3})
        two = c.post("/v1/completions", json={"model": "tl", "prompt": MARKER, "max_tokens": 4, "n": 2,
                                              "temperature": 1.0, "seed": 3})
        missing = c.post("/v1/completions", json={"model": "nope", "prompt": MARKER})
        bad_key = c.get("/v1/models", headers={"Authorization": "Bearer llmos-" + "0" * 43})
        restart = c.post("/llmos/v1/drivers/tokenizer-tl/restart")
        ps = c.get("/llmos/v1/ps")   # a query: not an admin action, not recorded
    assert (ok.status_code, two.status_code, missing.status_code, bad_key.status_code) == (200, 200, 404, 401)
    assert restart.status_code == 200 and ps.status_code == 200
    made = CliRunner().invoke(cli, ["--home", str(daemon.home), "keys", "create", "--tenant", "carol"])
    assert made.exit_code == 0, made.output
    daemon.stop()   # flushes the log
    records = list(read_records(audit_dir(daemon.home)))
    kinds = [r["kind"] for r in records]
    requests = [r for r in records if r["kind"] == "request"]
    by_status = sorted((r["status"], r.get("completion_tokens")) for r in requests)
    assert by_status == [(200, 3), (200, 8), (404, 0)], requests   # n = 2: one record, both choices' tokens
    assert all(r["principal"] == next(x for x in requests if x["status"] == 200)["principal"] for r in requests)
    assert kinds.count("auth.failure") == 1 and "admin" in kinds
    (loaded,) = [r for r in records if r["kind"] == "model.load"]   # the kernel's own doing, recorded too
    assert (loaded["model"], loaded["principal"], loaded["status"]) == ("tl", "kernel", "ok")
    (change,) = [r for r in records if r["kind"] == "key.change"]   # through the daemon, which holds the log
    assert (change["action"], change["tenant"], change["status"]) == ("create", "carol", "ok")
    assert made.stdout.splitlines()[0] not in json.dumps(records)   # never the secret
    (admin,) = [r for r in records if r["kind"] == "admin"]
    assert admin["action"] == "restart" and admin["name"] == "tokenizer-tl" and admin["status"] == "ok"
    for f in audit_dir(daemon.home).iterdir():
        if f.is_file():
            assert MARKER.encode() not in f.read_bytes(), f   # prompts stay out unless asked for
    result = verify(audit_dir(daemon.home))
    assert result.ok and result.records == len(records), result
    out = CliRunner().invoke(cli, ["--home", str(daemon.home), "audit", "verify"])
    assert out.exit_code == 0, out.output


def test_recorded_prompts_are_sealed_at_rest_and_open_with_the_storage_key(tmp_path, tiny_llama_dir):
    d = Daemon(tmp_path, [f"tl={tiny_llama_dir}"], "--audit-record-prompts").wait_ready()
    try:
        with d.http() as c:
            ok = c.post("/v1/completions", json={"model": "tl", "prompt": f"keep {MARKER}", "max_tokens": 2})
            assert ok.status_code == 200, ok.text
    finally:
        d.stop()
    (rec,) = [r for r in read_records(audit_dir(tmp_path)) if r["kind"] == "request"]
    assert "prompt" not in rec and rec["prompt_sealed"]
    for f in tmp_path.rglob("*"):   # the log, the job store, its WAL, the logs: nowhere in the clear
        if f.is_file() and not f.is_symlink():
            assert MARKER.encode() not in f.read_bytes(), f
    shown = CliRunner().invoke(cli, ["--home", str(tmp_path), "audit", "show", "--since", "1h", "--prompts"])
    assert shown.exit_code == 0 and f"keep {MARKER}" in shown.output, shown.output
    assert verify(audit_dir(tmp_path)).ok
