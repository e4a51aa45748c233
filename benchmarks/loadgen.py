"""One streaming load generator for every system that speaks OpenAI's /v1/chat/completions.

llmos is reached over its Unix socket, the peers (vLLM, llama-server) over TCP; the requests,
the parsing and the clock are the same code, so the figures are comparable. Per request it
records the time to the first content chunk, the time of the last one and the number of
completion tokens (from the usage chunk, else one per content chunk).
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass

import httpx


@dataclass
class Stream:
    ttft: float | None = None   # seconds from sending to the first content chunk
    last: float | None = None   # seconds from sending to the last content chunk
    chunks: int = 0             # content chunks received
    tokens: int = 0             # completion tokens (usage), or chunks when no usage came

    def inter_token(self) -> float | None:
        """Mean time between tokens after the first one."""
        if self.ttft is None or self.last is None or self.tokens < 2:
            return None
        return (self.last - self.ttft) / (self.tokens - 1)


def chat_body(model: str, prompt: str, max_tokens: int) -> dict:
    """The standard request: greedy, exactly max_tokens tokens (EOS ignored), streamed."""
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def parse_sse(line: str) -> dict | None:
    """The JSON of one server-sent `data:` line; None for other lines and the [DONE] marker."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    return json.loads(data)


def apply_chunk(s: Stream, chunk: dict, now: float) -> None:
    """Fold one chunk into the stream's record; `now` is seconds since the request was sent."""
    if "error" in chunk:
        raise RuntimeError(f"server error in stream: {chunk['error']}")
    for choice in chunk.get("choices") or []:
        if (choice.get("delta") or {}).get("content"):
            s.chunks += 1
            s.last = now
            if s.ttft is None:
                s.ttft = now
    usage = chunk.get("usage")
    if usage and usage.get("completion_tokens"):
        s.tokens = usage["completion_tokens"]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarize(streams: list[Stream], wall: float) -> dict:
    """Output tokens/s over the wall time, TTFT percentiles, median inter-token latency."""
    tokens = sum(s.tokens for s in streams)
    ttfts = [s.ttft for s in streams if s.ttft is not None]
    itls = [x for x in (s.inter_token() for s in streams) if x is not None]
    return {"requests": len(streams), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall if wall else 0.0,
            "ttft_p50": pct(ttfts, 50), "ttft_p90": pct(ttfts, 90), "ttft_p99": pct(ttfts, 99),
            "itl_p50": statistics.median(itls) if itls else None}


def client_for(base_url: str, uds: str | None = None, timeout: float = 3600) -> httpx.AsyncClient:
    """A client for a TCP base URL, or for a Unix socket when `uds` is given."""
    transport = httpx.AsyncHTTPTransport(uds=uds) if uds else None
    # A connection per request: llama-server closes idle keep-alive connections after a few
    # seconds, and httpx reusing one it just closed fails the request (RemoteProtocolError).
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    return httpx.AsyncClient(transport=transport, base_url=base_url, timeout=timeout, limits=limits)


async def stream_one(client: httpx.AsyncClient, body: dict) -> Stream:
    s = Stream()
    t0 = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            chunk = parse_sse(line)
            if chunk is not None:
                apply_chunk(s, chunk, time.perf_counter() - t0)
    if not s.tokens:
        s.tokens = s.chunks
    return s


async def run(client: httpx.AsyncClient, model: str, prompts: list[str], max_tokens: int,
              concurrent: bool) -> dict:
    """All prompts at once (concurrent) or one after another; returns summarize()'s dict."""
    bodies = [chat_body(model, p, max_tokens) for p in prompts]
    t0 = time.perf_counter()
    if concurrent:
        streams = list(await asyncio.gather(*(stream_one(client, b) for b in bodies)))
    else:
        streams = [await stream_one(client, b) for b in bodies]
    return summarize(streams, time.perf_counter() - t0)
