"""lean.py: the runner's own decoder loop gives bit-for-bit the logits of transformers' forward
through the same modules, in every step kind (fresh prefill, chunked prefill, decode, mixed),
dtype and fusion; models of another form keep transformers' forward."""
from __future__ import annotations

import pytest
import torch
from conftest_model import PROMPTS, MiniKernel, hf_greedy

from llmos.drivers.model import lean
from llmos.drivers.model.runner import ModelRunner


def test_switch_default_on_and_bad_values_refused():
    assert lean.wanted({}) is True
    assert lean.wanted({"LLMOS_LEAN": "0"}) is False
    with pytest.raises(ValueError, match="LLMOS_LEAN"):
        lean.wanted({"LLMOS_LEAN": "fast"})


class Both:
    """Stands in for runner.lean: runs the lean forward, then transformers' forward on the same
    step (which rewrites the same k/v into the pool), and checks the logits are identical."""

    def __init__(self, runner):
        self.runner, self.inner, self.steps, self.kinds = runner, runner.lean, 0, set()

    def __call__(self, ids, pos, keep, step):
        got = self.inner(ids, pos, keep, step)
        want = self.runner.model(input_ids=ids[None], position_ids=pos[None], use_cache=False,
                                 logits_to_keep=keep, llmos_step=step).logits[0]
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), f"step {self.steps}: max diff {(got.float() - want.float()).abs().max()}"
        self.steps += 1
        self.kinds.add((step.num_decodes > 0, bool(step.prefills), any(p.blocks is not None for p in step.prefills)))
        return got


def run_both(runner, tmp_path, prompts, max_new=6, chunk=5, block_size=4):
    assert runner.lean is not None
    both = runner.lean = Both(runner)
    k = MiniKernel(runner, tmp_path, block_size=block_size, shuffle_seed=1, chunk=chunk)
    seqs = [k.add(p, max_new) for p in prompts]
    k.run(arrivals={2: [seqs[-1]]})
    # decode-only, mixed and chunked steps were all compared
    assert (True, False, False) in both.kinds
    assert any(mixed and pre for mixed, pre, _ in both.kinds) and any(c for _, _, c in both.kinds)
    return seqs


def prompts_for(model_dir, tok):
    return [tok(p)["input_ids"] for p in PROMPTS]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("fuse", ["0", "projections,norms"])
def test_tiny_models_logits_identical(kind, fuse, tiny_model_dirs, smollm2_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    monkeypatch.setenv("LLMOS_FUSE", fuse)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    run_both(ModelRunner(tiny_model_dirs[kind]), tmp_path, prompts_for(None, tok))


@pytest.mark.parametrize("dtype,chunk", [("float32", 16), ("bfloat16", 16), ("int4", 16),
                                         ("int8", 64)])   # int8: its products from 64 rows (quant.INT8_ROWS)
def test_smollm2_logits_identical(dtype, chunk, smollm2_dir, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = prompts_for(None, tok)[:3]
    if chunk >= 64:   # a prompt longer than a chunk, so that a chunk of 64 rows is followed by a mixed step
        prompts = [tok(" ".join(PROMPTS * 2))["input_ids"]] + prompts[:2]
    run_both(ModelRunner(smollm2_dir, dtype=dtype), tmp_path, prompts, max_new=3, chunk=chunk, block_size=16)


def test_lean_keeps_hf_fp32_greedy(tiny_model_dirs, smollm2_dir, tmp_path):
    """End to end, with the lean loop alone: transformers' generate gives the same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = tiny_model_dirs["llama"]
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = prompts_for(d, tok)
    ref = AutoModelForCausalLM.from_pretrained(d, local_files_only=True).eval()
    refs = [hf_greedy(ref, p, 12) for p in prompts]
    runner = ModelRunner(d)
    assert runner.lean is not None
    k = MiniKernel(runner, tmp_path, block_size=4, shuffle_seed=2, chunk=7)
    seqs = [k.add(p, 12) for p in prompts]
    k.run(arrivals={3: [seqs[0]]})
    for s, want in zip(seqs, refs):
        assert s.out[: len(want)] == want


def test_fuse_switch_governs_the_lean_norms_too(tiny_model_dirs, monkeypatch):
    """LLMOS_FUSE=0 means the modules' own RMSNorm in the lean loop as well (it used to take
    torch's fused one wherever that was exact, whatever the switch said)."""
    from llmos.drivers.model import fused
    norms = lambda r: [r.lean.final_norm.norm, r.lean.layers[0].norm1.norm]    # noqa: E731
    monkeypatch.setenv("LLMOS_FUSE", "0")
    plain = ModelRunner(tiny_model_dirs["llama"])
    assert all(isinstance(n, torch.nn.Module) and not isinstance(n, fused.FastRMSNorm) for n in norms(plain))
    monkeypatch.setenv("LLMOS_FUSE", "norms")
    fast = ModelRunner(tiny_model_dirs["llama"])
    assert all(getattr(n, "__self__", None).__class__ is fused.FastRMSNorm for n in norms(fast))


def test_off_switch_and_unsupported_forms_keep_transformers(tiny_model_dirs, monkeypatch):
    monkeypatch.setenv("LLMOS_LEAN", "0")
    assert ModelRunner(tiny_model_dirs["llama"]).lean is None
    monkeypatch.delenv("LLMOS_LEAN")
    runner = ModelRunner(tiny_model_dirs["llama"])
    layer = runner.model.model.layers[0]
    layer.self_attn.q_norm = torch.nn.Identity()           # Qwen3's form: not ours to reproduce
    assert "q/k norms" in lean.supported(runner.model)
    del layer.self_attn.q_norm
    handle = layer.register_forward_hook(lambda *a: None)  # someone watches the layer: keep its call
    assert "hooks" in lean.supported(runner.model)
    handle.remove()
    assert lean.supported(runner.model) is None
