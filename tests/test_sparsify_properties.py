"""Properties of the whole conversion over random architectures (MLP, CNN, transformer block)."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sparsify.passes import CaptureWarning

import sparsify

from .archs import architectures
from .helpers import assert_same_state, masked_reference, rel_err, state_snapshot

densities = st.sampled_from([0.05, 0.1, 0.25, 0.5, 0.75])
blocks = st.sampled_from([8, 16, 32, 64])


@given(architectures, blocks)
def test_density_one_equals_original(arch, block_size):
    model, inputs = arch
    converted = sparsify.sparsify(model, density=1.0, block_size=block_size, min_size=0, example_inputs=inputs,
                                  dense_if_larger=False)  # padded blocks hold more than the weight
    assert any(d.method == "block_sparse" for d in converted._sparsify_plan.decisions)
    with torch.no_grad():
        assert rel_err(converted(*inputs), model(*inputs)) < 1e-5


@given(architectures, densities, blocks)
def test_any_density_equals_densify_and_masked_original(arch, density, block_size):
    model, inputs = arch
    snapshot = state_snapshot(model)
    converted = sparsify.sparsify(model, density=density, block_size=block_size, min_size=0,
                                  example_inputs=inputs)
    assert_same_state(model, snapshot)  # the input model is never mutated
    dense_again = sparsify.densify(converted)
    reference = masked_reference(model, converted)
    with torch.no_grad():
        y = converted(*inputs)
        assert rel_err(y, dense_again(*inputs)) < 1e-5
        assert rel_err(y, reference(*inputs)) < 1e-5
    # densify gives plain torch layers only
    assert not any(hasattr(m, "to_dense_module") for m in dense_again.modules())


@given(architectures)
def test_low_rank_full_rank_equals_original(arch):
    model, inputs = arch
    converted = sparsify.sparsify(model, method="low_rank", rank=1.0, min_size=0, example_inputs=inputs,
                                  dense_if_larger=False)  # full rank is above break-even
    assert any(d.method == "low_rank" for d in converted._sparsify_plan.decisions)
    with torch.no_grad():
        assert rel_err(converted(*inputs), model(*inputs)) < 1e-5


@given(architectures, st.sampled_from([0.1, 0.3, 0.6]))
def test_low_rank_equals_its_densified_reconstruction(arch, rank):
    model, inputs = arch
    snapshot = state_snapshot(model)
    converted = sparsify.sparsify(model, method="low_rank", rank=rank, min_size=0, example_inputs=inputs)
    assert_same_state(model, snapshot)
    with torch.no_grad():
        assert rel_err(converted(*inputs), sparsify.densify(converted)(*inputs)) < 1e-5


@given(architectures, densities)
def test_converted_model_trains(arch, density):
    model, inputs = arch
    converted = sparsify.sparsify(model, density=density, block_size=16, min_size=0).train()
    opt = torch.optim.SGD(converted.parameters(), lr=1e-3)
    y0 = converted(*inputs)
    y0.square().mean().backward()
    for name, p in converted.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    opt.step()
    with torch.no_grad():
        assert not torch.equal(converted(*inputs), y0.detach())


class Untraceable(torch.nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(256, 256)
        self.b = torch.nn.Linear(256, 128)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:
            h = torch.relu(h)
        return self.b(h)


@given(densities, st.integers(0, 1000))
def test_untraceable_model_converts_through_the_fallback(density, seed):
    torch.manual_seed(seed)
    model = Untraceable().eval()
    x = torch.randn(4, 256)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = sparsify.sparsify(model, density=density, example_inputs=(x,))
    capture_warnings = [w for w in caught if issubclass(w.category, CaptureWarning)]
    assert len(capture_warnings) == 1
    assert "TraceError" in str(capture_warnings[0].message) or "trace" in str(capture_warnings[0].message)
    assert isinstance(converted.a, sparsify.BlockSparseLinear)
    plan = converted._sparsify_plan
    assert not plan.traced and plan.capture_note
    with torch.no_grad():
        assert rel_err(converted(x), masked_reference(model, converted)(x)) < 1e-5
        assert rel_err(converted(x), sparsify.densify(converted)(x)) < 1e-5


def test_inplace_true_converts_the_given_model():
    model = Untraceable()
    out = sparsify.sparsify(model, density=0.5, inplace=True)
    assert out is model and isinstance(model.a, sparsify.BlockSparseLinear)


def test_converted_model_retraces_exports_and_compiles():
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128)).eval()
    x = torch.randn(3, 128)
    converted = sparsify.sparsify(model, density=0.5, block_size=32, example_inputs=(x,))
    with torch.no_grad():
        expected = converted(x)
    retraced = torch.fx.symbolic_trace(converted)
    exported = torch.export.export(converted, (x,))
    compiled = torch.compile(converted, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(retraced(x), expected)
        assert torch.allclose(exported.module()(x), expected)
        assert torch.allclose(compiled(x), expected)
    # training through the compiled graph (fake impls + autograd formula)
    converted.train()
    compiled = torch.compile(converted, backend="aot_eager", fullgraph=True)
    compiled(x).sum().backward()
    assert converted.get_submodule("0").values.grad is not None


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"density": 0.0}, "density"),
        ({"density": 1.5}, "density"),
        ({"block_size": 12}, "block_size"),
        ({"method": "magic"}, "method"),
        ({"method": "low_rank", "rank": 0}, "rank"),
        ({"method": "low_rank"}, "rank"),
        ({"densty": 0.5}, "densty"),
        ({"rules": [sparsify.Rule("nothing.*", density=0.5)], "strict": True}, "matches no layer"),
    ],
)
def test_bad_config_raises_before_any_work(kwargs, option, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(256, 256))
    snapshot = state_snapshot(model)
    ran = []
    monkeypatch.setattr("sparsify.api.run_passes", lambda *a, **k: ran.append(1))
    if "strict" in kwargs:
        # strict needs the model's layers: it fails in planning, the first pass, before the
        # example inputs run (ShapeProp) and before any rewrite
        monkeypatch.undo()
        shapes_module = importlib.import_module("sparsify.passes.annotate_shapes")
        monkeypatch.setattr(shapes_module, "ShapeProp", lambda *a: ran.append(1))
    with pytest.raises(ValueError, match=option):
        sparsify.sparsify(model, example_inputs=(torch.randn(2, 256),), **kwargs)
    assert not ran
    assert_same_state(model, snapshot)


def test_example_inputs_that_do_not_fit_name_the_problem():
    model = torch.nn.Sequential(torch.nn.Linear(256, 256))
    with pytest.raises(ValueError, match="example inputs do not fit"):
        sparsify.sparsify(model, example_inputs=(torch.randn(2, 100),))
