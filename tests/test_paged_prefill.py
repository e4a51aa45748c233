"""The native prefill kernel (csrc/paged_prefill.cpp) against attention written out: packed
steps of fresh prompts, chunked continuations and decodes, in shuffled blocks; its guards;
and on the real model, logits as close to fp32 as torch's SDPA gets them."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from test_decode_backends import make_pool as random_pool

from llmos.drivers.model import native
from llmos.drivers.model.paged_attention import attend, plan_step


def _kernel_here() -> bool:
    ext = native.load()
    if ext is None:
        return False
    one = torch.zeros(1, 1, 64, dtype=torch.bfloat16)
    kv = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16)
    z = torch.zeros(1, dtype=torch.long)
    return ext.paged_prefill_bf16(one, kv, kv, z[None], z, z + 1, z, one.clone(), 1.0)


needs_kernel = pytest.mark.skipif(not _kernel_here(), reason="no AVX-512 BF16 kernel in this build (SDPA serves)")


def make_pool(kvh, d, bs, blocks=160, layers=1, dtype=torch.bfloat16):
    return random_pool(dtype, blocks=blocks, bs=bs, kvh=kvh, d=d, layers=layers)


def packed_step(pool, seqs, seed=0, backend="native"):
    """seqs: (start, new tokens) each, in random blocks of the pool."""
    rng = np.random.default_rng(seed)
    bs = pool.block_size
    width = max(-(-(s + n) // bs) for s, n in seqs) + 1
    ids = rng.permutation(pool.num_blocks)
    tables, used = np.full((len(seqs), width), -1, dtype=np.int32), 0
    for i, (s, n) in enumerate(seqs):
        k = -(-(s + n) // bs)
        tables[i, :k] = ids[used:used + k]
        used += k
    num_new = np.array([n for _, n in seqs], dtype=np.int32)
    start = np.array([s for s, _ in seqs], dtype=np.int32)
    return plan_step(pool, num_new, start, tables, backend=backend)[0], tables


def written_out(pool, q, k_new, v_new, seqs, tables, scale):
    """Each sequence alone in float64: its context is the pool's earlier slots plus its new k/v."""
    k_all, v_all = pool.slots(0)
    bs, kvh = pool.block_size, pool.msg.num_kv_heads
    g = q.shape[1] // kvh
    out, row = [], 0
    for i, (s, n) in enumerate(seqs):
        slots = [int(tables[i, t // bs]) * bs + t % bs for t in range(s)]
        k = torch.cat([k_all[slots].double(), k_new[row:row + n].double()])
        v = torch.cat([v_all[slots].double(), v_new[row:row + n].double()])
        qi = q[row:row + n].double().view(n, kvh, g, -1)
        w = torch.einsum("nhgd,thd->nhgt", qi, k) * scale
        causal = torch.arange(s + n)[None, :] > (s + torch.arange(n))[:, None]
        w = w.masked_fill(causal[:, None, None, :], float("-inf")).softmax(-1)
        out.append(torch.einsum("nhgt,thd->nhgd", w, v).reshape(n, kvh * g, -1))
        row += n
    return torch.cat(out)


# a fresh prompt past one tile and one chunk, a continuation whose chunk starts mid-block,
# a decode token beside them, a prompt of one tile exactly, a 2-token prompt
SEQS = [(0, 45), (37, 20), (60, 1), (0, 16), (0, 2)]


@needs_kernel
@pytest.mark.parametrize("kvh,groups,d,bs", [(3, 3, 64, 16), (2, 1, 64, 5), (1, 8, 128, 16), (2, 4, 128, 3)])
def test_kernel_matches_attention_written_out(kvh, groups, d, bs):
    pool = make_pool(kvh, d, bs)
    step, tables = packed_step(pool, SEQS)
    assert step.prefill_geom is not None
    T = sum(n for _, n in SEQS)
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(T, kvh * groups + 2 * kvh, d, generator=gen).bfloat16()   # q a strided view, as lean.py's
    q, k_new, v_new = qkv[:, :kvh * groups], qkv[:, kvh * groups:-kvh], qkv[:, -kvh:]
    want = written_out(pool, q, k_new, v_new, SEQS, tables, d ** -0.5)
    got = attend(step, 0, q, k_new, v_new, d ** -0.5)
    sdpa = attend(dataclasses.replace(step, prefill_geom=None), 0, q, k_new, v_new, d ** -0.5)
    err, sdpa_err = (got.double() - want).abs().max().item(), (sdpa.double() - want).abs().max().item()
    assert err < 2e-2, err
    assert err <= 2 * sdpa_err + 1e-3, (err, sdpa_err)   # as close as SDPA's bf16 path


@needs_kernel
def test_rows_it_does_not_own_are_left_alone():
    pool = make_pool(3, 64, 16)
    step, _ = packed_step(pool, SEQS)
    tables, q0, lens, starts = step.prefill_geom
    q = torch.randn(70, 9, 64).bfloat16()
    out = torch.full_like(q, 7.0)
    k, v = pool.block_rows(0)
    ext = native.load()
    assert ext.paged_prefill_bf16(q, k, v, tables[:1], q0[:1], lens[:1], starts[:1], out, 0.125)
    assert (out[45:] == 7.0).all() and not (out[:45] == 7.0).any()


@needs_kernel
@pytest.mark.parametrize("bad", ["block", "rows", "start", "dtype"])
def test_bad_geometry_refused_then_a_good_call_works(bad):
    pool = make_pool(3, 64, 16)
    step, _ = packed_step(pool, [(0, 20)])
    tables, q0, lens, starts = (t.clone() for t in step.prefill_geom)
    q = torch.randn(20, 9, 64).bfloat16()
    want = attend(dataclasses.replace(step, prefill_geom=None), 0, q, q[:, :3], q[:, 3:6], 0.125)  # k/v into the pool
    out = torch.empty_like(q)
    k, v = pool.block_rows(0)
    ext = native.load()
    args = dict(q=q, k_blocks=k, v_blocks=v, tables=tables, q0=q0, lens=lens, starts=starts, out=out, scale=0.125)
    if bad == "block":
        args["tables"] = tables.clone().fill_(pool.num_blocks)
    elif bad == "rows":
        args["lens"] = lens + 1
    elif bad == "start":
        args["starts"] = starts + tables.shape[1] * pool.block_size
    else:
        args["q"] = q.float()
    with pytest.raises(RuntimeError):
        ext.paged_prefill_bf16(**args)
    assert ext.paged_prefill_bf16(q, k, v, tables, q0, lens, starts, out, 0.125)
    assert (out.float() - want.float()).abs().max() < 2e-2


def test_float32_pools_and_the_switch_keep_sdpa(monkeypatch):
    pool = make_pool(3, 64, 16, dtype=torch.float32)
    step, tables = packed_step(pool, SEQS)
    T = sum(n for _, n in SEQS)
    q, k_new, v_new = torch.randn(T, 9, 64), torch.randn(T, 3, 64), torch.randn(T, 3, 64)
    got = attend(step, 0, q, k_new, v_new, 0.125)   # float32: the kernel declines, SDPA computes
    assert (got.double() - written_out(pool, q, k_new, v_new, SEQS, tables, 0.125)).abs().max() < 1e-5
    monkeypatch.setenv("LLMOS_PREFILL_KERNEL", "0")
    assert packed_step(make_pool(3, 64, 16), SEQS)[0].prefill_geom is None
    assert packed_step(make_pool(3, 64, 16), SEQS, backend="gather")[0].prefill_geom is None


@needs_kernel
def test_smollm2_prefill_as_close_to_fp32_as_sdpa(smollm2_dir):
    """The real model's bf16 prefill logits, the kernel's and SDPA's, against fp32 transformers."""
    from conftest_model import PROMPTS
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmos.drivers.model.runner import ModelRunner

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok(" ".join(PROMPTS) * 3, return_tensors="pt")["input_ids"][0, :300]
    runner = ModelRunner(smollm2_dir, dtype="bfloat16")
    info = runner.info()
    pool = make_pool(info["num_kv_heads"], info["head_dim"], 16, blocks=32, layers=info["num_layers"])
    step, _ = packed_step(pool, [(0, len(ids))])
    pos = torch.arange(len(ids))
    keep = torch.arange(len(ids))
    with torch.no_grad():
        got = runner.lean(ids, pos, keep, step).float()
        sdpa = runner.lean(ids, pos, keep, dataclasses.replace(step, prefill_geom=None)).float()
        fp32 = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)(ids[None]).logits[0]
    err, sdpa_err = (got - fp32).abs().mean().item(), (sdpa - fp32).abs().mean().item()
    assert err <= 1.25 * sdpa_err, (err, sdpa_err)
    agree = (got.argmax(-1) == fp32.argmax(-1)).float().mean().item()
    agree_sdpa = (sdpa.argmax(-1) == fp32.argmax(-1)).float().mean().item()
    assert agree >= agree_sdpa - 0.03, (agree, agree_sdpa)   # 300 positions: 0.989 and 0.994 on an EPYC
