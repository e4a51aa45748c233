"""The io driver's side of an upload (llmos.drivers.io.batches) against a fake kernel link:
line splitting across read chunks, numbering, chunking, too-long lines and the size cap."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from llmos.drivers.io import batches
from llmos.openai_format import ApiError


class FakeLink:
    def __init__(self, bad=()):
        self.appends, self.bad = [], set(bad)

    async def command(self, what, args, timeout=None):
        assert what == "files.append" and args["id"] == "file-1"
        self.appends.append((args["first_line"], list(args["lines"])))
        return {"errors": [[args["first_line"] + i, "bad"] for i, x in enumerate(args["lines"]) if x in self.bad]}


class FakePart:
    def __init__(self, data: bytes, size: int):
        self.chunks = [data[i:i + size] for i in range(0, len(data), size)]

    async def read_chunk(self, size):
        return self.chunks.pop(0) if self.chunks else b""


def send(data: bytes, read: int = 3, link=None):
    link = link or FakeLink()
    request = SimpleNamespace(app={batches.LINK: link})
    return asyncio.run(batches._send_lines(request, "file-1", FakePart(data, read))), link


def test_lines_are_rebuilt_across_reads_and_numbered_in_chunks(monkeypatch):
    monkeypatch.setattr(batches, "CHUNK_LINES", 2)
    data = b"alpha\nbeta\r\n\ngamma\ndelta"   # no final newline
    nbytes, link = send(data)
    assert nbytes == len(data)
    assert link.appends == [(1, [b"alpha", b"beta\r"]), (3, [b"", b"gamma"]), (5, [b"delta"])]


def test_bad_and_too_long_lines_are_named_after_the_whole_file(monkeypatch):
    monkeypatch.setattr(batches, "MAX_LINE_BYTES", 8)
    with pytest.raises(batches.InvalidBatchFile) as exc:
        send(b"ok\n" + b"x" * 20 + b"\nwrong\nok\n" + b"y" * 9, link=FakeLink(bad={b"wrong"}))
    assert exc.value.lines == [2, 3, 5] and "3 invalid lines" in exc.value.message
    assert exc.value.body()["error"]["code"] == "invalid_batch_file"


def test_the_size_cap_is_a_413(monkeypatch):
    monkeypatch.setattr(batches, "MAX_FILE_BYTES", 10)
    with pytest.raises(ApiError) as exc:
        send(b"0123456789\nabc\n")
    assert exc.value.status == 413
