"""Per-request KV bookkeeping above the block pool: block tables, the prefix cache.

The scheduler calls only this layer; this layer calls only the BlockPool. A full
block is identified by a chained hash of (parent hash, its token ids) and confirmed
against the stored tokens, so a new request reuses every cached block of its longest
cached prefix and computes only the rest. Preempted (recomputed) requests benefit
too: their blocks stay cached until evicted.

Copy-on-write: `fork` gives a child every block of its parent (one more reference each).
A block with more than one owner is read-only: before a step writes into one,
`allocate_slots` gives the writer a fresh block and queues a copy (src -> dst) that the
model driver performs before the forward pass. The writer's reference on the source
moves to the queued copy and is dropped when the step has run (`step_done`), so the
source cannot be reused while its copy is pending. Copies run before the forward pass,
so a queued copy's reference does not make its source shared: the last owner writes in
place (n choices cost n - 1 copies). A lost step makes each writer recompute instead
(`step_lost`), since its copy may never have happened.

Prefixes in flight: requests that arrive together with the same system prompt would each
compute it, since none is cached until a step has written it. `in_flight` names the full
blocks that running requests are still computing, and `shared_in_flight` says how many of a
waiting request's next blocks are among them: the scheduler lets that request wait for the
cache instead (`give_back` undoes its lookup).
"""
from __future__ import annotations

from llmos.kernel.blocks import BlockPool, blocks_needed


class KVCacheManager:
    def __init__(self, pool: BlockPool, prefix_caching: bool = True, chunk_hash=None, root_hash: int = 0):
        """chunk_hash(parent, tokens) -> int: how full blocks are named (None: Python's hash,
        fastest); KV events pass llm-d's (kv_events.py), chained from root_hash."""
        self.pool = pool
        self.prefix_caching = prefix_caching
        self.chunk_hash, self.root_hash = chunk_hash, root_hash
        self.lookups = 0
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.forks = 0
        self.copies = 0
        self.waits_for_prefix = 0   # admissions put off because another request was computing the prefix
        self._copies: list[tuple[object, int, int]] = []   # this step: (writer, src, dst)

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def _hashes(self, req, upto_blocks: int) -> list[int]:
        """The chained hashes of req's first `upto_blocks` full blocks (memoised on req)."""
        hashes = req.kv.block_hashes
        bs = self.block_size
        while len(hashes) < upto_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else self.root_hash
            tokens = tuple(req.token_at(i * bs, (i + 1) * bs))
            hashes.append(hash((parent, tokens)) if self.chunk_hash is None else self.chunk_hash(parent, tokens))
        return hashes[:upto_blocks]

    def attach_prefix(self, req) -> int:
        """For a request with no blocks: take every cached block of its longest cached prefix.
        At least one token is always left to compute (its logits give the next token).
        Returns the number of tokens reused (req.kv.num_computed is set to it)."""
        assert not req.kv.blocks and req.kv.num_computed == 0
        if not self.prefix_caching:
            return 0
        bs = self.block_size
        full = (req.num_tokens - 1) // bs
        self.lookups += 1
        self.queried_tokens += req.num_tokens
        hits = []
        for i, h in enumerate(self._hashes(req, full)):
            b = self.pool.lookup(h, tuple(req.token_at(i * bs, (i + 1) * bs)))
            if b is None:
                break
            hits.append(b)
        self.pool.share(hits)
        req.kv.blocks = hits
        req.kv.cached_blocks = len(hits)
        req.kv.num_computed = len(hits) * bs
        self.hit_tokens += req.kv.num_computed
        return req.kv.num_computed

    def give_back(self, req) -> None:
        """Undo attach_prefix for a request that is not admitted after all: its blocks go back
        (still cached) and its lookup is not counted, so lookups stay one per admission."""
        self.lookups -= 1
        self.queried_tokens -= req.num_tokens
        self.hit_tokens -= req.kv.num_computed
        self.free(req)
        req.kv.num_computed = 0

    # ------------------------------------------------------------ prefixes being computed
    def in_flight(self, running) -> dict[int, object]:
        """Block hash -> highest priority (smallest) of the running requests still computing
        that full block of their prompt, not yet in the prefix cache."""
        pending: dict[int, object] = {}
        if self.prefix_caching:
            for req in running:
                self.note_in_flight(req, pending)
        return pending

    def note_in_flight(self, req, pending: dict) -> None:
        """Add req's full blocks that are not computed and cached yet (a prompt being prefilled)."""
        if not self.prefix_caching:
            return
        full = (req.num_tokens - 1) // self.block_size
        if req.kv.cached_blocks >= full:
            return
        for h in self._hashes(req, full)[req.kv.cached_blocks:]:
            if h not in pending or req.priority < pending[h]:
                pending[h] = req.priority

    def shared_in_flight(self, req, pending: dict) -> int:
        """How many of req's blocks right after its cache hits a running request of at least
        its priority is computing now (the tokens are confirmed when req attaches later)."""
        if not pending:
            return 0
        full = (req.num_tokens - 1) // self.block_size
        n = 0
        for h in self._hashes(req, full)[len(req.kv.blocks):]:
            producer = pending.get(h)
            if producer is None or req.priority < producer:
                break
            n += 1
        return n

    def allocate_slots(self, req, num_new: int) -> bool:
        """Make room for num_new more tokens of req, copying shared blocks they land in;
        False (nothing changed) if the pool is short."""
        first = req.kv.num_computed // self.block_size   # the block the first new token lands in
        shared = [i for i in range(first, len(req.kv.blocks)) if self._owners(req.kv.blocks[i]) > 1]
        need = max(0, blocks_needed(req.kv.num_computed + num_new, self.block_size) - len(req.kv.blocks))
        if need + len(shared) == 0:
            return True
        got = self.pool.allocate(need + len(shared))
        if got is None:
            return False
        for i in shared:
            src, dst = req.kv.blocks[i], got.pop()
            req.kv.blocks[i] = dst
            self._copies.append((req, src, dst))
            self.copies += 1
        if shared:   # the copies are not in the prefix cache: commit registers them again
            req.kv.cached_blocks = min(req.kv.cached_blocks, shared[0])
        req.kv.blocks.extend(got)
        return True

    def fork(self, parent, child) -> None:
        """Give child (no blocks yet) parent's KV: shared blocks, copied when first written."""
        assert not child.kv.blocks
        self.pool.share(parent.kv.blocks)
        child.kv.blocks = list(parent.kv.blocks)
        child.kv.block_hashes = list(parent.kv.block_hashes)
        child.kv.cached_blocks = parent.kv.cached_blocks
        self.forks += 1

    # ------------------------------------------------------------ copies of the step in flight
    def _owners(self, block: int) -> int:
        return self.pool.ref_count(block) - sum(1 for _, src, _ in self._copies if src == block)

    def copy_ops(self) -> list[tuple[int, int]]:
        """(src, dst) block pairs the model driver copies before this step's forward pass."""
        return [(src, dst) for _, src, dst in self._copies]

    @property
    def copy_sources(self) -> list[int]:
        return [src for _, src, _ in self._copies]

    def step_done(self) -> None:
        self.pool.free([src for _, src, _ in self._copies])
        self._copies = []

    def step_lost(self) -> None:
        """The copies may not have happened: every writer that still holds its copy's
        destination recomputes (like a preemption by recompute, keeping its tokens)."""
        for req, src, dst in self._copies:
            if dst in req.kv.blocks:
                self.free(req)
                req.kv.num_computed = 0
        self.step_done()

    def commit(self, req) -> None:
        """After a step wrote req's KV: register its newly full blocks in the prefix cache."""
        if not self.prefix_caching:
            return
        full = min(req.kv.num_computed // self.block_size, len(req.kv.blocks))
        bs = self.block_size
        first_new = req.kv.cached_blocks
        hashes = self._hashes(req, full)
        for i, h in enumerate(hashes[first_new:], start=first_new):
            self.pool.cache(req.kv.blocks[i], h, tuple(req.token_at(i * bs, (i + 1) * bs)),
                            hashes[i - 1] if i else None)
        req.kv.cached_blocks = max(first_new, full)

    def free(self, req) -> None:
        self.pool.free(req.kv.blocks)
        req.kv.blocks = []
        req.kv.cached_blocks = 0

    def stats(self) -> dict:
        return {"prefix_caching": self.prefix_caching, "lookups": self.lookups,
                "queried_tokens": self.queried_tokens, "hit_tokens": self.hit_tokens,
                "hit_rate": round(self.hit_tokens / self.queried_tokens, 4) if self.queried_tokens else 0.0,
                "cached_blocks": self.pool.num_cached, "evictions": self.pool.evictions, "forks": self.forks, "cow_copies": self.copies,
                "waits_for_prefix": self.waits_for_prefix}
