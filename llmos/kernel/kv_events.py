"""KV events: the prefix cache's changes, published on an optional ZeroMQ PUB socket in the
frames vLLM emits and llm-d's KV-cache indexer reads, so a cluster router can send a
request to the daemon that already holds its prefix.

Each message is three frames: the topic, an 8-byte big-endian sequence number (one counter
for the whole stream, +1 per message, never reset while the kernel lives), and a msgpack
batch `[ts, [event, ...], None]` whose events are tagged arrays, as vLLM's msgspec structs
(array_like, tag=True) encode them:

    ["BlockStored", [hash], parent_hash | None, token_ids, block_size, None (lora), medium]
    ["BlockRemoved", [hash], medium]
    ["AllBlocksCleared"]

A block is stored when a full block enters the prefix cache and removed when it leaves it
(evicted for reuse); a topic's pool that is new (a model loaded) or gone (unloaded) says
AllBlocksCleared. The kernel owns the pools and this stream, so a model-driver restart
changes neither. The topic is "kv@<pod>@<model>", the form llm-d subscribes to; a replica
engine "m~1" is the pod "<pod>~1" (its pool is its own).

Block hashes are llm-d's and vLLM's sha256_cbor_64bit: the low 64 bits of SHA-256 over the
canonical CBOR of [parent, token_ids, None], chained from the hash of the seed string
(llm-d's HashSeed, vLLM's PYTHONHASHSEED). With events on, the prefix cache itself hashes
this way (kv_manager.py takes `chunk_hash`), so the hashes published are the ones a
router computes from a request's tokens, and the ones the cache looks up.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time

import msgpack
import zmq

log = logging.getLogger(__name__)
MAX_PENDING = 10_000   # events held between flushes; past it they are dropped for one AllBlocksCleared
FLUSH_S = 0.02
MEDIUM = "GPU"         # vLLM's name for the device tier (a CPU pool too: it is the one a request reads)


# ---------------------------------------------------------------- hashing (canonical CBOR)
def _head(major: int, n: int) -> bytes:
    """A CBOR item head in its shortest form (RFC 8949, section 4.2.1)."""
    if n < 24:
        return bytes([major << 5 | n])
    for extra, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * width):
            return bytes([major << 5 | extra]) + n.to_bytes(width, "big")
    raise ValueError("CBOR integers here are below 2**64")


def cbor(value) -> bytes:
    """Deterministic CBOR of the few shapes the hashes need: None, unsigned ints, text, lists."""
    if value is None:
        return b"\xf6"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return _head(0, value)
    if isinstance(value, str):
        data = value.encode()
        return _head(3, len(data)) + data
    if isinstance(value, (list, tuple)):
        return _head(4, len(value)) + b"".join(cbor(v) for v in value)
    raise TypeError(f"no CBOR here for {type(value).__name__}")


def _low64(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[24:], "big")


def root_hash(seed: str = "") -> int:
    return _low64(cbor(seed))


def chunk_hash(parent: int, tokens) -> int:
    return _low64(cbor([parent, list(tokens), None]))


# ---------------------------------------------------------------- the stream
class PoolEvents:
    """What one engine's BlockPool reports (blocks.py calls these); kept until the flush."""

    def __init__(self, stream: "KVEventStream", topic: bytes, block_size: int):
        self.stream, self.topic, self.block_size = stream, topic, block_size
        self.pending: list[list] = [["AllBlocksCleared"]]   # a new pool: forget what this topic said

    def stored(self, block_hash: int, parent_hash: int | None, tokens) -> None:
        self._add(["BlockStored", [block_hash], parent_hash, list(tokens), self.block_size, None, MEDIUM])

    def removed(self, block_hash: int) -> None:
        self._add(["BlockRemoved", [block_hash], MEDIUM])

    def cleared(self) -> None:
        self.pending = [["AllBlocksCleared"]]

    def _add(self, event: list) -> None:
        if len(self.pending) >= MAX_PENDING:   # a subscriber that lost events must start over, and knows it
            log.warning("kv events: %d pending on %s; dropped for AllBlocksCleared", len(self.pending), self.topic)
            self.pending = [["AllBlocksCleared"]]
            self.stream.dropped += 1
            return
        self.pending.append(event)


class KVEventStream:
    """The kernel's PUB socket. `flush` sends what every pool reported since the last one."""

    def __init__(self, endpoint: str, pod: str | None = None, hash_seed: str = ""):
        self.pod = pod or socket.gethostname()
        self.root = root_hash(hash_seed)
        self.seq = 0
        self.dropped = 0
        self.pools: dict[str, PoolEvents] = {}
        self.sock = zmq.Context.instance().socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)   # a slow subscriber misses messages (a seq gap), never us
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        log.info("kv events: publishing on %s (pod %s)", self.endpoint, self.pod)

    def topic(self, engine_id: str, model: str) -> bytes:
        return f"kv@{self.pod}{engine_id[len(model):]}@{model}".encode()   # engines: "m", "m~1", ...

    def attach(self, engine_id: str, model: str, block_size: int) -> PoolEvents:
        events = self.pools[engine_id] = PoolEvents(self, self.topic(engine_id, model), block_size)
        return events

    def detach(self, engine_id: str) -> None:
        """The engine's pool is gone (unloaded): one last AllBlocksCleared for its topic."""
        events = self.pools.pop(engine_id, None)
        if events is not None:
            events.cleared()
            self._send(events)

    def flush(self) -> None:
        for events in self.pools.values():
            if events.pending:
                self._send(events)

    def _send(self, events: PoolEvents) -> None:
        batch, events.pending = events.pending, []
        self.seq += 1
        try:
            self.sock.send_multipart([events.topic, self.seq.to_bytes(8, "big"),
                                      msgpack.packb([time.time(), batch, None])], flags=zmq.NOBLOCK)
        except zmq.Again:   # (a PUB socket drops rather than blocks; this is belt and braces)
            self.dropped += 1

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                self.flush()
            except Exception:   # the stream is advisory: never let it stop a kernel loop
                log.exception("kv events: flush failed")

    def close(self) -> None:
        self.sock.close(0)
