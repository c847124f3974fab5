"""Properties of the tensor-factorized Linear layers (CP, Tucker, TT-matrix).

Tolerances: float64 factorizations at full rank are exact up to the round-off
of a few hundred-term sums (eps 2.2e-16), so 1e-8 relative leaves a wide
margin; float32 (eps 1.2e-7) with the same sums, 1e-4.
"""

from __future__ import annotations

import math

import pytest
import tensorly as tl
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sparsify.passes.factorized import param_formula
from torch import nn

import sparsify
from sparsify import decompose
from sparsify.modules.factorized_linear import (
    Contraction,
    CPLinear,
    TTLinear,
    TuckerLinear,
    tensorize,
)

from .helpers import rel_err

TOL = {torch.float64: 1e-8, torch.float32: 1e-4}
FEATURES = st.sampled_from([4, 6, 8, 12, 16, 20, 24])


def full_rank(cls, layer: nn.Linear, order: int):
    out_modes, in_modes = tensorize(layer.out_features, order), tensorize(layer.in_features, order)
    if cls is CPLinear:
        return decompose.cp_exact_rank((*out_modes, *in_modes))
    if cls is TuckerLinear:
        return (*out_modes, *in_modes)
    return 10**6  # TT: capped at what TT-SVD supports, which is exact


def make(cls, layer, rank, **kw):
    order = 3 if cls is TTLinear else 2
    return cls.from_dense(layer, rank=rank, **kw) if rank is not None else cls.from_dense(
        layer, rank=full_rank(cls, layer, order), **kw)


def test_tensorly_api():
    """The tensorly calls and return shapes decompose.py relies on (pinned >=0.8,<0.11)."""
    from tensorly.decomposition import partial_tucker

    t = torch.randn(4, 5, 3, dtype=torch.float64)
    with tl.backend_context("pytorch"):
        (core, factors), errors = partial_tucker(t, [2, 3], modes=[0, 1], n_iter_max=2)
    assert tuple(core.shape) == (2, 3, 3) and [tuple(f.shape) for f in factors] == [(4, 2), (5, 3)]
    assert tl.get_backend() == "numpy"  # never changed globally


def test_global_backend_untouched():
    before = tl.get_backend()
    CPLinear.from_dense(nn.Linear(8, 8), rank=4)
    TuckerLinear.from_dense(nn.Linear(8, 8), rank=2)
    TTLinear.from_dense(nn.Linear(8, 8), rank=2)
    assert tl.get_backend() == before


@settings(deadline=None)
@given(cls=st.sampled_from([CPLinear, TuckerLinear, TTLinear]), n_in=FEATURES, n_out=FEATURES,
       bias=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32]),
       forward=st.sampled_from(["factorized", "reconstructed"]))
def test_full_rank_equals_dense(cls, n_in, n_out, bias, dtype, forward):
    torch.manual_seed(n_in * 31 + n_out)
    layer = nn.Linear(n_in, n_out, bias=bias).to(dtype)
    m = make(cls, layer, None, forward=forward)
    x = torch.randn(3, 2, n_in, dtype=dtype)
    assert rel_err(m.to_dense(), layer.weight) < TOL[dtype]
    assert rel_err(m(x), layer(x)) < TOL[dtype]
    assert m.relative_error < TOL[torch.float64]
    assert rel_err(m.to_dense_module()(x), layer(x)) < TOL[dtype]


@settings(deadline=None)
@given(cls=st.sampled_from([CPLinear, TuckerLinear, TTLinear]), n_in=FEATURES, n_out=FEATURES,
       frac=st.sampled_from([0.1, 0.3, 0.6]), bias=st.booleans())
def test_params_match_formula_and_state_dict_round_trips(cls, n_in, n_out, frac, bias):
    layer = nn.Linear(n_in, n_out, bias=bias)
    m = make(cls, layer, frac)
    method = {CPLinear: "cp", TuckerLinear: "tucker", TTLinear: "tt"}[cls]
    ranks = m.rank if cls is CPLinear else m.ranks
    assert sum(p.numel() for p in m.parameters()) == param_formula(method, layer, ranks)
    # a fresh module with the same constructor arguments loads the state and computes the same
    twin = cls(n_in, n_out, ranks, in_modes=m.in_modes, out_modes=m.out_modes, bias=bias)
    twin.load_state_dict(m.state_dict())
    x = torch.randn(5, n_in)
    torch.testing.assert_close(twin(x), m(x))


@settings(deadline=None)
@given(cls=st.sampled_from([CPLinear, TuckerLinear, TTLinear]), n_in=FEATURES, n_out=FEATURES,
       forward=st.sampled_from(["factorized", "reconstructed"]))
def test_forward_backward_match_autograd_through_to_dense(cls, n_in, n_out, forward):
    torch.manual_seed(n_in + 7 * n_out)
    layer = nn.Linear(n_in, n_out).double()
    m = make(cls, layer, 0.5, forward=forward)
    x = torch.randn(4, n_in, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, n_out, dtype=torch.float64)
    params = list(m.parameters())
    y1 = m(x)
    grads1 = torch.autograd.grad((y1 * g).sum(), [x, *params])
    y2 = F.linear(x, m.to_dense(), m.bias)
    grads2 = torch.autograd.grad((y2 * g).sum(), [x, *params])
    assert rel_err(y1, y2) < 1e-10
    for a, b in zip(grads1, grads2):
        assert rel_err(a, b) < 1e-10


@settings(deadline=None)
@given(cls=st.sampled_from([CPLinear, TuckerLinear, TTLinear]), n_in=st.sampled_from([64, 256, 1024]),
       n_out=st.sampled_from([64, 256, 1024]), batch=st.sampled_from([1, 16, 256]),
       frac=st.sampled_from([0.05, 0.2, 0.5]))
def test_forward_contraction_bounded(cls, n_in, n_out, batch, frac):
    """The planned path never builds an intermediate larger than input + output when one
    exists, and the planner only runs it when its FLOPs are at most the dense matmul's."""
    out_modes = tensorize(n_out, 3 if cls is TTLinear else 2)
    in_modes = tensorize(n_in, 3 if cls is TTLinear else 2)
    shape = (*out_modes, *in_modes)
    method = {CPLinear: "cp", TuckerLinear: "tucker", TTLinear: "tt"}[cls]
    from sparsify import ranks as rs

    t = torch.zeros(shape)
    if cls is CPLinear:
        ranks = rs.cp_rank(t, frac)
    elif cls is TuckerLinear:
        ranks = rs.tucker_ranks(t, range(len(shape)), frac)
    else:
        ranks = rs.tt_ranks(t, frac)
    m = cls(n_in, n_out, ranks, in_modes=in_modes, out_modes=out_modes, batch_hint=batch, device="meta")
    path: Contraction = m._forward_path
    if path.fits_memory:
        assert path.largest_intermediate <= batch * (n_in + n_out)
    assert method in sparsify.METHODS


def test_tt_stores_produced_ranks():
    layer = nn.Linear(8, 8)  # modes (2, 2, 2): bonds of at most 4 and 4
    m = TTLinear.from_dense(layer, rank=(1, 50, 50, 1))
    assert m.ranks == (1, 4, 4, 1)
    assert [tuple(c.shape) for c in m.cores] == [(1, 2, 2, 4), (4, 2, 2, 4), (4, 2, 2, 1)]


def test_cp_rank_capped_not_blown_up():
    """A rank far past the modes neither builds an SVD of the unfolding nor errors."""
    layer = nn.Linear(64, 64)  # modes (8, 8, 8, 8): the exact rank is 512, the cap 128
    m = CPLinear.from_dense(layer, rank=10**5, n_iter_max=2)
    assert m.rank == decompose.cp_max_rank((8, 8, 8, 8))
    with pytest.raises(ValueError, match="outside"):
        decompose.cp(torch.randn(8, 8, 8, 8), 10**5)


@pytest.mark.parametrize("method", ["cp", "tucker", "tt"])
def test_converted_model_traces_and_trains(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    x = torch.randn(256, 64)  # at a few tokens the planner keeps small layers dense (see test_ranks)
    conv = sparsify.sparsify(model, method=method, rank=0.3, min_size=0, example_inputs=(x,))
    kinds = {type(m).__name__ for m in conv.modules()}
    assert kinds & {"CPLinear", "TuckerLinear", "TTLinear"}
    traced = torch.fx.symbolic_trace(conv)
    torch.testing.assert_close(traced(x), conv(x))
    dense = sparsify.densify(conv)
    torch.testing.assert_close(dense(x), conv(x), rtol=1e-4, atol=1e-5)
    conv(x).square().mean().backward()
    assert all(p.grad is not None for p in conv.parameters())
    rows = sparsify.report(conv).rows
    for r in rows:
        if r["method"] == method:
            assert r["result"]["forward"] in ("factorized", "reconstructed")
            assert "rank" in r["result"] and r["result"]["relative_error"] >= 0


def test_functional_linear_site():
    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(128, 128))
            self.b = nn.Parameter(torch.randn(128))

        def forward(self, x):
            return F.linear(x, self.w, self.b)

    x = torch.randn(256, 128)
    conv = sparsify.sparsify(Fn(), method="tucker", rank=0.5, min_size=0, example_inputs=(x,))
    assert any(isinstance(m, TuckerLinear) for m in conv.modules())
    assert math.isfinite(float(conv(x).detach().sum()))


# ------------------------------------------- reconstructed-weight cache and the forward choice
@settings(deadline=None, max_examples=20)
@given(cls=st.sampled_from([CPLinear, TuckerLinear, TTLinear]), n_in=st.sampled_from([8, 12, 16]),
       n_out=st.sampled_from([4, 8, 18]))
def test_reconstructed_cache_used_only_in_eval_no_grad_and_invalidated_by_inplace_updates(cls, n_in, n_out):
    layer = nn.Linear(n_in, n_out).double()
    m = make(cls, layer, 0.5, forward="reconstructed")
    x = torch.randn(3, n_in, dtype=torch.float64)
    with torch.no_grad():
        m.train()(x)
    assert "_weight_cache" not in m.__dict__          # training mode: rebuilt every call
    m.eval()
    assert m(x).grad_fn is not None and "_weight_cache" not in m.__dict__  # grad on: never cached
    with torch.no_grad():
        m(x)
        w = m.__dict__["_weight_cache"][1]
        m(x)
        assert m.__dict__["_weight_cache"][1] is w      # reused
        next(iter(m._weight_factors())).mul_(-3.0)      # in-place: the version counter moves
        assert torch.allclose(m(x), F.linear(x, m.to_dense(), m.bias), rtol=1e-10, atol=1e-12)
        assert m.__dict__["_weight_cache"][1] is not w
    assert torch.fx.symbolic_trace(nn.Sequential(m)) is not None


@settings(deadline=None, max_examples=15)
@given(method=st.sampled_from(["cp", "tucker", "tt"]), batch=st.sampled_from([1, 8, 128]),
       rank=st.sampled_from([0.05, 0.3, 0.9]))
def test_auto_forward_never_exceeds_dense_inference_flops(method, batch, rank):
    x = torch.randn(batch, 64)
    out = sparsify.sparsify(nn.Sequential(nn.Linear(64, 64)), method=method, rank=rank, min_size=0,
                            example_inputs=(x,))
    (d,) = out._sparsify_plan.decisions
    if d.method == "dense":
        return
    m = out.get_submodule(d.result["module"])
    assert m.flops(x.shape) <= m.dense_flops(x.shape)
