"""The KV block pool: the one owner of block ids (design.md, rule 1 and 2).

Blocks are fixed-size pages of the KV pool. This module hands out ids and counts
references; it never touches the memory itself (the model driver writes it).
Check, then do: `allocate` returns None when the pool cannot satisfy the request,
which is the one out-of-memory signal the scheduler handles.
"""
from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("a pool needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks with one reference each, or None if fewer than n are free."""
        if n > len(self._free):
            return None
        ids = [self._free.popleft() for _ in range(n)]
        for b in ids:
            self._refs[b] = 1
        return ids

    def free(self, ids: list[int]) -> None:
        """Drop one reference from each block; blocks with none left become free."""
        for b in ids:
            if self._refs[b] <= 0:
                raise RuntimeError(f"double free of block {b}")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def check_integrity(self, owners: dict[object, list[int]] | None = None) -> None:
        """Raise AssertionError if the pool's books do not balance. With `owners`
        (owner -> its block table) also check that reference counts equal owners."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        for b in range(self.num_blocks):
            if (b in free) != (self._refs[b] == 0):
                raise AssertionError(f"block {b}: refs={self._refs[b]} but free={b in free}")
        if owners is not None:
            counted = [0] * self.num_blocks
            for table in owners.values():
                for b in table:
                    counted[b] += 1
            if counted != self._refs:
                bad = next(b for b in range(self.num_blocks) if counted[b] != self._refs[b])
                raise AssertionError(f"block {bad}: {counted[bad]} owners but {self._refs[bad]} refs")


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)
