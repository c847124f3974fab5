"""Sparse convolution, transposed convolution and pooling equal their dense counterparts.

Properties (hypothesis draws dimension 1-4, extent, occupancy, batch size, channels,
kernel size, stride, dilation):

* ``MinkowskiConvolution`` equals dense ``conv{1,2,3}d`` on the voxel grid (zeros at empty
  sites; padding ``(k // 2) * dilation`` each side for odd kernels, ``(k - 1) * dilation``
  on the high side only for even ones; stride s) read at the output coordinates, which are
  the distinct ``floor(c / s) * s``.  In 4-D, where torch has no dense conv, the reference is
  the same sum of shifted dense grids.
* ``MinkowskiConvolutionTranspose`` equals dense ``conv_transpose{1,2,3}d`` of the coarse
  grid, read at the fine coordinates the downsampling came from; the generative transposed
  convolution equals it at every ``coarse + offset`` site.
* Sum pooling equals a dense convolution with a ones kernel; max pooling equals dense max
  pooling with ``-inf`` at empty sites; average pooling is sum pooling over the count of
  present points (empty sites are not averaged in); ``kernel_size == stride`` pools each
  point into its strided parent, as dense pooling without padding does.
* Gradients of every op equal float64 finite differences (``torch.autograd.gradcheck``).
* Output coordinates that would leave int32 (a region expanded, or a coordinate floored by a
  stride, past the int32 edge) raise an error naming the layer, its kernel and stride; at the
  edge but inside, the output coordinates are exact.

float32 tolerance 1e-5 relative: each output is a sum of at most 81 * 4 products, summed in a
different order from the dense kernel; float32's 2^-24 rounding accumulates to ~1e-6.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import sparsify.spatial as ME
from tests.helpers import rel_err

RTOL = 1e-5


@st.composite
def scenes(draw, dims=(1, 2, 3, 4)):
    d = draw(st.sampled_from(dims))
    max_ext = {1: 12, 2: 8, 3: 6, 4: 4}[d]
    ext = tuple(draw(st.integers(2, max_ext)) for _ in range(d))
    batch = draw(st.integers(1, 2))
    occ = draw(st.floats(0.05, 0.7))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand((batch, *ext), generator=g) < occ
    mask.view(-1)[torch.randint(mask.numel(), (1,), generator=g)] = True  # never empty
    coords = torch.nonzero(mask).to(torch.int32)
    coords = coords[torch.randperm(coords.shape[0], generator=g)]  # any row order
    cin = draw(st.integers(1, 3))
    feats = torch.randn(coords.shape[0], cin, generator=g, dtype=torch.float64)
    return d, ext, batch, coords, feats, g


def dense_grid(coords: torch.Tensor, feats: torch.Tensor, batch: int, ext, stride: int = 1) -> torch.Tensor:
    size = [-(-e // stride) + 1 for e in ext]
    grid = feats.new_zeros(batch, feats.shape[1], *size)
    idx = (coords[:, 0].long(), slice(None), *[(coords[:, 1 + i] // stride).long() for i in range(len(ext))])
    grid[(idx[0], slice(None), *idx[2:])] = feats
    return grid


def me_to_dense_weight(w: torch.Tensor, ks) -> torch.Tensor:
    """ME kernel [K, in, out] (axis 0 fastest) -> dense [out, in, k0, ..., k_{D-1}]."""
    d = len(ks)
    w = w.reshape(*reversed(ks), w.shape[1], w.shape[2])  # [k_{D-1}, ..., k0, in, out]
    perm = [d + 1, d] + list(range(d - 1, -1, -1))
    return w.permute(*perm).contiguous()


def pads(k: int, dil: int) -> tuple[int, int]:
    return ((k // 2) * dil, (k // 2) * dil) if k % 2 else (0, (k - 1) * dil)


def shifted_sum_conv(grid: torch.Tensor, w_me: torch.Tensor, ks, dil, stride) -> torch.Tensor:
    """Dense convolution of any dimension as a sum over kernel offsets of shifted grids."""
    d = len(ks)
    lo_hi = [pads(k, dil) for k in ks]
    padded = F.pad(grid, [p for lh in reversed(lo_hi) for p in lh])
    spatial = grid.shape[2:]
    out = grid.new_zeros(grid.shape[0], w_me.shape[2], *spatial)
    for k, a in enumerate(itertools.product(*[range(k_) for k_ in reversed(ks)])):
        a = tuple(reversed(a))  # axis 0 fastest
        sl = [slice(None), slice(None)] + [slice(a[i] * dil, a[i] * dil + spatial[i]) for i in range(d)]
        out = out + torch.einsum("bi...,io->bo...", padded[tuple(sl)], w_me[k])
    return out[(slice(None), slice(None)) + tuple(slice(None, None, stride) for _ in range(d))]


def dense_conv(grid, w_me, ks, dil, stride):
    d = len(ks)
    if d == 4:
        return shifted_sum_conv(grid, w_me, ks, dil, stride)
    lo_hi = [pads(k, dil) for k in ks]
    padded = F.pad(grid, [p for lh in reversed(lo_hi) for p in lh])
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d]
    return conv(padded, me_to_dense_weight(w_me, ks), stride=stride, dilation=dil)


def read_at(dense: torch.Tensor, coords: torch.Tensor, stride: int = 1) -> torch.Tensor:
    idx = [(coords[:, 1 + i] // stride).long() for i in range(coords.shape[1] - 1)]
    return dense.movedim(1, -1)[(coords[:, 0].long(), *idx)]


@given(scenes(), st.integers(1, 3), st.sampled_from([1, 2]), st.sampled_from([1, 2]), st.integers(1, 3), st.booleans())
def test_convolution_equals_dense_conv(scene, k, stride, dil, cout, bias):
    d, ext, batch, coords, feats, g = scene
    x = ME.SparseTensor(feats, coords)
    conv = ME.MinkowskiConvolution(feats.shape[1], cout, kernel_size=k, stride=stride, dilation=dil, bias=bias,
                                   dimension=d).double()
    y = conv(x)
    # output coordinates: the distinct floor(c / s) * s, in order of first appearance
    expect_c = torch.div(x.C[:, 1:], stride, rounding_mode="floor") * stride
    expect_c = torch.cat([x.C[:, :1], expect_c], 1)
    uniq = [tuple(r) for r in expect_c.tolist()]
    assert y.C.tolist() == [list(r) for r in dict.fromkeys(uniq)]
    assert y.tensor_stride == [stride] * d
    w = conv.kernel if conv.kernel.dim() == 3 else conv.kernel[None]
    ref = dense_conv(dense_grid(x.C, x.F, batch, ext), w.detach(), (k,) * d, dil, stride)
    ref = read_at(ref, y.C, stride)
    if bias:
        ref = ref + conv.bias.detach()
    assert rel_err(y.F, ref) < RTOL


@given(scenes(dims=(1, 2, 3)), st.sampled_from([2, 3]), st.sampled_from([2, 3]), st.integers(1, 3))
def test_transposed_convolution_equals_dense_conv_transpose(scene, k, stride, cout):
    d, ext, batch, coords, feats, g = scene
    x = ME.SparseTensor(feats, coords)
    down = ME.MinkowskiConvolution(feats.shape[1], 2, kernel_size=stride, stride=stride, dimension=d).double()
    coarse = down(x)
    up = ME.MinkowskiConvolutionTranspose(2, cout, kernel_size=k, stride=stride, dimension=d).double()
    y = up(coarse)
    assert y.coordinate_map_key == x.coordinate_map_key  # back on the map the downsampling came from
    cgrid = dense_grid(coarse.C, coarse.F, batch, ext, stride)
    w = me_to_dense_weight(up.kernel.detach(), (k,) * d).transpose(0, 1)  # [in, out, k...]
    full = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[d](cgrid, w, stride=stride)
    lo = (k // 2) if k % 2 else 0  # fine site f is full[f + lo]
    ref = read_at(full, torch.cat([y.C[:, :1], y.C[:, 1:] + lo], 1))
    assert rel_err(y.F, ref) < RTOL


@given(scenes(dims=(1, 2, 3)), st.sampled_from([2, 3]), st.sampled_from([1, 2]))
def test_generative_transpose_writes_every_offset_site(scene, k, stride):
    d, ext, batch, coords, feats, g = scene
    x = ME.SparseTensor(feats, coords * stride, tensor_stride=stride)
    up = ME.MinkowskiGenerativeConvolutionTranspose(feats.shape[1], 2, kernel_size=k, stride=stride, dimension=d).double()
    y = up(x)
    offs = ME.KernelGenerator(k, dimension=d).offsets((1,) * d)
    sites = {(int(c[0]), *(int(v) for v in c[1:] + o)) for c in x.C for o in offs}
    assert {tuple(r) for r in y.C.tolist()} == sites and len(y) == len(sites)
    # value: the sparse definition, y[c + offset_k] += x[c] @ W[k]
    ref = {s: torch.zeros(2, dtype=torch.float64) for s in sites}
    for c, f in zip(x.C.tolist(), x.F):
        for kk, o in enumerate(offs.tolist()):
            ref[(c[0], *[a + b for a, b in zip(c[1:], o)])] += f @ up.kernel[kk].detach()
    want = torch.stack([ref[tuple(r)] for r in y.C.tolist()])
    assert rel_err(y.F, want) < RTOL


@given(scenes(dims=(1, 2, 3)), st.sampled_from([(2, 2), (3, 3), (3, 1), (3, 2), (2, 1)]),
       st.sampled_from(["sum", "max", "avg"]))
def test_pooling_equals_dense_pooling(scene, ks_stride, mode):
    d, ext, batch, coords, feats, g = scene
    k, s = ks_stride
    x = ME.SparseTensor(feats, coords)
    layer = {"sum": ME.MinkowskiSumPooling, "max": ME.MinkowskiMaxPooling, "avg": ME.MinkowskiAvgPooling}[mode]
    y = layer(kernel_size=k, stride=s, dimension=d)(x)
    grid = dense_grid(x.C, x.F, batch, ext)
    occ = dense_grid(x.C, torch.ones_like(x.F[:, :1]), batch, ext)
    lo, hi = (0, 0) if k == s else pads(k, 1)
    padding = [p for _ in range(d) for p in (lo, hi + k)]  # extra high padding: every output window fits
    if mode == "max":
        neg = torch.where(occ.bool().expand_as(grid), grid, torch.full_like(grid, -torch.inf))
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[d]
        ref = pool(F.pad(neg, padding, value=-torch.inf), k, s)
    else:
        ones = torch.ones(1, 1, *(k,) * d, dtype=grid.dtype)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d]
        c = grid.shape[1]
        ref = conv(F.pad(grid, padding), ones.expand(c, 1, *(k,) * d), stride=s, groups=c)
        if mode == "avg":
            ref = ref / conv(F.pad(occ, padding), ones, stride=s)
    ref = read_at(ref, y.C, s)
    assert rel_err(y.F, ref) < RTOL


@given(scenes(dims=(2, 3)), st.sampled_from([1, 3]), st.sampled_from([1, 2]))
def test_channelwise_convolution_equals_grouped_dense_conv(scene, k, stride):
    d, ext, batch, coords, feats, g = scene
    x = ME.SparseTensor(feats, coords)
    conv = ME.MinkowskiChannelwiseConvolution(feats.shape[1], kernel_size=k, stride=stride, dimension=d).double()
    y = conv(x)
    c = feats.shape[1]
    w_me = torch.diag_embed(conv.kernel.detach())  # [K, C, C], zero off the diagonal
    ref = read_at(dense_conv(dense_grid(x.C, x.F, batch, ext), w_me, (k,) * d, 1, stride), y.C, stride)
    assert rel_err(y.F, ref) < RTOL and y.F.shape[1] == c


@given(scenes(dims=(1, 2, 3)), st.sampled_from(["sum", "avg", "max"]))
def test_global_pooling_reduces_each_batch_item(scene, mode):
    d, ext, batch, coords, feats, g = scene
    x = ME.SparseTensor(feats, coords)
    layer = {"sum": ME.MinkowskiGlobalSumPooling, "avg": ME.MinkowskiGlobalAvgPooling, "max": ME.MinkowskiGlobalMaxPooling}[mode]
    y = layer()(x)
    bs = sorted(set(x.C[:, 0].tolist()))
    assert y.C[:, 0].tolist() == bs and not y.C[:, 1:].any()
    fn = {"sum": lambda t: t.sum(0), "avg": lambda t: t.mean(0), "max": lambda t: t.amax(0)}[mode]
    want = torch.stack([fn(x.F[x.C[:, 0] == b]) for b in bs])
    assert rel_err(y.F, want) < RTOL


# ------------------------------------------------------------------ gradients
def _small(d=2, n_ext=4, seed=0, cin=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(2, *(n_ext,) * d, generator=g) < 0.5
    coords = torch.nonzero(mask).to(torch.int32)
    return coords, torch.randn(coords.shape[0], cin, dtype=torch.float64, generator=g)


@pytest.mark.parametrize("d", [1, 2, 3, 4])
@pytest.mark.parametrize("k,stride", [(3, 1), (2, 2), (3, 2)])
def test_convolution_gradcheck(d, k, stride):
    coords, feats = _small(d, 4 if d < 3 else 3)
    if d == 4:
        coords, feats = coords[:24], feats[:24]
    x = ME.SparseTensor(feats, coords)
    kg = ME.KernelGenerator(k, stride, dimension=d)
    cm = x.coordinate_manager
    km = kg.kernel_map(cm, x.coordinate_map_key, cm.stride(x.coordinate_map_key, (stride,) * d))
    w = torch.randn(k**d, 2, 2, dtype=torch.float64, requires_grad=True)
    f = feats.clone().requires_grad_(True)

    def fn(f, w):
        return torch.ops.sparsify.spatial_conv(f, w, km.in_idx, km.out_idx, list(km.k_offsets), km.n_out,
                                               km.identity_k, False)

    assert torch.autograd.gradcheck(fn, (f, w))


def test_layer_gradients_gradcheck():
    coords, feats = _small(3, 3)
    f = feats.clone().requires_grad_(True)
    conv = ME.MinkowskiConvolution(2, 3, kernel_size=2, stride=2, dimension=3).double()
    tconv = ME.MinkowskiConvolutionTranspose(3, 2, kernel_size=3, stride=2, dimension=3).double()
    cw = ME.MinkowskiChannelwiseConvolution(2, kernel_size=3, dimension=3).double()
    norm = ME.MinkowskiInstanceNorm(2).double()
    params = [conv.kernel, tconv.kernel, cw.kernel]

    cm_key = ME.SparseTensor(feats, coords)  # one coordinate manager: kernel maps are built once

    def fn(f, *ws):
        for p, w in zip(params, ws):
            p.data = w.detach()
        x = ME.SparseTensor(f, coordinate_map_key=cm_key.coordinate_map_key, coordinate_manager=cm_key.coordinate_manager)
        y = tconv(conv(x))
        y = cw(y)
        return norm(y).F, ME.MinkowskiGlobalAvgPooling()(y).F

    assert torch.autograd.gradcheck(lambda f: fn(f, *params), (f,))
    # the weights' gradients
    for i in range(3):
        ws = [p.detach().clone() for p in params]
        ws[i].requires_grad_(True)

        def g(w, i=i, ws=ws):
            x = ME.SparseTensor(feats, coordinate_map_key=cm_key.coordinate_map_key,
                                coordinate_manager=cm_key.coordinate_manager)
            mods = [conv, tconv, cw]
            keep = mods[i].kernel
            del mods[i].kernel
            mods[i].kernel = w
            try:
                return cw(tconv(conv(x))).F
            finally:
                del mods[i].kernel
                mods[i].kernel = keep

        assert torch.autograd.gradcheck(g, (ws[i],))


@pytest.mark.parametrize("mode", ["sum", "avg", "max"])
@pytest.mark.parametrize("k,stride", [(2, 2), (3, 1), (3, 2)])
def test_pooling_gradcheck(mode, k, stride):
    coords, feats = _small(2, 5)
    feats = feats + torch.arange(feats.numel(), dtype=torch.float64).reshape(feats.shape) * 0.1  # distinct: max is smooth
    f = feats.clone().requires_grad_(True)
    layer = {"sum": ME.MinkowskiSumPooling, "avg": ME.MinkowskiAvgPooling, "max": ME.MinkowskiMaxPooling}[mode]

    def fn(f):
        return layer(kernel_size=k, stride=stride, dimension=2)(ME.SparseTensor(f, coords)).F

    assert torch.autograd.gradcheck(fn, (f,))
    up = ME.MinkowskiPoolingTranspose(kernel_size=2, stride=2, dimension=2)

    def fn_up(f):
        x = ME.SparseTensor(f, coords)
        return up(ME.MinkowskiSumPooling(2, 2, dimension=2)(x)).F

    assert torch.autograd.gradcheck(fn_up, (f,))


def test_other_layers_gradcheck():
    """Union, pruning, broadcast, generative transposed convolution and 4-D pooling: float64 gradcheck."""
    coords, feats = _small(2, 4)
    coords4, feats4 = _small(4, 3)
    coords4, feats4 = coords4[:20], feats4[:20]
    base = ME.SparseTensor(feats, coords)
    cm, key = base.coordinate_manager, base.coordinate_map_key
    gen = ME.MinkowskiGenerativeConvolutionTranspose(2, 2, kernel_size=2, stride=1, dimension=2).double()
    other = ME.SparseTensor(feats[:5] * 0 + 1.0, coords[:5] + torch.tensor([0, 1, 0], dtype=torch.int32),
                            coordinate_manager=cm)

    def fn(f):
        x = ME.SparseTensor(f, coordinate_map_key=key, coordinate_manager=cm)
        u = ME.MinkowskiUnion()(x, other)
        p = ME.MinkowskiPruning()(x, x.C[:, 1] % 2 == 0)
        g = ME.MinkowskiGlobalMaxPooling()(x)
        b = ME.MinkowskiBroadcastMultiplication()(x, g)
        return u.F, p.F, b.F, gen(x).F

    assert torch.autograd.gradcheck(fn, (feats.clone().requires_grad_(True),))
    x4 = ME.SparseTensor(feats4, coords4)

    def fn4(f):
        x = ME.SparseTensor(f, coordinate_map_key=x4.coordinate_map_key, coordinate_manager=x4.coordinate_manager)
        return ME.MinkowskiAvgPooling(2, 2, dimension=4)(x).F, ME.MinkowskiSumPooling(3, 1, dimension=4)(x).F

    assert torch.autograd.gradcheck(fn4, (feats4.clone().requires_grad_(True),))


@given(scenes(dims=(4,)), st.sampled_from([(2, 2), (3, 1), (3, 2)]))
def test_pooling_in_4d_equals_the_dense_window_sum(scene, ks_stride):
    d, ext, batch, coords, feats, g = scene
    k, s = ks_stride
    x = ME.SparseTensor(feats, coords)
    y = ME.MinkowskiSumPooling(kernel_size=k, stride=s, dimension=4)(x)
    eye = torch.eye(feats.shape[1], dtype=feats.dtype).expand(k**4, -1, -1)  # sum pooling = conv with identity
    ref = read_at(shifted_sum_conv(dense_grid(x.C, x.F, batch, ext), eye, (k,) * 4, 1, s), y.C, s)
    assert rel_err(y.F, ref) < RTOL


INT32_MAX = 2**31 - 1


@given(st.sampled_from([1, 2, 3]), st.sampled_from([2, 3]), st.booleans(), st.integers(0, 3))
def test_region_expansion_past_int32_raises_naming_the_layer(d, k, high, margin):
    # a point `margin` cells from the int32 edge; a kernel reaching past it must not wrap
    edge = INT32_MAX - margin if high else -INT32_MAX - 1 + margin
    coords = torch.zeros(1, 1 + d, dtype=torch.int64)
    coords[0, 1] = edge
    x = ME.SparseTensor(torch.ones(1, 1, dtype=torch.float64), coords.to(torch.int32))
    up = ME.MinkowskiGenerativeConvolutionTranspose(1, 1, kernel_size=k, stride=1, dimension=d).double()
    offs = ME.KernelGenerator(k, dimension=d).offsets((1,) * d)
    sites = coords[:, 1:] + offs  # int64: the exact output coordinates
    if bool(((sites < -INT32_MAX - 1) | (sites > INT32_MAX)).any()):
        with pytest.raises(ValueError, match=rf"MinkowskiGenerativeConvolutionTranspose \(KernelGenerator\(kernel_size=\[{k}.*"
                                             r"outside the int32 range"):
            up(x)
    else:
        y = up(x)
        assert {tuple(r) for r in y.C.tolist()} == {(0, *r) for r in sites.tolist()}


@given(st.integers(0, 8), st.sampled_from([2, 3, 4, 5, 6]))
def test_downsampling_at_the_int32_floor_raises_or_is_exact(margin, s):
    c = -(2**31) + margin
    x = ME.SparseTensor(torch.ones(2, 1), torch.tensor([[0, c, 0], [0, 7, 0]], dtype=torch.int32))
    conv = ME.MinkowskiConvolution(1, 1, kernel_size=s, stride=s, dimension=2)
    want = (c // s) * s  # Python's floor division: exact
    if want < -(2**31):
        with pytest.raises(ValueError, match=rf"MinkowskiConvolution .*stride=\[{s}, {s}\].*outside the int32 range"):
            conv(x)
    else:
        assert conv(x).C[:, 1].tolist() == [want, (7 // s) * s]
