"""Block-sparse convolution: every nn.Conv setting, both CPU paths, against F.conv with the masked dense weight.

Properties (hypothesis draws shapes, block sizes, ragged channels, densities and
every groups=1 setting: stride, padding as ints / 'same' / 'valid', dilation,
padding_mode, bias; float64 so the comparison is exact up to summation order):
* the forward equals ``to_dense_module()`` (an nn.Conv with the masked weight);
* dX equals the dense conv's input gradient, dW equals the dense weight
  gradient at the stored blocks, dbias the dense bias gradient;
* both CPU paths (dense and the stored-blocks gather path) agree;
* the fused activation and residual equal ``act(conv) + residual``;
* the ops pass ``torch.library.opcheck`` (schema, fake impl, autograd registration).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sparsify.modules.block_sparse_conv import BlockSparseConv1d, BlockSparseConv2d
from sparsify.patterns import random_layout, small_world_layout

from .helpers import rel_err

# float64: ~1e-16 per operation; sums of a few thousand products in a different order stay within 1e-12.
TOL = 1e-11


@st.composite
def conv2d_cases(draw):
    b = draw(st.sampled_from([2, 4, 8]))
    cin = draw(st.integers(1, 3 * b))
    cout = draw(st.integers(1, 3 * b))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dil = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    padding = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = (1, 1) if padding == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if padding == "int":
        padding = draw(st.integers(0, 2))
    elif padding == "tuple":
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    # reflect needs padding < input size; the input is at least the kernel's reach plus the padding
    h = draw(st.integers(dil[0] * (kh - 1) + 3, 12))
    w = draw(st.integers(dil[1] * (kw - 1) + 3, 12))
    n = draw(st.integers(1, 3))
    density = draw(st.floats(0.05, 1.0))
    return dict(b=b, cin=cin, cout=cout, kernel=(kh, kw), stride=stride, padding=padding, dilation=dil, mode=mode,
                n=n, h=h, w=w, density=density, bias=draw(st.booleans()), seed=draw(st.integers(0, 1000)))


def _grads_against_dense(layer, x, monkeypatch, path):
    monkeypatch.setenv("SPARSIFY_CPU_PATH", path)
    ref = layer.to_dense_module()
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y, y_ref = layer(x1), ref(x2)
    assert y.shape == y_ref.shape
    assert rel_err(y, y_ref) < TOL
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert rel_err(x1.grad, x2.grad) < TOL
    # dW: the dense gradient, gathered at the stored blocks
    expect = type(layer)(layer.in_channels, layer.out_channels, layer.kernel_size, layer.layout, stride=layer.stride,
                         padding=layer.padding, dilation=layer.dilation, padding_mode=layer.padding_mode,
                         bias=False).double()
    expect.load_dense_weight_(ref.weight.grad)
    assert rel_err(layer.values.grad, expect.values) < TOL
    if layer.bias is not None:
        assert rel_err(layer.bias.grad, ref.bias.grad) < TOL
    layer.zero_grad()


@pytest.mark.parametrize("path", ["dense", "gather"])
@given(case=conv2d_cases())
def test_conv2d_equals_the_masked_dense_conv(path, case):
    with pytest.MonkeyPatch.context() as mp:
        torch.manual_seed(case["seed"])
        lay = random_layout((case["cout"], case["cin"]), case["b"], case["density"], seed=case["seed"])
        layer = BlockSparseConv2d(case["cin"], case["cout"], case["kernel"], lay, stride=case["stride"],
                                  padding=case["padding"], dilation=case["dilation"], padding_mode=case["mode"],
                                  bias=case["bias"]).double()
        x = torch.randn(case["n"], case["cin"], case["h"], case["w"], dtype=torch.float64)
        _grads_against_dense(layer, x, mp, path)


@pytest.mark.parametrize("path", ["dense", "gather"])
@given(b=st.sampled_from([2, 4, 8]), cin=st.integers(1, 20), cout=st.integers(1, 20), k=st.integers(1, 5),
       stride=st.integers(1, 3), dil=st.integers(1, 2), padding=st.sampled_from([0, 1, 2, "same", "valid"]),
       mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]), length=st.integers(12, 20),
       density=st.floats(0.1, 1.0), seed=st.integers(0, 1000))
def test_conv1d_equals_the_masked_dense_conv(path, b, cin, cout, k, stride, dil, padding, mode, length, density, seed):
    if padding == "same":
        stride = 1
    with pytest.MonkeyPatch.context() as mp:
        torch.manual_seed(seed)
        lay = small_world_layout((cout, cin), b, density, seed=seed)
        layer = BlockSparseConv1d(cin, cout, k, lay, stride=stride, padding=padding, dilation=dil,
                                  padding_mode=mode).double()
        x = torch.randn(2, cin, length, dtype=torch.float64)
        _grads_against_dense(layer, x, mp, path)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_fused_activation_and_residual(activation, monkeypatch):
    torch.manual_seed(0)
    lay = random_layout((24, 16), 8, 0.5, seed=3)
    layer = BlockSparseConv2d(16, 24, 3, lay, padding=1, activation=activation).double()
    x = torch.randn(2, 16, 7, 7, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 24, 7, 7, dtype=torch.float64, requires_grad=True)
    y = layer(x, res)
    act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[activation]
    x2 = x.detach().clone().requires_grad_(True)
    res2 = res.detach().clone().requires_grad_(True)
    w = layer.to_dense().detach().requires_grad_(True)
    y_ref = act(F.conv2d(x2, w, layer.bias.detach(), padding=1)) + res2
    assert rel_err(y, y_ref) < TOL
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert rel_err(x.grad, x2.grad) < TOL and rel_err(res.grad, res2.grad) < TOL
    assert isinstance(layer.to_dense_module(), nn.Sequential)


def test_from_dense_keeps_the_largest_channel_blocks_and_densify_restores_the_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), padding_mode="reflect")
    with torch.no_grad():
        conv.weight[:16, 16:] *= 10  # the largest block of block row 0
        conv.weight[16:, :16] *= 5  # ... and of block row 1
    layer = BlockSparseConv2d.from_dense(conv, density=0.5, block_size=16)
    assert layer.layout.block_mask().tolist() == [[False, True], [True, False]]
    dense = layer.to_dense_module()
    assert type(dense) is nn.Conv2d
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode"):
        assert getattr(dense, attr) == getattr(conv, attr), attr
    mask = layer.layout.element_mask()[:, :, None, None]
    assert torch.equal(dense.weight, conv.weight * mask)
    x = torch.randn(2, 32, 12, 12)
    assert rel_err(layer(x), dense(x)) < 1e-5  # float32: sums of 32*15 products


def test_unbatched_input_and_flops():
    lay = random_layout((8, 8), 4, 0.5)
    conv2 = BlockSparseConv2d(8, 8, 3, lay, padding=1)
    x = torch.randn(8, 6, 6)
    assert torch.allclose(conv2(x), conv2(x[None])[0])
    assert conv2.flops((1, 8, 6, 6)) == 2 * 36 * conv2.values.numel()
    conv1 = BlockSparseConv1d(8, 8, 3, lay, stride=2)
    assert conv1(torch.randn(8, 9)).shape == (8, 4)
    assert conv1.flops((5, 8, 9)) == 2 * 5 * 4 * conv1.values.numel()


def test_state_dict_carries_the_pattern():
    a = BlockSparseConv2d(16, 16, 3, random_layout((16, 16), 4, 0.25, seed=1))
    b = BlockSparseConv2d(16, 16, 3, random_layout((16, 16), 4, 0.5, seed=2))
    b.load_state_dict(a.state_dict())
    assert b.layout == a.layout and torch.equal(b.values, a.values)
    x = torch.randn(1, 16, 5, 5)
    assert torch.equal(a(x), b(x))
    assert "density=0.25" in repr(a) and "nnz_blocks=4" in repr(a)


@pytest.mark.parametrize("density", [1.0, 0.25])
def test_init_keeps_each_outputs_variance_at_the_dense_default(density):
    # nn.Conv2d's default: U(-a, a), a = 1/sqrt(in * taps), variance a^2 / 3 per weight.
    torch.manual_seed(0)
    cin, cout, k, b = 64, 64, 3, 8
    lay = random_layout((cout, cin), b, density, seed=0)
    layer = BlockSparseConv2d(cin, cout, k, lay)
    full = cin * k * k
    a = 1 / math.sqrt(full)
    kept = lay.row_offsets.diff().double() * b * k * k  # kept fan-in per block row
    bound = a * (full / kept).sqrt()
    v = layer.values.detach().double()
    per_block = bound[lay.row_indices.long()]
    assert bool((v.abs().flatten(1).max(1).values <= per_block + 1e-7).all())
    # the sum over kept inputs has the dense layer's variance: kept * (a s)^2 / 3 = full * a^2 / 3 = 1/3
    w = layer.to_dense().detach().double().flatten(1)
    row_var = (w.pow(2).sum(1)).mean()
    assert abs(float(row_var) - 1 / 3) < 0.05  # 64 rows x ~150-600 draws each
    if density == 1.0:
        assert abs(float(v.abs().max()) - a) < 0.01 * a


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(groups=2), "groups=2 is not supported"),
        (dict(padding_mode="mirror"), "padding_mode must be one of"),
        (dict(padding="full"), "padding must be an int"),
        (dict(padding="same", stride=2), "not supported for strided"),
        (dict(activation="tanh"), "unknown activation"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockSparseConv2d(8, 8, 3, random_layout((8, 8), 4, 0.5), **kwargs)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"expected a layout of shape \(8, 16\)"):
        BlockSparseConv2d(16, 8, 3, random_layout((8, 8), 4, 0.5))
    conv = BlockSparseConv2d(8, 8, 3, random_layout((8, 8), 4, 0.5))
    with pytest.raises(ValueError, match="expected 8 input channels"):
        conv(torch.randn(1, 7, 5, 5))
    with pytest.raises(TypeError, match="dtype torch.float32"):
        conv(torch.randn(1, 8, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="does not fit"):
        conv(torch.randn(1, 8, 2, 2))
    with pytest.raises(TypeError, match="expected an Conv2d"):
        BlockSparseConv2d.from_dense(nn.Conv1d(8, 8, 3), density=0.5, block_size=4)
    with pytest.raises(ValueError, match="groups=2"):
        BlockSparseConv2d.from_dense(nn.Conv2d(8, 8, 3, groups=2), density=0.5, block_size=4)


def test_ops_pass_opcheck(monkeypatch):
    monkeypatch.setenv("SPARSIFY_CPU_PATH", "gather")
    torch.manual_seed(0)
    lay = random_layout((12, 10), 4, 0.5, seed=0)
    layer = BlockSparseConv2d(10, 12, (3, 2), lay, stride=(2, 1), padding=(1, 0), dilation=(1, 2)).double()
    x = torch.randn(2, 10, 7, 8, dtype=torch.float64, requires_grad=True)
    meta = layer._meta()
    args = (x, layer.values, *meta, layer.bias, None, 12, [2, 1], [1, 0], [1, 2], "relu")
    torch.library.opcheck(torch.ops.sparsify.bsconv2d, args)
    dy = torch.randn(2, 12, 4, 6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.sparsify.bsconv2d_dx,
                          (dy, layer.values.detach(), *meta, 10, 7, 8, [2, 1], [1, 0], [1, 2]))
    torch.library.opcheck(torch.ops.sparsify.bsconv2d_dw,
                          (dy, x.detach(), *meta, 4, 3, 2, [2, 1], [1, 0], [1, 2]))


def test_exports_and_compiles():
    torch.manual_seed(0)
    layer = BlockSparseConv2d(8, 16, 3, random_layout((16, 8), 4, 0.5), padding="same", padding_mode="reflect")
    x = torch.randn(2, 8, 6, 6)
    ep = torch.export.export(layer, (x,))
    assert torch.allclose(ep.module()(x), layer(x))
    assert any("bsconv2d" in str(n.target) for n in ep.graph.nodes)


@pytest.mark.parametrize("density", [1.0, 0.25])
def test_block_sparse_linear_init_keeps_each_outputs_variance(density):
    from sparsify.modules.block_sparse import BlockSparseLinear

    torch.manual_seed(0)
    lay = random_layout((128, 256), 16, density, seed=4)
    layer = BlockSparseLinear(256, 128, lay)
    w = layer.to_dense().detach().double()
    kept = lay.row_offsets.diff().double().repeat_interleave(16) * 16
    assert bool((w.abs().max(1).values <= 1 / kept.sqrt() + 1e-7).all())  # U(-1/sqrt(kept), 1/sqrt(kept))
    assert abs(float(w.pow(2).sum(1).mean()) - 1 / 3) < 0.03  # nn.Linear's output variance, 128 rows
    if density == 1.0:  # nn.Linear's own bound
        assert abs(float(w.abs().max()) - 1 / 16) < 1e-3
