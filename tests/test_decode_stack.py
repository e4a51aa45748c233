"""The decoder layers of a decode step as one native call (decode_stack.py) give the bits of
lean.py's loop: the same logits at every step, for 6 down to 1 decoding sequences, with the
4-bit products (up to quant.SMALL_STEP tokens) and with the packed bf16 ones (bigger int4
steps, every bf16 step), and only the steps it covers go there."""
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


def _run(runner, tok, pool_dir, lengths=(12, 9, 6, 3)):
    """One sequence per length (prompts cycled): as they end, the decode steps shrink."""
    from conftest_model import PROMPTS, MiniKernel

    pool_dir.mkdir(parents=True, exist_ok=True)
    rec = runner.lean = Recorder(runner.lean)
    k = MiniKernel(runner, pool_dir, block_size=16)
    seqs = [k.add(tok(PROMPTS[i % len(PROMPTS)])["input_ids"], n) for i, n in enumerate(lengths)]
    k.run()
    return rec.logits, [s.out for s in seqs]


@needs_vnni
@pytest.mark.parametrize("dtype,lengths,sizes", [
    ("int4", (12, 9, 6, 3), [1, 2, 3, 4]),                # the 4-bit products
    ("int4", (9, 8, 7, 6, 5, 4), [1, 2, 3, 4, 5, 6]),     # 5 and 6 tokens: the packed copy
    ("bfloat16", (9, 7, 5), [1, 2, 3]),                    # packed bf16 throughout
    ("int8", (4, 4) + (3,) * 64, [2, 66]),                 # 66 tokens: the int8 products (quant.INT8_ROWS)
])
def test_the_stack_gives_the_loops_logits_bit_for_bit(smollm2_dir, tmp_path, monkeypatch, dtype, lengths, sizes):
    from transformers import AutoTokenizer

    from llmos.drivers.model.runner import ModelRunner

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    runner = ModelRunner(smollm2_dir, dtype=dtype)
    stack = runner.lean.stack
    assert stack is not None, f"smollm2 in {dtype} with native kernels is what the stack is for"
    served = []
    real = stack.__call__
    monkeypatch.setattr(type(stack), "__call__", lambda self, *a: served.append(a[0].shape[0]) or real(*a))
    with_stack, out_stack = _run(runner, tok, tmp_path / "a", lengths)
    assert sorted(set(served)) == sizes      # every decode step went through it, prefill did not
    runner.lean = runner.lean.lean   # the recorder off again
    runner.lean.stack = None
    loop, out_loop = _run(runner, tok, tmp_path / "b", lengths)
    assert out_stack == out_loop and len(with_stack) == len(loop)
    for i, (a, b) in enumerate(zip(with_stack, loop)):
        assert torch.equal(a, b), f"step {i}: logits differ"


@needs_vnni
def test_only_decode_steps_of_models_it_covers_take_it(smollm2_dir, monkeypatch):
    from llmos.drivers.model.paged_attention import PagedStep
    from llmos.drivers.model.runner import ModelRunner

    bf16 = ModelRunner(smollm2_dir, dtype="bfloat16")
    assert bf16.lean.stack.dense and not bf16.lean.stack.four_bit   # packed bf16 products only
    assert ModelRunner(smollm2_dir, dtype="float32").lean.stack is None   # no native fp32 norms: the loop
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

    assert stack.serves(step(4), x) and stack.four_bit and stack.dense
    assert stack.serves(step(5), torch.zeros(5, 576, dtype=torch.bfloat16))   # the packed copy's size
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
    def call(norms=s.norms, products=s.products, packed=s.packed, dense=False, pool=()):
        ext.decode_stack(x, cos, sin, norms, products, s.biases, packed, s.packed_biases, [], dense, list(pool),
                         torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
                         torch.ones(1, dtype=torch.long), 9, 3, 64, 1e-5, 8, 0.125)
    with pytest.raises(RuntimeError, match="two norms a layer"):
        call(norms=s.norms[:1])
    with pytest.raises(RuntimeError, match="four products a layer"):
        call(products=s.products[:-1])
    with pytest.raises(RuntimeError, match="four packed products a layer"):
        call(packed=s.packed[:-1], dense=True)
    with pytest.raises(RuntimeError, match="four pool views"):
        call()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    logits, outs = _run(runner, tok, tmp_path)
    assert all(len(o) == n for o, n in zip(outs, (12, 9, 6, 3)))
