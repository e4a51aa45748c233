"""Where llmos keeps its state: $LLMOS_HOME (default ~/.llmos).

run/ holds the API socket, the bus endpoints and the pid file (mode 0700);
models/ holds converted model directories; logs/ the daemon and driver logs;
jobs.db the durable batch jobs (SQLite, WAL).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    home: Path

    @classmethod
    def from_env(cls, home: str | os.PathLike | None = None) -> "Paths":
        root = home or os.environ.get("LLMOS_HOME") or Path.home() / ".llmos"
        return cls(Path(root).expanduser().resolve())

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def api_socket(self) -> Path:
        return self.run_dir / "llmos.sock"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "llmosd.pid"

    @property
    def kernel_endpoint(self) -> str:
        return f"ipc://{self.run_dir / 'kernel.bus'}"

    @property
    def jobs_db(self) -> Path:
        return self.home / "jobs.db"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def models_dir(self) -> Path:
        # Converted models are large and reusable across daemons; tests share one cache.
        override = os.environ.get("LLMOS_MODEL_CACHE")
        return Path(override) if override else self.home / "models"

    def ensure(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.run_dir.stat().st_mode & 0o067:   # private, or traverse-only for --socket-group (0710)
            os.chmod(self.run_dir, 0o700)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
