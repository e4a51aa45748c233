"""A real daemon started as systemd would start a Type=notify service: NOTIFY_SOCKET names a
datagram socket this test binds, WATCHDOG_USEC asks for pings. READY=1 comes only once
/health says ok, WATCHDOG=1 keeps coming, STOPPING=1 comes on SIGTERM, and no driver is handed
the socket. Every wait polls with a generous deadline."""
from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import httpx

from daemon_harness import Daemon


class Listener:
    """Collects every datagram sent to `path`, in order, on a thread."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.got: list[str] = []
        self.closed = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while not self.closed:
            try:
                self.got.append(self.sock.recv(4096).decode())
            except (socket.timeout, OSError):
                continue

    def has(self, state: str) -> bool:
        return any(state in msg.split("\n") for msg in list(self.got))

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def _health(d: Daemon) -> str | None:
    if not d.socket.exists():
        return None
    try:
        with d.http(timeout=10) as c:
            return c.get("/health").json().get("status")
    except (httpx.HTTPError, ValueError):
        return None


def wait_for(cond, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout:g} s")


def test_ready_after_health_ok_then_watchdog_then_stopping(tmp_path, tiny_llama_dir):
    notify = Listener(tmp_path / "notify.sock")
    d = Daemon(tmp_path / "home", [f"tiny={tiny_llama_dir}"], "--max-model-len", "512",
               env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"})
    try:
        def ready_checked() -> bool:
            before = notify.has("READY=1")   # what had arrived before we asked
            status = _health(d)
            assert not before or status == "ok", f"READY=1 came while /health said {status}"
            assert d.proc.poll() is None, d.log_tail()
            return before
        wait_for(ready_checked, "READY=1")
        assert notify.got[0] == "STATUS=starting"   # the daemon came up starting, then was ready
        assert _health(d) == "ok"
        pings = sum(m == "WATCHDOG=1" for m in notify.got)
        wait_for(lambda: sum(m == "WATCHDOG=1" for m in list(notify.got)) >= pings + 3, "three more WATCHDOG=1", 60)
        for p in d.ps()["processes"]:   # the drivers were not handed the socket
            if p["role"] != "kernel":
                environ = Path(f"/proc/{p['pid']}/environ").read_bytes().split(b"\0")
                assert not any(v.startswith(b"NOTIFY_SOCKET=") for v in environ), p["name"]
        assert not notify.has("STOPPING=1")
        d.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: notify.has("STOPPING=1"), "STOPPING=1", 60)
        assert d.proc.wait(60) == 0
        assert notify.got.count(next(m for m in notify.got if m.startswith("READY=1"))) == 1   # once
    finally:
        d.stop()
        notify.close()
