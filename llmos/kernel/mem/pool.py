"""Physical KV memory, created and owned by the kernel (design.md, rule 2).

On CPU the pool is a file in /dev/shm that the kernel creates and sizes; model drivers
map it (torch.from_file, shared) so the KV outlives any driver. On a GPU it is an
allocation the kernel holds (cuda_pool.py). The host swap pool is always a file here. The kernel never maps
the tensor itself: it only decides who may write which block. Files are named
llmos-<kernel pid>-<model>.kv so a later kernel can remove what a killed one left.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import psutil

from llmos.kernel.mem.geometry import KVGeometry, KVPool

log = logging.getLogger(__name__)
SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"^llmos-(\d+)-.*\.kv$")


class SharedKVPool:
    """One model's KV pool in POSIX shared memory."""

    def __init__(self, model: str, geometry: KVGeometry, num_blocks: int):
        self.geometry, self.num_blocks = geometry, num_blocks
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model)
        self.path = SHM_DIR / f"llmos-{os.getpid()}-{safe}.kv"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, self.nbytes)  # sparse: pages are committed as blocks are written
        finally:
            os.close(fd)
        log.info("KV pool %s: %d blocks x %d bytes", self.path, num_blocks, geometry.block_bytes)

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.geometry.block_bytes

    @property
    def device(self) -> str:
        return "cpu"

    def ipc_handle(self) -> None:
        return None   # drivers map the file at self.path

    def release(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def make_pool(model: str, geometry: KVGeometry, num_blocks: int, device: str) -> KVPool:
    """The pool for `device`: a /dev/shm file on the CPU, a kernel-held allocation on a GPU."""
    if device == "cpu":
        return SharedKVPool(model, geometry, num_blocks)
    from llmos.kernel.mem.cuda_pool import CudaKVPool   # imports torch: GPU daemons only
    return CudaKVPool(model, geometry, num_blocks, device)


def remove_stale_pools() -> list[Path]:
    """Delete pool files whose kernel is dead (it was killed before it could clean up)."""
    removed = []
    if not SHM_DIR.is_dir():
        return removed
    for path in SHM_DIR.glob("llmos-*.kv"):
        m = _NAME.match(path.name)
        if m and not psutil.pid_exists(int(m.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d stale KV pool file(s)", len(removed))
    return removed


def parse_memory(spec: str | float | int, available: int) -> int:
    """'2GiB', '512MiB', '1000000' (bytes) or a fraction like '0.25' of `available`."""
    if isinstance(spec, (int, float)):
        text = str(spec)
    else:
        text = spec.strip()
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lower = text.lower()
    for suffix, mult in units.items():
        if lower.endswith(suffix):
            return int(float(lower[: -len(suffix)]) * mult)
    value = float(lower)
    if 0 < value < 1:
        return int(value * available)
    if value >= 1 and value == int(value):
        return int(value)
    raise ValueError(f"cannot read memory size {spec!r}: use bytes, '4GiB' or a fraction like 0.5")
