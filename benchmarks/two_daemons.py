"""Prefix-cache hit rate across two daemons behind SGLang's model gateway (smg), by routing
policy, and what a client sees when one daemon dies. One run, one machine.

    pip install -e '.[cluster]'              # smg==1.13.0
    python benchmarks/two_daemons.py         # tiny model: routing, not speed, is measured
    python benchmarks/two_daemons.py --model smollm2 --groups 8 --per-group 6

Workload: `groups` groups of completion prompts, each group sharing a distinct prefix of
`words` words (about one token each), sent one at a time in rounds of one prompt per group
in a shuffled order, so a group's requests are interleaved with the others' and each
request finds the ones before it cached wherever they went.
Each policy gets fresh prefixes and its own router, against the same two daemons. The hit
rate is the daemons' prefix-cache hit_tokens / queried_tokens over that policy's requests
(GET /llmos/v1/memory); affinity is the share of a group's requests that went to the
daemon that served most of that group.

Failover: a cache_aware router, then SIGKILL of the daemon holding most groups; requests
are sent back to back until smg marks it unhealthy (health checks every 1 s, 2 failures),
then every group's prompts once more.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from daemon_harness import bench_model_dir, cpu_model  # noqa: E402
from gateway_kit import WORKER_HEADER, Pair, Router, prefix_groups, run_phase  # noqa: E402


def failover(pair: Pair, root: Path, args) -> dict:
    r = Router(pair, "cache_aware", root / "smg-failover.log")
    try:
        r.wait_healthy({"a", "b"})
        prompts = prefix_groups(args.groups, 2, args.words, seed=99)
        before = run_phase(r, prompts)
        victim = max(before["per_daemon"], key=before["per_daemon"].get)
        survivor = next(n for n in pair.urls if n != victim)
        pair.kill(victim)
        t0, window = time.monotonic(), []
        while r.healthy() != {survivor}:
            if time.monotonic() - t0 > 180:
                raise TimeoutError("smg did not notice the dead daemon within 180 s")
            resp = r.complete(prompts[len(window) % len(prompts)][1])
            window.append(resp.status_code)
        noticed_s = time.monotonic() - t0
        after = [r.complete(p) for _, p in prompts]
        return {"victim": victim, "noticed_s": noticed_s, "window": window,
                "after_ok": sum(x.status_code == 200 and pair.name_of(x.headers.get(WORKER_HEADER)) == survivor
                                for x in after), "after_n": len(after)}
    finally:
        r.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny' (random 2-layer Llama) or a registry spec (smollm2)")
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--per-group", type=int, default=4)
    ap.add_argument("--words", type=int, default=200, help="words in each group's shared prefix")
    ap.add_argument("--policies", default="cache_aware,random,round_robin")
    args = ap.parse_args()
    model_dir = bench_model_dir(args.model)
    root = Path(tempfile.mkdtemp(prefix="llmos-two-"))
    pair = Pair(root, model_dir).wait_ready()
    results = {}
    try:
        for seed, policy in enumerate(args.policies.split(",")):
            r = Router(pair, policy, root / f"smg-{policy}.log")
            try:
                r.wait_healthy({"a", "b"})
                results[policy] = run_phase(r, prefix_groups(args.groups, args.per_group, args.words, seed=seed))
            finally:
                r.stop()
        fo = failover(pair, root, args)
    finally:
        pair.stop()

    n = args.groups * args.per_group
    print(f"two llmosd daemons behind smg 1.13.0, model {args.model}, CPU {cpu_model()}")
    print(f"{args.groups} groups x {args.per_group} requests ({n}), ~{args.words}-token shared prefix each, "
          "interleaved in shuffled rounds, one at a time")
    print(f"{'policy':<12} {'hit rate':>9} {'hit / queried tokens':>22} {'affinity':>9}  requests a/b")
    for policy, res in results.items():
        pd = res["per_daemon"]
        print(f"{policy:<12} {res['hit_rate']:>9.1%} {res['hit_tokens']:>10} / {res['queried_tokens']:<10}"
              f" {res['affinity']:>9.0%}  {pd.get('a', 0)}/{pd.get('b', 0)}")
    if "cache_aware" in results and "random" in results and results["random"]["hit_rate"]:
        print(f"cache_aware / random hit rate: {results['cache_aware']['hit_rate'] / results['random']['hit_rate']:.2f}x")
    ok = sum(s == 200 for s in fo["window"])
    print(f"failover: daemon {fo['victim']} SIGKILLed; smg marked it down after {fo['noticed_s']:.1f} s; "
          f"{ok} of {len(fo['window'])} requests sent meanwhile answered 200; afterwards "
          f"{fo['after_ok']} of {fo['after_n']} answered 200 by the survivor")


if __name__ == "__main__":
    main()
