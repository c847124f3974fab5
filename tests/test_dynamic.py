"""Dynamic sparsity (SET, RigL): fixed density, in-place layouts, optimizer state, exact RigL scores, determinism.

Properties:
* after any number of updates every weight keeps its block count, and the
  model still equals its dense reference (``to_dense_module``);
* grown blocks start at zero and so does their optimizer state; surviving blocks
  keep their values and their Adam moments; the values parameter keeps its identity;
* RigL's blockwise scores equal the block norms of the dense gradient that
  autograd computes for the dense reference (Linear, Conv2d, LSTM), and RigL
  grows the top-scored blocks; several calls, or several backwards through one
  retained graph, are scored on the summed gradient;
* an optimizer lacking the values of any layer the helper manages is refused,
  naming those layers;
* decisions are a function of the seed; under torch.distributed rank 0's
  masks are adopted everywhere.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.utils.checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparsify.dynamic import SET, DynamicSparsity, RigL, _grad_block_norms, sparse_weight_modules
from sparsify.modules.block_sparse import BlockSparseLinear
from sparsify.modules.block_sparse_conv import BlockSparseConv1d, BlockSparseConv2d
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
    with torch.no_grad():
        scores = _grad_block_norms(2 * (layer(x) - target), x, lay)  # dL/dy^T x, before the step
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


@settings(max_examples=8, deadline=None)
@given(act=st.sampled_from(["relu", "gelu", "gelu_tanh", "silu"]), one_d=st.booleans(), residual=st.booleans(),
       stride=st.integers(1, 2), padding=st.sampled_from([0, 1, "same"]),
       padding_mode=st.sampled_from(["zeros", "reflect"]), seed=st.integers(0, 99))
def test_rigl_scores_of_a_conv_with_a_fused_activation_are_the_dense_gradients_block_norms(
        act, one_d, residual, stride, padding, padding_mode, seed):
    torch.manual_seed(seed)
    cls, x_shape = (BlockSparseConv1d, (2, 8, 7)) if one_d else (BlockSparseConv2d, (2, 8, 5, 6))
    if padding == "same":
        stride = 1  # torch refuses padding='same' with a stride
    conv = cls(8, 12, 3, random_layout((12, 8), 4, 0.5, seed=seed), stride=stride, padding=padding,
               padding_mode=padding_mode, activation=act).double()
    rigl = RigL(conv, torch.optim.SGD(conv.parameters(), lr=0.0), update_every=1)
    x = torch.randn(*x_shape, dtype=torch.float64)
    ref = conv.to_dense_module()  # conv, then the activation
    with torch.no_grad():
        y_shape = ref(x).shape
    r = torch.randn(y_shape, dtype=torch.float64) if residual else None
    t = torch.randn(y_shape, dtype=torch.float64)
    (conv(x, r) - t).pow(2).sum().backward()
    (ref(x) + (0 if r is None else r) - t).pow(2).sum().backward()
    # float64, a few hundred terms per gradient entry: agreement to ~1e-14, checked at 1e-10
    assert rel_err(rigl.recorder.scores(conv), _dense_block_norms(ref[0].weight.grad, conv.layout, True)) < 1e-10


class Shared(nn.Module):
    """A Linear (fused SiLU), a Conv1d (fused ReLU) and an LSTM, each applied ``calls`` times: one weight,
    several calls per forward."""

    def __init__(self, calls: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.calls = calls
        self.fc = BlockSparseLinear(12, 12, random_layout((12, 12), 4, 0.5, seed=seed), activation="silu")
        self.conv = BlockSparseConv1d(12, 12, 3, random_layout((12, 12), 4, 0.5, seed=seed + 1), padding=1,
                                      activation="relu")
        self.lstm = BlockSparseLSTM(12, 12, density=0.5, block_size=4, seed=seed, batch_first=True)

    def forward(self, x):  # x [N, T, 12]
        for _ in range(self.calls):
            x = self.fc(x)
            x = self.conv(x.transpose(1, 2)).transpose(1, 2)
            x = self.lstm(x)[0]
        return x

    def dense(self) -> nn.Module:
        ref = copy.copy(self)
        ref._modules = dict(self._modules)
        ref.fc, ref.conv, ref.lstm = (m.to_dense_module() for m in (self.fc, self.conv, self.lstm))
        return ref


@settings(max_examples=8, deadline=None)
@given(calls=st.integers(1, 3), batches=st.integers(1, 3), summed=st.booleans(), seed=st.integers(0, 99))
def test_rigl_scores_sum_every_call_of_the_last_backward(calls, batches, summed, seed):
    """A weight called several times, or several forwards with one summed loss, is scored on the gradient
    autograd accumulates for them all; with a backward per micro-batch, on the last micro-batch's (and at most
    two micro-batches' operands are held)."""
    model = Shared(calls, seed).double()
    rigl = RigL(model, torch.optim.SGD(model.parameters(), lr=0.0), update_every=1)
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, 4, 12, generator=gen, dtype=torch.float64) for _ in range(batches)]
    targets = [torch.randn(2, 4, 12, generator=gen, dtype=torch.float64) for _ in range(batches)]

    def loss(m, i):
        return (m(xs[i]) - targets[i]).pow(2).sum()

    if summed:
        sum(loss(model, i) for i in range(batches)).backward()
    else:
        for i in range(batches):  # a forward and a backward per micro-batch
            loss(model, i).backward()
    ref = model.dense()
    ref.zero_grad()
    (sum(loss(ref, i) for i in range(batches)) if summed else loss(ref, batches - 1)).backward()
    checks = [(model.fc, ref.fc[0].weight.grad, False), (model.conv, ref.conv[0].weight.grad.unsqueeze(2), True),
              (model.lstm.weight_ih_l0, ref.lstm.weight_ih_l0.grad, False),
              (model.lstm.weight_hh_l0, ref.lstm.weight_hh_l0.grad, False)]
    for mod, grad, taps in checks:
        # float64 throughout: the blockwise products agree with autograd's to ~1e-14
        assert rel_err(rigl.recorder.scores(mod), _dense_block_norms(grad, mod.layout, taps)) < 1e-10
    held = [len(rigl.recorder.calls[id(m)]) for m in (model.fc, model.conv)] + \
        [len(rigl.recorder.lstm_calls[id(model.lstm)])]
    assert held == [calls * (batches if summed else min(batches, 2))] * 3  # one round, or the last two


class StackedLSTM(nn.Module):
    """A two-layer bidirectional LSTM: four cells, each with its own recorded input-projection gradient
    (``calls`` is unused: the constructor takes ``Shared``'s arguments)."""

    def __init__(self, calls: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lstm = BlockSparseLSTM(12, 12, num_layers=2, bidirectional=True, density=0.5, block_size=4, seed=seed,
                                    batch_first=True)

    def forward(self, x):  # x [N, T, 12]
        out = self.lstm(x)[0]
        return out[..., :12] + out[..., 12:]  # both directions reach the loss

    def dense(self) -> nn.Module:
        ref = copy.copy(self)
        ref._modules = dict(self._modules)
        ref.lstm = self.lstm.to_dense_module()
        return ref


@settings(max_examples=8, deadline=None)
@given(net=st.sampled_from([Shared, StackedLSTM]), calls=st.integers(1, 2), backwards=st.integers(2, 3),
       same_loss=st.booleans(), seed=st.integers(0, 99))
def test_rigl_scores_sum_every_backward_through_one_graph(net, calls, backwards, same_loss, seed):
    """Several backwards through one retained graph (the same loss again, or several losses of one forward,
    each backpropagated on its own) are scored on the sum of their gradients, as autograd accumulates .grad."""
    model = net(calls, seed).double()
    rigl = RigL(model, torch.optim.SGD(model.parameters(), lr=0.0), update_every=1)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 12, generator=gen, dtype=torch.float64)
    targets = [torch.randn(2, 4, 12, generator=gen, dtype=torch.float64) for _ in range(backwards)]

    def backward_each(m):
        y = m(x)
        for i in range(backwards):
            (y - targets[0 if same_loss else i]).pow(2).sum().backward(retain_graph=i < backwards - 1)

    backward_each(model)
    ref = model.dense()
    ref.zero_grad()
    backward_each(ref)  # .grad is the sum over the backwards
    checks = [(w, ref.lstm.get_parameter(n).grad, False) for n, w in model.lstm.named_children()]
    if net is Shared:
        checks += [(model.fc, ref.fc[0].weight.grad, False), (model.conv, ref.conv[0].weight.grad.unsqueeze(2), True)]
    for mod, grad, taps in checks:
        assert rel_err(rigl.recorder.scores(mod), _dense_block_norms(grad, mod.layout, taps)) < 1e-10


def _checkpoint(*states):
    buf = io.BytesIO()
    torch.save(states, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # plain numbers and tensors: nothing that runs code on load


@settings(max_examples=6, deadline=None)
@given(mode=st.sampled_from([RigL, SET]), every=st.integers(1, 3), stop=st.integers(1, 6), seed=st.integers(0, 99))
def test_a_resumed_run_takes_the_same_steps_as_an_uninterrupted_one(mode, every, stop, seed):
    steps = 7
    kw = dict(update_every=every, drop_fraction=0.5, end_step=steps, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(2, 8, 4, 5, generator=gen) for _ in range(steps)]

    def run(model, opt, helper, batch_range):
        for i in batch_range:
            model(batches[i]).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            helper.step()

    def fresh():
        model = Net(seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, opt, mode(model, opt, **kw)

    model, opt, helper = fresh()
    run(model, opt, helper, range(steps))
    part, popt, phelper = fresh()
    run(part, popt, phelper, range(stop))
    saved_model, saved_opt, saved_helper = _checkpoint(part.state_dict(), popt.state_dict(), phelper.state_dict())
    assert all(isinstance(v, (int, float, str, type(None))) for v in saved_helper.values())
    resumed, ropt, rhelper = fresh()
    resumed.load_state_dict(saved_model)
    ropt.load_state_dict(saved_opt)
    rhelper.load_state_dict(saved_helper)
    run(resumed, ropt, rhelper, range(stop, steps))
    assert (rhelper.step_count, rhelper.updates) == (helper.step_count, helper.updates)
    want, got = model.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k  # the same operations in the same order: bitwise


def test_load_state_dict_refuses_a_state_it_cannot_resume():
    layer = BlockSparseLinear(16, 16, random_layout((16, 16), 4, 0.5))
    state = SET(layer, update_every=2).state_dict()
    with pytest.raises(ValueError, match="of mode 'set'.*resume with the class that saved it \\(SET\\)"):
        RigL(layer).load_state_dict(state)
    for bad, match in [({k: v for k, v in state.items() if k != "updates"}, "missing \\['updates'\\]"),
                       ({**state, "step_count": -1}, "step_count must be"),
                       ({**state, "updates": 3, "step_count": 2}, "exceeds step_count"),
                       ({**state, "update_every": 0}, "update_every")]:
        with pytest.raises(ValueError, match=match):
            SET(layer).load_state_dict(bad)


class _FlatState(torch.optim.SGD):
    """An SGD that also keeps a flat per-element buffer: state it is not possible to map to blocks."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["flat"] = torch.ones(p.numel())
        return super().step(closure)


def test_optimizer_state_with_the_block_count_first_moves_with_the_blocks():
    torch.manual_seed(0)
    lay = random_layout((16, 16), 4, 0.5, seed=1)
    layer = BlockSparseLinear(16, 16, lay)
    opt = torch.optim.Adafactor(layer.parameters(), lr=1e-2)  # row_var [nnz, b, 1], col_var [nnz, 1, b]
    helper = SET(layer, opt, update_every=1, drop_fraction=0.5, seed=0)
    layer(torch.randn(4, 16)).pow(2).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in opt.state[layer.values].items()}
    assert helper.step()
    old = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(lay.row_indices, lay.col_indices))}
    new = layer.layout
    state = opt.state[layer.values]
    assert torch.equal(state["step"], before["step"])  # a scalar stays
    for key in ("row_var", "col_var"):
        for j, rc in enumerate(zip(new.row_indices.tolist(), new.col_indices.tolist())):
            want = before[key][old[rc]] if rc in old else torch.zeros_like(before[key][0])
            assert torch.equal(state[key][j], want), (key, rc)

    layer = BlockSparseLinear(16, 16, lay)
    opt = _FlatState(layer.parameters(), lr=0.1)
    helper = SET(layer, opt, update_every=1, drop_fraction=0.5, seed=0)
    layer(torch.randn(4, 16)).sum().backward()
    opt.step()
    with pytest.raises(RuntimeError, match="cannot move the optimizer state 'flat'.*block count 8"):
        helper.step()
    assert layer.layout == lay  # refused before anything moved


def test_the_optimizer_must_be_one_that_trains_the_block_sparse_values():
    import sparsify

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    before_conversion = torch.optim.Adam(dense.parameters())
    model = sparsify.sparsify(dense, density=0.5, block_size=8, min_size=0)
    assert sparse_weight_modules(model)
    for helper in (RigL, SET):
        with pytest.raises(TypeError, match="must be the torch.optim.Optimizer.*Got 'adam'"):
            helper(model, "adam")
        with pytest.raises(ValueError, match="holds none of the model's block-sparse values.*before sparsify"):
            helper(model, before_conversion)
        helper(model, torch.optim.Adam(model.parameters())).remove()


@pytest.mark.parametrize("helper", [RigL, SET])
def test_the_optimizer_must_train_every_layer_the_helper_manages(helper):
    """An optimizer lacking some managed layers' values is refused, naming them (they would be pruned and
    regrown but never trained); giving the helper only the part of the model the optimizer trains is fine."""
    model = Net(0)
    frozen_lstm = [p for n, p in model.named_parameters() if not n.startswith("lstm.")]
    with pytest.raises(ValueError, match=r"lacks the block-sparse values of 2 of the 4 layers this helper manages: "
                                         r"'lstm\.weight_ih_l0', 'lstm\.weight_hh_l0'\..*never trained.*"
                                         r"model\.parameters\(\).*only the part of the model") as info:
        helper(model, torch.optim.Adam(frozen_lstm))
    assert "'conv'" not in str(info.value) and "'fc'" not in str(info.value)
    helper(model.lstm, torch.optim.Adam(model.lstm.parameters())).remove()  # manages the LSTM's weights only
    groups = [{"params": m.parameters(), "lr": lr} for m, lr in ((model.conv, 1e-3), (model.lstm, 1e-2), (model.fc, 0))]
    helper(model, torch.optim.SGD(groups)).remove()  # every managed layer in some group
    helper(model.fc, torch.optim.Adam(model.parameters())).remove()  # more than the managed layers


@pytest.mark.parametrize("reentrant", [True, False])
def test_rigl_scores_under_activation_checkpointing_are_the_dense_gradients_block_norms(reentrant):
    """Forwards recomputed inside the backward join the current round: counted once, not as a new round."""
    torch.manual_seed(0)
    layer = BlockSparseLinear(16, 16, random_layout((16, 16), 4, 0.5, seed=0), activation="silu").double()
    rigl = RigL(layer, torch.optim.SGD(layer.parameters(), lr=0.0), update_every=1)
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    torch.utils.checkpoint.checkpoint(lambda z: layer(torch.tanh(layer(z))), x,
                                      use_reentrant=reentrant).pow(2).sum().backward()
    ref = layer.to_dense_module()
    ref(torch.tanh(ref(x))).pow(2).sum().backward()
    assert rel_err(rigl.recorder.scores(layer), _dense_block_norms(ref[0].weight.grad, layer.layout)) < 1e-10
