"""The KV block pool: the one owner of block ids (design.md, rules 1 and 2).

Blocks are fixed-size pages of the KV pool. This module hands out ids, counts
references and remembers which full blocks hold which tokens (the prefix cache); it
never touches the memory itself (the model driver writes it).

Free blocks wait in eviction order (least recently freed first). A free block that
carries a hash is "cached-free": still reusable by a request with the same prefix
until `allocate` evicts it. Check, then do: `allocate` returns None when the pool
cannot satisfy the request, which is the one out-of-memory signal the scheduler handles.
"""
from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("a pool needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._tokens: list[tuple | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}       # block hash -> block id
        self.evictions = 0
        self.events = None   # kv_events.PoolEvents: told what enters and leaves the prefix cache

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out (cached-free ones included)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_free(self) -> int:
        return sum(1 for b in self._free if self._hash[b] is not None)

    @property
    def num_cached(self) -> int:
        """Distinct full blocks a prefix lookup can find (in use or cached-free)."""
        return len(self._cached)

    @property
    def num_shared(self) -> int:
        """Blocks with more than one reference (prefix-cache hits, forked choices)."""
        return sum(1 for r in self._refs if r > 1)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """n blocks with one reference each, evicting the least recently freed cached
        blocks first; None (and no change) if fewer than n are free."""
        if n > len(self._free):
            return None
        ids = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self._evict(b)
            self._refs[b] = 1
            ids.append(b)
        return ids

    def _evict(self, b: int) -> None:
        h = self._hash[b]
        if h is not None:
            if self._cached.get(h) == b:
                del self._cached[h]
                if self.events is not None:
                    self.events.removed(h)
            self._hash[b] = self._tokens[b] = None
            self.evictions += 1

    def free(self, ids: list[int]) -> None:
        """Drop one reference from each block. Blocks with none left join the free queue
        in reverse order, so a sequence's tail is evicted before its (more shared) head."""
        for b in reversed(ids):
            if self._refs[b] <= 0:
                raise RuntimeError(f"double free of block {b}")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free[b] = None

    def share(self, ids: list[int]) -> None:
        """Take one more reference on blocks (a prefix-cache hit or a fork); a cached-free
        block leaves the free queue."""
        for b in ids:
            if self._refs[b] == 0:
                del self._free[b]
            self._refs[b] += 1

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    # ------------------------------------------------------------ prefix cache
    def cache(self, block: int, block_hash: int, tokens: tuple, parent_hash: int | None = None) -> None:
        """Record that a full, written block holds `tokens` after the prefix `block_hash` chains
        (`parent_hash`: the previous block's; None for a first block)."""
        if self._hash[block] is not None:
            return
        self._hash[block], self._tokens[block] = block_hash, tokens
        if self._cached.setdefault(block_hash, block) == block and self.events is not None:
            self.events.stored(block_hash, parent_hash, tokens)   # (a duplicate block is not news)

    def lookup(self, block_hash: int, tokens: tuple) -> int | None:
        """The cached block for this hash, confirmed against its stored tokens."""
        b = self._cached.get(block_hash)
        return b if b is not None and self._tokens[b] == tokens else None

    def check_integrity(self, owners: dict[object, list[int]] | None = None) -> None:
        """Raise AssertionError if the pool's books do not balance. With `owners`
        (owner -> its block table) also check that reference counts equal owners."""
        for b in range(self.num_blocks):
            if (b in self._free) != (self._refs[b] == 0):
                raise AssertionError(f"block {b}: refs={self._refs[b]} but free={b in self._free}")
        for h, b in self._cached.items():
            if self._hash[b] != h:
                raise AssertionError(f"cache maps hash {h} to block {b} that carries {self._hash[b]}")
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
