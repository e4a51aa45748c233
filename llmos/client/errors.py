"""The client's exceptions, and how an answer or a transport failure becomes one.

`DaemonNotRunning` (no socket / nobody listening), `RequestRejected` (4xx; `NotFound` for
404, `InvalidBatchFile` with the bad line numbers), `ServerError` (5xx, a lost connection, or
an error event in the middle of a stream); all are `LlmosError`.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import httpx


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


def answer_error(status: int, body) -> LlmosError:
    """The exception for an HTTP error answer (status >= 400) with its decoded body."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"message": str(body) or f"HTTP {status}"}
    cls = ServerError if not 400 <= status < 500 else (
        InvalidBatchFile if err.get("code") == "invalid_batch_file" else NotFound if status == 404 else RequestRejected)
    return cls(str(err.get("message")), status, err.get("code"), err.get("param"), body)


_CONNECT_ERRORS = (httpx.ConnectError, FileNotFoundError, ConnectionRefusedError)


@contextlib.contextmanager
def transport_errors(sock: Path):
    """Turns a failure to reach the daemon into DaemonNotRunning, and a connection lost
    mid-request (e.g. the io driver restarted) into ServerError."""
    try:
        yield
    except _CONNECT_ERRORS as exc:
        raise DaemonNotRunning(f"llmosd is not running (cannot connect to {sock}: {exc})") from None
    except httpx.TransportError as exc:
        raise ServerError(f"the connection to llmosd was lost: {exc!r}") from None
