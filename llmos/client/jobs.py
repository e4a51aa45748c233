"""Batch jobs in the Python client (a base of llmos.client's Client and AsyncClient).

    job = c.submit_batch("prompts.jsonl", model="smollm2")   # accepted = durably stored
    c.wait(job["id"], on_progress=lambda j: print(j["request_counts"]))
    for line in c.results(job["id"]): ...                     # OpenAI batch output lines (JSON text)
    for line in c.results(job["id"], errors=True): ...        # the error file

    c.delete_job(job["id"], input_file=True)                 # an ended job, its results and its input
    c.purge_jobs(7 * 86400)                                   # every job that ended a week ago or more

A job is OpenAI's Batch object plus an "llmos" map (counts by state, throughput, eta_s,
output_file_id / error_file_id, readable while the job runs). An `idempotency_key` makes a
retry safe: the daemon answers the first file or job sent with it (and refuses another
body with a 409). Each method returns a description (llmos.client.calls) that the host's
`_run` / `_open` executes.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class _Call(Call):
    """A Call with request headers (the Idempotency-Key)."""
    headers: dict | None = None

    def request(self) -> dict:
        return {**super().request(), **({"headers": self.headers} if self.headers else {})}


def _key(idempotency_key: str | None) -> dict | None:
    return {"Idempotency-Key": idempotency_key} if idempotency_key else None


class JobsApi:
    """The jobs methods; the host provides `_run(description)` and `_open(description)`."""

    def upload_file(self, source: Source, model: str | None = None, idempotency_key: str | None = None,
                    expires_after_s: int | None = None) -> dict:
        """Upload a batch file (purpose "batch"); raises InvalidBatchFile naming bad lines.
        `expires_after_s`: the daemon deletes the file that long after its upload."""
        return self._run(_upload(source, model, idempotency_key, expires_after_s))

    def submit_batch(self, source: Source, model: str | None = None, metadata: dict | None = None,
                     idempotency_key: str | None = None) -> dict:
        """Upload and start a job; it is durably stored when this returns. With an
        idempotency key, a retry after a timeout answers the job the first call created."""
        return self._run(_submit(source, model, metadata, idempotency_key))

    def list_files(self, limit: int = 10_000, purpose: str | None = None) -> list[dict]:
        """Uploaded files, newest first."""
        params = {"limit": limit, **({"purpose": purpose} if purpose else {})}
        return self._run(Call("GET", "/v1/files", params=params, read=data))

    def delete_file(self, file_id: str) -> dict:
        """Delete an uploaded file (refused while an unfinished job reads it)."""
        return self._run(Call("DELETE", f"/v1/files/{file_id}"))

    def delete_job(self, job_id: str, input_file: bool = False) -> dict:
        """Delete an ended job and its results (a running one is refused: cancel it first);
        `input_file`: its input file too, unless another job reads it."""
        return self._run(Call("DELETE", f"/llmos/v1/jobs/{job_id}", params={"input_file": str(input_file).lower()}))

    def purge_jobs(self, older_than_s: float, input_files: bool = True) -> dict:
        """Delete every job that ended at least `older_than_s` seconds ago (and, unless told
        otherwise, their input files that no remaining job reads): {"deleted", "input_files_deleted"}."""
        return self._run(_purge(older_than_s, input_files))

    def storage_status(self) -> dict:
        """The job store's keys, a rotation's progress and the erasure still to do."""
        return self._run(Call("GET", "/llmos/v1/storage"))

    def rotate_storage(self) -> dict:
        """Start re-sealing the job store with a new key (the daemon goes on serving)."""
        return self._run(Call("POST", "/llmos/v1/storage/rotate"))

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


def _upload(source: Source, model: str | None, idempotency_key: str | None = None,
            expires_after_s: int | None = None):
    name, content = batch_file(source, model)
    fields = {"purpose": "batch"}
    if expires_after_s is not None:
        fields |= {"expires_after[anchor]": "created_at", "expires_after[seconds]": str(expires_after_s)}
    return (yield _Call("POST", "/v1/files", data=fields, files={"file": (name, content, "application/jsonl")},
                        headers=_key(idempotency_key)))


def _submit(source: Source, model: str | None, metadata: dict | None, idempotency_key: str | None = None):
    file = yield from _upload(source, model, idempotency_key)
    return (yield _Call("POST", "/v1/batches", {"input_file_id": file["id"],
                                                "endpoint": (file.get("llmos") or {}).get("endpoint"),
                                                "completion_window": "24h", "metadata": metadata},
                        headers=_key(idempotency_key)))


def _purge(older_than_s: float, input_files: bool):
    total = {"deleted": 0, "input_files_deleted": 0}
    while True:
        page = yield Call("POST", "/llmos/v1/jobs/purge", {"older_than_s": older_than_s, "input_files": input_files})
        total = {k: total[k] + int(page.get(k) or 0) for k in total}
        if not page.get("has_more"):
            return total


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
