"""Chats -> prompt text with the model's own chat template, tools included.

A template that renders tools itself (Qwen2.5's: it reads `tools` and `message.tool_calls`)
gets them as transformers passes them. One that does not (SmolLM2-135M-Instruct's, and so
our tiny test models') would drop them silently, so we render them for it in the Hermes
format Qwen2.5's template writes (and tool_parsers.HermesToolParser reads): the tools in a
system message, earlier calls as <tool_call> JSON in the assistant's content, tool results
as <tool_response> in a user turn.
"""
from __future__ import annotations

import json

TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def render(tok, messages, tools: list | None, add_generation_prompt: bool, continue_final_message: bool) -> str:
    messages = clean_messages(messages)
    kwargs = {"continue_final_message": True} if continue_final_message else {}
    uses_tools = tools or any("tool_calls" in m or m["role"] == "tool" for m in messages)
    if uses_tools and not knows_tools(tok):
        messages, tools = hermes_messages(messages, tools), None
    if tools:
        kwargs["tools"] = tools
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)


def knows_tools(tok) -> bool:
    """Whether the template reads the tools and the calls (a look at its source: rendering
    twice to compare would cost every request a second render)."""
    template = tok.chat_template
    if isinstance(template, dict):   # named templates: transformers picks "tool_use" when tools are given
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and "tools" in template and "tool_calls" in template


def clean_messages(messages) -> list[dict]:
    """Messages as templates expect them: content a string; a call's arguments a mapping (what
    Qwen2.5's template `tojson`s; vLLM passes them so too), or the string when it is not JSON."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a string role")
        content = msg.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        clean = {"role": msg["role"], "content": content}
        if isinstance(msg.get("tool_calls"), list) and msg["tool_calls"]:
            clean["tool_calls"] = [_call(c) for c in msg["tool_calls"]]
        if isinstance(msg.get("tool_call_id"), str):
            clean["tool_call_id"] = msg["tool_call_id"]
        out.append(clean)
    return out


def hermes_messages(messages: list[dict], tools: list | None) -> list[dict]:
    """The chat with tools, calls and results written into plain role/content messages."""
    out: list[dict] = []
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            text = f"<tool_response>\n{m['content']}\n</tool_response>"
            if i and messages[i - 1]["role"] == "tool":   # consecutive results share a user turn (Qwen2.5)
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text})
            continue
        content = m["content"]
        for call in m.get("tool_calls") or ():
            fn = call["function"]
            body = json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
            content += ("\n" if content else "") + f"<tool_call>\n{body}\n</tool_call>"
        out.append({"role": m["role"], "content": content})
    if tools:
        block = TOOLS_HEADER + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + TOOLS_FOOTER
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _call(c) -> dict:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError("a tool call must have a function with a name")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass   # not JSON: the template gets the string itself
    return {"id": c.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}
