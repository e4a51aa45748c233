"""Per-sequence sampling from the logits of one step.

Stateless by design: a seeded sequence draws its noise from a generator seeded by
(seed, gen_index), so the same request gives the same tokens after a driver restart
or a preemption, whatever else shares its batch. Sampling is the exponential race
(argmax of p / E with E ~ Exp(1)), which is exact multinomial sampling and lets a
whole batch be drawn with one argmax.

The order, as vLLM's v1 sampler: logit_bias, repetition, frequency and presence penalties
(logits_controls.py, only for the rows that ask), the grammar's mask (grammar.py, only for
the rows with a constraint), then greedy argmax or temperature, min_p, top-k, top-p and the
draw. Logprobs are taken from the raw logits before all of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmos.drivers.model.logits_controls import Controls, adjust_logits, apply_min_p

_MASK64 = (1 << 64) - 1


@dataclass
class Sampled:
    tokens: np.ndarray      # [n] int32
    logprobs: np.ndarray    # [n] float32, the chosen tokens' logprobs under log_softmax(logits); NaN if not asked
    top_ids: np.ndarray     # [n, k] int32, k = the largest top_logprobs asked; rows not asking: 0
    top_lps: np.ndarray     # [n, k] float32; rows not asking: NaN


def _mix(x: int) -> int:
    """splitmix64 finalizer: spreads (seed, index) pairs over the generator's seed space."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def generator_for(seed: int, gen_index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator that draws token number `gen_index` of a request seeded with `seed`."""
    g = torch.Generator(device=device)
    g.manual_seed(_mix(_mix(seed & _MASK64) ^ gen_index) & ((1 << 63) - 1))
    return g


def sample(logits: torch.Tensor, temperature: np.ndarray, top_p: np.ndarray, top_k: np.ndarray,
           seed: np.ndarray, gen_index: np.ndarray, top_logprobs: np.ndarray,
           controls: Controls | None = None, allowed: tuple[np.ndarray, torch.Tensor] | None = None) -> Sampled:
    """One token per row of logits [n, vocab] (float32). Per-row parameters as in StepPlan:
    temperature 0 = greedy, top_k <= 0 or >= vocab = off, top_p >= 1 = off, seed < 0 = unseeded,
    top_logprobs < 0 = none; `controls` (logits_controls.py) for the rows with penalties, a
    logit bias or min_p (None: no row has any, and none of their code runs); `allowed`
    (rows, [len(rows), vocab] bool) the grammar masks of the constrained rows (None: none,
    and no mask code runs): a masked token can be neither argmax nor drawn. Logprobs are of
    the raw model distribution (before bias, penalties, temperature, min-p, top-k and top-p),
    as vLLM and OpenAI report them."""
    n, vocab = logits.shape
    logits = raw = logits.float()
    min_p = None
    if controls is not None:
        if controls.changes_logits:   # bias and penalties come before the greedy argmax
            logits = adjust_logits(logits, controls)
        if controls.min_p.any():
            min_p = np.zeros(n, dtype=np.float32)
            min_p[controls.rows] = controls.min_p
    if allowed is not None and len(allowed[0]):   # after bias and penalties, before greedy: it decides
        blocked = ~allowed[1].to(logits.device)
        if np.array_equal(allowed[0], np.arange(n)):   # every row, in order: one pass, also raw's copy
            logits = logits.masked_fill(blocked, float("-inf"))
        else:
            at = torch.from_numpy(allowed[0]).to(logits.device)
            logits = logits.clone() if logits is raw else logits
            logits[at] = logits.index_select(0, at).masked_fill_(blocked, float("-inf"))
    temperature = np.asarray(temperature, dtype=np.float64)
    greedy = temperature <= 0.0
    if greedy.all():
        tokens = logits.argmax(dim=-1)
    else:
        tokens = torch.empty(n, dtype=torch.long, device=logits.device)
        if greedy.any():
            gi = torch.from_numpy(np.flatnonzero(greedy)).to(logits.device)
            tokens[gi] = logits.index_select(0, gi).argmax(dim=-1)
        rows = np.flatnonzero(~greedy)
        tokens[torch.from_numpy(rows).to(logits.device)] = _sample_rows(
            logits, rows, temperature[rows], np.asarray(top_p, dtype=np.float64)[rows], np.asarray(top_k)[rows],
            np.asarray(seed)[rows], np.asarray(gen_index)[rows], None if min_p is None else min_p[rows])

    top_logprobs = np.asarray(top_logprobs)
    chosen = np.full(n, np.nan, dtype=np.float32)  # NaN: this sequence asked for no logprobs
    k = int(max(0, np.max(top_logprobs, initial=-1)))
    top_ids = np.zeros((n, k), dtype=np.int32)
    top_lps = np.full((n, k), np.nan, dtype=np.float32)
    want = np.flatnonzero(top_logprobs >= 0)
    if len(want):  # a full-vocabulary log_softmax costs ~1 ms per 32 rows: only when asked
        w = torch.from_numpy(want).to(logits.device)
        logp = torch.log_softmax(raw.index_select(0, w), dim=-1)
        chosen[want] = logp.gather(1, tokens.index_select(0, w)[:, None])[:, 0].cpu().numpy()
        if k:
            lps, ids = logp.topk(min(k, vocab), dim=-1)
            top_ids[want, : ids.shape[1]] = ids.cpu().numpy()
            top_lps[want, : lps.shape[1]] = lps.cpu().numpy()
    return Sampled(tokens.to(torch.int32).cpu().numpy(), chosen, top_ids, top_lps)


def _sample_rows(logits, rows, temperature, top_p, top_k, seed, gen_index, min_p) -> torch.Tensor:
    """Random draws for the non-greedy rows, all in one exponential race."""
    dev = logits.device
    vocab = logits.shape[1]
    x = logits.index_select(0, torch.from_numpy(rows).to(dev))
    x = x / torch.from_numpy(temperature).to(dev, torch.float32)[:, None]
    if min_p is not None and min_p.any():   # vLLM's order: after temperature, before top-k and top-p
        x = apply_min_p(x, torch.from_numpy(min_p).to(dev))
    # The noise is drawn per token id, before any reordering, so that a seeded row draws the
    # same token whatever the other rows of the batch ask for.
    noise = torch.empty_like(x)
    unseeded = np.flatnonzero(seed < 0)
    if len(unseeded):
        noise[torch.from_numpy(unseeded).to(dev)] = torch.empty(len(unseeded), vocab, device=dev).exponential_()
    for r in np.flatnonzero(seed >= 0):
        noise[r].exponential_(generator=generator_for(int(seed[r]), int(gen_index[r]), dev))
    top_k = np.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)
    order = None
    if (top_k < vocab).any() or (top_p < 1.0).any():
        # vLLM's order: keep the top k, renormalize, then keep the smallest prefix of mass >= top_p.
        width = int(top_k.max()) if (top_p >= 1.0).all() else vocab
        x, order = x.topk(width, dim=-1) if width < vocab else x.sort(dim=-1, descending=True)
        noise = noise.gather(1, order)
        ranks = torch.arange(width, device=dev)[None, :]
        x = x.masked_fill(ranks >= torch.from_numpy(top_k).to(dev)[:, None], float("-inf"))
        probs = torch.softmax(x, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly ahead of each token
        drop = before >= torch.from_numpy(top_p.astype(np.float32)).to(dev)[:, None]
        drop[:, 0] = False  # the most likely token always survives
        x = x.masked_fill(drop, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    # Exp(1) can draw exactly 0; 0/0 would be NaN, which argmax would pick.
    pick = (probs / noise.clamp_min_(1e-30)).argmax(dim=-1)
    if order is not None:
        pick = order.gather(1, pick[:, None])[:, 0]
    return pick
