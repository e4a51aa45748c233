"""Microbenchmark of the model driver's compute core: ModelRunner.execute decode steps at
batch 1/8/32 against Hugging Face generate on the same weights, in one run.

    HF_HUB_OFFLINE=1 python benchmarks/model_step.py --dtype float32 [--model smollm2] [--steps 32]

Prompts: ../shared/bench/prompts.json (chat template applied) when present, else a built-in set.
Runner: one packed prefill step of the whole batch, then `steps` decode steps.
HF: generate on a static left-padded batch; its decode rate excludes the prefill.
End-to-end = batch * (steps + 1) generated tokens / (prefill + decode time).

`--vs LLMOS_FUSE=0` builds a second runner with those environment variables set while it
loads and runs the two on the same decode plans, alternating *every step* (which goes first
alternates too), so that the load of a shared machine hits both alike; it prints their median
step times, the ratio, whether they chose the same tokens, and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmos.drivers.model.threads import configure_cpu_env  # noqa: E402

configure_cpu_env()   # what the model driver does, before torch loads OpenMP
import numpy as np  # noqa: E402
import torch  # noqa: E402

from llmos import protocol  # noqa: E402
from llmos.drivers.model.runner import ModelRunner  # noqa: E402
from llmos.models.registry import prepare_model_dir  # noqa: E402
from llmos.paths import Paths  # noqa: E402

BLOCK = 16


def load_prompts(tok, n: int) -> list[list[int]]:
    path = Path(__file__).resolve().parents[2] / "shared" / "bench" / "prompts.json"
    texts = json.loads(path.read_text()) if path.is_file() else ["Tell me a story about a robot."] * n
    texts = (texts * (n // len(texts) + 1))[:n]
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                    return_dict=False) for t in texts]


def make_plan(step_id, seqs, tokens_per_seq, blocks_per_seq):
    n = len(seqs)
    width = max(len(b) for b in blocks_per_seq)
    return protocol.StepPlan(
        step_id=step_id, seq_ids=protocol.i32(range(n)),
        num_new=protocol.i32([len(t) for t in tokens_per_seq]),
        start_pos=protocol.i32([s for s in seqs]),
        tokens=protocol.i32([x for t in tokens_per_seq for x in t]),
        block_tables=protocol.i32([b + [-1] * (width - len(b)) for b in blocks_per_seq]),
        sample=np.ones(n, dtype=np.uint8), temperature=np.zeros(n, dtype=np.float32),
        top_p=np.ones(n, dtype=np.float32), top_k=protocol.i32([-1] * n),
        seed=np.full(n, -1, dtype=np.int64), gen_index=protocol.i32([0] * n),
        top_logprobs=protocol.i32([-1] * n))


def bench_runner(runner, prompts, steps, pool_dir) -> dict:
    """All prompts prefilled in one packed step, then `steps` batched decode steps."""
    blocks = map_fresh_pool(runner, prompts, steps, pool_dir)
    runner.execute(make_plan(0, [0], [prompts[0][:8]], [blocks[0]]))  # warm-up
    t0 = time.perf_counter()
    last = runner.execute(make_plan(1, [0] * len(prompts), prompts, blocks)).tokens.tolist()
    t1 = time.perf_counter()
    pos = [len(p) for p in prompts]
    for k in range(steps):
        last = runner.execute(make_plan(2 + k, pos, [[x] for x in last], blocks)).tokens.tolist()
        pos = [x + 1 for x in pos]
    t2 = time.perf_counter()
    n = len(prompts)
    return {"prefill": sum(map(len, prompts)) / (t1 - t0), "decode": n * steps / (t2 - t1),
            "e2e": n * (steps + 1) / (t2 - t0)}


def map_fresh_pool(runner, prompts, steps, pool_dir, name="pool") -> list[list[int]]:
    info = runner.info()
    per_seq = -(-(max(map(len, prompts)) + steps + 2) // BLOCK)
    nblocks = per_seq * len(prompts)
    numel = info["num_layers"] * 2 * nblocks * BLOCK * info["num_kv_heads"] * info["head_dim"]
    path = Path(pool_dir) / name
    with open(path, "wb") as f:
        f.truncate(numel * torch.empty((), dtype=getattr(torch, info["dtype"])).element_size())
    runner.map_pool(protocol.MapKVPool(str(path), "cpu", info["dtype"], nblocks, BLOCK, info["num_layers"],
                                       info["num_kv_heads"], info["head_dim"]))
    return [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]


def bench_pair(a, b, prompts, steps, pool_dir) -> dict:
    """Runners a and b prefill the same prompts, then decode step by step in turn; median
    decode step seconds of each (the first 4 steps left out) and whether their tokens agreed."""
    state = {}
    for name, r in (("a", a), ("b", b)):
        blocks = map_fresh_pool(r, prompts, steps, pool_dir, f"pool-{name}")
        last = r.execute(make_plan(1, [0] * len(prompts), prompts, blocks)).tokens.tolist()
        state[name] = {"r": r, "blocks": blocks, "last": last, "pos": [len(p) for p in prompts], "t": []}
    same = True
    for k in range(steps):
        for name in (("a", "b") if k % 2 == 0 else ("b", "a")):
            st = state[name]
            t = time.perf_counter()
            st["last"] = st["r"].execute(make_plan(2 + k, st["pos"], [[x] for x in st["last"]],
                                                   st["blocks"])).tokens.tolist()
            st["t"].append(time.perf_counter() - t)
            st["pos"] = [x + 1 for x in st["pos"]]
        same &= state["a"]["last"] == state["b"]["last"]
    med = {name: float(np.median(st["t"][4:] or st["t"])) for name, st in state.items()}
    return {"a": med["a"], "b": med["b"], "same": same}


def bench_contexts(runner, tok, contexts, batches, steps, pool_dir, chunk=512) -> None:
    """Decode tok/s of each batch with every sequence at each context length: prompts of exactly
    N tokens (the chat prompts' tokens repeated), prefilled in chunks, then `steps` decode steps."""
    base = [t for p in load_prompts(tok, 8) for t in p]
    for b in batches:
        rates = {}
        for n in contexts:
            prompts = [(base[i * 7:] + base * (n // len(base) + 2))[:n] for i in range(b)]
            blocks = map_fresh_pool(runner, prompts, steps, pool_dir, f"ctx-{n}-{b}")
            last = []
            for i, p in enumerate(prompts):   # chunked prefill, one sequence at a time
                for s in range(0, n, chunk):
                    out = runner.execute(make_plan(1, [s], [p[s:s + chunk]], [blocks[i]]))
                last.append(int(out.tokens[0]))
            pos = [n] * b
            times = []
            for k in range(steps):
                t = time.perf_counter()
                last = runner.execute(make_plan(2 + k, pos, [[x] for x in last], blocks)).tokens.tolist()
                times.append(time.perf_counter() - t)
                pos = [x + 1 for x in pos]
            rates[n] = b / float(np.median(times[2:] or times))
            os.unlink(Path(pool_dir) / f"ctx-{n}-{b}")
        first = rates[contexts[0]]
        print(f"batch {b:3d}: " + ", ".join(
            f"context {n}: {r:6.1f} tok/s ({r / first:4.2f}x of context {contexts[0]})" for n, r in rates.items())
            + f" (load {open('/proc/loadavg').read().split()[0]})", flush=True)


def profile_decode(runner, prompts, steps, pool_dir) -> None:
    """The ops of `steps` decode steps (after 4 unprofiled ones), by self CPU time."""
    from torch.profiler import ProfilerActivity, profile
    blocks = map_fresh_pool(runner, prompts, steps + 4, pool_dir)
    last = runner.execute(make_plan(1, [0] * len(prompts), prompts, blocks)).tokens.tolist()
    pos = [len(p) for p in prompts]

    def decode(k):
        nonlocal last, pos
        last = runner.execute(make_plan(2 + k, pos, [[x] for x in last], blocks)).tokens.tolist()
        pos = [x + 1 for x in pos]
    for k in range(4):
        decode(k)
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for k in range(steps):
            decode(4 + k)
    wall = (time.perf_counter() - t) / steps
    events = prof.key_averages()
    print(f"batch {len(prompts)}: {wall * 1e3:.1f} ms a step under the profiler, "
          f"{sum(e.count for e in events) / steps:.0f} op calls a step (nested ones included)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))


def bench_hf(model, prompts, steps) -> dict:
    """HF generate, greedy, a static left-padded batch. Decode rate from the difference between
    generating steps + 1 tokens and 1 token, so that prefill is not counted as decode."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run(new: int) -> float:
        t = time.perf_counter()
        model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                       pad_token_id=0)
        return time.perf_counter() - t

    with torch.inference_mode():
        run(2)  # warm-up
        first, full = run(1), run(steps + 1)
    n = len(prompts)
    return {"decode": n * steps / (full - first), "e2e": n * (steps + 1) / full}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int4", "int8"])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--repeat", type=int, default=2, help="alternate runs, report the best (shared machines are noisy)")
    ap.add_argument("--vs", default="", metavar="ENV=VALUE,...",
                    help="also run a runner loaded with these environment variables (e.g. LLMOS_FUSE=0), side by side")
    ap.add_argument("--context", default="", metavar="N,N,...",
                    help="instead: decode rate of each batch at these context lengths (prompts of N tokens)")
    ap.add_argument("--profile", type=int, default=0, metavar="BATCH",
                    help="instead: profile decode steps at this batch size (torch profiler, ops by self time)")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = prepare_model_dir(args.model, Paths.from_env().models_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    t = time.perf_counter()
    runner = ModelRunner(model_dir, dtype=args.dtype)
    load_s = time.perf_counter() - t
    other = None
    if args.vs:
        env = dict(kv.split("=", 1) for kv in args.vs.split(","))
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            t = time.perf_counter()
            other = ModelRunner(model_dir, dtype=args.dtype)
            print(f"load: runner {load_s:.1f} s, runner with {args.vs} {time.perf_counter() - t:.1f} s")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    if args.context:
        with tempfile.TemporaryDirectory() as d:
            return bench_contexts(runner, tok, [int(n) for n in args.context.split(",")],
                                  [int(b) for b in args.batches.split(",")], args.steps, d)
    if args.profile:
        with tempfile.TemporaryDirectory() as d:
            return profile_decode(runner, load_prompts(tok, args.profile), args.steps, d)
    hf = None if args.no_hf or args.vs else AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, runner.info()["dtype"]), local_files_only=True).eval()   # int4: vs bf16
    print(f"model {args.model} dtype {args.dtype} threads {torch.get_num_threads()} steps {args.steps}")
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        for b in map(int, args.batches.split(",")):
            prompts = load_prompts(tok, b)
            best = lambda runs: {k: max(r[k] for r in runs) for k in runs[0]}  # noqa: E731
            if other is not None:
                p = bench_pair(runner, other, prompts, args.steps, d)
                print(f"batch {b:3d}: median decode step {p['a'] * 1e3:6.1f} ms, with {args.vs} {p['b'] * 1e3:6.1f} ms:"
                      f" runner at {p['b'] / p['a']:4.2f}x its speed, same tokens {p['same']}"
                      f" (load {open('/proc/loadavg').read().split()[0]})", flush=True)
                continue
            ours, base = [], []
            for _ in range(args.repeat):
                ours.append(bench_runner(runner, prompts, args.steps, d))
                if hf is not None:
                    base.append(bench_hf(hf, prompts, args.steps))
            ours = best(ours)
            line = (f"batch {b:3d}: runner decode {ours['decode']:6.1f} tok/s, prefill {ours['prefill']:6.1f} "
                    f"tok/s, end-to-end {ours['e2e']:6.1f} tok/s")
            if hf is not None:
                base = best(base)
                line += (f" | HF generate decode {base['decode']:6.1f}, end-to-end {base['e2e']:6.1f} tok/s"
                         f" | ratio decode {ours['decode'] / base['decode']:4.2f}x,"
                         f" end-to-end {ours['e2e'] / base['e2e']:4.2f}x")
            print(line, flush=True)


if __name__ == "__main__":
    main()
