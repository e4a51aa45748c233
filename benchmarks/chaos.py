"""Chaos: kill each driver kind at a random moment under load; count what survives.

    python benchmarks/chaos.py                      # tiny random model (fast)
    python benchmarks/chaos.py --model smollm2 --max-tokens 64

For each kind (model, tokenizer, io) it streams --concurrency greedy requests, kills
the driver with SIGKILL after a random delay, and prints: requests completed /
submitted, outputs identical to the fault-free run, recovery time and recomputed
tokens (model driver), and how the io driver's clients ended (closed, never hung).
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from daemon_harness import Daemon, bench_model_dir, stream_many  # noqa: E402


def pid_of(daemon: Daemon, name: str) -> int:
    return next(p["pid"] for p in daemon.ps()["processes"] if p["name"] == name)


def wait_running(daemon: Daemon, name: str, old_pid: int, timeout: float = 120) -> float:
    """Seconds until a new incarnation of the driver (another pid) is running."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if any(p["name"] == name and p["state"] == "running" and p["pid"] not in (None, old_pid)
                   for p in daemon.ps()["processes"]):
                return time.monotonic() - t0
        except Exception:  # the io driver itself may be restarting
            pass
        time.sleep(0.05)
    raise TimeoutError(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (random tiny llama) or a registry spec like smollm2")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    model_dir = bench_model_dir(args.model)
    name = "m"
    prompts = [f"Chaos request {i}: tell me a story about" for i in range(args.concurrency)]
    daemon = Daemon(Path(tempfile.mkdtemp(prefix="llmos-chaos-")), [f"{name}={model_dir}"],
                    "--max-model-len", str(max(512, args.max_tokens + 64)))
    daemon.wait_ready(600)
    try:
        t0 = time.monotonic()
        reference = stream_many(daemon, name, prompts, args.max_tokens)
        clean_s = time.monotonic() - t0
        print(f"fault-free run: {args.concurrency} requests x {args.max_tokens} tokens in {clean_s:.1f}s")
        for kind, driver in (("model", f"model-{name}"), ("tokenizer", f"tokenizer-{name}"), ("io", "io")):
            delay = rng.uniform(0.1, 0.6) * clean_s
            info = {}

            def kill():
                time.sleep(delay)
                info["pid"] = pid_of(daemon, driver)
                os.kill(info["pid"], signal.SIGKILL)
                info["killed_at"] = time.monotonic()
                info["restart_s"] = wait_running(daemon, driver, info["pid"])
            results = stream_many(daemon, name, prompts, args.max_tokens, during=kill)
            done = [r for r in results if isinstance(r, str)]
            same = sum(1 for r, ref in zip(results, reference) if r == ref)
            line = (f"{kind:9s} killed after {delay:4.1f}s: completed {len(done)}/{len(prompts)}, "
                    f"identical to fault-free {same}/{len(prompts)}, driver back in {info['restart_s']:.2f}s")
            if kind == "model":
                rec = daemon.memory(name)["recoveries"][-1]
                line += f", generation resumed {rec['recovery_s']:.2f}s after the kill, " \
                        f"recomputed tokens {rec['recomputed_tokens']}"
            if kind == "io":
                line += f", clients cut (closed, not hung): {len(prompts) - len(done)}"
            print(line)
            mem = daemon.memory(name)
            print(f"          pool after: {mem['blocks_used']} blocks used, integrity {mem['integrity']}")
    finally:
        daemon.stop()


if __name__ == "__main__":
    main()
