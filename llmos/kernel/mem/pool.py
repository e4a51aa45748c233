"""Physical KV memory, created and owned by the kernel (design.md, rule 2).

On CPU the pool is a file in /dev/shm that the kernel creates and sizes; model drivers
map it (torch.from_file, shared) so the KV outlives any driver. On a GPU it is an
allocation the kernel holds (cuda_pool.py). The host swap pool is always a file here. The kernel never maps
the tensor itself: it only decides who may write which block.

/dev/shm is shared by every local user, so a pool file is named
llmos-<uid>-<kernel pid>-<random>-<model>.kv: nobody can guess it to plant a file or a link
there first, and it is created with O_EXCL | O_NOFOLLOW (never an existing file, never
through a link), mode 0600. A later kernel removes what a killed one left, but only regular
files that it owns, with its uid in the name, whose kernel is dead; anything else is left alone.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import stat
from pathlib import Path

import psutil

from llmos.kernel.mem.geometry import KVGeometry, KVPool

log = logging.getLogger(__name__)
SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"^llmos-(\d+)-(\d+)-[0-9a-f]{16}-.*\.kv$")


class SharedKVPool:
    """One model's KV pool in POSIX shared memory."""

    def __init__(self, model: str, geometry: KVGeometry, num_blocks: int):
        self.geometry, self.num_blocks = geometry, num_blocks
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model)
        self.path = SHM_DIR / f"llmos-{os.getuid()}-{os.getpid()}-{secrets.token_hex(8)}-{safe}.kv"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
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
    uid = os.getuid()
    for path in SHM_DIR.glob(f"llmos-{uid}-*.kv"):
        m = _NAME.match(path.name)
        try:
            st = path.lstat()
            if not m or int(m.group(1)) != uid or st.st_uid != uid or not stat.S_ISREG(st.st_mode):
                continue   # not ours, or not a plain file: someone else's business
            if not psutil.pid_exists(int(m.group(2))):
                path.unlink()
                removed.append(path)
        except OSError as exc:   # one odd entry must not stop the daemon from starting
            log.warning("left %s alone: %s", path, exc)
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
