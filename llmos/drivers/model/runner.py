"""The model driver's compute core: one transformers model, the kernel's KV pool, one
step plan at a time. Holds no per-request state: everything a step needs is in the plan
and the pool, so a restarted runner continues exactly where a dead one stopped.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from llmos import protocol
from llmos.drivers.model import decode_backends, fused, lean, native, paged_attention
from llmos.drivers.model.grammar import GrammarBook
from llmos.drivers.model.logits_controls import gather
from llmos.drivers.model.packed import pack_linears
from llmos.drivers.model.paged_attention import KVPool, plan_step
from llmos.drivers.model.sampling import sample
from llmos.drivers.model.threads import physical_cores

WEIGHT_DTYPES = ("float32", "bfloat16", "int4", "int8")   # (the KV pool also takes float16: paged_attention.TORCH_DTYPES)
KV_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "int4": "bfloat16", "int8": "bfloat16"}   # int4: 4-bit linears, bf16 else
QUANTIZED = ("int4", "int8")   # int8: int4, with the products of big steps in int8 arithmetic (w8a8.py)


class BadPlan(ValueError):
    """A step plan this runner cannot execute (inconsistent shapes, blocks out of range, ...).
    The driver answers StepFailed; nothing was written to the pool."""


class ModelRunner:
    """Owned by the model driver's main loop (one thread). map_pool before execute; execute
    raises BadPlan for a plan it refuses and lets other errors through (the caller answers
    StepFailed either way). dtype "float32" | "bfloat16" | "int4" (CPU: 4-bit linears, see quant.py)
    | "int8" (int4 whose big steps run int8 products, w8a8.py);
    the pool holds KV_DTYPE[dtype]."""

    def __init__(self, model_dir: Path, dtype: str = "float32", device: str = "cpu",
                 pack_weights: bool | None = None):
        from transformers import AutoModelForCausalLM

        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported: use one of {sorted(WEIGHT_DTYPES)}")
        if dtype in QUANTIZED and torch.device(device).type != "cpu":
            raise ValueError(f"--dtype {dtype} runs on the CPU only (its products are CPU kernels)")
        if dtype == "int8" and getattr(native.load(), "w8a8_linear", None) is None:
            raise ValueError("--dtype int8 needs the C++ kernels (csrc/w8a8.cpp), which did not build here")
        self.model_dir, self.weights, self.device = Path(model_dir), dtype, torch.device(device)
        self.dtype_name = KV_DTYPE[dtype]
        self.dtype = paged_attention.TORCH_DTYPES[self.dtype_name]
        if self.device.type == "cpu":
            torch.set_num_threads(physical_cores())
        self.model = AutoModelForCausalLM.from_pretrained(   # int4: quantized from the fp32 weights
            self.model_dir, dtype=torch.float32 if dtype in QUANTIZED else self.dtype, local_files_only=True,
            attn_implementation=paged_attention.register()).to(self.device).eval()
        self.config = self.model.config.get_text_config()
        if "sliding_attention" in (getattr(self.config, "layer_types", None) or []):
            raise NotImplementedError(f"{self.config.model_type}: sliding-window layers are not supported")
        if pack_weights is None:
            pack_weights = os.environ.get("LLMOS_PACK_WEIGHTS", "1") != "0"
        self.packed, self.exact_4bit = 0, None
        fuse = fused.wanted()
        self.fused = {"projections": 0, "norms": 0}
        if "projections" in fuse:   # before quantizing or packing: the fused weight is made 4-bit or packed
            accept = None
            if dtype in QUANTIZED:  # fuse only groups that go 4-bit whole
                from llmos.drivers.model.quant import was_4bit
                accept = was_4bit
            self.fused["projections"] = fused.fuse_projections(self.model, accept)
        if dtype in QUANTIZED:
            from llmos.drivers.model.quant import quantize_linears
            self.packed, self.exact_4bit = quantize_linears(self.model, int8_dense=dtype == "int8")
            self.model.to(self.dtype)
        # What a step must read: counted before packing, which drops the Linear parameters.
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters()) + sum(
            m.nbytes() for m in self.model.modules() if hasattr(m, "nbytes"))
        if pack_weights and self.device.type == "cpu" and dtype not in QUANTIZED:
            self.packed = pack_linears(self.model)
        if "norms" in fuse:
            self.fused["norms"] = fused.fuse_norms(self.model)
        self.decode_backend = decode_backends.choose(self.device)
        self.lean = lean.build(self.model) if lean.wanted() else None   # None: transformers' forward
        self.pool: KVPool | None = None
        self.host: torch.Tensor | None = None
        # The last step's sampled tokens, for a plan sent while it ran (StepPlan.follows): a
        # cache the kernel never relies on; a plan that follows any other step is refused.
        self.last_sampled: tuple[int, dict[int, int]] | None = None
        self.grammars = GrammarBook(self.model_dir, self.config.vocab_size, self.info()["eos_token_ids"])

    def info(self) -> dict:
        c = self.config
        eos = []
        for src in (self.model.generation_config, c):
            ids = getattr(src, "eos_token_id", None) if src is not None else None
            for i in ([ids] if isinstance(ids, int) else ids or []):
                if i not in eos:
                    eos.append(int(i))
        return {
            "num_layers": c.num_hidden_layers,
            "num_kv_heads": c.num_key_value_heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "dtype": self.dtype_name,
            "vocab_size": c.vocab_size,
            "max_model_len": c.max_position_embeddings,
            "weight_bytes": self.weight_bytes,
            "eos_token_ids": eos,
            "model_type": c.model_type,
        }

    def map_pool(self, msg: protocol.MapKVPool) -> None:
        """Map the kernel's pool (replacing any earlier one). Raises ValueError on a geometry
        that does not fit this model, NotImplementedError for pools we cannot map yet."""
        info = self.info()
        want = {k: info[k] for k in ("num_layers", "num_kv_heads", "head_dim", "dtype")}
        got = {k: getattr(msg, k) for k in want}
        if got != want:
            raise ValueError(f"KV pool geometry {got} does not fit the model {want}")
        if torch.device(msg.device).type != self.device.type:
            raise ValueError(f"KV pool on {msg.device} for a model on {self.device}")
        if msg.block_size < 1 or msg.num_blocks < 1:
            raise ValueError(f"KV pool with {msg.num_blocks} blocks of {msg.block_size}")
        self.pool = KVPool(msg)
        self.host = None
        if msg.host_path and msg.host_blocks > 0:
            # The kernel's host swap pool: same layout, blocks as rows for whole-block copies.
            row = self.pool.kv[0, 0, 0].numel()
            numel = msg.num_layers * 2 * msg.host_blocks * row
            if os.stat(msg.host_path).st_size < numel * self.pool.kv.element_size():
                raise ValueError(f"host pool file {msg.host_path} is smaller than its layout")
            self.host = torch.from_file(msg.host_path, shared=True, size=numel, dtype=self.pool.dtype).view(
                msg.num_layers, 2, msg.host_blocks, row)

    def check_plan(self, plan: protocol.StepPlan) -> None:
        """Reject anything that would index out of range; the kernel is not trusted blindly."""
        if self.pool is None:
            raise BadPlan("no KV pool mapped")
        n = len(plan.seq_ids)
        if n == 0:
            raise BadPlan("empty plan")
        for name in ("seq_ids", "num_new", "start_pos", "sample", "temperature", "top_p", "top_k", "seed",
                     "gen_index", "top_logprobs"):
            if getattr(plan, name).shape != (n,):
                raise BadPlan(f"{name} has shape {getattr(plan, name).shape}, expected ({n},)")
        for name in ("seq_ids", "num_new", "start_pos", "tokens", "block_tables", "sample", "top_k", "seed",
                     "gen_index", "top_logprobs"):
            if getattr(plan, name).dtype.kind not in "iu":
                raise BadPlan(f"{name} must hold integers, not {getattr(plan, name).dtype}")
        if not (np.isfinite(plan.temperature).all() and (plan.temperature >= 0).all()
                and np.isfinite(plan.top_p).all() and (plan.top_p > 0).all()):
            raise BadPlan("temperature must be finite and >= 0, top_p finite and > 0")
        bt = plan.block_tables
        if bt.ndim != 2 or bt.shape[0] != n:
            raise BadPlan(f"block_tables shape {bt.shape} for {n} sequences")
        if (plan.num_new < 1).any() or (plan.start_pos < 0).any():
            raise BadPlan("every sequence needs num_new >= 1 and start_pos >= 0")
        if plan.tokens.shape != (int(plan.num_new.sum()),):
            raise BadPlan(f"{plan.tokens.shape[0]} tokens for num_new summing to {int(plan.num_new.sum())}")
        if plan.tokens.size and (plan.tokens.min() < 0 or plan.tokens.max() >= self.config.vocab_size):
            raise BadPlan("token id out of the vocabulary")
        end = plan.start_pos.astype(np.int64) + plan.num_new
        if end.max() > self.config.max_position_embeddings:
            raise BadPlan(f"position {int(end.max())} beyond max_model_len {self.config.max_position_embeddings}")
        need = -(-end // self.pool.block_size)
        if (need > bt.shape[1]).any():
            raise BadPlan("block table shorter than the sequence")
        used = bt[np.arange(bt.shape[1])[None, :] < need[:, None]]
        if used.size and (used.min() < 0 or used.max() >= self.pool.num_blocks):
            raise BadPlan(f"block id out of range [0, {self.pool.num_blocks})")

    @staticmethod
    def _followed_tokens(plan: protocol.StepPlan, followed: tuple[int, dict[int, int]] | None) -> np.ndarray:
        """A run-ahead plan's input tokens: what this driver sampled for its sequences in the
        step it follows."""
        n = len(plan.seq_ids)
        if plan.tokens.shape != (n,) or (plan.tokens != protocol.FOLLOWED_TOKEN).any() or \
                plan.num_new.shape != (n,) or (plan.num_new != 1).any():
            raise BadPlan(f"a plan that follows another has one token a sequence, each {protocol.FOLLOWED_TOKEN}")
        if followed is None or followed[0] != plan.follows:
            raise BadPlan(f"plan {plan.step_id} follows step {plan.follows}, whose tokens this driver does not hold")
        try:
            return np.asarray([followed[1][int(q)] for q in plan.seq_ids], dtype=np.int32)
        except KeyError as exc:
            raise BadPlan(f"sequence {exc.args[0]} sampled nothing in step {plan.follows}") from None

    def _swap(self, swap_out: np.ndarray, swap_in: np.ndarray) -> None:
        """Whole-block copies between the device pool and the host pool, outs before ins."""
        if not len(swap_out) and not len(swap_in):
            return
        if self.host is None:
            raise BadPlan("swap ops but no host pool mapped")
        dev = self.pool.kv.view(self.host.shape[0], 2, self.pool.num_blocks, -1)
        for pairs, host_side in ((swap_out, 1), (swap_in, 0)):
            if not len(pairs):
                continue
            if pairs.ndim != 2 or pairs.shape[1] != 2:
                raise BadPlan(f"swap pairs of shape {pairs.shape}")
            d = torch.from_numpy(pairs[:, 1 - host_side].astype(np.int64))
            h = torch.from_numpy(pairs[:, host_side].astype(np.int64))
            if d.min() < 0 or d.max() >= self.pool.num_blocks or h.min() < 0 or h.max() >= self.host.shape[2]:
                raise BadPlan("swap block id out of range")
            d = d.to(dev.device)   # a GPU pool: gather there, cross the bus once
            if host_side == 1:
                self.host[:, :, h] = dev[:, :, d].to("cpu")
            else:
                dev[:, :, d] = self.host[:, :, h].to(dev.device, non_blocking=False)

    def _copy(self, pairs: np.ndarray) -> None:
        """Copy-on-write: whole-block copies inside the device pool (src -> dst)."""
        if not len(pairs):
            return
        if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.dtype.kind not in "iu":
            raise BadPlan(f"copy pairs of shape {pairs.shape} and type {pairs.dtype}")
        if pairs.min() < 0 or pairs.max() >= self.pool.num_blocks:
            raise BadPlan("copy block id out of range")
        dev = self.pool.kv.view(self.pool.kv.shape[0], 2, self.pool.num_blocks, -1)
        src, dst = (torch.from_numpy(pairs[:, k].astype(np.int64)).to(dev.device) for k in (0, 1))
        dev[:, :, dst] = dev[:, :, src]

    @torch.inference_mode()
    def execute(self, plan: protocol.StepPlan) -> protocol.StepResult:
        t0 = time.perf_counter()
        followed, self.last_sampled = self.last_sampled, None   # a failed step leaves none
        if plan.follows:
            plan.tokens = self._followed_tokens(plan, followed)
        self.check_plan(plan)
        rows = np.flatnonzero(plan.sample != 0)
        try:
            controls = gather(plan.controls, rows, self.config.vocab_size, self.config.max_position_embeddings)
        except ValueError as exc:
            raise BadPlan(str(exc)) from None
        self.grammars.start(plan.grammars)   # builds on the grammar thread, during the forward
        self._swap(plan.swap_out, plan.swap_in)
        self._copy(plan.copy)
        step, pos = plan_step(self.pool, plan.num_new, plan.start_pos, plan.block_tables, self.device,
                              self.decode_backend)
        last = np.cumsum(plan.num_new.astype(np.int64))[rows] - 1  # logits only where we sample
        ids = torch.from_numpy(plan.tokens.astype(np.int64)).to(self.device)
        positions = torch.from_numpy(pos).to(self.device)
        keep = torch.from_numpy(last).to(self.device)
        if self.lean is not None:
            logits = self.lean(ids, positions, keep, step)
        else:
            logits = self.model(input_ids=ids[None], position_ids=positions[None], use_cache=False,
                                logits_to_keep=keep, llmos_step=step).logits[0]
        masks = None
        if plan.grammars:
            try:
                masks = self.grammars.masks(plan.grammars, plan.seq_ids, rows)
            except ValueError as exc:
                raise BadPlan(str(exc)) from None
        s = sample(logits, plan.temperature[rows], plan.top_p[rows], plan.top_k[rows],
                   plan.seed[rows], plan.gen_index[rows], plan.top_logprobs[rows], controls,
                   None if masks is None else (masks.positions, masks.allowed))
        self.last_sampled = (plan.step_id, dict(zip(plan.seq_ids[rows].tolist(), s.tokens.tolist())))
        return protocol.StepResult(
            step_id=plan.step_id, seq_ids=plan.seq_ids[rows], tokens=s.tokens, logprobs=s.logprobs,
            top_ids=s.top_ids, top_lps=s.top_lps, forward_ms=(time.perf_counter() - t0) * 1e3,
            **({} if masks is None else {"held": masks.held, "grammar_errors": masks.errors}))
