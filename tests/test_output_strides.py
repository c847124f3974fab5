"""Rewritten layers return what ``nn.Linear`` returns: a contiguous tensor.

Property: for every CPU path of the block-sparse product (dense, bsr, gather) and for the
factorized layers, with grad on (through the custom op) and off (the eager shortcut),
the output is contiguous, so the caller's ``y.view(...)`` works as it does on a dense
layer's output and ``scaled_dot_product_attention`` keeps its fused kernel.  A transposed
result from the eager shortcut once made ``y.view(-1)`` raise under ``torch.no_grad()``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsify
from sparsify.modules import BlockSparseLinear


@pytest.mark.parametrize("path", ["dense", "bsr", "gather"])
@pytest.mark.parametrize("grad", [False, True])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.sampled_from([1, 7, 64, 300]), density=st.sampled_from([0.05, 0.25, 0.6]))
def test_block_sparse_output_is_contiguous(monkeypatch, path, grad, rows, density):
    monkeypatch.setenv("SPARSIFY_CPU_PATH", path)
    m = BlockSparseLinear.from_dense(torch.nn.Linear(256, 192), density=density, block_size=32)
    x = torch.randn(rows, 2, 256)
    with torch.set_grad_enabled(grad):
        y = m(x)
    assert y.is_contiguous()
    y.view(-1)  # raises on a transposed result
    assert torch.allclose(y, x @ m.to_dense().T + m.bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["low_rank", "cp", "tucker", "tt"])
@pytest.mark.parametrize("grad", [False, True])
def test_factorized_outputs_are_contiguous(method, grad):
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
    conv = sparsify.sparsify(model, method=method, rank=8, min_size=0)
    x = torch.randn(5, 3, 256)
    with torch.set_grad_enabled(grad):
        y = conv[0](x)
    assert y.is_contiguous()
    y.view(-1)
