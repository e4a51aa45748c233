"""Batch jobs and status in the Python client (mixed into llmos.client.Client / AsyncClient).

    job = c.submit_batch("prompts.jsonl", model="smollm2")   # accepted = durably stored
    c.wait(job["id"], on_progress=lambda j: print(j["request_counts"]))
    for line in c.results(job["id"]): ...                     # OpenAI batch output lines (JSON text)
    for line in c.results(job["id"], errors=True): ...        # the error file

A job is OpenAI's Batch object plus an "llmos" map (counts by state, throughput, eta_s,
output_file_id / error_file_id, readable while the job runs). The mixins only need the
host's `_request(method, path, body=None, **httpx_kwargs)` and `_lines(path)`.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import AsyncIterator, Callable, Iterable, Iterator

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


def _health_of(exc: Exception) -> dict:
    """/health answers 503 with its body when the daemon is not ready: that is status, not failure."""
    from llmos.client import ServerError
    if isinstance(exc, ServerError) and exc.status == 503 and isinstance(exc.body, dict) and "status" in exc.body:
        return exc.body
    raise exc


def _optional(exc: Exception) -> list:
    """A daemon without the jobs API (or answering it with an error) shows no jobs; a daemon
    that is gone is still an error."""
    from llmos.client import DaemonNotRunning, LlmosError
    if isinstance(exc, LlmosError) and not isinstance(exc, DaemonNotRunning):
        return []
    raise exc


def _batch_args(file: dict, metadata: dict | None) -> dict:
    return {"input_file_id": file["id"], "endpoint": (file.get("llmos") or {}).get("endpoint"),
            "completion_window": "24h", "metadata": metadata}


class JobsMixin:
    def upload_file(self, source: Source, model: str | None = None) -> dict:
        """Upload a batch file (purpose "batch"); raises InvalidBatchFile naming bad lines."""
        name, data = batch_file(source, model)
        return self._request("POST", "/v1/files", data={"purpose": "batch"},
                             files={"file": (name, data, "application/jsonl")})

    def submit_batch(self, source: Source, model: str | None = None, metadata: dict | None = None) -> dict:
        """Upload and start a job; it is durably stored when this returns."""
        return self._request("POST", "/v1/batches", _batch_args(self.upload_file(source, model), metadata))

    def jobs(self, limit: int = 100) -> list[dict]:
        return self._request("GET", "/llmos/v1/jobs", params={"limit": limit})["data"]

    def job(self, job_id: str) -> dict:
        return self._request("GET", f"/llmos/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self._request("POST", f"/llmos/v1/jobs/{job_id}/cancel")

    def job_errors(self) -> list[dict]:
        """The latest failed job requests (newest last)."""
        return self._request("GET", "/llmos/v1/jobs/errors")

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.5,
             on_progress: Callable[[dict], None] | None = None) -> dict:
        """Poll until the job is final; returns it. Raises TimeoutError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress:
                on_progress(job)
            if job["status"] in FINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout:g} s")
            time.sleep(poll)

    def results(self, job_id: str, errors: bool = False) -> Iterator[str]:
        """Lines of the job's output file (or error file), in input order; while the job
        runs, the results so far."""
        fid = self.job(job_id)["llmos"]["error_file_id" if errors else "output_file_id"]
        return self._lines(f"/v1/files/{fid}/content")

    def status(self) -> dict:
        """One snapshot for dashboards: health, ps, memory and jobs."""
        try:
            health = self.health()
        except Exception as exc:
            health = _health_of(exc)
        snap = {"health": health, "ps": self.ps(), "memory": self.memory()}
        try:
            snap.update(jobs=self.jobs(limit=20), job_errors=self.job_errors())
        except Exception as exc:
            snap.update(jobs=_optional(exc), job_errors=[])
        return snap


class AsyncJobsMixin:
    async def upload_file(self, source: Source, model: str | None = None) -> dict:
        name, data = batch_file(source, model)
        return await self._request("POST", "/v1/files", data={"purpose": "batch"},
                                   files={"file": (name, data, "application/jsonl")})

    async def submit_batch(self, source: Source, model: str | None = None, metadata: dict | None = None) -> dict:
        file = await self.upload_file(source, model)
        return await self._request("POST", "/v1/batches", _batch_args(file, metadata))

    async def jobs(self, limit: int = 100) -> list[dict]:
        return (await self._request("GET", "/llmos/v1/jobs", params={"limit": limit}))["data"]

    async def job(self, job_id: str) -> dict:
        return await self._request("GET", f"/llmos/v1/jobs/{job_id}")

    async def cancel(self, job_id: str) -> dict:
        return await self._request("POST", f"/llmos/v1/jobs/{job_id}/cancel")

    async def job_errors(self) -> list[dict]:
        return await self._request("GET", "/llmos/v1/jobs/errors")

    async def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.5,
                   on_progress: Callable[[dict], None] | None = None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.job(job_id)
            if on_progress:
                on_progress(job)
            if job["status"] in FINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout:g} s")
            await asyncio.sleep(poll)

    async def results(self, job_id: str, errors: bool = False) -> AsyncIterator[str]:
        fid = (await self.job(job_id))["llmos"]["error_file_id" if errors else "output_file_id"]
        async for line in self._lines(f"/v1/files/{fid}/content"):
            yield line

    async def status(self) -> dict:
        try:
            health = await self.health()
        except Exception as exc:
            health = _health_of(exc)
        snap = {"health": health, "ps": await self.ps(), "memory": await self.memory()}
        try:
            snap.update(jobs=await self.jobs(limit=20), job_errors=await self.job_errors())
        except Exception as exc:
            snap.update(jobs=_optional(exc), job_errors=[])
        return snap
