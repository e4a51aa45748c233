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
exactly. Activations, norms, embeddings and the KV pool are bf16.

Where the extension is built with AVX-512 VNNI (csrc/quant_gemv.cpp), small steps run its
products instead of torch's int4 kernel, llama.cpp's way: each token's activations are
quantized to 8 bits per group of 32 and each group is one integer dot product. It also
keeps 8-bit weights: a linear that was Q8_0 in the file (smollm2's tied lm_head, 49,152 x
576, the largest read of a token) is held as the file's own 8-bit codes for small steps,
half of bf16's bytes. Other linears stay dense bf16. LLMOS_QUANT_KERNELS=0 keeps torch's
int4 kernel and a bf16 lm_head (to compare).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from llmos.drivers.model import native
from llmos.drivers.model.packed import PackedLinear
from llmos.drivers.model.w8a8 import W8A8Linear

GROUP = 32
SMALL_STEP = 4   # tokens in a step up to which the int4 kernel beats dense bf16 here
# --dtype int8: rows from which the int8 products (w8a8.py) beat the packed bf16 ones with the
# weights read from memory, as a step reads them (1.1-1.2x at 64 rows, 1.4x at 128, AMD EPYC)
INT8_ROWS = 64


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


def quantize_q8_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """w [N, K] fp32 -> codes [N, K] int8 in -127..127 and scales [N, K / GROUP] fp32 (w ~ d q,
    d = max|w| / 127 per group, as Q8_0 makes them), and the share of groups reproduced exactly."""
    n, k = w.shape
    g = w.reshape(n, k // GROUP, GROUP)
    d = g.abs().amax(-1, keepdim=True) / 127
    q = torch.round(g / torch.where(d > 0, d, torch.ones_like(d))).clamp_(-127, 127)
    exact = (q * d == g).all(-1)
    return q.reshape(n, k).to(torch.int8), d.squeeze(-1).contiguous(), exact.float().mean().item()


def kernels():
    """The extension's quantized products where they run fast here (AVX-512 VNNI), else None."""
    raw = os.environ.get("LLMOS_QUANT_KERNELS", "1").strip()
    if raw not in ("0", "1"):
        raise ValueError(f"LLMOS_QUANT_KERNELS={raw!r}: use 1 (default) or 0")
    ext = native.load() if raw == "1" else None
    return ext if ext is not None and hasattr(ext, "quant_vnni") and ext.quant_vnni() else None


def _even_groups(t: torch.Tensor) -> torch.Tensor:
    """[N, G] -> [N, G rounded up to even], the added group zero (the kernel works in pairs)."""
    return F.pad(t, (0, t.shape[1] % 2)).contiguous()


def pack_q4(q: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in 0..15 -> [N, pairs * 32] uint8: byte j of a pair holds the first group's
    q[j] (low nibble) and the second's (high), as csrc/quant_gemv.cpp reads them."""
    n, k = q.shape
    g = F.pad(q, (0, (k // GROUP) % 2 * GROUP)).reshape(n, -1, 2, GROUP).to(torch.uint8)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, -1).contiguous()


def pack_q8(q: torch.Tensor) -> torch.Tensor:
    """codes [N, K] int8 -> [N, pairs * 64] uint8 holding q + 128."""
    k = q.shape[1]
    return (F.pad(q.to(torch.int32), (0, (k // GROUP) % 2 * GROUP)) + 128).to(torch.uint8).contiguous()


MAX_INPUTS = 32768   # csrc/quant_gemv.cpp stages a row's scales on the stack


def supported(linear: torch.nn.Linear) -> bool:
    return linear.in_features % GROUP == 0 and linear.out_features % 16 == 0 and linear.in_features <= MAX_INPUTS


class _SmallStepLinear(torch.nn.Module):
    """What both quantized linears share: steps of more than SMALL_STEP rows go to the dense
    bf16 copy (oneDNN wins there), or from INT8_ROWS on to the int8 one where --dtype int8
    made it; smaller ones to the subclass's `small` product. (`dense_int8` is set in each
    __init__, not on the class: a class attribute would hide the submodule nn.Module keeps.)"""

    def nbytes(self) -> int:
        return _nbytes(self)

    def small(self, flat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] >= INT8_ROWS and self.dense_int8 is not None:
            return self.dense_int8(x)
        if flat.shape[0] > SMALL_STEP:
            return self.dense(x)
        return self.small(flat).view(*x.shape[:-1], self.out_features)


class Int4Linear(_SmallStepLinear):
    """nn.Linear over 4-bit weights: the int4 kernel for small steps, a dense bf16 copy of the
    same dequantized weights (oneDNN, pre-packed) for big ones."""

    def __init__(self, linear: torch.nn.Linear, dense_hint: int = 32, int8_dense: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale, zero, self.exact_share = quantize_groups(linear.weight.detach().float())
        self.ext = kernels()
        if self.ext is not None:   # w = d q + m with the file's float16 d and m
            groups = q.shape[1] // GROUP
            self.codes = pack_q4(q)
            self.d, self.m = _even_groups(scale.t().half()), _even_groups((zero - 8 * scale).t().half())
            w = q.float() * self.d[:, :groups].float().repeat_interleave(GROUP, 1) + \
                self.m[:, :groups].float().repeat_interleave(GROUP, 1)
        else:                      # torch's int4 kernel: scales and zeros in bf16
            self.codes = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            self.scales_zeros = torch.stack([scale, zero], -1).to(torch.bfloat16)
            s, z = (self.scales_zeros[..., i].float().t().repeat_interleave(GROUP, 1) for i in (0, 1))
            w = (q.float() - 8) * s + z
        self.dense = _dense(w, linear.bias, dense_hint)   # what the small-step kernel computes with
        self.dense_int8 = W8A8Linear(w, linear.bias, native.load()) if int8_dense else None
        self.bias = self.dense.bias
        self.bias_f32 = None if self.bias is None else self.bias.float()   # as the native kernel adds it

    def small(self, flat: torch.Tensor) -> torch.Tensor:
        if self.ext is not None:
            return self.ext.q4_linear(flat, self.codes, self.d, self.m, self.bias_f32)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), self.codes, GROUP, self.scales_zeros)
        return y if self.bias is None else y + self.bias


class Int8Linear(_SmallStepLinear):
    """nn.Linear over the file's Q8_0 weights (w = d q per group of 32): the native kernel for
    small steps, a dense bf16 copy of the same weights for big ones. Only built where
    `kernels()` has the native products."""

    def __init__(self, linear: torch.nn.Linear, ext, dense_hint: int = 32):
        super().__init__()
        self.in_features, self.out_features, self.ext = linear.in_features, linear.out_features, ext
        q, d, self.exact_share = quantize_q8_groups(linear.weight.detach().float())
        self.codes, self.d = pack_q8(q), _even_groups(d.half())   # Q8_0's scales are float16
        self.dense = _dense(q.float() * d.half().float().repeat_interleave(GROUP, 1), linear.bias, dense_hint)
        self.dense_int8 = None
        self.bias = self.dense.bias
        self.bias_f32 = None if self.bias is None else self.bias.float()

    def small(self, flat: torch.Tensor) -> torch.Tensor:
        return self.ext.q8_linear(flat, self.codes, self.d, None, self.bias_f32)


def _nbytes(layer) -> int:
    """What a quantized linear holds: its codes and scales, and its dense copy."""
    held = [getattr(layer, a, None) for a in ("codes", "d", "m", "scales_zeros", "bias")]
    int8 = 0 if layer.dense_int8 is None else layer.dense_int8.nbytes()
    return sum(t.numel() * t.element_size() for t in held if t is not None) + layer.in_features * layer.out_features * 2 + int8


def _dense(w: torch.Tensor, bias: torch.Tensor | None, hint: int) -> PackedLinear:
    """A packed bf16 linear holding these (dequantized) weights."""
    dense = torch.nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=torch.bfloat16)
    with torch.no_grad():
        dense.weight.copy_(w)
        if bias is not None:
            dense.bias.copy_(bias)
    return PackedLinear(dense, hint)


def was_4bit(linear: torch.nn.Linear, min_exact: float = 0.99) -> bool:
    """Whether quantize_linears would make this linear 4-bit (its weights were 4-bit already)."""
    return supported(linear) and quantize_groups(linear.weight.detach().float())[3] >= min_exact


def quantize_linears(model: torch.nn.Module, min_exact: float = 0.99, int8_dense: bool = False) -> tuple[int, float]:
    """Swap each supported nn.Linear whose weights were 4-bit already (at least `min_exact` of
    its groups come back exactly) for an Int4Linear; one whose weights were 8-bit groups
    (smollm2's tied lm_head, which the GGUF keeps as Q8_0) for an Int8Linear where the native
    kernels run; the others stay dense bf16: int4 never loses what the file had.
    With `int8_dense` (--dtype int8) the 4-bit linears also hold an int8 copy, for steps of
    INT8_ROWS rows or more (w8a8.py). Returns (how many were made 4-bit, the share of their groups
    that were exact)."""
    swapped, exact, ext = 0, 0.0, kernels()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            layer = Int4Linear(child, int8_dense=int8_dense) if supported(child) else None
            if layer is not None and layer.exact_share >= min_exact:
                setattr(parent, name, layer)
                swapped, exact = swapped + 1, exact + layer.exact_share
                continue
            # (no int8 copy: the lm_head only sees the rows sampled, as many as the sequences)
            eight = Int8Linear(child, ext) if ext is not None and child.in_features % GROUP == 0 \
                and child.in_features <= MAX_INPUTS else None
            if eight is not None and eight.exact_share >= min_exact:
                setattr(parent, name, eight)
            else:
                setattr(parent, name, PackedLinear(child.to(torch.bfloat16), 32))
    return swapped, (exact / swapped if swapped else 0.0)
