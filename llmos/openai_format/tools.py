"""`tools`, `tool_choice` and the tool fields of chat messages: validated and normalised.

Pure functions, no I/O; the io driver (through requests.py) and the kernel's own check of a
Submit (kernel/admission.py) both call them. Every failure is an `InvalidParam` whose param
is the field's path, as OpenAI names it ("tools[3].function.name").

`tool_choice` is OpenAI's: "none" keeps the tools in the prompt (the model is told of them,
as OpenAI bills them) but no call is parsed from the output; "auto" parses calls; "required"
and a named function ask for a call (constrained decoding, where a grammar engine is wired).
"""
from __future__ import annotations

import json
import re

from llmos.sampling_params import InvalidParam, check_text

MAX_TOOLS = 128                 # OpenAI's limit
MAX_DESCRIPTION_CHARS = 16_384
MAX_SCHEMA_CHARS = 65_536       # a function's parameters, as compact JSON
MAX_SCHEMA_DEPTH = 32
MAX_TOOL_CALLS = 128            # per assistant message in the history
MAX_CALL_ID_CHARS = 256
MAX_ARGUMENTS_CHARS = 1_000_000
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
CHOICES = ("none", "auto", "required")


def parse_tools(raw) -> list[dict] | None:
    """The tools in the one shape templates get; None for none (null or [])."""
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise InvalidParam("tools", f"tools must be a list of at most {MAX_TOOLS} tools")
    out, seen = [], set()
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        _keys(tool, where, {"type", "function"})
        if tool.get("type") != "function":
            raise InvalidParam(f"{where}.type", f"{where}.type must be 'function'")
        fn = tool.get("function")
        _keys(fn, f"{where}.function", {"name", "description", "parameters", "strict"})
        name = _name(fn.get("name"), f"{where}.function.name")
        if name in seen:
            raise InvalidParam(f"{where}.function.name", f"{where}.function.name: '{name}' is declared twice")
        seen.add(name)
        clean = {"name": name}
        desc = fn.get("description")
        if desc is not None:
            if not isinstance(desc, str) or len(desc) > MAX_DESCRIPTION_CHARS:
                raise InvalidParam(f"{where}.function.description",
                                   f"{where}.function.description must be a string of at most "
                                   f"{MAX_DESCRIPTION_CHARS} characters")
            _text(f"{where}.function.description", desc)
            clean["description"] = desc
        if fn.get("parameters") is not None:
            clean["parameters"] = _schema(fn["parameters"], f"{where}.function.parameters")
        if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
            raise InvalidParam(f"{where}.function.strict", f"{where}.function.strict must be a boolean")
        out.append({"type": "function", "function": clean})
    return out or None


def parse_tool_choice(raw, tools: list | None) -> tuple[str, str | None]:
    """(choice, function name): choice is "none", "auto", "required" or "function"."""
    if raw is None:
        return ("auto" if tools else "none"), None
    if isinstance(raw, str):
        if raw not in CHOICES:
            raise InvalidParam("tool_choice", f"tool_choice must be one of {list(CHOICES)} or "
                               "{'type': 'function', 'function': {'name': ...}}")
        if raw != "none" and not tools:
            raise InvalidParam("tool_choice", f"tool_choice '{raw}' is only allowed when tools are given")
        return raw, None
    _keys(raw, "tool_choice", {"type", "function"})
    if raw.get("type") != "function":
        raise InvalidParam("tool_choice.type", "tool_choice.type must be 'function'")
    _keys(raw.get("function"), "tool_choice.function", {"name"})
    name = _name(raw["function"].get("name"), "tool_choice.function.name")
    if name not in {t["function"]["name"] for t in tools or ()}:
        raise InvalidParam("tool_choice.function.name", f"tool_choice names '{name}', which is not in tools")
    return "function", name


def parse_tool_calls(raw, where: str) -> list[dict]:
    """An assistant message's tool_calls, OpenAI-shaped (arguments a string)."""
    if not isinstance(raw, list) or len(raw) > MAX_TOOL_CALLS:
        raise InvalidParam(where, f"{where} must be a list of at most {MAX_TOOL_CALLS} calls")
    out = []
    for i, call in enumerate(raw):
        at = f"{where}[{i}]"
        _keys(call, at, {"id", "type", "function"})
        call_id = call.get("id")
        if not isinstance(call_id, str) or not 0 < len(call_id) <= MAX_CALL_ID_CHARS:
            raise InvalidParam(f"{at}.id", f"{at}.id must be a string of 1 to {MAX_CALL_ID_CHARS} characters")
        _text(f"{at}.id", call_id)
        if call.get("type", "function") != "function":
            raise InvalidParam(f"{at}.type", f"{at}.type must be 'function'")
        fn = call.get("function")
        _keys(fn, f"{at}.function", {"name", "arguments"})
        name = _name(fn.get("name"), f"{at}.function.name")
        args = fn.get("arguments")
        if not isinstance(args, str) or len(args) > MAX_ARGUMENTS_CHARS:
            raise InvalidParam(f"{at}.function.arguments", f"{at}.function.arguments must be a string "
                               f"(JSON) of at most {MAX_ARGUMENTS_CHARS} characters")
        _text(f"{at}.function.arguments", args)
        out.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": args}})
    return out


def check_tool_call_id(raw, where: str) -> str:
    if not isinstance(raw, str) or not 0 < len(raw) <= MAX_CALL_ID_CHARS:
        raise InvalidParam(where, f"{where} must be a string of 1 to {MAX_CALL_ID_CHARS} characters")
    _text(where, raw)
    return raw


def _keys(value, where: str, allowed: set) -> None:
    if not isinstance(value, dict):
        raise InvalidParam(where, f"{where} must be an object")
    extra = sorted(str(k) for k in value if k not in allowed)
    if extra:
        raise InvalidParam(f"{where}.{extra[0]}"[:256], f"unknown parameter '{where}.{extra[0]}'"[:512])


def _name(value, where: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise InvalidParam(where, f"{where} must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -")
    return value


def _schema(value, where: str) -> dict:
    """A JSON-schema object, bounded in size and depth (what reaches the template and, for
    required/named choices, a grammar compiler)."""
    if not isinstance(value, dict):
        raise InvalidParam(where, f"{where} must be a JSON schema object")
    if _depth(value, MAX_SCHEMA_DEPTH + 1) > MAX_SCHEMA_DEPTH:
        raise InvalidParam(where, f"{where} is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    try:
        size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    except (ValueError, TypeError, UnicodeEncodeError):
        raise InvalidParam(where, f"{where} is not valid JSON text (e.g. a lone surrogate)") from None
    if size > MAX_SCHEMA_CHARS:
        raise InvalidParam(where, f"{where} has {size} bytes as JSON, more than {MAX_SCHEMA_CHARS}")
    if "type" in value and not isinstance(value["type"], (str, list)):
        raise InvalidParam(f"{where}.type", f"{where}.type must be a string or a list of strings")
    return value


def _depth(value, limit: int) -> int:
    """Nesting depth of JSON containers, counting stops at `limit` (no deep recursion)."""
    level, frontier = 0, [value]
    while frontier and level < limit:
        level += 1
        frontier = [v for x in frontier for v in (x.values() if isinstance(x, dict) else x)
                    if isinstance(v, (dict, list))]
    return level


def _text(where: str, value: str) -> None:
    check_text(where, value)
    return None
