"""Decode attention alone: each backend of llmos/drivers/model/decode_backends.py on the
same pool, batch and contexts, in one run (the "gather" backend is the baseline).

    python benchmarks/decode_attention.py [--dtype bfloat16] [--threads 2]

Shapes are smollm2's (3 kv heads, 3 query heads each, head dim 64, blocks of 16); one
layer; contexts ragged by up to 20 tokens below the nominal length, blocks shuffled.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from llmos.drivers.model.threads import configure_cpu_env  # noqa: E402

configure_cpu_env()   # as the model driver does, before torch loads OpenMP
import torch  # noqa: E402

from test_decode_backends import decode_step, make_pool  # noqa: E402

from llmos.drivers.model import decode_backends, native  # noqa: E402


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--cases", default="1:70,8:190,32:190,32:1000,32:2000", help="batch:context,...")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backends = ["gather"] + (["native"] if native.load() is not None else [])
    dtype = getattr(torch, args.dtype)
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "?")
    print(f"{cpu}, {args.threads} threads, {args.dtype}; median of {args.repeat} calls, ms per layer")
    print(f"{'batch':>5} {'context':>7} " + " ".join(f"{b:>9}" for b in backends) + "   native/gather speed-up")
    for case in args.cases.split(","):
        nd, length = map(int, case.split(":"))
        blocks = nd * (-(-length // 16) + 1) + 2
        pool = make_pool(dtype, blocks=blocks, bs=16, kvh=3, d=64, layers=1)
        ctx = [max(1, length - (i * 7) % 21) for i in range(nd)]
        q = torch.randn(nd, 9, 64).to(dtype)
        ms = {}
        for _ in range(2):   # alternate, keep the best: a shared machine is noisy
            for b in backends:
                step, _ = decode_step(pool, ctx, backend=b)
                t = timed(lambda: decode_backends.get(b)(step, 0, q, 0.125), args.repeat)
                ms[b] = min(ms.get(b, t), t)
        ratio = f"{ms['gather'] / ms['native']:.2f}x" if "native" in ms else "-"
        print(f"{nd:>5} {length:>7} " + " ".join(f"{ms[b]:>9.3f}" for b in backends) + f"   {ratio}", flush=True)


if __name__ == "__main__":
    main()
