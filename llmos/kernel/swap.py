"""The host swap tier: a second, kernel-owned block pool in host memory.

When the scheduler must take memory from a running sequence it may copy the
sequence's blocks out to the host pool (and later back in) instead of recomputing
them. Which one is cheaper is a cost estimate (bytes over copy bandwidth, against
tokens over measured prefill speed), or forced by configuration.

The copies are done by the model driver at the start of the next step (swap-outs
before swap-ins, both before the forward pass). Host blocks a swap-in reads are freed
only after that step succeeded. If the step is lost with its driver, swap-ins are
re-issued (the host copy is still intact) and swap-out victims fall back to
recompute (their device blocks may already be overwritten).
"""
from __future__ import annotations

import logging

from llmos.kernel.blocks import BlockPool

log = logging.getLogger(__name__)


class SwapSpace:
    def __init__(self, host: BlockPool, block_bytes: int, mode: str = "auto",
                 copy_bytes_per_s: float = 4e9, recompute_tokens_per_s: float = 2000.0):
        if mode not in ("auto", "swap", "recompute"):
            raise ValueError(f"preemption mode {mode!r}: use auto, swap or recompute")
        self.host, self.block_bytes, self.mode = host, block_bytes, mode
        self.copy_bytes_per_s = copy_bytes_per_s
        self.recompute_tokens_per_s = recompute_tokens_per_s   # updated from measured steps
        self._out: list[tuple] = []        # this step: (req, [(device, host), ...], host ids)
        self._in: list[tuple] = []         # this step: (req, [(host, device), ...], host ids)
        self.swap_outs = self.swap_ins = self.blocks_out = self.blocks_in = 0
        self.fallbacks = 0

    def should_swap(self, req) -> bool:
        if self.mode == "recompute" or not req.kv.blocks or not self.host.can_allocate(len(req.kv.blocks)):
            return False
        if self.mode == "swap":
            return True
        swap_s = 2 * len(req.kv.blocks) * self.block_bytes / self.copy_bytes_per_s
        recompute_s = req.kv.num_computed / max(1.0, self.recompute_tokens_per_s)
        return swap_s < recompute_s

    def swap_out(self, req, kv) -> None:
        """Copy req's KV to host blocks; its device blocks are freed for others now."""
        host_ids = self.host.allocate(len(req.kv.blocks))
        self._out.append((req, list(zip(req.kv.blocks, host_ids)), host_ids))
        kv.free(req)
        req.kv.host_blocks = host_ids
        req.kv.swapped = True
        self.swap_outs += 1
        self.blocks_out += len(host_ids)

    def swap_in(self, req, kv) -> bool:
        """Give a swapped request device blocks again; False (no change) if the pool is short."""
        dev = kv.pool.allocate(len(req.kv.host_blocks))
        if dev is None:
            return False
        self._in.append((req, list(zip(req.kv.host_blocks, dev)), req.kv.host_blocks))
        req.kv.blocks, req.kv.host_blocks, req.kv.swapped = dev, [], False
        req.kv.cached_blocks = 0  # new block ids: the prefix cache learns them again on commit
        self.swap_ins += 1
        self.blocks_in += len(dev)
        return True

    def ops(self) -> tuple[list, list]:
        """(swap_out pairs, swap_in pairs) for the step being planned."""
        return ([p for _, pairs, _ in self._out for p in pairs], [p for _, pairs, _ in self._in for p in pairs])

    def step_done(self) -> None:
        for _, _, host_ids in self._in:
            self.host.free(host_ids)
        self._out, self._in = [], []

    def step_lost(self) -> None:
        for req, _, host_ids in self._out:
            if req.kv.host_blocks is host_ids:   # still swapped out: its copy may be incomplete
                self.host.free(host_ids)
                req.kv.host_blocks, req.kv.swapped, req.kv.num_computed = [], False, 0
                self.fallbacks += 1
        self._out = []                        # swap-ins stay queued: re-sent with the next plan

    def drop(self, req) -> None:
        """A swapped request ended (finished, aborted): release its host blocks."""
        if req.kv.host_blocks:
            if not any(req is r for r, _, _ in self._out):
                self.host.free(req.kv.host_blocks)
            else:                             # the copy is in flight: free with the step
                self._in.append((req, [], req.kv.host_blocks))
            req.kv.host_blocks, req.kv.swapped = [], False

    def stats(self) -> dict:
        return {"mode": self.mode, "host_blocks_total": self.host.num_blocks, "host_blocks_used": self.host.num_used,
                "swap_outs": self.swap_outs, "swap_ins": self.swap_ins, "blocks_out": self.blocks_out,
                "blocks_in": self.blocks_in, "bytes_out": self.blocks_out * self.block_bytes,
                "bytes_in": self.blocks_in * self.block_bytes, "fallbacks_to_recompute": self.fallbacks}
