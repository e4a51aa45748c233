"""Python client for a running llmos daemon, over its Unix socket ($LLMOS_HOME/run/llmos.sock).

    from llmos.client import Client
    c = Client()
    print(c.chat("smollm2", [{"role": "user", "content": "hi"}])["choices"][0]["message"]["content"])
    for delta in c.stream_chat("smollm2", [{"role": "user", "content": "hi"}]):
        print(delta, end="", flush=True)

    job = c.submit_batch("prompts.jsonl", model="smollm2")   # durable batch job (OpenAI batch format)
    c.wait(job["id"]); out = list(c.results(job["id"]))     # see llmos.client_jobs

Errors: `DaemonNotRunning` (no socket / nobody listening), `RequestRejected` (4xx; `NotFound`
for 404, `InvalidBatchFile` with the bad line numbers), `ServerError` (5xx, or an error event
in the middle of a stream); all are `LlmosError`.
`params` are the OpenAI / llmos request fields (max_tokens, temperature, seed, stop, ...).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import AsyncIterator, Iterator

import httpx

from llmos.client_jobs import AsyncJobsMixin, JobsMixin
from llmos.paths import Paths

DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)  # a generation may wait behind a long queue


class LlmosError(Exception):
    """An error answered by (or about) the daemon. status is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0, code: str | None = None, param: str | None = None,
                 body=None):
        super().__init__(message)
        self.message, self.status, self.code, self.param = message, status, code, param
        self.body = body   # the decoded answer, when there was one


class DaemonNotRunning(LlmosError):
    """Nothing listens on the API socket."""


class RequestRejected(LlmosError):
    """The request was refused (4xx): bad parameters, unknown model, over quota..."""


class ServerError(LlmosError):
    """The daemon failed the request (5xx), e.g. a driver crash or a kernel timeout."""


class NotFound(RequestRejected):
    """404: no such model, file or batch job."""


class InvalidBatchFile(RequestRejected):
    """A batch file was refused; `lines` are the numbers of (the first 50) bad lines and the
    message says what is wrong with each."""

    @property
    def lines(self) -> list[int]:
        err = self.body.get("error") if isinstance(self.body, dict) else None
        return list(err.get("lines") or []) if isinstance(err, dict) else []


def _socket(home) -> Path:
    return Paths.from_env(home).api_socket


def _error(status: int, body) -> LlmosError:
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"message": str(body) or f"HTTP {status}"}
    cls = ServerError if not 400 <= status < 500 else (
        InvalidBatchFile if err.get("code") == "invalid_batch_file" else NotFound if status == 404 else RequestRejected)
    return cls(str(err.get("message")), status, err.get("code"), err.get("param"), body)


def _json(resp: httpx.Response):
    try:
        return resp.json()
    except ValueError:
        return resp.text


def _check(resp: httpx.Response, body) -> None:
    if resp.status_code >= 400:
        raise _error(resp.status_code, body)


def _not_running(sock: Path, exc: Exception) -> DaemonNotRunning:
    return DaemonNotRunning(f"llmosd is not running (cannot connect to {sock}: {exc})")


_DONE = object()
_CONNECT_ERRORS = (httpx.ConnectError, FileNotFoundError, ConnectionRefusedError)


def _lost(exc: Exception) -> ServerError:
    return ServerError(f"the connection to llmosd was lost: {exc!r}")


def _sse_data(line: str):
    """The JSON of one SSE line; None for blank/comment lines; _DONE at [DONE].
    Raises ServerError for an error event (a failure after the stream started)."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    obj = json.loads(data)
    if isinstance(obj, dict) and "error" in obj:
        err = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
        raise ServerError(str(err.get("message")), 500, err.get("code"), err.get("param"))
    return obj


def _delta(chunk: dict, chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


class Client(JobsMixin):
    """Synchronous client. Each method is one HTTP request; not thread-safe across streams."""

    def __init__(self, home: str | Path | None = None, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT):
        self.socket = _socket(home)
        self._http = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                                  base_url="http://llmos", timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, body: dict | None = None, **kw):
        try:
            resp = self._http.request(method, path, json=body, **kw)
        except _CONNECT_ERRORS as exc:
            raise _not_running(self.socket, exc) from None
        except httpx.TransportError as exc:  # e.g. the io driver restarted mid-request
            raise _lost(exc) from None
        data = _json(resp)
        _check(resp, data)
        return data

    def health(self) -> dict:
        return self._request("GET", "/health")

    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models")["data"]

    def ps(self) -> dict:
        return self._request("GET", "/llmos/v1/ps")

    def memory(self) -> dict:
        return self._request("GET", "/llmos/v1/memory")

    def restart_driver(self, name: str) -> dict:
        return self._request("POST", f"/llmos/v1/drivers/{name}/restart")

    def cancel_request(self, request_id: str) -> dict:
        """Stop a request in flight (its response id or the X-Request-Id it was sent with);
        it answers with what it generated so far, finish_reason "cancelled"."""
        return self._request("POST", f"/llmos/v1/requests/{request_id}/cancel")

    def completion(self, model: str, prompt: str | list[int], **params) -> dict:
        return self._request("POST", "/v1/completions", {"model": model, "prompt": prompt, **params})

    def chat(self, model: str, messages: list[dict], **params) -> dict:
        return self._request("POST", "/v1/chat/completions", {"model": model, "messages": messages, **params})

    def stream_chat(self, model: str, messages: list[dict], **params) -> Iterator[str]:
        """Text deltas of the answer as they are generated."""
        return self._stream("/v1/chat/completions", {"model": model, "messages": messages, **params}, True)

    def stream_completion(self, model: str, prompt: str | list[int], **params) -> Iterator[str]:
        return self._stream("/v1/completions", {"model": model, "prompt": prompt, **params}, False)

    def _lines(self, path: str) -> Iterator[str]:
        """The lines of a GET answer as they arrive (file contents)."""
        try:
            with self._http.stream("GET", path) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _check(resp, _json(resp))
                yield from (line for line in resp.iter_lines() if line)
        except _CONNECT_ERRORS as exc:
            raise _not_running(self.socket, exc) from None
        except httpx.TransportError as exc:
            raise _lost(exc) from None

    def _stream(self, path: str, body: dict, chat: bool) -> Iterator[str]:
        body["stream"] = True
        try:
            with self._http.stream("POST", path, json=body) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    _check(resp, _json(resp))
                for line in resp.iter_lines():
                    chunk = _sse_data(line)
                    if chunk is _DONE:
                        return
                    if chunk and (text := _delta(chunk, chat)):
                        yield text
        except _CONNECT_ERRORS as exc:
            raise _not_running(self.socket, exc) from None
        except httpx.TransportError as exc:  # e.g. the io driver restarted mid-request
            raise _lost(exc) from None


class AsyncClient(AsyncJobsMixin):
    """The same API as Client, for asyncio code."""

    def __init__(self, home: str | Path | None = None, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT):
        self.socket = _socket(home)
        self._http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(self.socket)),
                                       base_url="http://llmos", timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, body: dict | None = None, **kw):
        try:
            resp = await self._http.request(method, path, json=body, **kw)
        except _CONNECT_ERRORS as exc:
            raise _not_running(self.socket, exc) from None
        except httpx.TransportError as exc:  # e.g. the io driver restarted mid-request
            raise _lost(exc) from None
        data = _json(resp)
        _check(resp, data)
        return data

    async def health(self) -> dict:
        return await self._request("GET", "/health")

    async def models(self) -> list[dict]:
        return (await self._request("GET", "/v1/models"))["data"]

    async def ps(self) -> dict:
        return await self._request("GET", "/llmos/v1/ps")

    async def memory(self) -> dict:
        return await self._request("GET", "/llmos/v1/memory")

    async def cancel_request(self, request_id: str) -> dict:
        return await self._request("POST", f"/llmos/v1/requests/{request_id}/cancel")

    async def completion(self, model: str, prompt: str | list[int], **params) -> dict:
        return await self._request("POST", "/v1/completions", {"model": model, "prompt": prompt, **params})

    async def chat(self, model: str, messages: list[dict], **params) -> dict:
        return await self._request("POST", "/v1/chat/completions", {"model": model, "messages": messages, **params})

    def stream_chat(self, model: str, messages: list[dict], **params) -> AsyncIterator[str]:
        return self._stream("/v1/chat/completions", {"model": model, "messages": messages, **params}, True)

    def stream_completion(self, model: str, prompt: str | list[int], **params) -> AsyncIterator[str]:
        return self._stream("/v1/completions", {"model": model, "prompt": prompt, **params}, False)

    async def _lines(self, path: str) -> AsyncIterator[str]:
        try:
            async with self._http.stream("GET", path) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    _check(resp, _json(resp))
                async for line in resp.aiter_lines():
                    if line:
                        yield line
        except _CONNECT_ERRORS as exc:
            raise _not_running(self.socket, exc) from None
        except httpx.TransportError as exc:
            raise _lost(exc) from None

    async def _stream(self, path: str, body: dict, chat: bool) -> AsyncIterator[str]:
        body["stream"] = True
        try:
            async with self._http.stream("POST", path, json=body) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    _check(resp, _json(resp))
                async for line in resp.aiter_lines():
                    chunk = _sse_data(line)
                    if chunk is _DONE:
                        return
                    if chunk and (text := _delta(chunk, chat)):
                        yield text
        except _CONNECT_ERRORS as exc:
            raise _not_running(self.socket, exc) from None
        except httpx.TransportError as exc:  # e.g. the io driver restarted mid-request
            raise _lost(exc) from None


def openai_client(home: str | Path | None = None, **kwargs):
    """An `openai.OpenAI` talking to the daemon's socket (needs the `openai` package)."""
    import openai

    sock = str(_socket(home))
    http = httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=kwargs.pop("timeout", DEFAULT_TIMEOUT))
    return openai.OpenAI(base_url="http://llmos/v1", api_key=kwargs.pop("api_key", "llmos"), http_client=http,
                         **kwargs)


def async_openai_client(home: str | Path | None = None, **kwargs):
    """An `openai.AsyncOpenAI` talking to the daemon's socket."""
    import openai

    sock = str(_socket(home))
    http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=sock),
                             timeout=kwargs.pop("timeout", DEFAULT_TIMEOUT))
    return openai.AsyncOpenAI(base_url="http://llmos/v1", api_key=kwargs.pop("api_key", "llmos"), http_client=http,
                              **kwargs)
