"""Decode attention backends: one query token per sequence, its context in the paged pool.

The attention function (paged_attention.py) hands every single-token sequence of a step
to one backend. Each reads the same thing, one layer of the kernel's pool as
[num_blocks, block_size, KVH, D] plus a block table and a context length per sequence,
and returns [Nd, H, D]. Choose with LLMOS_DECODE_BACKEND (default "auto"):

- "native": our C++ kernel (csrc/paged_decode.cpp) reads context rows in place from
  their blocks, on all the model's threads. CPU: 3.8-4.4x faster than gather per layer at
  every batch and context measured, 1.4x on a whole decode step of 32 streams at 100
  tokens and 3.8x at 2,000 (docs/model-driver.md).
- "flashinfer": FlashInfer's paged decode on CUDA, which reads the same layout in place.
- "gather": pure torch, anywhere: index_select the context blocks into a padded buffer,
  then one SDPA with an additive mask. The fallback, and the reference in the tests.

"auto" takes flashinfer on CUDA where installed, native on the CPU where the C++ kernels
built, else gather.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from llmos.drivers.model import native as native_ext

log = logging.getLogger("llmos.model")
BACKENDS = ("auto", "native", "flashinfer", "gather")


def gather(step, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Nd, H, D] -> [Nd, H, D]. GQA without repeating k/v: the G query heads sharing a
    kv head become G query rows of that head."""
    pool, Nd, H, D = step.pool, q.shape[0], q.shape[1], q.shape[2]
    KVH = pool.msg.num_kv_heads
    kb, vb = pool.blocks(layer)
    flat = step.dec_tables.reshape(-1)
    rows = flat.numel()
    k = torch.index_select(kb, 0, flat, out=pool.workspace("k", rows * kb.shape[1]).view(rows, -1))
    v = torch.index_select(vb, 0, flat, out=pool.workspace("v", rows * vb.shape[1]).view(rows, -1))
    k = k.view(Nd, -1, KVH, D).transpose(1, 2)  # [Nd, KVH, L, D]
    v = v.view(Nd, -1, KVH, D).transpose(1, 2)
    qg = q.reshape(Nd, KVH, H // KVH, D).to(k.dtype)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=step.decode_mask(), scale=scale)
    return o.reshape(Nd, H, D)


def native(step, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
    k, v = step.pool.block_rows(layer)
    return native_ext.load().paged_decode(q, k, v, step.dec_tables, step.dec_ctx, scale)   # (load() is cached)


def flashinfer(step, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
    """FlashInfer's batch decode over the pool's NHD pages, planned once per step (the plan
    is shared by every layer). Written for a GPU workstation; tests/test_gpu.py runs it there."""
    wrapper = step.backend_state.get("flashinfer")
    if wrapper is None:
        wrapper = step.backend_state["flashinfer"] = _flashinfer_plan(step, q, scale)
    k, v = step.pool.block_rows(layer)
    return wrapper.run(q.to(k.dtype).contiguous(), (k, v))


def _flashinfer_plan(step, q: torch.Tensor, scale: float):
    import flashinfer

    pool, dev = step.pool, q.device
    bs, tables, ctx = pool.block_size, step.dec_tables, step.dec_ctx
    pages = (ctx + bs - 1) // bs                                   # pages each sequence uses
    keep = torch.arange(tables.shape[1], device=dev)[None, :] < pages[:, None]
    indptr = torch.zeros(len(ctx) + 1, dtype=torch.int32, device=dev)
    indptr[1:] = torch.cumsum(pages, 0)
    ws = pool.workspace_bytes("flashinfer", 128 << 20)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, kv_layout="NHD")
    wrapper.plan(indptr, tables[keep].to(torch.int32), (ctx - (pages - 1) * bs).to(torch.int32),
                 q.shape[1], pool.msg.num_kv_heads, q.shape[2], bs, q_data_type=pool.dtype,
                 kv_data_type=pool.dtype, sm_scale=scale)
    return wrapper


_IMPLS = {"gather": gather, "native": native, "flashinfer": flashinfer}


def choose(device: torch.device) -> str:
    """The backend name for a model on `device` (LLMOS_DECODE_BACKEND, else what works here)."""
    want = os.environ.get("LLMOS_DECODE_BACKEND", "auto")
    if want not in BACKENDS:
        raise ValueError(f"LLMOS_DECODE_BACKEND={want!r}: choose one of {', '.join(BACKENDS)}")
    if want == "auto":
        if device.type == "cuda":
            try:
                import flashinfer  # noqa: F401
                return "flashinfer"
            except ImportError:
                log.warning("flashinfer is not installed: CUDA decode attention gathers its blocks (slower)")
            return "gather"
        return "native" if device.type == "cpu" and native_ext.load() is not None else "gather"
    if want == "native" and device.type != "cpu":
        raise ValueError("the native decode backend runs on the CPU only")
    if want == "native":
        if native_ext.load() is None:
            raise RuntimeError("LLMOS_DECODE_BACKEND=native but the C++ kernels did not build (see the log)")
    return want


def get(name: str):
    return _IMPLS[name]
