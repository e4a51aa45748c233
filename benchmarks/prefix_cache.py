"""Prefix cache and preemption costs, measured in one run.

    python benchmarks/prefix_cache.py                 # smollm2, float32
    python benchmarks/prefix_cache.py --model tiny
    python benchmarks/prefix_cache.py --dtype bfloat16 --cold-only --baseline-tree /tmp/old   # part 0 only

0. Cold: the same 32 chats arriving together on an empty cache (none of them can hit it
   until a step has written the prefix: the scheduler makes the others wait for it,
   kv_manager.in_flight). With --baseline-tree, also a daemon run from another checkout
   (PYTHONPATH; run it from outside this checkout, or the current directory shadows the
   baseline), e.g. a `git worktree` of the commit before, side by side.
1. 32 chat requests sharing a ~1,000-token system prompt with different questions,
   prefix cache on and off: time-to-first-token percentiles, throughput, hit rate.
2. Preemption by swap against recompute on a workload that forces it (a KV pool far
   smaller than the batch needs): wall time, preemptions, swap traffic.
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

def system_prompt(rules: int) -> str:
    return " ".join(f"Rule {i}: answer politely, cite the handbook section {i}, keep answers short and never "
                    f"invent facts." for i in range(rules))


SYSTEM = system_prompt(60)   # ~1,000 tokens


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def chat(client, model, question, max_tokens, system: str = SYSTEM):
    t0 = time.perf_counter()
    first, n = None, 0
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - t0
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
    return first, n


async def workload(sock, model, n, max_tokens, warm: bool, system: str = SYSTEM):
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    async with httpx.AsyncClient(transport=transport, base_url="http://llmos", timeout=3600) as client:
        if warm:   # one request puts the shared prefix in the cache, as a long-running server would have
            await chat(client, model, "Hello?", 1)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(chat(client, model, f"Question {i}: what does rule {i} say?", max_tokens,
                                              system) for i in range(n)))
        wall = time.perf_counter() - t0
        mem = (await client.get("/llmos/v1/memory")).json()[model]
    return {"ttft": [f for f, _ in results], "tok_s": sum(k for _, k in results) / wall, "wall": wall, "mem": mem}


def daemon(model_dir, *extra, tree: str | None = None):
    d = Daemon(Path(tempfile.mkdtemp(prefix="llmos-pc-")), [f"m={model_dir}"], "--max-model-len", "4096",
               "--kv-memory", "1GiB", *extra, env={"PYTHONPATH": tree} if tree else None)
    return d.wait_ready(600)


def cold(model_dir, args) -> None:
    trees = [("this checkout", None)] + ([(f"baseline {args.baseline_tree}", args.baseline_tree)]
                                         if args.baseline_tree else [])
    for name, tree in trees * args.rounds:
        d = daemon(model_dir, "--dtype", args.dtype, tree=tree)
        try:
            r = asyncio.run(workload(d.socket, "m", args.requests, args.max_tokens, warm=False,
                                     system=system_prompt(args.cold_rules)))
        finally:
            d.stop()
        pc, steps = r["mem"]["prefix_cache"], r["mem"]["steps"]
        print(f"cold, {name}: TTFT p50 {pct(r['ttft'], 50):.2f}s p90 {pct(r['ttft'], 90):.2f}s; wall "
              f"{r['wall']:.1f}s; {steps['tokens_computed']} tokens computed in {steps['steps']} steps; hit rate "
              f"{pc['hit_rate']:.2%}; {pc.get('waits_for_prefix', 'n/a')} admissions waited for a prefix", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--cold-only", action="store_true", help="part 0 only")
    ap.add_argument("--baseline-tree", default=None, help="another checkout to run part 0 on too")
    ap.add_argument("--rounds", type=int, default=1, help="part 0, alternating")
    ap.add_argument("--cold-rules", type=int, default=60,
                    help="rules in part 0's system prompt (60: ~1,000 tokens; 40: ~700, under a step's budget)")
    args = ap.parse_args()
    model_dir = bench_model_dir(args.model)
    cold(model_dir, args)
    if args.cold_only:
        return
    for flag in ("--prefix-caching", "--no-prefix-caching"):
        d = daemon(model_dir, "--dtype", args.dtype, flag)
        try:
            r = asyncio.run(workload(d.socket, "m", args.requests, args.max_tokens, warm=True))
        finally:
            d.stop()
        pc = r["mem"]["prefix_cache"]
        print(f"{flag:20s}: TTFT p50 {pct(r['ttft'], 50):.2f}s p90 {pct(r['ttft'], 90):.2f}s "
              f"p99 {pct(r['ttft'], 99):.2f}s; {r['tok_s']:.1f} output tok/s; wall {r['wall']:.1f}s; "
              f"hit rate {pc['hit_rate']:.2%} ({pc['hit_tokens']} of {pc['queried_tokens']} prompt tokens)")
    # Preemption: a pool of ~40% of what the batch needs at the end forces it.
    for mode in ("swap", "recompute"):
        d = daemon(model_dir, "--dtype", args.dtype, "--preemption-mode", mode, "--no-prefix-caching",
                   "--kv-memory", str(_pool_bytes(model_dir, args)))
        try:
            r = asyncio.run(workload(d.socket, "m", 16, 4 * args.max_tokens, warm=False))
        finally:
            d.stop()
        m = r["mem"]
        swap = m["swap"] or {}
        print(f"preemption by {mode:9s}: wall {r['wall']:.1f}s, {r['tok_s']:.1f} tok/s, {m['preemptions']} "
              f"preemptions, swapped out {swap.get('bytes_out', 0) / 2**20:.1f} MiB, in "
              f"{swap.get('bytes_in', 0) / 2**20:.1f} MiB")


def _pool_bytes(model_dir: Path, args) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * (4 if args.dtype == "float32" else 2)
    tokens_needed = 16 * (1100 + 4 * args.max_tokens)
    return int(0.4 * tokens_needed * per_token)


if __name__ == "__main__":
    main()
