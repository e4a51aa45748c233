"""Penalties, logit bias and min_p in the sampler: each control exactly against a reference
written out here (OpenAI's formula, transformers' RepetitionPenaltyLogitsProcessor, vLLM's
min-p rule) on fixed logits; vLLM's order; raw logprobs; rows without controls untouched;
seeded draws reproducible; the driver's check of what the plan carries."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from llmos import protocol
from llmos.drivers.model.logits_controls import adjust_logits, gather
from llmos.drivers.model.sampling import sample

V = 500
N = 6


def params(n, temperature=0.0, top_p=1.0, top_k=-1, seed=-1, gen_index=0, top_logprobs=-1):
    full = lambda v, dt: np.broadcast_to(np.asarray(v, dtype=dt), (n,)).copy()  # noqa: E731
    return dict(temperature=full(temperature, np.float32), top_p=full(top_p, np.float32),
                top_k=full(top_k, np.int32), seed=full(seed, np.int64), gen_index=full(gen_index, np.int32),
                top_logprobs=full(top_logprobs, np.int32))


def ctl(row, min_p=0.0, presence=0.0, frequency=0.0, repetition=1.0, output=(), prompt=(), bias=None):
    bias = bias or {}
    return protocol.LogitsControls(row=row, min_p=min_p, presence_penalty=presence, frequency_penalty=frequency,
                                   repetition_penalty=repetition, output_ids=list(output), prompt_ids=list(prompt),
                                   bias_ids=list(bias), bias_values=list(bias.values()))


def controls(*items, n=N):
    """What the runner builds from a plan whose rows 0..n-1 all sample (through the wire format)."""
    wire = protocol.decode(protocol.encode(plan_with(list(items), n)))
    return gather(wire.controls, np.arange(n), V, 4096)


def plan_with(items, n):
    z = np.zeros(n, np.int32)
    return protocol.StepPlan(step_id=1, seq_ids=z, num_new=z + 1, start_pos=z, tokens=z, block_tables=z[:, None],
                             sample=z + 1, temperature=z.astype(np.float32), top_p=z.astype(np.float32) + 1,
                             top_k=z - 1, seed=z.astype(np.int64) - 1, gen_index=z, top_logprobs=z - 1,
                             controls=items)


@pytest.fixture
def logits():
    return torch.randn(N, V, generator=torch.Generator().manual_seed(0)) * 4


OUTPUT = [7, 7, 7, 3, 9, 3, 400]          # generated so far: 7 three times, 3 twice
PROMPT = [11, 12, 7, 250, 250]


def test_presence_and_frequency_follow_openais_formula(logits):
    c = controls(ctl(2, presence=0.7, frequency=1.3, output=OUTPUT), ctl(4, presence=-2.0, output=OUTPUT))
    got = adjust_logits(logits, c).numpy()
    counts = np.bincount(OUTPUT, minlength=V).astype(np.float32)
    x = logits.numpy()
    # mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
    want2 = x[2] - np.float32(1.3) * counts - np.float32(0.7) * (counts > 0)
    want4 = x[4] - np.float32(0.0) * counts - np.float32(-2.0) * (counts > 0)
    assert np.array_equal(got[2], want2) and np.array_equal(got[4], want4)
    assert np.array_equal(got[[0, 1, 3, 5]], x[[0, 1, 3, 5]])   # other rows bit for bit


def test_repetition_penalty_matches_transformers_over_prompt_and_output(logits):
    c = controls(ctl(1, repetition=1.3, prompt=PROMPT, output=OUTPUT), ctl(3, repetition=0.6, prompt=PROMPT))
    got = adjust_logits(logits, c)
    for row, penalty, seen in ((1, 1.3, PROMPT + OUTPUT), (3, 0.6, PROMPT)):
        ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([seen]), logits[row:row + 1].clone())
        assert torch.equal(got[row], ref[0])
    assert (got[1, 7] != logits[1, 7]) and torch.equal(got[1, 8], logits[1, 8])


def test_logit_bias_is_added(logits):
    c = controls(ctl(0, bias={5: 100.0, 6: -100.0, 499: 0.25}))
    got = adjust_logits(logits, c)
    want = logits[0].clone()
    want[[5, 6, 499]] += torch.tensor([100.0, -100.0, 0.25])
    assert torch.equal(got[0], want)


def test_vllms_order_bias_then_repetition_then_frequency_and_presence(logits):
    bias = {7: 3.0, 250: -1.5, 3: 0.5}
    c = controls(ctl(5, presence=0.4, frequency=0.9, repetition=1.7, prompt=PROMPT, output=OUTPUT, bias=bias))
    x = logits[5:6].clone()
    x[0, list(bias)] += torch.tensor(list(bias.values()))
    x = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([PROMPT + OUTPUT]), x)[0].numpy()
    counts = np.bincount(OUTPUT, minlength=V).astype(np.float32)
    want = x - np.float32(0.9) * counts - np.float32(0.4) * (counts > 0)
    assert np.array_equal(adjust_logits(logits, c)[5].numpy(), want)


def reference_min_p(x: np.ndarray, min_p: float) -> np.ndarray:
    """The tokens min-p keeps: p >= min_p * max(p), p the softmax of the tempered logits."""
    p = np.exp(x - x.max())
    p /= p.sum()
    return p >= min_p * p.max()


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_draws_only_tokens_above_the_floor_after_temperature(logits, min_p):
    temperature = 0.7
    allowed = reference_min_p((logits[2] / temperature).double().numpy(), min_p)
    c = controls(ctl(2, min_p=min_p))
    draws = set()
    for i in range(300):
        out = sample(logits, **params(N, temperature=temperature, seed=5, gen_index=i), controls=c)
        draws.add(int(out.tokens[2]))
    assert draws <= set(np.flatnonzero(allowed))
    assert len(draws) >= min(allowed.sum(), 3)   # it still samples among what survives


def test_min_p_never_changes_a_row_without_it_nor_a_greedy_one(logits):
    c = controls(ctl(1, min_p=0.5), ctl(4, min_p=1.0))
    temps = [0.9, 0.9, 0.9, 0.0, 0.0, 1.2]
    for i in range(20):
        a = sample(logits, **params(N, temperature=temps, seed=3, gen_index=i))
        b = sample(logits, **params(N, temperature=temps, seed=3, gen_index=i), controls=c)
        assert np.array_equal(np.delete(a.tokens, 1), np.delete(b.tokens, 1))
        assert b.tokens[4] == logits[4].argmax()   # greedy: min_p cannot change the argmax


def test_greedy_takes_the_argmax_after_bias_and_penalties_and_logprobs_stay_raw(logits):
    forced = int(logits[0].argmin())
    banned = int(logits[3].argmax())
    c = controls(ctl(0, bias={forced: 100.0}), ctl(3, frequency=2.0, output=[banned] * 40))
    out = sample(logits, **params(N, top_logprobs=3), controls=c)
    assert out.tokens[0] == forced and out.tokens[3] != banned
    assert out.tokens[3] == adjust_logits(logits, c)[3].argmax()
    raw = torch.log_softmax(logits, -1)
    assert np.array_equal(out.logprobs, raw.gather(1, torch.from_numpy(out.tokens).long()[:, None])[:, 0].numpy())
    assert np.array_equal(out.top_ids, raw.topk(3).indices.numpy())   # the model's own top tokens


def test_seeded_draws_with_controls_are_the_same_whatever_the_batch(logits):
    logits = logits / 4   # flatter: the draws vary
    c = ctl(2, presence=0.5, frequency=0.5, repetition=1.2, min_p=0.02, prompt=PROMPT, output=OUTPUT, bias={8: 2.0})
    full = [sample(logits, **params(N, temperature=1.1, top_p=0.95, seed=42, gen_index=i),
                   controls=controls(c)).tokens[2] for i in range(30)]
    alone = [sample(logits[2:3], **params(1, temperature=1.1, top_p=0.95, seed=42, gen_index=i),
                    controls=controls(ctl(0, **_kw(c)), n=1)).tokens[0] for i in range(30)]
    assert full == alone and len(set(full)) > 3


def _kw(c: protocol.LogitsControls) -> dict:
    return dict(min_p=c.min_p, presence=c.presence_penalty, frequency=c.frequency_penalty,
                repetition=c.repetition_penalty, output=c.output_ids, prompt=c.prompt_ids,
                bias=dict(zip(c.bias_ids, c.bias_values)))


@pytest.mark.parametrize("bad", [
    dict(row=9), dict(min_p=1.5), dict(min_p=float("nan")), dict(presence=2.5), dict(frequency=-3.0),
    dict(repetition=0.0), dict(repetition=2.5), dict(output=[V]), dict(output=[-1]), dict(prompt=[1.5]),
    dict(output=["7"]), dict(prompt=[[1]]), dict(bias={V: 1.0}), dict(bias={1: 101.0}),
    dict(bias={1: float("nan")}), dict(bias={1: "x"}), dict(output=[1] * 4097),
])
def test_the_driver_refuses_controls_out_of_range(bad):
    with pytest.raises(ValueError):
        controls(ctl(**{"row": 1, **bad}))


def test_the_driver_refuses_rows_twice_or_unsampled_and_mismatched_bias():
    with pytest.raises(ValueError):
        controls(ctl(1), ctl(1))
    with pytest.raises(ValueError):
        gather([ctl(2)], np.array([0, 1, 3]), V, 4096)   # row 2 does not sample
    odd = ctl(0, bias={1: 1.0})
    odd.bias_values = []
    with pytest.raises(ValueError):
        gather([odd], np.arange(2), V, 4096)
    assert gather([], np.arange(2), V, 4096) is None
