"""The tokenizer over HTTP: vLLM's /tokenize and /detokenize, and the render routes of the
inference gateway's model-server contract.

    POST /tokenize                     {"model", "prompt"} or {"model", "messages"[, "tools"]}, options as
                                       vLLM's: add_special_tokens, add_generation_prompt, continue_final_message,
                                       return_token_strs -> {"count", "max_model_len", "tokens"[, "token_strs"]}
    POST /detokenize                   {"model", "tokens"} -> {"prompt"}
    POST /v1/completions/render        a /v1/completions body -> [{"request_id", "token_ids", "count", ...}]
    POST /v1/chat/completions/render   a /v1/chat/completions body -> {"request_id", "token_ids", "count", ...}

The bodies of /tokenize and /detokenize are openai_format.models' TokenizeRequest and
DetokenizeRequest; a prompt or a chat in them is then parsed as the generation routes parse
it (tools included: they are part of a chat's prompt). The render routes answer vLLM's shape (its GenerateRequest: one for a chat, a list with one
per prompt for completions), with `count` beside the ids. Their bodies are parsed by the very
functions the generation routes use, and every route asks the kernel's "tokenize" query, which
sends the model's tokenizer the Encode a generation request sends: the ids are exactly the
ones generation sees (usage.prompt_tokens counts them), so a router can hash prefixes the way
llmos does. The kernel answers a failure as {"error": {...}} (kernel/tokenize_queries.py).
"""
from __future__ import annotations

import uuid

from aiohttp import web

from llmos.drivers.io.bodies import parse_json, read_body
from llmos.drivers.io.kernel_link import KernelLink
from llmos.openai_format import ApiError, ParsedRequest, parse_chat, parse_completion
from llmos.openai_format.models import DetokenizeRequest, TokenizeRequest
from llmos.openai_format.requests import MESSAGES
from llmos.openai_format.validation import validate
from llmos.sampling_params import MAX_PROMPT_TOKEN_IDS

LINK = web.AppKey("tokenize_link", KernelLink)
TIMEOUT_S = 120.0   # a prompt of millions of characters takes its time to tokenize
_FLAGS = ("add_special_tokens", "add_generation_prompt", "continue_final_message", "return_token_strs")
_CHAT_ONLY = ("add_generation_prompt", "continue_final_message")
_MESSAGES = {"model": MESSAGES["model"], "messages": MESSAGES["messages"],
             "tokens": f"tokens must be a list of at most {MAX_PROMPT_TOKEN_IDS} token ids"}


def add_routes(app: web.Application, link: KernelLink) -> None:
    app[LINK] = link
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_post("/v1/completions/render", render_completion)
    app.router.add_post("/v1/chat/completions/render", render_chat)


async def _ask(request: web.Request, what: str, args: dict) -> dict:
    data = await request.app[LINK].query(what, args, timeout=TIMEOUT_S)
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        raise ApiError(int(err.get("status") or 500), str(err.get("message")), err.get("param"), err.get("code"))
    if not isinstance(data, dict):
        raise ApiError(500, f"unexpected answer from the kernel to '{what}'", code="internal_error")
    return data


async def tokenize(request: web.Request) -> web.Response:
    body = parse_json(await read_body(request))
    m = validate(TokenizeRequest, body, _MESSAGES)
    flags = {k: getattr(m, k) for k in _FLAGS if getattr(m, k) is not None}
    if (m.prompt is None) == (m.messages is None):
        raise ApiError(400, "give exactly one of prompt (a string) and messages (a chat)", "prompt")
    if m.messages is not None:   # as /v1/chat/completions parses them
        parsed = parse_chat({k: body[k] for k in ("model", "messages", "tools") if body.get(k) is not None})
        if flags.get("continue_final_message"):
            if flags.get("add_generation_prompt"):
                raise ApiError(400, "continue_final_message and add_generation_prompt cannot both be true",
                               "continue_final_message")
            flags["add_generation_prompt"] = False   # (vLLM's default of true would contradict it)
    else:
        for name in ("tools", *_CHAT_ONLY):
            if getattr(m, name) is not None:
                raise ApiError(400, f"{name} applies to messages, not to a prompt", name)
        parsed = parse_completion({"model": m.model, "prompt": m.prompt})   # as /v1/completions
    return web.json_response(await _ask(request, "tokenize", {**_inputs(parsed), **flags}))


async def detokenize(request: web.Request) -> web.Response:
    m = validate(DetokenizeRequest, parse_json(await read_body(request)), _MESSAGES)
    return web.json_response(await _ask(request, "detokenize", {"model": m.model, "tokens": m.tokens}))


async def render_completion(request: web.Request) -> web.Response:
    parsed = parse_completion(parse_json(await read_body(request)))
    return web.json_response([await _render(request, parsed, "cmpl")])


async def render_chat(request: web.Request) -> web.Response:
    parsed = parse_chat(parse_json(await read_body(request)))
    return web.json_response(await _render(request, parsed, "chatcmpl"))


async def _render(request: web.Request, parsed: ParsedRequest, kind: str) -> dict:
    ids = (await _ask(request, "tokenize", _inputs(parsed)))["tokens"]
    return {"request_id": f"{kind}-{uuid.uuid4().hex}", "token_ids": ids, "count": len(ids), "model": parsed.model,
            "sampling_params": parsed.params.to_dict(), "stream": parsed.stream}


def _inputs(parsed: ParsedRequest) -> dict:
    """The tokenize query's model and input, from a body parsed as a generation request."""
    args = {"model": parsed.model}
    if parsed.messages is not None:
        args["messages"] = parsed.messages
        if parsed.tools:   # they are part of the prompt
            args["tools"] = parsed.tools
    elif parsed.prompt_token_ids is not None:
        args["prompt_token_ids"] = parsed.prompt_token_ids
    else:
        args["prompt"] = parsed.prompt
    return args
