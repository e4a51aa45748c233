"""csrc/layer_ops.cpp and layer_ops.py: the native RMSNorm (residual add folded in) and rotary
embedding give bit for bit what torch's ops give in bf16, on rows like real activations; the
lean loop takes them for bf16 on the CPU and leaves fp32 to torch; bad tensors are refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmos.drivers.model import layer_ops, native

ext = native.load()
needs_native = pytest.mark.skipif(ext is None, reason="the C++ kernels did not build here")


def heavy_rows(rows: int, width: int, seed: int) -> torch.Tensor:
    """bf16 rows with a few huge entries, as decoder activations have."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, width, generator=g) * torch.exp(2 * torch.randn(rows, width, generator=g))).bfloat16()


def torch_rotary(qk, cos, sin):
    half = qk.shape[-1] // 2
    return qk * cos[:, None] + torch.cat([-qk[..., half:], qk[..., :half]], -1) * sin[:, None]


@needs_native
@pytest.mark.parametrize("width", [576, 960, 2048, 100])
def test_sum_of_squares_follows_torchs_order_in_exactly_one_width(width):
    """The norm's bits hang on summing in torch's order. The probe finds the width whose order
    gives torch's sums for every row; the other width differs on many rows, so a match is no
    accident of the data (2048 also runs torch's cascade of partial sums; 100 has a tail)."""
    x = heavy_rows(300, width, seed=width)
    want = x.float().pow(2).sum(-1)
    lanes = layer_ops._torch_lanes(ext, width)
    assert lanes in (8, 16)
    assert torch.equal(ext.sum_of_squares_bf16(x, lanes), want)
    other = ext.sum_of_squares_bf16(x, 24 - lanes)
    assert (other != want).sum() > 30


@needs_native
@pytest.mark.parametrize("rows", [1, 7, 64, 700])
def test_native_norm_with_residual_is_torchs_bit_for_bit(rows):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    module = LlamaRMSNorm(576, eps=1e-5).bfloat16()
    with torch.no_grad():
        module.weight.copy_(torch.rand(576, generator=torch.Generator().manual_seed(3)) + 0.5)
    norm = layer_ops.add_norm(module, module, ext)
    assert norm.ext is not None                  # the probe accepted it
    x, r = heavy_rows(rows, 576, seed=rows), heavy_rows(rows, 576, seed=rows + 1)
    want_x = x + r
    with torch.no_grad():
        want = module(want_x)
    got_x, got = norm(x, r)
    assert torch.equal(got_x, want_x) and got_x.data_ptr() == x.data_ptr()   # added in place
    assert torch.equal(got, want)
    _, alone = norm(want_x.clone())
    assert torch.equal(alone, want)


@needs_native
@pytest.mark.parametrize("tokens", [1, 5, 90])
def test_native_rotary_in_place_on_the_qkv_view_is_torchs(tokens):
    H, KVH, D = 9, 3, 64
    g = torch.Generator().manual_seed(tokens)
    qkv = (3 * torch.randn(tokens, H + 2 * KVH, D, generator=g)).bfloat16()
    angles = (torch.arange(tokens)[:, None] + 500) * (1e4 ** (-torch.arange(0, D, 2) / D))[None]
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    qk = qkv[:, :H + KVH]                        # a strided view, as the lean loop has it
    want, v_before = torch_rotary(qk, cos, sin), qkv[:, H + KVH:].clone()
    layer_ops.rotate_(ext, qk, cos, sin)
    assert torch.equal(qk, want)
    assert torch.equal(qkv[:, H + KVH:], v_before)   # v untouched


@needs_native
def test_bad_tensors_are_refused_with_a_reason():
    w = torch.ones(576, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16 rows"):
        ext.rms_norm_bf16(torch.ones(2, 576), None, w, 1e-5, 8)
    with pytest.raises(RuntimeError, match="bfloat16 rows"):
        ext.rms_norm_bf16(torch.ones(2, 575, dtype=torch.bfloat16), None, w, 1e-5, 8)
    with pytest.raises(RuntimeError, match="lanes"):
        ext.rms_norm_bf16(torch.ones(2, 576, dtype=torch.bfloat16), None, w, 1e-5, 4)
    with pytest.raises(RuntimeError, match="residual rows"):
        ext.rms_norm_bf16(torch.ones(2, 576, dtype=torch.bfloat16), torch.ones(3, 576, dtype=torch.bfloat16), w,
                          1e-5, 8)
    with pytest.raises(RuntimeError, match="cos"):
        ext.rotary_bf16_(torch.ones(2, 4, 64, dtype=torch.bfloat16), torch.ones(2, 32, dtype=torch.bfloat16),
                         torch.ones(2, 64, dtype=torch.bfloat16))
    # and the ops still answer right after
    x = heavy_rows(3, 576, seed=9)
    assert torch.equal(ext.rms_norm_bf16(x.clone(), None, w, 1e-5, layer_ops._torch_lanes(ext, 576)),
                       w * F.rms_norm(x, (576,), None, 1e-5))


@needs_native
def test_lean_takes_them_for_bf16_only_and_the_switch_turns_them_off(tiny_model_dirs, monkeypatch):
    from llmos.drivers.model.runner import ModelRunner
    bf16 = ModelRunner(tiny_model_dirs["llama"], dtype="bfloat16").lean
    assert bf16.ext is not None and all(L.norm1.ext is not None and L.norm2.ext is not None for L in bf16.layers)
    assert bf16.final_norm.ext is not None
    assert ModelRunner(tiny_model_dirs["llama"]).lean.ext is None          # fp32 keeps torch's ops
    monkeypatch.setenv("LLMOS_LAYER_OPS", "0")
    assert ModelRunner(tiny_model_dirs["llama"], dtype="bfloat16").lean.ext is None
    monkeypatch.setenv("LLMOS_LAYER_OPS", "fast")
    with pytest.raises(ValueError, match="LLMOS_LAYER_OPS"):
        layer_ops.ops_for(torch.bfloat16, torch.device("cpu"))
