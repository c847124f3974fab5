"""What users do with a converted model besides calling it.

Properties:
* ``torch.jit.trace`` of any converted model passes its own check (it re-traces under
  ``no_grad``), with grad on or off, and the traced module follows in-place weight
  updates: no cached weight is baked into the graph;
* under ``torch.func`` (``grad``, ``vmap(grad)`` per-sample gradients, ``jacrev``)
  a block-sparse Linear / conv / LSTM model has the gradients of ``densify(model)``
  (float64), while outside any transform the block-sparse ops run, never the
  composite fallback;
* a block-sparse model moved to the meta device runs forward and backward
  (shape inference, FLOP counting, skeleton checks), with the shapes a real run has.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import sparsify
from sparsify import BlockSparseConv2d, BlockSparseLinear
from sparsify.modules import block_sparse, block_sparse_conv, block_sparse_lstm
from sparsify.modules.block_sparse_lstm import BlockSparseLSTM
from sparsify.modules.sparse_weight import BlockSparseWeight

from .helpers import rel_err


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, 16)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((-2, -1)))


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(16, 32, num_layers=2, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(64, 16)

    def forward(self, x):
        return self.fc(self.lstm(x)[0].mean(-2))


class MHANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x)[0]


ARCHS = {"mlp": (MLP, (3, 32)), "conv": (ConvNet, (3, 16, 6, 6)), "lstm": (LSTMNet, (3, 5, 16)),
         "mha": (MHANet, (3, 5, 32))}
METHODS = {"block_sparse": dict(method="block_sparse", density=0.5, block_size=16),
           "tucker": dict(method="tucker", rank=0.5), "cp": dict(method="cp", rank=0.5),
           "tt": dict(method="tt", rank=0.5), "low_rank": dict(method="low_rank", rank=0.5)}
SPARSE_TYPES = (BlockSparseLinear, BlockSparseConv2d, BlockSparseLSTM)


def _converted(arch: str, method: str, dtype=torch.float32):
    cls, shape = ARCHS[arch]
    torch.manual_seed(0)
    model, x = cls().to(dtype).eval(), torch.randn(*shape, dtype=dtype)
    conv = sparsify.sparsify(model, min_size=0, example_inputs=(x,), dense_if_larger=False, **METHODS[method])
    changed = [m for m in conv.modules() if type(m).__module__.startswith("sparsify.")]
    assert changed, f"nothing of {arch} was converted by {method}"
    return conv.eval(), x


# ----------------------------------------------------------------------------- torch.jit.trace
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the layers' shape checks, as nn.Linear's
@pytest.mark.parametrize("arch, method", [("mlp", m) for m in METHODS] + [("conv", m) for m in METHODS]
                         + [("lstm", "block_sparse"), ("mha", "block_sparse")])
def test_a_jit_trace_passes_its_check_and_follows_weight_updates(arch, method):
    model, x = _converted(arch, method)
    traced = torch.jit.trace(model, (x,), check_trace=True)  # the check re-traces under no_grad
    with torch.no_grad():
        traced_no_grad = torch.jit.trace(model, (x,), check_trace=True)
        model(x)  # fill the inference caches, which a trace must not read
        for p in model.parameters():
            p.mul_(0.5)  # e.g. an optimizer step or load_state_dict
        want = model(x)
        for t in (traced, traced_no_grad):
            torch.testing.assert_close(t(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_keeps_the_block_sparse_op_in_its_graph():
    model, x = _converted("mlp", "block_sparse")
    with torch.no_grad():
        graph = torch.jit.trace(model, (x,)).inlined_graph
    kinds = [n.kind() for n in graph.nodes()]
    assert kinds.count("sparsify::bsmm") == 3
    assert not [n for n in graph.nodes() if n.kind() == "prim::Constant" and n.output().type().kind() == "TensorType"]


# ----------------------------------------------------------------------------- torch.func
def _blocks_of(owner: nn.Module, dense_grad: torch.Tensor) -> torch.Tensor:
    """The gradient of ``owner.values`` that a dense weight gradient implies: its stored blocks."""
    gather = owner.layout.values_from_dense
    if dense_grad.dim() == 2:
        return gather(dense_grad)
    per_tap = vmap(vmap(gather))(dense_grad.permute(2, 3, 0, 1))  # [kh, kw, nnz, b, b]
    return per_tap.permute(2, 3, 4, 0, 1)


def _dense_per_sample(dense: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    # a loop of ordinary autograd: nn.LSTM itself does not run under vmap
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(x.shape[0]):
        dense.zero_grad()
        dense(x[i:i + 1]).pow(2).sum().backward()
        for n, p in dense.named_parameters():
            out.setdefault(n, []).append(p.grad.clone())
    return {n: torch.stack(g) for n, g in out.items()}


@pytest.mark.parametrize("arch", ["mlp", "conv", "lstm"])
def test_torch_func_gradients_equal_those_of_the_densified_model(arch):
    model, x = _converted(arch, "block_sparse", torch.float64)
    assert any(isinstance(m, SPARSE_TYPES) for m in model.modules())
    dense = sparsify.densify(copy.deepcopy(model))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi):
        return functional_call(model, p, (xi[None],)).pow(2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    want = _dense_per_sample(dense, x)
    for name, g in per_sample.items():
        if name.endswith(".values"):
            owner = model.get_submodule(name[: -len(".values")])
            dense_name = name[: -len(".values")] + ("" if isinstance(owner, BlockSparseWeight) else ".weight")
            expect = torch.stack([_blocks_of(owner, w) for w in want[dense_name]])
        else:
            expect = want[name]
        assert g.shape == expect.shape and rel_err(g, expect) < 1e-10, name
    gx = grad(lambda xi: model(xi).sum())(x)
    assert rel_err(gx, grad(lambda xi: dense(xi).sum())(x)) < 1e-10
    if arch == "mlp":
        assert rel_err(jacrev(model)(x), jacrev(dense)(x)) < 1e-10


def test_outside_transforms_the_block_sparse_ops_run(monkeypatch):
    # the composite forms are for torch.func only: the fast path and the ops' autograd stay as they were
    def refuse(*_args, **_kwargs):
        raise AssertionError("composite form called outside a torch.func transform")

    for mod, name in [(block_sparse, "bsmm_composite"), (block_sparse_conv, "bsconv2d_composite"),
                      (block_sparse_lstm, "bsmm_composite"), (block_sparse_lstm, "bslstm_recurrence_composite")]:
        monkeypatch.setattr(mod, name, refuse)
    for arch in ("mlp", "conv", "lstm"):
        model, x = _converted(arch, "block_sparse")
        with torch.no_grad():
            model(x)
        model.train()(x).sum().backward()


# ----------------------------------------------------------------------------- the meta device
@pytest.mark.parametrize("arch", ["mlp", "conv", "lstm", "mha"])
def test_a_block_sparse_model_runs_forward_and_backward_on_meta(arch):
    model, x = _converted(arch, "block_sparse")
    shape = model(x).shape
    meta = copy.deepcopy(model).to("meta")
    with torch.no_grad():
        y = meta(x.to("meta"))
    assert y.is_meta and y.shape == shape
    xm = x.to("meta").requires_grad_(True)
    y = meta.train()(xm)
    assert y.is_meta and y.shape == shape
    y.sum().backward()
    assert xm.grad.is_meta and xm.grad.shape == x.shape
    for name, p in meta.named_parameters():
        assert p.grad is not None and p.grad.is_meta and p.grad.shape == p.shape, name
