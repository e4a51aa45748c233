"""Upgrades under load (issue 13): failed requests and TTFT while a model switches version.

    python benchmarks/upgrade.py                     # tiny qwen2: v1 seed 0, v2 seed 1, v3 broken
    python benchmarks/upgrade.py --model smollm2     # smollm2 and a copy of it, bf16
    python benchmarks/upgrade.py --streams 32 --steady 30

A model `qw` is registered with v1 and served (`llmosd --model qw`). --streams clients each
stream a chat (benchmarks/prompts.json, greedy, --max-tokens tokens, EOS ignored) again and
again. After --steady seconds, `llmos models upgrade qw --to V2` runs (the CLI, as a user
would: it adds v2 and waits for the switch); the script follows GET
/llmos/v1/models/qw/upgrade until the watch ends (v1 retired). After --settle seconds,
`llmos models upgrade qw --to BROKEN` (a copy of v1 without model.safetensors), which must
fail to load and roll back; then --settle seconds more.

Reported per window (a request belongs to the window in which it was sent): requests ok and
failed, TTFT p50/p99. The steady state leaves out the first --ramp seconds (all streams start
at once, so their first prefills queue behind each other). The switch window runs from the
command to the end of the watch (to the rollback for the broken version). Also: the phases'
times as the status showed them (polled every 0.1 s), switch_s from the daemon, the CLI's
exit and its last line, and (tiny model only: smollm2's v2 is a copy) which version answered
each request: greedy decoding gives one answer per prompt and version in float32, so v1's are
those of the steady state and v2's those after the switch; a stream that mixed versions
would be neither.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
import loadgen  # noqa: E402
from daemon_harness import Daemon, cpu_model  # noqa: E402


@dataclass
class Sent:
    prompt: int
    t0: float                  # monotonic, when sent
    ttft: float | None = None
    end: float | None = None
    tokens: int = 0
    text: str = ""
    error: str | None = None


async def one(client, model: str, i: int, prompt: str, max_tokens: int) -> Sent:
    s = Sent(i, time.monotonic())
    body = loadgen.chat_body(model, prompt, max_tokens)
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                chunk = loadgen.parse_sse(line)
                if chunk is None:
                    continue
                if "error" in chunk:
                    raise RuntimeError(f"error in stream: {chunk['error']}")
                for c in chunk.get("choices") or []:
                    text = (c.get("delta") or {}).get("content")
                    if text:
                        s.ttft = s.ttft if s.ttft is not None else time.monotonic() - s.t0
                        s.text += text
                if chunk.get("usage"):
                    s.tokens = chunk["usage"]["completion_tokens"]
        if s.tokens != max_tokens:
            raise RuntimeError(f"{s.tokens} tokens, not {max_tokens}")
    except Exception as exc:   # every failure is counted and shown
        s.error = f"{type(exc).__name__}: {exc}"[:300]
    s.end = time.monotonic()
    return s


async def stream_loop(client, model, k, prompts, max_tokens, stop: asyncio.Event, out: list) -> None:
    """Client k: its prompt again and again until told to stop."""
    i = k % len(prompts)
    while not stop.is_set():
        out.append(await one(client, model, i, prompts[i], max_tokens))


async def follow(client, name: str, stop: asyncio.Event, phases: list) -> None:
    """Record each change of the upgrade's phase (None when none runs), with its time."""
    last = object()
    while not stop.is_set():
        st = (await client.get(f"/llmos/v1/models/{name}/upgrade")).json()
        phase = st["upgrade"]["phase"] if st["upgrade"] else None
        if phase != last:
            phases.append((time.monotonic(), phase, st))
            last = phase
        await asyncio.sleep(0.1)


async def status(client, name: str) -> dict:
    return (await client.get(f"/llmos/v1/models/{name}/upgrade")).json()


async def upgrade(home: Path, client, name: str, to: Path, phases: list, timeout: float = 600) -> dict:
    """`llmos models upgrade NAME --to TO`, then wait until no upgrade runs."""
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from llmos.cli.main import cli; cli()", "--home", str(home),
        "models", "upgrade", name, "--to", str(to), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = (await proc.communicate())[0].decode(errors="replace").strip().splitlines()
    cli_s = time.monotonic() - t0
    while (st := await status(client, name))["upgrade"] is not None:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"upgrade still running after {timeout}s: {st}")
        await asyncio.sleep(0.1)
    end = time.monotonic()
    await asyncio.sleep(0.3)   # the follower's last sample
    seen = [(round(t - t0, 2), p) for t, p, _ in phases if t >= t0 - 0.05]
    return {"t0": t0, "end": end, "cli_s": cli_s, "rc": proc.returncode, "cli_last": output[-1] if output else "",
            "last": st["last"], "serving": st["serving"], "phases": seen}


def window(sent: list[Sent], lo: float, hi: float) -> dict:
    mine = [s for s in sent if lo <= s.t0 < hi]
    ok = [s for s in mine if s.error is None]
    ttfts = [s.ttft for s in ok if s.ttft is not None]
    answers: dict[int, set] = {}
    for s in ok:
        answers.setdefault(s.prompt, set()).add(s.text)
    return {"requests": len(mine), "ok": len(ok), "failed": len(mine) - len(ok),
            "errors": [s.error for s in mine if s.error][:3],
            "ttft_p50": loadgen.pct(ttfts, 50), "ttft_p99": loadgen.pct(ttfts, 99),
            "answers": sorted({len(v) for v in answers.values()}), "texts": answers}


def versions(args, work: Path) -> dict[int, Path]:
    from llmos.models.registry import prepare_model_dir
    from llmos.paths import Paths
    cache = Paths.from_env().models_dir
    smollm2 = prepare_model_dir("smollm2", cache)
    if args.model == "smollm2":
        v1 = smollm2
        v2 = work / "smollm2-copy"
        shutil.copytree(smollm2, v2)
    else:
        from conftest import tiny_model_dir
        v1 = tiny_model_dir("qwen2", cache, smollm2, seed=0)
        v2 = tiny_model_dir("qwen2", cache, smollm2, seed=1)
    broken = work / "qw-broken"
    shutil.copytree(v1, broken)
    (broken / "model.safetensors").unlink()   # it cannot load
    return {1: v1, 2: v2, 3: broken}


async def run(args, home: Path, v: dict[int, Path], prompts: list[str]) -> dict:
    stop, stop_follow, sent, phases = asyncio.Event(), asyncio.Event(), [], []
    async with loadgen.client_for("http://llmos", uds=str(home / "run" / "llmos.sock"), timeout=600) as client:
        await one(client, "qw", 0, prompts[0], 4)   # warm-up
        follower = asyncio.create_task(follow(client, "qw", stop_follow, phases))
        t_start = time.monotonic()
        clients = [asyncio.create_task(stream_loop(client, "qw", k, prompts, args.max_tokens, stop, sent))
                   for k in range(args.streams)]
        await asyncio.sleep(args.steady)
        good = await upgrade(home, client, "qw", v[2], phases)
        await asyncio.sleep(args.settle)
        bad = await upgrade(home, client, "qw", v[3], phases)
        await asyncio.sleep(args.settle)
        t_stop = time.monotonic()
        stop.set()
        await asyncio.gather(*clients)
        stop_follow.set()
        await follower
    return {"sent": sent, "good": good, "bad": bad, "t_start": t_start, "t_stop": t_stop}


def print_report(args, r: dict) -> None:
    good, bad, sent = r["good"], r["bad"], r["sent"]
    inf = float("inf")
    wins = [("steady, v1", r["t_start"] + args.ramp, good["t0"]),
            ("switch window: command -> end of watch", good["t0"], good["end"]),
            ("after the switch, v2", good["end"], bad["t0"]),
            ("broken v3: command -> rollback", bad["t0"], bad["end"]),
            ("after the rollback, v2", bad["end"], inf)]
    print(f"\nupgrade under load: {args.model}, {args.streams} streams x {args.max_tokens} tokens "
          f"({cpu_model()}, {os.cpu_count()} cores, 1-minute load average {r['load'][0]:.1f} before -> "
          f"{r['load'][1]:.1f} after)")
    stats = {name: window(sent, lo, hi) for name, lo, hi in wins}
    total_failed = sum(s.error is not None for s in sent)
    print(f"requests: {len(sent)} sent, {len(sent) - total_failed} ok, {total_failed} failed")
    v1, v2 = stats["steady, v1"]["texts"], stats["after the switch, v2"]["texts"]
    tell = args.model.startswith("tiny")   # smollm2's v2 is a copy: same answers
    if tell:
        print(f"answers: {stats['steady, v1']['answers']} distinct per prompt in the steady state, "
              f"{stats['after the switch, v2']['answers']} after the switch; they differ for "
              f"{sum(1 for p in v2 if v1.get(p) and not v1[p] & v2[p])} of {len(v2)} prompts")
    else:
        print("answers: v2 is a copy of v1 (same weights), so the answer does not tell the version")
    print(f"{'window':42s} {'s':>6s} {'sent':>5s} {'ok':>5s} {'failed':>6s} {'TTFT p50':>9s} {'p99':>7s}  "
          f"answered by v1 / v2 / neither")
    for (name, lo, hi), w in zip(wins, stats.values()):
        length = (min(hi, r["t_stop"]) - lo)
        p50 = f"{w['ttft_p50']:.3f}s" if w["ttft_p50"] is not None else "-"
        p99 = f"{w['ttft_p99']:.3f}s" if w["ttft_p99"] is not None else "-"
        ok = [x for x in sent if lo <= x.t0 < hi and x.error is None]
        one = [x.text in v1.get(x.prompt, ()) for x in ok]
        two = [x.text in v2.get(x.prompt, ()) for x in ok]
        by = f"{sum(one)} / {sum(two)} / {sum(not a and not b for a, b in zip(one, two))}" if tell else "n/a"
        print(f"{name:42s} {length:6.1f} {w['requests']:5d} {w['ok']:5d} {w['failed']:6d} {p50:>9s} {p99:>7s}  {by}")
        for e in w["errors"]:
            print(f"    error: {e}")
    for label, u in (("upgrade to v2", good), ("upgrade to broken v3", bad)):
        last = u["last"] or {}
        print(f"{label}: CLI exit {u['rc']} after {u['cli_s']:.1f}s ({u['cli_last'][:100]!r}); outcome "
              f"{last.get('outcome')!r}, switch_s {last.get('switch_s')}, reason {last.get('reason')!r}; "
              f"command -> end {u['end'] - u['t0']:.1f}s; serving v{u['serving']}")
        print(f"    phases (s after the command): {u['phases']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    ap.add_argument("--dtype", default=None, help="default: float32 for tiny, bfloat16 for smollm2")
    ap.add_argument("--streams", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--steady", type=float, default=20.0, help="seconds of load before the upgrade")
    ap.add_argument("--ramp", type=float, default=5.0, help="seconds at the start left out of the steady state")
    ap.add_argument("--settle", type=float, default=15.0, help="seconds of load after each upgrade")
    ap.add_argument("--kv-memory", default="1GiB")
    args = ap.parse_args()
    dtype = args.dtype or ("bfloat16" if args.model == "smollm2" else "float32")
    prompts = json.loads((HERE / "prompts.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="llmos-upgrade-"))
    v = versions(args, work)
    home = work / "home"
    from llmos.models.catalog import Catalog
    from llmos.paths import Paths
    Catalog(Paths.from_env(home)).add("qw", str(v[1]))
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    d = Daemon(home, ["qw"], "--dtype", dtype, "--kv-memory", args.kv_memory, "--max-loaded-models", "2",
               "--max-model-len", "1024").wait_ready(600)
    try:
        r = asyncio.run(run(args, home, v, prompts))
    finally:
        d.stop()
    r["load"] = (load0, os.getloadavg()[0])
    args.model = f"{args.model} {dtype}"
    print_report(args, r)
    print(f"({time.perf_counter() - t0:.0f}s in all; daemon log {home / 'llmosd.out'})")
    shutil.rmtree(work / "smollm2-copy", ignore_errors=True)


if __name__ == "__main__":
    main()
