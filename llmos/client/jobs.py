"""Batch jobs in the Python client (a base of llmos.client's Client and AsyncClient).

    job = c.submit_batch("prompts.jsonl", model="smollm2")   # accepted = durably stored
    c.wait(job["id"], on_progress=lambda j: print(j["request_counts"]))
    for line in c.results(job["id"]): ...                     # OpenAI batch output lines (JSON text)
    for line in c.results(job["id"], errors=True): ...        # the error file

A job is OpenAI's Batch object plus an "llmos" map (counts by state, throughput, eta_s,
output_file_id / error_file_id, readable while the job runs). Each method returns a
description (llmos.client.calls) that the host's `_run` / `_open` executes.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable

from llmos.client.calls import Call, Sleep, Stream, data, line

FINAL = ("completed", "failed", "cancelled", "expired")
Source = str | os.PathLike | bytes | Iterable


def batch_file(source: Source, model: str | None = None) -> tuple[str, bytes]:
    """(filename, content) of a batch file from a path, raw bytes, or an iterable of lines
    (dicts or JSON strings). `model` fills body.model in lines that name none; every line
    keeps its number, so the daemon's errors point at the caller's lines."""
    if isinstance(source, (str, os.PathLike)):
        name, lines = Path(source).name, Path(source).read_bytes().decode("utf-8", "replace").split("\n")
    elif isinstance(source, (bytes, bytearray)):
        name, lines = "batch.jsonl", bytes(source).decode("utf-8", "replace").split("\n")
    else:
        name, lines = "batch.jsonl", [x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in source]
    if model:
        lines = [_with_model(x, model) for x in lines]
    return name, "\n".join(lines).encode()


def _with_model(line: str, model: str) -> str:
    try:
        obj = json.loads(line)
    except ValueError:
        return line  # left for the daemon to report with its line number
    if isinstance(obj, dict) and isinstance(obj.get("body"), dict) and "model" not in obj["body"]:
        obj["body"]["model"] = model
        return json.dumps(obj, ensure_ascii=False)
    return line


class JobsApi:
    """The jobs methods; the host provides `_run(description)` and `_open(description)`."""

    def upload_file(self, source: Source, model: str | None = None) -> dict:
        """Upload a batch file (purpose "batch"); raises InvalidBatchFile naming bad lines."""
        return self._run(_upload(source, model))

    def submit_batch(self, source: Source, model: str | None = None, metadata: dict | None = None) -> dict:
        """Upload and start a job; it is durably stored when this returns."""
        return self._run(_submit(source, model, metadata))

    def jobs(self, limit: int = 100) -> list[dict]:
        return self._run(Call("GET", "/llmos/v1/jobs", params={"limit": limit}, read=data))

    def job(self, job_id: str) -> dict:
        return self._run(Call("GET", f"/llmos/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> dict:
        return self._run(Call("POST", f"/llmos/v1/jobs/{job_id}/cancel"))

    def job_errors(self) -> list[dict]:
        """The latest failed job requests (newest last)."""
        return self._run(Call("GET", "/llmos/v1/jobs/errors"))

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.5,
             on_progress: Callable[[dict], None] | None = None) -> dict:
        """Poll until the job is final; returns it. Raises TimeoutError after `timeout` s."""
        return self._run(_wait(job_id, timeout, poll, on_progress))

    def results(self, job_id: str, errors: bool = False):
        """Lines of the job's output file (or error file), in input order; while the job
        runs, the results so far."""
        return self._open(_results(job_id, errors))


def _upload(source: Source, model: str | None):
    name, content = batch_file(source, model)
    return (yield Call("POST", "/v1/files", data={"purpose": "batch"},
                       files={"file": (name, content, "application/jsonl")}))


def _submit(source: Source, model: str | None, metadata: dict | None):
    file = yield from _upload(source, model)
    return (yield Call("POST", "/v1/batches", {"input_file_id": file["id"],
                                               "endpoint": (file.get("llmos") or {}).get("endpoint"),
                                               "completion_window": "24h", "metadata": metadata}))


def _wait(job_id: str, timeout: float | None, poll: float, on_progress: Callable[[dict], None] | None):
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        job = yield Call("GET", f"/llmos/v1/jobs/{job_id}")
        if on_progress:
            on_progress(job)
        if job["status"] in FINAL:
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout:g} s")
        yield Sleep(poll)


def _results(job_id: str, errors: bool):
    job = yield Call("GET", f"/llmos/v1/jobs/{job_id}")
    fid = job["llmos"]["error_file_id" if errors else "output_file_id"]
    return Stream(Call("GET", f"/v1/files/{fid}/content"), line)
