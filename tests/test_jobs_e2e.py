"""Batch jobs end to end on the real daemon (tiny model): kill -9 in the middle of a job,
the `openai` package's batch flow, the CLI, the SDK (streaming included) and malformed files."""
from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time

import openai
import psutil
import pytest
from click.testing import CliRunner

from daemon_harness import Daemon
from llmos.cli import main as cli_main
from llmos.client import AsyncClient, Client, InvalidBatchFile, NotFound, openai_client


def chat_line(i: int, max_tokens: int = 8, model: str | None = "tiny", **extra) -> dict:
    body = {"messages": [{"role": "user", "content": f"Question number {i}?"}], "max_tokens": max_tokens,
            "temperature": 0, **extra}
    if model:
        body["model"] = model
    return {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(lines) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def by_custom_id(lines) -> dict:
    out = {}
    for line in lines:
        obj = json.loads(line)
        assert obj["custom_id"] not in out, f"{obj['custom_id']} appears twice"
        out[obj["custom_id"]] = obj
    return out


def gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def daemon(tiny_daemon):
    return tiny_daemon


def llmos(daemon, *args):
    return CliRunner().invoke(cli_main.cli, ["--home", str(daemon.home), *args])


# ---------------------------------------------------------------- nothing lost, nothing twice


def test_kill_9_midway_then_the_job_resumes_and_every_custom_id_appears_once(tmp_path, tiny_llama_dir):
    home = tmp_path / "home"
    args = ([f"tiny={tiny_llama_dir}"], "--max-model-len", "256")
    first = Daemon(home, *args).wait_ready()
    try:  # varied lengths so that results trickle in rather than in waves
        lines = [chat_line(i, max_tokens=12 + i % 24, ignore_eos=True) for i in range(200)]
        with Client(home) as c:
            job_id = c.submit_batch(lines)["id"]
            while (done := c.job(job_id)["request_counts"]["completed"]) < 30:
                time.sleep(0.05)
            before = by_custom_id(c.results(job_id))
            drivers = [p["pid"] for p in c.ps()["processes"] if p["role"] != "kernel"]
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
    finally:
        first.stop()
    assert 30 <= len(before) < 200, f"the job finished before the kill ({done} done)"
    assert all(gone(pid) for pid in drivers), "a driver outlived its kernel"

    second = Daemon(home, *args).wait_ready()
    try:
        with Client(home) as c:
            job = c.wait(job_id, timeout=120, poll=0.2)
            after = by_custom_id(c.results(job_id))
            assert list(c.results(job_id, errors=True)) == []
    finally:
        second.stop()
    assert job["status"] == "completed" and job["request_counts"] == {"total": 200, "completed": 200, "failed": 0}
    assert sorted(after) == sorted(f"q{i}" for i in range(200))
    assert all(after[cid] == before[cid] for cid in before), "a result written before the crash changed"
    assert all(after[f"q{i}"]["response"]["body"]["usage"]["completion_tokens"] == 12 + i % 24 for i in range(200))
    db = sqlite3.connect(home / "jobs.db")
    states = dict(db.execute("SELECT state, COUNT(*) FROM requests GROUP BY state").fetchall())
    resent = db.execute("SELECT COUNT(*) FROM requests WHERE attempts > 1").fetchone()[0]
    db.close()
    assert states == {"completed": 200} and resent > 0   # the requests in flight at the kill ran again


# ---------------------------------------------------------------- the openai package


def test_openai_batch_flow(daemon):
    oai = openai_client(daemon.home, max_retries=0)
    f = oai.files.create(file=("batch.jsonl", jsonl([chat_line(i) for i in range(12)])), purpose="batch")
    assert f.object == "file" and f.purpose == "batch" and f.bytes > 0
    assert oai.files.retrieve(f.id).filename == "batch.jsonl"
    batch = oai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                               metadata={"owner": "test"})
    assert batch.status == "in_progress" and batch.request_counts.total == 12 and batch.metadata == {"owner": "test"}
    deadline = time.monotonic() + 60
    while (batch := oai.batches.retrieve(batch.id)).status != "completed" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert batch.status == "completed" and batch.completed_at and batch.error_file_id is None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (12, 0)
    assert batch.usage.output_tokens == 12 * 8
    out = by_custom_id(oai.files.content(batch.output_file_id).text.splitlines())
    assert sorted(out) == sorted(f"q{i}" for i in range(12))
    body = out["q3"]["response"]["body"]
    assert out["q3"]["response"]["status_code"] == 200 and body["object"] == "chat.completion"
    assert body["model"] == "tiny" and body["choices"][0]["message"]["role"] == "assistant"
    # the same request interactively gives the same (greedy) text
    direct = oai.chat.completions.create(**chat_line(3)["body"])
    assert direct.choices[0].message.content == body["choices"][0]["message"]["content"]
    assert batch.id in [b.id for b in oai.batches.list(limit=5).data]
    with pytest.raises(openai.NotFoundError):
        oai.batches.retrieve("batch_nope")
    with pytest.raises(openai.BadRequestError, match="does not match"):
        oai.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")


def test_openai_batch_cancel(daemon):
    oai = openai_client(daemon.home, max_retries=0)
    lines = [chat_line(i, max_tokens=200, ignore_eos=True) for i in range(100)]
    f = oai.files.create(file=("long.jsonl", jsonl(lines)), purpose="batch")
    batch = oai.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    time.sleep(0.5)
    cancelled = oai.batches.cancel(batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at
    assert oai.batches.retrieve(batch.id).status == "cancelled"
    done = oai.files.content(cancelled.output_file_id).text.splitlines() if cancelled.output_file_id else []
    errors = by_custom_id(oai.files.content(cancelled.error_file_id).text.splitlines())
    assert sorted([*by_custom_id(done), *errors]) == sorted(f"q{i}" for i in range(100))   # each exactly once
    assert {e["error"]["code"] for e in errors.values()} == {"batch_cancelled"}
    deadline = time.monotonic() + 60   # (a cleanup takes milliseconds; a loaded CI machine, seconds)
    while (daemon.ps()["requests"] or daemon.memory("tiny")["blocks_used"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert daemon.ps()["requests"] == [] and daemon.memory("tiny")["blocks_used"] == 0


# ---------------------------------------------------------------- the CLI and the SDK


def test_cli_submit_jobs_wait_results(daemon, tmp_path):
    src = tmp_path / "in.jsonl"
    lines = [chat_line(i, model=None) for i in range(6)] + [chat_line(6, max_tokens=100_000, model=None)]
    src.write_bytes(jsonl(lines))
    r = llmos(daemon, "submit", str(src), "--model", "tiny")
    assert r.exit_code == 0, r.output
    job_id = r.output.strip()
    assert job_id.startswith("batch_")
    r = llmos(daemon, "jobs", "wait", job_id)
    assert r.exit_code == 0 and f"{job_id} completed: 6 completed, 1 failed of 7" in r.output
    r = llmos(daemon, "jobs")
    assert r.exit_code == 0 and job_id in r.output and "7/7" in r.output
    r = llmos(daemon, "jobs", "show", job_id)
    assert r.exit_code == 0 and "7 total: 0 pending, 0 running, 6 completed, 1 failed" in r.output
    assert "tokens:" in r.output and "throughput:" in r.output and "eta:" in r.output
    out = tmp_path / "out.jsonl"
    r = llmos(daemon, "jobs", "results", job_id, "-o", str(out))
    assert r.exit_code == 0 and "6 results" in r.output and "1 errors" in r.output, r.output
    assert sorted(by_custom_id(out.read_text().splitlines())) == [f"q{i}" for i in range(6)]
    err = by_custom_id((tmp_path / "out.errors.jsonl").read_text().splitlines())["q6"]["response"]
    assert err["status_code"] == 400 and err["body"]["error"]["code"] == "context_length_exceeded"
    r = llmos(daemon, "jobs", "cancel", job_id)
    assert r.exit_code == 0 and "completed" in r.output   # cancelling a finished job changes nothing
    r = llmos(daemon, "jobs", "show", "batch_nope")
    assert r.exit_code == 1 and "404" in r.output


def test_malformed_job_files_are_refused_naming_their_lines(daemon, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps(chat_line(1))
    bad.write_text("\n".join([good, "{oops", json.dumps(chat_line(1)), "", json.dumps(chat_line(4, temperature=7)),
                              json.dumps({**chat_line(5), "url": "/v1/embeddings"}),
                              json.dumps(chat_line(6, model="missing"))]) + "\n")
    r = llmos(daemon, "submit", str(bad))
    assert r.exit_code == 1 and "invalid_batch_file" in r.output and "Traceback" not in r.output
    for where in ("line 2: not valid JSON", "line 3: duplicate custom_id 'q1' (first on line 1)",
                  "line 5: body.temperature", "line 6: url must be one of", "line 7: body.model"):
        assert where in r.output, r.output
    with Client(daemon.home) as c:
        with pytest.raises(InvalidBatchFile) as exc:
            c.submit_batch(bad)
        assert exc.value.lines == [2, 3, 5, 6, 7] and exc.value.param == "file"
        with pytest.raises(InvalidBatchFile, match="line 1: missing body"):
            c.upload_file([{"custom_id": "x", "method": "POST", "url": "/v1/completions"}])
        with pytest.raises(NotFound):
            c.job("batch_nope")
        assert all(j["status"] != "in_progress" or j["request_counts"]["total"] != 7 for j in c.jobs())
    oai = openai_client(daemon.home, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="line 2"):
        oai.files.create(file=("bad.jsonl", bad.read_bytes()), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        oai.files.create(file=("x.jsonl", good.encode()), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="no requests"):
        oai.files.create(file=("empty.jsonl", b"\n\n"), purpose="batch")


def test_sdk_streaming_and_async_jobs(daemon):
    with Client(daemon.home) as c:
        whole = c.chat("tiny", [{"role": "user", "content": "Stream me"}], max_tokens=10, temperature=0)
        parts = list(c.stream_chat("tiny", [{"role": "user", "content": "Stream me"}], max_tokens=10, temperature=0))
        assert len(parts) > 1 and "".join(parts) == whole["choices"][0]["message"]["content"]
        snap = c.status()
        assert snap["health"]["status"] == "ok" and "tiny" in snap["memory"] and isinstance(snap["jobs"], list)

    async def go():
        async with AsyncClient(daemon.home) as c:
            text = "".join([d async for d in c.stream_completion("tiny", "Once upon", max_tokens=6, temperature=0)])
            assert text == (await c.completion("tiny", "Once upon", max_tokens=6, temperature=0))["choices"][0]["text"]
            job = await c.submit_batch([chat_line(i) for i in range(5)])
            job = await c.wait(job["id"], timeout=60, poll=0.1)
            assert job["status"] == "completed"
            return [line async for line in c.results(job["id"])]
    assert sorted(by_custom_id(asyncio.run(go()))) == [f"q{i}" for i in range(5)]
