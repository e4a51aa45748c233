"""LLMOS_FUSE (fused.py): fused q/k/v and gate/up projections and torch's fused RMSNorm give
exactly what the modules they replace give, so fp32 greedy stays transformers' own; anything
that does not match is left alone."""
from __future__ import annotations

import pytest
import torch
from conftest_model import PROMPTS, MiniKernel, hf_greedy, smollm2_dir, tiny_model_dirs  # noqa: F401

from llmos.drivers.model import fused
from llmos.drivers.model.packed import PackedLinear
from llmos.drivers.model.runner import ModelRunner


def test_default_is_both_and_bad_values_are_refused():
    assert fused.wanted({}) == {"projections", "norms"}
    assert fused.wanted({"LLMOS_FUSE": "0"}) == set()
    assert fused.wanted({"LLMOS_FUSE": "projections,norms"}) == {"projections", "norms"}
    assert fused.wanted({"LLMOS_FUSE": " norms "}) == {"norms"}
    with pytest.raises(ValueError, match="LLMOS_FUSE"):
        fused.wanted({"LLMOS_FUSE": "everything"})


class Block(torch.nn.Module):
    """What transformers' attention and MLP do with their projections."""

    def __init__(self, bias: bool, dtype=torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        for name, n in (("q_proj", 24), ("k_proj", 8), ("v_proj", 8), ("gate_proj", 40), ("up_proj", 40)):
            lin = torch.nn.Linear(16, n, bias=bias, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n, 16, generator=gen))
                if bias:
                    lin.bias.copy_(torch.randn(n, generator=gen))
            setattr(self, name, lin)

    def forward(self, x):
        return (self.q_proj(x), self.k_proj(x), self.v_proj(x), self.gate_proj(x), self.up_proj(x))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("pack", [False, True])
def test_fused_projections_give_exactly_the_separate_outputs(bias, pack):
    block = Block(bias)
    x = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        want = block(x)
        assert fused.fuse_projections(block) == 2
        assert isinstance(block.q_proj, fused.FusedPart) and isinstance(block.up_proj, fused.FusedPart)
        if pack:
            for holder in (block.q_k_v_fused, block.gate_up_fused):
                holder.linear = PackedLinear(holder.linear, 32)
        for _ in range(2):   # the shared product is dropped once every part has had its slice
            got = block(x)
            # Bit-equal on the Xeon; on an EPYC, MKL blocks a narrow (8-wide) product differently
            # from its slice of a wide one: 1 ulp. Equal up to fp32 rounding, never more.
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=2e-6)
            assert block.q_k_v_fused._y is None and block.gate_up_fused._y is None
        # Parts called on different tensors still get their own input's product.
        y = torch.randn(1, 2, 16)
        torch.testing.assert_close(block.k_proj(y), Block(bias).k_proj(y), rtol=1e-6, atol=2e-6)


def test_a_group_is_fused_only_when_every_member_is_accepted():
    block = Block(False)
    assert fused.fuse_projections(block, accept=lambda lin: lin.out_features != 8) == 1   # gate/up only
    assert type(block.k_proj) is torch.nn.Linear and isinstance(block.gate_proj, fused.FusedPart)


class GemmaNorm(torch.nn.Module):
    """An RMSNorm of another form: (1 + w), computed in fp32."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(n) * 0.1)
        self.variance_epsilon = 1e-6

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_only_norms_of_the_llama_form_are_swapped_and_exactly(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    model = torch.nn.Module()
    model.llama = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        model.llama.weight.copy_(torch.randn(64) * 0.5 + 1)
    model.gemma = GemmaNorm(64)
    model.to(dtype)
    x = (torch.randn(1, 9, 64) * 3).to(dtype)
    with torch.inference_mode():
        want = model.llama(x), model.gemma(x)
        assert fused.fuse_norms(model) == 1
        assert isinstance(model.llama, fused.FastRMSNorm) and isinstance(model.gemma, GemmaNorm)
        assert torch.equal(model.llama(x), want[0]) and torch.equal(model.gemma(x), want[1])


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_runner_keeps_hf_fp32_greedy(kind, tiny_model_dirs, smollm2_dir, tmp_path, monkeypatch):
    """Mixed prefill/decode steps, chunked prompts, shuffled blocks: transformers' tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = tiny_model_dirs[kind]
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    ref = AutoModelForCausalLM.from_pretrained(d, local_files_only=True).eval()
    refs = [hf_greedy(ref, p, 16) for p in prompts]
    monkeypatch.setenv("LLMOS_FUSE", "projections,norms")
    runner = ModelRunner(d)
    assert runner.fused["projections"] == 2 * runner.info()["num_layers"]
    assert runner.fused["norms"] == 2 * runner.info()["num_layers"] + 1
    k = MiniKernel(runner, tmp_path, block_size=4, shuffle_seed=1, chunk=5)
    seqs = [k.add(p, 16) for p in prompts]
    k.run(arrivals={2: [seqs[3]]})
    for s, want in zip(seqs, refs):
        assert s.out[: len(want)] == want


@pytest.mark.slow
def test_fused_smollm2_keeps_hf_fp32_greedy(smollm2_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                     return_dict=False) for p in PROMPTS]
    ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True).eval()
    refs = [hf_greedy(ref, p, 24) for p in chats]
    del ref
    monkeypatch.setenv("LLMOS_FUSE", "projections,norms")
    k = MiniKernel(ModelRunner(smollm2_dir), tmp_path, block_size=16, shuffle_seed=5, chunk=32)
    seqs = [k.add(p, 24) for p in chats]
    k.run(arrivals={2: [seqs[1]]})
    for s, want in zip(seqs, refs):
        assert s.out[: len(want)] == want
