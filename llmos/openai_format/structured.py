"""Structured-output fields of a request body -> grammar_spec's constraint (or None).

Accepted: OpenAI's `response_format` ({"type": "text" | "json_object"}, or {"type":
"json_schema", "json_schema": {"name", "schema", "strict", "description"}}) on chat and
completions; vLLM's `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` and its
newer `structured_outputs` object ({"json" | "regex" | "choice" | "grammar" | "json_object"}).
At most one constraint per request. Every refusal is an InvalidParam naming the field.
"""
from __future__ import annotations

import json

from llmos import grammar_spec
from llmos.sampling_params import InvalidParam

FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
          "structured_outputs")
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_SCHEMA_KEYS = {"name", "schema", "strict", "description"}


def parse(body: dict) -> tuple[dict | None, str | None]:
    """(constraint, the field it came from), or (None, None). Raises InvalidParam."""
    found = []
    for name in FIELDS:
        value = body.get(name)
        if value is None:
            continue
        c = _response_format(value) if name == "response_format" else \
            _structured_outputs(value) if name == "structured_outputs" else _guided(name, value)
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
    name = "response_format"
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise InvalidParam(name, "response_format must be an object with a 'type'")
    kind = value["type"]
    if kind in ("text", "json_object"):
        if set(value) != {"type"}:
            raise InvalidParam(name, f"response_format of type {kind!r} takes no other field")
        return None if kind == "text" else {"kind": "json", "spec": json.dumps(grammar_spec.JSON_OBJECT)}
    if kind != "json_schema":
        raise InvalidParam(name, f"response_format.type must be 'text', 'json_object' or 'json_schema', "
                                 f"not {kind!r:.40}")
    js = value.get("json_schema")
    if set(value) != {"type", "json_schema"} or not isinstance(js, dict):
        raise InvalidParam(name, "response_format of type 'json_schema' needs a json_schema object, nothing else")
    if set(js) - _SCHEMA_KEYS:
        raise InvalidParam(name, f"response_format.json_schema: unknown field {sorted(set(js) - _SCHEMA_KEYS)[0]!r}")
    if not isinstance(js.get("name", ""), str) or not isinstance(js.get("strict", False), (bool, type(None))):
        raise InvalidParam(name, "response_format.json_schema: name must be a string, strict a boolean")
    schema = js.get("schema")
    if not isinstance(schema, (dict, bool)):
        raise InvalidParam(name, "response_format.json_schema.schema must be a JSON schema object")
    return {"kind": "json", "spec": _dump(name, schema)}


def _guided(name: str, value) -> dict:
    kind = _GUIDED[name]
    if kind == "json":
        if isinstance(value, str):   # vLLM takes the schema as text too
            return {"kind": "json", "spec": value}
        if not isinstance(value, (dict, bool)):
            raise InvalidParam(name, f"{name} must be a JSON schema (an object, or its text)")
        return {"kind": "json", "spec": _dump(name, value)}
    if kind == "choice":
        if not isinstance(value, list):
            raise InvalidParam(name, f"{name} must be a list of strings")
        return {"kind": "choice", "spec": _dump(name, value)}
    if not isinstance(value, str):
        raise InvalidParam(name, f"{name} must be a string")
    return {"kind": kind, "spec": value}


def _structured_outputs(value) -> dict | None:
    name = "structured_outputs"
    if not isinstance(value, dict):
        raise InvalidParam(name, "structured_outputs must be an object")
    given = {k: v for k, v in value.items() if v is not None and v is not False}
    unknown = set(given) - {"json", "regex", "choice", "grammar", "json_object"}
    if unknown:
        raise InvalidParam(name, f"structured_outputs: unsupported field {sorted(unknown)[0]!r:.60}")
    if len(given) > 1:
        raise InvalidParam(name, "structured_outputs: give exactly one of json, regex, choice, grammar, json_object")
    if not given:
        return None
    (kind, v), = given.items()
    if kind == "json_object":
        if v is not True:
            raise InvalidParam(name, "structured_outputs.json_object must be true")
        return {"kind": "json", "spec": json.dumps(grammar_spec.JSON_OBJECT)}
    try:
        return _guided(f"guided_{kind}", v)
    except InvalidParam as exc:
        raise InvalidParam(name, str(exc).replace(f"guided_{kind}", f"structured_outputs.{kind}")) from None


def _dump(name: str, value) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (ValueError, RecursionError):   # nesting past Python's recursion limit
        raise InvalidParam(name, f"{name} is nested too deeply") from None
