"""Drive the real Scheduler step by step the way the engine does, with a fake model and a
fake clock (no processes, no torch). One copy, for every scheduler test:

    schedule -> build_plan (with step_ops) -> the fake model answers the plan with a real
    protocol.StepResult -> check_result -> Scheduler.update_from_output   (or step_lost)

The fake model's token for a sampled row depends on the sequence and the position it is
sampled for (token_at), never a constant: a token lost, repeated or given to the wrong
request shows as an output that differs from expected_output(req). Generation ends only
by the scheduler's own StopRule (max_tokens, the context) or by a test calling
finish_requests: the kit applies no rule of its own.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from llmos import protocol
from llmos.kernel.blocks import BlockPool
from llmos.kernel.kv_manager import KVCacheManager
from llmos.kernel.policy import PriorityPolicy, parse_priority
from llmos.kernel.requests import Request, State
from llmos.kernel.scheduler import ScheduledSeq, Scheduler
from llmos.kernel.step_check import check_result
from llmos.kernel.step_plan import build_plan
from llmos.kernel.tenants import TenantBook
from llmos.sampling_params import SamplingParams

VOCAB = 32000   # the fake model's vocabulary: every token it samples is in [1, VOCAB)


def token_at(seq_id: int, pos: int) -> int:
    """The token the fake model samples for position `pos` of sequence `seq_id`."""
    return 1 + (pos + 7919 * seq_id) % (VOCAB - 1)


def expected_output(req: Request) -> list[int]:
    """The output req must hold now: the fake model's token for each of its positions."""
    start = len(req.prompt_ids)
    return [token_at(req.seq_id, start + k) for k in range(len(req.output.ids))]


class FakeClock:
    """Scheduler(clock=...) time that moves only when told: advance(dt), or step_s per
    run_step (a step of the fake model takes step_s seconds)."""

    def __init__(self, t: float = 1000.0, step_s: float = 0.1):
        self.t, self.step_s = t, step_s

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


_ids = itertools.count(1)


def make_request(prompt: int | list[int] = 4, *, i: int | None = None, max_tokens: int = 50,
                 tenant: str = "t", priority: str | None = None, arrival: float | None = None,
                 state: State = State.TOKENIZING, **params) -> Request:
    """A request as admission leaves it: id "r<i>", seq_id i (the next of a counter unless
    given), arrival i unless given (so arrival order is id order), greedy unless `params`
    say otherwise. `prompt`: its token ids, or a length (then tokens of its own, so nothing
    is shared through the prefix cache unless a test passes the same token lists)."""
    i = next(_ids) if i is None else i
    r = Request(id=f"r{i}", seq_id=i, model="m", tenant=tenant,
                params=SamplingParams(**{"temperature": 0.0, **params}), state=state)
    r.prompt_ids = [1 + (131 * i + t) % 997 for t in range(prompt)] if isinstance(prompt, int) else list(prompt)
    r.max_tokens = max_tokens
    if priority is not None:
        r.priority = parse_priority(priority)
    r.sched.arrival = float(i) if arrival is None else arrival
    return r


def priority_scheduler(blocks: int = 64, seqs: int = 8, tenants: dict | None = None,
                       clock: FakeClock | None = None, swap=None, budget: int = 256,
                       **policy_kw) -> tuple[Scheduler, FakeClock]:
    """A Scheduler with the priority policy (tenants: name -> TenantConfig) on a fake clock,
    blocks of 4 tokens, no prefix caching."""
    clock = clock or FakeClock()
    policy = PriorityPolicy(TenantBook(tenants or {}), **policy_kw)
    return Scheduler(KVCacheManager(BlockPool(blocks, 4), prefix_caching=False), max_num_seqs=seqs,
                     max_batched_tokens=budget, policy=policy, swap=swap, clock=clock), clock


def answer(plan: protocol.StepPlan) -> protocol.StepResult:
    """The fake model driver: one token per sampled row, for the position it is sampled
    for (start_pos + num_new), with logprob arrays shaped as the driver sends them."""
    rows = np.flatnonzero(plan.sample == 1)
    pos = plan.start_pos[rows] + plan.num_new[rows]
    tokens = [token_at(int(s), int(p)) for s, p in zip(plan.seq_ids[rows], pos)]
    asked = plan.top_logprobs[rows]
    k = max(int(asked.max()), 0) if len(rows) else 0
    top_ids = (np.asarray(tokens, dtype=np.int32).reshape(-1, 1) + np.arange(k, dtype=np.int32)) % VOCAB
    top_lps = np.tile(-np.arange(1, k + 1, dtype=np.float32), (len(rows), 1))
    logprobs = np.where(asked >= 0, -1.0, np.nan).astype(np.float32)
    return protocol.StepResult(step_id=plan.step_id, seq_ids=plan.seq_ids[rows].astype(np.int32),
                               tokens=protocol.i32(tokens), logprobs=logprobs, top_ids=top_ids,
                               top_lps=top_lps, forward_ms=0.0)


@dataclass
class Step:
    batch: list[ScheduledSeq]
    changed: list[Request]           # what update_from_output returned: requests with a new token
    plan: protocol.StepPlan | None   # None for an empty batch


_step_ids = itertools.count(1)


def apply(sched: Scheduler, batch: list[ScheduledSeq], lost: bool = False) -> Step:
    """Run a batch the scheduler just planned: the plan goes to the fake model (through
    the wire format) and its checked result to update_from_output; or the step is lost
    (the driver died with it) and sched.step_lost() undoes what it queued."""
    if not batch:
        return Step(batch, [], None)
    plan = protocol.decode(protocol.encode(build_plan(next(_step_ids), batch, sched.step_ops())))
    if lost:
        sched.step_lost()
        return Step(batch, [], plan)
    result = protocol.decode(protocol.encode(answer(plan)))
    check_result(plan, result, VOCAB)
    changed = sched.update_from_output(batch, result)
    for req in changed:   # the newest token is the one for the position it was sampled at
        assert req.output.ids[-1] == token_at(req.seq_id, req.num_tokens - 1), req.id
    return Step(batch, changed, plan)


def run_step(sched: Scheduler, lost: bool = False, dt: float | None = None) -> Step:
    """schedule + apply, then the fake clock moves by the step's time (dt, or its step_s)
    and the scheduler's books are checked."""
    step = apply(sched, sched.schedule(), lost)
    if isinstance(sched.clock, FakeClock):
        sched.clock.advance(sched.clock.step_s if dt is None else dt)
    sched.check_integrity()
    return step


def drain(sched: Scheduler, max_steps: int = 10_000) -> int:
    """Step until the scheduler has no work; the number of steps it took."""
    for n in range(max_steps):
        if not sched.has_work():
            return n
        run_step(sched)
    raise AssertionError(f"still working after {max_steps} steps")
