"""`llmos start`'s wait for the daemon it spawned: progress while llmosd starts, and a failure
named as soon as it is known rather than at the timeout.

It polls /health and /llmos/v1/ps. Each model's loading and readiness is printed once, as it
changes. A driver that is `failed` (out of restarts, or it died before its first Ready: a
model that cannot load) or a kernel loop that ended is fatal: its name and last error are
printed, and the daemon is stopped, so that a failed `llmos start` leaves nothing behind,
as a daemon that refuses its options at once does.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import click

from llmos.client import Client, DaemonNotRunning, LlmosError, ServerError
from llmos.paths import Paths

POLL_S = 0.25
MODEL_STATES = {"loading": "loading weights", "ready": "ready"}   # HealthReport.models values


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def snapshot(paths: Paths) -> tuple[dict, dict] | None:
    """(health, ps) of the daemon on the socket; None while it does not answer yet."""
    try:
        with Client(paths.home, timeout=5) as c:
            try:
                health = c.health()
            except ServerError as exc:   # 503 with the report while starting or degraded
                if not (exc.status == 503 and isinstance(exc.body, dict) and "status" in exc.body):
                    raise
                health = exc.body
            return health, c.ps()
    except (DaemonNotRunning, LlmosError):   # no socket yet, or the kernel is still coming up
        return None


def failures(health: dict, ps: dict) -> list[str]:
    """What makes this start fail, one line each: failed drivers with their last error,
    kernel loops that ended."""
    lines = [f"driver {p['name']} failed: {p.get('last_error') or 'no error recorded'}"
             for p in ps.get("processes", []) if p.get("state") == "failed"]
    named = {p["name"] for p in ps.get("processes", []) if p.get("state") == "failed"}
    lines += [f"driver {name} failed" for name in health.get("failed_drivers") or [] if name not in named]
    lines += [f"kernel loop {loop!r} ended: {why}" for loop, why in (health.get("dead_loops") or {}).items()]
    return lines


def wait_started(paths: Paths, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Print progress until llmosd is healthy; raise click.ClickException, naming the cause,
    when it exits, a driver fails, or `timeout` s pass (then it keeps running)."""
    click.echo(f"starting llmosd (pid {proc.pid}); log {log_path}")
    shown: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"llmosd exited with code {proc.returncode} while starting; "
                                       f"last lines of {log_path}:\n{log_tail(log_path)}")
        snap = snapshot(paths)
        if snap is not None:
            health, ps = snap
            for model, state in sorted((health.get("models") or {}).items()):
                if shown.get(model) != state:
                    shown[model] = state
                    click.echo(f"model {model}: {MODEL_STATES.get(state, state)}")
            bad = failures(health, ps)
            if bad:
                stopped = _stop(proc)
                logs = ", ".join(str(paths.logs_dir / f"{p['name']}.log") for p in ps.get("processes", [])
                                 if p.get("state") == "failed")
                raise click.ClickException("llmosd did not start: " + "; ".join(bad) + "\n"
                                           + f"{stopped}; logs: {logs or log_path}")
            if health.get("status") == "ok":
                click.echo(f"llmosd started (pid {proc.pid}); socket {paths.api_socket}; log {log_path}")
                return
        time.sleep(POLL_S)
    raise click.ClickException(f"llmosd (pid {proc.pid}) is not healthy after {timeout:g} s; it keeps "
                               f"running; see {log_path} or run `llmos stop`")


def _stop(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """SIGTERM (it drains and stops its drivers), SIGKILL if it does not exit in time."""
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
        return f"stopped llmosd (pid {proc.pid})"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return f"killed llmosd (pid {proc.pid}): it did not stop within {timeout:g} s"
    except ProcessLookupError:
        return f"llmosd (pid {proc.pid}) had already exited"


def not_applied(pid: int | None, args: list[str]) -> click.ClickException:
    """Options given to `llmos start` while a daemon runs: say plainly they were not applied."""
    where = f" (pid {pid})" if pid else ""
    return click.ClickException(
        f"llmosd is already running{where}; these options were NOT applied: {shlex.join(args)}\n"
        f"to start it with them: `llmos stop`, then `llmos start {shlex.join(args)}`")
