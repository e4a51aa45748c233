"""OpenAI request bodies -> validated `ParsedRequest`. Pure functions and data, no I/O:
the io driver and the kernel's batch-line parser both use it (design.md rule 7).

Contract: `parse_completion` / `parse_chat` either return a request whose `params` passed
`SamplingParams` validation, or raise `ApiError` naming the offending field in `param`.
"""
from __future__ import annotations

from dataclasses import dataclass

from llmos import grammar_spec
from llmos.keep_alive import parse_keep_alive
from llmos.openai_format.errors import ApiError
from llmos.openai_format import structured
from llmos.openai_format.tool_parsers import call_grammar
from llmos.openai_format.tools import check_tool_call_id, parse_tool_calls, parse_tool_choice, parse_tools
from llmos.sampling_params import (MAX_CHOICE_TOKENS, MAX_CHOICES, MAX_LOGPROB_ENTRIES, MAX_MESSAGES,
                                   MAX_PROMPT_CHARS, MAX_PROMPT_TOKEN_IDS, MAX_TENANT_CHARS, MAX_TIMEOUT_S,
                                   MAX_TOKEN_ID, MAX_TOP_LOGPROBS,
                                   InvalidParam, SamplingParams, check_text)

ROLES = {"system", "user", "assistant", "tool"}
MAX_NAME_CHARS = 256   # model names and string priorities

_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
             "ignore_eos", "min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty",
             "logit_bias", "min_p")
_COMMON = {"model", "stream", "stream_options", "n", "logprobs", "tenant", "priority", "return_token_ids",
           "timeout", "queue_timeout", "keep_alive",
           *_SAMPLING, *structured.FIELDS}
# OpenAI fields with no effect on a local model's output.
_IGNORED = {"user", "store", "metadata", "service_tier", "parallel_tool_calls", "prompt_cache_key",
            "safety_identifier", "reasoning_effort", "verbosity"}
# Fields we accept only at their no-op value (None is always fine).
_DEFAULT_ONLY = {"use_beam_search": (False,)}
_COMPLETION_ONLY = {"prompt": None, "best_of": (1,), "echo": (False,), "suffix": ("",)}
_CHAT_ONLY = {
    "messages": None, "max_completion_tokens": None, "top_logprobs": None,
    "response_format": ({"type": "text"},), "tools": None, "tool_choice": None,   # (tools.py checks these)
    "functions": ([],), "function_call": ("none", "auto"), "modalities": (["text"],),
    "audio": (), "prediction": (), "web_search_options": (),
}


@dataclass
class ParsedRequest:
    chat: bool
    model: str
    params: SamplingParams
    tenant: str = "local"
    prompt: str | None = None
    messages: list | None = None
    prompt_token_ids: list | None = None
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False    # vLLM's extension: choices[0].token_ids
    priority: int | str | None = None
    timeout_s: float | None = None
    queue_timeout_s: float | None = None
    keep_alive_s: float | None = None  # Ollama's keep_alive: the model stays loaded this long after it
    n: int = 1                        # choices; they share the prompt's KV copy-on-write
    tools: list | None = None         # chat: the declared tools (openai_format/tools.py), for the template
    tool_choice: str = "none"         # "none", "auto", "required" or "function" (then tool_name)
    tool_name: str | None = None


def parse_completion(body) -> ParsedRequest:
    _check_fields(body, _COMPLETION_ONLY)
    prompt, ids = _prompt(body.get("prompt"))
    logprobs = body.get("logprobs")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)):
        raise ApiError(400, "logprobs must be an integer (the number of top logprobs per token)", "logprobs")
    raw = {k: body[k] for k in _SAMPLING if k in body}
    raw["logprobs"] = logprobs
    return _finish(body, chat=False, raw=raw, prompt=prompt, prompt_token_ids=ids)


def parse_chat(body) -> ParsedRequest:
    _check_fields(body, _CHAT_ONLY)
    messages = _messages(body.get("messages"))
    try:
        tools = parse_tools(body.get("tools"))
        tool_choice, tool_name = parse_tool_choice(body.get("tool_choice"), tools)
    except InvalidParam as exc:
        raise ApiError(400, str(exc), exc.param) from None
    raw = {k: body[k] for k in _SAMPLING if k in body}
    renames = {}
    if body.get("max_completion_tokens") is not None:  # the newer name wins
        raw["max_tokens"] = body["max_completion_tokens"]
        renames["max_tokens"] = "max_completion_tokens"
    want, top = body.get("logprobs"), body.get("top_logprobs")
    if want is not None and not isinstance(want, bool):
        raise ApiError(400, "logprobs must be a boolean", "logprobs")
    if top is not None:
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}", "top_logprobs")
        if not want:
            raise ApiError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
    raw["logprobs"] = (top or 0) if want else None
    req = _finish(body, chat=True, raw=raw, messages=messages, renames=renames, tools=tools,
                  tool_choice=tool_choice, tool_name=tool_name)
    if tool_choice in ("required", "function"):
        _constrain_to_a_call(req)
    return req


def _constrain_to_a_call(req: ParsedRequest) -> None:
    """tool_choice "required" or named: decoding follows the grammar of one call in the
    template's format (tool_parsers.call_grammar), so the call is always there and parses."""
    if req.params.structured is not None:
        raise ApiError(400, "tool_choice 'required' or a named function cannot be combined with a structured-output "
                       "constraint (response_format, guided_*)", "tool_choice")
    constraint = {"kind": "grammar", "spec": call_grammar(req.model, req.tools, req.tool_name)}
    try:
        req.params = SamplingParams.from_dict({**req.params.to_dict(), "structured": constraint})
    except InvalidParam as exc:
        param = "tool_choice" if exc.param == "structured" else exc.param   # e.g. ignore_eos, which it excludes
        raise ApiError(400, f"tool_choice: {exc}", param) from None
    error = grammar_spec.check(req.params.structured)
    if error:
        raise ApiError(400, f"tool_choice: the grammar engine refuses the tools' schemas: {error}", "tool_choice")


def _check_fields(body, own: dict) -> None:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, value in body.items():
        if name in _COMMON or name in _IGNORED or value is None:
            continue
        allowed = own[name] if name in own else _DEFAULT_ONLY.get(name, "unknown")
        if allowed == "unknown":
            raise ApiError(400, f"unknown parameter '{name}'", name)
        if allowed is not None and not any(value == a and type(value) is not bool or value is a for a in allowed):
            only = " or ".join([*map(repr, allowed), "null"])
            raise ApiError(400, f"'{name}' is not supported (only {only})" if allowed
                           else f"'{name}' is not supported", name)
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES):
        raise ApiError(400, f"n must be an integer from 1 to {MAX_CHOICES}", "n")


def _finish(body, chat: bool, raw: dict, renames: dict | None = None, **inputs) -> ParsedRequest:
    model = body.get("model")
    if not isinstance(model, str) or not 0 < len(model) <= MAX_NAME_CHARS:
        raise ApiError(400, f"model must be a string of 1 to {MAX_NAME_CHARS} characters", "model")
    _text("model", model)
    try:   # response_format, guided_*, structured_outputs: the output's grammar (openai_format/structured.py)
        raw["structured"], source = structured.parse(body)
    except InvalidParam as exc:
        raise ApiError(400, str(exc), exc.param) from None
    renames = {**(renames or {}), "structured": source or "response_format"}
    try:
        params = SamplingParams.from_dict(raw)
    except InvalidParam as exc:
        raise ApiError(400, str(exc), (renames or {}).get(exc.param, exc.param)) from None
    except TypeError as exc:  # from_dict could not build the dataclass at all
        raise ApiError(400, str(exc)) from None
    n = body.get("n") or 1
    if params.max_tokens is not None and n * params.max_tokens > MAX_CHOICE_TOKENS:
        raise ApiError(400, f"n x max_tokens must be at most {MAX_CHOICE_TOKENS}, got {n} x {params.max_tokens}",
                       (renames or {}).get("max_tokens", "max_tokens"))
    if params.logprobs is not None and n * (params.logprobs + 1) > MAX_LOGPROB_ENTRIES:
        raise ApiError(400, f"n x (top logprobs + 1) must be at most {MAX_LOGPROB_ENTRIES}, got {n} x "
                       f"{params.logprobs + 1}", "top_logprobs" if chat else "logprobs")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "stream must be a boolean", "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
            raise ApiError(400, "stream_options must be an object with a boolean include_usage", "stream_options")
        include_usage = opts.get("include_usage", False)
    tenant = body.get("tenant")
    if tenant is None:
        tenant = "local"
    elif not isinstance(tenant, str) or not 0 < len(tenant) <= MAX_TENANT_CHARS:
        raise ApiError(400, f"tenant must be a string of 1 to {MAX_TENANT_CHARS} characters", "tenant")
    _text("tenant", tenant)
    priority = body.get("priority")  # "batch", "batch:3" or an int (vLLM); the kernel parses it
    if priority is not None and (type(priority) not in (int, str) or isinstance(priority, str) and (
            len(priority) > MAX_NAME_CHARS) or isinstance(priority, int) and not -2**31 <= priority < 2**31):
        raise ApiError(400, "priority must be a class name, 'class:level' or a 32-bit integer", "priority")
    if isinstance(priority, str):
        _text("priority", priority)
    timeouts = {}
    for name in ("timeout", "queue_timeout"):
        value = body.get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not 0 < value <= MAX_TIMEOUT_S):
            raise ApiError(400, f"{name} must be a number of seconds in (0, {MAX_TIMEOUT_S}]", name)
        timeouts[name] = None if value is None else float(value)
    try:
        keep_alive = parse_keep_alive(body.get("keep_alive"))
    except ValueError as exc:
        raise ApiError(400, str(exc), "keep_alive") from None
    return_ids = body.get("return_token_ids")
    if return_ids is not None and not isinstance(return_ids, bool):
        raise ApiError(400, "return_token_ids must be a boolean", "return_token_ids")
    return ParsedRequest(chat=chat, model=model, params=params, tenant=tenant, stream=bool(stream), n=body.get("n") or 1,
                         include_usage=include_usage, return_token_ids=bool(return_ids), priority=priority,
                         timeout_s=timeouts["timeout"], queue_timeout_s=timeouts["queue_timeout"],
                         keep_alive_s=keep_alive, **inputs)


def _text(name: str, value: str, param: str | None = None) -> None:
    try:
        check_text(name, value)
    except InvalidParam as exc:
        raise ApiError(400, str(exc), param or name) from None


def _prompt(prompt) -> tuple[str | None, list | None]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not 0 < len(prompt) <= MAX_PROMPT_CHARS:
            raise ApiError(400, f"prompt must have 1 to {MAX_PROMPT_CHARS} characters", "prompt")
        _text("prompt", prompt)
        return prompt, None
    if isinstance(prompt, list) and len(prompt) > MAX_PROMPT_TOKEN_IDS:   # the length before any element
        raise ApiError(400, f"a prompt of token ids may have at most {MAX_PROMPT_TOKEN_IDS} ids", "prompt")
    if isinstance(prompt, list) and prompt and all(type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in prompt):
        return None, list(prompt)
    raise ApiError(400, "prompt must be a string, a list of token ids (integers in [0, 2**31)) or a list with "
                   "exactly one string", "prompt")


def _messages(raw) -> list:
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_MESSAGES:
        raise ApiError(400, f"messages must be a list of 1 to {MAX_MESSAGES} messages", "messages")
    out, chars = [], 0
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", "messages")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {sorted(ROLES)}", "messages")
        content = m.get("content")
        calls = _tool_calls(m, role, i)
        if content is None and role == "assistant":  # e.g. an earlier tool-call turn
            content = ""
        if isinstance(content, list):
            if len(content) > MAX_MESSAGES or not all(
                    isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                    for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported (at most "
                               f"{MAX_MESSAGES})", "messages")
            content = "\n".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        chars += len(content) + sum(len(c["function"]["arguments"]) for c in calls)
        if chars > MAX_PROMPT_CHARS:
            raise ApiError(400, f"the messages have more than {MAX_PROMPT_CHARS} characters in all", "messages")
        _text(f"messages[{i}].content", content, "messages")
        msg = {"role": role, "content": content}
        if calls:
            msg["tool_calls"] = calls
        if role == "tool":   # the answer to an earlier call: rendered, with its id, not dropped
            try:
                msg["tool_call_id"] = check_tool_call_id(m.get("tool_call_id"), f"messages[{i}].tool_call_id")
            except InvalidParam as exc:
                raise ApiError(400, str(exc), exc.param) from None
        out.append(msg)
    return out


def _tool_calls(m: dict, role: str, i: int) -> list:
    """An assistant message's earlier calls (OpenAI's shape), [] when it has none."""
    if m.get("tool_calls") is None:
        return []
    if role != "assistant":
        raise ApiError(400, f"messages[{i}].tool_calls is only allowed in assistant messages",
                       f"messages[{i}].tool_calls")
    try:
        return parse_tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
    except InvalidParam as exc:
        raise ApiError(400, str(exc), exc.param) from None
