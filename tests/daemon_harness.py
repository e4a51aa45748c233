"""Start a real llmosd (kernel + driver processes) for end-to-end tests."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


class Daemon:
    def __init__(self, home: Path, models: list[str], *extra: str, env: dict | None = None):
        self.home = Path(home)
        self.socket = self.home / "run" / "llmos.sock"
        argv = [sys.executable, "-m", "llmos.cli.daemon", "--home", str(self.home), "--kv-memory", "64MiB"]
        for m in models:
            argv += ["--model", m]
        self.home.mkdir(parents=True, exist_ok=True)
        self.log = open(self.home / "llmosd.out", "wb")
        self.proc = subprocess.Popen([*argv, *extra], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def http(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://llmos",
                            timeout=timeout)

    def wait_ready(self, timeout: float = 240.0) -> "Daemon":
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llmosd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.socket.exists():
                try:
                    with self.http(timeout=5) as c:
                        last = c.get("/health").json()
                    if last.get("status") == "ok":
                        return self
                except (httpx.HTTPError, json.JSONDecodeError):
                    pass
            time.sleep(0.2)
        raise TimeoutError(f"llmosd not ready after {timeout}s (last health {last}):\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        text = ""
        for f in sorted((self.home / "logs").glob("*.log")) + [self.home / "llmosd.out"]:
            if f.exists():
                lines = f.read_text(errors="replace").splitlines()[-n:]
                text += f"--- {f.name}\n" + "\n".join(lines) + "\n"
        return text

    def memory(self, model: str) -> dict:
        with self.http() as c:
            return c.get("/llmos/v1/memory").json()[model]

    def ps(self) -> dict:
        with self.http() as c:
            return c.get("/llmos/v1/ps").json()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
