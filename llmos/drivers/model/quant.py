"""4-bit weights for the CPU (`--dtype int4`): one stream reads a quarter of bf16's bytes.

One decode token must read every weight once, so at batch 1 the linears run at the speed
of memory (docs/model-driver.md). Each nn.Linear's weight is held in groups of 32 along
its input, w = (q - 8) * s + z with q in 0..15, in torch's packed int4 layout, and
multiplied by `aten._weight_int4pack_mm_for_cpu` for steps of up to SMALL_STEP tokens.
That kernel is much slower than oneDNN for bigger steps, so each layer also keeps a dense
bf16 copy of the *same dequantized weights* for those: both paths compute with the
4-bit weights, whatever the batch.

The GGUF we ship is Q4_1 (groups of 32 along the input, w = d q + m, q = 0 at the group's
minimum and 15 at its maximum), so quantizing its dequantized weights by each group's
min/max recovers its own 4-bit codes: `exact_share` reports how many groups came back
exactly. A linear whose weights were not 4-bit in the file stays dense bf16. Activations,
norms, embeddings and the KV pool are bf16.
"""
from __future__ import annotations

import torch

from llmos.drivers.model.packed import PackedLinear

GROUP = 32
SMALL_STEP = 4   # tokens in a step up to which the int4 kernel beats dense bf16 here


def quantize_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """w [N, K] fp32 -> codes [N, K] int32 in 0..15, scales and zeros [K / GROUP, N] fp32
    (w ~ (q - 8) * s + z), and the share of groups reproduced exactly (to fp32 rounding)."""
    n, k = w.shape
    g = w.reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round((g - lo) / safe).clamp_(0, 15)
    back = q * d + lo
    exact = ((back - g).abs() <= 1e-6 * g.abs().amax(-1, keepdim=True).clamp(min=1e-30)).all(-1)
    scale, zero = d.squeeze(-1), (lo + 8 * d).squeeze(-1)
    return q.reshape(n, k).to(torch.int32), scale.t().contiguous(), zero.t().contiguous(), exact.float().mean().item()


def supported(linear: torch.nn.Linear) -> bool:
    return linear.in_features % GROUP == 0 and linear.out_features % 16 == 0


class Int4Linear(torch.nn.Module):
    """nn.Linear over 4-bit weights: the int4 kernel for small steps, a dense bf16 copy of the
    same dequantized weights (oneDNN, pre-packed) for big ones."""

    def __init__(self, linear: torch.nn.Linear, dense_hint: int = 32):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale, zero, self.exact_share = quantize_groups(linear.weight.detach().float())
        self.codes = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.scales_zeros = torch.stack([scale, zero], -1).to(torch.bfloat16)
        s, z = (self.scales_zeros[..., i].float().t().repeat_interleave(GROUP, 1) for i in (0, 1))
        dense = torch.nn.Linear(self.in_features, self.out_features, bias=linear.bias is not None,
                                dtype=torch.bfloat16)
        with torch.no_grad():
            dense.weight.copy_((q.float() - 8) * s + z)   # what the int4 kernel computes with
            if linear.bias is not None:
                dense.bias.copy_(linear.bias)
        self.dense = PackedLinear(dense, dense_hint)
        self.bias = self.dense.bias

    def nbytes(self) -> int:
        extra = 0 if self.bias is None else self.bias.numel() * 2
        return self.codes.numel() + self.scales_zeros.numel() * 2 + self.in_features * self.out_features * 2 + extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] > SMALL_STEP:
            return self.dense(x)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), self.codes, GROUP, self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def was_4bit(linear: torch.nn.Linear, min_exact: float = 0.99) -> bool:
    """Whether quantize_linears would make this linear 4-bit (its weights were 4-bit already)."""
    return supported(linear) and quantize_groups(linear.weight.detach().float())[3] >= min_exact


def quantize_linears(model: torch.nn.Module, min_exact: float = 0.99) -> tuple[int, float]:
    """Swap each supported nn.Linear whose weights were 4-bit already (at least `min_exact` of
    its groups come back exactly) for an Int4Linear; the others (smollm2's tied lm_head, which
    the GGUF keeps at higher precision) stay dense bf16: int4 never loses what the file had.
    Returns (how many were swapped, the share of their groups that were exact)."""
    swapped, exact = 0, 0.0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            layer = Int4Linear(child) if supported(child) else None
            if layer is not None and layer.exact_share >= min_exact:
                setattr(parent, name, layer)
                swapped, exact = swapped + 1, exact + layer.exact_share
            else:
                setattr(parent, name, PackedLinear(child.to(torch.bfloat16), 32))
    return swapped, (exact / swapped if swapped else 0.0)
