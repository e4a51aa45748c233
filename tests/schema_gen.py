"""Small random JSON schemas for the structured-output tests: objects with typed properties,
enums, arrays, nested objects and required fields. Every generated schema bounds its
instances (strings have maxLength, arrays maxItems, integers a range, no extra properties),
so that even a random model finishes a valid output within a few hundred tokens."""
from __future__ import annotations

import random

WORDS = ["id", "name", "kind", "tags", "count", "ok", "owner", "size", "items", "note", "level", "meta"]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    n = rng.randint(1, 4 if depth == 0 else 3)
    names = rng.sample(WORDS, n)
    props = {name: _value(rng, depth) for name in names}
    required = [p for p in names if rng.random() < 0.7]
    schema = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def _value(rng: random.Random, depth: int) -> dict:
    choices = ["string", "integer", "boolean", "enum", "array", "null"] + (["object"] * 2 if depth < 2 else [])
    kind = rng.choice(choices)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 8)}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "null":
        return {"type": "null"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "x y", 'q"t', 1, 2.5, True, None], rng.randint(1, 4))}
    if kind == "array":
        item = _value(rng, depth + 1) if depth < 2 else {"type": "integer", "minimum": 0, "maximum": 9}
        return {"type": "array", "items": item, "maxItems": rng.randint(1, 3), "minItems": rng.randint(0, 1)}
    return random_schema(rng, depth + 1)
