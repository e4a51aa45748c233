"""AsyncClient: the API (llmos.client.api) executed with httpx.AsyncClient; every method is
awaited, except the streams (stream_*, results), which are async iterators."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

import httpx

from llmos.client.api import DEFAULT_TIMEOUT, Api, socket_of
from llmos.client.calls import DONE, Call, Description, Sleep, Stream
from llmos.client.errors import transport_errors


class AsyncClient(Api):
    """The same API as Client, for asyncio code."""

    def __init__(self, home: str | Path | None = None, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT):
        self.socket = socket_of(home)
        self._http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(self.socket)),
                                       base_url="http://llmos", timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _call(self, call: Call):
        with transport_errors(self.socket):
            resp = await self._http.request(**call.request())
        return call.result(resp)

    async def _run(self, description: Description):
        """As Client._run, awaiting each step."""
        if isinstance(description, Call):
            return await self._call(description)
        plan, send, value = description, description.send, None
        while True:
            try:
                step = send(value)
            except StopIteration as done:
                return done.value
            try:
                value = await (asyncio.sleep(step.seconds) if isinstance(step, Sleep) else self._call(step))
                send = plan.send
            except Exception as exc:   # the plan may handle it
                value, send = exc, plan.throw

    async def _open(self, description: Description) -> AsyncIterator:
        """The items of a Stream, after a plan's Calls (all on first iteration)."""
        stream = description if isinstance(description, Stream) else await self._run(description)
        with transport_errors(self.socket):
            async with self._http.stream(**stream.call.request()) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    stream.call.result(resp)
                async for text in resp.aiter_lines():
                    item = stream.each(text)
                    if item is DONE:
                        return
                    if item is not None:
                        yield item


def async_openai_client(home: str | Path | None = None, **kwargs):
    """An `openai.AsyncOpenAI` talking to the daemon's socket."""
    import openai

    http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(socket_of(home))),
                             timeout=kwargs.pop("timeout", DEFAULT_TIMEOUT))
    return openai.AsyncOpenAI(base_url="http://llmos/v1", api_key=kwargs.pop("api_key", "llmos"), http_client=http,
                              **kwargs)
