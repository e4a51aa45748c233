"""A scheduled batch -> the StepPlan message the model driver executes. Pure packing: the
scheduler decided everything already (who, how many tokens, which blocks, which copies)."""
from __future__ import annotations

import numpy as np

from llmos import protocol
from llmos.kernel.requests import Request
from llmos.kernel.scheduler import ScheduledSeq


def build_plan(step_id: int, batch: list[ScheduledSeq], ops: dict[str, list]) -> protocol.StepPlan:
    """`ops`: Scheduler.step_ops() of this step. Every value was validated at admission
    (admission.py), so each fits the int32/int64 array it goes into."""
    width = max(len(s.req.kv.blocks) for s in batch)
    tables = np.full((len(batch), width), -1, dtype=np.int32)
    tokens = []
    for i, s in enumerate(batch):
        tables[i, : len(s.req.kv.blocks)] = s.req.kv.blocks
        tokens.extend(s.req.token_at(s.req.kv.num_computed, s.req.kv.num_computed + s.num_new))
    p = [s.req.params for s in batch]
    return protocol.StepPlan(
        step_id=step_id,
        seq_ids=protocol.i32([s.req.seq_id for s in batch]),
        num_new=protocol.i32([s.num_new for s in batch]),
        start_pos=protocol.i32([s.req.kv.num_computed for s in batch]),
        tokens=protocol.i32(tokens),
        block_tables=tables,
        sample=protocol.i32([s.sample for s in batch]),
        temperature=np.asarray([x.temperature for x in p], dtype=np.float32),
        top_p=np.asarray([x.top_p for x in p], dtype=np.float32),
        top_k=protocol.i32([x.top_k for x in p]),
        seed=np.asarray([-1 if x.seed is None else x.seed & (2**62 - 1) for x in p], dtype=np.int64),
        gen_index=protocol.i32([len(s.req.output.ids) for s in batch]),
        top_logprobs=protocol.i32([-1 if x.logprobs is None else x.logprobs for x in p]),
        controls=[_controls(i, s.req) for i, s in enumerate(batch) if s.sample and s.req.params.logits_controls],
        grammars=[_grammar(i, s.req) for i, s in enumerate(batch) if s.sample and s.req.params.structured],
        **{name: _pairs(pairs) for name, pairs in ops.items()},
    )


def _controls(row: int, req: Request) -> protocol.LogitsControls:
    """A sequence's logits controls, with the token history they need and no more: the
    driver keeps no counts, so the plan is all it knows (a restart changes nothing). The
    output is copied (it grows after the step); the prompt never changes."""
    x = req.params
    penalized = x.presence_penalty != 0 or x.frequency_penalty != 0 or x.repetition_penalty != 1
    bias_ids, bias_values = x.bias_pairs
    return protocol.LogitsControls(
        row=row, min_p=x.min_p, presence_penalty=x.presence_penalty, frequency_penalty=x.frequency_penalty,
        repetition_penalty=x.repetition_penalty, output_ids=list(req.output.ids) if penalized else [],
        prompt_ids=req.prompt_ids if x.repetition_penalty != 1 else [], bias_ids=bias_ids, bias_values=bias_values)


def _grammar(row: int, req: Request) -> protocol.GrammarRow:
    """A sequence's output constraint with every token generated so far (copied: it grows
    after the step): the driver advances its cached matcher by what is new, or rebuilds it
    from all of them when it has none (a restart) or holds a different history."""
    c = req.params.structured
    return protocol.GrammarRow(row=row, key=req.params.grammar_key, kind=c["kind"], spec=c["spec"],
                               output_ids=list(req.output.ids))


def _pairs(pairs: list) -> np.ndarray:
    return np.asarray(pairs, dtype=np.int32).reshape(-1, 2)
