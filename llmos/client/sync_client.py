"""Client: the API (llmos.client.api) executed with httpx.Client, one request at a time."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import httpx

from llmos.client.api import DEFAULT_TIMEOUT, Api, socket_of
from llmos.client.calls import DONE, Call, Description, Sleep, Stream
from llmos.client.errors import transport_errors


class Client(Api):
    """Synchronous client. Each call is one HTTP request (a plan, a few); not thread-safe
    across streams."""

    def __init__(self, home: str | Path | None = None, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT):
        self.socket = socket_of(home)
        self._http = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                                  base_url="http://llmos", timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, call: Call):
        with transport_errors(self.socket):
            resp = self._http.request(**call.request())
        return call.result(resp)

    def _run(self, description: Description):
        """The result of a Call, or of a plan (its Calls and Sleeps executed in turn)."""
        if isinstance(description, Call):
            return self._call(description)
        plan, send, value = description, description.send, None
        while True:
            try:
                step = send(value)
            except StopIteration as done:
                return done.value
            try:
                value, send = (time.sleep(step.seconds) if isinstance(step, Sleep) else self._call(step)), plan.send
            except Exception as exc:   # the plan may handle it
                value, send = exc, plan.throw

    def _open(self, description: Description) -> Iterator:
        """The items of a Stream; a plan's Calls are made now, the stream on first next()."""
        stream = description if isinstance(description, Stream) else self._run(description)
        return self._items(stream)

    def _items(self, stream: Stream) -> Iterator:
        with transport_errors(self.socket), self._http.stream(**stream.call.request()) as resp:
            if resp.status_code >= 400:
                resp.read()
                stream.call.result(resp)
            for text in resp.iter_lines():
                item = stream.each(text)
                if item is DONE:
                    return
                if item is not None:
                    yield item


def openai_client(home: str | Path | None = None, **kwargs):
    """An `openai.OpenAI` talking to the daemon's socket (needs the `openai` package)."""
    import openai

    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_of(home))),
                        timeout=kwargs.pop("timeout", DEFAULT_TIMEOUT))
    return openai.OpenAI(base_url="http://llmos/v1", api_key=kwargs.pop("api_key", "llmos"), http_client=http,
                         **kwargs)
