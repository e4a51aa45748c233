"""The decoder's forward as one plain loop over tensors, for Llama-form models (CPU and GPU).

transformers' model classes run a decode step of smollm2 through ~20 module calls per layer,
each with its wrappers (kwarg deprecation, kernel hooks, gradient-checkpointing checks), and
apply the rotary embedding to q and k as ~14 small ops. At one stream of 4-bit weights those
fixed costs are a third of a step (docs/model-driver.md). This module reads the same weights
out of the same modules once, at load, and runs the same arithmetic in the same order as
transformers' Llama/Qwen2/Mistral layers, with fewer ops:

- q/k/v (and gate/up) come from one fused linear when the runner fused them (fused.py);
- the rotary embedding rotates q and k in one pass over their joined heads;
- RMSNorm goes through torch's fused kernel where a probe shows it gives the module's exact
  output (fused.fuse_norms), else through the module itself; for bf16 on the CPU the norm
  (with the residual add before it) and the rotary embedding are single native passes that
  give torch's bits (layer_ops.py);
- the final norm and the lm_head run only on the rows that are sampled.

Every op is elementwise-identical to the module path, so fp32 logits are bit-identical to
transformers' (tests/test_lean_forward.py checks it). A model of any other form (q/k norms,
sliding windows, Gemma's scaled embeddings, ...) keeps transformers' forward: `build` returns None.
LLMOS_LEAN=0 turns it off.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from llmos.drivers.model import decode_stack, fused, layer_ops
from llmos.drivers.model.paged_attention import PagedStep, attend

LAYER_CLASSES = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer")


def wanted(env=os.environ) -> bool:
    raw = env.get("LLMOS_LEAN", "1").strip()
    if raw not in ("0", "1"):
        raise ValueError(f"LLMOS_LEAN={raw!r}: use 1 (default) or 0")
    return raw == "1"


@dataclass
class _Layer:
    norm1: layer_ops.AddNorm      # (x + residual, its norm): the residual add rides with the norm
    norm2: layer_ops.AddNorm
    qkv: Callable | None          # the fused q/k/v linear, or None: q, k, v separately
    q: Callable
    k: Callable
    v: Callable
    o: Callable
    gate_up: Callable | None      # the fused gate/up linear, or None
    gate: Callable
    up: Callable
    down: Callable


def _linear(module: torch.nn.Module) -> Callable:
    """The cheapest callable with module(x)'s result: its forward, past nn.Module.__call__."""
    if isinstance(module, fused.FusedPart):
        holder, i = module._fused[0], module.index
        lo = holder.offsets[i]
        hi = lo + holder.sizes[i]
        inner = _linear(holder.linear)
        return lambda x: inner(x)[..., lo:hi]
    if type(module) is torch.nn.Linear:
        return lambda x: F.linear(x, module.weight, module.bias)
    if module._forward_hooks or module._forward_pre_hooks:
        return module
    return module.forward


def _norm(module: torch.nn.Module, fast_norms: bool) -> Callable:
    """torch's fused RMSNorm where LLMOS_FUSE asks for norms and it is exact, else the module."""
    if isinstance(module, fused.FastRMSNorm):
        return module.forward
    fast = fused.exact_fast_norm(module) if fast_norms else None
    return module if fast is None else fast.forward


def _fused_of(parts: list[torch.nn.Module]) -> Callable | None:
    """The shared linear of parts that are exactly one FusedLinear's parts 0..n-1, in order."""
    if not all(isinstance(p, fused.FusedPart) for p in parts):
        return None
    holder = parts[0]._fused[0]
    if [p._fused[0] for p in parts] != [holder] * len(parts) or [p.index for p in parts] != list(range(len(parts))):
        return None
    if len(holder.sizes) != len(parts):
        return None
    return _linear(holder.linear)


class LeanForward:
    """Call with the packed step's token ids [T], positions [T], the rows to keep [R] and the
    PagedStep; returns the logits of those rows [R, V], what transformers' forward would give."""

    def __init__(self, model: torch.nn.Module):
        inner = model.model
        c = model.config.get_text_config()
        self.H, self.KVH = c.num_attention_heads, c.num_key_value_heads
        self.D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.embed, self.rotary = inner.embed_tokens, inner.rotary_emb
        fast_norms = "norms" in fused.wanted()
        w = self.embed.weight
        self.ext = layer_ops.ops_for(w.dtype, w.device)    # native norm and rotary, for bf16 on the CPU
        norm_ext = self.ext if fast_norms else None

        def norm(module):
            return layer_ops.add_norm(module, _norm(module, fast_norms), norm_ext)

        self.final_norm, self.lm_head = norm(inner.norm), _linear(model.lm_head)
        self.scale = inner.layers[0].self_attn.scaling
        self.layers = []
        for layer in inner.layers[: c.num_hidden_layers]:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                norm(layer.input_layernorm), norm(layer.post_attention_layernorm),
                _fused_of([a.q_proj, a.k_proj, a.v_proj]), _linear(a.q_proj), _linear(a.k_proj),
                _linear(a.v_proj), _linear(a.o_proj), _fused_of([m.gate_proj, m.up_proj]),
                _linear(m.gate_proj), _linear(m.up_proj), _linear(m.down_proj)))
        # Decode steps where it computes the same bits: the loop below in one native call (decode_stack.py).
        self.stack = decode_stack.build(self.ext, self.layers, self.H, self.KVH, self.D, self.scale)

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor, step: PagedStep) -> torch.Tensor:
        x = F.embedding(ids, self.embed.weight)
        cos, sin = self.rotary(x, pos[None])          # [1, T, D] each, in x's dtype
        cos, sin = cos[0, :, None], sin[0, :, None]   # [T, 1, D]: one row per token, every head
        if self.stack is not None and self.stack.serves(step, x):
            x = self.stack(x, cos[:, 0], sin[:, 0], step)
        else:
            x = self._layers(x, cos, sin, step)
        x = x.index_select(0, keep)     # the norm is per row: only the rows we sample need it
        return self.lm_head(self.final_norm(x)[1])

    def _layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: PagedStep) -> torch.Tensor:
        H, KVH, D = self.H, self.KVH, self.D
        T = x.shape[0]
        half = D // 2
        x, h = self.layers[0].norm1(x) if self.layers else (x, x)
        for i, L in enumerate(self.layers):
            if L.qkv is not None:
                qkv = L.qkv(h).view(T, H + 2 * KVH, D)
                qk, v = qkv[:, :H + KVH], qkv[:, H + KVH:]
            else:
                qk = torch.cat([L.q(h).view(T, H, D), L.k(h).view(T, KVH, D)], 1)
                v = L.v(h).view(T, KVH, D)
            if self.ext is not None:
                layer_ops.rotate_(self.ext, qk, cos[:, 0], sin[:, 0])
            else:   # transformers' apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
                qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], -1) * sin
            o = attend(step, i, qk[:, :H], qk[:, H:], v, self.scale)
            x, h = L.norm2(x, L.o(o.reshape(T, H * D)))
            if L.gate_up is not None:
                gu = L.gate_up(h)
                inter = gu.shape[-1] // 2
                h = F.silu(gu[:, :inter]) * gu[:, inter:]
            else:
                h = F.silu(L.gate(h)) * L.up(h)
            if i + 1 < len(self.layers):
                x, h = self.layers[i + 1].norm1(x, L.down(h))
            else:
                x = x + L.down(h)
        return x


def supported(model: torch.nn.Module) -> str | None:
    """None if LeanForward computes exactly what this model's forward does, else why not."""
    c = model.config.get_text_config()
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if layers is None or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        return f"{type(model).__name__}: not a decoder of the Llama form"
    for layer in layers:
        if type(layer).__name__ not in LAYER_CLASSES:
            return f"layer class {type(layer).__name__}"
        a, m = layer.self_attn, layer.mlp
        if any(hasattr(a, n) for n in ("q_norm", "k_norm", "sinks")):
            return "attention with q/k norms or sinks"
        if type(getattr(m, "act_fn", None)).__name__ not in ("SiLUActivation", "SiLU"):
            return f"MLP activation {type(getattr(m, 'act_fn', None)).__name__}"
        if (a.num_key_value_groups * c.num_key_value_heads != c.num_attention_heads
                or getattr(a, "head_dim", head_dim) != head_dim):
            return "attention geometry differs from the config"
        if getattr(a, "sliding_window", None) or getattr(layer, "attention_type", "full_attention") != "full_attention":
            return "sliding-window attention"
        if layer._forward_hooks or layer._forward_pre_hooks or a._forward_hooks or m._forward_hooks:
            return "forward hooks on a layer"
    if c.model_type == "mistral" and getattr(c, "sliding_window", None):
        return "sliding-window attention"
    if type(inner.embed_tokens) is not torch.nn.Embedding:
        return f"embedding {type(inner.embed_tokens).__name__}"
    return None


def build(model: torch.nn.Module) -> LeanForward | None:
    """A LeanForward for this model, or None where its form is not one we reproduce exactly."""
    return None if supported(model) is not None else LeanForward(model)
