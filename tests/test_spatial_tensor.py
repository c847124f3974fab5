"""SparseTensor, TensorField, the coordinate manager, utils and the feature-wise layers.

Properties:
* construction from coordinates keeps the distinct coordinates in order of first
  appearance and merges duplicates by the quantization mode (first row, mean, sum, max);
* ``dense()`` / ``to_sparse`` round-trip; ``sparse_quantize`` voxelizes like ``floor(p / q)``;
* the coordinate manager builds each kernel map once and reuses it (the transposed map is
  the forward one swapped); downsampling then upsampling returns to the same map;
* a TensorField sliced from the SparseTensor it made gives every point its voxel's features;
* union, pruning, broadcast, cat, batch / instance norm, linear and activations act on the
  features as their definitions say; bad input raises a specific error;
* the MinkUNet example trains for a few iterations (loss falls) with only the import changed;
* the layers re-trace: a model using them runs under ``torch.compile`` eager backend;
* coordinates a map cannot hold (NaN, +-inf, outside int32, a quantization_size that is not
  finite and positive or too small) raise a ValueError naming the row and column; nothing wraps;
* a negative batch index is refused at construction, naming its row and value (it is no item
  of the batch, and would otherwise become a batch of its own).
"""

from __future__ import annotations

import contextlib
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sparsify.runtime.spatial import CoordinateManager

import sparsify.spatial as ME
from tests.helpers import rel_err

ROOT = Path(__file__).resolve().parent.parent


@st.composite
def point_sets(draw):
    d = draw(st.integers(1, 4))
    n = draw(st.integers(1, 60))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    coords = torch.randint(-4, 5, (n, 1 + d), generator=g, dtype=torch.int32)
    coords[:, 0] = coords[:, 0].abs() % 3
    feats = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return d, coords, feats


@given(point_sets(), st.sampled_from(list(ME.SparseTensorQuantizationMode)))
def test_construction_merges_duplicates_by_quantization_mode(ps, mode):
    d, coords, feats = ps
    x = ME.SparseTensor(feats, coords, quantization_mode=mode)
    rows = [tuple(r) for r in coords.tolist()]
    order = list(dict.fromkeys(rows))
    assert [tuple(r) for r in x.C.tolist()] == order
    for i, r in enumerate(order):
        group = feats[[j for j, s in enumerate(rows) if s == r]]
        want = {
            ME.SparseTensorQuantizationMode.RANDOM_SUBSAMPLE: group[0],
            ME.SparseTensorQuantizationMode.NO_QUANTIZATION: group[0],
            ME.SparseTensorQuantizationMode.UNWEIGHTED_AVERAGE: group.mean(0),
            ME.SparseTensorQuantizationMode.UNWEIGHTED_SUM: group.sum(0),
            ME.SparseTensorQuantizationMode.MAX_POOL: group.amax(0),
        }[mode]
        assert torch.allclose(x.F[i], want)
    assert torch.equal(x.C[x.inverse_mapping], coords)


@given(point_sets())
def test_dense_round_trip(ps):
    d, coords, feats = ps
    x = ME.SparseTensor(feats, coords)
    dense, min_c, ts = x.dense(min_coordinate=torch.full((d,), -4, dtype=torch.int32))
    assert dense.shape[:2] == (int(x.C[:, 0].max()) + 1, 2)
    back = ME.to_sparse(dense)
    # every stored point comes back (points whose features are all zero cannot: none here)
    got = {tuple(r): f for r, f in zip((back.C + torch.tensor([0] + [-4] * d)).tolist(), back.F)}
    assert len(got) == len(x)
    for r, f in zip(x.C.tolist(), x.F):
        assert torch.equal(got[tuple(r)], f)


@given(st.integers(1, 200), st.floats(0.01, 0.5), st.integers(0, 1000))
def test_sparse_quantize_is_floor_and_unique(n, q, seed):
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, 3, (n,), generator=g)
    coords, feats, lab, idx, inv = ME.utils.sparse_quantize(pts, pts, labels, quantization_size=q,
                                                            return_index=True, return_inverse=True)
    vox = torch.floor(pts / q).to(torch.int32)
    assert torch.equal(coords[inv], vox) and torch.equal(coords, vox[idx])
    assert len({tuple(r) for r in coords.tolist()}) == len(coords)
    for i in range(len(coords)):
        members = labels[inv == i]
        assert lab[i] == (members[0] if bool((members == members[0]).all()) else -100)


def test_manager_caches_kernel_maps_and_upsampling_returns_to_the_same_map():
    coords = torch.randint(0, 10, (300, 4), dtype=torch.int32)
    coords[:, 0] = 0
    x = ME.SparseTensor(torch.randn(300, 4), coords)
    cm = x.coordinate_manager
    down = ME.MinkowskiConvolution(4, 4, kernel_size=2, stride=2, dimension=3)
    up = ME.MinkowskiConvolutionTranspose(4, 4, kernel_size=2, stride=2, dimension=3)
    y = down(x)
    n_maps = len(cm._kernel_maps)
    y2 = down(x)
    assert len(cm._kernel_maps) == n_maps and y2.coordinate_map_key == y.coordinate_map_key
    z = up(y)
    assert z.coordinate_map_key == x.coordinate_map_key
    fwd = cm.kernel_map(x.coordinate_map_key, y.coordinate_map_key, (2, 2, 2), (2, 2, 2))
    tr = cm.kernel_map(y.coordinate_map_key, x.coordinate_map_key, (2, 2, 2), (2, 2, 2), is_transpose=True)
    assert tr.in_idx is fwd.out_idx and tr.out_idx is fwd.in_idx
    # the strided map holds exactly the distinct floor(c / 2) * 2
    want = {tuple([0] + [v // 2 * 2 for v in r[1:]]) for r in x.C.tolist()}
    assert {tuple(r) for r in y.C.tolist()} == want


def test_tensor_field_slice_gives_each_point_its_voxel():
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(500, 3, generator=g) * 5
    coords = ME.utils.batched_coordinates([pts[:250], pts[250:]], dtype=torch.float32)
    feats = torch.randn(500, 3, generator=g)
    field = ME.TensorField(feats, coords)
    x = field.sparse()
    conv = ME.MinkowskiConvolution(3, 2, kernel_size=3, dimension=3)
    y = conv(x)
    out = y.slice(field)
    assert out.F.shape == (500, 2)
    vox = torch.floor(coords).int()
    row = {tuple(r): i for i, r in enumerate(y.C.tolist())}
    assert torch.equal(out.F, y.F[[row[tuple(r)] for r in vox.tolist()]])
    # average quantization: each voxel's feature is the mean of its points
    first = {}
    for i, r in enumerate(vox.tolist()):
        first.setdefault(tuple(r), []).append(i)
    for r, members in list(first.items())[:20]:
        assert torch.allclose(x.F[row[r]], feats[members].mean(0), atol=1e-6)
    # slicing a strided tensor maps each point to its coarse voxel
    coarse = ME.MinkowskiConvolution(3, 2, kernel_size=2, stride=2, dimension=3)(x)
    sl = coarse.slice(field)
    crow = {tuple(r): i for i, r in enumerate(coarse.C.tolist())}
    want = [crow[tuple([r[0]] + [v // 2 * 2 for v in r[1:]])] for r in vox.tolist()]
    assert torch.equal(sl.F, coarse.F[want])


def test_union_pruning_broadcast_cat_and_arithmetic():
    cm = CoordinateManager(D=2)
    a = ME.SparseTensor(torch.tensor([[1.0], [2.0]]), torch.tensor([[0, 0, 0], [0, 1, 1]], dtype=torch.int32),
                        coordinate_manager=cm)
    b = ME.SparseTensor(torch.tensor([[10.0], [20.0]]), torch.tensor([[0, 1, 1], [1, 2, 2]], dtype=torch.int32),
                        coordinate_manager=cm)
    u = ME.MinkowskiUnion()(a, b)
    assert dict(zip(map(tuple, u.C.tolist()), u.F.squeeze(1).tolist())) == {(0, 0, 0): 1.0, (0, 1, 1): 12.0, (1, 2, 2): 20.0}
    s = a + b  # different coordinates: the union
    assert sorted(s.F.squeeze(1).tolist()) == [1.0, 12.0, 20.0]
    p = ME.MinkowskiPruning()(u, u.F.squeeze(1) > 5)
    assert p.C.tolist() == [[0, 1, 1], [1, 2, 2]] and p.F.squeeze(1).tolist() == [12.0, 20.0]
    g = ME.MinkowskiGlobalSumPooling()(u)
    assert ME.MinkowskiBroadcastAddition()(u, g).F.squeeze(1).tolist() == [14.0, 25.0, 40.0]
    assert ME.MinkowskiBroadcastMultiplication()(u, g).F.squeeze(1).tolist() == [13.0, 156.0, 400.0]
    assert ME.MinkowskiBroadcastConcatenation()(u, g).F.tolist() == [[1.0, 13.0], [12.0, 13.0], [20.0, 20.0]]
    assert ME.cat(a, a * 2).F.tolist() == [[1.0, 2.0], [2.0, 4.0]]
    assert (a - a).F.abs().sum() == 0 and (2 * a / 2).F.tolist() == a.F.tolist()
    with pytest.raises(ValueError, match="share coordinates"):
        ME.cat(a, b)


def test_feature_layers_match_their_torch_definitions():
    coords = torch.randint(0, 6, (80, 3), dtype=torch.int32)
    coords[:, 0] = torch.arange(80) % 2
    x = ME.SparseTensor(torch.randn(80, 4, dtype=torch.float64), coords)
    lin = ME.MinkowskiLinear(4, 3).double()
    assert torch.equal(lin(x).F, lin.linear(x.F))
    bn = ME.MinkowskiBatchNorm(4).double()
    assert torch.allclose(bn(x).F, torch.nn.functional.batch_norm(x.F, None, None, bn.bn.weight, bn.bn.bias, True))
    for name in ("ReLU", "GELU", "Sigmoid", "Tanh", "SiLU", "LeakyReLU", "ELU", "Softplus"):
        layer = getattr(ME, f"Minkowski{name}")()
        assert torch.equal(layer(x).F, getattr(torch.nn, name)()(x.F))
    inorm = ME.MinkowskiInstanceNorm(4).double()(x)
    for b in (0, 1):
        f = x.F[x.C[:, 0] == b]
        want = (f - f.mean(0)) / torch.sqrt(f.var(0, unbiased=False) + 1e-5)
        assert rel_err(inorm.F[x.C[:, 0] == b], want) < 1e-12
    d = ME.MinkowskiDropout(0.5)
    d.eval()
    assert torch.equal(d(x).F, x.F)


def test_empty_input_runs_every_layer():
    # MinkowskiEngine segfaults here (#591); an empty tensor is a valid tensor
    x = ME.SparseTensor(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.int32))
    for layer in (ME.MinkowskiConvolution(3, 5, kernel_size=3, dimension=3),
                  ME.MinkowskiConvolution(3, 5, kernel_size=2, stride=2, dimension=3),
                  ME.MinkowskiMaxPooling(2, 2, dimension=3), ME.MinkowskiGlobalAvgPooling()):
        y = layer(x)
        assert len(y) == 0


def test_bad_input_is_refused_with_a_specific_error():
    c = torch.tensor([[0, 0, 0]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"\[N, 1 \+ D\]"):
        ME.SparseTensor(torch.ones(1, 2), torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="feature rows"):
        ME.SparseTensor(torch.ones(2, 2), c)
    with pytest.raises(ValueError, match="matrix"):
        ME.SparseTensor(torch.ones(1, 2, 2), c)
    x = ME.SparseTensor(torch.ones(1, 2), c)
    with pytest.raises(ValueError, match="input channels"):
        ME.MinkowskiConvolution(3, 4, kernel_size=3, dimension=2)(x)
    with pytest.raises(ValueError, match="dimension"):
        ME.MinkowskiConvolution(2, 4, kernel_size=3, dimension=3)(x)
    with pytest.raises(ValueError, match="dimension"):
        ME.MinkowskiConvolution(2, 4, kernel_size=3)
    with pytest.raises(ValueError, match="multiples of the tensor stride"):
        ME.SparseTensor(torch.ones(1, 2), torch.tensor([[0, 1, 2]], dtype=torch.int32), tensor_stride=2)
    with pytest.raises(ValueError, match="undo an earlier downsampling"):
        ME.MinkowskiConvolutionTranspose(2, 2, kernel_size=2, stride=2, dimension=2)(x)
    with pytest.raises(ValueError, match="odd kernel"):
        ME.KernelGenerator(2, region_type=ME.RegionType.HYPER_CROSS, dimension=2).offsets((1, 1))
    with pytest.raises(TypeError, match="SparseTensor"):
        ME.MinkowskiConvolution(2, 4, kernel_size=3, dimension=2)(torch.ones(3, 2))


def test_region_types_and_custom_offsets():
    coords = torch.tensor([[0, 0, 0], [0, 1, 0], [0, 1, 1], [0, 0, 2]], dtype=torch.int32)
    x = ME.SparseTensor(torch.eye(4), coords)
    cross = ME.MinkowskiConvolution(4, 4, kernel_generator=ME.KernelGenerator(
        3, region_type=ME.RegionType.HYPER_CROSS, dimension=2), dimension=2)
    assert cross.kernel.shape == (5, 4, 4)
    custom = ME.KernelGenerator(region_type=ME.RegionType.CUSTOM,
                                region_offsets=torch.tensor([[0, 0], [1, 0]]), dimension=2)
    conv = ME.MinkowskiConvolution(4, 4, kernel_generator=custom, dimension=2)
    with torch.no_grad():
        conv.kernel.copy_(torch.stack([torch.zeros(4, 4), torch.eye(4)]))
    y = conv(x)  # y[o] = x[o + (1, 0)]
    assert y.F.argmax(1).tolist() == [1, 0, 0, 0] and y.F.sum(1).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert cross(x).F.shape == (4, 4)


def test_layers_compile():
    coords = torch.randint(0, 5, (40, 4), dtype=torch.int32)
    coords[:, 0] = 0
    x = ME.SparseTensor(torch.randn(40, 3), coords)
    conv = ME.MinkowskiConvolution(3, 4, kernel_size=3, dimension=3)
    km = conv.kernel_generator.kernel_map(x.coordinate_manager, x.coordinate_map_key, x.coordinate_map_key)

    def f(feats, w):
        return torch.ops.sparsify.spatial_conv(feats, w, km.in_idx, km.out_idx, list(km.k_offsets), km.n_out,
                                               km.identity_k, False).relu()

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x.F, conv.kernel), f(x.F, conv.kernel))


def test_minkunet_example_trains(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["minkunet_segmentation.py"])
    mod = runpy.run_path(str(ROOT / "examples" / "minkunet_segmentation.py"), run_name="example")
    out = mod["main"](["--iters", "4", "--points", "1500", "--planes", "4", "--batch-size", "1", "--lr", "0.05"])
    hist = out["history"]
    assert len(hist) == 4 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]
    # the script is MinkowskiEngine's except for its import lines
    src = (ROOT / "examples" / "minkunet_segmentation.py").read_text()
    assert "import sparsify.spatial as ME" in src and "sparsify" not in src.replace(
        "import sparsify.spatial as ME", "").replace("from sparsify.spatial.modules.resnet_block import BasicBlock", "")


BAD_FLOATS = [float("nan"), float("inf"), float("-inf"), 1e12, -1e12, 2.0**31, -(2.0**31) - 1]


@given(st.integers(1, 20), st.integers(1, 3), st.data())
def test_int64_coordinates_outside_int32_raise_naming_the_row(n, d, data):
    coords = torch.zeros(n, 1 + d, dtype=torch.int64)
    coords[:, 1] = torch.arange(n)
    r, c = data.draw(st.integers(0, n - 1)), data.draw(st.integers(1, d))
    v = data.draw(st.one_of(st.integers(2**31, 2**62), st.integers(-(2**62), -(2**31) - 1)))
    coords[r, c] = v
    with pytest.raises(ValueError, match=rf"row {r}, column {c} is {v}, outside the int32 range"):
        ME.SparseTensor(torch.ones(n, 1), coords)
    with pytest.raises(ValueError, match=rf"row {r}, column {c} is {v}, outside the int32 range"):
        ME.TensorField(torch.ones(n, 1), coordinates=coords)
    # the int32 extremes themselves are coordinates, kept exactly and distinct
    coords[r, c] = -(2**31) if v < 0 else 2**31 - 1
    x = ME.SparseTensor(torch.ones(n, 1), coords)
    assert torch.equal(x.C.long(), coords)


@given(st.integers(1, 20), st.sampled_from(BAD_FLOATS), st.data())
def test_float_coordinates_that_are_not_finite_or_too_large_raise_naming_the_row(n, v, data):
    coords = torch.zeros(n, 4, dtype=torch.float64)
    coords[:, 1] = torch.arange(n) + 0.5
    r, c = data.draw(st.integers(0, n - 1)), data.draw(st.integers(1, 3))
    coords[r, c] = v
    why = "not a finite number" if v != v or abs(v) == float("inf") else "outside the int32 range"
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=rf"SparseTensor: coordinate row {r}, column {c} .*{why}"):
        ME.SparseTensor(torch.ones(n, 1), coords)
    # a field names the row when built, not a misleading box size at sparse()
    with pytest.raises(ValueError, match=rf"TensorField: coordinate row {r}, column {c} .*{why}"):
        ME.TensorField(torch.ones(n, 1), coordinates=coords).sparse()
    with pytest.raises(ValueError, match=rf"item 0\): coordinate row {r}, column {c - 1} .*{why}"):
        ME.utils.batched_coordinates([coords[:, 1:]])


def test_two_far_points_are_refused_not_merged():
    coords = torch.tensor([[0.0, 1e12, 0.0], [0.0, -1e12, 0.0]], dtype=torch.float64)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"row 0, column 1 is 1000000000000.0.*2 rows"):
        ME.SparseTensor(torch.ones(2, 1), coords)


@given(st.integers(1, 20), st.integers(1, 3), st.sampled_from([torch.int32, torch.int64, torch.float64]), st.data())
def test_a_negative_batch_index_is_refused_naming_its_row(n, d, dtype, data):
    coords = torch.zeros(n, 1 + d, dtype=dtype)
    coords[:, 1] = torch.arange(n)
    bad = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1), label="rows"))
    v = data.draw(st.integers(-(2**31), -1) if not dtype.is_floating_point else st.sampled_from([-1.0, -0.5, -7.25]),
                  label="batch index")
    coords[bad, 0] = v
    shown = math.floor(v)  # SparseTensor floors float coordinates (with a warning) before checking them
    more = f" \\({len(bad)} rows are affected\\)" if len(bad) > 1 else ""
    with pytest.warns(UserWarning) if dtype.is_floating_point else contextlib.nullcontext():
        with pytest.raises(ValueError, match=rf"SparseTensor: row {bad[0]} has batch index {shown}\b.*>= 0{more}, "
                                             "since.*batched_coordinates"):
            ME.SparseTensor(torch.ones(n, 1), coords)
    with pytest.raises(ValueError, match=rf"TensorField: row {bad[0]} has batch index {v!r}"):
        ME.TensorField(torch.ones(n, 1), coordinates=coords)
    if not dtype.is_floating_point:
        with pytest.raises(ValueError, match=rf"insert_and_map: row {bad[0]} has batch index {v}\b"):
            CoordinateManager(D=d).insert_and_map(coords)
    coords[bad, 0] = 0  # batch 0 is a batch
    assert ME.SparseTensor(torch.ones(n, 1), coords.int()).C.shape[0] == n


@pytest.mark.parametrize("q", [float("nan"), float("inf"), 0.0, -0.5, [0.1, float("nan"), 0.1]])
def test_sparse_quantize_needs_a_finite_positive_quantization_size(q):
    with pytest.raises(ValueError, match="quantization_size must be finite and positive"):
        ME.utils.sparse_quantize(torch.rand(5, 3), quantization_size=q)


@given(st.integers(1, 30), st.sampled_from(BAD_FLOATS[:3]), st.data())
def test_sparse_quantize_refuses_points_that_are_not_finite(n, v, data):
    pts = torch.rand(n, 3, dtype=torch.float64)
    r, c = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, 2))
    pts[r, c] = v
    for q in (0.5, None):
        with pytest.raises(ValueError, match=rf"sparse_quantize: point row {r}, column {c} is {v}.*not a finite number"):
            ME.utils.sparse_quantize(pts, quantization_size=q)


@given(st.floats(1e-15, 1e-10), st.integers(0, 100))
def test_sparse_quantize_with_a_too_small_quantization_size_raises_instead_of_collapsing(q, seed):
    pts = torch.rand(10, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.01
    with pytest.raises(ValueError, match="outside the int32 range.*larger quantization_size"):
        ME.utils.sparse_quantize(pts, quantization_size=q)
