"""The tokenizer over HTTP: vLLM's /tokenize and /detokenize, and the render routes of the
inference gateway's model-server contract.

    POST /tokenize                     {"model", "prompt"} or {"model", "messages"}, options as vLLM's:
                                       add_special_tokens, add_generation_prompt, continue_final_message,
                                       return_token_strs -> {"count", "max_model_len", "tokens"[, "token_strs"]}
    POST /detokenize                   {"model", "tokens"} -> {"prompt"}
    POST /v1/completions/render        a /v1/completions body -> [{"request_id", "token_ids", "count", ...}]
    POST /v1/chat/completions/render   a /v1/chat/completions body -> {"request_id", "token_ids", "count", ...}

The render routes answer vLLM's shape (its GenerateRequest: one for a chat, a list with one
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
from llmos.sampling_params import MAX_PROMPT_TOKEN_IDS, MAX_TOKEN_ID

LINK = web.AppKey("tokenize_link", KernelLink)
TIMEOUT_S = 120.0   # a prompt of millions of characters takes its time to tokenize
_FLAGS = ("add_special_tokens", "add_generation_prompt", "continue_final_message", "return_token_strs")
_CHAT_ONLY = ("add_generation_prompt", "continue_final_message")


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


async def _body(request: web.Request, allowed: set[str]) -> dict:
    body = parse_json(await read_body(request))
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name in body:
        if name not in allowed:
            raise ApiError(400, f"unknown parameter '{name}'", name)
    return body


async def tokenize(request: web.Request) -> web.Response:
    body = await _body(request, {"model", *_FLAGS, "prompt", "messages"})
    flags = {k: body[k] for k in _FLAGS if body.get(k) is not None}
    for name, value in flags.items():
        if type(value) is not bool:
            raise ApiError(400, f"{name} must be a boolean", name)
    if (body.get("prompt") is None) == (body.get("messages") is None):
        raise ApiError(400, "give exactly one of prompt (a string) and messages (a chat)", "prompt")
    if body.get("messages") is not None:
        parsed = parse_chat({"model": body.get("model"), "messages": body["messages"]})   # as /v1/chat/completions
        if flags.get("continue_final_message"):
            if flags.get("add_generation_prompt"):
                raise ApiError(400, "continue_final_message and add_generation_prompt cannot both be true",
                               "continue_final_message")
            flags["add_generation_prompt"] = False   # (vLLM's default of true would contradict it)
    else:
        if not isinstance(body["prompt"], str):
            raise ApiError(400, "prompt must be a string", "prompt")
        for name in _CHAT_ONLY:
            if name in flags:
                raise ApiError(400, f"{name} applies to messages, not to a prompt", name)
        parsed = parse_completion({"model": body.get("model"), "prompt": body["prompt"]})   # as /v1/completions
    return web.json_response(await _ask(request, "tokenize", {**_inputs(parsed), **flags}))


async def detokenize(request: web.Request) -> web.Response:
    body = await _body(request, {"model", "tokens"})
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or len(tokens) > MAX_PROMPT_TOKEN_IDS:
        raise ApiError(400, f"tokens must be a list of at most {MAX_PROMPT_TOKEN_IDS} token ids", "tokens")
    bad = next((i for i, t in enumerate(tokens) if type(t) is not int or not 0 <= t <= MAX_TOKEN_ID), None)
    if bad is not None:
        raise ApiError(400, f"tokens[{bad}] must be a token id (an integer in [0, 2**31))", "tokens")
    model = parse_completion({"model": body.get("model"), "prompt": "-"}).model   # the model rules of every route
    return web.json_response(await _ask(request, "detokenize", {"model": model, "tokens": tokens}))


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
