"""Every method of the client, written once: each returns a description (llmos.client.calls)
and hands it to `_run` (a result) or `_open` (an iterator), which Client executes with
httpx.Client and AsyncClient with httpx.AsyncClient (there every method is awaited, and a
stream is an async iterator).
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import httpx

from llmos.client.calls import Call, Description, Stream, data, deltas
from llmos.client.errors import DaemonNotRunning, LlmosError, ServerError
from llmos.client.jobs import JobsApi
from llmos.paths import Paths

DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)  # a generation may wait behind a long queue
_UNSET = object()   # a default left as it is (None means "the daemon's own")


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

    def alerts(self) -> dict:
        """Active alerts (firing, pending), recent (resolved) ones, the rules (docs/alerts.md)."""
        return self._run(Call("GET", "/llmos/v1/alerts"))

    def restart_driver(self, name: str) -> dict:
        """Restart one driver by name (a failed one gets a fresh restart budget)."""
        return self._run(Call("POST", f"/llmos/v1/drivers/{name}/restart"))

    def load_model(self, name: str) -> dict:
        """Start loading a model now (it answers at once; its state says when it is loaded)."""
        return self._run(Call("POST", f"/llmos/v1/models/{name}/load"))

    def unload_model(self, name: str) -> dict:
        """Unload an idle model now: its drivers stop and its memory is released."""
        return self._run(Call("POST", f"/llmos/v1/models/{name}/unload"))

    def scale_model(self, name: str, replicas: int) -> dict:
        """Run `replicas` model drivers for a loaded model; requests are balanced between them."""
        return self._run(Call("POST", f"/llmos/v1/models/{name}/scale", {"replicas": replicas}))

    def upgrade_model(self, name: str, version: int, in_place: bool = False) -> dict:
        """Start upgrading a loaded model to a registered version (canary, switch, watch; it
        rolls back by itself if the version fails). `in_place`: when both versions do not fit,
        new requests wait while the old drains. `upgrade_status` follows it."""
        return self._run(Call("POST", f"/llmos/v1/models/{name}/upgrade", {"version": version, "in_place": in_place}))

    def rollback_model(self, name: str) -> dict:
        """Abandon an upgrade in progress, or go back to the version before the last one."""
        return self._run(Call("POST", f"/llmos/v1/models/{name}/rollback"))

    def upgrade_status(self, name: str) -> dict:
        return self._run(Call("GET", f"/llmos/v1/models/{name}/upgrade"))

    # The model registry (the daemon's own; `llmos models` edits the same one directly).
    def list_registered(self) -> list[dict]:
        """Every registered model: its active version, facts, defaults and state in the daemon."""
        return self._run(Call("GET", "/llmos/v1/models", read=data))

    def show_model(self, name: str) -> dict:
        """One registered model, with every version and its history."""
        return self._run(Call("GET", _model_path(name)))

    def add_model(self, name: str, path: str | Path, note: str | None = None) -> dict:
        """Register an HF directory as NAME (the daemon shares this machine, so a relative path
        is resolved here). A GGUF is refused: `llmos models add` converts it."""
        body = {"name": name, "path": str(Path(path).expanduser().absolute()), "note": note}
        return self._run(Call("POST", "/llmos/v1/models", body))

    def remove_model(self, name: str, force: bool = False) -> dict:
        """Forget NAME; refused (409) while the daemon has it loaded, unless `force`."""
        return self._run(Call("DELETE", _model_path(name), params={"force": "true" if force else "false"}))

    def copy_model(self, src: str, dst: str) -> dict:
        """Register DST as a new name for SRC's active version (nothing is copied on disk)."""
        return self._run(Call("POST", _model_path(src) + "/copy", {"to": dst}))

    def set_model_defaults(self, name: str, keep_alive_s: float | None = _UNSET, replicas: int = _UNSET) -> dict:
        """Change what the daemon uses when it next loads NAME; keep_alive_s=None: its --keep-alive."""
        body = {k: v for k, v in (("keep_alive_s", keep_alive_s), ("replicas", replicas)) if v is not _UNSET}
        return self._run(Call("PATCH", _model_path(name), body))

    def key_changed(self, action: str, key_id: str, tenant: str) -> dict:
        """Tell the daemon an API key was created or revoked (`llmos keys` edits keys.db), for its audit log."""
        return self._run(Call("POST", "/llmos/v1/keys/changed", {"action": action, "id": key_id, "tenant": tenant}))

    def cancel_request(self, request_id: str) -> dict:
        """Stop a request in flight (its response id or the X-Request-Id it was sent with);
        it answers with what it generated so far, finish_reason "cancelled"."""
        return self._run(Call("POST", f"/llmos/v1/requests/{request_id}/cancel"))

    def completion(self, model: str, prompt: str | list[int], **params) -> dict:
        return self._run(Call("POST", "/v1/completions", {"model": model, "prompt": prompt, **_fields(params)}))

    def chat(self, model: str, messages: list[dict], **params) -> dict:
        """`response_format` may also be a pydantic model class: the answer is then JSON that
        validates against its schema (`Model.model_validate_json(answer text)`)."""
        return self._run(Call("POST", "/v1/chat/completions", {"model": model, "messages": messages,
                                                                **_fields(params)}))

    def stream_completion(self, model: str, prompt: str | list[int], **params):
        """Text deltas of the answer as they are generated."""
        body = {"model": model, "prompt": prompt, **_fields(params), "stream": True}
        return self._open(Stream(Call("POST", "/v1/completions", body), deltas(chat=False)))

    def stream_chat(self, model: str, messages: list[dict], **params):
        """Text deltas of the answer as they are generated."""
        body = {"model": model, "messages": messages, **_fields(params), "stream": True}
        return self._open(Stream(Call("POST", "/v1/chat/completions", body), deltas(chat=True)))

    def status(self) -> dict:
        """One snapshot for dashboards: health, ps, memory and jobs."""
        return self._run(_status())


def _model_path(name: str) -> str:
    return f"/llmos/v1/models/{quote(name, safe='')}"


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


def response_format_of(value):
    """OpenAI's response_format for `value`: as it is, or, for a pydantic model class, the
    strict json_schema of it, as the openai SDK's `parse` sends it: no object takes keys its
    model does not name (else the answer may wander off into made-up fields)."""
    schema = getattr(value, "model_json_schema", None)
    if isinstance(value, type) and callable(schema):
        return {"type": "json_schema", "json_schema": {"name": value.__name__, "schema": _closed(schema()),
                                                       "strict": True}}
    return value


def _closed(node):
    if isinstance(node, dict):
        node = {k: _closed(v) for k, v in node.items()}
        if "properties" in node:
            node.setdefault("additionalProperties", False)
    elif isinstance(node, list):
        node = [_closed(v) for v in node]
    return node


def _fields(params: dict) -> dict:
    if "response_format" in params:
        params = {**params, "response_format": response_format_of(params["response_format"])}
    return params
