"""Sampling: greedy, temperature, top-k, top-p, seeded reproducibility and logprobs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest_model import PROMPTS, MiniKernel, model_cache, smollm2_dir, tiny_model_dirs  # noqa: F401

from llmos.drivers.model.runner import ModelRunner
from llmos.drivers.model.sampling import sample

V = 1000


def params(n, temperature=1.0, top_p=1.0, top_k=-1, seed=-1, gen_index=0, top_logprobs=-1):
    full = lambda v, dt: np.broadcast_to(np.asarray(v, dtype=dt), (n,)).copy()  # noqa: E731
    return dict(temperature=full(temperature, np.float32), top_p=full(top_p, np.float32),
                top_k=full(top_k, np.int32), seed=full(seed, np.int64), gen_index=full(gen_index, np.int32),
                top_logprobs=full(top_logprobs, np.int32))


@pytest.fixture
def logits():
    return torch.randn(8, V, generator=torch.Generator().manual_seed(0)) * 3


def test_greedy_rows_take_the_argmax(logits):
    out = sample(logits, **params(8, temperature=[0, 1, 0, 1, 0, 1, 0, 1], seed=3))
    assert (out.tokens[::2] == logits.argmax(-1).numpy()[::2]).all()
    assert out.tokens.dtype == np.int32 and out.top_ids.shape == (8, 0)
    assert np.isnan(out.logprobs).all()  # nobody asked for logprobs


def test_same_seed_same_tokens_whatever_the_batch(logits):
    a = sample(logits, **params(8, seed=42, gen_index=np.arange(8)))
    b = sample(logits, **params(8, seed=42, gen_index=np.arange(8)))
    assert (a.tokens == b.tokens).all()
    # Row 5 alone, or moved into another batch with unseeded neighbours: the same draw.
    alone = sample(logits[5:6], **params(1, seed=42, gen_index=5))
    mixed = sample(logits[[0, 5, 1]], **params(3, seed=[-1, 42, -1], gen_index=[0, 5, 0]))
    filtered = sample(logits[[0, 5, 1]], **params(3, seed=[-1, 42, 7], gen_index=[0, 5, 0], top_k=[3, -1, 50],
                                                  top_p=[1.0, 1.0, 0.8], temperature=[1, 1, 0.5]))
    assert alone.tokens[0] == a.tokens[5] == mixed.tokens[1] == filtered.tokens[1]
    # ...and a filtered row draws the same whether its neighbours filter or not
    k_alone = sample(logits[1:2], **params(1, seed=7, top_k=50, top_p=0.8, temperature=0.5))
    assert k_alone.tokens[0] == filtered.tokens[2]


def test_different_seeds_and_indices_differ():
    flat = torch.zeros(1, V)  # uniform: any two draws collide with probability 1/V
    draw = lambda seed, idx: int(sample(flat, **params(1, seed=seed, gen_index=idx)).tokens[0])  # noqa: E731
    by_seed = [[draw(seed, i) for i in range(10)] for seed in range(5)]
    assert len({tuple(r) for r in by_seed}) == 5
    assert len(set(by_seed[0])) > 5  # gen_index moves the stream on
    unseeded = {int(t) for t in sample(flat.expand(20, V), **params(20)).tokens}
    assert len(unseeded) > 10


@pytest.mark.parametrize("seed", [-1, 9])
def test_top_k_1_and_tiny_top_p_are_greedy(logits, seed):
    greedy = logits.argmax(-1).numpy()
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, top_p=0.5)):
        out = sample(logits, **params(8, temperature=1.7, seed=seed, gen_index=np.arange(8), **kw))
        assert (out.tokens == greedy).all(), kw


def test_temperature_top_k_top_p_distributions():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    n = 20000
    logits = probs.log().expand(n, 4).contiguous()

    def freq(**kw):
        toks = sample(logits, **params(n, seed=1, gen_index=np.arange(n), **kw)).tokens
        return np.bincount(toks, minlength=4) / n

    assert np.abs(freq() - probs.numpy()).max() < 0.015
    hot = torch.softmax(probs.log() / 0.5, 0).numpy()  # temperature sharpens
    assert np.abs(freq(temperature=0.5) - hot).max() < 0.015
    assert np.abs(freq(top_k=2) - [4 / 7, 3 / 7, 0, 0]).max() < 0.015
    # top_p keeps the smallest prefix whose mass reaches p: 0.4 < 0.5, 0.4 + 0.3 >= 0.5
    assert np.abs(freq(top_p=0.5) - [4 / 7, 3 / 7, 0, 0]).max() < 0.015
    assert np.abs(freq(top_p=0.75) - [4 / 9, 3 / 9, 2 / 9, 0]).max() < 0.015
    # top-k first, then top-p on the renormalized rest (vLLM): top 3 = 4/9, 3/9, 2/9 -> p=0.7 keeps 2
    assert np.abs(freq(top_k=3, top_p=0.7) - [4 / 7, 3 / 7, 0, 0]).max() < 0.015
    assert np.abs(freq(top_k=[2, 3] * (n // 2)) - [0.5 * 4 / 7 + 0.5 * 4 / 9, 0.5 * 3 / 7 + 0.5 * 3 / 9,
                                                   0.5 * 2 / 9, 0]).max() < 0.015


def test_logprobs_are_of_the_raw_distribution(logits):
    out = sample(logits, **params(8, temperature=[0, 2.0, 0.5, 1, 0, 0, 0, 0],
                                  top_logprobs=[-1, 0, 3, 5, -1, -1, -1, 2], seed=4))
    ref = torch.log_softmax(logits, -1)
    assert out.top_ids.shape == out.top_lps.shape == (8, 5)
    assert np.isnan(out.logprobs[0]) and np.isnan(out.top_lps[0]).all()
    for r in (1, 2, 3, 7):
        assert out.logprobs[r] == pytest.approx(ref[r, out.tokens[r]].item(), abs=1e-5)
        top = ref[r].topk(5)
        np.testing.assert_allclose(out.top_lps[r], top.values.numpy(), atol=1e-5)
        assert (out.top_ids[r] == top.indices.numpy()).all()


@pytest.fixture(scope="module")
def llama(tiny_model_dirs, smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = tiny_model_dirs["llama"]
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ref = AutoModelForCausalLM.from_pretrained(d, local_files_only=True).eval()
    return d, ModelRunner(d), ref, [tok(p)["input_ids"] for p in PROMPTS]


def test_runner_logprobs_match_hf_logits(llama, tmp_path):
    d, runner, ref, prompts = llama
    k = MiniKernel(runner, tmp_path, block_size=4, shuffle_seed=0, chunk=9)
    seqs = [k.add(p, 12, top_logprobs=5, temperature=0.8, seed=11) for p in prompts]
    k.run(arrivals={2: [seqs[3]]})
    for s, p in zip(seqs, prompts):
        with torch.inference_mode():
            lp = torch.log_softmax(ref(torch.tensor([s.tokens[:-1]])).logits[0, len(p) - 1:], -1)
        for i, (chosen, ids, lps) in enumerate(s.logprobs):
            assert chosen == pytest.approx(lp[i, s.out[i]].item(), abs=1e-4)
            top = lp[i].topk(5)
            assert ids == top.indices.tolist()
            np.testing.assert_allclose(lps, top.values.numpy(), atol=1e-4)


def test_seeded_generation_survives_restarts_and_batching(llama, tmp_path):
    """Same seed, same text: alone, in a batch, or split across two runner processes' lifetimes."""
    d, runner, _, prompts = llama
    p = prompts[2]

    def generate(r, seed, others=(), restart_after=None):
        k = MiniKernel(r, tmp_path, block_size=4, shuffle_seed=seed % 5, chunk=5)
        s = k.add(p, 16, temperature=1.0, top_p=0.9, seed=seed)
        for o in others:
            k.add(o, 16, temperature=1.0)
        steps = 0
        while not s.done:
            if steps == restart_after:
                fresh = ModelRunner(d)
                fresh.map_pool(k.runner.pool.msg)
                k.runner = fresh
            k.step()
            steps += 1
        return s.out

    base = generate(runner, 123)
    assert generate(runner, 123, others=prompts[:2] + prompts[3:]) == base
    assert generate(runner, 123, restart_after=4) == base
    assert generate(runner, 124) != base
