"""GET /metrics latency (issue 15): 1,000 scrapes on an idle daemon, then 1,000 while 32 streams run.

    python benchmarks/metrics_scrape.py                  # the tiny model (fast steps: the busiest kernel loop)
    python benchmarks/metrics_scrape.py --model smollm2 --dtype bfloat16

The 32 streams (benchmarks/prompts.json as chats, greedy, --max-tokens each with EOS ignored,
restarted as each ends so that 32 stay in flight) run in a child process; the scrapes run one
after another from this one, over the API socket, each on a kept-alive connection, as a router
polling every 50 ms would, only back to back. Prints p50/p99/max of the scrape's wall time and
how old the figures it served were (now minus llmos_metrics_snapshot_timestamp_seconds), and the
kernel's cost of one snapshot with --table requests in its table (in-process, the real FrontDoor
and engine), next to the CPU model.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
import loadgen  # noqa: E402
from daemon_harness import Daemon, bench_model_dir, cpu_model  # noqa: E402
from llmos.kernel.metrics import MIN_INTERVAL_S  # noqa: E402


def load(sock: str, model: str, prompts: list[str], max_tokens: int, stop) -> None:
    """Keep len(prompts) streams in flight until `stop` is set (a child process)."""
    async def one(client, prompt):
        while not stop.is_set():
            await loadgen.stream_one(client, loadgen.chat_body(model, prompt, max_tokens))

    async def main():
        async with loadgen.client_for("http://llmos", uds=sock) as client:
            await asyncio.gather(*(one(client, p) for p in prompts))
    asyncio.run(main())


def scrapes(c: httpx.Client, n: int) -> tuple[list[float], list[float]]:
    """n scrapes: (wall time of each, age of the figures each served), in seconds."""
    walls, ages = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        r = c.get("/metrics")
        walls.append(time.perf_counter() - t0)
        r.raise_for_status()
        for line in r.text.splitlines():
            if line.startswith("llmos_metrics_snapshot_timestamp_seconds "):
                ages.append(time.time() - float(line.split()[1]))
    return walls, ages


def report(label: str, walls: list[float], ages: list[float]) -> None:
    ms = lambda xs, q: 1e3 * loadgen.pct(xs, q)  # noqa: E731
    print(f"{label:>26}: scrape p50 {ms(walls, 50):6.2f} ms  p99 {ms(walls, 99):6.2f} ms  max {ms(walls, 100):7.2f} ms"
          f"   figures' age p50 {ms(ages, 50):6.1f} ms  p99 {ms(ages, 99):6.1f} ms")


def snapshot_cost(table: int, repeat: int = 200) -> float:
    """Seconds per Metrics.snapshot() with `table` waiting requests (the real FrontDoor and engine)."""
    from llmos import protocol
    from test_metrics import Kernel
    k = Kernel()
    try:
        for i in range(table):
            k.admit(f"r{i}", [1 + i % 500, 2, 3], tenant=f"t{i % 8}", max_tokens=4)
        t0 = time.perf_counter()
        for _ in range(repeat):
            protocol.encode(protocol.QueryReply(query_id="q", metrics=k.metrics.snapshot()))
        return (time.perf_counter() - t0) / repeat
    finally:
        k.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--scrapes", type=int, default=1000)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--table", type=int, default=1000)
    args = ap.parse_args()
    prompts = (json.loads((HERE / "prompts.json").read_text()) * 8)[:args.streams]
    model_dir = bench_model_dir(args.model)
    print(f"GET /metrics, {args.model} {args.dtype}, {cpu_model()}")
    d = Daemon(Path(tempfile.mkdtemp(prefix="llmos-metrics-")), [f"m={model_dir}"], "--dtype", args.dtype)
    try:
        d.wait_ready(900)
        with d.http(timeout=30) as c:
            scrapes(c, 20)   # warm: connection, first snapshot
            report("idle", *scrapes(c, args.scrapes))
            stop = multiprocessing.Event()
            child = multiprocessing.Process(target=load, args=(str(d.socket), "m", prompts, args.max_tokens, stop))
            child.start()
            try:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:   # until (nearly) every stream is in the running batch
                    running = [ln for ln in c.get("/metrics").text.splitlines()
                               if ln.startswith("vllm:num_requests_running ")]
                    if running and float(running[0].split()[1]) >= 0.9 * args.streams:
                        break
                    time.sleep(0.05)
                report(f"{args.streams} streams running", *scrapes(c, args.scrapes))
            finally:
                stop.set()
                child.join(600)
    finally:
        d.stop()
    cost = snapshot_cost(args.table)
    print(f"{'kernel, one snapshot':>26}: {1e3 * cost:.2f} ms with {args.table} requests in the table "
          f"(built and encoded; at most one per {1e3 * MIN_INTERVAL_S:g} ms however many scrapers)")


if __name__ == "__main__":
    main()
