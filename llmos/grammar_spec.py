"""A sequence's output constraint (structured outputs), as it travels from the API to the
model driver's grammar engine. Pure Python: the kernel imports it (SamplingParams).

`SamplingParams.structured` is None (no constraint: today's code path, untouched) or
{"kind": KIND, "spec": str}:
- "json": a JSON schema, as canonical JSON text (json_object is the schema {"type": "object"});
- "regex": a regular expression (Rust regex syntax, as llguidance takes it), matched whole;
- "choice": a JSON list of 1..MAX_CHOICE_OPTIONS strings, one of which is the whole output;
- "grammar": a Lark grammar, or GBNF (llama.cpp's / vLLM's EBNF), told apart by llguidance.

This is the internal entry point for any other constraint (tool calls): build it with
`json_schema(schema)` (or the dict above) and put it in SamplingParams(structured=...);
the kernel carries it to the driver, which compiles it off the kernel's loop, masks every
sampled token with it and lets EOS through only where the grammar accepts.
"""
from __future__ import annotations

import hashlib
import json

KINDS = ("json", "regex", "choice", "grammar")
MAX_SPEC_BYTES = 32 * 1024       # a schema, regex or grammar as UTF-8 text: it crosses the bus every step
MAX_SCHEMA_DEPTH = 32            # nesting of a schema's objects and lists (a parser recursion bound)
MAX_CHOICE_OPTIONS = 256
MAX_CHOICE_CHARS = 1024          # per option
JSON_OBJECT = {"type": "object"}
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class BadSpec(ValueError):
    """The constraint is malformed or out of bounds; str() says how."""


def json_schema(schema) -> dict:
    """The constraint for a JSON schema (a dict, or True for any JSON value). Raises BadSpec."""
    return normalize({"kind": "json", "spec": _canonical(schema)})


def normalize(raw) -> dict:
    """A validated {"kind", "spec"} (BadSpec otherwise). Checks shape and size only; whether the
    grammar engine can compile it is the API's check (openai_format/structured.py) and, again,
    the driver's (an error there fails that request alone)."""
    if not isinstance(raw, dict) or set(raw) != {"kind", "spec"}:
        raise BadSpec("a structured-output constraint is an object with exactly 'kind' and 'spec'")
    kind, spec = raw["kind"], raw["spec"]
    if kind not in KINDS:
        raise BadSpec(f"unknown constraint kind {kind!r:.40}: use one of {list(KINDS)}")
    if not isinstance(spec, str) or not spec:
        raise BadSpec(f"the {kind} constraint must be a non-empty string")
    try:
        size = len(spec.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadSpec(f"the {kind} constraint is not valid Unicode text") from None
    if size > MAX_SPEC_BYTES:
        raise BadSpec(f"the {kind} constraint has {size} bytes, at most {MAX_SPEC_BYTES}")
    if kind == "json":
        spec = _canonical(_load(spec, "schema"))
    elif kind == "choice":
        options = _load(spec, "choice")
        if not isinstance(options, list) or not 0 < len(options) <= MAX_CHOICE_OPTIONS or not all(
                isinstance(o, str) and 0 < len(o) <= MAX_CHOICE_CHARS for o in options):
            raise BadSpec(f"a choice is a list of 1 to {MAX_CHOICE_OPTIONS} strings of 1 to {MAX_CHOICE_CHARS} "
                          "characters")
        spec = json.dumps(options, ensure_ascii=False)
    return {"kind": kind, "spec": spec}


def key(structured: dict) -> str:
    """The cache key of a normalized constraint: compiled grammars are shared by it."""
    return hashlib.sha256(f"{structured['kind']}\0{structured['spec']}".encode()).hexdigest()[:32]


def _load(text: str, what: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise BadSpec(f"the {what} is not valid JSON") from None


def _canonical(schema) -> str:
    if not isinstance(schema, (dict, bool)):
        raise BadSpec(f"a JSON schema must be an object or a boolean, not {type(schema).__name__}")
    _check_depth(schema)
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _check_depth(value) -> None:
    """Iterative, so a hostile nesting cannot exhaust the stack before we count it."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise BadSpec(f"the schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def to_lark(structured: dict) -> str:
    """The constraint as llguidance's grammar text (imported here, lazily: only the API's
    checks and the model driver call this, never the kernel's loop)."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark
    kind, spec = structured["kind"], structured["spec"]
    if kind == "json":   # one layout, as json.dumps writes it: free whitespace would let a model pad forever
        return LLMatcher.grammar_from_json_schema(spec, defaults=JSON_LAYOUT)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec)
    if kind == "choice":   # Lark string literals are JSON strings in llguidance
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(o) for o in json.loads(spec)))
    return LLMatcher.grammar_from_lark(any_to_lark(spec))


def check(structured: dict) -> str | None:
    """Whether llguidance can build this grammar: None, or its error (the first line of it,
    at most 300 characters). Cheap without a tokenizer (~0.1 ms for a small schema)."""
    from llguidance import LLMatcher
    try:
        is_error, messages = LLMatcher.validate_grammar_with_warnings(to_lark(structured))
    except Exception as exc:   # GBNF the converter cannot read, a schema llguidance refuses to load
        return f"{type(exc).__name__}: {exc}"[:300]
    return messages[0][:300] if is_error else None
