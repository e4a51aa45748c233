"""KV events: the CBOR and hashes llm-d's indexer computes, and what a BlockPool reports
(the frames through a real daemon are in test_kv_events_e2e.py)."""
from __future__ import annotations

import hashlib

import msgpack
import pytest
import zmq

from llmos.kernel.blocks import BlockPool
from llmos.kernel.kv_events import KVEventStream, cbor, chunk_hash, root_hash
from llmos.kernel.kv_manager import KVCacheManager


@pytest.mark.parametrize("value, hex_", [   # RFC 8949, appendix A
    (0, "00"), (1, "01"), (10, "0a"), (23, "17"), (24, "1818"), (25, "1819"), (100, "1864"),
    (1000, "1903e8"), (1000000, "1a000f4240"), (1000000000000, "1b000000e8d4a51000"),
    (18446744073709551615, "1bffffffffffffffff"), (None, "f6"), ("", "60"), ("a", "6161"),
    ("IETF", "6449455446"), ("\u00fc", "62c3bc"), ([], "80"), ([1, 2, 3], "83010203"),
    ([1, [2, 3], [4, 5]], "8301820203820405"), (list(range(1, 26)),
     "98190102030405060708090a0b0c0d0e0f101112131415161718181819"),
])
def test_cbor_is_rfc_8949s_deterministic_encoding(value, hex_):
    assert cbor(value).hex() == hex_


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, True, b"x", {"a": 1}])
def test_cbor_refuses_what_the_hashes_never_hold(bad):
    with pytest.raises((TypeError, ValueError)):
        cbor(bad)


def test_hashes_are_the_low_64_bits_of_sha256_over_cbor_as_llm_d_computes_them():
    root = root_hash("")
    assert root == int.from_bytes(hashlib.sha256(b"\x60").digest()[24:], "big")
    payload = bytes([0x83, 0x1b]) + root.to_bytes(8, "big") + bytes([0x82, 0x01, 0x18, 0x64, 0xf6])
    assert chunk_hash(root, [1, 100]) == int.from_bytes(hashlib.sha256(payload).digest()[24:], "big")
    assert root_hash("42") != root and chunk_hash(root, [1, 2]) != chunk_hash(root, [2, 1])


class _Recorder:
    def __init__(self):
        self.events = []

    def stored(self, h, parent, tokens):
        self.events.append(("stored", h, parent, tuple(tokens)))

    def removed(self, h):
        self.events.append(("removed", h))


def test_a_pool_reports_what_enters_and_leaves_its_prefix_cache_once():
    pool = BlockPool(3, 2)
    pool.events = rec = _Recorder()
    a, b = pool.allocate(2)
    pool.cache(a, 11, (1, 2))
    pool.cache(b, 12, (3, 4), parent_hash=11)
    pool.cache(b, 12, (3, 4), parent_hash=11)   # already cached: no news
    (c,) = pool.allocate(1)
    pool.cache(c, 11, (1, 2))                   # a duplicate of a's content: lookups still find a
    assert rec.events == [("stored", 11, None, (1, 2)), ("stored", 12, 11, (3, 4))]
    assert pool.num_cached == 2
    pool.free([a, b, c])
    pool.allocate(3)                            # evicts all three; c's hash was never the cache's
    assert rec.events[2:] == [("removed", 12), ("removed", 11)]   # (a tail is evicted before its head)
    assert pool.num_cached == 0


def test_a_stream_sends_topic_seq_and_a_vllm_batch(tmp_path):
    stream = KVEventStream(f"ipc://{tmp_path}/kv.sock", pod="p", hash_seed="")
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    sub.setsockopt(zmq.RCVTIMEO, 10_000)
    sub.connect(stream.endpoint)
    try:
        events = stream.attach("m~1", "m", 16)
        kv = KVCacheManager(BlockPool(4, 16), chunk_hash=chunk_hash, root_hash=stream.root)
        assert kv.root_hash == root_hash("")
        # A SUB socket joins asynchronously: repeat the first message until one arrives.
        for _ in range(500):
            stream.flush()
            events.cleared()
            if sub.poll(20):
                break
        topic, seq, payload = sub.recv_multipart()
        first = int.from_bytes(seq, "big")
        assert topic == b"kv@p~1@m" and len(seq) == 8
        ts, batch, rank = msgpack.unpackb(payload)
        assert batch == [["AllBlocksCleared"]] and rank is None and ts > 0
        while sub.poll(0):
            first = int.from_bytes(sub.recv_multipart()[1], "big")
        events.pending = []
        events.stored(5, None, range(16))
        events.removed(5)
        stream.flush()
        topic, seq, payload = sub.recv_multipart()
        assert int.from_bytes(seq, "big") == first + 1   # one counter, +1 per message
        assert msgpack.unpackb(payload)[1] == [["BlockStored", [5], None, list(range(16)), 16, None, "GPU"],
                                               ["BlockRemoved", [5], "GPU"]]
        stream.flush()   # nothing pending: nothing sent
        assert not sub.poll(50)
    finally:
        sub.close(0)
        stream.close()
