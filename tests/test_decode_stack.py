"""The decoder layers of a small 4-bit decode step as one native call (decode_stack.py) give
the bits of lean.py's loop: the same logits at every step, for 4, 3, 2 and 1 decoding
sequences, and only the steps it covers go there."""
from __future__ import annotations

import pytest
import torch

from llmos.drivers.model import decode_stack, native, quant

needs_vnni = pytest.mark.skipif(quant.kernels() is None, reason="no native 4-bit products here (no AVX-512 VNNI)")


class Recorder:
    """Stands in for runner.lean: the same call, its logits kept."""

    def __init__(self, lean):
        self.lean, self.logits = lean, []

    def __call__(self, *args):
        out = self.lean(*args)
        self.logits.append(out.clone())
        return out


def _run(runner, tok, pool_dir):
    from conftest_model import PROMPTS, MiniKernel

    pool_dir.mkdir(parents=True, exist_ok=True)
    rec = runner.lean = Recorder(runner.lean)
    k = MiniKernel(runner, pool_dir, block_size=16)
    seqs = [k.add(tok(p)["input_ids"], n) for p, n in zip(PROMPTS, (12, 9, 6, 3))]   # 4, 3, 2, then 1 decoding
    k.run()
    return rec.logits, [s.out for s in seqs]


@needs_vnni
def test_the_stack_gives_the_loops_logits_bit_for_bit(smollm2_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from llmos.drivers.model.runner import ModelRunner

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    runner = ModelRunner(smollm2_dir, dtype="int4")
    stack = runner.lean.stack
    assert stack is not None, "smollm2 in int4 with native kernels is what the stack is for"
    served = []
    real = stack.__call__
    monkeypatch.setattr(type(stack), "__call__", lambda self, *a: served.append(a[0].shape[0]) or real(*a))
    with_stack, out_stack = _run(runner, tok, tmp_path / "a")
    assert sorted(set(served)) == [1, 2, 3, 4]      # every decode step went through it, prefill did not
    runner.lean = runner.lean.lean   # the recorder off again
    runner.lean.stack = None
    loop, out_loop = _run(runner, tok, tmp_path / "b")
    assert out_stack == out_loop and len(with_stack) == len(loop)
    for i, (a, b) in enumerate(zip(with_stack, loop)):
        assert torch.equal(a, b), f"step {i}: logits differ"


@needs_vnni
def test_only_small_decode_steps_of_native_int4_take_it(smollm2_dir, monkeypatch):
    from llmos.drivers.model.paged_attention import PagedStep
    from llmos.drivers.model.runner import ModelRunner

    bf16 = ModelRunner(smollm2_dir, dtype="bfloat16")
    assert bf16.lean.stack is None                   # no 4-bit products: lean.py's loop
    monkeypatch.setenv("LLMOS_DECODE_STACK", "0")
    assert ModelRunner(smollm2_dir, dtype="int4").lean.stack is None
    monkeypatch.setenv("LLMOS_DECODE_STACK", "2")
    with pytest.raises(ValueError, match="LLMOS_DECODE_STACK"):
        decode_stack.wanted()
    monkeypatch.delenv("LLMOS_DECODE_STACK")
    stack = ModelRunner(smollm2_dir, dtype="int4").lean.stack
    x = torch.zeros(4, 576, dtype=torch.bfloat16)

    def step(n, **kw):
        ctx = torch.ones(n, dtype=torch.long)
        return PagedStep(None, torch.zeros(n, dtype=torch.long), kw.get("dec_idx"), torch.zeros(n, 1, dtype=torch.long),
                         ctx, kw.get("prefills", []), kw.get("backend", "native"))

    assert stack.serves(step(4), x)
    assert not stack.serves(step(5), torch.zeros(5, 576, dtype=torch.bfloat16))   # the dense copy's size
    assert not stack.serves(step(4, backend="gather"), x)
    assert not stack.serves(step(4, prefills=[object()]), x)
    assert not stack.serves(step(4, dec_idx=torch.arange(4)), x)
    assert not stack.serves(step(4), x.float())
    assert not stack.serves(step(3), x)              # a row that does not decode


@needs_vnni
def test_bad_arguments_are_refused_and_it_answers_after(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    from llmos.drivers.model.runner import ModelRunner

    runner = ModelRunner(smollm2_dir, dtype="int4")
    ext = native.load()
    x = torch.zeros(1, 576, dtype=torch.bfloat16)
    cos = sin = torch.zeros(1, 64, dtype=torch.bfloat16)
    s = runner.lean.stack
    with pytest.raises(RuntimeError, match="two norms a layer"):
        ext.decode_stack(x, cos, sin, s.norms[:1], s.products, s.biases, [], torch.zeros(1, dtype=torch.long),
                         torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long), 9, 3, 64, 1e-5, 8, 0.125)
    with pytest.raises(RuntimeError, match="four pool views"):
        ext.decode_stack(x, cos, sin, s.norms, s.products, s.biases, [], torch.zeros(1, dtype=torch.long),
                         torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long), 9, 3, 64, 1e-5, 8, 0.125)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    logits, outs = _run(runner, tok, tmp_path)
    assert all(len(o) == n for o, n in zip(outs, (12, 9, 6, 3)))
