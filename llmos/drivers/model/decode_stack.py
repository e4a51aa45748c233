"""When a decode step's layers may run as one native call (csrc/decode_stack.cpp).

lean.py's loop makes ~15 Python-level calls a layer around the kernels (the products, the
norms, the rotary embedding, the paged attention), each with its argument parsing, views and
dispatch: a third of a one-stream 4-bit step, ~1.7 ms of a batch-32 one. decode_stack.cpp runs
the same loop in C++: the same functions on the same tensors in the same order, so the same
bits. It serves only the steps that path covers exactly:

- the model: every layer with native norms of one eps and summation width, fused q/k/v and
  gate/up, and each of the four products either 4-bit with the native kernel
  (quant.Int4Linear with `ext`, which also holds a packed bf16 copy, and with --dtype int8 an
  int8 one for steps of quant.INT8_ROWS tokens or more: w8a8.W8A8Linear) or packed bf16
  (packed.PackedLinear);
- the step: all decoding (no prefill), through the native paged-decode backend, bf16
  activations. Up to quant.SMALL_STEP tokens a 4-bit model takes its 4-bit products, as
  Int4Linear does; bigger steps, and every step of a bf16 model, the packed ones.

Anything else takes lean.py's loop. LLMOS_DECODE_STACK=0 turns it off.
"""
from __future__ import annotations

import os

import torch

from llmos.drivers.model import quant
from llmos.drivers.model.packed import PackedLinear
from llmos.drivers.model.w8a8 import W8A8Linear


def wanted(env=os.environ) -> bool:
    raw = env.get("LLMOS_DECODE_STACK", "1").strip()
    if raw not in ("0", "1"):
        raise ValueError(f"LLMOS_DECODE_STACK={raw!r}: use 1 (default) or 0")
    return raw == "1"


def _module(fn, cls, method):
    """The module of class `cls` whose bound `method` lean's callable is, or None."""
    module = getattr(fn, "__self__", None)
    return module if isinstance(module, cls) and getattr(fn, "__func__", None) is method else None


def _int4(fn) -> quant.Int4Linear | None:
    module = _module(fn, quant.Int4Linear, quant.Int4Linear.forward)
    return module if module is not None and module.ext is not None else None


def _packed(fn) -> PackedLinear | None:
    """The packed bf16 linear that computes lean's callable for steps past SMALL_STEP, or None."""
    four = _module(fn, quant.Int4Linear, quant.Int4Linear.forward)
    if four is not None:
        return four.dense if type(four.dense) is PackedLinear else None
    return _module(fn, PackedLinear, PackedLinear.forward)


def _w8a8(fn) -> W8A8Linear | None:
    """The int8 linear (--dtype int8) that computes lean's callable from INT8_ROWS rows, or None."""
    four = _module(fn, quant.Int4Linear, quant.Int4Linear.forward)
    return None if four is None else four.dense_int8


class DecodeStack:
    """Holds the layers' weights as the native call takes them; `__call__` runs them."""

    def __init__(self, ext, layers: list, heads: int, kv_heads: int, head_dim: int, scale: float):
        self.ext, self.H, self.KVH, self.D, self.scale = ext, heads, kv_heads, head_dim, scale
        norm = layers[0].norm1
        self.eps, self.lanes = norm.eps, norm.lanes
        self.norms, self.products, self.biases, self.packed, self.packed_biases = [], [], [], [], []
        self.int8_w, self.int8_scales, self.int8_biases = [], [], []   # --dtype int8, from INT8_ROWS
        fns = [fn for L in layers for fn in (L.qkv, L.o, L.gate_up, L.down)]
        self.four_bit = all(_int4(fn) is not None for fn in fns)      # small steps: the 4-bit products
        self.dense = all(_packed(fn) is not None for fn in fns)       # others: the packed ones
        self.int8 = self.dense and all(_w8a8(fn) is not None for fn in fns)   # or from INT8_ROWS the int8 ones
        for L in layers:
            self.norms += [L.norm1.weight, L.norm2.weight]
        for fn in fns:
            if self.four_bit:
                lin = _int4(fn)
                self.products += [lin.codes, lin.d, lin.m]
                self.biases.append(lin.bias_f32)
            if self.int8:
                lin = _w8a8(fn)
                self.int8_w.append(lin.wq)
                self.int8_scales.append(lin.w_scale)
                self.int8_biases.append(lin.bias_f32)
            if self.dense:
                lin = _packed(fn)
                self.packed.append(lin.packed)
                self.packed_biases.append(lin.bias)
        self._pool_of: tuple[object, list[torch.Tensor]] | None = None

    def _small(self, T: int) -> bool:
        return self.four_bit and T <= quant.SMALL_STEP

    def serves(self, step, x: torch.Tensor) -> bool:
        T = x.shape[0]
        return ((self._small(T) or self.dense) and step.num_decodes == T and not step.prefills
                and step.dec_idx is None and step.backend == "native" and x.dtype == torch.bfloat16
                and x.is_contiguous())

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step) -> torch.Tensor:
        T = x.shape[0]
        int8 = self.int8 and T >= quant.INT8_ROWS   # the int8 products take the packed ones' places
        return self.ext.decode_stack(x, cos, sin, self.norms, self.products, self.biases,
                                     self.int8_w if int8 else self.packed,
                                     self.int8_biases if int8 else self.packed_biases,
                                     self.int8_scales if int8 else [], not self._small(T), self._pool(step.pool),
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
        if L.qkv is None or L.gate_up is None:
            return None
    stack = DecodeStack(ext, layers, heads, kv_heads, head_dim, scale)
    return stack if stack.four_bit or stack.dense else None
