"""The CPU executor's segmented-sum path against its reference scatter.

Properties:

* the segmented-sum path (``embedding_bag`` over ``pair_bags``), the scatter over all
  pairs at once (small maps) and the reference gather-GEMM-scatter offset by offset
  (``index_add_``) give bit-identical forward, input-gradient and weight-gradient results
  (with gathers all at once and offset by offset), float32 and float64, dense and channel-wise, on same-map,
  strided, transposed and generative maps; a map with a row twice in one offset (pooling)
  falls back to the scatter;
* results never alias the executor's reused workspace;
* a float32 weight gradient over a map of 4097..65536 points (whose pairs within an offset
  are in row order since queries are no longer sorted by key there) is within the
  worst-case float32 summation bound of the float64 result.

Exact equality (not a tolerance) is the claim: every path adds the same products in the
same order (the identity product first, then offset by offset; one ``index_add_`` over
all pairs adds each row's products in pair order).
"""

from __future__ import annotations

import pytest
import sparsify.runtime.spatial.cpu as cpu
import torch
from hypothesis import given
from hypothesis import strategies as st
from sparsify.runtime.spatial import CoordinateManager, kernel_offsets
from sparsify.runtime.spatial import coords as coords_mod
from sparsify.runtime.spatial.coords import pair_bags

from tests.test_spatial_maps import _coords


def _maps(d: int, c: torch.Tensor):
    cm = CoordinateManager(D=d)
    key, _ = cm.insert_and_map(c, 1)
    k2 = cm.stride(key, 2)
    yield "same-map 3", cm.kernel_map(key, key, 3)
    yield "strided 2", cm.kernel_map(key, k2, 2, 2)
    yield "strided 3", cm.kernel_map(key, k2, 3, 2)
    yield "transposed 2", cm.kernel_map(k2, key, 2, 2, is_transpose=True)
    offs = kernel_offsets("hypercube", (2,) * d, (1,) * d, (1,) * d)
    gen = cm.stride_region(k2, offs, (1,) * d, True, True)
    yield "generative 2", cm.kernel_map(k2, gen, 2, 2, is_transpose=True)


def _run_all(ex, km, x, dy, w, wd, dyd):
    args = (km.in_idx, km.out_idx, list(km.k_offsets))
    out = [ex.conv_forward(x, w, *args, km.n_out, km.identity_k, False),
           ex.conv_dgrad(dy, w, *args, km.n_in, km.identity_k, False),
           ex.conv_wgrad(x, dy, *args, km.identity_k, False),
           *ex.conv_backward(x, dy, w, *args, km.identity_k, False),
           ex.conv_forward(x, wd, *args, km.n_out, km.identity_k, True),
           ex.conv_dgrad(dyd, wd, *args, km.n_in, km.identity_k, True),
           *ex.conv_backward(x, dyd, wd, *args, km.identity_k, True)]
    return [t.clone() for t in out]


# (_BAG_MIN_PAIRS, _BAG_MIN_WORK, _GATHER_ALL_MAX): the reference scatter offset by offset
# first, then the scatter over all pairs at once, the segmented sum with gathers at once and
# offset by offset
_PATHS = [(1 << 62, 0, 0), (1 << 62, 0, 1 << 62), (0, 0, 1 << 62), (0, 0, 0)]


@given(st.integers(2, 3), st.integers(1, 400), st.sampled_from([torch.float32, torch.float64]),
       st.integers(0, 2**31 - 1))
def test_segmented_sum_equals_the_scatter_bit_for_bit(d, n, dtype, seed):
    c = _coords(d, n, {2: 16, 3: 7}[d], 2, seed)
    g = torch.Generator().manual_seed(seed)
    ex = cpu.SpatialCPUExecutor()
    for name, km in _maps(d, c):
        cin, cout = 3, 5
        x = torch.randn(km.n_in, cin, generator=g).to(dtype)
        dy = torch.randn(km.n_out, cout, generator=g).to(dtype)
        w = torch.randn(km.volume, cin, cout, generator=g).to(dtype)
        wd = torch.randn(km.volume, cin, generator=g).to(dtype)
        dyd = torch.randn(km.n_out, cin, generator=g).to(dtype)
        old = cpu._BAG_MIN_PAIRS, cpu._BAG_MIN_WORK, cpu._GATHER_ALL_MAX
        results = []
        try:
            for cpu._BAG_MIN_PAIRS, cpu._BAG_MIN_WORK, cpu._GATHER_ALL_MAX in _PATHS:
                results.append(_run_all(ex, km, x, dy, w, wd, dyd))
        finally:
            cpu._BAG_MIN_PAIRS, cpu._BAG_MIN_WORK, cpu._GATHER_ALL_MAX = old
        ref = results[0]
        for path, got in zip(_PATHS[1:], results[1:]):
            for i, (a, b) in enumerate(zip(ref, got)):
                assert torch.equal(a, b), f"{name}, path {path}: result {i}"


def test_pooling_maps_fall_back_to_the_scatter(monkeypatch):
    c = _coords(2, 200, 12, 1, 5)
    cm = CoordinateManager(D=2)
    key, _ = cm.insert_and_map(c, 1)
    km = cm.kernel_map(key, cm.stride(key, 2), 2, 2, is_pool=True)  # every child in one offset
    assert pair_bags(km.out_idx, km.k_offsets, km.n_out) is None
    x = torch.randn(km.n_in, 3)
    w = torch.randn(1, 3, 4)
    args = (x, w, km.in_idx, km.out_idx, list(km.k_offsets), km.n_out, -1, False)
    monkeypatch.setattr(cpu, "_BAG_MIN_PAIRS", 0)
    monkeypatch.setattr(cpu, "_BAG_MIN_WORK", 0)
    monkeypatch.setattr(cpu, "_BAG_MAX_BYTES", 1 << 62)
    got = cpu.SpatialCPUExecutor().conv_forward(*args)
    want = torch.zeros(km.n_out, 4).index_add_(0, km.out_idx, x[km.in_idx] @ w[0])
    assert torch.equal(got, want)


def test_results_do_not_alias_the_workspace(monkeypatch):
    monkeypatch.setattr(cpu, "_BAG_MIN_PAIRS", 0)
    monkeypatch.setattr(cpu, "_BAG_MIN_WORK", 0)
    monkeypatch.setattr(cpu, "_BAG_MAX_BYTES", 1 << 62)
    c = _coords(3, 300, 8, 1, 7)
    cm = CoordinateManager(D=3)
    key, _ = cm.insert_and_map(c, 1)
    km = cm.kernel_map(key, key, 3)
    ex = cpu.SpatialCPUExecutor()
    args = (km.in_idx, km.out_idx, list(km.k_offsets), km.n_out, km.identity_k, False)
    x, w = torch.randn(km.n_in, 4), torch.randn(km.volume, 4, 4)
    y1 = ex.conv_forward(x, w, *args)
    keep = y1.clone()
    dx, dw = ex.conv_backward(x, torch.randn_like(y1), w, km.in_idx, km.out_idx, list(km.k_offsets),
                              km.identity_k, False)
    ex.conv_forward(2 * x, w, *args)
    assert torch.equal(y1, keep)
    cpu.release_workspace()
    assert torch.equal(y1, keep) and dx.shape == x.shape and dw.shape == w.shape


@pytest.mark.parametrize("seed", [0, 1])
def test_weight_gradient_of_a_mid_size_map_is_within_the_float32_summation_bound(seed):
    # Maps of 4097..65536 out points are no longer queried in key order (see coords._KEY_ORDER_MIN),
    # so their pairs within an offset come in row order and a float32 weight gradient (a sum over
    # the offset's pairs) may round differently than before.  It must stay within the worst-case
    # bound of a float32 sum of m products against the float64 result: |err| <= (m + 2) u sum|x g|,
    # u = 2^-24 (one rounding per product and per addition; the float64 result is exact to ~1e-16).
    c = _coords(3, 7000, 24, 1, seed)
    assert 4096 < c.shape[0] <= coords_mod._KEY_ORDER_MIN
    cm = CoordinateManager(D=3)
    key, _ = cm.insert_and_map(c, 1)
    km = cm.kernel_map(key, key, 3)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(km.n_in, 8, generator=g)
    dy = torch.randn(km.n_out, 6, generator=g)
    w = torch.randn(km.volume, 8, 6, generator=g)
    ex = cpu.SpatialCPUExecutor()
    args = (km.in_idx, km.out_idx, list(km.k_offsets), km.identity_k, False)
    _, dw32 = ex.conv_backward(x, dy, w, *args)
    dw64 = ex.conv_wgrad(x.double(), dy.double(), *args)
    u = 2.0 ** -24
    for k in range(km.volume):
        a, b = km.k_offsets[k], km.k_offsets[k + 1]
        xs, gs = x.double()[km.in_idx[a:b]], dy.double()[km.out_idx[a:b]]
        bound = (b - a + 2) * u * (xs.abs().T @ gs.abs())
        assert bool(((dw32[k].double() - dw64[k]).abs() <= bound).all()), f"offset {k}"
        assert torch.allclose(dw64[k], xs.T @ gs, rtol=1e-12, atol=1e-12)
