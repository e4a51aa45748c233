"""Typed ZeroMQ channels. Nobody else builds frames by hand.

The kernel binds one ROUTER socket; every driver connects a DEALER whose identity is its
name. Receivers decode with `protocol.decode` and drop (count, log) whatever is invalid,
so a malformed message can never take a process down.
"""
from __future__ import annotations

import asyncio
import logging
import os

import zmq
import zmq.asyncio

from llmos import protocol
from llmos.protocol import BadMessage, Message

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # a garbage length prefix cannot make us allocate more


class KernelBus:
    """The kernel's ROUTER socket. `recv` (a coroutine) yields (peer, message) pairs; `send`
    never blocks.

    A plain socket watched by the event loop, not zmq.asyncio's: that one wraps every send in
    a Future and, while a receive is pending (always, in the kernel), schedules a pass over
    its events after each one; at one stream that machinery was about a third of the
    kernel's CPU (benchmarks/step_gap.py, docs/benchmarks.md). What it guarded against is kept
    here: zmq's file descriptor is edge-triggered, so a send may swallow the wake-up of a
    message that arrived meanwhile, and after each send the reader is woken if zmq says a
    message waits."""

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None):
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted driver reclaims its name
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.LINGER, 0)
        # No send bound, on purpose: a ROUTER drops what passes its high-water mark without a
        # word, and a dropped Outputs or StepPlan is a lost request (design.md rule 5). What the
        # kernel sends is bounded by its own state instead: one StepPlan per model in flight,
        # one Detokenize and one Outputs per step, one reply per query, and a table of at most
        # MAX_IN_FLIGHT requests (frontdoor.py). A driver that stops reading stops sending
        # heartbeats too; its restart discards its pipe.
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.bind(endpoint)
        self.endpoint = endpoint
        self.rejected = 0
        self._fd = self.sock.getsockopt(zmq.FD)
        self._waiter: asyncio.Future | None = None   # the receive that sleeps on the fd, if one does

    async def recv(self) -> tuple[str, Message]:
        while True:
            frames = await self._next_frames()
            peer = frames[0].bytes.decode("utf-8", "replace")
            try:
                return peer, protocol.decode(frames[1:])
            except BadMessage as exc:
                self.rejected += 1
                log.warning("dropped bad message from %r: %s", peer, exc)

    async def _next_frames(self) -> list:
        while True:
            try:
                return self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass
            if self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:   # arrived since: no sleep (the edge is spent)
                continue
            await self._readable()

    async def _readable(self) -> None:
        """Sleep until the fd stirs or a send sees a message waiting. The reader is only
        registered while someone sleeps: a level-triggered loop would otherwise spin on an
        fd with pending zmq commands that nobody reads (after the receive loop ends)."""
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        loop.add_reader(self._fd, _wake, waiter)
        try:
            await waiter
        finally:
            loop.remove_reader(self._fd)
            self._waiter = None

    def send(self, peer: str, msg: Message) -> None:
        """Send without blocking. Raises protocol.Unencodable (nothing sent) for a message
        that cannot be written; the caller fails the request it belongs to."""
        frames = protocol.encode(msg)
        try:
            self.sock.send_multipart([peer.encode(), *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("dropped %s to %s: peer not reachable", type(msg).__name__, peer)
        if self._waiter is not None and self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            _wake(self._waiter)   # the send took the edge that announced it

    def close(self) -> None:
        self.sock.close(linger=0)
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[len("ipc://"):])
            except FileNotFoundError:
                pass


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class DriverBus:
    """A driver's DEALER socket to the kernel. Blocking by default; `asyncio=True` for
    drivers that run an event loop (the io driver)."""

    def __init__(self, endpoint: str, identity: str, asyncio: bool = False):
        ctx = zmq.asyncio.Context.instance() if asyncio else zmq.Context.instance()
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, identity.encode())
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.LINGER, 1000)
        # No send bound: a driver sends only answers to what the kernel asked (a result per
        # plan, deltas per Detokenize, one Submit per admitted HTTP request, which the io
        # driver's connection cap bounds) and heartbeats; the kernel reads without pause.
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.connect(endpoint)
        self.rejected = 0

    def send(self, msg: Message):
        return self.sock.send_multipart(protocol.encode(msg), copy=False)

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.sock.poll(timeout_ms, zmq.POLLIN))

    def recv(self) -> Message | None:
        """Blocking receive of one message; None if what arrived was invalid."""
        return self._decode(self.sock.recv_multipart(copy=False))

    async def arecv(self) -> Message | None:
        return self._decode(await self.sock.recv_multipart(copy=False))

    def _decode(self, frames) -> Message | None:
        try:
            return protocol.decode(frames)
        except BadMessage as exc:
            self.rejected += 1
            log.warning("dropped bad message from kernel: %s", exc)
            return None

    def close(self) -> None:
        self.sock.close(linger=0)
