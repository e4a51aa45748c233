"""sd_notify, and the kernel's loop that tells systemd how the daemon is (Type=notify).

A datagram of "KEY=VALUE" lines to $NOTIFY_SOCKET (a path, or an abstract name written
with a leading '@'): systemd's own protocol, a few lines of stdlib rather than a dependency.
Without NOTIFY_SOCKET (not under systemd) nothing is sent and the loop only waits.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Callable

log = logging.getLogger(__name__)
POLL_S = 0.25   # how often readiness is checked until READY=1


def notify(state: str, address: str | None = None) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=serving") to `address`, by default $NOTIFY_SOCKET.
    False when there is no socket to tell or the send failed (systemd gone: not our failure)."""
    address = os.environ.get("NOTIFY_SOCKET") if address is None else address
    if not address or address[0] not in "/@":   # (vsock addresses are not supported)
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), target)
        return True
    except OSError as exc:
        log.warning("sd_notify %r to %s failed: %s", state.split("\n")[0], address, exc)
        return False


def watchdog_interval(env=os.environ) -> float | None:
    """Seconds between WATCHDOG=1 (half of WatchdogSec, as sd_watchdog_enabled advises), or None
    when systemd wants none, or wants it from another process (WATCHDOG_PID)."""
    pid = env.get("WATCHDOG_PID")
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        if usec <= 0 or (pid and int(pid) != os.getpid()):
            return None
    except ValueError:
        return None
    return usec / 2e6


class ServiceNotifier:
    """The kernel's side of Type=notify. Created in Kernel.run; `run()` is one of its
    long-lived loops; `stopping()` is called when the drain starts (SIGTERM).

    `health()` returns the kernel's HealthReport: READY=1 is sent once, the first time its
    status is "ok" (every preloaded model serves, the io driver listens). STATUS= follows the
    health status after that, so `systemctl status` shows "degraded" when it is."""

    def __init__(self, health: Callable, clock: Callable[[], float] = time.monotonic):
        self.health, self.clock = health, clock
        # Read once, then kept from the drivers: with NotifyAccess=main systemd ignores theirs anyway.
        self.address = os.environ.pop("NOTIFY_SOCKET", None)
        self.interval = watchdog_interval()
        self.ready_sent = False
        self.status: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    async def run(self) -> None:
        if not self.enabled:
            await asyncio.Future()   # nothing to tell: wait until the kernel stops (cancelled then)
        next_watchdog = self.clock()
        while True:
            self.check()
            if self.interval is not None and self.clock() >= next_watchdog:
                notify("WATCHDOG=1", self.address)
                next_watchdog = self.clock() + self.interval
            await asyncio.sleep(min(POLL_S if not self.ready_sent else 1.0, self.interval or 1.0))

    def check(self) -> None:
        report = self.health()
        status = report.status
        if status == "ok" and not self.ready_sent:
            self.ready_sent = notify(f"READY=1\nSTATUS=serving: {', '.join(sorted(report.models)) or 'no model'}",
                                     self.address)
            if self.ready_sent:
                log.info("told systemd: ready")
                self.status = status
        elif status != self.status and status != "draining":
            why = ", ".join([*report.failed_drivers, *report.dead_loops]) if status == "degraded" else ""
            notify(f"STATUS={status}{': ' + why if why else ''}", self.address)
            self.status = status

    def stopping(self) -> None:
        if self.enabled:
            notify("STOPPING=1\nSTATUS=draining", self.address)
