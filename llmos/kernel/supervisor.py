"""The process table: start drivers, watch them, restart them (OTP-style child specs).

A driver is STARTING until it sends Ready, RUNNING while it heartbeats, BACKOFF between
a crash and its restart, FAILED once it exhausts its restart budget (the daemon keeps
serving everything else). Start in order, stop in reverse.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llmos import protocol
from llmos.logging_setup import STDERR_SUFFIX, cap_file, log_target

log = logging.getLogger(__name__)


class DState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FAILED = "failed"


_ALLOWED = {
    DState.EXITED: {DState.STARTING},
    DState.STARTING: {DState.RUNNING, DState.BACKOFF, DState.STOPPING, DState.FAILED, DState.EXITED},
    DState.RUNNING: {DState.BACKOFF, DState.STOPPING, DState.FAILED, DState.EXITED},
    DState.BACKOFF: {DState.STARTING, DState.STOPPING, DState.FAILED},
    DState.STOPPING: {DState.EXITED},
    DState.FAILED: {DState.STARTING, DState.STOPPING},
}


@dataclass
class DriverSpec:
    name: str
    role: str
    argv: list[str]
    restart: str = "permanent"        # permanent | transient (only after a crash) | temporary
    shutdown_timeout: float = 5.0
    max_restarts: int = 5             # restart intensity: at most this many ...
    restart_period: float = 60.0      # ... within this many seconds
    start_timeout: float = 600.0      # loading a model can take a while
    heartbeat_timeout: float = 30.0
    fail_fast_start: bool = False     # exiting before its first Ready fails it at once (a model that
                                      # cannot load will not load on a retry; say so now)


@dataclass
class DriverProcess:
    spec: DriverSpec
    state: DState = DState.EXITED
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    last_heartbeat: float = 0.0
    restarts: int = 0
    restart_times: deque = field(default_factory=deque)
    last_error: str | None = None
    info: protocol.ModelInfo | protocol.TokenizerInfo | protocol.IoInfo | None = None   # from its Ready
    retry_at: float = 0.0
    ever_ready: bool = False

    def change_state(self, new: DState) -> None:
        if new not in _ALLOWED[self.state]:
            raise RuntimeError(f"driver {self.spec.name}: illegal transition {self.state.name} -> {new.name}")
        log.info("driver %s: %s -> %s", self.spec.name, self.state.value, new.value)
        self.state = new

    def summary(self) -> protocol.ProcessRow:
        alive = self.proc is not None and self.proc.poll() is None
        return protocol.ProcessRow(
            name=self.spec.name, role=self.spec.role, state=self.state.value,
            pid=self.proc.pid if alive else None, restarts=self.restarts,
            uptime_s=round(time.monotonic() - self.started_at, 1) if alive else 0.0, last_error=self.last_error)


class Supervisor:
    """Owns driver processes. The kernel calls `on_message` for Hello/Ready/Heartbeat/
    DriverError and gets `on_ready(name, info)` / `on_down(name)` callbacks."""

    def __init__(self, logs_dir: Path, on_ready: Callable, on_down: Callable, env: dict | None = None):
        self.logs_dir = logs_dir
        self.on_ready, self.on_down = on_ready, on_down
        self.env = env
        self.table: dict[str, DriverProcess] = {}
        self.order: list[str] = []
        self.stopping = False
        self.leaving: list[tuple[DriverProcess, float, Callable | None]] = []   # removed, not yet exited

    def add(self, spec: DriverSpec) -> None:
        self.table[spec.name] = DriverProcess(spec)
        self.order.append(spec.name)
        self._spawn(self.table[spec.name])

    def _spawn(self, d: DriverProcess) -> None:
        d.change_state(DState.STARTING)
        # The driver logs JSON into logs/<name>.log itself; its raw output (a crash before its
        # logging is up, a C library's messages) goes beside it. Under journald: our stderr.
        out, env = None, dict(os.environ if self.env is None else self.env)
        if log_target() != "journal":
            out = open(cap_file(self.logs_dir / f"{d.spec.name}{STDERR_SUFFIX}"), "ab")
            env["LLMOS_LOG_DIR"] = str(self.logs_dir)
        d.proc = subprocess.Popen(d.spec.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                  env=env, close_fds=True)
        if out is not None:
            out.close()
        d.started_at = d.last_heartbeat = time.monotonic()
        log.info("driver %s started, pid %d", d.spec.name, d.proc.pid)

    # -- messages from drivers (already decoded and validated by the bus)
    def heartbeat(self, name: str) -> None:
        if name in self.table:
            self.table[name].last_heartbeat = time.monotonic()

    def ready(self, name: str, info) -> None:
        """`info`: the Ready's info, which must be the one of the driver's role."""
        d = self.table.get(name)
        if d is None or d.state is not DState.STARTING:
            return
        if not isinstance(info, protocol.READY_INFO[d.spec.role]):
            log.error("driver %s (%s) sent a Ready with %s", name, d.spec.role, type(info).__name__)
            d.last_error = f"Ready with {type(info).__name__}, not the {d.spec.role} driver's info"
            return
        d.info = info
        d.last_error = None
        d.ever_ready = True
        d.change_state(DState.RUNNING)
        self.on_ready(name, info)

    def driver_error(self, name: str, error: str) -> None:
        if name in self.table:
            self.table[name].last_error = error

    def state_of(self, name: str) -> tuple[str, str | None]:
        d = self.table.get(name)
        return ("not started", None) if d is None else (d.state.value, d.last_error)

    def is_running(self, name: str) -> bool:
        d = self.table.get(name)
        return d is not None and d.state is DState.RUNNING

    # -- the watch loop
    async def watch(self, interval: float = 0.05) -> None:
        while not self.stopping:
            now = time.monotonic()
            for d in list(self.table.values()):
                try:   # one driver's trouble (a spawn that fails, a callback that raises) is its own
                    self._check(d, now)
                except Exception:
                    log.exception("supervisor: checking driver %s failed", d.spec.name)
            self._reap(now)
            await asyncio.sleep(interval)

    def _check(self, d: DriverProcess, now: float) -> None:
        if d.state in (DState.STARTING, DState.RUNNING):
            code = d.proc.poll()
            hung = (d.state is DState.RUNNING and now - d.last_heartbeat > d.spec.heartbeat_timeout) or \
                   (d.state is DState.STARTING and now - d.started_at > d.spec.start_timeout)
            if code is None and hung:
                log.error("driver %s is unresponsive; killing it", d.spec.name)
                d.last_error = d.last_error or "unresponsive (no heartbeat)"
                d.proc.kill()
                d.proc.wait()
                code = d.proc.returncode
            if code is not None:
                self._exited(d, code, now)
        elif d.state is DState.BACKOFF and now >= d.retry_at:
            self._spawn(d)

    def _exited(self, d: DriverProcess, code: int, now: float) -> None:
        was_running = d.state is DState.RUNNING
        if code != 0 and not d.last_error:
            d.last_error = f"exited with code {code}"
        log.warning("driver %s (pid %d) exited with code %s", d.spec.name, d.proc.pid, code)
        if was_running:
            self.on_down(d.spec.name)
        if d.spec.fail_fast_start and not d.ever_ready:
            d.change_state(DState.FAILED)
            log.error("driver %s failed before it was ready: %s", d.spec.name, d.last_error)
            self.on_down(d.spec.name)
            return
        if d.spec.restart == "temporary" or (d.spec.restart == "transient" and code == 0):
            d.change_state(DState.FAILED if code else DState.EXITED)
            return
        d.restart_times.append(now)
        while d.restart_times and now - d.restart_times[0] > d.spec.restart_period:
            d.restart_times.popleft()
        if len(d.restart_times) > d.spec.max_restarts:
            d.change_state(DState.FAILED)
            log.error("driver %s failed: restart budget exhausted (%s)", d.spec.name, d.last_error)
            if not was_running:   # (a running one was reported down above, once is enough)
                self.on_down(d.spec.name)
            return
        d.restarts += 1
        d.retry_at = now + min(10.0, 0.25 * 2 ** (len(d.restart_times) - 1))
        d.change_state(DState.BACKOFF)

    def restart(self, name: str) -> None:
        """Restart a driver on demand (a FAILED one gets a fresh budget)."""
        d = self.table[name]
        if d.state is DState.FAILED:
            d.restart_times.clear()
            self._spawn(d)
        elif d.proc is not None and d.proc.poll() is None:
            d.proc.terminate()  # the watch loop sees the exit and restarts it

    def remove(self, name: str, on_exit: Callable | None = None) -> None:
        """Stop a driver for good and forget it (its model was unloaded). Does not wait: it gets
        SIGTERM now, SIGKILL after its shutdown timeout, and `on_exit()` runs once it is gone."""
        d = self.table.pop(name, None)
        if d is None:
            if on_exit is not None:
                on_exit()
            return
        self.order.remove(name)
        if d.proc is None or d.proc.poll() is not None:
            if on_exit is not None:
                on_exit()
            return
        log.info("driver %s: stopping (removed)", name)
        d.proc.send_signal(signal.SIGTERM)
        self.leaving.append((d, time.monotonic() + d.spec.shutdown_timeout, on_exit))

    def _reap(self, now: float) -> None:
        still = []
        for d, deadline, on_exit in self.leaving:
            if d.proc.poll() is None and now >= deadline:
                log.warning("driver %s ignored SIGTERM; killing it", d.spec.name)
                d.proc.kill()
                d.proc.wait()
            if d.proc.poll() is None:
                still.append((d, deadline, on_exit))
            elif on_exit is not None:
                try:
                    on_exit()
                except Exception:
                    log.exception("supervisor: cleanup after %s failed", d.spec.name)
        self.leaving = still

    async def stop_all(self) -> None:
        """Stop drivers in reverse start order, each within its shutdown timeout."""
        self.stopping = True
        for name in reversed(self.order):
            d = self.table[name]
            if d.proc is None or d.proc.poll() is not None:
                continue
            if d.state is not DState.STOPPING:
                d.change_state(DState.STOPPING)
            d.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + d.spec.shutdown_timeout
            while d.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if d.proc.poll() is None:
                log.warning("driver %s ignored SIGTERM; killing it", name)
                d.proc.kill()
                d.proc.wait()
            d.change_state(DState.EXITED)
        for d, _, on_exit in self.leaving:   # removed drivers still on their way out
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
            if on_exit is not None:
                on_exit()
        self.leaving = []

    def processes(self) -> list[protocol.ProcessRow]:
        rows = [protocol.ProcessRow(name="kernel", role="kernel", state="running", pid=os.getpid(), restarts=0,
                                    uptime_s=None, last_error=None)]
        return rows + [self.table[n].summary() for n in self.order]
