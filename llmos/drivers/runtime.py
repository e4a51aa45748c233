"""What every driver process does besides its job: connect to the kernel, say hello,
announce readiness, send heartbeats and die with its kernel.

A driver is started by the kernel's supervisor as `python -m llmos.drivers.<role>
--endpoint E --name N [role args]`; it must never outlive the kernel (design.md, section 5).
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading
import time

from llmos import logging_setup, protocol
from llmos.bus import DriverBus

HEARTBEAT_S = 1.0
log = logging.getLogger(__name__)


def base_argparser(role: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"llmos-{role}-driver")
    parser.add_argument("--endpoint", required=True, help="the kernel's bus endpoint")
    parser.add_argument("--name", required=True, help="this driver's name in the process table")
    return parser


def setup_logging(name: str) -> None:
    """JSON lines into the file the kernel chose for this driver (llmos/logging_setup.py)."""
    logging_setup.setup_logging(name)


class DriverRuntime:
    """Owns the driver's bus connection and its liveness duties."""

    def __init__(self, role: str, name: str, endpoint: str, asyncio: bool = False):
        self.role, self.name, self.endpoint = role, name, endpoint
        _die_with_parent()
        self.bus = DriverBus(endpoint, name, asyncio=asyncio)
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        self._send(protocol.Hello(role=role, name=name, pid=os.getpid()))

    def _send(self, msg) -> None:
        # On an asyncio socket this returns a future that is already done: with no
        # high-water mark the send never waits.
        self.bus.send(msg)

    def ready(self, info) -> None:
        """Announce readiness with this role's info (protocol.READY_INFO), or a dict of its
        fields (the model driver passes runner.info() plus model_dir); a missing or unknown
        field raises TypeError here, in the driver, rather than a BadMessage in the kernel."""
        cls = protocol.READY_INFO[self.role]
        if isinstance(info, dict):
            info = cls(**info)
        if not isinstance(info, cls):
            raise TypeError(f"a {self.role} driver is ready with a {cls.__name__}, not {type(info).__name__}")
        self._send(protocol.Ready(name=self.name, **{self.role: info}))

    def fatal(self, error: str) -> "NoReturn":  # noqa: F821
        """Report an unrecoverable failure to the kernel, then exit non-zero."""
        log.error("fatal: %s", error)
        self._send(protocol.DriverError(name=self.name, error=error[:4000]))
        time.sleep(0.2)  # let the message leave
        os._exit(3)

    def _heartbeat(self) -> None:
        # A separate socket: zmq sockets are not thread safe, and a driver busy computing
        # must still look alive.
        hb = DriverBus(self.endpoint, f"{self.name}#hb")
        ppid = os.getppid()
        # The parent check outlives close(): a driver shutting down after its kernel died
        # (PDEATHSIG's SIGTERM starts the io driver's graceful path) must not hang in that
        # path, or at exit in zmq, with nobody left to SIGKILL it.
        while True:
            stopped = self._stop.wait(HEARTBEAT_S)
            if os.getppid() != ppid:  # the kernel died: nobody will ever send us work
                log.error("kernel (pid %d) is gone, exiting", ppid)
                os._exit(0)
            if stopped:
                break
            hb.send(protocol.Heartbeat(name=self.name))
        hb.close()
        while os.getppid() == ppid:
            time.sleep(HEARTBEAT_S)
        os._exit(0)

    def close(self) -> None:
        self._stop.set()
        self.bus.close()


class HeapTrimmer:
    """Gives freed heap memory back to the OS every `every` calls of `tick`, and when idle.

    A model driver allocates tensors of a different size every step (batch and context
    change); glibc keeps the freed pieces in its heap, so the driver's RSS crept up by
    100-200 MiB a minute under the soak and never settled. malloc_trim(0) returns them
    (a few ms, so once per `every` steps, or when the driver has nothing to do)."""

    def __init__(self, every: int = 200):
        self.every, self.count = every, 0
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim if sys.platform.startswith("linux") else None
        except (OSError, AttributeError):   # not glibc (musl): nothing to trim
            self._trim = None

    def tick(self) -> None:
        self.count += 1
        if self.count >= self.every:
            self.trim()

    def trim(self) -> None:
        if self.count and self._trim is not None:
            self._trim(0)
        self.count = 0


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the kernel dies (even by kill -9); the heartbeat
    thread's parent check covers other systems and the race at start."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass
