"""Grammar engines on our tokenizer: xgrammar against llguidance (issue 16 item 2).

For a few JSON schemas (and a regex, a choice) on smollm2's tokenizer (49,152 tokens):
the one-time tokenizer setup, the compile time of each grammar (cold: no engine cache),
and the time of one token mask while walking a valid output token by token. Each figure
is the median of --repeat runs (1-20); CPU only, one thread of ours.

    HF_HUB_OFFLINE=1 python benchmarks/structured.py [--repeat 5] [--json out.json]
    HF_HUB_OFFLINE=1 python benchmarks/structured.py --serve 1,32 [--repeat 2] [--max-tokens 128]

llguidance is a dependency; xgrammar is measured when installed (pip install xgrammar==0.2.9).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCHEMAS = {
    "small": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "kind": {"enum": ["a", "b", "c"]},
        "owner": {"type": "object", "properties": {"email": {"type": "string"}, "admin": {"type": "boolean"}},
                  "required": ["email", "admin"], "additionalProperties": False}},
        "required": ["id", "tags", "kind", "owner"], "additionalProperties": False},
    "wide40": {"type": "object", "properties": {f"field_{i}": {"type": ["string", "integer", "boolean"][i % 3]}
                                                for i in range(40)},
               "required": [f"field_{i}" for i in range(40)], "additionalProperties": False},
    "any_json": {"type": "object"},
}
INSTANCES = {
    "small": {"name": "Ada Lovelace", "age": 36},
    "nested": {"id": 7, "tags": ["x", "yy"], "kind": "b", "owner": {"email": "a@b.c", "admin": True}},
    "wide40": {f"field_{i}": ["v", 12, False][i % 3] for i in range(40)},
    "any_json": {"k": [1, 2, {"z": None}], "s": "text"},
}
REGEX = (r"\d{3}-\d{4}", "555-1234")
CHOICE = (["positive", "negative", "neutral"], "neutral")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def text_of(name: str) -> str:
    return json.dumps(INSTANCES[name])   # the layout llmos asks for (grammar_spec.JSON_LAYOUT)


class Llguidance:
    name = "llguidance"

    def __init__(self, tok, vocab):
        import llguidance
        import llguidance.hf
        import llguidance.torch as lt
        self.ll, self.lt, self.vocab = llguidance, lt, vocab
        self.setup_ms = median_ms(lambda: llguidance.hf.from_tokenizer(tok, n_vocab=vocab), 1)
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)

    def grammar(self, kind, spec):
        M = self.ll.LLMatcher
        if kind == "json":
            from llmos.grammar_spec import JSON_LAYOUT
            return M.grammar_from_json_schema(json.dumps(spec), defaults=JSON_LAYOUT)
        if kind == "regex":
            return M.grammar_from_regex(spec)
        return M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec))

    def compile(self, g):
        m = self.ll.LLMatcher(self.tok, g, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def walk(self, g, ids):
        m, mask = self.compile(g), self.lt.allocate_token_bitmask(1, self.vocab)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            self.lt.fill_next_token_bitmask(m, mask, 0)
            times.append((time.perf_counter() - t0) * 1e3)
            assert m.consume_token(t), (t, m.get_error())
        return times, m.is_accepting()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab):
        import xgrammar as xgr
        self.xgr, self.vocab = xgr, vocab
        t = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.setup_ms = (time.perf_counter() - t) * 1e3

    def grammar(self, kind, spec):
        return kind, spec

    def compile(self, g):
        kind, spec = g
        c = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        if kind == "json":
            return c.compile_json_schema(json.dumps(spec), any_whitespace=False, separators=(", ", ": "))
        if kind == "regex":
            return c.compile_regex(spec)
        return c.compile_grammar("root ::= " + " | ".join(json.dumps(x) for x in spec))

    def walk(self, g, ids):
        m = self.xgr.GrammarMatcher(self.compile(g))
        mask = self.xgr.allocate_token_bitmask(1, self.vocab)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            m.fill_next_token_bitmask(mask)
            times.append((time.perf_counter() - t0) * 1e3)
            assert m.accept_token(t), t
        return times, m.is_terminated() or m.accept_token(self.info.stop_token_ids[0])


# --serve: one string the model never finishes within max_tokens, so that every request makes
# exactly max_tokens tokens under the mask, as the unconstrained ones do with ignore_eos; string
# content is the costly case for llguidance (most of the vocabulary is allowed).
SERVE_SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 4000}},
                "required": ["story"], "additionalProperties": False}


def serve(levels: list[int], max_tokens: int, repeat: int, dtype: str) -> dict:
    """Tokens/s through a real daemon (smollm2) with and without a schema, A/B interleaved."""
    import asyncio
    import tempfile
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import loadgen
    from daemon_harness import Daemon
    from llmos.models.registry import prepare_model_dir
    cache = Path(os.environ.get("LLMOS_MODEL_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "models"))
    prompts = json.loads((Path(__file__).resolve().parent / "prompts.json").read_text())
    d = Daemon(Path(tempfile.mkdtemp(prefix="llmos-structured-")), [f"smollm2={prepare_model_dir('smollm2', cache)}"],
               "--dtype", dtype, "--kv-memory", "2GiB").wait_ready(600)

    async def once(c: int, schema: bool) -> dict:
        async with loadgen.client_for("http://llmos", uds=str(d.socket)) as client:
            bodies = []
            for i in range(c):
                b = loadgen.chat_body("smollm2", prompts[i % len(prompts)], max_tokens)
                if schema:
                    del b["ignore_eos"]
                    b["response_format"] = {"type": "json_schema", "json_schema": {"name": "s", "schema": SERVE_SCHEMA}}
                bodies.append(b)
            t0 = time.perf_counter()
            streams = await asyncio.gather(*(loadgen.stream_one(client, b) for b in bodies))
            return loadgen.summarize(list(streams), time.perf_counter() - t0)

    out = {}
    try:
        asyncio.run(once(2, True))   # warm-up: the grammar tokenizer is built once per driver
        for c in levels:
            runs = {False: [], True: []}
            for _ in range(repeat):
                for schema in (False, True):
                    r = asyncio.run(once(c, schema))
                    assert r["tokens"] == c * max_tokens, r
                    runs[schema].append(r["tok_s"])
            plain, constrained = statistics.median(runs[False]), statistics.median(runs[True])
            out[c] = {"plain_tok_s": runs[False], "schema_tok_s": runs[True], "ratio": constrained / plain,
                      "extra_ms_per_step": (1e3 * c / constrained - 1e3 * c / plain)}
            print(f"{c:3d} streams x {max_tokens} tokens: without a schema {plain:.1f} tok/s, with {constrained:.1f} "
                  f"({100 * constrained / plain:.0f}%; {out[c]['extra_ms_per_step']:+.1f} ms a step); runs "
                  f"{[round(x, 1) for x in runs[False]]} / {[round(x, 1) for x in runs[True]]}", flush=True)
    finally:
        d.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5, choices=range(1, 21), metavar="1..20")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--serve", default=None, metavar="1,32",
                    help="instead: tokens/s through a daemon with and without a schema at these stream counts")
    ap.add_argument("--max-tokens", type=int, default=128, choices=range(8, 1025), metavar="8..1024")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    if args.serve:
        levels = [int(x) for x in args.serve.split(",")]
        if not all(1 <= c <= 256 for c in levels):
            ap.error("--serve: stream counts in 1..256")
        out = serve(levels, args.max_tokens, args.repeat, args.dtype)
        print(f"CPU: {platform.processor() or platform.machine()} ({_cpu()}), {os.cpu_count()} cores, "
              f"load {os.getloadavg()[0]:.1f}")
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
        return
    import torch
    from transformers import AutoTokenizer
    from llmos.models.registry import prepare_model_dir
    torch.set_num_threads(1)
    cache = Path(os.environ.get("LLMOS_MODEL_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "models"))
    tok = AutoTokenizer.from_pretrained(prepare_model_dir("smollm2", cache))
    vocab = 49152
    cases = {n: ("json", s, text_of(n)) for n, s in SCHEMAS.items()}
    cases["regex"] = ("regex", REGEX[0], REGEX[1])
    cases["choice"] = ("choice", CHOICE[0], CHOICE[1])
    report = {"cpu": _cpu(), "vocab": vocab, "engines": {}}
    for cls in (Llguidance, Xgrammar):
        try:
            e = cls(tok, vocab)
        except ImportError as exc:   # xgrammar is not a dependency: `pip install xgrammar` to compare
            print(f"{cls.name}: not installed ({exc})")
            continue
        rows = {}
        for name, (kind, spec, text) in cases.items():
            g = e.grammar(kind, spec)
            compile_ms = median_ms(lambda: e.compile(g), args.repeat)
            ids = tok.encode(text, add_special_tokens=False)
            walks = [e.walk(g, ids) for _ in range(args.repeat)]
            per = [statistics.mean(w[0]) for w in walks]
            rows[name] = {"compile_ms": round(compile_ms, 2), "mask_ms_mean": round(statistics.median(per), 3),
                          "mask_ms_max": round(max(max(w[0]) for w in walks), 3), "tokens": len(ids),
                          "accepting": bool(walks[0][1])}
        report["engines"][e.name] = {"tokenizer_setup_ms": round(e.setup_ms, 1), "cases": rows}
        print(f"{e.name}: tokenizer setup {e.setup_ms:.0f} ms")
        print(f"  {'case':10s} {'compile ms':>11s} {'mask ms (mean)':>15s} {'mask ms (max)':>14s} {'tokens':>7s}")
        for name, r in rows.items():
            print(f"  {name:10s} {r['compile_ms']:11.2f} {r['mask_ms_mean']:15.3f} {r['mask_ms_max']:14.3f} "
                  f"{r['tokens']:7d}{'' if r['accepting'] else '  (not accepting!)'}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
