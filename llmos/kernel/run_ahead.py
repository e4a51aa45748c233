"""Run-ahead: the next decode step is planned and sent while the model driver computes this one.

Without it every step waits on the one before: the driver sends step N's result, the kernel
applies it, plans N+1 and sends it, and the driver sits idle through that round trip (two
bus hops, msgpack, the update and the plan: 1-2 ms a token at one stream, a sixth of it).
With it, right after step N's plan is sent the engine plans N+1 for the same sequences, one
decode token each, whose input is the token that N samples: the plan says `follows = N` and
carries protocol.FOLLOWED_TOKEN in those places, and the driver fills them from its own last result. The driver
starts N+1 the moment N is done; the kernel applies N, emits it and plans N+2 while N+1 runs.

It is only done where nothing the kernel decides at N's result could change N+1:
- nobody is waiting (no admission, no priority or fairness preemption is pending);
- N is all sampling steps of plain sequences: no grammar (its mask needs N's token), no
  logits controls (penalties count N's token), no choices to fork, no block copies or swaps;
- each sequence's one more slot comes from free blocks, with nothing shared to copy.
A sequence that N surely ends by length is left out. One that N ends otherwise (end of
sequence, a stop token or string, a cancel) computes a token in N+1 that is dropped: its
blocks are free by then, and a stale write into a freed block is never read, since every
position is written before it is attended to (an abort mid-step was already this case).

If N fails, N+1 fails with it (the driver has no tokens of N to fill in) and is not applied:
its sequences are planned again. LLMOS_RUN_AHEAD=0 turns it off (benchmarks/step_gap.py
measures both).
"""
from __future__ import annotations

import os

import numpy as np

from llmos import protocol
from llmos.kernel.blocks import blocks_needed
from llmos.kernel.requests import State
from llmos.kernel.scheduler import ScheduledSeq, Scheduler

ENABLED = os.environ.get("LLMOS_RUN_AHEAD", "1") != "0"


def plan_ahead(scheduler: Scheduler, batch: list[ScheduledSeq], plan: protocol.StepPlan) -> list[ScheduledSeq]:
    """The decode batch to run right after `plan` (step N, just sent), its slots allocated;
    [] where running ahead is not safe (module docstring)."""
    if scheduler.waiting or plan.copy.size or plan.swap_out.size or plan.swap_in.size or plan.grammars \
            or plan.controls:
        return []
    ahead = []   # (request, its tokens in N)
    for s in batch:
        req = s.req
        if req.state is not State.RUNNING:
            continue   # ended while N ran (with N+1 sent ahead of it: N is itself ahead)
        if not s.sample or req.forks or req.params.structured or req.params.logits_controls:
            return []
        if len(req.output.ids) + 1 >= req.max_tokens or req.num_tokens + 1 >= scheduler.stop_rule.max_model_len:
            continue   # N's token is its last
        ahead.append((req, s.num_new))
    kv, pool = scheduler.kv, scheduler.pool
    bs = pool.block_size
    if sum(max(0, blocks_needed(r.kv.num_computed + n + 1, bs) - len(r.kv.blocks)) for r, n in ahead) > pool.num_free:
        return []
    out = []
    for r, n in ahead:
        first = (r.kv.num_computed + n) // bs   # the block N+1's token lands in
        if first < len(r.kv.blocks) and pool.ref_count(r.kv.blocks[first]) > 1:
            continue   # shared: it would need a copy (cannot happen after a copy-free N; kept safe)
        if kv.allocate_slots(r, n + 1):   # N's tokens (their blocks are N's already) and N+1's one
            out.append(ScheduledSeq(r, 1, True))
    now = scheduler.clock()
    for s in out:
        scheduler.policy.charge(s.req, 1, now)
    return out


def build_ahead_plan(step_id: int, follows: protocol.StepPlan, ahead: list[ScheduledSeq]) -> protocol.StepPlan:
    """The StepPlan of a run-ahead batch: like step_plan.build_plan, with each sequence's
    position and generated count one step on, and its token left for the driver to fill."""
    rows = {int(q): i for i, q in enumerate(follows.seq_ids)}
    idx = np.asarray([rows[s.req.seq_id] for s in ahead], dtype=np.int64)
    width = max(len(s.req.kv.blocks) for s in ahead)
    tables = np.full((len(ahead), width), -1, dtype=np.int32)
    for i, s in enumerate(ahead):
        tables[i, : len(s.req.kv.blocks)] = s.req.kv.blocks
    start = follows.start_pos[idx] + follows.num_new[idx]
    return protocol.StepPlan(
        step_id=step_id, follows=follows.step_id, seq_ids=follows.seq_ids[idx], num_new=protocol.i32([1] * len(ahead)),
        start_pos=start.astype(np.int32), tokens=protocol.i32([protocol.FOLLOWED_TOKEN] * len(ahead)), block_tables=tables,
        sample=protocol.i32([1] * len(ahead)), temperature=follows.temperature[idx], top_p=follows.top_p[idx],
        top_k=follows.top_k[idx], seed=follows.seed[idx], gen_index=(follows.gen_index[idx] + 1).astype(np.int32),
        top_logprobs=follows.top_logprobs[idx])
