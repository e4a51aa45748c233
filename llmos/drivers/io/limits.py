"""Connection limits of the io driver: what keeps slow and greedy clients from wedging it.

aiohttp bounds a request's header lines (size and count) and closes idle keep-alive
connections, but it has no connection cap, no deadline for a request's headers (a client
that dribbles a header line now and then holds its connection forever) and no deadline for
a client that stops reading its response. This module adds those around aiohttp, without
touching its internals:

- `ConnectionGuard` is the listener's protocol factory. Up to `max_connections` connections
  are served, each by aiohttp's own RequestHandler wrapped in a `_Watched` protocol that
  forwards every transport event to it and runs two timers: the header deadline and the
  send-stall deadline. Past the cap a connection gets a canned 503 at once and is closed;
  it never reaches aiohttp, so refusing costs the served connections nothing.
- `GuardedUnixSite` is aiohttp's UnixSite with that factory in place of the bare Server.

Who may call: the io driver's `serve` (one guard per listener). Body read timeouts are the
handlers' business (server.py), not this module's.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from aiohttp import web

from llmos.openai_format import ApiError

log = logging.getLogger(__name__)
REFUSED_LINGER_S = 1.0   # a refused connection waits this long for its client to hang up
CLOSE_GRACE_S = 1.0      # a closed connection whose client reads nothing is aborted after this


@dataclass(frozen=True)
class Limits:
    """Per-listener limits. Timeouts are in seconds; a header or send timeout of 0 turns that
    deadline off, a keep-alive timeout of 0 closes each connection after its response."""
    max_connections: int = 256      # connections served at once; more are answered 503
    header_timeout: float = 10.0    # from accept (or a keep-alive request's first byte) to its last header
    keepalive_timeout: float = 15.0  # an idle keep-alive connection is closed after this
    send_timeout: float = 60.0      # a client that reads none of its response this long is cut off
    max_line_size: int = 8190       # bytes in the request line
    max_field_size: int = 8190      # bytes in one header line
    max_headers: int = 64           # header lines in one request

    def __post_init__(self):
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        for name in ("header_timeout", "keepalive_timeout", "send_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    def handler_kwargs(self) -> dict:
        """The options aiohttp's RequestHandler takes (AppRunner passes them through)."""
        return {"keepalive_timeout": self.keepalive_timeout, "max_line_size": self.max_line_size,
                "max_field_size": self.max_field_size, "max_headers": self.max_headers}


def _canned(status: int, reason: str, message: str, code: str, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 response with an OpenAI-shaped error body that closes the connection."""
    body = json.dumps(ApiError(status, message, code=code).body()).encode()
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close"]
    if retry_after is not None:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _Every:
    """Rate limit for a log line that a flood of bad clients would otherwise repeat."""

    def __init__(self, seconds: float):
        self.seconds, self.last = seconds, -seconds

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True


class ConnectionGuard:
    """Protocol factory for one listener that serves through `server` (aiohttp's low-level
    Server, e.g. `AppRunner.server` after setup). It owns the connection count."""

    def __init__(self, server: web.Server, limits: Limits):
        self.server, self.limits = server, limits
        self.served = 0        # connections handed to aiohttp, not yet lost
        self.refusing = 0      # refused connections still lingering
        self.refused_total = 0
        self.timed_out_total = 0
        self._by_handler: dict[web.RequestHandler, _Watched] = {}
        self._refuse_log, self._timeout_log = _Every(10.0), _Every(10.0)
        self._refusal = _canned(503, "Service Unavailable",
                                f"too many connections to llmos (limit {limits.max_connections}); retry shortly",
                                "too_many_connections", retry_after=1)
        self._header_timeout = _canned(408, "Request Timeout",
                                       f"request headers not received within {limits.header_timeout:g} s",
                                       "header_timeout")
        # A request whose headers are complete reaches this handler: that ends its header phase.
        inner = server.request_handler

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            conn = self._by_handler.get(request.protocol)
            if conn is not None:
                conn.request_started()
            try:
                return await inner(request)
            finally:
                if conn is not None:
                    conn.request_finished()
        server.request_handler = handler  # RequestHandlers read it when they are created

    def __call__(self) -> asyncio.Protocol:
        return _Watched(self)

    def _note_refused(self) -> None:
        self.refused_total += 1
        if self._refuse_log.due():
            log.warning("refusing connections: %d served at once already (limit); %d refused in all",
                        self.served, self.refused_total)

    def _note_timed_out(self, what: str) -> None:
        self.timed_out_total += 1
        if self._timeout_log.due():
            log.warning("closed a connection: %s (%d such in all)", what, self.timed_out_total)


class _Watched(asyncio.Protocol):
    """One connection. Whether it is served or refused is decided when it is made, not in
    the factory: a loop may create the protocols of several accepted sockets before it makes
    any of their connections. A refused one forwards everything to a `_Refused`; a served
    one to aiohttp's RequestHandler, with two deadlines.

    Header deadline: armed at accept, and on a keep-alive connection at the first byte after
    a request ended; cancelled when a request's headers are complete (its handler starts).
    On expiry the client gets a 408 and the connection is closed.
    Send-stall deadline: armed while the transport has paused writing (the client reads
    nothing), cancelled when it resumes. On expiry the connection is aborted, which cancels
    its handler (handler_cancellation), so the kernel request behind it is aborted too.
    """

    def __init__(self, guard: ConnectionGuard):
        self.guard = guard
        self.inner: asyncio.Protocol | None = None   # aiohttp's RequestHandler, or a _Refused
        self.transport: asyncio.Transport | None = None   # set while served
        self.busy = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ transport events

    def connection_made(self, transport) -> None:
        guard = self.guard
        if guard.served >= guard.limits.max_connections:
            self.inner = _Refused(guard)
        else:
            self.inner, self.transport = guard.server(), transport
            guard.served += 1
            guard._by_handler[self.inner] = self
            self._arm_header_deadline()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.transport is not None and not self.busy and self._header_timer is None:
            self._arm_header_deadline()
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        timeout = self.guard.limits.send_timeout
        if timeout and self.transport is not None and self._stall_timer is None:
            self._stall_timer = asyncio.get_running_loop().call_later(timeout, self._send_stalled)
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self._cancel_stall()
        self.inner.resume_writing()

    def connection_lost(self, exc) -> None:
        self._cancel_header()
        self._cancel_stall()
        if self.transport is not None:
            self.transport = None
            self.guard.served -= 1
            self.guard._by_handler.pop(self.inner, None)
        self.inner.connection_lost(exc)

    # ------------------------------------------------------------ requests (from the handler wrapper)

    def request_started(self) -> None:
        self.busy = True
        self._cancel_header()

    def request_finished(self) -> None:
        self.busy = False

    # ------------------------------------------------------------ deadlines

    def _arm_header_deadline(self) -> None:
        timeout = self.guard.limits.header_timeout
        if timeout:
            self._header_timer = asyncio.get_running_loop().call_later(timeout, self._headers_late)

    def _cancel_header(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_stall(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        transport = self.transport
        if transport is None or self.busy:
            return
        self.guard._note_timed_out(f"headers not complete within {self.guard.limits.header_timeout:g} s")
        transport.write(self.guard._header_timeout)
        transport.close()
        asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self._abort_if_open, transport)

    def _send_stalled(self) -> None:
        self._stall_timer = None
        if self.transport is not None:
            self.guard._note_timed_out(f"client read nothing for {self.guard.limits.send_timeout:g} s")
            self.transport.abort()

    def _abort_if_open(self, transport) -> None:
        if self.transport is transport:
            transport.abort()


class _Refused(asyncio.Protocol):
    """A connection past the cap: answered 503 at once (before its request is read, which
    HTTP allows), half-closed so the client reads the answer and then EOF, and closed when
    the client hangs up or after REFUSED_LINGER_S. If even the refused ones pile up (a
    flood), the next are closed without an answer, so refusing stays bounded too."""

    def __init__(self, guard: ConnectionGuard):
        self.guard = guard
        self.transport = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        guard = self.guard
        guard._note_refused()
        if guard.refusing >= guard.limits.max_connections:
            transport.abort()
            return
        self.transport = transport
        guard.refusing += 1
        transport.write(guard._refusal)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not served; reading it keeps the client's writes from failing

    def eof_received(self):
        return False  # the client is done: close

    def connection_lost(self, exc) -> None:
        if self.transport is not None:
            self.transport = None
            self.guard.refusing -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class GuardedUnixSite(web.BaseSite):
    """aiohttp's UnixSite, serving through a ConnectionGuard. `runner` must be set up."""

    __slots__ = ("_path", "guard")

    def __init__(self, runner: web.BaseRunner, path: str, limits: Limits, *, backlog: int = 128):
        super().__init__(runner, backlog=backlog)
        if runner.server is None:
            raise RuntimeError("call runner.setup() before creating the site")
        self._path = path
        self.guard = ConnectionGuard(runner.server, limits)

    @property
    def name(self) -> str:
        return f"http://unix:{self._path}:"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self.guard, self._path, backlog=self._backlog)


class GuardedTCPSite(web.BaseSite):
    """aiohttp's TCPSite, serving through a ConnectionGuard, with TLS when given a context.
    Off by default (--listen); every request on it needs an API key (kernel/auth.py)."""

    __slots__ = ("_host", "_port", "guard")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, limits: Limits, *, ssl_context=None,
                 backlog: int = 128):
        super().__init__(runner, backlog=backlog, ssl_context=ssl_context)
        if runner.server is None:
            raise RuntimeError("call runner.setup() before creating the site")
        self._host, self._port = host, port
        self.guard = ConnectionGuard(runner.server, limits)

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.guard, self._host, self._port, ssl=self._ssl_context,
                                                backlog=self._backlog, reuse_address=True)
