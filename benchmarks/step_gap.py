"""The gap between two steps, with and without the kernel's overlap (issue 12, item 4).

    python benchmarks/step_gap.py                       # smollm2 bf16, 1 and 32 streams, 2 rounds
    python benchmarks/step_gap.py --model tiny --dtype float32 --rounds 1

The gap is what the model driver waits between sending step N's result and receiving step
N+1's plan, as the kernel sees it: from N's result arriving to N+1's plan leaving (engine
stats `gap_s / gaps`: update, schedule, plan, encode and, without the overlap, handing N's
tokens to the tokenizer and the clients). "Outside the forward" is everything of a step
that is not the driver's own execute() (the gap plus both bus hops and msgpack), from
`step_wall_s - forward_s`. Each round starts a fresh daemon with LLMOS_EMIT_OVERLAP=0 and
LLMOS_RUN_AHEAD=0, then one with both on (the default; with run-ahead, kernel/run_ahead.py,
most decode steps are sent while the one before runs, and only the others have a gap), and runs the standard chats at each concurrency (greedy,
--max-tokens each, EOS ignored, streamed). Prints both and the ratios; rounds alternate
because these machines are noisy.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
import loadgen  # noqa: E402
from daemon_harness import Daemon, cpu_model  # noqa: E402


async def measure(sock: Path, model: str, prompts: list[str], max_tokens: int) -> dict:
    async with loadgen.client_for("http://llmos", uds=str(sock)) as client:
        before = (await client.get("/llmos/v1/memory")).json()[model]["steps"]
        res = await loadgen.run(client, model, prompts, max_tokens, concurrent=True)
        after = (await client.get("/llmos/v1/memory")).json()[model]["steps"]
    d = {k: after[k] - before[k] for k in ("steps", "step_wall_s", "forward_s", "gaps", "gap_s", "ahead")}
    return {"tok_s": res["tok_s"], "ttft_p50": res["ttft_p50"],
            "gap_ms": 1e3 * d["gap_s"] / max(d["gaps"], 1),
            "outside_ms": 1e3 * (d["step_wall_s"] - d["forward_s"]) / max(d["steps"], 1),
            "step_ms": 1e3 * d["step_wall_s"] / max(d["steps"], 1), "ahead": d["ahead"] / max(d["steps"], 1)}


def one_daemon(model: str, model_dir: Path, dtype: str, overlap: bool, levels: list[int], prompts: list[str],
               max_tokens: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix="llmos-gap-"))
    d = Daemon(home, [f"{model}={model_dir}"], "--dtype", dtype, "--kv-memory", "2GiB",
               env={} if overlap else {"LLMOS_EMIT_OVERLAP": "0", "LLMOS_RUN_AHEAD": "0"}).wait_ready(600)
    try:
        asyncio.run(measure(d.socket, model, prompts[:2], 4))   # warm-up
        return {c: asyncio.run(measure(d.socket, model, prompts[:c], max_tokens)) for c in levels}
    finally:
        d.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "int4", "int8"])
    ap.add_argument("--levels", default="1,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    prompts_all = json.loads((HERE / "prompts.json").read_text())
    prompts = [prompts_all[i % len(prompts_all)] for i in range(max(levels))]
    from llmos.models.registry import prepare_model_dir
    from llmos.paths import Paths
    model_dir = prepare_model_dir(args.model, Paths.from_env(None).models_dir)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}; "
          f"{args.model} {args.dtype}, {args.max_tokens} tokens a request", flush=True)
    rows: dict = {(o, c): [] for o in (False, True) for c in levels}
    for r in range(args.rounds):
        for overlap in (False, True):
            for c, m in one_daemon(args.model, model_dir, args.dtype, overlap, levels, prompts,
                                   args.max_tokens).items():
                rows[(overlap, c)].append(m)
                print(f"round {r + 1} overlap {'on ' if overlap else 'off'} {c:3d} streams: {m['tok_s']:7.1f} tok/s, "
                      f"step {m['step_ms']:6.1f} ms, gap {m['gap_ms']:5.2f} ms, outside the forward "
                      f"{m['outside_ms']:5.2f} ms, {100 * m['ahead']:.0f}% sent ahead, TTFT p50 {m['ttft_p50']:.2f} s (load {os.getloadavg()[0]:.1f})",
                      flush=True)
    for c in levels:
        off, on = (sorted(rows[(o, c)], key=lambda m: m["tok_s"])[-1] for o in (False, True))   # best round each
        print(f"{c:3d} streams, best rounds: gap {off['gap_ms']:.2f} -> {on['gap_ms']:.2f} ms, outside the forward "
              f"{off['outside_ms']:.2f} -> {on['outside_ms']:.2f} ms, tok/s {off['tok_s']:.1f} -> {on['tok_s']:.1f} "
              f"({on['tok_s'] / off['tok_s']:.3f}x)")


if __name__ == "__main__":
    main()
