"""When a decode step's layers may run as one native call (csrc/decode_stack.cpp).

At one stream of 4-bit weights, lean.py's loop makes ~15 Python-level calls a layer around
the kernels (the products, the norms, the rotary embedding, the paged attention), each with
its argument parsing, views and dispatch. decode_stack.cpp runs the same loop in C++: the same
functions on the same tensors in the same order, so the same bits. It serves only the steps
that path covers exactly:

- the model: every layer with native norms of one eps and summation width, fused q/k/v and
  gate/up, and all four products 4-bit with the native kernel (quant.Int4Linear with `ext`);
- the step: up to quant.SMALL_STEP tokens (above it the products take the dense copy), all
  decoding (no prefill), through the native paged-decode backend, bf16 activations.

Anything else takes lean.py's loop. LLMOS_DECODE_STACK=0 turns it off.
"""
from __future__ import annotations

import os

import torch

from llmos.drivers.model import quant


def wanted(env=os.environ) -> bool:
    raw = env.get("LLMOS_DECODE_STACK", "1").strip()
    if raw not in ("0", "1"):
        raise ValueError(f"LLMOS_DECODE_STACK={raw!r}: use 1 (default) or 0")
    return raw == "1"


def _int4(fn) -> quant.Int4Linear | None:
    """The native 4-bit linear behind lean's callable, or None."""
    module = getattr(fn, "__self__", None)
    ok = isinstance(module, quant.Int4Linear) and module.ext is not None and getattr(fn, "__func__", None) is \
        quant.Int4Linear.forward
    return module if ok else None


class DecodeStack:
    """Holds the layers' weights as the native call takes them; `__call__` runs them."""

    def __init__(self, ext, layers: list, heads: int, kv_heads: int, head_dim: int, scale: float):
        self.ext, self.H, self.KVH, self.D, self.scale = ext, heads, kv_heads, head_dim, scale
        norm = layers[0].norm1
        self.eps, self.lanes = norm.eps, norm.lanes
        self.norms, self.products, self.biases = [], [], []
        for L in layers:
            self.norms += [L.norm1.weight, L.norm2.weight]
            for fn in (L.qkv, L.o, L.gate_up, L.down):
                lin = _int4(fn)
                self.products += [lin.codes, lin.d, lin.m]
                self.biases.append(lin.bias_f32)
        self._pool_of: tuple[object, list[torch.Tensor]] | None = None

    def serves(self, step, x: torch.Tensor) -> bool:
        T = x.shape[0]
        return (T <= quant.SMALL_STEP and step.num_decodes == T and not step.prefills and step.dec_idx is None
                and step.backend == "native" and x.dtype == torch.bfloat16 and x.is_contiguous())

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step) -> torch.Tensor:
        return self.ext.decode_stack(x, cos, sin, self.norms, self.products, self.biases, self._pool(step.pool),
                                     step.slots, step.dec_tables, step.dec_ctx, self.H, self.KVH, self.D,
                                     self.eps, self.lanes, self.scale)

    def _pool(self, pool) -> list[torch.Tensor]:
        if self._pool_of is None or self._pool_of[0] is not pool:   # a pool is mapped once, but may be remapped
            views = []
            for i in range(len(self.norms) // 2):
                views += [*pool.slots(i), *pool.block_rows(i)]
            self._pool_of = (pool, views)
        return self._pool_of[1]


def build(ext, layers: list, heads: int, kv_heads: int, head_dim: int, scale: float) -> DecodeStack | None:
    """The stack for these lean layers, or None where decode_stack.cpp does not compute exactly
    what lean.py's loop does (see the module docstring)."""
    if not wanted() or ext is None or not hasattr(ext, "decode_stack") or not layers:
        return None
    first = layers[0].norm1
    for L in layers:
        for norm in (L.norm1, L.norm2):
            if norm.ext is None or norm.eps != first.eps or norm.lanes != first.lanes:
                return None
        if L.qkv is None or L.gate_up is None or any(_int4(fn) is None for fn in (L.qkv, L.o, L.gate_up, L.down)):
            return None
    return DecodeStack(ext, layers, heads, kv_heads, head_dim, scale)
