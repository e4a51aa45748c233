"""Checks a model driver's StepResult against the plan it answers, before the kernel
applies a single token of it (the kernel never trusts a driver, design.md rule 3).

A result that fails is treated as a lost step: nothing of it is applied and the step is
planned again, as if the driver had died while running it.
"""
from __future__ import annotations

import numpy as np

from llmos import protocol


class BadStepResult(ValueError):
    """The StepResult does not answer its plan; str() says how."""


def check_result(plan: protocol.StepPlan, result: protocol.StepResult, vocab_size: int) -> None:
    """Raise BadStepResult unless `result` carries one token in [0, vocab_size) for each
    sequence of `plan` with sample == 1, in plan order, with logprob arrays of matching shape."""
    expected = plan.seq_ids[plan.sample == 1]
    n = len(expected)
    if result.seq_ids.ndim != 1 or not np.array_equal(result.seq_ids, expected):
        raise BadStepResult(f"step {plan.step_id}: sequences {result.seq_ids.tolist()[:8]} "
                            f"do not match the plan's {expected.tolist()[:8]}")
    if result.tokens.shape != (n,) or result.logprobs.shape != (n,):
        raise BadStepResult(f"step {plan.step_id}: {result.tokens.shape} tokens and {result.logprobs.shape} "
                            f"logprobs for {n} sampled sequences")
    if n and (result.tokens.min() < 0 or result.tokens.max() >= vocab_size):
        raise BadStepResult(f"step {plan.step_id}: a token id outside the vocabulary [0, {vocab_size})")
    asked = plan.top_logprobs[plan.sample == 1]
    k = int(asked.max()) if n else 0
    if result.top_ids.ndim != 2 or result.top_ids.shape != result.top_lps.shape or \
            result.top_ids.shape[0] != n or (n and result.top_ids.shape[1] < k):
        raise BadStepResult(f"step {plan.step_id}: top logprobs of shape {result.top_ids.shape} and "
                            f"{result.top_lps.shape} for {n} sequences asking up to {k}")
    if k > 0 and (result.top_ids[:, :k].min() < 0 or result.top_ids[:, :k].max() >= vocab_size):
        raise BadStepResult(f"step {plan.step_id}: a top-logprob token id outside the vocabulary")
    constrained = {int(plan.seq_ids[g.row]) for g in plan.grammars}
    errors = [e[0] if isinstance(e, list) and len(e) == 2 and isinstance(e[1], str) else None
              for e in result.grammar_errors]
    named = [*result.held, *errors]
    if not all(type(x) is int and x in constrained for x in named) or len(set(named)) != len(named):
        raise BadStepResult(f"step {plan.step_id}: held or grammar-failed sequences that the plan did not "
                            "constrain, or named twice")
