"""The io driver's side of the bus: sends Submit/Abort/Query/Command to the kernel and routes the
kernel's answers to the HTTP handler waiting for them.

One reader task owns `bus.arecv()`. Each submitted request gets an asyncio.Queue that
receives, in order: one `Accepted` or `Rejected`, then (after Accepted) Outputs items
(dicts) until each of its n choices has had an item whose "finish" is set, or a late
`Rejected` (failure mid-generation).
When the link drops or the driver stops, every waiting request gets a synthetic Rejected
(503). Each query or command gets a future keyed by query_id. Nothing here holds scheduling state.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from typing import Any, Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from llmos import protocol
from llmos.drivers.io.credentials import CURRENT
from llmos.drivers.runtime import DriverRuntime

log = logging.getLogger(__name__)


class KernelUnavailable(Exception):
    """The kernel cannot be reached or did not answer in time. `status` is 503 (link down)
    or 504 (no answer within the timeout)."""

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.status = status


class QueryFailed(Exception):
    """The kernel refused or failed a Query or Command; the message is its error."""


class AuthRefused(Exception):
    """The kernel said the caller may not ask this: 401 (who are you?) or 403 (not you)."""
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class KernelLink:
    """Owns the driver's bus socket for reading. Call from the event loop only: `start`
    once, then `submit`/`abort`/`release`/`query` from HTTP handlers."""

    def __init__(self, runtime: DriverRuntime, on_shutdown: Callable[[str], None] | None = None):
        self.runtime = runtime
        self.bus = runtime.bus
        self.on_shutdown = on_shutdown
        self.up = True  # the DEALER was connected by the runtime before we could watch it
        self._requests: dict[str, asyncio.Queue] = {}
        self._open: dict[str, set[int]] = {}   # request id -> its choices not finished yet
        self._queries: dict[str, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._reader(), name="kernel-reader"))
        self._tasks.append(asyncio.create_task(self._monitor(), name="kernel-monitor"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.bus.sock.disable_monitor()

    @property
    def in_flight(self) -> list[str]:
        return list(self._requests)

    def has(self, request_id: str) -> bool:
        return request_id in self._requests

    # ------------------------------------------------------------ requests

    def submit(self, msg: protocol.Submit) -> asyncio.Queue:
        """Register msg.request_id and send it. The caller must call `release` when done."""
        if not self.up:
            raise KernelUnavailable("the kernel is not connected (restarting?)")
        if msg.request_id in self._requests:
            raise ValueError(f"duplicate request id {msg.request_id}")
        # Unbounded, and bounded by the request: the kernel sends at most one item per choice
        # per step, so at most n x max_tokens items (validated) however slow the client reads.
        queue: asyncio.Queue = asyncio.Queue()
        self._requests[msg.request_id] = queue  # before sending: the answer may come fast
        self._open[msg.request_id] = set(range(msg.n))
        self.bus.send(dataclasses.replace(msg, auth=CURRENT.get()) if msg.auth is None else msg)
        return queue

    def abort(self, request_id: str, reason: str) -> None:
        """Tell the kernel to drop the request and stop routing its outputs."""
        self.release(request_id)
        if self.up:
            self.bus.send(protocol.Abort(request_id=request_id, reason=reason))

    def release(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self._open.pop(request_id, None)

    # ------------------------------------------------------------ queries

    async def query(self, what: str, args: dict | None = None, timeout: float = 5.0) -> Any:
        """The kernel's answer to Query(what) (QueryReply.answer: the query's record, such as
        a protocol.HealthReport, or JSON-shaped data). Raises KernelUnavailable (503 link down,
        504 no answer in `timeout` s) or QueryFailed (the kernel said ok=False)."""
        return await self._ask(protocol.Query, what, args, timeout)

    async def command(self, what: str, args: dict | None = None, timeout: float = 30.0) -> Any:
        """The kernel's answer to Command(what): like `query`, for actions that change state.
        After a 504 the action may still have happened."""
        return await self._ask(protocol.Command, what, args, timeout)

    async def _ask(self, cls, what: str, args: dict | None, timeout: float) -> Any:
        if not self.up:
            raise KernelUnavailable("the kernel is not connected (restarting?)")
        qid = uuid.uuid4().hex
        fut = asyncio.get_running_loop().create_future()
        self._queries[qid] = fut
        try:
            self.bus.send(cls(query_id=qid, what=what, args=args or {}, auth=CURRENT.get()))
            reply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise KernelUnavailable(f"the kernel did not answer '{what}' within {timeout:g} s", 504) from None
        finally:
            self._queries.pop(qid, None)
        if not reply.ok and reply.status in (401, 403):
            raise AuthRefused(reply.error, reply.status)
        if not reply.ok:
            raise QueryFailed(reply.error)
        return reply.answer

    # ------------------------------------------------------------ the reader

    async def _reader(self) -> None:
        while True:
            msg = await self.bus.arecv()
            if msg is None:  # invalid; the bus already logged and counted it
                continue
            try:
                self._dispatch(msg)
            except Exception:  # a bad message must never stop the reader
                log.exception("could not dispatch %s", type(msg).__name__)

    def _dispatch(self, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Outputs):
            for item in msg.items:   # (typed and checked by protocol.decode)
                queue, open_choices = self._requests.get(item.rid), self._open.get(item.rid, set())
                if queue is None:
                    continue  # aborted or already finished
                if item.index not in open_choices:
                    log.warning("dropped Outputs item for an unknown or finished choice: %.128s #%d",
                                item.rid, item.index)   # (never the text)
                    continue
                queue.put_nowait(item)
                if item.finish is not None:
                    open_choices.discard(item.index)
                    if not open_choices:
                        self.release(item.rid)
        elif isinstance(msg, (protocol.Accepted, protocol.Rejected)):
            queue = self._requests.get(msg.request_id)
            if queue is not None:
                queue.put_nowait(msg)
                if isinstance(msg, protocol.Rejected):
                    self.release(msg.request_id)
        elif isinstance(msg, protocol.QueryReply):
            fut = self._queries.get(msg.query_id)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, protocol.Shutdown):
            log.info("kernel asked us to shut down: %s", msg.reason)
            if self.on_shutdown:
                self.on_shutdown(msg.reason)
        else:
            log.warning("unexpected %s from the kernel", type(msg).__name__)

    async def _monitor(self) -> None:
        """Track the DEALER's connection: when it drops, fail every waiter at once
        (a client must get an error, never silence)."""
        mon = self.bus.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        try:
            while True:
                event = parse_monitor_message(await mon.recv_multipart())["event"]
                if event == zmq.EVENT_CONNECTED:
                    self.up = True
                elif event == zmq.EVENT_DISCONNECTED and self.up:
                    log.error("lost the connection to the kernel")
                    self.up = False
                    self.fail_all("kernel_unavailable", "lost the connection to the kernel")
        finally:
            mon.close(linger=0)

    def fail_all(self, code: str, message: str, abort: bool = False) -> None:
        """End every waiting request and query with a 503 `code`; with `abort`, also tell
        the kernel to drop the requests (the io driver is going away, the kernel is not)."""
        for rid, queue in list(self._requests.items()):
            queue.put_nowait(protocol.Rejected(request_id=rid, status=503, code=code, message=message, param=None))
            if abort:
                self.abort(rid, message)
        self._requests.clear()
        self._open.clear()
        for fut in self._queries.values():
            if not fut.done():
                fut.set_exception(KernelUnavailable(message))
