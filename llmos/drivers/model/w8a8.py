"""Linears in int8 arithmetic for steps of many tokens (`--dtype int8`, CPU, opt-in).

A 4-bit model's big steps (prefills, mostly) run a dense copy of its weights; there the
products are bound by arithmetic, not memory, and oneDNN's int8 GEMM (VNNI, torch._int_mm)
does more work a cycle than its bf16 one: on smollm2's shapes, weights read from memory as a
step reads them, 1.1-1.2x at 64 rows, ~1.4x at 128 and up to ~1.9x at 1,024 (AMD EPYC; below
~48 rows it loses, since it reads the plain int8 weights where the bf16 ones are pre-packed).
So `--dtype int8` is int4 plus an int8 copy per linear (w = s_n q, q in -127..127, per output
row) that steps of quant.INT8_ROWS tokens or more use, each token's activations quantized to
int8 as they arrive (csrc/w8a8.cpp). Both roundings cost agreement with fp32
(benchmarks/quantized_quality.py measures it): hence opt-in.
"""
from __future__ import annotations

import torch


class W8A8Linear(torch.nn.Module):
    """y = x W^T + b with W int8 per output row and x quantized per row on the fly."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None, ext):
        super().__init__()
        self.out_features, self.in_features = w.shape
        w = w.detach().float()
        scale = w.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        # [K, N], the transpose of a contiguous [N, K]: the layout oneDNN's int8 GEMM reads fastest
        self.wq = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).t()
        self.w_scale = scale.contiguous()
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)
        self.bias_f32 = None if bias is None else bias.detach().float().contiguous()
        self.ext = ext

    def nbytes(self) -> int:
        return self.wq.numel() + 4 * self.w_scale.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        return self.ext.w8a8_linear(flat, self.wq, self.w_scale, self.bias_f32).view(*x.shape[:-1], self.out_features)
