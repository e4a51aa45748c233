"""Two real llmosd daemons behind SGLang's model gateway (the `smg` package), for
tests/test_two_daemons.py and benchmarks/two_daemons.py.

Auth: smg forwards the client's Authorization header to the worker unchanged, so each
client keeps its own llmos key end to end and every daemon enforces it (tenant, models,
priority). smg itself needs a key of its own to discover a worker's model (GET /v1/models
over TCP needs one): its --api-key, here an llmos key of tenant "gateway". With --api-key
set, smg also admits only known keys, so the client's key is given to it too
(--tenant-api-key). Both daemons hold the same keys: keys.db stores only SHA-256 digests,
so one copy made on the first node is copied to the second.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from daemon_harness import Daemon
from llmos.kernel.auth import KeyStore

# smg's regular mode names a worker by the first model GET /v1/models lists, and llmos lists
# them in name order with the built-in smollm2 always among them: a served name that sorts
# after "smollm2" would leave the worker under the wrong model. Hence this name.
MODEL = "llama-tiny"
WORKER_HEADER = "x-smg-routed-worker-id"   # smg stamps each answer with the worker that served it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pair:
    """Daemons a and b, each with its own home and TCP listener, sharing one key table."""

    def __init__(self, root: Path, model_dir: Path, *extra: str):
        root = Path(root)
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
        store = KeyStore(root / "a" / "keys.db")
        self.gateway_key = store.create("gateway", [MODEL], "interactive", note="smg discovery")[0]
        self.client_key = store.create("alice", [MODEL], "interactive", note="a client")[0]
        shutil.copy(root / "a" / "keys.db", root / "b" / "keys.db")   # digests only
        self.ports = {"a": free_port(), "b": free_port()}
        self.daemons = {n: Daemon(root / n, [f"{MODEL}={model_dir}"], "--listen", f"127.0.0.1:{p}", *extra)
                        for n, p in self.ports.items()}
        self.urls = {n: f"http://127.0.0.1:{p}" for n, p in self.ports.items()}
        self.dead: set[str] = set()

    def wait_ready(self) -> "Pair":
        for d in self.daemons.values():
            d.wait_ready()
        return self

    def name_of(self, worker_url: str | None) -> str | None:
        return next((n for n, u in self.urls.items() if u == worker_url), None)

    def prefix_counts(self) -> dict[str, tuple[int, int]]:
        """Each live daemon's prefix cache so far: (hit_tokens, queried_tokens)."""
        out = {}
        for n, d in self.daemons.items():
            if n not in self.dead:
                pc = d.memory(MODEL)["prefix_cache"]
                out[n] = (pc["hit_tokens"], pc["queried_tokens"])
        return out

    def kill(self, name: str) -> None:
        """SIGKILL a daemon's kernel and its drivers, as a node that dies would."""
        d = self.daemons[name]
        pids = [p["pid"] for p in d.ps()["processes"] if p.get("pid")]
        for pid in [d.proc.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        d.proc.wait(30)
        self.dead.add(name)

    def stop(self) -> None:
        for n, d in self.daemons.items():
            d.stop()


class Router:
    """`smg launch` in front of the pair, with one routing policy."""

    def __init__(self, pair: Pair, policy: str, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.pair = pair
        argv = [sys.executable, "-m", "smg", "launch", "--worker-urls", *pair.urls.values(),
                "--policy", policy, "--host", "127.0.0.1", "--port", str(self.port),
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
                "--disable-tokenizer-autoload",           # route on the prompt text; llmos tokenizes
                "--api-key", pair.gateway_key, "--tenant-api-key", f"alice:{pair.client_key}",
                "--health-check-interval-secs", "1", "--health-failure-threshold", "2"]
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)

    def workers(self) -> list[dict]:
        r = httpx.get(f"{self.url}/workers", headers={"Authorization": f"Bearer {self.pair.gateway_key}"},
                      timeout=10)
        r.raise_for_status()
        return r.json()["workers"]

    def healthy(self) -> set[str]:
        """The daemons smg would route to now."""
        return {self.pair.name_of(w["url"]) for w in self.workers()
                if w.get("is_healthy") and w.get("model_id") == MODEL}

    def wait_healthy(self, names: set[str], timeout: float = 180.0) -> None:
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smg exited with {self.proc.returncode}")
            try:
                last = self.healthy()
                if last == names:
                    return
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.5)
        raise TimeoutError(f"smg never saw exactly {sorted(names)} healthy (last: {last})")

    def complete(self, prompt: str, max_tokens: int = 2, timeout: float = 120.0) -> httpx.Response:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        return httpx.post(f"{self.url}/v1/completions", json=body, timeout=timeout,
                          headers={"Authorization": f"Bearer {self.pair.client_key}"})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


WORDS = ("river stone lamp orbit cedar violet engine harbor maple quartz signal meadow copper lantern "
         "falcon prism willow ember glacier velvet summit canyon thistle beacon marble cobalt harvest "
         "juniper tundra saffron").split()


def prefix_groups(groups: int, per_group: int, words: int = 200, seed: int = 0) -> list[tuple[int, str]]:
    """(group, prompt) in rounds: each round has one prompt of every group, in a shuffled
    order (a fixed order would let round_robin pin each group by accident). A group's
    prompts share a distinct prefix of `words` words (about one token each) and differ in a
    short question at the end."""
    rng = random.Random(seed)
    prefixes = [f"Document {seed}-{g}: " + " ".join(rng.choice(WORDS) for _ in range(words)) for g in range(groups)]
    out = []
    for i in range(per_group):
        order = list(range(groups))
        rng.shuffle(order)
        out += [(g, f"{prefixes[g]}\nQuestion {i}: what is item {rng.randrange(10**6)}?") for g in order]
    return out


def run_phase(router: Router, prompts: list[tuple[int, str]]) -> dict:
    """Send each prompt in order (one at a time, so each request finds the one before it
    cached); return where each went and the prefix-cache hit rate of this phase alone."""
    before = router.pair.prefix_counts()
    served: list[tuple[int, str | None]] = []
    for g, prompt in prompts:
        r = router.complete(prompt)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code} through smg: {r.text[:300]}")
        served.append((g, router.pair.name_of(r.headers.get(WORKER_HEADER))))
    after = router.pair.prefix_counts()
    hits = sum(after[n][0] - before[n][0] for n in after)
    queried = sum(after[n][1] - before[n][1] for n in after)
    by_group: dict[int, list] = {}
    for g, name in served:
        by_group.setdefault(g, []).append(name)
    # affinity: the share of a group's requests that went to that group's busiest daemon
    affinity = sum(max(v.count(n) for n in set(v)) for v in by_group.values()) / len(served)
    return {"served": served, "hit_tokens": hits, "queried_tokens": queried,
            "hit_rate": hits / queried if queried else 0.0, "affinity": affinity,
            "per_daemon": {n: sum(1 for _, x in served if x == n) for n in router.pair.urls}}
