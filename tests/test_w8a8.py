"""Linears in int8 arithmetic (--dtype int8, csrc/w8a8.cpp): the product against its float
definition, its guards, and which rows of a quantized linear take it."""
from __future__ import annotations

import pytest
import torch

from llmos.drivers.model import native, quant
from llmos.drivers.model.w8a8 import W8A8Linear

ext = native.load()
pytestmark = pytest.mark.skipif(ext is None or not hasattr(ext, "w8a8_linear"), reason="no C++ kernels here")


def definition(x: torch.Tensor, lin: W8A8Linear) -> torch.Tensor:
    """What the op computes: each row's codes as the op makes them (float32: scale max|x| / 127,
    code = x * (1 / scale) rounded half away from zero), the integer sums exact (float64), the
    int8 weights at their row scales."""
    x = x.float()
    s = x.abs().amax(1, keepdim=True) / 127
    s[s == 0] = 1
    v = x * (1 / s)
    xq = (v + torch.where(v < 0, -0.5, 0.5)).trunc().clamp(-127, 127)
    y = (xq.double() @ lin.wq.double()) * s.double() * lin.w_scale.double()
    return y if lin.bias_f32 is None else y + lin.bias_f32.double()


@pytest.mark.parametrize("m,k,n,bias", [(1, 64, 48, True), (70, 576, 960, False), (9, 40, 24, True),
                                        (130, 1536, 576, True), (3, 17, 5, False)])
def test_the_product_is_its_definition_to_bf16_rounding(m, k, n, bias):
    gen = torch.Generator().manual_seed(m + k + n)
    w = torch.randn(n, k, generator=gen) / 8
    lin = W8A8Linear(w, torch.randn(n, generator=gen) if bias else None, ext)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4).bfloat16()
    x[0, : k // 3] = 0   # a row need not be dense
    got = lin(x)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    want = definition(x, lin)
    assert ((got.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-3).all()   # bf16's own rounding
    exact = x.double() @ w.double().t() + (lin.bias_f32.double() if bias else 0)
    assert (got.double() - exact).abs().max() < 0.05 * exact.abs().max()      # and near the float product


def test_zero_rows_give_the_bias():
    lin = W8A8Linear(torch.randn(32, 64), torch.arange(32.0), ext)
    assert torch.equal(lin(torch.zeros(2, 64, dtype=torch.bfloat16)).float(), torch.arange(32.0).expand(2, 32))


@pytest.mark.parametrize("bad", ["x dtype", "k", "scale", "bias"])
def test_bad_arguments_are_refused_then_a_good_call_works(bad):
    lin = W8A8Linear(torch.randn(32, 64), torch.randn(32), ext)
    x = torch.randn(4, 64).bfloat16()
    args = dict(x=x, wq=lin.wq, w_scale=lin.w_scale, bias=lin.bias_f32)
    if bad == "x dtype":
        args["x"] = x.float()
    elif bad == "k":
        args["x"] = torch.randn(4, 63).bfloat16()
    elif bad == "scale":
        args["w_scale"] = lin.w_scale[:-1].clone()
    else:
        args["bias"] = lin.bias_f32.double()
    with pytest.raises(RuntimeError):
        ext.w8a8_linear(**args)
    assert torch.equal(lin(x), ext.w8a8_linear(x, lin.wq, lin.w_scale, lin.bias_f32))
    assert ((lin(x).double() - definition(x, lin)).abs() <= definition(x, lin).abs() * 2 ** -8 + 1e-3).all()


def test_only_steps_of_int8_rows_or_more_take_the_int8_copy():
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = quant.Int4Linear(linear, int8_dense=True)
    assert isinstance(layer.dense_int8, W8A8Linear) and quant.Int4Linear(linear).dense_int8 is None
    for rows, path in [(quant.SMALL_STEP + 1, layer.dense), (quant.INT8_ROWS - 1, layer.dense),
                       (quant.INT8_ROWS, layer.dense_int8), (quant.INT8_ROWS + 40, layer.dense_int8)]:
        x = torch.randn(rows, 64, generator=gen).bfloat16()
        assert torch.equal(layer(x), path(x)), rows
    assert layer.nbytes() == quant.Int4Linear(linear).nbytes() + 64 * 48 + 4 * 48   # the int8 copy counted
