"""Throughput and latency of llmos against transformers on the same model, in one run.

    python benchmarks/throughput.py                       # starts its own daemon (smollm2, float32)
    python benchmarks/throughput.py --home ~/.llmos --no-start   # use a running daemon
    python benchmarks/throughput.py --sweep 1,4,8,16,32 --skip-hf --chart   # + docs/img chart

Workload (design.md, section 6): the prompts of benchmarks/prompts.json as chats,
greedy, exactly --max-tokens output tokens each (ignore_eos), all submitted at once.
Baselines on the same model and dtype: transformers `generate` one prompt at a time
(on a subset, it is slow) and statically batched (left padding). Prints tokens/s for
each, the ratios, time-to-first-token percentiles and the kernel's share of step time.
With --sweep, llmos runs once per concurrency level on the same daemon (the baselines use
the largest); --chart writes tokens/s and TTFT against concurrency as a PNG (charts.py).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
import loadgen  # noqa: E402  (benchmarks/loadgen.py: the load generator peers.py uses too)
from daemon_harness import cpu_model  # noqa: E402

CHART = HERE.parent / "docs" / "img" / "throughput-concurrency.png"


async def run_llmos(sock: Path, model: str, prompts: list[str], max_tokens: int) -> dict:
    async with loadgen.client_for("http://llmos", uds=str(sock)) as client:
        before = (await client.get("/llmos/v1/memory")).json()[model]["steps"]
        res = await loadgen.run(client, model, prompts, max_tokens, concurrent=True)
        after = (await client.get("/llmos/v1/memory")).json()[model]["steps"]
    step_wall = after["step_wall_s"] - before["step_wall_s"]
    forward = after["forward_s"] - before["forward_s"]
    return {**res, "steps": after["steps"] - before["steps"],
            "kernel_share": 1 - forward / step_wall if step_wall else 0.0,
            "loop_share": 1 - step_wall / res["wall_s"]}


def run_hf(model_dir: Path, dtype: str, prompts: list[str], max_tokens: int, batch: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), local_files_only=True).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    kw = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    t0 = time.perf_counter()
    tokens = 0
    with torch.inference_mode():
        groups = [texts] if batch else [[t] for t in texts]
        for group in groups:
            enc = tok(group, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, **kw)
            tokens += (out.shape[1] - enc["input_ids"].shape[1]) * len(group)
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--concurrency", type=int, default=32, help="prompts submitted at once")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--sequential-prompts", type=int, default=4, help="prompts for the one-at-a-time baseline")
    ap.add_argument("--home", default=None, help="LLMOS_HOME of a running daemon (with --no-start)")
    ap.add_argument("--no-start", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--daemon-arg", action="append", default=[], help="extra llmosd option (repeatable)")
    ap.add_argument("--sweep", default=None, help="comma-separated concurrency levels, instead of --concurrency")
    ap.add_argument("--chart", nargs="?", const=str(CHART), default=None, metavar="PATH.png",
                    help=f"write tokens/s and TTFT against concurrency as a PNG (default {CHART.relative_to(HERE.parent)})")
    args = ap.parse_args()
    levels = [int(c) for c in args.sweep.split(",")] if args.sweep else [args.concurrency]
    args.concurrency = max(levels)
    if args.chart:
        import charts  # noqa: F401  (fail now, not after the run, when matplotlib is missing)
    load0 = os.getloadavg()[0]

    prompts_all = json.loads((HERE / "prompts.json").read_text())
    prompts = [prompts_all[i % len(prompts_all)] for i in range(args.concurrency)]
    from llmos.models.registry import prepare_model_dir
    from llmos.paths import Paths
    paths = Paths.from_env(args.home)
    model_dir = prepare_model_dir(args.model, paths.models_dir)

    daemon = None
    if args.no_start:
        sock = paths.api_socket
    else:
        from daemon_harness import Daemon
        home = Path(tempfile.mkdtemp(prefix="llmos-bench-"))
        daemon = Daemon(home, [f"{args.model}={model_dir}"], "--dtype", args.dtype, "--kv-memory", "2GiB",
                        *args.daemon_arg)
        daemon.wait_ready(600)
        sock = daemon.socket
    try:
        asyncio.run(run_llmos(sock, args.model, prompts[:2], 4))  # warm-up
        rows = []
        for c in levels:
            ours = {"concurrency": c, **asyncio.run(run_llmos(sock, args.model, prompts[:c], args.max_tokens))}
            rows.append(ours)
            print(f"llmos       {c:3d} concurrent: {ours['tokens']} tokens in {ours['wall_s']:.1f}s = "
                  f"{ours['tok_s']:.1f} tok/s; TTFT p50 {ours['ttft_p50']:.2f}s p90 {ours['ttft_p90']:.2f}s "
                  f"p99 {ours['ttft_p99']:.2f}s; {ours['steps']} steps, kernel share of step time "
                  f"{100 * ours['kernel_share']:.1f}%, time between steps {100 * ours['loop_share']:.1f}%",
                  flush=True)
    finally:
        if daemon:
            daemon.stop()
    ours = max(rows, key=lambda r: r["concurrency"])   # the baselines run at this concurrency
    cpu = cpu_model()
    print(f"CPU: {cpu}, {os.cpu_count()} cores; 1-minute load average before the run {load0:.1f}")
    if args.chart:
        note = f"{args.model} {args.dtype}, {args.max_tokens} tokens/request, load before run {load0:.1f}"
        out = charts.concurrency(rows, args.chart, f"llmos: throughput and time to first token ({args.model})",
                                 charts.footer(cpu, note))
        print(f"chart: {out}")
    if args.skip_hf:
        return
    static = run_hf(model_dir, args.dtype, prompts, args.max_tokens, batch=True)
    print(f"hf static batch of {len(prompts)}: {static['tokens']} tokens in {static['wall_s']:.1f}s = "
          f"{static['tok_s']:.1f} tok/s")
    seq = run_hf(model_dir, args.dtype, prompts[: args.sequential_prompts], args.max_tokens, batch=False)
    print(f"hf one at a time ({args.sequential_prompts} prompts): {seq['tokens']} tokens in {seq['wall_s']:.1f}s = "
          f"{seq['tok_s']:.1f} tok/s")
    print(f"ratios: llmos / hf static = {ours['tok_s'] / static['tok_s']:.2f}x; "
          f"llmos / hf sequential = {ours['tok_s'] / seq['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
