"""The dense -> sparse rewrite (``sparsify.spatial.from_dense`` / the ``sparsify_voxels`` pass).

Properties, for random voxel scenes (hypothesis: dimension, extent, occupancy, batch):
* every supported layer, alone, equals its dense counterpart read at the sparse output
  sites (max pooling on non-negative input, average pooling as window sum / volume);
* a whole network (strided convs, eval BatchNorm, activations, pooling, a transposed conv
  and a skip concatenation) equals **masked dense evaluation**: the dense network with each
  layer's output zeroed outside that layer's active sites (the documented semantics);
* layers without an exact sparse form are refused with the layer's name and the reason;
  the dense model is never modified.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from hypothesis import given
from hypothesis import strategies as st
from sparsify.passes.sparsify_voxels import VoxelRewriteError
from torch import nn

import sparsify.spatial as ME
from tests.helpers import rel_err

RTOL = 1e-9  # float64 throughout: only summation order differs


@st.composite
def grids(draw, dims=(1, 2, 3)):
    d = draw(st.sampled_from(dims))
    ext = tuple(draw(st.integers(4, {1: 16, 2: 10, 3: 6}[d])) for _ in range(d))
    batch = draw(st.integers(1, 2))
    occ = draw(st.floats(0.1, 0.6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = torch.rand(batch, *ext, generator=g) < occ
    mask.view(-1)[0] = True
    c = draw(st.integers(1, 3))
    grid = torch.randn(batch, c, *ext, generator=g, dtype=torch.float64) * mask[:, None]
    grid = grid + mask[:, None] * 1e-3 * torch.sign(grid + 1e-9)  # no exact zeros at active sites
    return d, grid, mask


def sparse_of(grid, mask):
    coords = torch.nonzero(mask).to(torch.int32)
    feats = grid.movedim(1, -1)[mask]
    return ME.SparseTensor(feats, coords)


def read(dense, y):
    """``(dense values at y's sites, y's features)`` over the sites the dense output covers: a dense
    strided layer drops a last window that would leave the grid, where the sparse one has a point."""
    ts = torch.tensor(y.tensor_stride)
    idx = (y.C[:, 1:] // ts).long()
    inside = (idx < torch.tensor(dense.shape[2:])).all(1)
    # never vacuous; no fixed fraction: with an odd extent and stride 2 the last slice of windows
    # has no dense output in each axis (8 of 27 sites covered for a 5^3 grid)
    assert bool(inside.any())
    idx, b = idx[inside], y.C[inside, 0].long()
    return dense.movedim(1, -1)[(b, *idx.unbind(1))], y.F[inside]


def _layers(d, c):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[d]
    tconv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[d]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[d]
    mp = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[d]
    ap = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[d]
    inorm = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[d]
    bnm = bn(c)
    with torch.no_grad():
        bnm.running_mean.uniform_(-1, 1)
        bnm.running_var.uniform_(0.5, 2)
        bnm.weight.uniform_(0.5, 2)
        bnm.bias.uniform_(-1, 1)
    return {
        "conv3": conv(c, 4, 3, padding=1),
        "conv3_dil2": conv(c, 2, 3, padding=2, dilation=2),
        "conv2_s2": conv(c, 3, 2, stride=2),
        "conv3_s2": conv(c, 3, 3, stride=2, padding=1, bias=False),
        "conv_same": conv(c, 2, 3, padding="same"),
        "grouped": conv(c, 2 * c, 3, padding=1, groups=c),
        "bn_eval": bnm.eval(),
        "instance_norm": inorm(c, affine=True),
        "relu": nn.ReLU(),
        "gelu": nn.GELU(),
        "leaky": nn.LeakyReLU(0.2),
        "maxpool2": mp(2),
        "maxpool3_s1": mp(3, 1, 1),
        "avgpool2": ap(2),
        "tconv_identity": tconv(c, 3, 3, padding=1),
    }


@given(grids(), st.sampled_from(sorted(_layers(1, 1))))
def test_each_layer_equals_its_dense_counterpart(g, name):
    d, grid, mask = g
    layer = _layers(d, grid.shape[1])[name].double()
    x = sparse_of(grid, mask)
    sparse = ME.from_dense(nn.Sequential(layer)).double()
    if name.startswith("maxpool"):  # exact for non-negative input (see the pass docstring)
        grid = grid.abs()
        x = x._with_features(x.F.abs())
    if name == "instance_norm":  # statistics over the active sites only: compare to them
        f = x.F
        outs = []
        for b in range(grid.shape[0]):
            fb = f[x.C[:, 0] == b]
            outs.append((fb - fb.mean(0)) / torch.sqrt(fb.var(0, unbiased=False) + layer.eps) * layer.weight + layer.bias)
        want = torch.cat([o for o in outs])
        order = torch.argsort(x.C[:, 0], stable=True)
        y = sparse(x)
        assert rel_err(y.F[order], want) < RTOL
        return
    y = sparse(x)
    ref, got = read(layer(grid), y)
    assert rel_err(got, ref) < RTOL


class UNetish(nn.Module):
    def __init__(self, d, c):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[d]
        tconv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[d]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[d]
        mp = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[d]
        self.stem = conv(c, 4, 3, padding=1)
        self.bn = bn(4)
        self.down = conv(4, 6, 2, stride=2)
        self.mid = conv(6, 6, 3, padding=1)
        self.pool = mp(3, 1, 1)
        self.up = tconv(6, 4, 2, stride=2)
        self.head = conv(8, 2, 1)

    def forward(self, x):
        s = torch.relu(self.bn(self.stem(x)))
        y = torch.relu(self.down(s))
        y = self.pool(torch.relu(self.mid(y))) + y
        y = self.up(y)
        return self.head(torch.cat([y, s], dim=1))


def masked_dense(dense_gm: fx.GraphModule, sparse_gm: fx.GraphModule, grid, x):
    """Run the dense graph, zeroing each node's output outside the active sites of the same node
    of the sparse graph (at that node's tensor stride)."""
    sparse_vals = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            sparse_vals[n.name] = out
            return out

    Record(sparse_gm).run(x)

    class Masked(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            sv = sparse_vals.get(n.name)
            if isinstance(out, torch.Tensor) and isinstance(sv, ME.SparseTensor):
                m = torch.zeros(out.shape[0], *out.shape[2:], dtype=torch.bool)
                ts = torch.tensor(sv.tensor_stride)
                m[(sv.C[:, 0].long(), *(sv.C[:, 1:] // ts).long().unbind(1))] = True
                out = out * m[:, None]
            return out

    return Masked(dense_gm).run(grid), sparse_vals


@given(grids(dims=(1, 2, 3)))
def test_network_equals_masked_dense_evaluation(g):
    d, grid, mask = g
    # even extents, so the dense skip connection's shapes match after down- and upsampling
    pad = [p for e in reversed(grid.shape[2:]) for p in (0, e % 2)]
    grid, mask = torch.nn.functional.pad(grid, pad), torch.nn.functional.pad(mask, pad)
    torch.manual_seed(0)
    dense = UNetish(d, grid.shape[1]).double().eval()
    with torch.no_grad():
        dense.bn.running_mean.uniform_(-1, 1)
        dense.bn.running_var.uniform_(0.5, 2)
    before = copy.deepcopy(dense.state_dict())
    sparse = ME.from_dense(dense)
    x = sparse_of(grid, mask)
    ref, vals = masked_dense(fx.symbolic_trace(dense), sparse, grid, x)
    y = sparse(x)
    assert y.coordinate_map_key == x.coordinate_map_key
    want, got = read(ref, y)
    assert rel_err(got, want) < RTOL and len(got) == len(y)
    after = dense.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the dense model is untouched


def test_train_mode_batchnorm_uses_active_site_statistics():
    bn = nn.BatchNorm2d(2).double()
    sparse = ME.from_dense(nn.Sequential(bn)).train()
    grid = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    grid[0, :, 1, 1] = torch.tensor([1.0, 2.0])
    grid[0, :, 2, 3] = torch.tensor([3.0, 6.0])
    y = sparse(ME.to_sparse(grid))
    assert torch.allclose(y.F, torch.tensor([[-1.0, -1.0], [1.0, 1.0]], dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("layer,match", [
    (nn.Conv2d(1, 2, 3), r"padding \(0, 0\).*\(1, 1\)"),
    (nn.Conv2d(1, 2, 2, padding=1), "shift the output grid"),
    (nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), "padding_mode"),
    (nn.MaxPool2d(3, 2), "pools kernel == stride"),
    (nn.MaxPool2d(2, ceil_mode=True), "ceil_mode"),
    (nn.Linear(3, 3), "no sparse form"),
])
def test_layers_without_a_sparse_form_are_refused_by_name(layer, match):
    with pytest.raises(VoxelRewriteError, match=match):
        ME.from_dense(nn.Sequential(layer))


def test_dense_only_functions_are_refused():
    class Flat(nn.Module):
        def forward(self, x):
            return x.flatten(1)

    with pytest.raises(VoxelRewriteError, match=r"\.flatten\(\)"):
        ME.from_dense(Flat())

    class Pad(nn.Module):
        def forward(self, x):
            return torch.nn.functional.pad(x, [1, 1])

    with pytest.raises(VoxelRewriteError, match="pad"):
        ME.from_dense(Pad())
    with pytest.raises(ValueError):  # VoxelRewriteError is a ValueError
        ME.from_dense(nn.Sequential(nn.Flatten()))
