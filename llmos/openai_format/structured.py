"""Structured-output fields of a validated body -> grammar_spec's constraint (or None).

Accepted (their shapes are models.py's): OpenAI's `response_format` ({"type": "text" |
"json_object"}, or {"type": "json_schema", "json_schema": {"name", "schema", "strict",
"description"}}) on chat and completions; vLLM's `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar` and its newer `structured_outputs` object ({"json" | "regex" |
"choice" | "grammar" | "json_object"}). At most one constraint per request. What the model
cannot say (one constraint only, the spec's size once canonical, whether llguidance compiles
it) is checked here; every refusal is an InvalidParam naming the field.
"""
from __future__ import annotations

import json

from llmos import grammar_spec
from llmos.openai_format import models
from llmos.sampling_params import InvalidParam

FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
          "structured_outputs")
_KINDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_JSON_OBJECT = {"kind": "json", "spec": json.dumps(grammar_spec.JSON_OBJECT)}


def parse(body: models._Generation) -> tuple[dict | None, str | None]:
    """(constraint, the field it came from), or (None, None). Raises InvalidParam."""
    found = []
    for name in FIELDS:
        value = getattr(body, name)
        if value is None:
            continue
        c = _response_format(value) if name == "response_format" else \
            _structured_outputs(value) if name == "structured_outputs" else _guided(_KINDS[name], value, name)
        if c is not None:
            found.append((c, name))
    if len(found) > 1:
        raise InvalidParam(found[1][1], f"'{found[1][1]}' and '{found[0][1]}' both constrain the output: give one")
    if not found:
        return None, None
    raw, name = found[0]
    try:
        c = grammar_spec.normalize(raw)
    except grammar_spec.BadSpec as exc:
        raise InvalidParam(name, f"{name}: {exc}") from None
    error = grammar_spec.check(c)
    if error:
        raise InvalidParam(name, f"{name}: the grammar engine refuses it: {error}")
    return c, name


def _response_format(value) -> dict | None:
    if isinstance(value, models.TextFormat):
        return None
    if isinstance(value, models.JsonObjectFormat):
        return _JSON_OBJECT
    return {"kind": "json", "spec": _dump("response_format", value.json_schema.schema_)}


def _guided(kind: str, value, name: str) -> dict:
    if kind == "json" and isinstance(value, str):   # vLLM takes the schema as text too
        return {"kind": "json", "spec": value}
    if kind in ("json", "choice"):
        return {"kind": kind, "spec": _dump(name, value)}
    return {"kind": kind, "spec": value}


def _structured_outputs(value: models.StructuredOutputs) -> dict | None:
    given = [k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(value, k) is not None]
    if len(given) > 1:
        raise InvalidParam("structured_outputs", "structured_outputs: give exactly one of json, regex, choice, "
                                                 "grammar, json_object")
    if not given:
        return None
    kind = given[0].rstrip("_")
    return _JSON_OBJECT if kind == "json_object" else _guided(kind, getattr(value, given[0]), "structured_outputs")


def _dump(name: str, value) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (ValueError, RecursionError):   # nesting past Python's recursion limit
        raise InvalidParam(name, f"{name} is nested too deeply") from None
