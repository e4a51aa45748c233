"""Slow and greedy clients against the real io driver process (FakeKernel from
fake_kernel.py): the connection cap, the header deadline (slowloris), bounded keep-alive
and the send-stall deadline. Each bad case is followed by a normal request that must get its
correct answer. Deadlines in the asserts are generous; only "it happened" is asserted."""
from __future__ import annotations

import select
import socket
import time
from pathlib import Path

import httpx
import pytest

from llmos import protocol
from llmos.drivers.io.__main__ import parse_args
from llmos.drivers.io.limits import Limits
from fake_kernel import MODEL, REPLY, io_stack

CAP = 4
HEADER_TIMEOUT = 1.0
KEEPALIVE = 30.0     # longer than any deadline below: a disconnect seen here is not keep-alive's
DEADLINE = 15.0      # generous upper bound for a disconnect that is due after about 1 s


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with io_stack(tmp_path_factory.mktemp("io-limits"), "--max-connections", str(CAP),
                    "--header-timeout", str(HEADER_TIMEOUT), "--keepalive-timeout", str(KEEPALIVE),
                    "--send-timeout", "1", timeout=10) as s:
        yield s


def _client(sock: Path) -> httpx.Client:
    """A client that keeps no idle connection (it would hold one of the CAP slots)."""
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://llmos", timeout=10,
                        limits=httpx.Limits(max_keepalive_connections=0))


def assert_served(stack) -> None:
    """The driver is alive and answers a health check and a completion correctly."""
    kernel, proc, sock = stack
    assert proc.poll() is None
    with _client(sock) as http:
        assert http.get("/health").json()["status"] == "ok"
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "".join(REPLY)


def _connect(sock: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock))
    return s


def _read_until_closed(s: socket.socket, deadline: float = DEADLINE) -> bytes:
    """Everything the server sends until it closes the connection; fails past the deadline."""
    got, end = b"", time.monotonic() + deadline
    while True:
        left = end - time.monotonic()
        assert left > 0, f"still connected after {deadline} s; got {got[:200]!r}"
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def _get_health(s: socket.socket) -> bytes:
    """One keep-alive GET /health on a raw connection; returns the response head."""
    s.sendall(b"GET /health HTTP/1.1\r\nHost: llmos\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(4096)
    head, body = got.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(4096)
    return head


def _hold_all_slots(sock: Path) -> list[socket.socket]:
    """CAP connections, each served once and then idle on keep-alive, holding a slot. Until
    the driver has seen the previous tests' clients hang up, some may be refused: retry."""
    held, end = [], time.monotonic() + DEADLINE
    while len(held) < CAP:
        assert time.monotonic() < end, f"could not hold {CAP} connections"
        s = _connect(sock)
        if _get_health(s).startswith(b"HTTP/1.1 200"):
            held.append(s)
        else:
            s.close()
            time.sleep(0.05)
    return held


def test_options_and_defaults():
    args = parse_args(["--endpoint", "ipc:///x", "--name", "io", "--socket", "/tmp/x.sock"])
    assert args.limits == Limits()
    assert (args.limits.max_connections, args.limits.header_timeout, args.limits.keepalive_timeout) == (256, 10.0, 15.0)
    args = parse_args(["--endpoint", "e", "--name", "io", "--socket", "s", "--max-connections", "8",
                       "--header-timeout", "2.5", "--max-headers", "20"])
    assert args.limits.handler_kwargs() == {"keepalive_timeout": 15.0, "max_line_size": 8190,
                                            "max_field_size": 8190, "max_headers": 20}
    assert (args.limits.max_connections, args.limits.header_timeout) == (8, 2.5)
    with pytest.raises(SystemExit):
        parse_args(["--endpoint", "e", "--name", "io", "--socket", "s", "--max-connections", "0"])


def test_silent_and_partial_header_clients_are_disconnected(stack):
    silent = _connect(stack[2])
    partial = _connect(stack[2])
    partial.sendall(b"GET /health HTTP/1.1\r\nHost: ll")
    for s in (silent, partial):
        got = _read_until_closed(s)
        assert got.startswith(b"HTTP/1.1 408 ") and b'"code": "header_timeout"' in got
        s.close()
    assert_served(stack)


def test_dribbling_headers_does_not_extend_the_deadline(stack):
    s = _connect(stack[2])
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: llmos\r\nX-Slow: ")
    end = time.monotonic() + DEADLINE
    closed = False
    while not closed:
        assert time.monotonic() < end, "a client dribbling its headers was never disconnected"
        try:
            s.sendall(b"a")   # a byte each 0.1 s: every one arrives well within any idle timeout
        except (BrokenPipeError, ConnectionResetError):
            break
        closed = bool(select.select([s], [], [], 0.1)[0])
    _read_until_closed(s)
    s.close()
    assert_served(stack)


def test_keepalive_connection_must_send_next_headers_in_time(stack):
    s = _connect(stack[2])
    assert _get_health(s).startswith(b"HTTP/1.1 200")
    assert _get_health(s).startswith(b"HTTP/1.1 200")   # kept alive, served again
    s.sendall(b"GET /health HTTP/1.1\r\n")              # then the next request stops half way
    assert _read_until_closed(s).startswith(b"HTTP/1.1 408 ")
    s.close()
    assert_served(stack)


def test_connections_past_the_cap_get_503_and_served_ones_go_on(stack):
    held = _hold_all_slots(stack[2])
    with _client(stack[2]) as http:
        r = http.get("/health")
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert r.json()["error"] == {"message": f"too many connections to llmos (limit {CAP}); retry shortly",
                                     "type": "service_unavailable_error", "param": None,
                                     "code": "too_many_connections"}
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert r.status_code == 503
    for s in held:     # the refusals did not disturb the connections being served
        assert _get_health(s).startswith(b"HTTP/1.1 200")
    for s in held:
        s.close()
    end = time.monotonic() + DEADLINE   # the driver sees the closes asynchronously
    with _client(stack[2]) as http:
        while http.get("/health").status_code == 503:
            assert time.monotonic() < end, "slots never freed after the held connections closed"
            time.sleep(0.05)
    assert_served(stack)


def test_client_that_reads_nothing_is_cut_off(stack):
    kernel = stack[0]
    saved = kernel.ps
    # far more than socket buffers hold
    kernel.ps = protocol.ProcessReport(processes=[], requests=[], scheduler={"pad": "x" * (4 << 20)})
    try:
        s = _connect(stack[2])
        s.sendall(b"GET /llmos/v1/ps HTTP/1.1\r\nHost: llmos\r\n\r\n")
        poll = select.poll()
        poll.register(s, select.POLLRDHUP)   # the server hanging up, without reading anything
        end = time.monotonic() + DEADLINE
        while not poll.poll(100):
            assert time.monotonic() < end, "a client that reads nothing was never cut off"
        got = _read_until_closed(s)
        assert got.startswith(b"HTTP/1.1 200") and len(got) < (4 << 20)
        s.close()
    finally:
        kernel.ps = saved
    assert_served(stack)


def test_idle_keepalive_connection_is_closed_and_frees_its_slot(tmp_path):
    with io_stack(tmp_path, "--max-connections", "1", "--keepalive-timeout", "1", timeout=10) as stack:
        s = _connect(stack[2])
        assert _get_health(s).startswith(b"HTTP/1.1 200")
        with _client(stack[2]) as http:   # the idle connection holds the only slot (unless already closed)
            status = http.get("/health").status_code
            assert status == 503 or (select.select([s], [], [], 0)[0] and s.recv(1) == b"")
        assert _read_until_closed(s) == b""   # closed by the driver while idle
        s.close()
        end = time.monotonic() + DEADLINE
        with _client(stack[2]) as http:
            while http.get("/health").status_code == 503:
                assert time.monotonic() < end, "the closed connection's slot was never freed"
                time.sleep(0.05)
        assert_served(stack)
