"""4-bit weights (--dtype int4): the GGUF's own Q4_1 codes come back, both kernels compute
with the same weights, and smollm2 in int4 still picks transformers' fp32 tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmos.drivers.model.quant import GROUP, SMALL_STEP, Int4Linear, quantize_groups


def q4_1_weights(n=32, k=96, seed=0):
    """Weights as a Q4_1 file dequantizes them: w = d q + m per group of 32, q = 0 and 15 present."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // GROUP, GROUP), generator=gen)
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(n, k // GROUP, 1, generator=gen) * 0.02 + 1e-3).half().float()
    m = (torch.randn(n, k // GROUP, 1, generator=gen) * 0.1).half().float()
    return (q * d + m).reshape(n, k)


def test_q4_1_codes_come_back_exactly():
    w = q4_1_weights()
    q, s, z, exact = quantize_groups(w)
    assert exact == 1.0
    back = (q.float() - 8) * s.t().repeat_interleave(GROUP, 1) + z.t().repeat_interleave(GROUP, 1)
    assert torch.allclose(back, w, atol=1e-6, rtol=0)


def test_other_weights_are_within_half_a_step():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    q, s, z, exact = quantize_groups(w)
    assert exact < 1.0 and 0 <= q.min() and q.max() <= 15
    back = (q.float() - 8) * s.t().repeat_interleave(GROUP, 1) + z.t().repeat_interleave(GROUP, 1)
    assert ((back - w).abs() <= s.t().repeat_interleave(GROUP, 1) / 2 + 1e-6).all()


@pytest.mark.parametrize("tokens", [1, SMALL_STEP, SMALL_STEP + 1, 32])
def test_both_kernels_compute_with_the_4bit_weights(tokens):
    w = q4_1_weights(n=48, k=64)
    linear = torch.nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = Int4Linear(linear)
    x = torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    want = x.float() @ w.t() + linear.bias.detach()
    got = layer(x).float()
    assert got.shape == (1, tokens, 48)
    assert torch.allclose(got, want, atol=0.05, rtol=0.02), (got - want).abs().max()


def test_smollm2_in_int4_picks_transformers_fp32_tokens(smollm2_dir, tmp_path):
    """Prefill then decode (both kernels); every token is fp32's choice or within 1 logit of it."""
    from conftest_model import PROMPTS, MiniKernel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmos.drivers.model.runner import ModelRunner

    runner = ModelRunner(smollm2_dir, dtype="int4")
    info = runner.info()
    assert info["dtype"] == "bfloat16" and runner.exact_4bit > 0.99   # the GGUF is Q4_1
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    k = MiniKernel(runner, tmp_path, block_size=16)
    seqs = [k.add(tok(p)["input_ids"], 8) for p in PROMPTS]
    k.run()
    with torch.inference_mode():
        for s in seqs:
            ids = torch.tensor([s.tokens])
            logits = ref(ids).logits[0, len(s.tokens) - len(s.out) - 1:-1]   # fp32's view of each step
            for step, t in enumerate(s.out):
                best = logits[step].max().item()
                assert logits[step, t].item() >= best - 1.0, f"step {step}: token {t} far from fp32's choice"


def test_the_daemon_serves_smollm2_in_int4(tmp_path, smollm2_dir):
    """llmosd --dtype int4 end to end: a bf16 KV pool, and text whose every token is fp32's
    choice or within 1 logit of it."""
    from daemon_harness import serving
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "The capital of France is"
    with serving(tmp_path / "home", [f"smollm2={smollm2_dir}"], "--dtype", "int4", "--kv-memory", "64MiB") as d:
        with d.http() as c:
            r = c.post("/v1/completions", json={"model": "smollm2", "prompt": prompt, "max_tokens": 12,
                                                "temperature": 0, "logprobs": 1})
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
        # smollm2: 30 layers x (k, v) x 16 slots x 3 kv heads x 64; 2 bytes each (bf16), not 4
        assert d.memory("smollm2")["blocks_total"] == (64 << 20) // (30 * 2 * 16 * 3 * 64 * 2)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True).eval()
    ids, out = tok(prompt)["input_ids"], tok(prompt + text)["input_ids"]
    assert out[: len(ids)] == ids and len(out) > len(ids)
    with torch.inference_mode():
        logits = ref(torch.tensor([out])).logits[0]
    for pos in range(len(ids), len(out)):
        assert logits[pos - 1, out[pos]] >= logits[pos - 1].max() - 1.0, f"token {pos}: {tok.decode(out[pos])!r}"
