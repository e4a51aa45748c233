"""n > 1 with copy-on-write against n separate requests, in one run.

    python benchmarks/choices.py                 # smollm2, float32
    python benchmarks/choices.py --model tiny

The same chat (the ~1,000-token system prompt of prefix_cache.py) asked for --n choices,
once as one request with n (the choices share the prompt's KV) and once as n concurrent
requests (each computes and holds its own prompt). The prefix cache is off, so sharing
comes from copy-on-write alone. Reports wall time, time to the first token of the last
choice, output tokens/s, the most KV blocks in use (sampled every 20 ms) and the kernel's
fork and copy counters.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from daemon_harness import bench_model_dir  # noqa: E402
from prefix_cache import SYSTEM, daemon  # noqa: E402


async def ask(client, model, n, max_tokens) -> tuple[float, int]:
    """One streamed request with n choices: (time to the first token of its last choice, tokens)."""
    t0, first, tokens = time.perf_counter(), {}, 0
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.8, "seed": 1, "ignore_eos": True,
            "stream": True, "n": n, "messages": [{"role": "system", "content": SYSTEM},
                                                 {"role": "user", "content": "Summarise rule 7."}]}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    if c.get("delta", {}).get("content"):
                        first.setdefault(c["index"], time.perf_counter() - t0)
                        tokens += 1
    return max(first.values()), tokens


async def run(sock, model, n, max_tokens, together: bool) -> dict:
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    async with httpx.AsyncClient(transport=transport, base_url="http://llmos", timeout=3600) as client:
        peak, done = 0, False

        async def sample():
            nonlocal peak
            while not done:
                mem = (await client.get("/llmos/v1/memory")).json()[model]
                peak = max(peak, mem["blocks_used"])
                await asyncio.sleep(0.02)
        sampler = asyncio.create_task(sample())
        t0 = time.perf_counter()
        if together:
            results = [await ask(client, model, n, max_tokens)]
        else:
            results = await asyncio.gather(*(ask(client, model, 1, max_tokens) for _ in range(n)))
        wall = time.perf_counter() - t0
        done = True
        await sampler
        mem = (await client.get("/llmos/v1/memory")).json()[model]
    return {"wall": wall, "ttft_last": max(f for f, _ in results), "tokens": sum(k for _, k in results),
            "peak_blocks": peak, "block_bytes": mem["block_bytes"], "pc": mem["prefix_cache"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    d = daemon(bench_model_dir(args.model), "--dtype", args.dtype, "--no-prefix-caching")
    try:
        for label, together in ((f"one request, n={args.n}", True), (f"{args.n} separate requests", False)):
            r = asyncio.run(run(d.socket, "m", args.n, args.max_tokens, together))
            print(f"{label:22s}: wall {r['wall']:.2f}s, last choice's TTFT {r['ttft_last']:.2f}s, "
                  f"{r['tokens'] / r['wall']:.1f} output tok/s, peak KV {r['peak_blocks']} blocks "
                  f"({r['peak_blocks'] * r['block_bytes'] / 2**20:.1f} MiB); forks {r['pc']['forks']}, "
                  f"copy-on-write copies {r['pc']['cow_copies']} (cumulative)")
    finally:
        d.stop()


if __name__ == "__main__":
    main()
