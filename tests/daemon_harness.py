"""Start a real llmosd (kernel + driver processes) for end-to-end tests."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Shared:
    """Which shared daemon: models as `name=fixture` (the fixture gives the model's directory),
    then flags, exactly as Daemon takes them. Equal specs are one daemon."""
    models: tuple[str, ...]
    flags: tuple[str, ...] = ()

    def __init__(self, models, *flags: str):
        object.__setattr__(self, "models", tuple(models))
        object.__setattr__(self, "flags", flags)


TINY = Shared(["tiny=tiny_llama_dir"])          # conftest's tiny_daemon (the model's own 2048-token context)
SMOLLM2 = Shared(["smollm2=smollm2_dir"])       # conftest's smollm2_daemon


class Leased:
    """A shared daemon as one user sees it: everything of the Daemon but stop(), and
    attributes the user sets stay its own."""

    def __init__(self, daemon: Daemon):
        self.__dict__["_daemon"] = daemon

    def __getattr__(self, name):
        return getattr(self._daemon, name)

    def stop(self, timeout: float = 30.0):
        raise RuntimeError("a shared daemon is stopped by its pool, not by a test")


class SharedDaemons:
    """Daemons that tests share, one per Shared spec: started on first use, stopped once no
    test still to run uses it (`needed`, counted by conftest.py), else at session end.
    Only for tests that leave a daemon as they found it:
    no kills, restarts, reloads or config changes, and figures read as deltas, never as
    absolute counts. Each lease checks on its return that this held (the same driver
    processes, nothing in flight, no KV block in use, no job running); a daemon that fails
    the check fails that user and is not shared again."""

    def __init__(self, root: Path, needed: Counter):
        self.root, self.needed = Path(root), needed
        self.daemons: dict[Shared, Daemon] = {}
        self.leases: Counter = Counter()
        self.started = 0

    @contextlib.contextmanager
    def lease(self, request, spec: Shared):
        d = self.daemons.get(spec) or self.start(request, spec)
        before = processes(d)
        self.leases[spec] += 1
        returned = False
        try:
            yield Leased(d)
            returned = True
        finally:
            self.leases[spec] -= 1
            changed = left_changed(d, before)
            if changed:
                self.drop(spec)
            self.stop_unneeded()
            if changed and returned:
                raise AssertionError(f"a user of the shared daemon {spec} left it changed: {changed}")

    def start(self, request, spec: Shared) -> Daemon:
        models = [f"{name}={request.getfixturevalue(fixture)}"
                  for name, fixture in (m.split("=", 1) for m in spec.models)]
        self.started += 1
        d = Daemon(self.root / f"shared{self.started}", models, *spec.flags)
        try:
            d.wait_ready()
        except BaseException:
            d.stop()
            raise
        self.daemons[spec] = d
        return d

    def stop_unneeded(self) -> None:
        for spec in [s for s in self.daemons if self.needed[s] <= 0 and not self.leases[s]]:
            self.drop(spec)

    def drop(self, spec: Shared) -> None:
        self.daemons.pop(spec).stop()

    def close(self) -> None:
        for spec in list(self.daemons):
            self.drop(spec)


def processes(d: Daemon) -> dict:
    """name -> (pid, restarts) of the kernel's process table."""
    return {p["name"]: (p["pid"], p["restarts"]) for p in d.ps()["processes"]}


def left_changed(d: Daemon, before: dict) -> str | None:
    """Why d is not as it was when `before` was taken (None: it is), once its last requests end."""
    try:
        wait_for(lambda: not idle_problems(d), 60, "")
        now = processes(d)
    except TimeoutError:
        return "; ".join(idle_problems(d))
    except Exception as exc:   # it does not answer
        return repr(exc)
    return None if now == before else f"driver processes changed: {before} -> {now}"


def idle_problems(d: Daemon) -> list[str]:
    """What keeps a daemon from being as a fresh one would be between tests (empty: nothing)."""
    if d.proc.poll() is not None:
        return [f"llmosd exited with {d.proc.returncode}"]
    with d.http(timeout=30) as c:
        ps, memory = c.get("/llmos/v1/ps").json(), c.get("/llmos/v1/memory").json()
        jobs = c.get("/llmos/v1/jobs", params={"limit": 100}).json()["data"]
    problems = [f"requests in flight: {[r['id'] for r in ps['requests']]}"] if ps["requests"] else []
    problems += [f"{name}: {m and {k: m[k] for k in ('blocks_used', 'integrity')}}" for name, m in memory.items()
                 if m is None or m["blocks_used"] or m["integrity"] != "ok"]
    problems += [f"job {j['id']} {j['status']}" for j in jobs if j["status"] not in ("completed", "failed",
                                                                                      "cancelled", "expired")]
    return problems


def stream_text(daemon: Daemon, model: str, prompt: str, max_tokens: int,
                first_chunk: threading.Event | None = None) -> str:
    """Greedy streamed completion of exactly max_tokens tokens; returns the concatenated text."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    text = ""
    with daemon.http(timeout=300) as c, c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            text += chunk["choices"][0]["text"]
            if first_chunk is not None:
                first_chunk.set()
    return text


def wait_for(cond, timeout: float = 60.0, what: str = "condition", interval: float = 0.1):
    """Poll cond() until it is truthy and return that value; TimeoutError(what) after `timeout`
    seconds. Every wait in the end-to-end tests goes through here: no test sleeps, then asserts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(interval)
    raise TimeoutError(what)


def at_once(n: int, work, during=None) -> list:
    """Run work(i, started) for i in range(n), each in its own thread; `work` sets `started`
    once its stream produces output. Call `during()` once all have started. Returns each
    one's result, or the exception that ended it (the caller decides what a failure means)."""
    results: list = [None] * n
    started = [threading.Event() for _ in range(n)]

    def worker(i):
        try:
            results[i] = work(i, started[i])
        except Exception as exc:
            results[i] = exc
            started[i].set()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    if during:
        for e in started:
            e.wait(120)
        during()
    for t in threads:
        t.join(300)
    return results


def stream_many(daemon: Daemon, model: str, prompts: list[str], max_tokens: int, during=None) -> list:
    """Stream every prompt at once; call `during()` once all streams produce text.
    Returns each stream's text, or the exception that ended it."""
    return at_once(len(prompts), lambda i, started: stream_text(daemon, model, prompts[i], max_tokens, started),
                   during)


def bench_model_dir(model: str) -> Path:
    """A local model directory for benchmarks: 'tiny' (random 2-layer Llama, made once) or a
    registry spec such as smollm2 (converted once)."""
    from llmos.models.registry import prepare_model_dir
    from llmos.paths import Paths
    cache = Paths.from_env().models_dir
    if model != "tiny":
        return prepare_model_dir(model, cache)
    from llmos.models.tiny import make_tiny_model
    out = cache / "tiny-llama"
    if not (out / "config.json").exists():
        make_tiny_model("llama", out, prepare_model_dir("smollm2", cache))
    return out


@contextlib.contextmanager
def serving(home: Path, models: list[str], *extra: str):
    """A ready daemon for the duration of the block; stopped (SIGTERM) afterwards."""
    d = Daemon(home, models, *extra)
    try:
        yield d.wait_ready()
    finally:
        d.stop()


def cpu_model() -> str:
    """The CPU's model name, printed next to every benchmark figure."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"
