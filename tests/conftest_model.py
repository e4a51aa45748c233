"""Helpers for driving ModelRunner in tests: make_pool_file, BlockAllocator, MiniKernel
(a plain-Python scheduler + block manager that builds real StepPlans), hf_greedy
(reference tokens from Hugging Face generate), PROMPTS.

The model fixtures (model_cache, smollm2_dir, tiny_llama_dir, tiny_qwen2_dir,
tiny_model_dirs) live in conftest.py, for every test module; they are re-exported here
only for modules that still import them from this one.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from conftest import model_cache, smollm2_dir, tiny_model_dirs  # noqa: F401  (see above)

from llmos import protocol

__all__ = ["make_pool_file", "BlockAllocator", "MiniKernel", "hf_greedy", "PROMPTS"]

PROMPTS = [
    "Hi",
    "Why is the sky blue?",
    "Write a haiku about a cat sleeping in the warm afternoon sun near an open window.",
    "List three differences between lists and tuples in Python, and explain when you would use "
    "each of them in everyday code. Keep the answer short, friendly and concrete, with examples.",
]


def make_pool_file(directory: Path, info: dict, num_blocks: int, block_size: int) -> protocol.MapKVPool:
    """Do what the kernel does: create and size the pool file, describe it in a MapKVPool."""
    import torch
    itemsize = torch.empty((), dtype=getattr(torch, info["dtype"])).element_size()
    numel = info["num_layers"] * 2 * num_blocks * block_size * info["num_kv_heads"] * info["head_dim"]
    path = Path(directory) / f"kvpool-{os.getpid()}-{random.getrandbits(32):08x}"
    with open(path, "wb") as f:
        f.truncate(numel * itemsize)
    return protocol.MapKVPool(path=str(path), device="cpu", dtype=info["dtype"], num_blocks=num_blocks,
                              block_size=block_size, num_layers=info["num_layers"],
                              num_kv_heads=info["num_kv_heads"], head_dim=info["head_dim"])


class BlockAllocator:
    """Blocks handed out from a free list; `shuffle` makes block tables non-contiguous."""

    def __init__(self, num_blocks: int, shuffle_seed: int | None = None):
        self.free = list(range(num_blocks))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(self.free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError("test pool exhausted")
        out, self.free = self.free[:n], self.free[n:]
        return out

    def release(self, blocks: list[int]) -> None:
        self.free.extend(blocks)


@dataclass
class Seq:
    sid: int
    tokens: list[int]                 # prompt + generated so far
    max_new: int
    params: dict = field(default_factory=dict)
    computed: int = 0                 # tokens whose KV is in the pool
    blocks: list[int] = field(default_factory=list)
    out: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.out) >= self.max_new


class MiniKernel:
    """Just enough of a kernel to drive a runner: admits sequences at given steps, prefills
    them in chunks of at most `chunk` tokens, decodes the rest, all packed in one plan per step."""

    def __init__(self, runner, pool_dir: Path, num_blocks: int = 256, block_size: int = 4,
                 shuffle_seed: int | None = None, chunk: int = 1 << 30):
        self.runner, self.block_size, self.chunk = runner, block_size, chunk
        runner.map_pool(make_pool_file(pool_dir, runner.info(), num_blocks, block_size))
        self.alloc = BlockAllocator(num_blocks, shuffle_seed)
        self.seqs: list[Seq] = []
        self.step_id = 0
        self.history: list[list[tuple[int, int]]] = []  # (num_new, start_pos) of each step's rows

    def add(self, prompt: list[int], max_new: int, **params) -> Seq:
        s = Seq(len(self.seqs), list(prompt), max_new, params)
        self.seqs.append(s)
        return s

    def step(self, seqs: list[Seq] | None = None) -> protocol.StepResult:
        batch = [s for s in (seqs if seqs is not None else self.seqs) if not s.done]
        rows = []
        for s in batch:
            n = min(len(s.tokens) - s.computed, self.chunk)
            need = -(-(s.computed + n) // self.block_size) - len(s.blocks)
            s.blocks += self.alloc.alloc(max(0, need))
            rows.append((s, n, s.computed + n == len(s.tokens)))
        width = max(len(s.blocks) for s, _, _ in rows)
        p = lambda key, default: [s.params.get(key, default) for s, _, _ in rows]  # noqa: E731
        plan = protocol.StepPlan(
            step_id=self.step_id, seq_ids=protocol.i32([s.sid for s, _, _ in rows]),
            num_new=protocol.i32([n for _, n, _ in rows]),
            start_pos=protocol.i32([s.computed for s, _, _ in rows]),
            tokens=protocol.i32([t for s, n, _ in rows for t in s.tokens[s.computed:s.computed + n]]),
            block_tables=protocol.i32([s.blocks + [-1] * (width - len(s.blocks)) for s, _, _ in rows]),
            sample=np.array([int(x) for _, _, x in rows], dtype=np.uint8),
            temperature=np.array(p("temperature", 0.0), dtype=np.float32),
            top_p=np.array(p("top_p", 1.0), dtype=np.float32), top_k=protocol.i32(p("top_k", -1)),
            seed=np.array(p("seed", -1), dtype=np.int64),
            gen_index=protocol.i32([len(s.out) for s, _, _ in rows]),
            top_logprobs=protocol.i32(p("top_logprobs", -1)))
        plan = protocol.decode(protocol.encode(plan))  # what the driver really receives
        self.history.append([(n, s.computed) for s, n, _ in rows])
        self.step_id += 1
        res = self.runner.execute(plan)
        for s, n, _ in rows:
            s.computed += n
        by_id = {s.sid: s for s in batch}
        for i, (sid, tok) in enumerate(zip(res.seq_ids, res.tokens)):
            s = by_id[int(sid)]
            s.tokens.append(int(tok))
            s.out.append(int(tok))
            s.logprobs.append((float(res.logprobs[i]), res.top_ids[i].tolist(), res.top_lps[i].tolist()))
            if s.done:
                self.alloc.release(s.blocks)
        return res

    def run(self, arrivals: dict[int, list[Seq]] | None = None, max_steps: int = 10_000) -> None:
        """Step until every sequence is done; arrivals[k] join at step k (others at step 0)."""
        arrivals = arrivals or {}
        late = {id(s) for group in arrivals.values() for s in group}
        active = [s for s in self.seqs if id(s) not in late]
        for k in range(max_steps):
            active += arrivals.get(k, [])
            if all(s.done for s in self.seqs):
                return
            if any(not s.done for s in active):
                self.step(active)
        raise RuntimeError("MiniKernel.run did not finish")


def hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    """Reference: Hugging Face generate, greedy, the prompt alone. Stops early at EOS."""
    import torch
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new, min_new_tokens=0, pad_token_id=0)
    return out[0, len(prompt):].tolist()
