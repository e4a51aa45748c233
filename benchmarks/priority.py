"""Priority scheduling under load, FCFS against the priority scheduler in one run.

    python benchmarks/priority.py                       # tiny random model: minutes
    python benchmarks/priority.py --model smollm2 --batch-tokens 128

Workload: a saturating batch-class load (--batch-requests long requests) and, once it
runs, a stream of interactive requests. Reports interactive time-to-first-token p50/p95
against the same stream on an idle daemon, and batch throughput, for each scheduler.
Then two tenants with weights 1:3 saturate the daemon; reports the ratio of tokens each
received while both had a backlog.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from daemon_harness import Daemon, bench_model_dir  # noqa: E402


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def ttft(client, model, prompt, max_tokens, **extra) -> tuple[float, int]:
    t0 = time.perf_counter()
    first, n = None, 0
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if first is None and chunk.get("choices") and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - t0
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
    return first, n


async def interactive_stream(client, model, count, gap) -> list[float]:
    out = []
    for i in range(count):
        first, _ = await ttft(client, model, f"Quick question {i}:", 8, priority="interactive")
        out.append(first)
        await asyncio.sleep(gap)
    return out


async def scenario(sock, model, args) -> dict:
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    async with httpx.AsyncClient(transport=transport, base_url="http://llmos", timeout=3600) as client:
        idle = await interactive_stream(client, model, args.interactive, args.gap)
        t0 = time.perf_counter()
        batch = [asyncio.ensure_future(ttft(client, model, f"Batch document {i}: summarise", args.batch_tokens,
                                            priority="batch")) for i in range(args.batch_requests)]
        await asyncio.sleep(1.0)
        loaded = await interactive_stream(client, model, args.interactive, args.gap)
        done = await asyncio.gather(*batch)
        wall = time.perf_counter() - t0
    return {"idle": idle, "loaded": loaded, "batch_tok_s": sum(n for _, n in done) / wall}


async def tenants(sock, model, args) -> dict:
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    async with httpx.AsyncClient(transport=transport, base_url="http://llmos", timeout=3600) as client:
        # Many short requests per tenant: shares are decided each time a batch slot frees up.
        jobs = [asyncio.ensure_future(ttft(client, model, f"Tenant {t} request {i}", args.tenant_tokens, tenant=t))
                for i in range(args.tenant_requests) for t in ("light", "heavy")]
        # Skip the first window (the batch fills in arrival order), count the second.
        await asyncio.sleep(args.tenant_window)
        before = (await client.get("/llmos/v1/ps")).json()["scheduler"][model]["tenants"]
        await asyncio.sleep(args.tenant_window)   # both tenants still have a backlog here
        after = (await client.get("/llmos/v1/ps")).json()["scheduler"][model]["tenants"]
        for j in jobs:
            j.cancel()
    return {t: after[t]["served_tokens"] - before[t]["served_tokens"] for t in ("light", "heavy")}


def run(model_dir, extra, fn, args):
    d = Daemon(Path(tempfile.mkdtemp(prefix="llmos-prio-")), [f"m={model_dir}"], "--max-num-seqs",
               str(args.max_num_seqs), "--max-model-len", "2048", *extra)
    d.wait_ready(600)
    try:
        return asyncio.run(fn(d.socket, "m", args))
    finally:
        d.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch-requests", type=int, default=64)
    ap.add_argument("--batch-tokens", type=int, default=512)
    ap.add_argument("--interactive", type=int, default=10)
    ap.add_argument("--gap", type=float, default=0.3)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--tenant-window", type=float, default=12.0)
    ap.add_argument("--tenant-requests", type=int, default=80, help="per tenant (more than the run serves)")
    ap.add_argument("--tenant-tokens", type=int, default=128)
    args = ap.parse_args()
    model_dir = bench_model_dir(args.model)
    print(f"model {args.model}; {args.batch_requests} batch requests x {args.batch_tokens} tokens, "
          f"max {args.max_num_seqs} running; {args.interactive} interactive requests")
    for sched in ("fcfs", "priority"):
        r = run(model_dir, ["--scheduler", sched], scenario, args)
        print(f"{sched:8s}: interactive TTFT idle p50 {pct(r['idle'], 50) * 1e3:.0f} ms p95 "
              f"{pct(r['idle'], 95) * 1e3:.0f} ms | under batch load p50 {pct(r['loaded'], 50) * 1e3:.0f} ms "
              f"p95 {pct(r['loaded'], 95) * 1e3:.0f} ms | batch throughput {r['batch_tok_s']:.0f} tok/s")
    served = run(model_dir, ["--tenant", "light:weight=1", "--tenant", "heavy:weight=3"], tenants, args)
    print(f"tenants 1:3, tokens served in the second {args.tenant_window:.0f}s of saturation: light {served['light']} tokens, heavy "
          f"{served['heavy']} tokens, ratio {served['heavy'] / max(1, served['light']):.2f}")


if __name__ == "__main__":
    main()
