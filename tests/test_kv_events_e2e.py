"""KV events through a real daemon: a SUB socket decodes the frames with pyzmq and msgpack,
and what they say is checked against the hashes llm-d computes from the request's tokens
and against what `llmos mem` (the memory report) says the prefix cache holds; a model-driver
restart keeps the stream going; an unload clears the topic."""
from __future__ import annotations

import socket
import time

import msgpack
import pytest
import zmq

from daemon_harness import Daemon
from llmos.kernel.kv_events import chunk_hash, root_hash

BLOCK = 16
TOPIC = b"kv@pod-a@tl"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Subscriber:
    """Every message of the stream, in order, with the block hashes each topic holds."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"kv@")
        self.sock.setsockopt(zmq.RECONNECT_IVL, 10)
        self.sock.connect(endpoint)   # before the daemon binds: ZeroMQ connects once it does
        self.messages: list[tuple[bytes, int, list]] = []
        self.live: set[int] = set()

    def drain(self, until, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, f"the stream never said it: {self.messages[-5:]}"
            if self.sock.poll(100):
                topic, seq, payload = self.sock.recv_multipart()
                assert len(seq) == 8
                ts, events, rank = msgpack.unpackb(payload)
                assert isinstance(ts, float) and rank is None
                self.messages.append((topic, int.from_bytes(seq, "big"), events))
                for e in events:
                    if e[0] == "AllBlocksCleared":
                        self.live.clear()
                    elif e[0] == "BlockStored":
                        self.live.update(e[1])
                    elif e[0] == "BlockRemoved":
                        self.live.difference_update(e[1])

    def events(self, kind: str) -> list:
        return [e for _, _, events in self.messages for e in events if e[0] == kind]


@pytest.fixture(scope="module")
def stream(tmp_path_factory, tiny_llama_dir):
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    sub = Subscriber(endpoint)
    d = Daemon(tmp_path_factory.mktemp("kvev"), [f"tl={tiny_llama_dir}"], "--kv-events-endpoint", endpoint,
               "--kv-events-pod", "pod-a", "--kv-events-hash-seed", "7", "--max-loaded-models", "2").wait_ready()
    yield d, sub
    d.stop()
    sub.sock.close(0)


def _complete(d, prompt_ids: list[int], tokens: int = 4) -> dict:
    with d.http() as c:
        r = c.post("/v1/completions", json={"model": "tl", "prompt": prompt_ids, "max_tokens": tokens,
                                            "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def _cached_blocks(d) -> int:
    with d.http() as c:
        return c.get("/llmos/v1/memory").json()["tl"]["prefix_cache"]["cached_blocks"]


def test_the_frames_carry_llm_ds_hashes_of_the_requests_tokens(stream):
    d, sub = stream
    sub.drain(lambda: sub.messages)
    topic, first_seq, first = sub.messages[0]
    assert (topic, first_seq, first) == (TOPIC, 1, [["AllBlocksCleared"]])   # a new pool, the stream's first
    prompt = list(range(100, 100 + 3 * BLOCK + 5))
    _complete(d, prompt)
    root = root_hash("7")
    want = [chunk_hash(root, prompt[:BLOCK])]
    for i in (1, 2):
        want.append(chunk_hash(want[-1], prompt[i * BLOCK:(i + 1) * BLOCK]))
    sub.drain(lambda: len(sub.events("BlockStored")) >= 3)
    stored = sub.events("BlockStored")[:3]
    assert [e[1] for e in stored] == [[h] for h in want]
    assert [e[2] for e in stored] == [None, want[0], want[1]]        # parents chain
    assert [e[3] for e in stored] == [prompt[i * BLOCK:(i + 1) * BLOCK] for i in range(3)]
    assert all(e[4] == BLOCK and e[5] is None and e[6] == "GPU" for e in stored)
    seqs = [s for _, s, _ in sub.messages]
    assert seqs == list(range(1, len(seqs) + 1))                     # one counter, no gaps
    assert all(t == TOPIC for t, _, _ in sub.messages)


def test_what_the_stream_says_is_what_the_memory_report_holds(stream):
    d, sub = stream
    for n in range(6):   # distinct prompts, one at a time (no two compute the same block)
        _complete(d, [200 + n] + list(range(300, 300 + 2 * BLOCK + 3)), tokens=BLOCK)
    want = _cached_blocks(d)
    sub.drain(lambda: len(sub.live) == want)   # (the kernel flushes every 20 ms)
    assert want > 6 * 2


def test_a_model_driver_restart_keeps_the_stream_and_its_cache(stream):
    d, sub = stream
    before = len(sub.messages)
    with d.http() as c:
        assert c.post("/llmos/v1/drivers/model-tl/restart").status_code == 200
    prompt = list(range(100, 100 + 3 * BLOCK + 5))   # the first test's: still cached
    r = _complete(d, prompt)
    assert r["usage"]["completion_tokens"] == 4
    new = list(range(500, 500 + BLOCK + 1))
    _complete(d, new)
    sub.drain(lambda: any(e[3] == new[:BLOCK] for e in sub.events("BlockStored")))
    assert not [e for _, _, events in sub.messages[before:] for e in events if e[0] == "AllBlocksCleared"]
    seqs = [s for _, s, _ in sub.messages]
    assert seqs == list(range(1, len(seqs) + 1))
    sub.drain(lambda: len(sub.live) == _cached_blocks(d))


def test_an_unloaded_model_clears_its_topic(stream):
    d, sub = stream
    with d.http() as c:
        assert c.post("/llmos/v1/models/tl/unload").status_code == 200
    sub.drain(lambda: sub.messages[-1][2] == [["AllBlocksCleared"]])
    assert sub.live == set()
    with d.http() as c:   # and it serves on (loaded again on demand), with a fresh, cleared topic
        r = c.post("/v1/completions", json={"model": "tl", "prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
