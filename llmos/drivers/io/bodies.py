"""Reading request bodies with bounds: a size cap (aiohttp's client_max_size, 413), a time
cap against clients that trickle their body, and JSON parsing that answers 400 for
anything that is not a JSON document, nesting too deep for Python's parser included."""
from __future__ import annotations

import asyncio
import json

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from llmos.openai_format import ApiError

BODY_TIMEOUT_S = 30.0   # a client that trickles its body holds a connection no longer than this


async def read_body(request: web.Request, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The whole body, within the app's client_max_size (413) and `timeout_s` (408).
    Compressed bodies are refused (415): no client of this API sends them, and a body
    that only claims to be compressed made aiohttp fail inside the read."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(415, f"Content-Encoding {encoding[:32]!r} is not supported: send the body uncompressed",
                       "Content-Encoding", "unsupported_content_encoding")
    try:  # read() raises HTTPRequestEntityTooLarge past client_max_size
        return await asyncio.wait_for(request.read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", code="body_timeout") from None
    except (HttpProcessingError, RequestPayloadError) as exc:   # a body aiohttp could not decode
        raise ApiError(400, f"the request body cannot be read: {' '.join(str(exc).split())[:200]}") from None


def parse_json(raw: bytes):
    """The JSON value of a body. Raises ApiError(400) for bad JSON, bad UTF-8, NaN or
    Infinity (not JSON, and not a value any field takes) and nesting deeper than the parser's stack."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")
