"""Attention over the kernel's paged KV pool, plugged into transformers' own model classes.

We register one function in transformers' AttentionInterface ("llmos_paged"). Every
attention module of a transformers model (Llama, Qwen2, Mistral, ...) computes q/k/v,
applies its rotary embedding and then calls us with query [1, H, T, D] and key/value
[1, KVH, T, D] of the new tokens of a *packed* batch (all sequences back to back).
We write k/v into the pool, then attend each sequence over its context read back
from the pool. The per-step metadata (`PagedStep`) arrives as the forward kwarg
`llmos_step`, which transformers passes untouched down to the attention interface.

No mask function is registered on purpose: for an implementation that AttentionMaskInterface
does not know, `create_causal_mask` returns None instead of building a dense mask.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from llmos import protocol
from llmos.drivers.model import decode_backends
from llmos.drivers.model import native as native_ext

ATTN_IMPLEMENTATION = "llmos_paged"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class KVPool:
    """The driver's view of the kernel-owned pool (MapKVPool). The driver maps it and
    reads/writes the blocks of the plan it executes; it never creates, resizes or unlinks it."""

    def __init__(self, msg: protocol.MapKVPool, tensor: torch.Tensor | None = None):
        """Map `msg.path` (CPU) or the kernel's CUDA allocation by its IPC handle (GPU), or
        adopt `tensor`, a pool already opened by the caller (tests)."""
        if msg.dtype not in TORCH_DTYPES:
            raise ValueError(f"KV pool dtype {msg.dtype!r} not supported")
        self.msg, self.dtype = msg, TORCH_DTYPES[msg.dtype]
        self.num_blocks, self.block_size = msg.num_blocks, msg.block_size
        shape = (msg.num_layers, 2, msg.num_blocks, msg.block_size, msg.num_kv_heads, msg.head_dim)
        numel = int(np.prod(shape))
        if tensor is not None:
            if tuple(tensor.shape) != shape or tensor.dtype != self.dtype or not tensor.is_contiguous():
                raise ValueError(f"KV pool tensor {tuple(tensor.shape)} {tensor.dtype}, expected {shape} {self.dtype}")
            self.kv = tensor
        elif msg.device.startswith("cuda"):
            if not msg.cuda_ipc:
                raise ValueError("a CUDA KV pool needs MapKVPool.cuda_ipc (the kernel's IPC handle)")
            self.kv = open_cuda_ipc(msg.cuda_ipc, shape, self.dtype)
        elif msg.device != "cpu":
            raise ValueError(f"KV pool device {msg.device!r} not supported")
        else:
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            size = os.stat(msg.path).st_size  # FileNotFoundError: the kernel must create it first
            if size < numel * itemsize:
                raise ValueError(f"KV pool file {msg.path} has {size} bytes, layout needs {numel * itemsize}")
            # shared=True: writes reach the kernel's memory, so a restarted driver finds the KV there.
            self.kv = torch.from_file(msg.path, shared=True, size=numel, dtype=self.dtype).view(shape)
        # Each layer's views made once: a step asks for them ~10 times a layer, and every
        # index into a tensor is an aten op (~1 us each, ~0.3 ms a step at one stream).
        slots = self.kv.view(msg.num_layers, 2, -1, msg.num_kv_heads, msg.head_dim)
        blocks = self.kv.view(msg.num_layers, 2, msg.num_blocks, -1)
        self._slots = [(slots[i, 0], slots[i, 1]) for i in range(msg.num_layers)]
        self._blocks = [(blocks[i, 0], blocks[i, 1]) for i in range(msg.num_layers)]
        self._rows = [(self.kv[i, 0], self.kv[i, 1]) for i in range(msg.num_layers)]
        self._ws: dict[str, torch.Tensor] = {}

    def slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of one layer as [num_blocks * block_size, KVH, D] (row = slot)."""
        return self._slots[layer]

    def blocks(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of one layer as [num_blocks, block_size * KVH * D] (row = block)."""
        return self._blocks[layer]

    def block_rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v of one layer as [num_blocks, block_size, KVH, D] (what the decode backends read)."""
        return self._rows[layer]

    def workspace(self, name: str, numel: int) -> torch.Tensor:
        # Gathers write into reused buffers: a fresh multi-MB tensor per layer costs page faults.
        buf = self._ws.get(name)
        if buf is None or buf.numel() < numel:
            buf = self._ws[name] = torch.empty(max(numel, 1 << 16), dtype=self.dtype, device=self.kv.device)
        return buf[:numel]

    def workspace_bytes(self, name: str, nbytes: int) -> torch.Tensor:
        buf = self._ws.get(name)
        if buf is None or buf.numel() < nbytes:
            buf = self._ws[name] = torch.empty(nbytes, dtype=torch.uint8, device=self.kv.device)
        return buf


def open_cuda_ipc(handle: list, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The kernel's pool tensor from its CUDA IPC handle: the 8 fields of
    torch.UntypedStorage._share_cuda_ (kernel/mem/cuda_pool.py), rebuilt the way
    torch.multiprocessing rebuilds a shared CUDA tensor. The memory stays the kernel's."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if not isinstance(handle, (list, tuple)) or len(handle) != 8:
        raise ValueError("MapKVPool.cuda_ipc must hold the 8 fields of a CUDA IPC handle")
    strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
    t = rebuild_cuda_tensor(torch.Tensor, torch.Size(shape), strides, 0, torch.storage.TypedStorage, dtype,
                            *handle[:4], False, *handle[4:])
    if t.untyped_storage().nbytes() < t.numel() * t.element_size():
        raise ValueError("the CUDA pool is smaller than its layout")
    return t


@dataclass
class _Prefill:
    q0: int                          # first packed index of the sequence's new tokens
    q1: int
    start: int                       # position of the first new token
    blocks: torch.Tensor | None      # context blocks to gather (start > 0 only)
    mask: torch.Tensor | None        # [n, start + n] bool, True = may attend (start > 0 only)


@dataclass
class PagedStep:
    """Everything the attention function needs for one packed step; built once, used by every layer."""
    pool: KVPool
    slots: torch.Tensor                      # [T] pool slot of each new token
    dec_idx: torch.Tensor | None             # [Nd] packed index of each single-token sequence; None: all are
    dec_tables: torch.Tensor | None          # [Nd, MB] int64 blocks of the decode contexts, padded with block 0
    dec_ctx: torch.Tensor | None             # [Nd] int64 context length of each (its new token included)
    prefills: list[_Prefill] = field(default_factory=list)
    backend: str = "gather"                  # decode_backends name
    backend_state: dict = field(default_factory=dict)   # what a backend plans once per step (its mask, ...)
    prefill_geom: tuple | None = None        # (tables [P, MB], q0, lens, starts [P]) int64 CPU, for paged_prefill

    @property
    def num_decodes(self) -> int:
        return 0 if self.dec_ctx is None else self.dec_ctx.shape[0]

    def decode_mask(self) -> torch.Tensor:
        """[Nd, 1, 1, MB * block_size] additive, in the pool dtype: 0 in context, -inf beyond
        (a bool mask would be converted by SDPA in every layer)."""
        mask = self.backend_state.get("mask")
        if mask is None:
            width = self.dec_tables.shape[1] * self.pool.block_size
            outside = torch.arange(width, device=self.dec_ctx.device)[None, :] >= self.dec_ctx[:, None]
            mask = torch.zeros(outside.shape, dtype=self.pool.dtype, device=outside.device)
            mask = self.backend_state["mask"] = mask.masked_fill_(outside, float("-inf"))[:, None, None, :]
        return mask


def plan_step(pool: KVPool, num_new: np.ndarray, start_pos: np.ndarray, block_tables: np.ndarray,
              device: torch.device | str = "cpu", backend: str = "gather") -> tuple[PagedStep, np.ndarray]:
    """Turn a StepPlan's geometry into a PagedStep and the packed position of every new token.
    Inputs are assumed validated (see runner.check_plan)."""
    bs = pool.block_size
    num_new = num_new.astype(np.int64)
    start_pos = start_pos.astype(np.int64)
    n = len(num_new)
    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(num_new, out=cu[1:])
    seq_of = np.repeat(np.arange(n), num_new)
    pos = start_pos[seq_of] + np.arange(cu[-1]) - cu[seq_of]
    slots = block_tables[seq_of, pos // bs].astype(np.int64) * bs + pos % bs
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731

    dec = num_new == 1
    dec_idx = dec_tables = dec_ctx = None
    if dec.any():
        ctx = start_pos[dec] + 1
        mb = int(-(-ctx.max() // bs))
        dec_tables = as_t(np.maximum(block_tables[dec, :mb], 0).astype(np.int64))  # -1 padding -> block 0
        dec_ctx = as_t(ctx)
        if not dec.all():
            dec_idx = as_t(cu[:-1][dec])
    prefills = []
    for i in np.flatnonzero(~dec):
        s, m = int(start_pos[i]), int(num_new[i])
        blocks = mask = None
        if s > 0:  # chunked prefill: earlier KV is in the pool
            blocks = as_t(block_tables[i, : -(-(s + m) // bs)].astype(np.int64))
            k = torch.arange(s + m, device=device)
            mask = k[None, :] <= (s + torch.arange(m, device=device))[:, None]
        prefills.append(_Prefill(int(cu[i]), int(cu[i + 1]), s, blocks, mask))
    geom = None
    if prefills and backend == "native" and _prefill_kernel_on():
        pre = np.flatnonzero(~dec)
        mb = int(-(-(start_pos[pre] + num_new[pre]).max() // bs))
        geom = tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for a in
                     (np.maximum(block_tables[pre, :mb], 0), cu[:-1][pre], num_new[pre], start_pos[pre]))
    return PagedStep(pool, as_t(slots), dec_idx, dec_tables, dec_ctx, prefills, backend, prefill_geom=geom), pos


def _prefill_kernel_on() -> bool:
    return os.environ.get("LLMOS_PREFILL_KERNEL", "1") != "0"   # 0: SDPA, for A/B runs


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """AttentionInterface entry: query [1, H, T, D], key/value [1, KVH, T, D] -> ([1, T, H, D], None)."""
    step: PagedStep | None = kwargs.get("llmos_step")
    if step is None:
        raise RuntimeError("llmos_paged attention needs the forward kwarg llmos_step (use ModelRunner)")
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise NotImplementedError("sliding-window and soft-capped attention are not supported")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend(step, module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1),
                 value[0].transpose(0, 1), scale)
    return out.unsqueeze(0), None


def attend(step: PagedStep, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
           scale: float) -> torch.Tensor:
    """One layer of a packed step: q [T, H, D], k_new/v_new [T, KVH, D] (any strides) -> [T, H, D]
    in q's dtype. Writes the new k/v into the pool, then attends each sequence over its context."""
    pool = step.pool
    T, H, D = q.shape
    KVH = k_new.shape[1]
    G = H // KVH
    k_slots, v_slots = pool.slots(layer)
    k_slots.index_copy_(0, step.slots, k_new.to(pool.dtype))
    v_slots.index_copy_(0, step.slots, v_new.to(pool.dtype))

    if step.num_decodes and not step.prefills and step.dec_idx is None:
        return decode(step, layer, q, scale).to(q.dtype)
    out = q.new_empty(T, H, D)
    if step.num_decodes:
        qd = q if step.dec_idx is None else q.index_select(0, step.dec_idx)
        out.index_copy_(0, step.dec_idx, decode(step, layer, qd, scale).to(out.dtype))
    if step.prefills and _native_prefill(step, layer, q, out, scale):
        return out
    for p in step.prefills:
        qp = q[p.q0:p.q1].transpose(0, 1).unsqueeze(0)  # [1, H, m, D]
        if p.blocks is None:  # a fresh prompt: its whole context is the new tokens
            kp = k_new[p.q0:p.q1].transpose(0, 1).unsqueeze(0)
            vp = v_new[p.q0:p.q1].transpose(0, 1).unsqueeze(0)
            mask, causal = None, True
        else:
            L = p.start + (p.q1 - p.q0)
            kb, vb = pool.blocks(layer)
            kp = kb.index_select(0, p.blocks).view(-1, KVH, D)[:L].transpose(0, 1).unsqueeze(0)
            vp = vb.index_select(0, p.blocks).view(-1, KVH, D)[:L].transpose(0, 1).unsqueeze(0)
            mask, causal = p.mask, False
        kp, vp = _repeat_kv(kp.to(q.dtype), G), _repeat_kv(vp.to(q.dtype), G)
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, is_causal=causal, scale=scale)
        out[p.q0:p.q1] = o[0].transpose(0, 1)
    return out


def _native_prefill(step: PagedStep, layer: int, q: torch.Tensor, out: torch.Tensor, scale: float) -> bool:
    """All of the step's prefills in one call of csrc/paged_prefill.cpp (bf16 pool and queries on
    a CPU with AVX-512 BF16: 4.7x torch's SDPA on a 1,024-token prompt); False: use SDPA."""
    if step.prefill_geom is None or q.dtype != torch.bfloat16 or step.pool.dtype != torch.bfloat16:
        return False
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        q = q.contiguous()   # transformers' own attention modules hand us [H, T, D] transposed
    k, v = step.pool.block_rows(layer)
    return native_ext.load().paged_prefill_bf16(q, k, v, *step.prefill_geom, out, scale)


def decode(step: PagedStep, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Nd, H, D] of the step's single-token sequences -> [Nd, H, D], by the step's backend."""
    return decode_backends.get(step.backend)(step, layer, q, scale)


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    if n == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def register() -> str:
    """Make "llmos_paged" a valid attn_implementation (idempotent); returns the name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    return ATTN_IMPLEMENTATION
