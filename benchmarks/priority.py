"""Priority scheduling under load, FCFS against the priority scheduler in one run.

    python benchmarks/priority.py                       # tiny random model: minutes
    python benchmarks/priority.py --model smollm2 --batch-tokens 128
    python benchmarks/priority.py --scenarios tenants   # only the tenant shares

Scenario `priority`: a saturating batch-class load (--batch-requests long requests) and,
once it runs, a stream of interactive requests. Reports interactive time-to-first-token
p50/p95 against the same stream on an idle daemon, and batch throughput, for each
scheduler.

Scenario `tenants`: two tenants with weights 1:3 saturate the daemon. Each is a closed
loop of --tenant-streams streams (each alone fills every batch slot), one request after
another. `light` (weight 1) starts first and fills the batch alone; `heavy` (weight 3)
joins --tenant-head-start seconds later, the unfair start that only fairness preemption
corrects before requests finish. After --tenant-warmup seconds, counts for
--tenant-window seconds the tokens each tenant's clients received (stream chunks: one per
token, except that a token whose text the detokenizer holds back, a partial character,
arrives with the next; per-token logprobs would count exactly but cost the tiny model 4x
its throughput), and the tokens the kernel served each tenant (/llmos/v1/ps, prompt and
recomputed tokens included); samples the running requests per tenant; reports the ratios.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
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


async def closed_loop(client, model, tenant, args, window, received, stop) -> None:
    """One client of `tenant`: a request, then the next, until `stop`; counts the stream
    chunks with text received inside `window` (perf_counter start, end) into received[tenant]."""
    body = {"model": model, "max_tokens": args.tenant_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "tenant": tenant}
    i = 0
    while not stop.is_set():
        i += 1
        async with client.stream("POST", "/v1/completions", json={**body, "prompt": f"{tenant} request {i}"}) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if stop.is_set():
                    return          # closing the stream aborts the request
                if line.startswith("data: {"):
                    now = time.perf_counter()
                    if window[0] <= now < window[1]:
                        received[tenant] += sum(1 for c in json.loads(line[6:]).get("choices") or [] if c["text"])


async def tenants(sock, model, args) -> dict:
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    async with httpx.AsyncClient(transport=transport, base_url="http://llmos", timeout=3600) as client:
        received, stop = Counter(), asyncio.Event()
        window = [float("inf"), float("inf")]

        def start(tenant):
            return [asyncio.ensure_future(closed_loop(client, model, tenant, args, window, received, stop))
                    for _ in range(args.tenant_streams)]

        async def snapshot():
            ps = (await client.get("/llmos/v1/ps")).json()
            s = ps["scheduler"][model]
            if "tenants" not in s:   # FCFS keeps no tenant books: count the request table
                running = Counter(r["tenant"] for r in ps["requests"] if r["state"] == "running")
                return ({t: running[t] for t in ("light", "heavy")}, Counter()), {}
            count = {k: {t: s["tenants"].get(t, {}).get(k, 0) for t in ("light", "heavy")}
                     for k in ("running", "served_tokens")}
            return (count["running"], count["served_tokens"]), s["preemptions"]

        clients = start("light")
        await asyncio.sleep(args.tenant_head_start)
        (head_start, _), _ = await snapshot()
        joined = time.perf_counter()
        clients += start("heavy")
        window[:] = [joined + args.tenant_warmup, joined + args.tenant_warmup + args.tenant_window]
        samples, converged, served = [], None, []
        while time.perf_counter() < window[1]:
            await asyncio.sleep(0.5)
            (running, tokens), preemptions = await snapshot()
            now = time.perf_counter()
            if converged is None and running["heavy"] >= 3 * running["light"] > 0:
                converged = now - joined
            if window[0] <= now < window[1]:
                samples.append(running)
                served.append(tokens)
        stop.set()
        for c in clients:
            c.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    return {"received": received, "head_start": head_start, "converged_s": converged, "preemptions": preemptions,
            "served": {t: served[-1][t] - served[0][t] for t in ("light", "heavy")} if served and served[-1] else {},
            "running": {t: sum(s[t] for s in samples) / max(1, len(samples)) for t in ("light", "heavy")}}


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
    ap.add_argument("--scenarios", default="priority,tenants", help="comma-separated: priority, tenants")
    ap.add_argument("--batch-requests", type=int, default=64)
    ap.add_argument("--batch-tokens", type=int, default=512)
    ap.add_argument("--interactive", type=int, default=10)
    ap.add_argument("--gap", type=float, default=0.3)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--tenant-streams", type=int, default=16, help="concurrent clients per tenant")
    ap.add_argument("--tenant-tokens", type=int, default=512, help="tokens per tenant request")
    ap.add_argument("--tenant-head-start", type=float, default=2.0, help="seconds light runs alone")
    ap.add_argument("--tenant-warmup", type=float, default=5.0, help="seconds after heavy joins, not counted")
    ap.add_argument("--tenant-window", type=float, default=30.0, help="seconds counted")
    args = ap.parse_args()
    scenarios = set(args.scenarios.split(","))
    if not scenarios <= {"priority", "tenants"}:
        ap.error(f"unknown scenarios: {', '.join(sorted(scenarios - {'priority', 'tenants'}))}")
    model_dir = bench_model_dir(args.model)
    print(f"model {args.model}; max {args.max_num_seqs} running")
    if "priority" in scenarios:
        print(f"{args.batch_requests} batch requests x {args.batch_tokens} tokens; {args.interactive} interactive requests")
        for sched in ("fcfs", "priority"):
            r = run(model_dir, ["--scheduler", sched], scenario, args)
            print(f"{sched:8s}: interactive TTFT idle p50 {pct(r['idle'], 50) * 1e3:.0f} ms p95 "
                  f"{pct(r['idle'], 95) * 1e3:.0f} ms | under batch load p50 {pct(r['loaded'], 50) * 1e3:.0f} ms "
                  f"p95 {pct(r['loaded'], 95) * 1e3:.0f} ms | batch throughput {r['batch_tok_s']:.0f} tok/s")
    if "tenants" in scenarios:
        print(f"tenants light:heavy = 1:3, {args.tenant_streams} streams each x {args.tenant_tokens} tokens; "
              f"light alone for {args.tenant_head_start:.0f} s, then heavy joins; "
              f"{args.tenant_window:.0f} s window from {args.tenant_warmup:.0f} s after heavy joined")
        for sched in ("fcfs", "priority"):
            r = run(model_dir, ["--scheduler", sched, "--tenant", "light:weight=1", "--tenant", "heavy:weight=3"],
                    tenants, args)
            got, sv = r["received"], r["served"]
            conv = "never" if r["converged_s"] is None else f"{r['converged_s']:.1f} s after heavy joined"
            print(f"{sched:8s}: received light {got['light']} tokens, heavy {got['heavy']} tokens, "
                  f"ratio {got['heavy'] / max(1, got['light']):.2f} | mean running "
                  f"{r['running']['light']:.1f}:{r['running']['heavy']:.1f} (at the join "
                  f"{r['head_start']['light']}:{r['head_start']['heavy']}; 1:3 reached {conv})")
            if sv:
                print(f"          served by the kernel (prompt and recompute included): light {sv['light']}, "
                      f"heavy {sv['heavy']}, ratio {sv['heavy'] / max(1, sv['light']):.2f}; "
                      f"preemptions {r['preemptions']}")


if __name__ == "__main__":
    main()
