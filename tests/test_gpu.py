"""The GPU path: the kernel-held CUDA KV pool shared with model drivers by IPC handle, and
generation on the GPU against transformers on the GPU. Skipped without a CUDA device."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from llmos.kernel.mem.geometry import KVGeometry
from llmos.kernel.mem.pool import make_pool

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

DRIVER = """
import sys, torch
from llmos.drivers.model.paged_attention import open_cuda_ipc
handle, shape, block, value = eval(sys.stdin.read())
kv = open_cuda_ipc(handle, shape, torch.float32)
if value is None:
    print(float(kv[:, :, block].mean()))
else:
    kv[:, :, block] = value
    torch.cuda.synchronize()
    print("written")
"""


def driver(pool, block: int, value: float | None) -> str:
    """A separate process (as a model driver is) opening the pool by its IPC handle."""
    shape = tuple(pool.tensor.shape)
    out = subprocess.run([sys.executable, "-c", DRIVER], input=repr((pool.ipc_handle(), shape, block, value)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_kernel_held_cuda_pool_is_shared_and_outlives_each_driver():
    pool = make_pool("tiny", KVGeometry(2, 2, 8, "float32", 4), 6, "cuda:0")
    assert pool.device == "cuda:0" and pool.tensor.is_cuda and pool.nbytes == 6 * pool.geometry.block_bytes
    assert driver(pool, 3, 7.5) == "written"           # that driver process has exited now
    assert float(pool.tensor[:, :, 3].mean()) == 7.5 and float(pool.tensor[:, :, 2].abs().sum()) == 0
    assert float(driver(pool, 3, None)) == 7.5          # a new incarnation finds the KV there
    pool.release()


@pytest.mark.slow
def test_smollm2_on_cuda_matches_transformers_on_cuda(tmp_path, smollm2_dir):
    from test_correctness import run_case
    run_case(tmp_path, smollm2_dir, "smollm2", device="cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_replicas_go_to_two_gpus(tmp_path, tiny_llama_dir):
    from daemon_harness import Daemon
    d = Daemon(tmp_path, [f"tl={tiny_llama_dir}"], "--device", "cuda:0", "--replicas", "2",
               "--replica-devices", "all").wait_ready()
    try:
        assert {d.memory(e)["device"] for e in ("tl", "tl~1")} == {"cuda:0", "cuda:1"}
        with d.http() as c:
            r = c.post("/v1/completions", json={"model": "tl", "prompt": "Hi", "max_tokens": 4})
        assert r.status_code == 200
    finally:
        d.stop()
