"""What a KV pool is, apart from where it lives: its geometry and the interface every
pool (shared-memory file, CUDA allocation) offers the kernel. Pure Python, no torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}   # the KV dtypes a pool may hold


@dataclass(frozen=True)
class KVGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int

    @property
    def block_bytes(self) -> int:
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]


class KVPool(Protocol):
    """A kernel-owned pool of `num_blocks` KV blocks that model drivers map."""
    geometry: KVGeometry
    num_blocks: int
    path: object          # the file drivers map, or "" when they map by IPC handle

    @property
    def nbytes(self) -> int: ...

    @property
    def device(self) -> str: ...

    def ipc_handle(self) -> list | None:
        """What a driver needs to map the pool besides `path` (None for a file)."""

    def release(self) -> None:
        """Free the memory; drivers must have unmapped it."""
