"""BlockSparseLinear and LowRankLinear: conversion, dtypes, N-D inputs, gradients, state_dict."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sparsify import BlockSparseLinear, LowRankLinear
from sparsify.modules.low_rank import svd_rank

from .helpers import RTOL, rel_err

dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])


@st.composite
def linears(draw, dtype=None):
    in_f, out_f = draw(st.integers(1, 160)), draw(st.integers(1, 160))
    dtype = dtype or draw(dtypes)
    torch.manual_seed(draw(st.integers(0, 2**16)))
    lin = torch.nn.Linear(in_f, out_f, bias=draw(st.booleans())).to(dtype)
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    return lin, torch.randn(*lead, 3, in_f, dtype=dtype)


@given(linears(), st.sampled_from([8, 16, 32, 64]), st.floats(0.05, 1.0))
def test_block_sparse_linear_equals_the_masked_dense_layer(case, b, density):
    lin, x = case
    layer = BlockSparseLinear.from_dense(lin, density=density, block_size=b)
    mask = layer.layout.element_mask()
    expected = torch.nn.functional.linear(x, lin.weight * mask, lin.bias)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == expected.shape and y.dtype == x.dtype
    assert rel_err(y, expected) <= RTOL[x.dtype] * 10 if x.dtype == torch.bfloat16 else rel_err(y, expected) < RTOL[x.dtype]
    assert torch.equal(layer.to_dense(), lin.weight.detach() * mask)


@given(linears(dtype=torch.float64), st.sampled_from([8, 16, 32]), st.floats(0.05, 1.0),
       st.sampled_from(["none", "relu", "gelu", "silu"]))
def test_gradients_equal_the_dense_masked_reference(case, b, density, activation):
    lin, x = case
    layer = BlockSparseLinear.from_dense(lin, density=density, block_size=b, activation=activation)
    mask = layer.layout.element_mask()
    w_ref = (lin.weight.detach() * mask).requires_grad_(True)
    b_ref = None if lin.bias is None else lin.bias.detach().clone().requires_grad_(True)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    act = {"none": lambda t: t, "relu": torch.relu, "gelu": torch.nn.functional.gelu,
           "silu": torch.nn.functional.silu}[activation]
    grad_out = torch.randn(*x.shape[:-1], lin.out_features, dtype=x.dtype)
    layer(x1).backward(grad_out)
    act(torch.nn.functional.linear(x2, w_ref, b_ref)).backward(grad_out)
    assert rel_err(x1.grad, x2.grad) < 1e-10 or x2.grad.norm() == 0
    # dW exists only for the kept blocks, and equals the reference there
    assert layer.values.grad.shape == (layer.layout.nnz, b, b)
    ref_blocks = layer.layout.values_from_dense(w_ref.grad)
    assert torch.allclose(layer.values.grad, ref_blocks, rtol=1e-10, atol=1e-12)
    if b_ref is not None:
        assert torch.allclose(layer.bias.grad, b_ref.grad, rtol=1e-10, atol=1e-12)


@given(linears(dtype=torch.float32), st.sampled_from([8, 16]), st.floats(0.05, 1.0), st.floats(0.05, 1.0))
def test_state_dict_round_trip_adopts_the_saved_pattern(case, b, d1, d2):
    lin, x = case
    saved = BlockSparseLinear.from_dense(lin, density=d1, block_size=b)
    other = BlockSparseLinear.from_dense(lin, density=d2, block_size=b)
    buf = st_save(saved.state_dict())
    other.load_state_dict(st_load(buf))
    assert other.layout == saved.layout
    with torch.no_grad():
        assert torch.equal(other(x), saved(x))


def test_extra_repr_and_train_eval_paths_agree():
    lin = torch.nn.Linear(100, 70)
    layer = BlockSparseLinear.from_dense(lin, density=0.5, block_size=32, activation="relu")
    r = repr(layer)
    assert "block_size=32" in r and "density=" in r and "activation='relu'" in r
    x = torch.randn(5, 100)
    y_train = layer.train()(x)
    with torch.inference_mode():
        y_eval = layer.eval()(x)
    assert torch.allclose(y_train, y_eval)
    # an in-place update after an eval call is seen by the next eval call (cache keyed by version)
    with torch.no_grad():
        layer.values.mul_(2)
        layer.bias.zero_()
        assert torch.allclose(layer(x), torch.relu(x @ (2 * lin.weight * layer.layout.element_mask()).T), atol=1e-5)


@given(linears(dtype=torch.float64), st.integers(1, 200))
def test_svd_error_is_the_eckart_young_bound(case, rank):
    lin, _ = case
    layer = LowRankLinear.from_dense(lin, rank=rank)
    s = torch.linalg.svdvals(lin.weight.detach())
    r = min(rank, s.numel())
    assert layer.rank == r
    err = torch.linalg.norm(lin.weight.detach() - layer.to_dense())
    bound = s[r:].pow(2).sum().sqrt()
    assert float(err) == pytest.approx(float(bound), rel=1e-8, abs=1e-10)


@given(linears(dtype=torch.float64), st.floats(0.01, 0.99))
def test_tolerance_picks_the_smallest_rank_within_it(case, tol):
    lin, _ = case
    w = lin.weight.detach()
    layer = LowRankLinear.from_dense(lin, tolerance=tol)
    assert rel_err(layer.to_dense(), w) <= tol + 1e-9 or layer.rank == min(w.shape)
    if layer.rank > 1:
        worse = LowRankLinear.from_dense(lin, rank=layer.rank - 1)
        assert rel_err(worse.to_dense(), w) > tol - 1e-9


def test_rank_fraction_is_of_min_in_out():
    assert svd_rank(torch.ones(40), rank=0.25) == 10
    assert svd_rank(torch.ones(40), rank=1.0) == 40
    assert svd_rank(torch.ones(40), rank=400) == 40


@given(linears(), st.integers(1, 64))
def test_low_rank_linear_nd_dtypes_and_state_dict(case, rank):
    lin, x = case
    layer = LowRankLinear.from_dense(lin, rank=rank)
    with torch.no_grad():
        y = layer(x)
        assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], lin.out_features)
        expected = torch.nn.functional.linear(x, layer.to_dense(), layer.bias)
        tol = 5e-2 if x.dtype == torch.bfloat16 else RTOL[x.dtype] * 10
        assert rel_err(y, expected) < tol
    again = LowRankLinear(lin.in_features, lin.out_features, layer.rank, bias=lin.bias is not None, dtype=x.dtype)
    buf = io.BytesIO(st_save(layer.state_dict()))
    again.load_state_dict(st_load(buf.getvalue()))
    with torch.no_grad():
        assert torch.equal(again(x), layer(x))


@pytest.mark.parametrize("path", ["dense", "bsr", "gather"])
@given(linears(dtype=torch.float32), st.sampled_from([8, 16, 32]), st.floats(0.05, 1.0),
       st.sampled_from(["none", "relu", "gelu", "silu"]), st.booleans())
def test_eager_fast_path_equals_the_op(path, case, b, density, activation, with_residual):
    """No-grad eager calls skip the dispatcher; they must compute exactly what the op computes."""
    import os

    os.environ["SPARSIFY_CPU_PATH"] = path
    try:
        lin, x = case
        layer = BlockSparseLinear.from_dense(lin, density=density, block_size=b, activation=activation).eval()
        residual = torch.randn(*x.shape[:-1], lin.out_features) if with_residual else None
        meta = [getattr(layer, n) for n in ("row_offsets", "col_indices", "row_indices", "t_row_offsets",
                                           "t_col_indices", "t_block_ids")]
        with torch.no_grad():
            fast = layer(x, residual)
            op = torch.ops.sparsify.bsmm(x, layer.values, *meta, layer.bias, residual, lin.out_features,
                                         lin.in_features, activation, None, False)
        assert op.is_contiguous() and fast.shape == op.shape
        torch.testing.assert_close(fast, op, rtol=1e-6, atol=1e-6)
    finally:
        del os.environ["SPARSIFY_CPU_PATH"]


def test_the_ops_fake_refuses_what_the_op_refuses():
    # Tracing and a loaded program's check on its declared inputs run the fake: an input whose width is
    # not in_features (a tampered program) must fail there, not on the first real call.
    layer = BlockSparseLinear.from_dense(torch.nn.Linear(64, 32), density=0.5, block_size=16).eval()
    meta = [getattr(layer, n).to("meta") for n in ("row_offsets", "col_indices", "row_indices", "t_row_offsets",
                                                  "t_col_indices", "t_block_ids")]
    values = layer.values.detach().to("meta")

    def call(x, in_features=64, activation="none"):
        return torch.ops.sparsify.bsmm(x, values, *meta, None, None, 32, in_features, activation, None, False)

    assert call(torch.empty(3, 5, 64, device="meta")).shape == (3, 5, 32)
    with pytest.raises(ValueError, match="expected x with last dimension 64"):
        call(torch.empty(3, 48, device="meta"))
    with pytest.raises(ValueError, match="expected x with last dimension 96"):
        call(torch.empty(3, 64, device="meta"), in_features=96)
    with pytest.raises(TypeError, match="dtype"):
        call(torch.empty(3, 64, device="meta", dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown activation"):
        call(torch.empty(3, 64, device="meta"), activation="exp")



@pytest.mark.parametrize("make", ["block_sparse", "tucker"])
def test_a_fused_optimizer_step_is_seen_by_the_inference_cache(make):
    # AdamW(fused=True) (HF Trainer's default) writes in place without bumping version counters: the
    # eval / no-grad weight cached before the step must not be served after it
    import sparsify

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    kw = dict(density=0.5, block_size=16) if make == "block_sparse" else dict(method="tucker", rank=0.5,
                                                                              forward="reconstructed")
    conv = sparsify.sparsify(model, min_size=0, **kw)
    x = torch.randn(4, 64)
    conv.eval()
    with torch.no_grad():
        conv(x)  # fills the cache
    opt = torch.optim.AdamW(conv.parameters(), lr=0.1, fused=True)
    conv.train()
    conv(x).square().sum().backward()
    versions = [p._version for p in conv.parameters()]
    opt.step()
    conv.eval()
    with torch.no_grad():
        cached = conv(x)
    with torch.enable_grad():
        fresh = conv(x).detach()
    torch.testing.assert_close(cached, fresh, rtol=1e-5, atol=1e-6)
    # (the premise: the fused step left the version counters as they were, or this test proves nothing)
    if [p._version for p in conv.parameters()] != versions:
        pytest.skip("this torch's fused AdamW bumps version counters")



@pytest.mark.parametrize("kind", ["linear", "conv", "weight"])
@pytest.mark.parametrize("assign", [False, True])
def test_meta_init_then_to_empty_then_load_state_dict_restores_every_buffer(kind, assign):
    # the meta-device pattern (FSDP2, accelerate): the derived metadata buffers are in no state_dict,
    # so a load with the same pattern must rewrite them; to_empty() leaves uninitialized memory there
    import copy

    import sparsify
    from sparsify.modules.sparse_weight import BlockSparseWeight
    from sparsify.patterns import random_layout

    torch.manual_seed(0)
    if kind == "linear":
        model, x = BlockSparseLinear.from_dense(torch.nn.Linear(64, 48), density=0.5, block_size=16), torch.randn(3, 64)
    elif kind == "conv":
        model = sparsify.sparsify(torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1)), density=0.5,
                                  block_size=16, min_size=0)
        x = torch.randn(1, 32, 6, 6)
    else:
        model = BlockSparseWeight(random_layout((64, 32), 16, 0.5, seed=0))
        with torch.no_grad():
            model.values.normal_()
        x = None
    model.eval()
    want = model(x) if x is not None else model.to_dense()
    sd = copy.deepcopy(model.state_dict())
    moved = copy.deepcopy(model).to("meta").to_empty(device="cpu")
    with torch.no_grad():
        for b in moved.buffers():
            b.fill_(-7)  # what uninitialized memory may hold
    moved.load_state_dict(sd, assign=assign)
    got = moved(x) if x is not None else moved.to_dense()
    torch.testing.assert_close(got, want, rtol=0, atol=0)



@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("grad", [False, True])
def test_block_sparse_layers_run_under_autocast_as_dense_ones_do(kind, grad):
    # the ops have no autocast rule: a bfloat16 activation met float32 values and was refused
    import sparsify

    torch.manual_seed(0)
    dense = (torch.nn.Linear(64, 48) if kind == "linear" else torch.nn.Conv2d(32, 32, 3, padding=1))
    x = torch.randn(5, 64) if kind == "linear" else torch.randn(2, 32, 6, 6)
    sparse = sparsify.sparsify(torch.nn.Sequential(dense), density=1.0, block_size=16, min_size=0,
                               dense_if_larger=False)
    assert type(sparse[0]).__name__.startswith("BlockSparse")
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = dense(x), sparse(x)
    assert got.dtype == want.dtype == torch.bfloat16
    # the same bfloat16 operands, summed in another order: bfloat16's 8-bit mantissa (eps 7.8e-3)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    if grad:
        got.float().square().sum().backward()
        assert sparse[0].values.grad is not None and sparse[0].values.grad.dtype == torch.float32
