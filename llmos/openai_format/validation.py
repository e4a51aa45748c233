"""A body against its model (models.py, batch_models.py): the validated model, or one
ApiError(400) that names the field.

pydantic reports every error, with a location that also names union members ("str",
"list[...]") and discriminated-union tags. We report one, as OpenAI does: the first field
with an error (an unknown field before the others), and within it the error deepest in the
body, so that a bad content part is named at `messages[2].content[0].type` rather than as
"not a string". Its path is made by following the location through the body itself, which
drops the members' labels.

`param` stays what the hand-written parser answered, so clients that read it see no change:
the top-level field ("messages", "response_format", "stop"), except under `tools`,
`tool_choice` and a message's `tool_calls` / `tool_call_id`, which were always named by their
full path. The message always starts with the full path: "messages[2].content[0].type must
be 'text'".
"""
from __future__ import annotations

import functools
import json
import re

from pydantic import BaseModel, ValidationError

from llmos.openai_format.errors import ApiError

FULL_PATH = {"tools", "tool_choice", "expires_after"}   # param: the whole path, as it always was
FULL_PATH_IN_MESSAGES = {"tool_calls", "tool_call_id"}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TYPE_ERRORS = {"int_type", "float_type", "bool_type", "string_type", "list_type", "dict_type", "model_type",
                "model_attributes_type", "none_required", "is_instance_of"}


def validate(model: type[BaseModel], body, messages: dict | None = None, order: tuple = ()) -> BaseModel:
    """`body` (parsed JSON) as `model`, or ApiError(400). `messages`: path (or (path, error type))
    -> the sentence that replaces pydantic's for an error at that field itself ({got}: its value).
    `order`: the fields whose errors are reported first, in this order (then the model's)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise error_of(exc, body, model, messages, order) from None


def error_of(exc: ValidationError, body: dict, model: type[BaseModel], messages: dict | None = None,
             order: tuple = ()) -> ApiError:
    errors = exc.errors(include_url=False, include_context=True, include_input=True)
    located = [(e, _path(e, body)) for e in errors]
    top = [(e, p) for e, p in located if e["type"] == "extra_forbidden" and len(p) == 1] or located
    rank = {name: i for i, name in enumerate(order)}
    first = min((p[0] if p else None for _, p in top), key=lambda f: rank.get(f, len(rank)))   # (min: the first)
    group = [(e, p) for e, p in top if (p[0] if p else None) == first]
    err, path = max(group, key=lambda ep: (len(ep[1]), ep[0]["type"] not in _TYPE_ERRORS))   # first of the best
    where = render(path)
    return ApiError(400, _message(err, path, where, model, messages or {}), _param(path, where) if path else None)


def render(path: list) -> str:
    """("messages", 2, "content", 0) -> "messages[2].content[0]"; odd keys as ["key"]."""
    out = ""
    for seg in path:
        if isinstance(seg, int):
            out += f"[{seg}]"
        elif _IDENT.fullmatch(seg):
            out += f".{seg}" if out else seg
        else:
            out += f"[{json.dumps(seg[:40], ensure_ascii=False)}]"
    return out


def _path(err: dict, body) -> list:
    """The error's location as a path through `body`: the keys and indexes that are there (and
    a missing field, last). The rest are union members' labels and discriminator tags."""
    out = _follow(tuple(err["loc"]), body, err["type"] == "missing")
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        out.append(err.get("ctx", {}).get("discriminator", "type").strip("'"))
    return out


def _follow(loc: tuple, cur, missing: bool) -> list:
    """The longest reading of `loc` as keys and indexes into `cur`, each segment either one
    of them or a label (a tool's "function" field is both: type "function" tags it)."""
    if not loc:
        return []
    seg, rest = loc[0], loc[1:]
    best = _follow(rest, cur, missing)
    if isinstance(cur, dict) and isinstance(seg, str) and seg in cur or \
            isinstance(cur, list) and isinstance(seg, int) and 0 <= seg < len(cur):
        took = [seg, *_follow(rest, cur[seg], missing)]
        if len(took) >= len(best):
            best = took
    elif missing and not rest and not best and isinstance(cur, dict):
        best = [seg]
    return best


def _param(path: list, where: str) -> str:
    if path[0] in FULL_PATH or path[0] == "messages" and len(path) > 2 and path[2] in FULL_PATH_IN_MESSAGES:
        return where[:256]
    return path[0] if isinstance(path[0], str) else where[:256]


def _message(err: dict, path: list, where: str, model, messages: dict) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    where = where or "the request body"
    got = _show(value)
    if kind == "string_unicode":
        return f"{where} is not valid Unicode text (a lone surrogate)"
    if kind == "extra_forbidden":
        return f"unknown parameter '{where}'"
    said = messages.get((where, kind), messages.get(where))
    if said is not None:
        return said.replace("{got}", got)
    if kind == "missing":
        return f"{where} is required"
    if kind == "int_type":
        return f"{where} must be an integer, got {_type(value)}"
    if kind == "float_type":
        return f"{where} must be a number, got {_type(value)}"
    if kind == "bool_type":
        return f"{where} must be a boolean"
    if kind == "string_type":
        return f"{where} must be a string"
    if kind in ("greater_than_equal", "less_than_equal") and len(path) == 1:
        lo, hi = _bounds(model).get(path[0], (None, None))
        if isinstance(value, float) or isinstance(lo, float):   # a number field: both ends, as SamplingParams says
            return f"{where} must be between {lo} and {hi}, got {got}"
    if kind == "greater_than_equal":
        return f"{where} must be >= {ctx.get('ge')}, got {got}"
    if kind == "less_than_equal":
        return f"{where} must be <= {ctx.get('le')}, got {got}"
    if kind == "greater_than":
        return f"{where} must be greater than {_num(ctx.get('gt'))}"
    if kind == "literal_error":
        return f"{where} must be {ctx.get('expected')}, got {got}"
    if "[key]" in err["loc"]:
        return f"{where}: the key: {err['msg']}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return f"{where} must be one of {ctx.get('expected_tags')}" + (f", got {got}" if kind == "union_tag_invalid"
                                                                        else "")
    return f"{where}: {err['msg']}"


@functools.cache
def _bounds(model) -> dict:
    """Top-level number fields -> (minimum, maximum) from the model's JSON schema, as floats."""
    out = {}
    for name, prop in model.model_json_schema().get("properties", {}).items():
        for branch in prop.get("anyOf", [prop]):
            if branch.get("type") == "number":
                lo = branch.get("minimum", branch.get("exclusiveMinimum"))
                out[name] = (None if lo is None else float(lo), float(branch["maximum"]) if "maximum" in branch
                             else None)
    return out


def _num(x):
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _type(value) -> str:
    return type(value).__name__


def _show(value) -> str:
    """The value that failed, short (never the whole of a big one)."""
    if isinstance(value, (list, dict)):
        return f"{'a list' if isinstance(value, list) else 'an object'} of {len(value)}"
    if isinstance(value, str):
        text = json.dumps(value[:60], ensure_ascii=False)
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
