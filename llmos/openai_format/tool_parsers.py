"""Tool calls in generated text -> OpenAI `tool_calls`, one parser per model family.

Parsing runs where responses are shaped (ResponseShaper: the io driver, and the kernel's job
manager for batch lines), over the detokenized text: the kernel and the tokenizer driver
stay format-blind, and one parser serves streams and whole answers alike.

A parser is incremental: `feed(text)` and `finish()` return events in output order, a
`str` (content) or a `ToolCall`. Feeding a text in any number of pieces gives the same
events, merged, as feeding it whole (tests/test_tools_parsers.py checks this).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
MAX_CALL_CHARS = 1_000_000   # one call's text between the tags; longer stays content
MAX_CALLS = 128              # per choice; later ones stay content


@dataclass
class ToolCall:
    name: str
    arguments: str           # a JSON object, as a string (OpenAI's function.arguments)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class HermesToolParser:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the format of Qwen2.5's
    template (NousResearch's Hermes); SmolLM2's own prompts put a list of such objects in
    one pair of tags, which is read as several calls. Text outside the tags is content.
    A tag whose inside is not such JSON (or names a tool the request did not declare) stays
    content, tags and all. Whitespace between calls and content is not content. At most
    `max_calls` calls are parsed: a tag after them stays content, calls past them in one
    tag are dropped."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, names: set[str] | frozenset[str] | None = None, max_calls: int = MAX_CALLS):
        self.names = names           # the declared tools; None: any valid name
        self.max_calls = max_calls   # 1: parallel_tool_calls false
        self.buf = ""                # text not yet decided on
        self.inside = False          # buf is the inside of an open tag
        self.space = ""              # trailing whitespace of content, held until we know what follows
        self.calls = 0

    def feed(self, text: str) -> list:
        self.buf += text
        out: list = []
        while True:
            if self.inside:
                end = self.buf.find(self.END)
                if end < 0 and len(self.buf) <= MAX_CALL_CHARS:
                    return _merge(out)
                if end < 0 or end > MAX_CALL_CHARS:   # runaway: the tag goes back to content
                    self._content(out, self.START)
                    self.inside = False
                    continue
                self._close(out, self.buf[:end], closed=True)
                self.buf, self.inside = self.buf[end + len(self.END):], False
                continue
            start = self.buf.find(self.START)
            if start < 0:
                keep = _partial_suffix(self.buf, self.START)   # may be the start of a tag
                self._content(out, self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                return _merge(out)
            self._content(out, self.buf[:start])
            self.buf, self.inside = self.buf[start + len(self.START):], True

    def finish(self) -> list:
        """The end of the output: an open tag whose inside parses is a call (models often
        stop at end-of-sequence instead of the closing tag); anything else is content."""
        out: list = []
        if self.inside:
            self._close(out, self.buf, closed=False)
        else:
            self._content(out, self.buf)
        self.buf, self.inside = "", False
        if self.space and not self.calls:
            out.append(self.space)
        self.space = ""
        return _merge(out)

    def _close(self, out: list, inner: str, closed: bool) -> None:
        calls = _calls(inner, self.names) if self.calls < self.max_calls else None
        if calls is None:
            self._content(out, self.START + inner + (self.END if closed else ""))
            return
        calls = calls[:self.max_calls - self.calls]
        self.space = ""              # whitespace before a call is layout, not content
        self.calls += len(calls)
        out.extend(calls)

    def _content(self, out: list, text: str) -> None:
        body = text.rstrip()
        if body:
            out.append(self.space + body)
            self.space = text[len(body):]
        else:
            self.space += text


def _calls(inner: str, names) -> list[ToolCall] | None:
    """The calls inside one pair of tags, or None when it is not a valid call."""
    try:
        value = json.loads(inner)
    except (ValueError, RecursionError):
        return None
    values = value if isinstance(value, list) and value else [value]
    calls = []
    for v in values:
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not NAME.fullmatch(v["name"]):
            return None
        if names is not None and v["name"] not in names:
            return None
        args = v.get("arguments", v.get("parameters", {}))
        if isinstance(args, str):   # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):
                return None
        if not isinstance(args, dict):
            return None
        calls.append(ToolCall(name=v["name"], arguments=json.dumps(args, ensure_ascii=False)))
    return calls


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _merge_tail(out: list) -> None:
    if len(out) >= 2 and isinstance(out[-1], str) and isinstance(out[-2], str):
        out[-2:] = [out[-2] + out[-1]]


def _merge(events: list) -> list:
    merged: list = []
    for e in events:
        merged.append(e)
        _merge_tail(merged)
    return merged


PARSERS = {"hermes": HermesToolParser}
# Served-name prefixes -> format. SmolLM2 and Qwen2.5 both write Hermes-style calls, and it is
# the format the tokenizer driver puts in the prompt of a template that does not render tools
# (drivers/tokenizer/chat.py), so it is also the default.
FAMILIES = (("qwen", "hermes"), ("smollm", "hermes"))


def parser_for(model: str, names=None, max_calls: int = MAX_CALLS):
    """A fresh parser for one choice of a request to `model`; `names`: the declared tools;
    `max_calls`: 1 for parallel_tool_calls false."""
    kind = next((k for prefix, k in FAMILIES if model.lower().startswith(prefix)), "hermes")
    return PARSERS[kind](names, max_calls)


def call_grammar(model: str, tools: list[dict], name: str | None) -> str:
    """The Lark grammar (llguidance's, with %json) of exactly one call in `model`'s format, to
    one of `tools` (a tools.parse_tools list) or to the one named: tool_choice "required" or
    named. Its arguments match the function's parameters schema, so they always parse."""
    shapes = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
               "properties": {"name": {"const": t["function"]["name"]},
                              "arguments": t["function"].get("parameters") or _NO_PARAMETERS}}
              for t in tools if name is None or t["function"]["name"] == name]
    schema = {**shapes[0]} if len(shapes) == 1 else {"anyOf": shapes}
    schema["x-guidance"] = _LAYOUT
    start, end = (json.dumps(s) for s in (HermesToolParser.START + "\n", "\n" + HermesToolParser.END))
    return f"start: {start} call {end}\ncall: %json {json.dumps(schema, ensure_ascii=False)}\n"


# The call is laid out as the template writes calls in the history ({"name": "f", "arguments": ...}):
# no free whitespace, which an unsure model would otherwise fill until max_tokens.
_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
# A function declared without parameters takes none (OpenAI's reading).
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
