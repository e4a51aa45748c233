"""The llmosd a replica supervises: its slot home, its process group, its health. No Ray.

A replica takes the first free slot under the home root (slot-0, slot-1, ...) by holding an
exclusive lock on the slot's lock file for its life; the lock goes when the process does, so
a replacement replica on the same node takes the freed slot and its daemon resumes that
home's batch jobs from the job store."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

import llmos
from llmos.paths import Paths

MAX_SLOTS = 256
SOCKET_MAX = 107   # AF_UNIX path limit on Linux, less the terminating NUL


class DaemonFailed(RuntimeError):
    """The daemon exited, or did not become healthy in time; the message has its log's tail."""


class SlotDaemon:
    def __init__(self, root: str | Path, models: list[str], args: list[str]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.slot, self._lock = _take_slot(self.root)
        self.paths = Paths.from_env(str(self.root / f"slot-{self.slot}"))
        if len(str(self.paths.api_socket)) > SOCKET_MAX:
            raise DaemonFailed(f"socket path too long for AF_UNIX: {self.paths.api_socket}; use a shorter home root")
        self.argv = [sys.executable, "-m", "llmos.cli.daemon", "--home", str(self.paths.home),
                     *[a for m in models for a in ("--model", m)], *args]
        self.proc: subprocess.Popen | None = None

    @property
    def socket(self) -> Path:
        return self.paths.api_socket

    def start(self) -> None:
        _kill_stale(self.paths)   # a daemon left by a replica that was killed outright
        self.paths.ensure()
        src = str(Path(llmos.__file__).resolve().parent.parent)
        env = {**os.environ, "LLMOS_HOME": str(self.paths.home), "OMP_WAIT_POLICY": "PASSIVE",
               "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
        with open(self.paths.home / "llmosd.out", "ab") as out:
            # its own process group: stop() ends the kernel and its drivers together
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def health(self, timeout: float = 5.0) -> dict | None:
        """The daemon's /health answer, or None when nobody answers."""
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://llmos",
                              timeout=timeout) as c:
                return c.get("/health").json()
        except (httpx.HTTPError, ValueError):
            return None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.exited() is not None:
                raise DaemonFailed(f"llmosd exited with {self.proc.returncode}:\n{self.log_tail()}")
            last = self.health() if self.socket.exists() else None
            if last and last.get("status") == "ok":
                return
            time.sleep(0.25)
        raise DaemonFailed(f"llmosd not healthy after {timeout:g} s (last /health {last}):\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)   # it drains, then stops its drivers
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            _signal_group(self.proc.pid, signal.SIGKILL)   # a driver left behind, if any
            self.proc.wait()
        self._lock.close()

    def abandon(self) -> None:
        """End the daemon now and free the slot, so that the replica Ray starts in place of
        this failed one takes this same home (and resumes its batch jobs) instead of a new slot."""
        if self.proc is not None:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._lock.close()

    def log_tail(self, n: int = 40) -> str:
        f = self.paths.home / "llmosd.out"
        return "\n".join(f.read_text(errors="replace").splitlines()[-n:]) if f.exists() else ""

    def describe(self) -> dict:
        return {"slot": self.slot, "home": str(self.paths.home), "pid": self.proc.pid if self.proc else None}


def _take_slot(root: Path):
    for i in range(MAX_SLOTS):
        f = open(root / f"slot-{i}.lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        return i, f
    raise DaemonFailed(f"all {MAX_SLOTS} slots under {root} are taken")


def slot_in_use(home: Path) -> bool:
    """Whether a live replica holds this slot home (its lock file is locked)."""
    try:
        with open(home.parent / f"{home.name}.lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False   # closing releases it
    except BlockingIOError:
        return True


def _kill_stale(paths: Paths) -> None:
    try:
        pid = int(paths.pid_file.read_text().strip())
        cmd = psutil.Process(pid).cmdline()
    except (OSError, ValueError, psutil.Error):
        return
    if str(paths.home) in cmd:
        _signal_group(pid, signal.SIGKILL)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def health_ok(answer: dict | None) -> bool:
    return bool(answer) and answer.get("status") == "ok"


__all__ = ["DaemonFailed", "SlotDaemon", "health_ok", "slot_in_use"]
