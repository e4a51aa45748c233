"""Replicas (issue 13): throughput with 1 and 2 replicas, and what cache-aware routing buys.

    python benchmarks/replicas.py                     # smollm2 bf16, the standard workload
    python benchmarks/replicas.py --model tiny --dtype float32
    python benchmarks/replicas.py --skip-prefix       # only the 1-vs-2 throughput part

1. Throughput: the standard workload (benchmarks/prompts.json as chats, greedy, exactly
   --max-tokens tokens each with EOS ignored, all at once, streamed: benchmarks/loadgen.py,
   as throughput.py) on a fresh daemon with --replicas 1, then on another with --replicas 2.
   Prints tok/s, TTFT, the ratio, and how the work split between the replicas (each engine's
   steps.tokens_computed and forward time from /llmos/v1/memory, before and after).
2. Routing: chats behind long system prompts, --prefix-concurrency in flight at a time, on
   a fresh 2-replica daemon (the kernel's cache-aware router picks the replica), and on a
   daemon serving the same weights as two 1-replica models `a` and `b` to which the client
   sends each request at random (a seeded coin): that *is* random routing over two engines
   with separate prefix caches, the same pools and the same cores. Two workloads, on both:
   one system prompt behind 32 chats, and 4 system prompts x 8 chats in shuffled order.
   Prints each engine's prefix-cache hit rate (prefix_cache.hit_tokens / queried_tokens,
   deltas) and how many times the shared prefixes were computed, against the estimate for
   random routing: a prefix sent n times to one of R replicas at random is computed on
   R (1 - (1 - 1/R)^n) of them (about 2 for R = 2 and n >= 8); ideal affinity computes it once.

What 2 replicas can show on a 2-core CPU: nothing faster. Both model drivers run on the same
two cores (each with two torch threads, one per core it may use), so a second replica adds
a second forward pass competing for the same arithmetic units and memory bandwidth, and two
half-size batches instead of one full one. The mechanism is for a machine with several
accelerators, one replica per device (`--replica-devices cuda:0,cuda:1`; without it every
replica runs on the daemon's --device). See docs/benchmarks.md, "Replicas".
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
import loadgen  # noqa: E402
from daemon_harness import Daemon, bench_model_dir, cpu_model  # noqa: E402

NOTE_2_CORES = ("both replicas run on the same CPU cores (each model driver with a torch thread per core), so a "
                "second replica adds no arithmetic: it can only overlap per-step overheads (Python, IPC), which "
                "matter for a tiny model, not for a compute-bound one. Replicas pay off with one per GPU: "
                "llmosd --replicas 2 --replica-devices cuda:0,cuda:1 (without --replica-devices every replica "
                "uses the daemon's --device)")


def system_prompt(tag: str, rules: int) -> str:
    """A long system prompt whose first characters differ per tag (so do its tokens)."""
    return f"[{tag}] Handbook of the {tag} desk. " + " ".join(
        f"Rule {i} of {tag}: answer politely, cite handbook section {i}, keep answers short, never invent facts."
        for i in range(rules))


def engines_of(mem: dict, model: str) -> list[str]:
    return sorted(n for n in mem if (n == model or n.startswith(model + "~")) and mem[n])


async def memory(client) -> dict:
    return (await client.get("/llmos/v1/memory")).json()


def delta(before: dict, after: dict, engine: str) -> dict:
    b, a = before.get(engine) or {}, after[engine]
    bs, as_ = b.get("steps", {}), a["steps"]
    bp, ap = b.get("prefix_cache", {}), a["prefix_cache"]
    return {"device": a.get("device"), "tokens": as_["tokens_computed"] - bs.get("tokens_computed", 0),
            "steps": as_["steps"] - bs.get("steps", 0),
            "forward_s": as_["forward_s"] - bs.get("forward_s", 0.0),
            "lookups": ap["lookups"] - bp.get("lookups", 0),
            "queried": ap["queried_tokens"] - bp.get("queried_tokens", 0),
            "hits": ap["hit_tokens"] - bp.get("hit_tokens", 0)}


def start(model_dir: Path, models: list[str], args, *extra: str) -> Daemon:
    home = Path(tempfile.mkdtemp(prefix="llmos-replicas-"))
    d = Daemon(home, models, "--dtype", args.dtype, "--kv-memory", args.kv_memory, "--max-model-len", "4096", *extra)
    return d.wait_ready(900)


# ------------------------------------------------------------------ 1. throughput
async def throughput_run(sock: Path, model: str, prompts: list[str], max_tokens: int) -> dict:
    async with loadgen.client_for("http://llmos", uds=str(sock)) as client:
        for _ in range(3):   # warm every engine: concurrent requests spread over the replicas
            await loadgen.run(client, model, prompts[:4], 4, concurrent=True)
            warm = await memory(client)
            if all(warm[e]["steps"]["steps"] for e in engines_of(warm, model)):
                break
        before = await memory(client)
        res = await loadgen.run(client, model, prompts, max_tokens, concurrent=True)
        after = await memory(client)
    res["engines"] = {e: delta(before, after, e) for e in engines_of(after, model)}
    return res


def part_throughput(model_dir: Path, args, prompts: list[str]) -> None:
    print(f"\n== 1. throughput, {len(prompts)} concurrent chats x {args.max_tokens} tokens, {args.model} "
          f"{args.dtype}, each on a fresh daemon ({cpu_model()})")
    ratios = []
    for rnd in range(args.repeat):
        results = {n: throughput_once(model_dir, args, prompts, n) for n in (1, 2)}
        ratios.append(results[2]["tok_s"] / results[1]["tok_s"])
        print(f"ratio 2 replicas / 1 replica{f' (round {rnd + 1})' if args.repeat > 1 else ''}: {ratios[-1]:.2f}x "
              f"(TTFT p50 {results[2]['ttft_p50']:.2f}s vs {results[1]['ttft_p50']:.2f}s)")
    if args.repeat > 1:
        print(f"ratios over {args.repeat} rounds: {', '.join(f'{x:.2f}x' for x in ratios)}")
    print(f"note: {NOTE_2_CORES}")


def throughput_once(model_dir: Path, args, prompts: list[str], n: int) -> dict:
    """One daemon with n replicas, the standard workload on it; prints and returns the result."""
    d = start(model_dir, [f"m={model_dir}"], args, "--replicas", str(n))
    load = os.getloadavg()[0]
    try:
        r = asyncio.run(throughput_run(d.socket, "m", prompts, args.max_tokens))
    finally:
        d.stop()
    print(f"replicas={n}: {r['tokens']} tokens in {r['wall_s']:.1f}s = {r['tok_s']:.1f} tok/s; "
          f"TTFT p50 {r['ttft_p50']:.2f}s p99 {r['ttft_p99']:.2f}s; inter-token p50 {1000 * r['itl_p50']:.1f} ms "
          f"(1-minute load average {load:.1f} -> {os.getloadavg()[0]:.1f})")
    total = sum(e["tokens"] for e in r["engines"].values()) or 1
    for name, e in r["engines"].items():
        print(f"    engine {name:4s} on {e['device']}: {e['lookups']:3d} requests admitted, "
              f"{e['tokens']:6d} tokens computed "
              f"({100 * e['tokens'] / total:.1f}%), {e['steps']} steps, forward {e['forward_s']:.1f}s "
              f"({100 * e['forward_s'] / r['wall_s']:.0f}% of the wall time)")
    return r


# ------------------------------------------------------------------ 2. routing and the prefix cache
def workloads(rules: int, seed: int, salt: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """(name, [(system prompt, question)]) in the order sent; `salt` makes the prompts of
    each run new to the daemon's caches."""
    one = system_prompt(f"alpha{salt}", rules)
    w1 = [(one, f"Question {i}: what does rule {i} say?") for i in range(32)]
    tags = [f"{t}{salt}" for t in ("bravo", "charlie", "delta", "echo")]
    w2 = [(system_prompt(t, rules), f"Question {i} for {t}: what does rule {i} say?") for t in tags for i in range(8)]
    random.Random(seed).shuffle(w2)
    return [("1 system prompt x 32 chats", w1), ("4 system prompts x 8 chats", w2)]


async def chat(client, model: str, system: str, question: str, max_tokens: int) -> loadgen.Stream:
    body = loadgen.chat_body(model, question, max_tokens)
    body["messages"] = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return await loadgen.stream_one(client, body)


async def routed_run(sock: Path, pick, engines: list[str], work, concurrency: int, max_tokens: int) -> dict:
    """Send `work` with `concurrency` in flight; `pick(i)` names the model of request i."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i, system, question):
        async with sem:
            return await chat(client, pick(i), system, question, max_tokens)
    async with loadgen.client_for("http://llmos", uds=str(sock)) as client:
        before = await memory(client)
        t0 = time.perf_counter()
        streams = await asyncio.gather(*(one(i, s, q) for i, (s, q) in enumerate(work)))
        wall = time.perf_counter() - t0
        after = await memory(client)
    res = loadgen.summarize(list(streams), wall)
    res["engines"] = {e: delta(before, after, e) for e in engines}
    return res


def reusable_tokens(tok, work) -> dict[str, int]:
    """Per system prompt: the tokens all its chats share (the rendered system turn and the
    start of the user turn), rounded down to whole 16-token blocks: what a prefix hit reuses."""
    by_prefix: dict[str, list[list[int]]] = {}
    for system, question in work:
        if len(by_prefix.setdefault(system, [])) < 2:
            chat_ = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            text = tok.apply_chat_template(chat_, add_generation_prompt=True, tokenize=False)
            by_prefix[system].append(tok(text, add_special_tokens=False)["input_ids"])
    out = {}
    for system, (a, b) in by_prefix.items():
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        out[system] = n // 16 * 16
    return out


def replay(work, concurrency: int, balance_abs: int) -> int:
    """Distinct (prefix, replica) pairs llmos.kernel.router.Router makes of `work` with
    `concurrency` in flight, each request costing what the kernel counts (prompt characters
    / 4 + max_tokens) until the oldest in flight ends: a model of the run, not the run."""
    from llmos.kernel.router import Router, prompt_key
    r = Router(balance_abs=balance_abs)
    r.set_replicas(["m", "m~1"])
    inflight, pairs = [], set()
    for system, question in work:
        if len(inflight) >= concurrency:
            inflight.pop(0)
        loads = {"m": 0, "m~1": 0}
        for e, cost in inflight:
            loads[e] += cost
        key = prompt_key(None, [{"role": "system", "content": system}, {"role": "user", "content": question}], None)
        e = r.pick(key, loads)
        inflight.append((e, len(key) // 4 + 16))
        pairs.add((system, e))
    return len(pairs)


def part_routing(model_dir: Path, args) -> None:
    from transformers import AutoTokenizer
    levels = [int(x) for x in args.prefix_concurrency.split(",")]
    print(f"\n== 2. routing: chats behind long system prompts (~{args.rules} sentences), {args.prefix_tokens} tokens "
          f"each, in flight at a time: {levels}; 2 engines, {args.model} {args.dtype} ({cpu_model()})")
    runs = {(c, k): w for c in levels for k, w in enumerate(workloads(args.rules, args.seed, f"-c{c}"))}
    results: dict[str, dict] = {"cache-aware (router)": {}, "random (client coin)": {}}
    print(f"(1-minute load average at the start: {os.getloadavg()[0]:.1f})")
    d = start(model_dir, [f"m={model_dir}"], args, "--replicas", "2")
    try:
        for (c, k), (_, w) in runs.items():
            results["cache-aware (router)"][c, k] = asyncio.run(
                routed_run(d.socket, lambda i: "m", ["m", "m~1"], w, c, args.prefix_tokens))
    finally:
        d.stop()
    d = start(model_dir, [f"a={model_dir}", f"b={model_dir}"], args, "--max-loaded-models", "2")
    try:
        rng = random.Random(args.seed + 1)
        for (c, k), (_, w) in runs.items():
            picks = [rng.choice("ab") for _ in w]
            results["random (client coin)"][c, k] = asyncio.run(
                routed_run(d.socket, lambda i, p=picks: p[i], ["a", "b"], w, c, args.prefix_tokens))
    finally:
        d.stop()
    print(f"(1-minute load average at the end: {os.getloadavg()[0]:.1f})")
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    for (c, k), (name, w) in runs.items():
        reuse = reusable_tokens(tok, w)
        per_request = sum(reuse[s] for s, _ in w) / len(w)   # mean reusable tokens of a request
        prefixes, per_prefix = len(reuse), len(w) // len(reuse)
        est = 2 * (1 - 0.5 ** per_prefix)   # expected replicas that see a prefix, R = 2, random
        print(f"-- {name}, {c} in flight: ~{per_request:.0f} reusable tokens per chat (whole blocks of its "
              f"system prompt)")
        for mode, by_run in results.items():
            r = by_run[c, k]
            q = sum(e["queried"] for e in r["engines"].values())
            h = sum(e["hits"] for e in r["engines"].values())
            split = ", ".join(f"{n} {e['lookups']} req {e['hits'] / e['queried']:.0%}" if e["queried"]
                              else f"{n} 0 req" for n, e in r["engines"].items())
            print(f"   {mode:22s}: hit rate {h / q:5.1%} ({h} of {q} prompt tokens); prefix computed "
                  f"~{len(w) - h / per_request:4.1f} times for {prefixes}; TTFT p50 {r['ttft_p50']:.2f}s "
                  f"p99 {r['ttft_p99']:.2f}s; wall {r['wall_s']:.1f}s [{split}]")
        q = sum(e["queried"] for e in results["random (client coin)"][c, k]["engines"].values())
        for label, times in (("ideal: once per prefix", prefixes), ("random, estimate", prefixes * est)):
            print(f"   {label:22s}: hit rate {(len(w) - times) * per_request / q:5.1%}; prefix computed "
                  f"~{times:4.1f} times")
        pairs = {b: replay(w, c, b) for b in (2048, 8192)}
        print(f"   router replay (no daemon, FIFO completions): prefix placed on {pairs[2048]} (prefix, replica) "
              f"pairs at the default balance_abs=2048 tokens, {pairs[8192]} at 8192")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2, tiny, or a registry spec")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="rounds of 1-then-2 replicas in part 1")
    ap.add_argument("--kv-memory", default="2GiB", help="the daemon's KV budget, split between its engines")
    ap.add_argument("--rules", type=int, default=30, help="sentences per system prompt (~22 tokens each)")
    ap.add_argument("--prefix-concurrency", default="1,8", help="chats in flight in part 2 (comma-separated levels)")
    ap.add_argument("--prefix-tokens", type=int, default=16, help="output tokens per chat in part 2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-prefix", action="store_true")
    args = ap.parse_args()
    prompts_all = json.loads((HERE / "prompts.json").read_text())
    prompts = [prompts_all[i % len(prompts_all)] for i in range(args.concurrency)]
    model_dir = bench_model_dir(args.model)
    t0 = time.perf_counter()
    if not args.skip_throughput:
        part_throughput(model_dir, args, prompts)
    if not args.skip_prefix:
        part_routing(model_dir, args)
    print(f"\n({time.perf_counter() - t0:.0f}s in all)")


if __name__ == "__main__":
    main()
