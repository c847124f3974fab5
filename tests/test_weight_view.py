"""``layer.weight`` of a rewritten layer (``DenseWeightView``) and weights used functionally.

Properties: for any rewritten linear-like layer and any input, every way model code
uses a weight (``F.linear``, ``x @ W.T``, ``torch.matmul``, ``torch.addmm`` on the
``[in, out]`` form, arithmetic, indexing) equals the same use of the dense weight
``to_dense()``, and gradients reach the layer's own parameters.

Tolerance: float32, sums of at most 128 products in another order: 1e-5 relative.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsify
from sparsify import BlockSparseLinear, LowRankLinear, TTLinear, TuckerLinear
from sparsify.modules.weight_view import DenseWeightView, materialize


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def make_layer(kind: str, out_f: int, in_f: int, seed: int):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    if kind == "block_sparse":
        return BlockSparseLinear.from_dense(lin, density=0.5, block_size=16)
    if kind == "low_rank":
        return LowRankLinear.from_dense(lin, rank=4)
    if kind == "tucker":
        return TuckerLinear.from_dense(lin, rank=0.5)
    return TTLinear.from_dense(lin, rank=0.5)


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(["block_sparse", "low_rank", "tucker", "tt"]),
       out_f=st.sampled_from([16, 32, 48]), in_f=st.sampled_from([16, 32, 64]),
       lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), seed=st.integers(0, 99))
def test_every_use_of_the_weight_equals_the_same_use_of_the_dense_weight(kind, out_f, in_f, lead, seed):
    layer = make_layer(kind, out_f, in_f, seed)
    w, dense = layer.weight, layer.to_dense().detach()
    assert isinstance(w, DenseWeightView) and w.shape == dense.shape and w.dtype == dense.dtype
    x = torch.randn(*lead, in_f) if lead else torch.randn(3, in_f)
    b = torch.randn(out_f)
    with torch.no_grad():
        assert rel(F.linear(x, w), x @ dense.T) < 1e-5
        assert rel(F.linear(x, w, b), x @ dense.T + b) < 1e-5
        assert rel(x @ w.T, x @ dense.T) < 1e-5
        assert rel(torch.matmul(x, w.t()), x @ dense.T) < 1e-5
        assert rel(x @ w.transpose(0, 1), x @ dense.T) < 1e-5
        x2 = x.reshape(-1, in_f)
        assert rel(torch.addmm(b, x2, w.T), x2 @ dense.T + b) < 1e-5
        assert rel(w * 2 + 1, dense * 2 + 1) < 1e-6
        assert torch.equal(materialize(w)[1:3], dense[1:3])
        assert rel(w.sum(), dense.sum()) < 1e-5 or float(dense.abs().sum()) == 0
    assert w.size() == dense.size() and w.numel() == dense.numel() and w.dim() == 2
    assert w.T.shape == (in_f, out_f) and w.requires_grad


@pytest.mark.parametrize("kind", ["block_sparse", "low_rank", "tucker"])
def test_gradients_through_the_view_reach_the_layer_parameters(kind):
    layer = make_layer(kind, 32, 32, 0)
    x = torch.randn(4, 32, requires_grad=True)
    (F.linear(x, layer.weight) ** 2).sum().backward()
    params = [p for n, p in layer.named_parameters() if n != "bias"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    # the same gradient as through the dense weight
    g_view = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    x2 = x.detach().requires_grad_(True)
    (F.linear(x2, layer.to_dense()) ** 2).sum().backward()
    for g, p in zip(g_view, params):
        assert rel(g, p.grad) < 1e-5


class Functional(nn.Module):
    """Attention-style projections used functionally, as F.linear / x @ W.T / addmm."""

    def __init__(self):
        super().__init__()
        self.qkv_weight = nn.Parameter(torch.randn(192, 64) / 8)
        self.qkv_bias = nn.Parameter(torch.randn(192) / 8)
        self.proj = nn.Parameter(torch.randn(64, 64) / 8)
        self.up = nn.Parameter(torch.randn(64, 128) / 8)   # [in, out], used as addmm(b, x, W)
        self.up_bias = nn.Parameter(torch.zeros(128))

    def forward(self, x):
        q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).chunk(3, -1)
        h = (q * k).softmax(-1) * v
        h = h @ self.proj.T
        return torch.addmm(self.up_bias, h.reshape(-1, 64), self.up)

    def extra(self):
        return self.proj.shape


def test_functional_weights_are_rewritten_in_the_model_and_it_keeps_its_class():
    torch.manual_seed(0)
    model = Functional().eval()
    x = torch.randn(5, 64)
    sparse = sparsify.sparsify(model, density=0.5, block_size=16, min_size=0, example_inputs=(x,))
    assert isinstance(sparse, Functional) and type(sparse).__name__ == "Functional"
    rows = {d.name: d for d in sparse._sparsify_plan.decisions}
    assert {n for n, d in rows.items() if d.rewrites} == {"qkv_weight", "proj", "up"}
    assert "qkv_weight" not in dict(sparse.named_parameters())
    assert isinstance(sparse.qkv_weight, DenseWeightView) and sparse.extra() == (64, 64)
    assert isinstance(sparse.qkv_weight_rewritten, BlockSparseLinear)
    assert tuple(sparse.up.shape) == (64, 128)  # the [in, out] orientation of its use
    dense = sparsify.densify(sparse)
    assert type(dense) is Functional and isinstance(dense.qkv_weight, nn.Parameter)
    with torch.no_grad():
        assert rel(sparse(x), dense(x)) < 1e-5
    # copies and pickles keep working, and rebuild the class
    for clone in (copy.deepcopy(sparse), pickle.loads(pickle.dumps(sparse))):
        assert isinstance(clone, Functional)
        with torch.no_grad():
            assert rel(clone(x), sparse(x)) < 1e-6
    # training reaches the stored blocks, and the kept bias
    sparse.train()
    sparse(x).sum().backward()
    assert sparse.qkv_weight_rewritten.values.grad is not None and sparse.qkv_bias.grad is not None


def test_a_weight_used_outside_linear_calls_stays_dense_with_the_reason():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(64, 64))

        def forward(self, x):
            return F.linear(x, self.w) + self.w.sum()

    plan = sparsify.sparsify(Both(), density=0.5, min_size=0, example_inputs=(torch.randn(2, 64),))._sparsify_plan
    assert plan.get("w").method == "dense" and "also used outside" in plan.get("w").reason
