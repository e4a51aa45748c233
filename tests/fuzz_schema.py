"""Fuzz cases derived from the daemon's own GET /openapi.json: a valid body mutated in one
field, each mutation made from that field's schema (its bounds and one past them, other types,
other constants, a missing required field or an unknown one, nested fields one at a time), and
judged by the schema itself (jsonschema) as valid or invalid.

What a case then asserts (tests/fuzz_bodies.py's Fuzzer.check): the general invariants (no 5xx
but 503/504, an answer in time, a normal request answered right after); every 4xx names a
field (error.param); and a body the schema refuses is a 400 whose param and message name the
field that was mutated. A body the schema accepts may still be refused (a rule across fields,
the vocabulary, the context), but never without naming a field. The same mutations make batch
lines: one the schema refuses must be named in the upload's 400.

Used by tests/test_fuzz_daemon.py and benchmarks/fuzz.py.
"""
from __future__ import annotations

import re

from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from fuzz_bodies import CHAT, COMPLETIONS, REFERENCE, BatchCase, Case, bound_cost, encode, good_line

# Lists past 4,096 items and strings past 100,000 characters (one past their bound) are made only
# at the top of a body (a prompt of 1,048,577 ids, of 4,000,001 characters): each is megabytes.
LONG_VALID = 2_000        # a valid string longer than this is not sent whole (its tokenizing costs seconds)
MAX_PER_FIELD = 60        # mutations kept per top-level field (spread over its nesting)
PATTERN_EXAMPLES = ["a", "f", "1", "24h", "0", "get_weather", "created_at"]
# Where the validator accepts what the schema refuses, on purpose (their reasons in models.py).
LENIENT = [
    (re.compile(r"^structured_outputs\."), lambda v: v is False),   # null and false: "not given" (vLLM's rule)
    (re.compile(r"^(echo|use_beam_search)$"), lambda v: v == 0 and type(v) is not bool),   # 0 == False, as before
]


class Schema:
    """One request body's schema inside the OpenAPI document (its $refs to components)."""

    def __init__(self, doc: dict, path: str):
        self.defs = doc["components"]["schemas"]
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        self.root = self.deref(body)
        self.validator = Draft202012Validator({**body, "components": doc["components"]})

    def deref(self, s: dict) -> dict:
        while "$ref" in s:
            s = self.defs[s["$ref"].rsplit("/", 1)[1]]
        return s

    def branches(self, s: dict) -> list[dict]:
        s = self.deref(s)
        for key in ("anyOf", "oneOf"):
            if key in s:
                return [b for x in s[key] for b in self.branches(x)]
        return [s]

    def example(self, s: dict, depth: int = 0):
        """A small valid instance (the first branch that is not null)."""
        b = next((b for b in self.branches(s) if b.get("type") != "null"), self.branches(s)[0])
        if "const" in b:
            return b["const"]
        if "enum" in b:
            return b["enum"][0]
        kind = b.get("type")
        if kind == "object":
            props = b.get("properties", {})
            return {p: self.example(props[p], depth + 1) for p in b.get("required", [])}
        if kind == "array":
            return [self.example(b["items"], depth + 1) for _ in range(b.get("minItems", 0))]
        if kind == "string":
            if "pattern" in b:
                return next((x for x in PATTERN_EXAMPLES if re.fullmatch(b["pattern"].strip("^$"), x)), "a")
            return "a" * max(b.get("minLength", 0), 1 if depth == 0 else 0)
        if kind == "integer":
            return max(b.get("minimum", 0), min(1, b.get("maximum", 1)))
        if kind == "number":   # the middle of its range (1 where it has none)
            lo, hi = b.get("minimum", b.get("exclusiveMinimum")), b.get("maximum")
            return 1 if lo is None or hi is None else (lo + hi) / 2
        if kind == "boolean":
            return False
        return None

    def variants(self, s: dict, depth: int = 0) -> list:
        """Values for a field of schema `s`, valid and not (the schema decides which is which later)."""
        out = []
        for b in self.branches(s):
            out += self._branch(b, depth)
        return out

    def _branch(self, b: dict, depth: int) -> list:
        if "const" in b or "enum" in b:
            allowed = [b["const"]] if "const" in b else b["enum"][:6]
            return [*allowed, f"not-{allowed[0]}", 7, [allowed[0]]]
        kind = b.get("type")
        if kind == "null":
            return [None, 0, {}]
        if kind == "boolean":
            return [True, False, 1, "true"]
        if kind == "integer":
            lo, hi = b.get("minimum"), b.get("maximum")
            out = [0, 1, -1, 1.5, True, "1", 2**64, -2**64]
            out += [] if lo is None else [lo, lo - 1]
            out += [] if hi is None else [hi, hi + 1]
            return out
        if kind == "number":
            lo = b.get("minimum", b.get("exclusiveMinimum"))
            hi = b.get("maximum")
            out = [0, 0.5, -0.5, True, "0.5", 1e308, -1e308]
            out += [] if lo is None else [lo, lo - 0.001, lo + 1e-9]
            out += [] if hi is None else [hi, hi + 0.001, hi - 1e-9]
            return out
        if kind == "string":
            lo, hi = b.get("minLength", 0), b.get("maxLength")
            out = [self.example(b, depth), 5, "\ud800", " !", "a" * (lo + 1)]
            out += ["a" * (lo - 1)] if lo else []
            out += ["a" * hi] if hi is not None and hi <= LONG_VALID else []
            out += ["a" * (hi + 1)] if hi is not None and (hi < 100_000 or depth <= 1) else []
            return out
        if kind == "array":
            return self._array(b, depth)
        if kind == "object":
            return self._object(b, depth)
        return [5, "x", [], {}]

    def _array(self, b: dict, depth: int) -> list:
        item, lo, hi = self.example(b["items"], depth + 1), b.get("minItems", 0), b.get("maxItems")
        out = [[], [item] * max(lo, 1), "x", {"0": item}]
        out += [[item] * (lo - 1)] if lo else []
        out += [[item] * hi] if hi is not None and hi <= 300 else []
        out += [[item] * (hi + 1)] if hi is not None and (hi <= 4096 or depth == 0) else []
        if depth < 4:
            out += [[v] for v in self.variants(b["items"], depth + 1)]
            out += [[item, v] for v in self.variants(b["items"], depth + 1)[:3]]
        return out

    def _object(self, b: dict, depth: int) -> list:
        base = self.example(b, depth)
        out = [base, [], "x", {**base, "zz_unknown": 1}] if isinstance(base, dict) else [base]
        for p in b.get("required", []):
            out.append({k: v for k, v in base.items() if k != p})
        if depth < 4:
            for p, ps in b.get("properties", {}).items():
                out += [{**base, p: v} for v in self.variants(ps, depth + 1)]
        extra = b.get("additionalProperties")
        if isinstance(extra, dict):   # a map (logit_bias): keys by propertyNames, values by its schema
            key = self.example(b.get("propertyNames", {"type": "string"}), 1)
            out += [{key: v} for v in self.variants(extra, depth + 1)]
            out += [{"x y": self.example(extra)}, {str(i): self.example(extra) for i in range(b.get("maxProperties",
                                                                                                 16) + 1)}]
        return out

    def valid(self, body) -> bool:
        return self.validator.is_valid(body)


def _lenient(field: str, value) -> bool:
    return any(rx.search(field) and test(value) for rx, test in LENIENT)


def mutations(doc: dict, path: str) -> dict[str, list[tuple]]:
    """top-level field -> [(body, valid by the schema)], each body REFERENCE[path] with that field changed."""
    schema, base = Schema(doc, path), REFERENCE[path]
    out = {}
    for field, prop in schema.root["properties"].items():
        seen, cases = set(), []
        values = schema.variants(prop)
        step = max(1, len(values) // MAX_PER_FIELD)
        for value in values[::step][:MAX_PER_FIELD]:
            body = {**base, field: value}
            if field not in ("max_tokens", "max_completion_tokens", "n", "min_tokens"):
                body = bound_cost(body)
            key = encode(body)
            if key in seen:
                continue
            seen.add(key)
            past = isinstance(value, list) and len(value) > 10_000   # (made one past its bound: not worth judging)
            valid = not past and (schema.valid(body) or _lenient(_where(field, value), value))
            cases.append((body, valid))
        out[field] = cases
    out["zz_unknown"] = [({**base, "zz_unknown": 1}, False)]
    return out


def _where(field: str, value) -> str:
    """The mutated spot as a path prefix for LENIENT ("structured_outputs.regex")."""
    if isinstance(value, dict) and len(value) == 1:
        return f"{field}.{next(iter(value))}"
    return field


def request_cases(doc: dict, path: str):
    """POST path with a mutated body; case.expect = (field, valid by the schema)."""
    by_field = mutations(doc, path)
    fields = sorted(by_field)

    def case(pair, field):
        body, valid = pair
        return Case(path, encode(body), {"Content-Type": "application/json"}, body, expect=(field, valid))
    return st.sampled_from(fields).flatmap(lambda f: st.sampled_from(by_field[f]).map(lambda p: case(p, f)))


def batch_cases(doc: dict):
    """A batch file: a valid line, then lines whose bodies are mutations (refused by the
    schema: must be named as bad lines; accepted: unknown, as the daemon may still refuse them)."""
    per_url = {url: [pair for cases in mutations(doc, url).values() for pair in cases
                     if not (isinstance(pair[0].get("stream"), bool) and pair[0]["stream"])]
               for url in (COMPLETIONS, CHAT)}

    def assemble(url, picks):
        lines = [("good", good_line(url, "g1", 0), "g1", 0)]
        for i, (body, valid) in enumerate(picks, start=2):
            raw = encode({"custom_id": f"m{i}", "method": "POST", "url": url, "body": body})
            lines.append(("unknown" if valid else "bad", raw, f"m{i}" if valid else None, None))
        return BatchCase(url, lines)
    return st.sampled_from([COMPLETIONS, CHAT]).flatmap(
        lambda url: st.lists(st.sampled_from(per_url[url]), min_size=1, max_size=6).map(lambda p: assemble(url, p)))
