"""Properties of the CPU executor: every path equals the dense reference.

For any layout (block sizes 8..64, shapes not divisible by the block, any
density), any dtype, activation and epilogue, each path of the CPU executor
(forced with ``SPARSIFY_CPU_PATH``) and the cost model's own choice give
``act(x @ W.T + bias) + residual`` of the dense masked weight, and their
gradients (dX, dW over the stored blocks only, dbias) equal autograd of that
dense reference.  The cost model never routes a dtype to torch's BSR matmul
that it does not take, and the cached weight forms follow in-place updates
and are never used with grad on.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from sparsify.runtime import ACTIVATIONS, BlockSparseLayout
from sparsify.runtime.executors import cpu

from sparsify.modules import BlockSparseLinear

PATHS = (*cpu.PATHS, "auto")
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# Relative error of one rounding, per dtype (half an ulp at 1.0).
EPS = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}


@st.composite
def problems(draw, dtypes=DTYPES):
    """A layout with random blocks kept, its values, an input and an epilogue."""
    b = draw(st.sampled_from((8, 16, 32, 64)))
    nbr, nbc = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    # Logical dims anywhere in the last block: most are not multiples of b.
    out_f = (nbr - 1) * b + draw(st.integers(1, b))
    in_f = (nbc - 1) * b + draw(st.integers(1, b))
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=nbr * nbc, max_size=nbr * nbc))).view(nbr, nbc)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    layout = BlockSparseLayout.from_block_mask(mask, shape=(out_f, in_f), block_size=b)
    dtype = draw(st.sampled_from(dtypes))
    weight = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    values = layout.values_from_dense(weight).to(dtype)  # padding of edge blocks is zero
    m = draw(st.sampled_from((1, 2, 5, 17, 40)))
    x = torch.randn(m, in_f, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(out_f, generator=gen, dtype=torch.float64).to(dtype) if draw(st.booleans()) else None
    residual = torch.randn(m, out_f, generator=gen, dtype=torch.float64).to(dtype) if draw(st.booleans()) else None
    activation = draw(st.sampled_from(ACTIVATIONS))
    return layout, values, x, bias, residual, activation


def _meta(layout):
    return list(layout.metadata().values())


def _act(y, activation):
    return cpu.apply_epilogue(y, None, None, activation)


def _reference(layout, values, x, bias, residual, activation):
    """The dense masked product in float64, from the same (possibly rounded) inputs."""
    w = layout.to_dense(values.double())
    y = x.double() @ w.T
    if bias is not None:
        y = y + bias.double()
    y = _act(y, activation)
    return y if residual is None else y + residual.double()


def _tolerance(layout, values, x, bias, residual, dtype):
    """Bound on the rounding error: a few roundings per stored block row, relative to |x| |W|^T."""
    mag = x.double().abs() @ layout.to_dense(values.double()).abs().T
    if bias is not None:
        mag = mag + bias.double().abs()
    if residual is not None:
        mag = mag + residual.double().abs()
    # Each path rounds the partial sums at most once per block column it adds
    # (gather adds block products in the working dtype), once for the bias,
    # the activation (Lipschitz <= 1.13) and the residual: (n_block_cols + 4)
    # roundings of relative size eps, doubled for margin.  For bf16 (8-bit
    # mantissa) that is a few percent of the magnitude; fp32/fp64 accumulate
    # over in_features terms, hence the extra factor.
    rounds = layout.n_block_cols + 4
    eps = EPS[dtype]
    if dtype != torch.bfloat16:
        eps *= layout.shape[1]
    return 2 * rounds * eps * mag + 1e-30


def _run(path, monkeypatch, fn):
    if path == "auto":
        monkeypatch.delenv("SPARSIFY_CPU_PATH", raising=False)
    else:
        monkeypatch.setenv("SPARSIFY_CPU_PATH", path)
    try:
        return fn()
    finally:
        monkeypatch.delenv("SPARSIFY_CPU_PATH", raising=False)


@pytest.mark.parametrize("path", PATHS)
@given(problem=problems())
def test_every_path_equals_dense_reference(path, problem):
    layout, values, x, bias, residual, activation = problem
    out_f, in_f = layout.shape
    mp = pytest.MonkeyPatch()

    def call():
        with torch.no_grad():
            return torch.ops.sparsify.bsmm(x, values, *_meta(layout), bias, residual, out_f, in_f, activation)

    y = _run(path, mp, call)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], out_f)
    ref = _reference(layout, values, x, bias, residual, activation)
    err = (y.double() - ref).abs()
    tol = _tolerance(layout, values, x, bias, residual, x.dtype)
    assert bool((err <= tol).all()), f"{path}: max error {err.max():.3g}, tolerance {tol.min():.3g}..{tol.max():.3g}"


@pytest.mark.parametrize("path", PATHS)
@given(problem=problems(dtypes=(torch.float64,)))
def test_every_path_gradients_equal_dense_autograd(path, problem):
    layout, values, x, bias, residual, activation = problem
    out_f, in_f = layout.shape
    m = x.shape[0]
    g = torch.randn(m, out_f, dtype=torch.float64, generator=torch.Generator().manual_seed(m * out_f))
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, values, bias, residual)]
    ref_leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, values, bias, residual)]

    def call():
        xs, vs, bs, rs = leaves
        return torch.ops.sparsify.bsmm(xs, vs, *_meta(layout), bs, rs, out_f, in_f, activation)

    y = _run(path, pytest.MonkeyPatch(), call)
    _run(path, pytest.MonkeyPatch(), lambda: y.backward(g))
    # Autograd of the dense masked reference; the gradient reaching `values`
    # through to_dense is dW restricted to the stored blocks.
    rx, rv, rb, rr = ref_leaves
    _reference(layout, rv, rx, rb, rr, activation).backward(g)
    for name, ours, ref in zip(("dX", "dW (stored blocks)", "dbias", "dresidual"), leaves, ref_leaves):
        if ours is None:
            continue
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-9, atol=1e-9, msg=lambda s, n=name: f"{path} {n}: {s}")


@given(
    rows=st.integers(1, 1 << 16),
    density=st.floats(0.0, 1.0),
    dtype=st.sampled_from((torch.bfloat16, torch.float16)),
    forced=st.sampled_from((None, *cpu.PATHS)),
    elems=st.one_of(st.none(), st.integers(1, 1 << 26)),
)
def test_choose_path_never_sends_unsupported_dtypes_to_bsr(rows, density, dtype, forced, elems):
    mp = pytest.MonkeyPatch()
    path = _run(forced or "auto", mp, lambda: cpu.choose_path(rows, density, dtype, elems))
    assert path in cpu.PATHS and path != "bsr"


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_bsr_forced_on_half_dtypes_runs(dtype, monkeypatch):
    """Forcing ``bsr`` on a dtype torch's CPU BSR rejects routes around it instead of raising."""
    lin = BlockSparseLinear.from_dense(torch.nn.Linear(64, 48), density=0.5, block_size=16).to(dtype).eval()
    x = torch.randn(3, 64).to(dtype)
    monkeypatch.setenv("SPARSIFY_CPU_PATH", "bsr")
    with torch.no_grad():
        y = lin(x)
    ref = F.linear(x.double(), lin.to_dense().double(), lin.bias.double())
    torch.testing.assert_close(y.double(), ref, rtol=0.05, atol=0.05)


def _layer(density=0.5):
    torch.manual_seed(0)
    lin = BlockSparseLinear.from_dense(torch.nn.Linear(96, 80, bias=False), density=density, block_size=16)
    return lin.eval(), torch.randn(4, 96)


@pytest.mark.parametrize("path", ("dense", "bsr"))
@pytest.mark.parametrize("mode", ("no_grad", "inference_mode"))
def test_cached_weight_follows_in_place_updates(path, mode, monkeypatch):
    monkeypatch.setenv("SPARSIFY_CPU_PATH", path)
    lin, x = _layer()
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        y1 = lin(x)
        assert path in getattr(lin.values, "_sparsify_cache", {}), "eval-mode inference should cache the weight"
        torch.testing.assert_close(lin(x), y1)
    with torch.no_grad():
        lin.values.mul_(2.0)  # bumps the version counter
    with ctx():
        torch.testing.assert_close(lin(x), 2 * y1)



# The cached BSR tensor shares the storage of `values`, so it never goes stale;
# the cached dense weight is a copy.
@pytest.mark.parametrize("path", ("dense", "bsr"))
def test_cache_never_used_with_grad_enabled(path, monkeypatch):
    monkeypatch.setenv("SPARSIFY_CPU_PATH", path)
    lin, x = _layer()
    with torch.no_grad():
        y1 = lin(x)
    lin.values.data.mul_(3.0)  # through .data: the version counter does not move
    y = lin(x)  # eval mode, grad on: must not read the (now stale) cache
    assert y.requires_grad
    torch.testing.assert_close(y.detach(), 3 * y1)
    y.sum().backward()
    assert lin.values.grad is not None
    # The stale cache is still there for no-grad calls until cleared; clearing drops it.
    cpu.clear_dense_cache(lin.values)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), 3 * y1)


@pytest.mark.parametrize("path", ("dense", "bsr"))
def test_op_caches_only_static_weights(path, monkeypatch):
    """Without ``static_weight`` (train mode, gradcheck) nothing is cached, even with grad off."""
    monkeypatch.setenv("SPARSIFY_CPU_PATH", path)
    lin, x = _layer()
    meta = [getattr(lin, n) for n in lin._layout.metadata()]
    with torch.no_grad():
        y1 = torch.ops.sparsify.bsmm(x, lin.values, *meta, None, None, 80, 96, "none", None, False)
        assert not getattr(lin.values, "_sparsify_cache", None)
        lin.values.data.mul_(3.0)  # a write the version counter does not see
        y2 = torch.ops.sparsify.bsmm(x, lin.values, *meta, None, None, 80, 96, "none", None, False)
    torch.testing.assert_close(y2, 3 * y1)


def test_train_mode_never_caches(monkeypatch):
    monkeypatch.setenv("SPARSIFY_CPU_PATH", "dense")
    lin, x = _layer()
    lin.train()
    with torch.no_grad():
        lin(x)
    assert not getattr(lin.values, "_sparsify_cache", None)



@given(problem=problems(dtypes=(torch.float32, torch.float64)))
def test_bsr_path_in_row_chunks_equals_dense_reference(problem):
    """Above BSR_CHUNK_ROWS rows the bsr path calls MKL per chunk of rows and writes each into a
    row-major result; with chunks of 4 rows every drawn M > 4 takes that route (ragged last
    chunk included), forward and dX."""
    layout, values, x, bias, residual, activation = problem
    out_f, in_f = layout.shape
    mp = pytest.MonkeyPatch()
    mp.setattr(cpu, "BSR_CHUNK_ROWS", 4)
    try:
        y = _run("bsr", mp, lambda: cpu.CPUExecutor().forward(x, values, _ns(layout), bias, residual, activation,
                                                             out_f))
        dy = torch.randn(x.shape[0], out_f, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
        dx = _run("bsr", mp, lambda: cpu.CPUExecutor().grad_input(dy, values, _ns(layout), in_f))
    finally:
        mp.undo()
    if x.shape[0] > 4:
        assert y.is_contiguous() and dx.is_contiguous()
    ref = _reference(layout, values, x, bias, residual, activation)
    tol = _tolerance(layout, values, x, bias, residual, x.dtype)
    assert bool(((y.double() - ref).abs() <= tol).all())
    dx_ref = dy.double() @ layout.to_dense(values.double())
    dx_tol = 2 * (layout.n_block_rows + 4) * EPS[x.dtype] * out_f * (dy.double().abs() @ layout.to_dense(
        values.double()).abs()) + 1e-30
    assert bool(((dx.double() - dx_ref).abs() <= dx_tol).all())


def _ns(layout):
    from types import SimpleNamespace

    return SimpleNamespace(**layout.metadata())


@given(problem=problems(dtypes=(torch.float64,)), chunk_bytes=st.sampled_from((1, 4096, 1 << 20)))
def test_gathered_dw_in_chunks_equals_dense_reference(problem, chunk_bytes):
    """The gathered dW runs over chunks of stored blocks bounded by _DW_GATHER_BYTES; with 1 byte
    every block is its own chunk.  Each chunk size gives dW of the stored blocks exactly (float64),
    as the dense path does."""
    layout, values, x, *_ = problem
    out_f, in_f = layout.shape
    dy = torch.randn(x.shape[0], out_f, dtype=x.dtype, generator=torch.Generator().manual_seed(3))
    ref = layout.values_from_dense(dy.T @ x)  # dW restricted to the stored blocks
    mp = pytest.MonkeyPatch()
    mp.setattr(cpu, "_DW_GATHER_BYTES", chunk_bytes)
    try:
        for path in ("gather", "dense"):
            got = _run(path, mp, lambda: cpu.CPUExecutor().grad_weight(dy, x, _ns(layout), layout.block_size))
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, msg=lambda s, p=path: f"{p}: {s}")
    finally:
        mp.undo()


@given(rows=st.integers(1, 1 << 16), density=st.floats(0.0, 1.0), forced=st.sampled_from((None, *cpu.PATHS)))
def test_dw_path_follows_its_cost_model(rows, density, forced):
    """dW is gathered only below the density that row count's rule gives (and for a forced
    bsr / gather path); a forced dense path is always dense."""
    path = _run(forced or "auto", pytest.MonkeyPatch(), lambda: cpu.dw_path(rows, density))
    if forced:
        assert path == ("dense" if forced == "dense" else "gather")
    else:
        limit = cpu.DW_GATHER_DENSITY_FEW_ROWS if rows <= cpu.DW_GATHER_FEW_ROWS else cpu.DW_GATHER_DENSITY
        assert path == ("gather" if density < limit else "dense")


@given(
    rows=st.integers(1, 1 << 14),
    density=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES + (torch.float16,)),
    elems=st.integers(1, 1 << 26),
    product=st.sampled_from(("forward", "grad_input")),
    path=st.sampled_from(cpu.PATHS),
    forced=st.sampled_from((None, *cpu.PATHS)),
)
def test_rebuilt_path_only_moves_large_weights_off_dense(rows, density, dtype, elems, product, path, forced):
    """A rebuilt weight only changes a dense choice, only for weights above SMALL_WEIGHT, never
    under a forced path, and never to torch's BSR for a dtype it does not take."""
    got = _run(forced or "auto", pytest.MonkeyPatch(),
               lambda: cpu.rebuilt_path(path, rows, density, dtype, elems, product))
    if forced or path != "dense" or elems <= cpu.SMALL_WEIGHT:
        assert got == path
    else:
        assert got in cpu.PATHS
        assert got != "bsr" or dtype in (torch.float32, torch.float64)
        if rows <= cpu.REBUILT_GATHER_ROWS and density < cpu.REBUILT_GATHER_DENSITY:
            assert got == "gather"


def test_rebuilt_path_rejects_unknown_products():
    with pytest.raises(ValueError, match="product='backward'"):
        cpu.rebuilt_path("dense", 1, 0.5, torch.float32, 1 << 26, "backward")


@given(problem=problems(dtypes=(torch.float64,)))
def test_train_mode_paths_for_large_weights_equal_dense_autograd(problem):
    """With SMALL_WEIGHT at 0 every drawn layer counts as large, so train-mode calls (nothing
    cached) take ``rebuilt_path``'s gathered and BSR choices; outputs and gradients still equal
    autograd of the dense masked reference."""
    layout, values, x, bias, residual, activation = problem
    out_f, in_f = layout.shape
    g = torch.randn(x.shape[0], out_f, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ours = [t.clone().requires_grad_(True) if t is not None else None for t in (x, values, bias, residual)]
    ref = [t.clone().requires_grad_(True) if t is not None else None for t in (x, values, bias, residual)]
    mp = pytest.MonkeyPatch()
    mp.setattr(cpu, "SMALL_WEIGHT", 0)
    try:
        xs, vs, bs, rs = ours
        y = _run("auto", mp, lambda: torch.ops.sparsify.bsmm(xs, vs, *_meta(layout), bs, rs, out_f, in_f, activation,
                                                              None, False))
        _run("auto", mp, lambda: y.backward(g))
    finally:
        mp.undo()
    want = _reference(layout, *ref[1:2], ref[0], ref[2], ref[3], activation)
    torch.testing.assert_close(y, want, rtol=1e-9, atol=1e-9)
    want.backward(g)
    for name, a, b in zip(("dX", "dW (stored blocks)", "dbias", "dresidual"), ours, ref):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-9, msg=lambda s, n=name: f"{n}: {s}")
