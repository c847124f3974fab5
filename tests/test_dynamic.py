"""Dynamic sparsity (SET, RigL): fixed density, in-place layouts, optimizer state, exact RigL scores, determinism.

Properties:
* after any number of updates every weight keeps its block count, and the
  model still equals its dense reference (``to_dense_module``);
* grown blocks start at zero and so does their optimizer state; surviving blocks
  keep their values and their Adam moments; the values parameter keeps its identity;
* RigL's blockwise scores equal the block norms of the dense gradient that
  autograd computes for the dense reference (Linear, Conv2d, LSTM), and RigL
  grows the top-scored blocks;
* decisions are a function of the seed; under torch.distributed rank 0's
  masks are adopted everywhere.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparsify.dynamic import SET, DynamicSparsity, RigL, _grad_block_norms, sparse_weight_modules
from sparsify.modules.block_sparse import BlockSparseLinear
from sparsify.modules.block_sparse_conv import BlockSparseConv2d
from sparsify.modules.block_sparse_lstm import BlockSparseLSTM
from sparsify.patterns import random_layout, small_world_layout

from .helpers import rel_err


class Net(nn.Module):
    """A Linear, a Conv2d and an LSTM, all block-sparse."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = BlockSparseConv2d(8, 16, 3, random_layout((16, 8), 4, 0.5, seed=seed), padding=1)
        self.lstm = BlockSparseLSTM(16, 16, density=0.5, block_size=4, pattern="small_world", seed=seed,
                                    batch_first=True)
        self.fc = BlockSparseLinear(16, 12, small_world_layout((12, 16), 4, 0.5, seed=seed))

    def forward(self, x):  # x [N, 8, 4, 5]
        h = self.conv(x).relu().mean(2).transpose(1, 2)  # [N, 5, 16]
        out, _ = self.lstm(h)
        return self.fc(out)

    def dense(self) -> nn.Module:
        ref = copy.copy(self)
        ref._modules = dict(self._modules)
        ref.conv = self.conv.to_dense_module()
        ref.lstm = self.lstm.to_dense_module()
        ref.fc = self.fc.to_dense_module()
        return ref


def _train(model, helper_cls, steps, seed=0, **kw):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    helper = helper_cls(model, opt, seed=seed, **kw)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(3, 8, 4, 5, generator=gen)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        helper.step()
    return helper, opt


@settings(max_examples=6)
@given(mode=st.sampled_from([RigL, SET]), steps=st.integers(1, 4), every=st.integers(1, 2), seed=st.integers(0, 99))
def test_density_is_fixed_and_the_model_still_equals_its_dense_reference(mode, steps, every, seed):
    model = Net(seed)
    before = {n: m.layout for n, m in sparse_weight_modules(model)}
    helper, _ = _train(model, mode, steps, seed=seed, update_every=every, drop_fraction=0.5)
    after = {n: m.layout for n, m in sparse_weight_modules(model)}
    assert before.keys() == after.keys() and len(after) == 4
    for n in before:
        assert after[n].nnz == before[n].nnz, n
    if steps >= every:
        assert any(after[n] != before[n] for n in before), "an update should move some blocks"
    x = torch.randn(2, 8, 4, 5)
    with torch.no_grad():
        assert rel_err(model(x), model.dense()(x)) < 1e-5  # float32, a few hundred terms per output


def test_grown_blocks_are_zero_with_zero_state_and_survivors_keep_theirs():
    torch.manual_seed(0)
    lay = random_layout((32, 32), 8, 0.5, seed=1)
    layer = BlockSparseLinear(32, 32, lay)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    helper = SET(layer, opt, update_every=1, drop_fraction=0.5, seed=0)
    layer(torch.randn(4, 32)).sum().backward()
    opt.step()
    values_id = id(layer.values)
    old = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(lay.row_indices, lay.col_indices))}
    old_vals = layer.values.detach().clone()
    old_m = opt.state[layer.values]["exp_avg"].clone()
    assert helper.step()
    new = layer.layout
    assert id(layer.values) == values_id and new.nnz == lay.nnz and new != lay
    m = opt.state[layer.values]["exp_avg"]
    v = opt.state[layer.values]["exp_avg_sq"]
    for j, (r, c) in enumerate(zip(new.row_indices.tolist(), new.col_indices.tolist())):
        if (r, c) in old:
            i = old[(r, c)]
            assert torch.equal(layer.values[j], old_vals[i]) and torch.equal(m[j], old_m[i])
        else:
            assert not layer.values[j].any() and not m[j].any() and not v[j].any()


def _dense_block_norms(grad, layout, taps=False):
    b = layout.block_size
    g = grad if not taps else grad.pow(2).flatten(2).sum(-1).sqrt()
    return torch.tensor([[float(g[i * b:(i + 1) * b, j * b:(j + 1) * b].norm()) for j in range(layout.n_block_cols)]
                         for i in range(layout.n_block_rows)], dtype=torch.float64)


def test_rigl_scores_are_the_dense_gradients_block_norms():
    model = Net(3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    rigl = RigL(model, opt, update_every=1)
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    ref = model.dense()
    ref.zero_grad()
    ref(x).pow(2).sum().backward()
    checks = [(model.fc, ref.fc.weight.grad, False), (model.conv, ref.conv.weight.grad, True),
              (model.lstm.weight_ih_l0, ref.lstm.weight_ih_l0.grad, False),
              (model.lstm.weight_hh_l0, ref.lstm.weight_hh_l0.grad, False)]
    for mod, grad, taps in checks:
        got = rigl.recorder.scores(mod)
        assert rel_err(got, _dense_block_norms(grad, mod.layout, taps)) < 1e-10


def test_rigl_grows_the_top_scored_inactive_blocks():
    torch.manual_seed(0)
    lay = random_layout((32, 32), 8, 0.25, seed=2)
    layer = BlockSparseLinear(32, 32, lay).double()
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    rigl = RigL(layer, opt, update_every=1, drop_fraction=0.5)
    x = torch.randn(16, 32, dtype=torch.float64)
    target = torch.randn(16, 32, dtype=torch.float64)
    (layer(x) - target).pow(2).sum().backward()
    scores = _grad_block_norms(rigl.recorder.data[id(layer)]["dy"], x, lay)
    opt.step()
    norms = layer.values.detach().flatten(1).norm(dim=1)
    rigl.step()
    k = round(0.5 * lay.nnz)
    dropped = torch.sort(norms, stable=True).indices[:k]
    mask = lay.block_mask()
    mask[lay.row_indices[dropped].long(), lay.col_indices[dropped].long()] = False
    cand = (~mask).view(-1).nonzero().squeeze(1)
    top = cand[torch.sort(-scores.view(-1)[cand], stable=True).indices[:k]]
    mask.view(-1)[top] = True
    assert torch.equal(layer.layout.block_mask(), mask)


@pytest.mark.parametrize("mode", [RigL, SET])
def test_decisions_are_a_function_of_the_seed(mode):
    runs = []
    for _ in range(2):
        model = Net(5)
        _train(model, mode, 3, seed=11, update_every=1)
        runs.append([m.layout for _, m in sparse_weight_modules(model)])
    assert runs[0] == runs[1]
    if mode is SET:
        other = Net(5)
        _train(other, mode, 3, seed=12, update_every=1)
        assert [m.layout for _, m in sparse_weight_modules(other)] != runs[0]


def test_every_rank_adopts_rank_zeros_masks(monkeypatch):
    sent = []

    def fake_broadcast_rank0(t, src):
        sent.append(t.clone())

    received = iter(sent)

    def fake_broadcast_rank1(t, src):
        t.copy_(next(received))

    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    results = []
    for rank, fake in ((0, fake_broadcast_rank0), (1, fake_broadcast_rank1)):
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(dist, "broadcast", fake)
        model = Net(7)
        # each rank sees its own batches (seed=rank): rank 1 alone would decide differently
        _train(model, RigL, 2, seed=rank, update_every=1)
        results.append([m.layout for _, m in sparse_weight_modules(model)])
    assert results[0] == results[1]


def test_schedule_and_bad_arguments():
    layer = BlockSparseLinear(16, 16, random_layout((16, 16), 4, 0.5))
    h = DynamicSparsity(layer, mode="set", update_every=10, drop_fraction=0.4, end_step=100)
    assert h.fraction(0) == pytest.approx(0.4) and h.fraction(50) == pytest.approx(0.2)
    assert h.fraction(100) == pytest.approx(0.0) and h.fraction(101) == 0.0
    for kw, match in [(dict(mode="grow"), "mode must be"), (dict(update_every=0), "update_every"),
                      (dict(drop_fraction=1.0), "drop_fraction"), (dict(end_step=0), "end_step"),
                      (dict(schedule="linear"), "schedule")]:
        with pytest.raises(ValueError, match=match):
            DynamicSparsity(layer, **kw)
    with pytest.raises(ValueError, match="no block-sparse weights"):
        RigL(nn.Linear(4, 4))
    rigl = RigL(layer, update_every=1)
    with pytest.raises(RuntimeError, match="no gradient was recorded"):
        rigl.step()  # no forward/backward since the helper was made
