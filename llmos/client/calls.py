"""The API described as data, so that Client and AsyncClient share every method.

A method of the API returns one description: a `Call` (one request and how to read its
answer), a `Stream` (a request whose answer is read line by line), or a plan (a generator
that yields Calls and `Sleep`s, gets each Call's result, or its exception, sent back, and
returns the method's result; a plan for a stream returns its `Stream`). Executing a
description is the only thing the synchronous and the asynchronous client do differently,
as httpx's `Auth.auth_flow` generators serve both of its clients.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Generator, Union

import httpx

from llmos.client.errors import ServerError, answer_error


@dataclass(frozen=True)
class Call:
    """One request; the result is `read` applied to the decoded answer (JSON, else text)."""
    method: str
    path: str
    json: Any = None
    params: dict | None = None
    data: dict | None = None
    files: dict | None = None
    read: Callable[[Any], Any] | None = None

    def request(self) -> dict:
        """The arguments of httpx's `request` / `stream`."""
        kw = {"params": self.params, "data": self.data, "files": self.files}
        return {"method": self.method, "url": self.path, "json": self.json,
                **{k: v for k, v in kw.items() if v is not None}}

    def result(self, resp: httpx.Response):
        """The result of a read answer; raises the LlmosError of an error answer."""
        body = decoded(resp)
        if resp.status_code >= 400:
            raise answer_error(resp.status_code, body)
        return body if self.read is None else self.read(body)


DONE = object()   # what Stream.each returns for the end of the stream


@dataclass(frozen=True)
class Stream:
    """A request whose answer is read as it arrives: `each` maps a line to an item, None
    (skip it) or DONE. An error answer raises before the first item."""
    call: Call
    each: Callable[[str], Any]


@dataclass(frozen=True)
class Sleep:
    seconds: float


Plan = Generator[Union[Call, Sleep], Any, Any]
Description = Union[Call, Stream, Plan]


def decoded(resp: httpx.Response):
    try:
        return resp.json()
    except ValueError:
        return resp.text


def data(answer: dict):
    """Call.read for OpenAI's list objects: their "data"."""
    return answer["data"]


def line(text: str) -> str | None:
    """Stream.each for the lines of a file (blank lines skipped)."""
    return text or None


def deltas(chat: bool) -> Callable[[str], Any]:
    """Stream.each for an OpenAI event stream: the text delta of each chunk (empty ones
    skipped), DONE at [DONE]; an error event (a failure after the stream started) raises
    ServerError."""
    def each(text: str):
        if not text.startswith("data:"):
            return None
        data = text[5:].strip()
        if data == "[DONE]":
            return DONE
        chunk = json.loads(data)
        if isinstance(chunk, dict) and "error" in chunk:
            err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
            raise ServerError(str(err.get("message")), 500, err.get("code"), err.get("param"))
        choices = chunk.get("choices") or []
        if not choices:
            return None
        delta = (choices[0].get("delta") or {}).get("content") if chat else choices[0].get("text")
        return delta or None
    return each
