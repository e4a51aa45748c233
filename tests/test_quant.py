"""4-bit weights (--dtype int4): the GGUF's own Q4_1 codes come back, both kernels compute
with the same weights, and smollm2 in int4 still picks transformers' fp32 tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmos.drivers.model import native
from llmos.drivers.model.quant import GROUP, INT8_ROWS, SMALL_STEP, Int4Linear, quantize_groups


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


@pytest.mark.parametrize("dtype", ["int4", "int8"])
def test_smollm2_quantized_picks_transformers_fp32_tokens(dtype, smollm2_dir, tmp_path, monkeypatch):
    """Prefill then decode (both kernels; int8: the prefill of all prompts in one step of more
    than INT8_ROWS tokens takes the int8 products); every token is fp32's choice or within 1
    logit of it."""
    from conftest_model import PROMPTS, MiniKernel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmos.drivers.model.runner import ModelRunner
    from llmos.drivers.model.w8a8 import W8A8Linear

    if dtype == "int8" and getattr(native.load(), "w8a8_linear", None) is None:
        pytest.skip("no C++ kernels here")
    int8_rows = []
    real = W8A8Linear.forward
    monkeypatch.setattr(W8A8Linear, "forward", lambda self, x: int8_rows.append(x.numel() // x.shape[-1]) or real(self, x))
    runner = ModelRunner(smollm2_dir, dtype=dtype)
    info = runner.info()
    assert info["dtype"] == "bfloat16" and runner.exact_4bit > 0.99   # the GGUF is Q4_1
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    k = MiniKernel(runner, tmp_path, block_size=16)
    seqs = [k.add(tok(p)["input_ids"], 8) for p in [*PROMPTS, " ".join(PROMPTS)]]   # ~110 prompt tokens
    k.run()
    with torch.inference_mode():
        for s in seqs:
            ids = torch.tensor([s.tokens])
            logits = ref(ids).logits[0, len(s.tokens) - len(s.out) - 1:-1]   # fp32's view of each step
            for step, t in enumerate(s.out):
                best = logits[step].max().item()
                assert logits[step, t].item() >= best - 1.0, f"step {step}: token {t} far from fp32's choice"
    assert bool(int8_rows) == (dtype == "int8") and all(n >= INT8_ROWS for n in int8_rows)


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


# The native products (csrc/quant_gemv.cpp), where this CPU has AVX-512 VNNI.
def _native():
    from llmos.drivers.model.quant import kernels
    ext = kernels()
    if ext is None:
        pytest.skip("the native quantized kernels need AVX-512 VNNI and a compiler")
    return ext


def _quantized_x(x):
    """x as the kernel sees it: 8-bit codes per group of 32, d = max|x| / 127, round to even."""
    m, k = x.shape
    g = x.reshape(m, k // GROUP, GROUP)
    d = g.abs().amax(-1, keepdim=True) / 127
    return (torch.round(g / torch.where(d > 0, d, torch.ones_like(d))) * d).reshape(m, k)


@pytest.mark.parametrize("n,k", [(36, 96), (192, 576), (64, 1536)])   # 96: an odd number of groups
@pytest.mark.parametrize("tokens", [1, 3, 4, 5])
def test_native_products_match_their_arithmetic(n, k, tokens):
    from llmos.drivers.model.quant import _even_groups, pack_q4, pack_q8
    ext, gen = _native(), torch.Generator().manual_seed(3)
    g = k // GROUP
    q4 = torch.randint(0, 16, (n, k), generator=gen)
    q8 = torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8)
    d = (torch.rand(n, g, generator=gen) * 0.02).half()
    m = (torch.randn(n, g, generator=gen) * 0.1).half()
    bias = torch.randn(n, generator=gen)
    x = torch.randn(tokens, k, generator=gen)
    dd, mm = d.double().repeat_interleave(GROUP, 1), m.double().repeat_interleave(GROUP, 1)
    xq = _quantized_x(x).double()
    want4 = xq @ (q4.double() * dd).t() + x.double().reshape(tokens, g, GROUP).sum(-1) @ m.double().t() + bias.double()
    want8 = xq @ (q8.double() * dd).t()
    got4 = ext.q4_linear(x, pack_q4(q4), _even_groups(d), _even_groups(m), bias)
    got8 = ext.q8_linear(x, pack_q8(q8), _even_groups(d), None, None)
    for got, want in ((got4, want4), (got8, want8)):
        assert got.shape == (tokens, n) and got.dtype == torch.float32
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5
    # bf16 activations: the same sums, rounded once at the end
    xb = x.bfloat16()
    assert torch.equal(ext.q8_linear(xb, pack_q8(q8), _even_groups(d), None, None),
                       ext.q8_linear(xb.float(), pack_q8(q8), _even_groups(d), None, None).bfloat16())


def test_native_products_refuse_bad_shapes_and_answer_after():
    from llmos.drivers.model.quant import _even_groups, pack_q4
    ext = _native()
    q = torch.randint(0, 16, (16, 64))
    d = m = _even_groups(torch.full((16, 2), 0.01).half())
    x = torch.randn(1, 64)
    for bad in (lambda: ext.q4_linear(torch.randn(1, 96), pack_q4(q), d, m, None),   # x wider than the groups
                lambda: ext.q4_linear(x, pack_q4(q)[:, :-1].contiguous(), d, m, None),  # codes cut short
                lambda: ext.q4_linear(x, pack_q4(q), d.float(), m, None),             # scales not float16
                lambda: ext.q4_linear(x, pack_q4(q), d, m, torch.zeros(3))):           # bias of the wrong length
        with pytest.raises(RuntimeError):
            bad()
    want = x.double() @ (q.double() * 0.01 + float(m[0, 0])).t()
    assert torch.allclose(ext.q4_linear(x, pack_q4(q), d, m, None).double(), want, rtol=0.02, atol=0.05)


def test_q8_0_weights_come_back_exactly_and_run_native():
    from llmos.drivers.model.quant import Int8Linear, quantize_q8_groups
    ext, gen = _native(), torch.Generator().manual_seed(4)
    q = torch.randint(-127, 128, (48, 64), generator=gen)
    q[:, 0] = 127                                    # Q8_0: d = max|w| / 127, so 127 is in every group
    q[:, 32] = -127
    d = (torch.rand(48, 2, generator=gen) * 0.01 + 1e-4).half().float()
    w = q.float() * d.repeat_interleave(GROUP, 1)
    codes, scales, exact = quantize_q8_groups(w)
    assert exact == 1.0 and torch.equal(codes.int(), q.int())
    linear = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = Int8Linear(linear, ext)
    for tokens in (1, SMALL_STEP, SMALL_STEP + 1):   # native, then the dense copy
        x = torch.randn(1, tokens, 64, generator=gen).to(torch.bfloat16)
        want = x.float() @ w.t()
        assert ((layer(x).float() - want).abs().max() / want.abs().max()).item() < 0.02
