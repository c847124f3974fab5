"""The kernel maps the executors read.

Properties:

* every kernel map lists exactly the pairs ``out + offset == in`` (against a dictionary
  lookup per point and offset), grouped by offset, with the identity offset of a same-map
  kernel as ``(i, i)`` for ``i = 0 .. n - 1``, also above the size where the builder
  queries in key order (4096 points);
* max pooling with stride 1 on such a map equals dense max pooling (the user-visible
  effect of a wrong identity pair);
* the table-based unique (``CoordinateIndex.build_unique``: no sort) equals the sort-based
  ``unique_coordinates``, and the index it leaves behind equals a fresh one and a dictionary;
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from sparsify.runtime.spatial import CoordinateManager, kernel_offsets
from sparsify.runtime.spatial import coords as coords_mod
from sparsify.runtime.spatial.coords import CoordinateIndex, CoordinateMap, unique_coordinates

import sparsify.spatial as ME


def _coords(d: int, n: int, ext: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, ext, (n, d), generator=g)
    c = torch.cat([torch.randint(0, batch, (n, 1), generator=g), c], 1)
    c = torch.unique(c, dim=0)
    return c[torch.randperm(c.shape[0], generator=g)].to(torch.int32)


def _reference_pairs(cin: torch.Tensor, cout: torch.Tensor, offsets: torch.Tensor) -> list[set]:
    where = {tuple(r): i for i, r in enumerate(cin.tolist())}
    out = []
    for off in offsets.tolist():
        pairs = set()
        for o, r in enumerate(cout.tolist()):
            i = where.get((r[0], *[a + b for a, b in zip(r[1:], off)]))
            if i is not None:
                pairs.add((i, o))
        out.append(pairs)
    return out


def _check_map(km, cin, cout, offsets):
    want = _reference_pairs(cin, cout, offsets)
    assert km.volume == len(want)
    for k, pairs in enumerate(want):
        a, b = km.k_offsets[k], km.k_offsets[k + 1]
        got = list(zip(km.in_idx[a:b].tolist(), km.out_idx[a:b].tolist()))
        assert len(got) == len(set(got)) and set(got) == pairs, f"offset {k}"
    if km.identity_k >= 0:
        a, b = km.k_offsets[km.identity_k], km.k_offsets[km.identity_k + 1]
        rows = torch.arange(km.n_in)
        assert torch.equal(km.in_idx[a:b], rows) and torch.equal(km.out_idx[a:b], rows)


@given(st.integers(1, 3), st.integers(1, 300), st.sampled_from([2, 3]), st.sampled_from([1, 2]),
       st.integers(0, 2**31 - 1))
def test_kernel_maps_list_exactly_the_neighbour_pairs(d, n, ks, stride, seed):
    c = _coords(d, n, {1: 40, 2: 12, 3: 6}[d], 2, seed)
    cm = CoordinateManager(D=d)
    key, _ = cm.insert_and_map(c, 1)
    out_key = cm.stride(key, stride)
    km = cm.kernel_map(key, out_key, ks, stride)
    _check_map(km, c, cm.get_coordinates(out_key), kernel_offsets("hypercube", (ks,) * d, (1,) * d, (1,) * d))


@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_maps_above_the_key_order_threshold(seed, monkeypatch):
    # ~6000 points above a lowered threshold: the builder sorts its queries by key and still
    # lists the identity offset as (i, i) in row order
    monkeypatch.setattr(coords_mod, "_KEY_ORDER_MIN", 4096)
    c = _coords(2, 9000, 110, 1, seed)
    assert c.shape[0] > 4096
    cm = CoordinateManager(D=2)
    key, _ = cm.insert_and_map(c, 1)
    km = cm.kernel_map(key, key, 3)
    assert km.identity_k == 4
    _check_map(km, c, c, kernel_offsets("hypercube", (3, 3), (1, 1), (1, 1)))


def test_max_pooling_stride_one_on_a_large_map_equals_dense():
    c = _coords(2, 9000, 110, 1, 3)
    feats = torch.randn(c.shape[0], 2, dtype=torch.float64)
    y = ME.MinkowskiMaxPooling(kernel_size=3, stride=1, dimension=2)(ME.SparseTensor(feats, c))
    grid = torch.full((1, 2, 110, 110), -torch.inf, dtype=torch.float64)
    grid[0, :, c[:, 1].long(), c[:, 2].long()] = feats.T
    dense = F.max_pool2d(grid, 3, stride=1, padding=1)
    assert torch.equal(y.F, dense[0, :, c[:, 1].long(), c[:, 2].long()].T)


@given(st.integers(1, 3), st.integers(12, 300), st.sampled_from([1, 2]), st.integers(0, 2**31 - 1))
def test_unique_with_index_equals_the_sorted_unique_and_a_fresh_index(d, n, stride, seed):
    # repeated coordinates (a small box), on the tensor-stride lattice: the table-based unique
    # gives the sort-based one's rows and inverse, and its index finds every coordinate of the
    # padded box exactly as an index built from the unique rows does
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(-3, 4, (n, d + 1), generator=g).to(torch.int32)
    c[:, 0] = c[:, 0].abs() % 2
    c[:, 1:] *= stride
    ts = (stride,) * d
    uniq, inv, index = CoordinateIndex.build_unique(c, ts, ts)
    want_u, want_inv = unique_coordinates(c)
    assert torch.equal(uniq, want_u) and torch.equal(inv, want_inv)
    # at least 12 points in a padded box of at most 2 * 11^3 cells: dense enough for a table
    assert index is not None and index.pad == ts
    cmap = CoordinateMap(c[uniq], ts)
    cmap.adopt_index(index)
    assert cmap.index((stride,) * d) is index and cmap.index((0,) * d) is index  # a larger pad serves
    lo, hi = cmap.bounds
    assert torch.equal(lo, c.long().amin(0)) and torch.equal(hi, c.long().amax(0))
    fresh = CoordinateIndex.build(c[uniq], ts, ts)
    box = torch.stack(torch.meshgrid(*[torch.arange(-6 * stride, 7 * stride)] * d, indexing="ij"), -1).reshape(-1, d)
    q = torch.cat([torch.cat([torch.full((box.shape[0], 1), b), box], 1) for b in (0, 1)]).to(torch.int32)
    assert torch.equal(index.lookup(q), fresh.lookup(q))
    where = {tuple(r): i for i, r in enumerate(c[uniq].tolist())}
    assert index.lookup(q).tolist() == [where.get(tuple(r), -1) for r in q.tolist()]


def _c(rows):
    return torch.tensor(rows, dtype=torch.int32)


def test_a_strided_layer_makes_its_own_map_not_another_tensors_at_that_stride():
    """A tensor created at stride 2 on the same manager is not xa's downsampling (it used to be taken
    as the output of xa's stride-2 conv: xb's coordinates, and a max pool of 0.0)."""
    xa = ME.SparseTensor(torch.ones(2, 1), _c([[0, 0, 0], [0, 9, 9]]))
    ME.SparseTensor(torch.ones(1, 1), _c([[0, 4, 4]]), tensor_stride=2, coordinate_manager=xa.coordinate_manager)
    y = ME.MinkowskiConvolution(1, 1, kernel_size=2, stride=2, dimension=2)(xa)
    p = ME.MinkowskiMaxPooling(kernel_size=2, stride=2, dimension=2)(xa)
    for t in (y, p):
        assert sorted(t.C.tolist()) == [[0, 0, 0], [0, 8, 8]]
    assert p.F.squeeze(1).tolist() == [1.0, 1.0]


def test_a_transposed_layer_returns_to_the_map_its_input_was_downsampled_from():
    """Two tensors on one manager (as SHARE_COORDINATE_MANAGER makes), a pruned tensor, and a field
    made sparse twice: up(down(x)) lands on x's own coordinates (it used to land on the first map at
    that stride, silently)."""
    down = ME.MinkowskiConvolution(1, 1, kernel_size=2, stride=2, dimension=2)
    up = ME.MinkowskiConvolutionTranspose(1, 1, kernel_size=2, stride=2, dimension=2)
    xa = ME.SparseTensor(torch.ones(2, 1), _c([[0, 0, 0], [0, 5, 5]]))
    xb = ME.SparseTensor(torch.ones(3, 1), _c([[0, 1, 1], [0, 6, 6], [0, 7, 7]]),
                         coordinate_manager=xa.coordinate_manager)
    for x in (xa, xb):
        z = up(down(x))
        assert z.coordinate_map_key == x.coordinate_map_key
        assert ME.cat(x, z).F.shape == (len(x), 2)
    x = ME.SparseTensor(torch.arange(4.0)[:, None], _c([[0, 0, 0], [0, 1, 0], [0, 4, 4], [0, 5, 5]]))
    pruned = ME.MinkowskiPruning()(x, torch.tensor([True, True, False, False]))
    assert sorted(up(down(pruned)).C.tolist()) == [[0, 0, 0], [0, 1, 0]]
    field = ME.TensorField(torch.ones(3, 1), _c([[0, 0, 0], [0, 3, 3], [0, 4, 4]]))
    for _ in range(2):
        s = field.sparse()
        assert ME.cat(s, up(down(s))).F.shape == (len(s), 2)
