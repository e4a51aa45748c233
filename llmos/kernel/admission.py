"""The kernel's own check of a Submit, before anything of it is kept.

The io driver and the batch-line parser validate every field already (llmos/openai_format);
the kernel checks again because it never trusts a driver (design.md rule 3), and adds
the limits only it knows: the model's context and vocabulary. Pure Python, no torch.
"""
from __future__ import annotations

import math

from llmos import protocol
from llmos.keep_alive import MAX_KEEP_ALIVE_S
from llmos.openai_format.tools import check_tool_call_id, parse_tool_calls, parse_tools
from llmos.sampling_params import (MAX_CHOICE_TOKENS, MAX_CHOICES, MAX_LOGPROB_ENTRIES, MAX_MESSAGES,
                                   MAX_PROMPT_CHARS, MAX_PROMPT_TOKEN_IDS, MAX_REQUEST_ID_CHARS,
                                   MAX_TENANT_CHARS, MAX_TIMEOUT_S, InvalidParam, SamplingParams)


def check_submit(m: protocol.Submit, max_model_len: int, vocab_size: int) -> SamplingParams:
    """The request's validated sampling parameters, or InvalidParam naming the field."""
    _string("request_id", m.request_id, MAX_REQUEST_ID_CHARS)
    _string("tenant", m.tenant, MAX_TENANT_CHARS)
    if type(m.n) is not int or not 1 <= m.n <= MAX_CHOICES:
        raise InvalidParam("n", f"n must be an integer from 1 to {MAX_CHOICES}")
    for name in ("timeout_s", "queue_timeout_s"):
        value = getattr(m, name)
        if value is not None and not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S):
            raise InvalidParam(name.removesuffix("_s"), f"{name.removesuffix('_s')} must be in (0, {MAX_TIMEOUT_S}] s")
    ka = m.keep_alive_s
    if ka is not None and not (math.isfinite(ka) and ka <= MAX_KEEP_ALIVE_S):
        raise InvalidParam("keep_alive", f"keep_alive must be at most {MAX_KEEP_ALIVE_S:.0f} s (negative: forever)")
    try:
        params = SamplingParams.from_dict(m.params)
    except TypeError as exc:
        raise InvalidParam("params", f"malformed sampling parameters: {exc}") from None
    if vocab_size and params.top_k > vocab_size:
        raise InvalidParam("top_k", f"top_k must be at most the vocabulary size {vocab_size}, got {params.top_k}")
    if vocab_size and params.logit_bias and max(params.bias_pairs[0]) >= vocab_size:
        raise InvalidParam("logit_bias", f"logit_bias token ids must be below the vocabulary size {vocab_size}, "
                                         f"got {max(params.bias_pairs[0])}")
    for name in ("max_tokens", "min_tokens"):
        value = getattr(params, name)
        if value is not None and value > max_model_len:
            raise InvalidParam(name, f"This model's maximum context length is {max_model_len} tokens, but "
                                     f"{name} is {value}", "context_length_exceeded")
    if params.max_tokens is not None and m.n * params.max_tokens > MAX_CHOICE_TOKENS:
        raise InvalidParam("max_tokens", f"n x max_tokens must be at most {MAX_CHOICE_TOKENS}")
    if params.logprobs is not None and m.n * (params.logprobs + 1) > MAX_LOGPROB_ENTRIES:
        raise InvalidParam("logprobs", f"n x (top logprobs + 1) must be at most {MAX_LOGPROB_ENTRIES}")
    _check_prompt(m, max_model_len, vocab_size)
    return params


def _string(name: str, value, limit: int) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise InvalidParam(name, f"{name} must be a string of 1 to {limit} characters")


_MESSAGE_KEYS = {"role", "content", "tool_calls", "tool_call_id"}


def _check_prompt(m: protocol.Submit, max_model_len: int, vocab_size: int) -> None:
    if sum(x is not None for x in (m.prompt, m.messages, m.prompt_token_ids)) != 1:
        raise InvalidParam("prompt", "exactly one of prompt, messages, prompt_token_ids is required")
    if m.prompt is not None and len(m.prompt) > MAX_PROMPT_CHARS:
        raise InvalidParam("prompt", f"the prompt has more than {MAX_PROMPT_CHARS} characters")
    if m.messages is not None:
        if not 0 < len(m.messages) <= MAX_MESSAGES:
            raise InvalidParam("messages", f"messages must be a list of 1 to {MAX_MESSAGES} messages")
        chars = 0
        for i, msg in enumerate(m.messages):
            if not (isinstance(msg, dict) and isinstance(msg.get("role"), str)
                    and isinstance(msg.get("content"), str) and set(msg) <= _MESSAGE_KEYS):
                raise InvalidParam("messages", f"messages[{i}] must be {{'role': str, 'content': str}} "
                                   "(with tool_calls or tool_call_id)")
            chars += len(msg["content"])
            if "tool_calls" in msg:
                chars += sum(len(c["function"]["arguments"])
                             for c in parse_tool_calls(msg["tool_calls"], f"messages[{i}].tool_calls"))
            if "tool_call_id" in msg:
                check_tool_call_id(msg["tool_call_id"], f"messages[{i}].tool_call_id")
        if chars > MAX_PROMPT_CHARS:
            raise InvalidParam("messages", f"the messages have more than {MAX_PROMPT_CHARS} characters")
    if m.tools is not None:
        if m.messages is None:
            raise InvalidParam("tools", "tools are only for chat messages")
        parse_tools(m.tools)
    ids = m.prompt_token_ids
    if ids is not None:
        # The length first: a prompt past the context is refused without a scan of its ids
        # (by _admit, as context_length_exceeded).
        if not 0 < len(ids) <= MAX_PROMPT_TOKEN_IDS:
            raise InvalidParam("prompt", f"a prompt of token ids must have 1 to {MAX_PROMPT_TOKEN_IDS} ids")
        if len(ids) < max_model_len and not all(type(t) is int and 0 <= t < vocab_size for t in ids):
            raise InvalidParam("prompt", f"prompt token ids must be integers in [0, {vocab_size})")
