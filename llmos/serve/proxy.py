"""What a replica sends its daemon: the request built from the client's, and the errors that
mean "its daemon failed, route it elsewhere". No Ray here, so it is unit-tested without it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

ROUTES = ("/v1/completions", "/v1/chat/completions")
# Headers passed on to the daemon. Its Unix socket trusts its caller, so the client's own
# Authorization is dropped (the ingress checked its key); the gateway headers choose the
# priority class and tenant, as behind any other router.
FORWARDED = ("content-type", "accept", "x-request-id", "x-gateway-inference-objective",
             "x-gateway-inference-fairness-id")


class DaemonUnavailable(RuntimeError):
    """The replica's daemon could not answer (exited, not listening, connection dropped before
    the answer's first byte). The request did nothing the client saw, so it may be retried."""


@dataclass
class ProxyRequest:
    """One OpenAI request as the replica deployment receives it through a Ray handle.
    `prompt` is what Ray's PrefixCacheAffinityRouter reads for affinity (it looks for an
    argument with a `prompt` attribute): never empty, as its match rate divides by it."""
    route: str
    body: bytes
    headers: dict = field(default_factory=dict)
    prompt: str = " "
    stream: bool = False

    @classmethod
    def build(cls, route: str, body: bytes, headers) -> "ProxyRequest":
        if route not in ROUTES:
            raise ValueError(f"not a proxied route: {route}")
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None   # the daemon answers the precise error
        obj = obj if isinstance(obj, dict) else {}
        kept = {k.lower(): v for k, v in dict(headers).items() if k.lower() in FORWARDED}
        kept.setdefault("content-type", "application/json")
        return cls(route, body, kept, prompt_text(obj) or route, obj.get("stream") is True)


def prompt_text(body: dict) -> str:
    """The text a request starts with: the prompt, or the messages' contents in order."""
    if "messages" in body:
        return "".join(_text(m.get("content") if isinstance(m, dict) else m) for m in body["messages"] or [])
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not all(isinstance(p, str) for p in prompt):
        return json.dumps(prompt)   # token ids: their digits still share a prefix
    return _text(prompt)


def _text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text(v) for v in value)
    if isinstance(value, dict):
        return _text(value.get("text", value.get("content")))
    return ""


def sse_error(message: str) -> bytes:
    """The event that ends a stream whose daemon failed mid-way: an explicit error, never a
    silent end."""
    err = {"error": {"message": message, "type": "server_error", "code": "daemon_failed"}}
    return f"data: {json.dumps(err)}\n\n".encode()
