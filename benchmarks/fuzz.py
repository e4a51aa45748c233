"""Fuzz the whole daemon with a bigger budget than CI (tests/test_fuzz_daemon.py).

    python benchmarks/fuzz.py --cases 3000 --seed 1
    python benchmarks/fuzz.py --cases 600 --batch-cases 40 --no-request-id --verbose

Sends hypothesis-generated hostile bodies (tests/fuzz_bodies.py: every known field at its
edges and beyond, NaN/Infinity literals, lone surrogates, huge ints, deep nesting, unknown
fields, hostile headers) to POST /v1/completions and /v1/chat/completions, raw garbage
bodies to both, hostile batch files to /v1/files + /v1/batches, and bodies derived from the
daemon's own GET /openapi.json (tests/fuzz_schema.py: a valid body with one field changed,
judged by the schema; one it refuses must be a 400 naming that field, and every 4xx must
name a field), as requests and as batch lines, all against a real llmosd serving the tiny
random model. After every case it checks: status < 500 except
503/504, an answer within --timeout, the kept-alive connection still sound, no driver
restart, nothing left in flight, and the reference greedy request still answering its
reference text; a case that reached the model runs again beside a greedy stream, which
must keep its own text (tests/fuzz_bodies.py says it all).

Prints the cases run per endpoint, the status histogram, crashes (5xx other than 503/504,
dropped connections, driver restarts: want 0), wedges (no answer in time, or the daemon
broken afterwards: want 0), every distinct finding with the daemon's log lines, and the CPU.
--cases is split: 40% completions, 40% chat, 20% raw bodies; --batch-cases (default
cases/50) batch files on top; --schema-cases (default cases/5) from /openapi.json on top,
half completions and half chat, and a batch file of them per 50. Same --seed and --cases,
same cases.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import fuzz_bodies as fb  # noqa: E402
import fuzz_schema as fs  # noqa: E402
from daemon_harness import Daemon, bench_model_dir, cpu_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=3000, help="request cases in all (split 40/40/20)")
    ap.add_argument("--batch-cases", type=int, default=None, help="batch files (default: cases/50)")
    ap.add_argument("--schema-cases", type=int, default=None,
                    help="cases derived from /openapi.json (default: cases/5; half per endpoint)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds an answer may take before it is a wedge")
    ap.add_argument("--token-budget", type=int, default=512, help="n x max_tokens kept under this per body")
    ap.add_argument("--max-wedges", type=int, default=10,
                    help="stop a campaign after this many wedges/hangs (each costs a timeout and a restart)")
    ap.add_argument("--no-request-id", action="store_true",
                    help="send no X-Request-Id headers (e.g. while a bug with reused ids hides the rest)")
    ap.add_argument("--no-minimize", action="store_true", help="do not shrink the body of each new finding")
    ap.add_argument("--verbose", action="store_true", help="one line per case")
    args = ap.parse_args()
    batch_cases = args.cases // 50 if args.batch_cases is None else args.batch_cases
    schema_cases = args.cases // 5 if args.schema_cases is None else args.schema_cases

    model_dir = bench_model_dir("tiny")
    root = Path(tempfile.mkdtemp(prefix="llmos-fuzz-"))

    def start(home):
        return Daemon(home, [f"{fb.MODEL}={model_dir}"], "--max-model-len", "256",
                      "--drain-timeout", "5").wait_ready(600)
    t0 = time.monotonic()
    fuzzer = fb.Fuzzer(start, root, timeout=args.timeout, minimize=not args.no_minimize,
                       max_wedges=args.max_wedges, verbose=args.verbose)
    rid = not args.no_request_id
    plan = [("completions", fuzzer.check, fb.completion_cases(args.token_budget, rid), int(args.cases * 0.4)),
            ("chat", fuzzer.check, fb.chat_cases(args.token_budget, rid), int(args.cases * 0.4)),
            ("raw", fuzzer.check, fb.raw_cases(), args.cases - 2 * int(args.cases * 0.4)),
            ("batch", fuzzer.check_batch, fb.batch_cases(args.token_budget), batch_cases)]
    doc = fuzzer.http.get("/openapi.json").json()   # the daemon's own description of its bodies
    plan += [("schema completions", fuzzer.check, fs.request_cases(doc, fb.COMPLETIONS), schema_cases // 2),
             ("schema chat", fuzzer.check, fs.request_cases(doc, fb.CHAT), schema_cases - schema_cases // 2),
             ("schema batch", fuzzer.check_batch, fs.batch_cases(doc), schema_cases // 50)]
    try:
        for i, (name, check, strategy, n) in enumerate(plan):
            if n <= 0:
                continue
            t = time.monotonic()
            skipped = fuzzer.skipped
            fb.campaign(check, strategy, n, seed=args.seed * 10 + i, fuzzer=fuzzer)
            stopped = f", stopped after {args.max_wedges} wedges ({fuzzer.skipped - skipped} skipped)" \
                if fuzzer.skipped > skipped else ""
            print(f"campaign {name}: {n} drawn in {time.monotonic() - t:.0f} s{stopped}", flush=True)
        fuzzer.memory_back_to_empty()
    finally:
        fuzzer.close()

    findings = list(fuzzer.findings.values())
    crashes = sum(c for k, c in fuzzer.counts.items() if k == "crash")
    wedges = sum(c for k, c in fuzzer.counts.items() if k in ("wedge", "hang"))
    print(f"\nfuzz: seed {args.seed}, {time.monotonic() - t0:.0f} s, {fuzzer.starts} daemon start(s), "
          f"CPU: {cpu_model()}")
    print("cases per endpoint: " + ", ".join(f"{k} {v}" for k, v in sorted(fuzzer.cases.items()))
          + f" (duplicates drawn and skipped: {fuzzer.duplicates})")
    print("status histogram:")
    for endpoint in sorted(fuzzer.cases):
        hist = Counter({st: n for (e, st), n in fuzzer.statuses.items() if e == endpoint})
        print(f"  {endpoint:18s} " + "  ".join(f"{st}: {n}" for st, n in sorted(hist.items(), key=lambda x: str(x[0]))))
    top = Counter({p: n for (e, p), n in fuzzer.params.items()}).most_common(12)
    print("4xx by error.param: " + ", ".join(f"{p}: {n}" for p, n in top))
    print(f"cases from /openapi.json: {fuzzer.schema_cases['valid']} valid by the schema, "
          f"{fuzzer.schema_cases['invalid']} invalid (each a 400 naming its field, or an 'unnamed' finding)")
    print(f"crashes (5xx other than 503/504, dropped connections, driver restarts): {crashes}   (want 0)")
    print(f"wedges (no answer within {args.timeout:g} s, or the daemon broken afterwards): {wedges}   (want 0)")
    others = {k: c for k, c in fuzzer.counts.items() if k not in ("crash", "wedge", "hang")}
    if others:
        print("other broken invariants: " + ", ".join(f"{k} {c}" for k, c in sorted(others.items())))
    for reason in fuzzer.restart_reasons:
        print(fb.safe(f"daemon restarted {reason[:400]}"))
    if findings:
        print(f"\n{len(findings)} distinct finding(s):\n{fuzzer.report()}")
    print(f"\ndaemon homes and logs: {root}")
    sys.exit(1 if findings else 0)


if __name__ == "__main__":
    main()
