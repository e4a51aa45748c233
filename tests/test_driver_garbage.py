"""Each driver process survives garbage from its bus endpoint and keeps answering."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import zmq

from llmos import protocol


class FakeKernel:
    """A bare ROUTER socket standing where the kernel's bus would be."""

    def __init__(self, tmp_path):
        self.endpoint = f"ipc://{tmp_path / 'bus'}"
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)

    def recv(self, kind, timeout=120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(200):
                peer, *frames = self.sock.recv_multipart()
                msg = protocol.decode(frames)
                if isinstance(msg, kind):
                    return peer, msg
        raise TimeoutError(f"no {kind.__name__} within {timeout}s")

    def send(self, peer: bytes, frames):
        self.sock.send_multipart([peer, *frames])


GARBAGE = [[b"\x99"], [b"\x20", b"\xc1"], [b"\x20", b"\x80"], [b"\x12", b"x", b"y"], [b""], [b"\x22", b"\x93\x01"]]


def spawn(module, fake, name, *args):
    return subprocess.Popen([sys.executable, "-m", module, "--endpoint", fake.endpoint, "--name", name, *args])


@pytest.fixture
def fake(tmp_path):
    k = FakeKernel(tmp_path)
    yield k
    k.sock.close()


def test_tokenizer_driver_drops_garbage_and_keeps_working(fake, smollm2_dir):
    proc = spawn("llmos.drivers.tokenizer", fake, "tok", "--model-dir", str(smollm2_dir))
    try:
        peer, ready = fake.recv(protocol.Ready)
        assert ready.tokenizer.vocab_size > 1000 and ready.model is None
        for frames in GARBAGE:
            fake.send(peer, frames)
        fake.send(peer, protocol.encode(protocol.Encode(request_id="r1", prompt="Hello world", messages=None)))
        _, enc = fake.recv(protocol.Encoded, timeout=30)
        assert enc.request_id == "r1" and enc.error is None and len(enc.token_ids) >= 2
        assert proc.poll() is None
    finally:
        proc.kill()


def test_model_driver_drops_garbage_and_reports_bad_plans(fake, tiny_llama_dir, tmp_path):
    proc = spawn("llmos.drivers.model", fake, "model", "--model", f"tiny={tiny_llama_dir}",
                 "--models-dir", str(tmp_path / "models"))
    try:
        peer, ready = fake.recv(protocol.Ready)
        assert isinstance(ready.model, protocol.ModelInfo) and ready.model.model_type == "llama"
        assert ready.model.num_layers >= 1 and ready.model.vocab_size > 0 and ready.tokenizer is None
        for frames in GARBAGE:
            fake.send(peer, frames)
        fake.send(peer, protocol.encode(protocol.MapKVPool(
            path=str(tmp_path / "missing.kv"), device="cpu", dtype="float32", num_blocks=4, block_size=4,
            num_layers=1, num_kv_heads=1, head_dim=1)))
        _, mapped = fake.recv(protocol.PoolMapped, timeout=30)
        assert mapped.error
        # a well-formed message with inconsistent content: the step fails, the driver lives
        bad = protocol.StepPlan(step_id=9, seq_ids=protocol.i32([1]), num_new=protocol.i32([5]),
                                start_pos=protocol.i32([0]), tokens=protocol.i32([1, 2]),
                                block_tables=protocol.i32([[0]]), sample=protocol.i32([1]),
                                temperature=np.float32([0]), top_p=np.float32([1]), top_k=protocol.i32([-1]),
                                seed=np.int64([-1]), gen_index=protocol.i32([0]), top_logprobs=protocol.i32([-1]))
        fake.send(peer, protocol.encode(bad))
        _, failed = fake.recv(protocol.StepFailed, timeout=30)
        assert failed.step_id == 9
        assert proc.poll() is None
    finally:
        proc.kill()
