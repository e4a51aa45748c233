"""Grammar engines on our tokenizer: xgrammar against llguidance (issue 16 item 2).

For a few JSON schemas (and a regex, a choice) on smollm2's tokenizer (49,152 tokens):
the one-time tokenizer setup, the compile time of each grammar (cold: no engine cache),
and the time of one token mask while walking a valid output token by token. Each figure
is the median of --repeat runs (1-20); CPU only, one thread of ours.

    HF_HUB_OFFLINE=1 python benchmarks/structured.py [--repeat 5] [--json out.json]

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


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def text_of(name: str) -> str:
    return json.dumps(INSTANCES[name], separators=(",", ":"))


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
            return M.grammar_from_json_schema(json.dumps(spec))
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
            return c.compile_json_schema(json.dumps(spec), any_whitespace=False, separators=(",", ":"))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5, choices=range(1, 21), metavar="1..20")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
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
    report = {"cpu": platform.processor() or platform.machine(), "vocab": vocab, "engines": {}}
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
