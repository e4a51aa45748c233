"""Fewer, bigger ops per decoder layer, inside transformers' own module tree (CPU and GPU).

At smollm2's sizes a decode step is hundreds of small ops, and each op's fixed cost (dispatch,
an oneDNN call, an OpenMP region) is a large part of its time. Two rewrites cut the count
without changing what is computed (docs/model-driver.md has the figures):

- **projections**: q/k/v of an attention module become one linear of the concatenated weights,
  and gate/up of an MLP another; the old modules return slices of its output. A 576 -> 192
  projection costs an oneDNN call nearly as much as a 576 -> 960 one. Done before packing or
  quantizing, so the fused weight is packed (or made 4-bit) like any other linear.
- **norms**: an RMSNorm of the Llama form (`w * (x.float() * rsqrt(mean(x^2) + eps)).to(dtype)`)
  becomes torch's fused `rms_norm` (2 ops instead of 8), but only where a probe gives exactly the
  module's own output: any other form (Gemma's `1 + w`, ...) keeps its module.

`LLMOS_FUSE` names what to do: "projections,norms" (the default), a subset, or "0". Both are
exact in effect: fp32 greedy is unchanged; fused projections are bit-equal to the separate ones
on the Xeon and within 1 ulp on an EPYC, whose MKL blocks a narrow product differently. Alone,
inside transformers' module calls, neither paid on the shared 2-core Xeon; under the lean
forward (lean.py), which rotates the fused q/k in one pass, they do: decode steps 1.26x faster at
batch 1 (int4) and 1.09x at batch 32 on the EPYC (docs/model-driver.md, "Levers tried").
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

KINDS = ("projections", "norms")
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def wanted(env=os.environ) -> set[str]:
    raw = env.get("LLMOS_FUSE", "projections,norms").strip()
    kinds = set() if raw in ("", "0", "none") else {k.strip() for k in raw.split(",") if k.strip()}
    if kinds - set(KINDS):
        raise ValueError(f"LLMOS_FUSE={raw!r}: name some of {', '.join(KINDS)}, or 0")
    return kinds


class FusedLinear(torch.nn.Module):
    """Holds one linear over the concatenated weights of several (`linear`, swapped later for a
    PackedLinear or an Int4Linear like any other). `part(x, i)` is the i-th original linear's
    output: the product is computed once per input tensor and shared by the parts."""

    def __init__(self, linears: list[torch.nn.Linear]):
        super().__init__()
        first = linears[0]
        bias = first.bias is not None
        self.sizes = [lin.out_features for lin in linears]
        self.linear = torch.nn.Linear(first.in_features, sum(self.sizes), bias=bias,
                                      dtype=first.weight.dtype, device=first.weight.device)
        with torch.no_grad():
            self.linear.weight.copy_(torch.cat([lin.weight for lin in linears]))
            if bias:
                self.linear.bias.copy_(torch.cat([lin.bias for lin in linears]))
        self.offsets = [sum(self.sizes[:i]) for i in range(len(linears))]
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._left = 0

    def part(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self._x is not x:   # a new input (or the parts are called on different tensors: still right)
            self._x, self._y, self._left = x, self.linear(x), len(self.sizes)
        y = self._y[..., self.offsets[i]:self.offsets[i] + self.sizes[i]]
        self._left -= 1
        if self._left == 0:    # every part served: hold no activations between calls
            self._x = self._y = None
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # the whole product (for tests)
        return self.linear(x)


class FusedPart(torch.nn.Module):
    """Stands where one of the fused linears was; owns no weights."""

    def __init__(self, fused: FusedLinear, index: int):
        super().__init__()
        self._fused = (fused,)   # a tuple, so that the holder is not a second parent of its linear
        self.index = index
        self.in_features, self.out_features = fused.linear.in_features, fused.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused[0].part(x, self.index)


def fuse_projections(model: torch.nn.Module, accept=None) -> int:
    """Fuse every q/k/v and gate/up group of plain nn.Linear with one input size, the same
    dtype and the same bias kind, and whose every member `accept(linear)` (when given);
    returns how many groups were fused. Call before packing or quantizing."""
    fused = 0
    for parent in list(model.modules()):
        for names in GROUPS:
            linears = [getattr(parent, n, None) for n in names]
            if not all(type(lin) is torch.nn.Linear for lin in linears):
                continue
            if len({(lin.in_features, lin.weight.dtype, lin.weight.device, lin.bias is None)
                    for lin in linears}) != 1:
                continue
            if accept is not None and not all(accept(lin) for lin in linears):
                continue
            holder = FusedLinear(linears)
            parent.add_module("_".join(n.split("_")[0] for n in names) + "_fused", holder)
            for i, n in enumerate(names):
                setattr(parent, n, FusedPart(holder, i))
            fused += 1
    return fused


class FastRMSNorm(torch.nn.Module):
    """An RMSNorm of the Llama form through torch's fused kernel; same weight tensor."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, float(norm.variance_epsilon)
        self.shape = (norm.weight.shape[0],)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        # Other dtypes: HF rounds the normalized x to its dtype before the weight multiplies it.
        return self.weight * F.rms_norm(x, self.shape, None, self.eps)


def _same(a: torch.nn.Module, b: torch.nn.Module, width: int, dtype, device) -> bool:
    gen = torch.Generator().manual_seed(0)   # not the global RNG: unseeded sampling uses it
    for rows in (1, 7, 64):
        x = (torch.randn(1, rows, width, generator=gen) * 3).to(device=device, dtype=dtype)
        if not torch.equal(a(x), b(x)):
            return False
    return True


@torch.inference_mode()
def exact_fast_norm(norm: torch.nn.Module) -> FastRMSNorm | None:
    """A FastRMSNorm in place of `norm` if a probe gives exactly its output, else None."""
    w = getattr(norm, "weight", None)
    if (not isinstance(w, torch.Tensor) or w.ndim != 1
            or not isinstance(getattr(norm, "variance_epsilon", None), float) or list(norm.children())):
        return None
    fast = FastRMSNorm(norm)
    try:
        return fast if _same(norm, fast, w.shape[0], w.dtype, w.device) else None
    except (RuntimeError, TypeError, NotImplementedError):
        return None


def fuse_norms(model: torch.nn.Module) -> int:
    """Swap each RMSNorm (a module with a 1-D `weight` and a float `variance_epsilon`) whose
    output FastRMSNorm reproduces exactly; returns how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            fast = exact_fast_norm(child)
            if fast is not None:
                setattr(parent, name, fast)
                swapped += 1
    return swapped
