"""Decode attention backends agree with each other and with plain attention, on ragged
contexts in shuffled blocks; the choice of backend is checked."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmos import protocol
from llmos.drivers.model import decode_backends, native
from llmos.drivers.model.paged_attention import KVPool, plan_step

needs_native = pytest.mark.skipif(native.load() is None, reason="the C++ kernels did not build here")


def make_pool(dtype, blocks=40, bs=4, kvh=2, d=16, layers=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(layers, 2, blocks, bs, kvh, d, generator=gen).to(dtype)
    msg = protocol.MapKVPool("", "cpu", str(dtype).removeprefix("torch."), blocks, bs, layers, kvh, d)
    return KVPool(msg, tensor=kv)


def decode_step(pool, ctx_lens, seed=0, backend="gather"):
    """A step of single-token sequences with these context lengths, each in random blocks."""
    rng = np.random.default_rng(seed)
    bs = pool.block_size
    width = max(-(-c // bs) for c in ctx_lens) + 1
    ids = rng.permutation(pool.num_blocks)
    tables, used = np.full((len(ctx_lens), width), -1, dtype=np.int32), 0
    for i, c in enumerate(ctx_lens):
        n = -(-c // bs)
        tables[i, :n] = ids[used:used + n]
        used += n
    ones = np.ones(len(ctx_lens), dtype=np.int32)
    step, _ = plan_step(pool, ones, np.array(ctx_lens, dtype=np.int32) - 1, tables, backend=backend)
    return step, tables


def reference(pool, layer, q, tables, ctx_lens, scale):
    """Attention written out: each sequence alone, its context read slot by slot."""
    k_all, v_all = pool.slots(layer)
    kvh, g = pool.msg.num_kv_heads, q.shape[1] // pool.msg.num_kv_heads
    out = []
    for i, c in enumerate(ctx_lens):
        slots = [int(tables[i, t // pool.block_size]) * pool.block_size + t % pool.block_size for t in range(c)]
        k, v = k_all[slots].float(), v_all[slots].float()          # [c, KVH, D]
        qi = q[i].float().view(kvh, g, -1)
        w = torch.softmax(torch.einsum("hgd,thd->hgt", qi, k) * scale, dim=-1)
        out.append(torch.einsum("hgt,thd->hgd", w, v).reshape(kvh * g, -1))
    return torch.stack(out)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("kvh,groups,d", [(2, 1, 16), (3, 3, 64), (1, 4, 128), (2, 2, 24)])
@pytest.mark.parametrize("backend", ["gather", pytest.param("native", marks=needs_native)])
def test_backend_matches_attention_written_out(backend, dtype, tol, kvh, groups, d):
    pool = make_pool(dtype, kvh=kvh, d=d)
    ctx = [1, 4, 5, 13, 31, 2]       # a lone token, exactly one block, ragged tails, the longest
    step, tables = decode_step(pool, ctx, backend=backend)
    q = torch.randn(len(ctx), kvh * groups, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    for layer in range(2):
        got = decode_backends.get(backend)(step, layer, q, d ** -0.5).float()
        want = reference(pool, layer, q, tables, ctx, d ** -0.5)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=tol, rtol=tol), (got - want).abs().max()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bs,groups,d", [(16, 3, 64), (32, 1, 128), (64, 8, 64), (16, 9, 64)])
@pytest.mark.parametrize("backend", ["gather", pytest.param("native", marks=needs_native)])
def test_backend_on_long_contexts_in_big_blocks(backend, dtype, tol, bs, groups, d):
    """Blocks of 16-64 rows (the vector kernel works in chunks of 16 inside a block), long
    and ragged contexts, and scores spread wide enough that the running max keeps moving
    (q scaled up, so late rows can outscore everything before them). 9 heads a kv head is
    past the vector kernel's 8: the generic one runs."""
    pool = make_pool(dtype, blocks=64, bs=bs, kvh=2, d=d)
    ctx = [1, bs - 1, bs, bs + 1, 17, 33, 4 * bs + 7, 10 * bs]
    step, tables = decode_step(pool, ctx, seed=3, backend=backend)
    q = 4 * torch.randn(len(ctx), 2 * groups, d, generator=torch.Generator().manual_seed(2))
    q = q.to(dtype)
    got = decode_backends.get(backend)(step, 1, q, d ** -0.5).float()
    want = reference(pool, 1, q, tables, ctx, d ** -0.5)
    assert torch.allclose(got, want, atol=tol, rtol=tol), (got - want).abs().max()


@needs_native
@pytest.mark.parametrize("bad", [[0, 5], [5, -3], [5, 16 * 64 + 1]])
def test_native_refuses_context_lengths_out_of_its_table(bad):
    """A length of 0, below it, or past what the block table holds would read outside the
    sequence's blocks: refused with a reason, and the next good call answers right."""
    pool = make_pool(torch.float32, blocks=64, bs=16, kvh=1, d=64)
    step, tables = decode_step(pool, [40, 5], seed=2, backend="native")
    q = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3))
    k, v = pool.block_rows(0)
    wide = torch.zeros(2, 64, dtype=torch.long)
    wide[:, : step.dec_tables.shape[1]] = step.dec_tables
    with pytest.raises(RuntimeError, match="context length"):
        native.load().paged_decode(q, k, v, wide, torch.tensor(bad), 0.125)
    got = native.load().paged_decode(q, k, v, step.dec_tables, step.dec_ctx, 0.125)
    assert torch.allclose(got, reference(pool, 0, q, tables, [40, 5], 0.125), atol=1e-5, rtol=1e-5)


@needs_native
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("groups,d", [(3, 64), (1, 128)])
@pytest.mark.parametrize("parts", [0, 1, 2, 3, 7])
def test_native_split_contexts_merge_to_the_same_attention(parts, dtype, tol, groups, d):
    """One long chat has too few (sequence, kv head) pairs for the threads, so the kernel
    splits each context into ranges and merges them. Any split gives the same attention,
    including more ranges than a short context has blocks (empty ranges); 0 lets it choose."""
    pool = make_pool(dtype, blocks=64, bs=16, kvh=1, d=d)
    ctx = [700, 1, 20]
    step, tables = decode_step(pool, ctx, seed=5, backend="native")
    q = (4 * torch.randn(len(ctx), groups, d, generator=torch.Generator().manual_seed(6))).to(dtype)
    k, v = pool.block_rows(0)
    got = native.load().paged_decode(q, k, v, step.dec_tables, step.dec_ctx, d ** -0.5, parts).float()
    want = reference(pool, 0, q, tables, ctx, d ** -0.5)
    assert torch.allclose(got, want, atol=tol, rtol=tol), (got - want).abs().max()
    with pytest.raises(RuntimeError, match="parts"):
        native.load().paged_decode(q, k, v, step.dec_tables, step.dec_ctx, d ** -0.5, -1)


@needs_native
@pytest.mark.parametrize("parts", [1, 3])
def test_native_reads_bf16_queries_in_place_and_answers_in_bf16(parts):
    """bf16 queries on a bf16 pool: read as they lie (a view into the fused q/k/v rows) and
    answered in bf16, bit for bit the float path's output rounded to bf16 (direct and merged)."""
    pool = make_pool(torch.bfloat16, blocks=64, bs=16, kvh=3, d=64)
    ctx = [300, 7, 130]
    step, tables = decode_step(pool, ctx, seed=8, backend="native")
    qkv = (3 * torch.randn(len(ctx), 9 + 6, 64, generator=torch.Generator().manual_seed(9))).bfloat16()
    q = qkv[:, :9]                                   # row stride 15 heads, not 9
    k, v = pool.block_rows(0)
    got = native.load().paged_decode(q, k, v, step.dec_tables, step.dec_ctx, 0.125, parts)
    via_float = native.load().paged_decode(q.float(), k, v, step.dec_tables, step.dec_ctx, 0.125, parts)
    assert got.dtype == torch.bfloat16 and via_float.dtype == torch.float32
    assert torch.equal(got, via_float.bfloat16())
    want = reference(pool, 0, q.float(), tables, ctx, 0.125)
    assert torch.allclose(got.float(), want, atol=2e-2, rtol=2e-2)


@needs_native
def test_native_kernel_runs_on_all_of_torchs_threads():
    """The extension shares torch's OpenMP runtime: its parallel_for uses torch's thread
    count (built without -fopenmp, it had silently run on one thread)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert native.load().parallel_threads(64) == 2
        torch.set_num_threads(1)
        assert native.load().parallel_threads(64) == 1
    finally:
        torch.set_num_threads(before)


@needs_native
def test_native_reads_only_the_context_not_the_padding():
    pool = make_pool(torch.float32)
    ctx = [3, 9]
    step, tables = decode_step(pool, ctx, backend="native")
    q = torch.randn(2, 2, 16)
    before = decode_backends.native(step, 0, q, 0.25)
    unused = sorted(set(range(pool.num_blocks)) - set(int(b) for b in tables[tables >= 0]))
    pool.kv[:, :, unused] = float("nan")               # poison every block nobody owns
    for i, c in enumerate(ctx):                        # and the slots past each context
        last = int(tables[i, (c - 1) // pool.block_size])
        pool.kv[:, :, last, (c - 1) % pool.block_size + 1:] = float("nan")
    assert torch.equal(decode_backends.native(step, 0, q, 0.25), before)


def test_backend_choice(monkeypatch):
    monkeypatch.setenv("LLMOS_DECODE_BACKEND", "fastest")
    with pytest.raises(ValueError, match="choose one of"):
        decode_backends.choose(torch.device("cpu"))
    monkeypatch.setenv("LLMOS_DECODE_BACKEND", "native")
    with pytest.raises(ValueError, match="CPU only"):
        decode_backends.choose(torch.device("cuda"))
    monkeypatch.setenv("LLMOS_DECODE_BACKEND", "gather")
    assert decode_backends.choose(torch.device("cpu")) == "gather"
    monkeypatch.setenv("LLMOS_DECODE_BACKEND", "auto")
    assert decode_backends.choose(torch.device("cpu")) == ("gather" if native.load() is None else "native")
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("LLMOS_NATIVE", "0")             # no C++: auto falls back to gather
    assert decode_backends.choose(torch.device("cpu")) == "gather"
    # and native asked for by name refuses, saying why
    monkeypatch.setenv("LLMOS_DECODE_BACKEND", "native")
    with pytest.raises(RuntimeError, match="did not build"):
        decode_backends.choose(torch.device("cpu"))


@pytest.mark.parametrize("backend", ["gather", pytest.param("native", marks=needs_native)])
def test_runner_on_each_backend_generates_what_transformers_does(backend, tiny_model_dirs, tmp_path, monkeypatch):
    from conftest_model import PROMPTS, MiniKernel, hf_greedy
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmos.drivers.model.runner import ModelRunner

    d = tiny_model_dirs["llama"]
    monkeypatch.setenv("LLMOS_DECODE_BACKEND", backend)
    runner = ModelRunner(d)
    assert runner.decode_backend == backend
    ref = AutoModelForCausalLM.from_pretrained(d, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(d)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    k = MiniKernel(runner, tmp_path, block_size=4)
    seqs = [k.add(p, 20) for p in prompts]
    k.run()
    for s, p in zip(seqs, prompts):
        want = hf_greedy(ref, p, 20)
        assert s.out[: len(want)] == want
