"""Continuous batching: every step picks a batch under a token budget.

Running sequences go first (their next token, or the next chunk of a long prompt),
then waiting ones are admitted while budget, batch slots and blocks last. When a
running sequence cannot grow, the policy's victim is preempted by recompute (its
blocks are freed and it re-queues at the front). The ordering is a swappable
policy; FCFS is the default. No torch here: this is the kernel's core.
"""
from __future__ import annotations

from dataclasses import dataclass

from llmos.kernel.kv_manager import KVCacheManager
from llmos.kernel.requests import Request, State


class FCFSPolicy:
    """First come, first served: admit in arrival order, preempt the newest."""

    name = "fcfs"

    def admit_key(self, req: Request):
        return req.arrival

    def pick_victim(self, running: list[Request]) -> Request:
        return max(running, key=lambda r: r.arrival)


@dataclass
class ScheduledSeq:
    req: Request
    num_new: int
    sample: bool


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int = 128, max_batched_tokens: int = 1024,
                 policy=None, swap=None):
        self.kv = kv
        self.swap = swap                  # SwapSpace, or None: preemption always recomputes
        self.pool = kv.pool
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.policy = policy or FCFSPolicy()
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.preemptions = 0

    def add(self, req: Request) -> None:
        req.to(State.WAITING)
        self.waiting.append(req)
        self.waiting.sort(key=self.policy.admit_key)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_batched_tokens
        batch: list[ScheduledSeq] = []
        scheduled: set[int] = set()
        for req in list(self.running):
            if budget == 0:
                break
            if req.state is not State.RUNNING:
                continue  # preempted as a victim earlier in this loop
            n = min(req.num_tokens - req.num_computed, budget)
            while not self._grow(req, n):
                victims = [r for r in self.running if r.seq_id not in scheduled]
                victim = self.policy.pick_victim(victims)
                self._preempt(victim)
                if victim is req:
                    break
            if req.state is State.RUNNING:
                batch.append(ScheduledSeq(req, n, req.num_computed + n == req.num_tokens))
                scheduled.add(req.seq_id)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.host_blocks:
                if not self.swap.swap_in(req, self.kv):
                    break
            elif not req.blocks:
                self.kv.attach_prefix(req)
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._grow(req, n):
                self.kv.free(req)  # give the prefix hits back: they stay cached
                req.num_computed = 0
                break  # head of line waits for memory: the policy's order is kept
            self.waiting.pop(0)
            req.to(State.RUNNING)
            self.running.append(req)
            batch.append(ScheduledSeq(req, n, req.num_computed + n == req.num_tokens))
            budget -= n
        return batch

    def _grow(self, req: Request, n: int) -> bool:
        return self.kv.allocate_slots(req, n)

    def _preempt(self, req: Request) -> None:
        """Swap the KV out to host memory, or drop it to recompute later (its full blocks stay
        in the prefix cache); keep the tokens; queue at the front."""
        if self.swap is not None and self.swap.should_swap(req):
            self.swap.swap_out(req, self.kv)
        else:
            self.kv.free(req)
            req.num_computed = 0
        req.preemptions += 1
        self.preemptions += 1
        self.running.remove(req)
        req.to(State.WAITING)
        self.waiting.insert(0, req)

    def finish(self, req: Request) -> None:
        """Release a request's blocks and its place in either queue."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        if self.swap is not None:
            self.swap.drop(req)

    def owners(self) -> dict[str, list[int]]:
        return {r.id: r.blocks for r in self.running + self.waiting if r.blocks}

    def check_integrity(self) -> None:
        self.pool.check_integrity(self.owners())
