"""Penalties, logit bias and min_p: the logits controls a sequence may ask for.

Applied in vLLM's order (v1 Sampler): logit_bias, then repetition_penalty, then frequency
and presence penalties, all before the greedy argmax (they can change it); min_p after
temperature and before top-k / top-p (it cannot). Stateless like the rest of sampling: the
counts are rebuilt at every step from the token history the plan carries (LogitsControls),
so a restarted driver, or a preempted sequence, samples exactly as before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from llmos import protocol
from llmos.sampling_params import MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_ENTRIES, MAX_PENALTY, MAX_REPETITION_PENALTY


@dataclass
class Controls:
    """The controls of one step's sampled rows, as flat arrays. `rows` [m] are positions among
    the rows sample() gets; each *_rows array says which of the m a flat id belongs to."""
    rows: np.ndarray          # [m] int64
    min_p: np.ndarray         # [m] float32, 0: off
    presence: np.ndarray      # [m] float32
    frequency: np.ndarray     # [m] float32
    repetition: np.ndarray    # [m] float32, 1: off
    output_ids: np.ndarray    # tokens generated so far, all rows concatenated
    output_rows: np.ndarray
    prompt_ids: np.ndarray    # prompt tokens of the rows with a repetition penalty
    prompt_rows: np.ndarray
    bias_ids: np.ndarray
    bias_rows: np.ndarray
    bias_values: np.ndarray   # float32

    @property
    def changes_logits(self) -> bool:
        """Anything but min_p, which acts on the tempered distribution instead."""
        return bool(len(self.bias_ids) or (self.repetition != 1).any() or self.presence.any()
                    or self.frequency.any())


def gather(controls: list[protocol.LogitsControls], plan_rows: np.ndarray, vocab: int,
           max_tokens: int) -> Controls | None:
    """The plan's controls as arrays over `plan_rows` (the plan indices that sample, in order).
    Raises ValueError for anything out of range: the kernel is not trusted blindly.
    None when no row asked for any."""
    if not controls:
        return None
    if len(controls) > len(plan_rows):
        raise ValueError(f"{len(controls)} logits controls for {len(plan_rows)} sampled rows")
    position = {int(r): i for i, r in enumerate(plan_rows)}
    rows, scalars, flat = [], [], {"output": ([], []), "prompt": ([], []), "bias": ([], [])}
    bias_values = []
    for i, c in enumerate(controls):
        at = position.pop(c.row, None)   # popped: a second control for the same row is refused too
        if at is None:
            raise ValueError(f"logits controls for row {c.row}, which does not sample or has them twice")
        rows.append(at)
        values = (c.min_p, c.presence_penalty, c.frequency_penalty, c.repetition_penalty)
        if not (all(math.isfinite(v) for v in values) and 0 <= c.min_p <= 1 and abs(c.presence_penalty) <= MAX_PENALTY
                and abs(c.frequency_penalty) <= MAX_PENALTY and 0 < c.repetition_penalty <= MAX_REPETITION_PENALTY):
            raise ValueError(f"row {c.row}: logits controls out of range {values}")
        scalars.append(values)
        if len(c.bias_ids) != len(c.bias_values) or len(c.bias_ids) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"row {c.row}: {len(c.bias_ids)} bias ids, {len(c.bias_values)} values")
        for name, ids, limit in (("output", c.output_ids, max_tokens), ("prompt", c.prompt_ids, max_tokens),
                                 ("bias", c.bias_ids, MAX_LOGIT_BIAS_ENTRIES)):
            flat[name][0].append(_token_ids(f"row {c.row} {name}_ids", ids, vocab, limit))
            flat[name][1].append(np.full(len(ids), i, dtype=np.int64))
        bias_values.append(_biases(c.row, c.bias_values))
    min_p, presence, frequency, repetition = np.asarray(scalars, dtype=np.float32).T
    cat = {name: (np.concatenate(ids), np.concatenate(where)) for name, (ids, where) in flat.items()}
    return Controls(np.asarray(rows, dtype=np.int64), min_p, presence, frequency, repetition,
                    *cat["output"], *cat["prompt"], *cat["bias"], np.concatenate(bias_values))


def _token_ids(where: str, ids: list, vocab: int, limit: int) -> np.ndarray:
    if len(ids) > limit:
        raise ValueError(f"{where}: {len(ids)} ids, at most {limit}")
    a = np.asarray(ids) if ids else np.zeros(0, dtype=np.int64)
    if a.ndim != 1 or a.dtype.kind not in "iu" or (a.size and (a.min() < 0 or a.max() >= vocab)):
        raise ValueError(f"{where}: token ids must be integers in [0, {vocab})")
    return a.astype(np.int64)


def _biases(row: int, values: list) -> np.ndarray:
    a = np.asarray(values) if values else np.zeros(0, dtype=np.float32)
    if a.ndim != 1 or a.dtype.kind not in "iuf" or not (np.abs(a) <= MAX_LOGIT_BIAS).all():   # NaN fails too
        raise ValueError(f"row {row}: logit biases must be numbers in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]")
    return a.astype(np.float32)


def adjust_logits(logits: torch.Tensor, c: Controls) -> torch.Tensor:
    """A copy of logits [n, vocab] (float32) with bias and penalties applied to c's rows.
    Sparse: only the (row, token) entries a control touches are read and written, which gives
    the same floats as the dense formulas (a token not seen keeps its logit exactly)."""
    dev = logits.device
    out = logits.clone()   # the raw logits stay for the logprobs (~1 ms at 32 x 49k)
    vocab = out.shape[1]
    if len(c.bias_ids):   # vLLM's LogitBiasLogitsProcessor: added, before any penalty
        out.index_put_(_at(c.rows[c.bias_rows], c.bias_ids, dev), torch.from_numpy(c.bias_values).to(dev),
                       accumulate=True)
    if (c.repetition != 1).any():
        # CTRL / HF RepetitionPenaltyLogitsProcessor over prompt and output: a seen token's
        # negative logit is multiplied by the penalty, any other divided.
        # (return_counts: numpy's sort-based unique, ~15x faster here than its default for these sizes)
        seen, _ = np.unique(np.concatenate([c.prompt_rows * vocab + c.prompt_ids, c.output_rows * vocab + c.output_ids]),
                            return_counts=True)
        local = seen // vocab
        at = _at(c.rows[local], seen % vocab, dev)
        penalty = torch.from_numpy(c.repetition[local]).to(dev)
        x = out[at]
        out[at] = torch.where(x < 0, x * penalty, x / penalty)
    if c.presence.any() or c.frequency.any():
        # OpenAI's definition, over the output only: logit -= frequency * count + presence * (count > 0).
        seen, counts = np.unique(c.output_rows * vocab + c.output_ids, return_counts=True)
        local = seen // vocab
        at = _at(c.rows[local], seen % vocab, dev)
        frequency, presence = (torch.from_numpy(a[local]).to(dev) for a in (c.frequency, c.presence))
        out[at] = out[at] - frequency * torch.from_numpy(counts.astype(np.float32)).to(dev) - presence
    return out


def _at(rows: np.ndarray, ids: np.ndarray, dev) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(rows).to(dev), torch.from_numpy(ids).to(dev)


def apply_min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """vLLM's MinPLogitsProcessor on tempered logits x [n, vocab]: drop tokens whose probability
    is below min_p [n] times the row's largest. A row with min_p 0 loses nothing."""
    probs = torch.softmax(x, dim=-1)
    floor = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return x.masked_fill(probs < floor, float("-inf"))
