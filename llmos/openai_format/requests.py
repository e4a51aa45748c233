"""OpenAI request bodies -> validated `ParsedRequest`. Pure functions and data, no I/O:
the io driver and the kernel's batch-line parser both use it (design.md rule 7).

A body is first validated against its pydantic model (models.py: types, bounds, unknown
fields; validation.py names the field), then converted here, where the rules that span
fields or need a grammar engine are checked: top_logprobs needs logprobs, stream_options
needs stream, n x max_tokens, the messages' characters in all, the structured-output
constraint (structured.py), the tools' names and schemas (tools.py, which the kernel's own
check uses too) and tool_choice against them.

Contract: `parse_completion` / `parse_chat` either return a request whose `params` passed
`SamplingParams` validation, or raise `ApiError` naming the offending field in `param`.
"""
from __future__ import annotations

from dataclasses import dataclass

from llmos import grammar_spec
from llmos.keep_alive import parse_keep_alive
from llmos.openai_format import models, structured
from llmos.openai_format.errors import ApiError
from llmos.openai_format.tool_parsers import call_grammar
from llmos.openai_format.tools import parse_tool_choice, parse_tools
from llmos.openai_format.validation import validate
from llmos.sampling_params import (MAX_CHOICE_TOKENS, MAX_CHOICES, MAX_LOGPROB_ENTRIES, MAX_MESSAGES,
                                   MAX_PROMPT_CHARS, MAX_PROMPT_TOKEN_IDS, MAX_TENANT_CHARS, MAX_TIMEOUT_S,
                                   MAX_TOP_LOGPROBS, InvalidParam, SamplingParams)

MAX_NAME_CHARS = models.MAX_NAME_CHARS
_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
             "ignore_eos", "min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty",
             "logit_bias", "min_p")
# The sentences of the hand-written parser, for an error at the field itself (validation.py).
MESSAGES = {
    "model": f"model must be a string of 1 to {MAX_NAME_CHARS} characters",
    "n": f"n must be an integer from 1 to {MAX_CHOICES}",
    "prompt": f"prompt must have 1 to {MAX_PROMPT_CHARS} characters, or be a list of 1 to {MAX_PROMPT_TOKEN_IDS} "
              "token ids (integers in [0, 2**31)) or a list with exactly one string",
    "messages": f"messages must be a list of 1 to {MAX_MESSAGES} messages",
    "tenant": f"tenant must be a string of 1 to {MAX_TENANT_CHARS} characters",
    "priority": "priority must be a class name, 'class:level' or a 32-bit integer",
    "timeout": f"timeout must be a number of seconds in (0, {MAX_TIMEOUT_S}]",
    "queue_timeout": f"queue_timeout must be a number of seconds in (0, {MAX_TIMEOUT_S}]",
    "stop": "stop must be a string or a list of at most 4 strings",
    "top_logprobs": f"top_logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}",
    "stream_options": "stream_options must be an object with a boolean include_usage",
    "keep_alive": "keep_alive must be a number of seconds or a duration like '5m'",
    "tool_choice": "tool_choice must be one of ['none', 'auto', 'required'] or "
                   "{'type': 'function', 'function': {'name': ...}}",
    "best_of": "'best_of' is not supported (only 1 or null)",
    "echo": "'echo' is not supported (only False or null)",
    "suffix": "'suffix' is not supported (only '' or null)",
    "use_beam_search": "'use_beam_search' is not supported (only False or null)",
    "functions": "'functions' is not supported (only [] or null): use tools",
    "function_call": "'function_call' is not supported (only 'none', 'auto' or null): use tool_choice",
    "modalities": "'modalities' is not supported (only ['text'] or null)",
    **{name: f"'{name}' is not supported" for name in ("audio", "prediction", "web_search_options")},
}
# Which field's error is reported first when several are bad: the hand-written parser's order.
ORDER = ("best_of", "echo", "suffix", "use_beam_search", "functions", "function_call", "modalities", "audio",
         "prediction", "web_search_options", "n", "prompt", "messages", "tools", "tool_choice", "logprobs",
         "top_logprobs", "model", *structured.FIELDS, "max_completion_tokens", *_SAMPLING, "stream", "stream_options",
         "tenant", "priority", "timeout", "queue_timeout", "keep_alive", "return_token_ids")


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
    parallel_tool_calls: bool = True  # False: at most one call is parsed from each choice


def parse_completion(body) -> ParsedRequest:
    m = validate(models.CompletionRequest, body, MESSAGES, ORDER)
    prompt, ids = (m.prompt, None) if isinstance(m.prompt, str) else \
        (m.prompt[0], None) if isinstance(m.prompt[0], str) else (None, m.prompt)
    return _finish(m, chat=False, raw={**_sampling(m), "logprobs": m.logprobs}, prompt=prompt, prompt_token_ids=ids)


def parse_chat(body) -> ParsedRequest:
    m = validate(models.ChatCompletionRequest, body, MESSAGES, ORDER)
    messages = _messages(m.messages)
    try:   # (tools.py: what the models cannot say, and the shape the kernel's own check reads)
        tools = parse_tools(body.get("tools"))
        tool_choice, tool_name = parse_tool_choice(body.get("tool_choice"), tools)
    except InvalidParam as exc:
        raise ApiError(400, str(exc), exc.param) from None
    raw, renames = _sampling(m), {}
    if m.max_completion_tokens is not None:  # the newer name wins
        raw["max_tokens"], renames["max_tokens"] = m.max_completion_tokens, "max_completion_tokens"
    if m.top_logprobs is not None and not m.logprobs:
        raise ApiError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
    raw["logprobs"] = (m.top_logprobs or 0) if m.logprobs else None
    req = _finish(m, chat=True, raw=raw, messages=messages, renames=renames, tools=tools,
                  tool_choice=tool_choice, tool_name=tool_name, parallel_tool_calls=m.parallel_tool_calls is not False)
    if tool_choice in ("required", "function"):
        _constrain_to_a_call(req)
    return req


def _sampling(m: models._Generation) -> dict:
    return {k: getattr(m, k) for k in _SAMPLING}


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


def _finish(m: models._Generation, chat: bool, raw: dict, renames: dict | None = None, **inputs) -> ParsedRequest:
    try:   # response_format, guided_*, structured_outputs: the output's grammar (openai_format/structured.py)
        raw["structured"], source = structured.parse(m)
    except InvalidParam as exc:
        raise ApiError(400, str(exc), exc.param) from None
    renames = {**(renames or {}), "structured": source or "response_format"}
    try:
        params = SamplingParams.from_dict(raw)
    except InvalidParam as exc:
        raise ApiError(400, str(exc), renames.get(exc.param, exc.param)) from None
    n = m.n or 1
    if params.max_tokens is not None and n * params.max_tokens > MAX_CHOICE_TOKENS:
        raise ApiError(400, f"n x max_tokens must be at most {MAX_CHOICE_TOKENS}, got {n} x {params.max_tokens}",
                       renames.get("max_tokens", "max_tokens"))
    if params.logprobs is not None and n * (params.logprobs + 1) > MAX_LOGPROB_ENTRIES:
        raise ApiError(400, f"n x (top logprobs + 1) must be at most {MAX_LOGPROB_ENTRIES}, got {n} x "
                       f"{params.logprobs + 1}", "top_logprobs" if chat else "logprobs")
    if m.stream_options is not None and not m.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
    try:
        keep_alive = parse_keep_alive(m.keep_alive)
    except ValueError as exc:
        raise ApiError(400, str(exc), "keep_alive") from None
    return ParsedRequest(chat=chat, model=m.model, params=params, tenant=m.tenant or "local", stream=bool(m.stream),
                         n=n, include_usage=bool(m.stream_options and m.stream_options.include_usage),
                         return_token_ids=bool(m.return_token_ids), priority=m.priority, timeout_s=m.timeout,
                         queue_timeout_s=m.queue_timeout, keep_alive_s=keep_alive, **inputs)


def _messages(given: list) -> list:
    """The validated messages as the tokenizer's chat template takes them: developer is system,
    content is text (parts joined by newlines, "" for an assistant turn that only called tools)."""
    out, chars = [], 0
    for i, m in enumerate(given):
        content = m.content if isinstance(m.content, str) else "" if m.content is None else \
            "\n".join(p.text for p in m.content)
        calls = [{"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                               "arguments": c.function.arguments}}
                 for c in getattr(m, "tool_calls", None) or ()]
        chars += len(content) + sum(len(c["function"]["arguments"]) for c in calls)
        if chars > MAX_PROMPT_CHARS:
            raise ApiError(400, f"the messages have more than {MAX_PROMPT_CHARS} characters in all", "messages")
        msg = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if calls:
            msg["tool_calls"] = calls
        if m.role == "tool":   # the answer to an earlier call: rendered, with its id, not dropped
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out
