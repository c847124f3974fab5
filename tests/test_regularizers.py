"""Tensor dropout and the rank lasso work on every factorized module, Linear included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsify
from sparsify.modules.low_rank import LowRankLinear
from sparsify.regularizers import rank_components, rank_lasso, tensor_dropout


def every_kind() -> list[nn.Module]:
    torch.manual_seed(0)
    lin, conv = nn.Linear(16, 24), nn.Conv2d(8, 12, 3, padding=1)
    return [
        sparsify.CPLinear.from_dense(lin, rank=6),
        sparsify.TuckerLinear.from_dense(lin, rank=(2, 2, 2, 2)),
        sparsify.TTLinear.from_dense(lin, rank=3),
        LowRankLinear.from_dense(lin, rank=4),
        sparsify.CPConv.from_dense(conv, rank=5),
        sparsify.TuckerConv.from_dense(conv, rank=(4, 3)),
    ]


def input_for(m: nn.Module) -> torch.Tensor:
    return torch.randn(4, 8, 6, 6) if isinstance(m, (sparsify.CPConv, sparsify.TuckerConv)) else torch.randn(4, 16)


@pytest.mark.parametrize("m", every_kind(), ids=lambda m: type(m).__name__)
def test_tensor_dropout_trains_and_is_identity_in_eval(m):
    x = input_for(m)
    m.eval()
    ref = m(x).detach()
    handle = tensor_dropout(m, p=0.5)
    torch.testing.assert_close(m(x), ref)            # eval: identity
    m.train()
    torch.manual_seed(1)
    y = m(x)
    assert not torch.allclose(y, ref)                # training: components dropped
    y.square().mean().backward()
    assert all(p.grad is not None for p in m.parameters())
    handle.remove()
    m.eval()
    torch.testing.assert_close(m(x), ref)            # removed: the original parameters
    assert not any("parametrizations" in k for k in m.state_dict())


@pytest.mark.parametrize("m", every_kind(), ids=lambda m: type(m).__name__)
def test_rank_lasso_accumulates_and_pushes_components(m):
    lasso = rank_lasso(m, penalty=0.1)
    x = input_for(m)
    m(x)
    m(x)
    expected = 2 * lasso.penalty_now()
    torch.testing.assert_close(lasso.loss, expected)
    lasso.loss.backward()
    owner, name, _ = rank_components(m)[0]
    assert getattr(owner, name).grad is not None
    lasso.reset()
    assert lasso.loss == 0.0
    lasso.remove()
    m(x)
    assert lasso.loss == 0.0


def test_on_a_converted_model_and_errors():
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))
    conv = sparsify.sparsify(model, method="tt", rank=8, min_size=0, example_inputs=(torch.randn(64, 128),))
    handle = tensor_dropout(conv, p=0.2)
    lasso = rank_lasso(conv, 1e-3)
    conv.train()
    loss = conv(torch.randn(64, 128)).square().mean() + lasso.loss
    loss.backward()
    handle.remove()
    with pytest.raises(ValueError, match="no factorized module"):
        tensor_dropout(model)
    with pytest.raises(ValueError, match="p in"):
        tensor_dropout(conv, p=1.0)
