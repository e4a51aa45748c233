"""Every method of the client, written once: each returns a description (llmos.client.calls)
and hands it to `_run` (a result) or `_open` (an iterator), which Client executes with
httpx.Client and AsyncClient with httpx.AsyncClient (there every method is awaited, and a
stream is an async iterator).
"""
from __future__ import annotations

from pathlib import Path

import httpx

from llmos.client.calls import Call, Description, Stream, data, deltas
from llmos.client.errors import DaemonNotRunning, LlmosError, ServerError
from llmos.client.jobs import JobsApi
from llmos.paths import Paths

DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)  # a generation may wait behind a long queue


def socket_of(home: str | Path | None) -> Path:
    return Paths.from_env(home).api_socket


class Api(JobsApi):
    """The llmos API. `params` are the OpenAI / llmos request fields (max_tokens,
    temperature, seed, stop, ...)."""

    socket: Path

    def _run(self, description: Description):
        raise NotImplementedError

    def _open(self, description: Description):
        raise NotImplementedError

    def health(self) -> dict:
        return self._run(Call("GET", "/health"))

    def models(self) -> list[dict]:
        return self._run(Call("GET", "/v1/models", read=data))

    def ps(self) -> dict:
        return self._run(Call("GET", "/llmos/v1/ps"))

    def memory(self) -> dict:
        return self._run(Call("GET", "/llmos/v1/memory"))

    def restart_driver(self, name: str) -> dict:
        """Restart one driver by name (a failed one gets a fresh restart budget)."""
        return self._run(Call("POST", f"/llmos/v1/drivers/{name}/restart"))

    def cancel_request(self, request_id: str) -> dict:
        """Stop a request in flight (its response id or the X-Request-Id it was sent with);
        it answers with what it generated so far, finish_reason "cancelled"."""
        return self._run(Call("POST", f"/llmos/v1/requests/{request_id}/cancel"))

    def completion(self, model: str, prompt: str | list[int], **params) -> dict:
        return self._run(Call("POST", "/v1/completions", {"model": model, "prompt": prompt, **params}))

    def chat(self, model: str, messages: list[dict], **params) -> dict:
        return self._run(Call("POST", "/v1/chat/completions", {"model": model, "messages": messages, **params}))

    def stream_completion(self, model: str, prompt: str | list[int], **params):
        """Text deltas of the answer as they are generated."""
        body = {"model": model, "prompt": prompt, **params, "stream": True}
        return self._open(Stream(Call("POST", "/v1/completions", body), deltas(chat=False)))

    def stream_chat(self, model: str, messages: list[dict], **params):
        """Text deltas of the answer as they are generated."""
        body = {"model": model, "messages": messages, **params, "stream": True}
        return self._open(Stream(Call("POST", "/v1/chat/completions", body), deltas(chat=True)))

    def status(self) -> dict:
        """One snapshot for dashboards: health, ps, memory and jobs."""
        return self._run(_status())


def _status():
    try:
        health = yield Call("GET", "/health")
    except ServerError as exc:
        # /health answers 503 with its body when the daemon is not ready: that is status, not failure.
        if not (exc.status == 503 and isinstance(exc.body, dict) and "status" in exc.body):
            raise
        health = exc.body
    snap = {"health": health, "ps": (yield Call("GET", "/llmos/v1/ps")),
            "memory": (yield Call("GET", "/llmos/v1/memory"))}
    try:
        snap.update(jobs=(yield Call("GET", "/llmos/v1/jobs", params={"limit": 20}, read=data)),
                    job_errors=(yield Call("GET", "/llmos/v1/jobs/errors")))
    except DaemonNotRunning:
        raise
    except LlmosError:   # a daemon without the jobs API (or failing it) shows no jobs
        snap.update(jobs=[], job_errors=[])
    return snap
