"""A model's KV pool in GPU memory, allocated by the kernel (design.md, rule 2).

The allocation lives in the kernel process, so a model driver crash loses no KV data: the
restarted driver maps the same memory. Drivers map it through a CUDA IPC handle (what
torch.multiprocessing sends for a CUDA tensor) carried in MapKVPool.cuda_ipc. This is the
only kernel module that imports torch, lazily, and only when a GPU pool is made: the
scheduling code stays torch-free and a CPU-only daemon never loads torch in the kernel.
"""
from __future__ import annotations

import logging

from llmos.kernel.mem.geometry import KVGeometry

log = logging.getLogger(__name__)


class CudaKVPool:
    def __init__(self, model: str, geometry: KVGeometry, num_blocks: int, device: str):
        import torch   # lazily: see the module docstring

        g = geometry
        self.geometry, self.num_blocks, self._device = geometry, num_blocks, str(torch.device(device))
        shape = (g.num_layers, 2, num_blocks, g.block_size, g.num_kv_heads, g.head_dim)
        self.tensor = torch.zeros(shape, dtype=getattr(torch, g.dtype), device=device)
        self.path = ""   # no file: drivers map it by IPC handle
        log.info("KV pool for %s on %s: %d blocks x %d bytes", model, self._device, num_blocks, g.block_bytes)

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.geometry.block_bytes

    @property
    def device(self) -> str:
        return self._device

    def ipc_handle(self) -> list:
        """A fresh handle for one driver incarnation: [device index, memory handle, storage size,
        storage offset, ref-counter handle, ref-counter offset, event handle, event sync] as
        torch.UntypedStorage._share_cuda_ gives them (plain ints, bytes and a bool)."""
        return list(self.tensor.untyped_storage()._share_cuda_())

    def release(self) -> None:
        import torch

        self.tensor = None
        torch.cuda.empty_cache()

