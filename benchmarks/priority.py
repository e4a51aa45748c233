"""Priority scheduling under load, FCFS against the priority scheduler in one run.

    python benchmarks/priority.py                       # tiny random model: minutes
    python benchmarks/priority.py --model smollm2 --batch-tokens 128
    python benchmarks/priority.py --scenarios tenants   # only the tenant shares
    python benchmarks/priority.py --scenarios chunked   # only chunked prefill
    python benchmarks/priority.py --scenarios priority,tenants --charts   # + PNGs in docs/img

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

Scenario `chunked`: --chunked-streams greedy streams decode; once each has streamed for a
second, a --chunked-prompt-token prompt is admitted (token ids, so its length is exact; a
new random one each repeat, so the prefix cache holds none of it). One daemon per
per-step token budget of --chunked-budgets (the default pair: 256, which cuts the prompt
into chunks, and 4096, which prefills it in one step), all up at once and used in turn,
--chunked-repeats times each with fresh streams, so that a shared machine's load falls on
every budget alike. Reports the streams' inter-token latency p50/p99/max in the admission
window (the gaps between two tokens of a stream that overlap the time from the prompt's
submission to its first token) against their steady p50 (the second before), and the
long prompt's time to first token, loaded and on the idle daemon (p50 of 3). Tokens are
counted by `return_token_ids`, so a token whose text the detokenizer holds back counts.

--charts DIR writes PNGs (charts.py) of the first two: priority-ttft.png, TTFT p50/p95 by
class and scheduler, and tenant-shares.png, each tenant's received tokens/s over time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from daemon_harness import Daemon, bench_model_dir, cpu_model  # noqa: E402

CHARTS = HERE.parent / "docs" / "img"


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
    return {"idle": idle, "loaded": loaded, "batch_tok_s": sum(n for _, n in done) / wall,
            "batch_ttft": [f for f, _ in done if f is not None]}


async def closed_loop(client, model, tenant, args, events, stop) -> None:
    """One client of `tenant`: a request, then the next, until `stop`; appends (perf_counter,
    tenant, number of choices with text) to `events` for each stream chunk that has text."""
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
                if line.startswith("data: {") and (
                        n := sum(1 for c in json.loads(line[6:]).get("choices") or [] if c["text"])):
                    events.append((time.perf_counter(), tenant, n))


async def tenants(sock, model, args) -> dict:
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    async with httpx.AsyncClient(transport=transport, base_url="http://llmos", timeout=3600) as client:
        events, stop = [], asyncio.Event()

        def start(tenant):
            return [asyncio.ensure_future(closed_loop(client, model, tenant, args, events, stop))
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

        began, clients = time.perf_counter(), start("light")
        await asyncio.sleep(args.tenant_head_start)
        (head_start, _), _ = await snapshot()
        joined = time.perf_counter()
        clients += start("heavy")
        window = [joined + args.tenant_warmup, joined + args.tenant_warmup + args.tenant_window]
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
    received = Counter()
    for t, tenant, n in events:
        if window[0] <= t < window[1]:
            received[tenant] += n
    return {"received": received, "head_start": head_start,
            "timeline": {"events": events, "began": began, "joined": joined, "end": window[1]},
            "converged_s": converged, "preemptions": preemptions,
            "served": {t: served[-1][t] - served[0][t] for t in ("light", "heavy")} if served and served[-1] else {},
            "running": {t: sum(s[t] for s in samples) / max(1, len(samples)) for t in ("light", "heavy")}}


async def token_stream(client, model, prompt, max_tokens, arrivals: list, stop=None) -> None:
    """Greedy streamed completion; appends (perf_counter, number of tokens) per chunk to
    `arrivals`, until it ends or `stop` is set (closing the stream aborts the request)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if stop is not None and stop.is_set():
                return
            if line.startswith("data: {") and (n := len(json.loads(line[6:])["choices"][0].get("token_ids") or [])):
                arrivals.append((time.perf_counter(), n))


def gaps(arrivals, window=None) -> list[float]:
    """Inter-token latencies of one stream (a chunk of n tokens: its gap, then n - 1 zeros);
    with `window` (start, end), only the gaps that overlap it."""
    out = []
    for (t_prev, _), (t, n) in zip(arrivals, arrivals[1:]):
        if window is None or (t > window[0] and t_prev < window[1]):
            out += [t - t_prev] + [0.0] * (n - 1)
    return out


async def admission(client, model, prompt, args, out) -> None:
    """Fresh streams decode; once each has streamed for a second, `prompt` is admitted.
    Adds to `out` its time to first token and the streams' gaps, in the window and before."""
    arrivals, stop = [[] for _ in range(args.chunked_streams)], asyncio.Event()
    streams = [asyncio.ensure_future(token_stream(client, model, f"Story {i}: once upon a time", 1500, a, stop))
               for i, a in enumerate(arrivals)]
    while not all(arrivals):
        await asyncio.sleep(0.01)
    await asyncio.sleep(1.0)
    long, t0 = [], time.perf_counter()
    await token_stream(client, model, prompt, 1, long)
    t1 = long[0][0]
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*streams)
    assert all(a[-1][0] > t1 for a in arrivals), "a stream ended inside the admission window"
    out["ttft"].append(t1 - t0)
    out["window"] += [g for a in arrivals for g in gaps(a, (t0, t1))]
    out["steady"] += [g for a in arrivals for g in gaps([x for x in a if t0 - 1.0 < x[0] < t0])]


async def chunked(socks: dict, model, args) -> dict:
    """The same workload on one daemon per budget (`socks`: budget -> socket), alternating
    between them, so that the load of a shared machine falls on every budget alike."""
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.chunked_prompt)] for _ in range(args.chunked_repeats + 4)]
    clients = {b: httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(s)), base_url="http://llmos",
                                    timeout=3600) for b, s in socks.items()}
    out = {b: {"ttft": [], "steady": [], "window": []} for b in socks}
    try:
        for b, c in clients.items():
            await token_stream(c, model, prompts[-1], 1, [])     # warm-up
            out[b]["alone"] = []
            for prompt in prompts[-4:-1]:
                first, t = [], time.perf_counter()
                await token_stream(c, model, prompt, 1, first)
                out[b]["alone"].append(first[0][0] - t)
        for prompt in prompts[:args.chunked_repeats]:
            for b, c in clients.items():
                await admission(c, model, prompt, args, out[b])
                await asyncio.sleep(0.5)
    finally:
        for c in clients.values():
            await c.aclose()
    return out


def run_chunked(model_dir, budgets, args) -> dict:
    daemons = {b: Daemon(Path(tempfile.mkdtemp(prefix="llmos-chunk-")), [f"m={model_dir}"], "--max-num-seqs",
                         str(args.max_num_seqs), "--max-model-len", "2048", "--max-batched-tokens", str(b),
                         "--kv-memory", "1GiB")   # smollm2: 64MiB would not hold the 2,000-token prompt
               for b in budgets}
    try:
        for d in daemons.values():
            d.wait_ready(600)
        return asyncio.run(chunked({b: d.socket for b, d in daemons.items()}, "m", args))
    finally:
        for d in daemons.values():
            d.stop()


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
    ap.add_argument("--scenarios", default="priority,tenants,chunked",
                    help="comma-separated: priority, tenants, chunked")
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
    ap.add_argument("--chunked-streams", type=int, default=8, help="streams decoding while the long prompt enters")
    ap.add_argument("--chunked-prompt", type=int, default=2000, help="tokens of the long prompt")
    ap.add_argument("--chunked-budgets", default="256,4096", help="comma-separated --max-batched-tokens to compare")
    ap.add_argument("--chunked-repeats", type=int, default=5, help="long prompts admitted per budget")
    ap.add_argument("--charts", nargs="?", const=str(CHARTS), default=None, metavar="DIR",
                    help=f"write priority-ttft.png and tenant-shares.png there (default {CHARTS.relative_to(HERE.parent)})")
    args = ap.parse_args()
    scenarios, known = set(args.scenarios.split(",")), {"priority", "tenants", "chunked"}
    if not scenarios <= known:
        ap.error(f"unknown scenarios: {', '.join(sorted(scenarios - known))}")
    if args.charts:
        import charts  # noqa: F401  (fail now, not after the run, when matplotlib is missing)
    model_dir = bench_model_dir(args.model)
    cpu, load0 = cpu_model(), os.getloadavg()[0]
    print(f"model {args.model}; max {args.max_num_seqs} running; CPU {cpu}, {os.cpu_count()} cores, "
          f"1-minute load average before the run {load0:.1f}")
    note = f"model {args.model}, max {args.max_num_seqs} running, load before run {load0:.1f}"
    if "priority" in scenarios:
        print(f"{args.batch_requests} batch requests x {args.batch_tokens} tokens; {args.interactive} interactive requests")
        by_class = {}
        for sched in ("fcfs", "priority"):
            r = run(model_dir, ["--scheduler", sched], scenario, args)
            print(f"{sched:8s}: interactive TTFT idle p50 {pct(r['idle'], 50) * 1e3:.0f} ms p95 "
                  f"{pct(r['idle'], 95) * 1e3:.0f} ms | under batch load p50 {pct(r['loaded'], 50) * 1e3:.0f} ms "
                  f"p95 {pct(r['loaded'], 95) * 1e3:.0f} ms | batch throughput {r['batch_tok_s']:.0f} tok/s | "
                  f"batch TTFT p50 {pct(r['batch_ttft'], 50):.2f} s p95 {pct(r['batch_ttft'], 95):.2f} s")
            by_class[sched] = {name: (pct(r[k], 50), pct(r[k], 95)) for name, k in (
                ("interactive, idle daemon", "idle"), ("interactive, under batch load", "loaded"),
                ("batch (the load)", "batch_ttft"))}
        if args.charts:
            out = charts.ttft_by_class(
                by_class, Path(args.charts) / "priority-ttft.png",
                f"TTFT by priority class: {args.interactive} interactive requests during "
                f"{args.batch_requests} x {args.batch_tokens}-token batch requests", charts.footer(cpu, note))
            print(f"chart: {out}")
    if "tenants" in scenarios:
        print(f"tenants light:heavy = 1:3, {args.tenant_streams} streams each x {args.tenant_tokens} tokens; "
              f"light alone for {args.tenant_head_start:.0f} s, then heavy joins; "
              f"{args.tenant_window:.0f} s window from {args.tenant_warmup:.0f} s after heavy joined")
        panels = {}
        for sched in ("fcfs", "priority"):
            r = run(model_dir, ["--scheduler", sched, "--tenant", "light:weight=1", "--tenant", "heavy:weight=3"],
                    tenants, args)
            got, sv = r["received"], r["served"]
            panels[f"{sched} scheduler: heavy/light {got['heavy'] / max(1, got['light']):.2f} counted"] = r["timeline"]
            conv = "never" if r["converged_s"] is None else f"{r['converged_s']:.1f} s after heavy joined"
            print(f"{sched:8s}: received light {got['light']} tokens, heavy {got['heavy']} tokens, "
                  f"ratio {got['heavy'] / max(1, got['light']):.2f} | mean running "
                  f"{r['running']['light']:.1f}:{r['running']['heavy']:.1f} (at the join "
                  f"{r['head_start']['light']}:{r['head_start']['heavy']}; 1:3 reached {conv})")
            if sv:
                print(f"          served by the kernel (prompt and recompute included): light {sv['light']}, "
                      f"heavy {sv['heavy']}, ratio {sv['heavy'] / max(1, sv['light']):.2f}; "
                      f"preemptions {r['preemptions']}")
        if args.charts:
            marks = {"heavy joins": args.tenant_head_start,
                     "counting starts": args.tenant_head_start + args.tenant_warmup}
            out = charts.tenant_shares(
                {s: charts.rates(tl["events"], tl["began"], tl["end"], 1.0) for s, tl in panels.items()},
                {"light": 1, "heavy": 3}, Path(args.charts) / "tenant-shares.png",
                f"Tenant shares: {args.tenant_streams} streams per tenant x {args.tenant_tokens} tokens",
                charts.footer(cpu, note), marks)
            print(f"chart: {out}")

    if "chunked" in scenarios:
        budgets = [int(b) for b in args.chunked_budgets.split(",")]
        print(f"chunked prefill: {args.chunked_streams} streams decoding, a {args.chunked_prompt}-token prompt "
              f"admitted {args.chunked_repeats} times per budget (fresh streams each time; budgets alternate)")
        for budget, r in run_chunked(model_dir, budgets, args).items():
            w, steps = r["window"], -(-args.chunked_prompt // max(1, budget - args.chunked_streams))
            print(f"budget {budget:5d} ({steps} prefill steps): stream inter-token latency steady p50 "
                  f"{pct(r['steady'], 50) * 1e3:.0f} ms | during admission p50 {pct(w, 50) * 1e3:.0f} ms "
                  f"p99 {pct(w, 99) * 1e3:.0f} ms max {max(w) * 1e3:.0f} ms ({len(w)} gaps) | long prompt TTFT "
                  f"p50 {pct(r['ttft'], 50) * 1e3:.0f} ms max {max(r['ttft']) * 1e3:.0f} ms "
                  f"(alone p50 {pct(r['alone'], 50) * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
