"""Continuous batching: every step picks a batch under a token budget.

    make room for the waiting head (priority, then fairness preemption) -> running
    sequences (a decode token or the next prompt chunk; memory preemption when one cannot
    grow) -> admit waiting ones in policy order while budget, slots and blocks last
    (one whose prompt's next blocks a running request is computing right now waits for
    them to be cached instead of computing them again: `_waits_for_prefix`)

The ordering, victims and tenant accounting are a swappable policy (policy.PriorityPolicy
by default, FCFSPolicy for comparison); preempted sequences are swapped out or dropped
for recompute through the memory manager. Time comes from `clock` so tests can fake
it. No torch here: this is the kernel's core.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from llmos.kernel.blocks import blocks_needed
from llmos.kernel.fcfs import FCFSPolicy
from llmos.kernel.kv_manager import KVCacheManager
from llmos.kernel.policy import expired
from llmos.kernel.requests import Request, State
from llmos.kernel.stopping import StopRule

MIN_SHARED_TOKENS = 64   # a shared run shorter than this is cheaper to compute again than to wait for


@dataclass
class ScheduledSeq:
    req: Request
    num_new: int
    sample: bool


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int = 128, max_batched_tokens: int = 1024,
                 policy=None, swap=None, clock=time.monotonic, stop_rule: StopRule | None = None):
        self.kv = kv
        self.stop_rule = stop_rule or StopRule()
        self.pool = kv.pool
        self.swap = swap                  # SwapSpace, or None: preemption always recomputes
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.policy = policy or FCFSPolicy()
        self.clock = clock
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.preemptions = 0

    def add(self, req: Request) -> None:
        req.to(State.WAITING)
        req.sched.queued_at = self.clock()
        self.policy.on_queued(req)
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        now = self.clock()
        self.waiting = self.policy.order(self.waiting, now)
        self._make_room_for_head(now)
        budget = self.max_batched_tokens
        batch: list[ScheduledSeq] = []
        scheduled: set[int] = set()
        head, reserve = self._head_reserve()
        for req in list(self.running):
            if budget == 0:
                break
            if req.state is not State.RUNNING:
                continue  # preempted as a victim earlier in this loop
            n = min(req.num_tokens - req.kv.num_computed, budget)
            if n > 1 and reserve and head.priority < req.priority:
                n = max(0, min(n, budget - reserve))   # a lower-priority prompt chunk leaves the head room
                if n == 0:
                    continue
            while not self._grow(req, n):
                victim = self.policy.pick_victim([r for r in self.running if r.seq_id not in scheduled], now)
                self._preempt(victim, "memory", now)
                if victim is req:
                    break
            if req.state is State.RUNNING:
                batch.append(ScheduledSeq(req, n, req.kv.num_computed + n == req.num_tokens))
                scheduled.add(req.seq_id)
                budget -= n
        self.waiting = self.policy.order(self.waiting, now)   # victims re-queued above take their place
        pending, later = self.kv.in_flight(self.running), set()
        while budget > 0 and len(self.running) < self.max_num_seqs:
            req = next((r for r in self.waiting if r.seq_id not in later), None)
            if req is None:
                break
            if req.kv.host_blocks:
                # Swap in only if the step's tokens fit too: a swap-in that could not grow would
                # be dropped below as if recomputing, losing the host copy it was read from.
                n = min(req.num_tokens - req.kv.num_computed, budget)
                grow = max(0, blocks_needed(req.kv.num_computed + n, self.pool.block_size) - len(req.kv.host_blocks))
                if not self.pool.can_allocate(len(req.kv.host_blocks) + grow) or not self.swap.swap_in(req, self.kv):
                    break
            elif not req.kv.blocks:
                self.kv.attach_prefix(req)
                if self._waits_for_prefix(req, pending):
                    later.add(req.seq_id)
                    continue
            n = min(req.num_tokens - req.kv.num_computed, budget)
            if not self._grow(req, n):
                self.kv.free(req)  # give the prefix hits back: they stay cached
                req.kv.num_computed = 0
                break  # head of line waits for memory: the policy's order is kept
            self.waiting.remove(req)
            req.to(State.RUNNING)
            req.sched.started_at = now
            if req.kv.cached_prompt_tokens is None:   # its first start: the prompt's prefix-cache hits
                req.kv.cached_prompt_tokens = req.kv.num_computed
            self.policy.on_started(req, now)
            self.running.append(req)
            self.kv.note_in_flight(req, pending)
            self.waiting = self.policy.order(self.waiting, now)   # shares changed: rank again
            batch.append(ScheduledSeq(req, n, req.kv.num_computed + n == req.num_tokens))
            budget -= n
        for s in batch:
            self.policy.charge(s.req, s.num_new, now)
        return batch

    def _waits_for_prefix(self, req: Request, pending: dict) -> bool:
        """Whether req should wait a step for blocks a running request is computing: when
        they are at least MIN_SHARED_TOKENS and half of what req would compute now, waiting
        for the cache beats computing them twice (32 chats behind one system prompt,
        arriving together, compute it once instead of 1.4-1.75 times over)."""
        shared = self.kv.shared_in_flight(req, pending) * self.pool.block_size
        if shared < max(MIN_SHARED_TOKENS, (req.num_tokens - req.kv.num_computed) // 2):
            return False
        self.kv.give_back(req)
        self.kv.waits_for_prefix += 1
        return True

    def _head_reserve(self) -> tuple[Request | None, int]:
        """Tokens of this step's budget kept for the waiting head's prompt, if it has a batch
        slot: without them a higher-priority request arriving while a long lower-priority
        prompt is prefilled would wait for every chunk of it (chunked prefill takes the whole
        budget each step). At most half the budget, so the long prompt still progresses."""
        if not self.waiting or len(self.running) >= self.max_num_seqs:
            return None, 0
        head = self.waiting[0]
        return head, min(head.num_tokens - head.kv.num_computed, self.max_batched_tokens // 2)

    def _make_room_for_head(self, now: float) -> None:
        """When the waiting head has no room (no free batch slot, or too few free blocks),
        preempt for it: lower-priority running work (cause "priority"), else running work
        of tenants over their weighted share (cause "fairness", policy.fairness_candidates).
        When everything fits, or the victims together would not make the room, nobody is
        disturbed."""
        if not self.waiting:
            return
        head = self.waiting[0]
        need = len(head.kv.host_blocks) + 1 if head.kv.host_blocks else \
            blocks_needed(min(head.num_tokens, self.max_batched_tokens), self.pool.block_size)
        free, slot_free = self.pool.num_free, len(self.running) < self.max_num_seqs
        if slot_free and free >= need:
            return
        for cause, candidates in (("priority", self.policy.preemption_candidates),
                                  ("fairness", self.policy.fairness_candidates)):
            victims = self._room_from(candidates(head, self.running, now), free, need)
            if victims:
                for v in victims:
                    self._preempt(v, cause, now)
                return

    def _room_from(self, candidates: list[Request], free: int, need: int) -> list[Request]:
        """The shortest prefix of `candidates` whose blocks (those only they hold) bring
        `free` up to `need`; any one victim also frees a batch slot. [] if all of them
        together would not."""
        victims = []
        for v in candidates:
            victims.append(v)
            free += sum(1 for b in v.kv.blocks if self.pool.ref_count(b) == 1)
            if free >= need:
                return victims
        return []

    def find_expired(self) -> list[tuple[Request, str]]:
        """(request, reason) for every queued or running request past a deadline; the
        engine ends them (before scheduling the step)."""
        now = self.clock()
        return [(r, why) for r in self.waiting + self.running if (why := expired(r, now))]

    def _grow(self, req: Request, n: int) -> bool:
        return self.kv.allocate_slots(req, n)

    # ------------------------------------------------------------ after the step ran
    def update_from_output(self, batch: list[ScheduledSeq], result) -> list[Request]:
        """Apply a step's result (a checked protocol.StepResult: one token per sampled
        sequence, in batch order): advance each sequence, append its token and logprobs,
        end those that stop. Returns the requests with something new for their client."""
        self.step_done()
        sampled = iter(range(len(result.tokens)))
        held = set(result.held)   # grammar still compiling: no token, the last position is planned again
        changed = []
        now = self.clock()
        for s in batch:
            i = next(sampled) if s.sample else None
            req = s.req
            if req.state is not State.RUNNING:
                continue  # ended while the step ran; its blocks are already free
            wait = i is not None and req.seq_id in held
            req.kv.num_computed += s.num_new - wait   # rewriting that position's KV gives the same values
            self.kv.commit(req)
            if i is None or wait:
                continue
            if req.forks:   # the prompt is in the pool: the other choices share it from here
                self.fork_choices(req)
            token = int(result.tokens[i])
            req.output.ids.append(token)
            if req.params.logprobs is not None:
                k = req.params.logprobs
                top = [[int(t), float(v)] for t, v in zip(result.top_ids[i][:k], result.top_lps[i][:k])]
                req.output.logprobs.append([float(result.logprobs[i]), top])
            req.output.first_token_at = req.output.first_token_at or now
            reason = self.stop_rule.reason(req, token)
            if reason:
                self.finish_requests([req], reason)
            changed.append(req)
        return changed

    def step_ops(self) -> dict[str, list]:
        """The block copies the step just scheduled needs before its forward pass:
        copy-on-write copies, swap-outs and swap-ins, as (src, dst) block pairs."""
        out, inn = self.swap.ops() if self.swap is not None else ([], [])
        return {"copy": self.kv.copy_ops(), "swap_out": out, "swap_in": inn}

    def step_done(self) -> None:
        """The step's copies and swaps happened: settle them."""
        if self.swap is not None:
            self.swap.step_done()
        self.kv.step_done()

    def step_lost(self) -> None:
        """The step did not run, or its result is not trusted: undo what it queued. The
        requests keep their tokens and are planned again."""
        if self.swap is not None:
            self.swap.step_lost()
        self.kv.step_lost()

    def finish_requests(self, reqs: list[Request], reason: str) -> list[Request]:
        """Stop generating for these requests now (their blocks are freed; the final text
        is still on its way): the one way a request's generation ends, whether by a stop
        condition, a stop string, a cancel, a deadline or an error. Returns those ended."""
        ended = []
        for req in reqs:
            if req.state in (State.WAITING, State.RUNNING):
                self.finish(req)
            elif req.state is not State.FORKING:   # (a choice not forked yet ends empty)
                continue
            req.output.finish_reason = reason
            req.to(State.FINISHING)
            ended.append(req)
        return ended

    def _preempt(self, req: Request, cause: str, now: float) -> None:
        """Swap the KV out to host memory, or drop it to recompute later (its full blocks stay
        in the prefix cache); keep the tokens; back to the waiting queue."""
        if self.swap is not None and self.swap.should_swap(req):
            self.swap.swap_out(req, self.kv)
        else:
            self.kv.free(req)
            req.kv.num_computed = 0
        req.sched.preemptions += 1
        self.preemptions += 1
        self.running.remove(req)
        req.to(State.WAITING)
        req.sched.queued_at = now
        self.policy.on_preempted(req, cause)
        self.waiting.insert(0, req)

    def fork_choices(self, parent: Request) -> None:
        """After parent's prompt is in the pool: its FORKING choices (n > 1) take the prompt's
        blocks copy-on-write and queue. Each recomputes the last prompt token itself (writing
        into its own copy of the last block), for logits and a sample of its own."""
        for child in parent.forks:
            if child.state is State.FORKING:   # not aborted meanwhile
                self.kv.fork(parent, child)
                child.kv.num_computed = parent.kv.num_computed - 1
                child.kv.cached_prompt_tokens = parent.kv.cached_prompt_tokens   # one prompt, one figure
                self.add(child)
        parent.forks = []

    def finish(self, req: Request) -> None:
        """Release a request's blocks and its place in either queue."""
        was_running = req in self.running
        if was_running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        else:
            was_running = None
        if was_running is not None:
            self.policy.on_finished(req, was_running)
        self.kv.free(req)
        if self.swap is not None:
            self.swap.drop(req)

    def owners(self) -> dict[str, list[int]]:
        owners = {r.id: r.kv.blocks for r in self.running + self.waiting if r.kv.blocks}
        if self.kv.copy_sources:   # a copy-on-write source stays referenced until its copy is done
            owners["(copies in flight)"] = self.kv.copy_sources
        return owners

    def check_integrity(self) -> None:
        self.pool.check_integrity(self.owners())
        self.policy.check_integrity(self.waiting, self.running)
