"""The small ops between a decoder layer's matmuls as single native passes (bf16, CPU).

A decode step of smollm2 at one stream runs 61 RMSNorms and 30 rotary embeddings. In torch
each is a chain of 6-8 aten ops (~30 us and ~24 us for a token's 576 numbers), together a
fifth of an int4 step; csrc/layer_ops.cpp does each in one pass (~3.5 us and ~1.3 us, the
norm with the residual add folded in). They round where transformers' bf16 modules round:

- the rotary embedding and the residual add are elementwise, so bit-identical by construction;
- the norm sums its squares in the order of torch's own reduction (ATen's cascade sum over
  vectors of 8 or 16 floats). Which width torch's sum kernel uses is found by a probe on
  heavy-tailed rows (`_torch_lanes`), not assumed from its reported capability: with torch
  2.13 on an AVX-512 CPU it is 8 though the capability reads AVX512. In any other order the
  bf16 output differs by an ulp now and then, and the logits with it. A second, small probe
  compares each norm with its module (its form), as fused.exact_fast_norm does; one that
  differs, or a width no probe matches, keeps torch's.

Used by lean.py for bfloat16 activations where the extension is built; LLMOS_LAYER_OPS=0 (or
LLMOS_NATIVE=0, no native code at all) turns it off. float32 keeps torch's ops, whose logits
are bit-identical to transformers'.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from llmos.drivers.model import fused, native


def ops_for(dtype: torch.dtype, device: torch.device):
    """The extension with the layer ops, where they serve these activations; else None."""
    raw = os.environ.get("LLMOS_LAYER_OPS", "1").strip()
    if raw not in ("0", "1"):
        raise ValueError(f"LLMOS_LAYER_OPS={raw!r}: use 1 (default) or 0")
    if raw == "0" or dtype != torch.bfloat16 or device.type != "cpu":
        return None
    ext = native.load()
    return ext if ext is not None and hasattr(ext, "rms_norm_bf16") else None


_lanes: dict[int, int | None] = {}


def _torch_lanes(ext, width: int) -> int | None:
    """The vector width (8 or 16 floats) in whose order torch sums rows of this width, found
    by comparing torch's sums of squares with the extension's on heavy-tailed rows; None if
    neither order gives all of them."""
    if width not in _lanes:
        gen = torch.Generator().manual_seed(0)   # not the global RNG: unseeded sampling uses it
        shape = (256, width)
        x = (torch.randn(shape, generator=gen) * torch.exp(2 * torch.randn(shape, generator=gen))).bfloat16()
        want = x.float().pow(2).sum(-1)
        _lanes[width] = next((n for n in (8, 16) if torch.equal(ext.sum_of_squares_bf16(x, n), want)), None)
    return _lanes[width]


class AddNorm:
    """(x + residual, norm of it) in one call; `residual` None: just the norm. May add in place."""

    def __init__(self, norm: Callable, ext=None, weight: torch.Tensor | None = None, eps: float = 0.0,
                 lanes: int = 8):
        self.norm, self.ext, self.weight, self.eps, self.lanes = norm, ext, weight, eps, lanes

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ext is not None and x.is_contiguous():
            return x, self.ext.rms_norm_bf16(x, residual, self.weight, self.eps, self.lanes)
        if residual is not None:
            x = x + residual
        return x, self.norm(x)


def add_norm(module: torch.nn.Module, norm: Callable, ext) -> AddNorm:
    """The native norm where the extension is there and a probe gives exactly `module`'s
    output, else `norm` (the module, or torch's fused kernel) with a plain add."""
    w = getattr(module, "weight", None)
    eps = getattr(module, "eps" if isinstance(module, fused.FastRMSNorm) else "variance_epsilon", None)
    if ext is None or not isinstance(w, torch.Tensor) or w.ndim != 1 or not isinstance(eps, float):
        return AddNorm(norm)
    lanes = _torch_lanes(ext, w.shape[0])
    if lanes is None:
        return AddNorm(norm)
    fast = AddNorm(norm, ext, w.detach().contiguous(), eps, lanes)
    # The summation order was probed once per width (_torch_lanes); this probe is for the
    # module's form (its casts, Gemma's 1 + w, ...), which a few rows show, as in fused.py.
    gen = torch.Generator().manual_seed(0)   # not the global RNG: unseeded sampling uses it
    for rows in (1, 7, 64):
        shape = (rows, w.shape[0])
        x = (torch.randn(shape, generator=gen) * torch.exp(2 * torch.randn(shape, generator=gen))).to(w.dtype)
        r = torch.randn(shape, generator=gen).to(w.dtype)
        with torch.no_grad():
            want = module(x + r)
            got = fast(x.clone(), r)[1]
        if got.shape != want.shape or not torch.equal(got, want):
            return AddNorm(norm)
    return fast


def rotate_(ext, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """qk [T, heads, D] rotated in place (cos, sin [T, D]): transformers' apply_rotary_pos_emb."""
    ext.rotary_bf16_(qk, cos, sin)
    return qk
