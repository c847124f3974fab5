"""BlockSparseLSTM against nn.LSTM: outputs, states and gradients.

Properties (hypothesis draws sizes, layers, directions, batch_first, bias,
initial states, unbatched input; float64, so equal up to summation order):
* at density 1.0 it equals nn.LSTM with the same weights: outputs, (h_n, c_n),
  and the gradients of the input, the initial states, every weight and bias;
* at any density it equals ``to_dense_module()`` (nn.LSTM with the masked
  weights), and its stored blocks' gradients are that LSTM's weight gradients
  at those blocks;
* dropout acts between layers, in training only; refusals say why.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sparsify.modules.block_sparse_lstm import BlockSparseLSTM, lstm_layouts

from .helpers import rel_err

# float64 with sums of at most a few hundred terms per step: 1e-10 leaves a wide margin.
TOL = 1e-10


@st.composite
def lstm_cases(draw):
    b = draw(st.sampled_from([4, 8]))
    return dict(
        input_size=draw(st.integers(1, 20)),
        hidden=b * draw(st.integers(1, 3)),
        block=b,
        layers=draw(st.integers(1, 2)),
        bidirectional=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bias=draw(st.booleans()),
        t=draw(st.integers(1, 6)),
        n=draw(st.integers(1, 3)),
        unbatched=draw(st.booleans()),
        states=draw(st.booleans()),
        density=draw(st.sampled_from([1.0, 0.5, 0.25])),
        seed=draw(st.integers(0, 1000)),
    )


def _run(model, x, hx):
    out, (h, c) = model(x, hx)
    return out, h, c


def _compare(case, sparse, dense):
    dirs = 2 if case["bidirectional"] else 1
    n, t = case["n"], case["t"]
    if case["unbatched"]:
        x = torch.randn(t, case["input_size"], dtype=torch.float64)
        state_shape = (case["layers"] * dirs, case["hidden"])
    else:
        x = torch.randn(n, t, case["input_size"]) if case["batch_first"] else torch.randn(t, n, case["input_size"])
        x = x.double()
        state_shape = (case["layers"] * dirs, n, case["hidden"])
    hx = None
    if case["states"]:
        hx = (torch.randn(state_shape, dtype=torch.float64), torch.randn(state_shape, dtype=torch.float64))
    leaves_s = [x.clone().requires_grad_(True)] + ([s.clone().requires_grad_(True) for s in hx] if hx else [])
    leaves_d = [x.clone().requires_grad_(True)] + ([s.clone().requires_grad_(True) for s in hx] if hx else [])
    ys = _run(sparse, leaves_s[0], tuple(leaves_s[1:]) if hx else None)
    yd = _run(dense, leaves_d[0], tuple(leaves_d[1:]) if hx else None)
    for a, b in zip(ys, yd):
        assert a.shape == b.shape and rel_err(a, b) < TOL
    weights = [torch.randn_like(a) for a in ys]
    sum(((a * w).sum() for a, w in zip(ys, weights))).backward()
    sum(((a * w).sum() for a, w in zip(yd, weights))).backward()
    for a, b in zip(leaves_s, leaves_d):
        assert rel_err(a.grad, b.grad) < TOL
    for k in range(case["layers"] * dirs):
        s = sparse._suffix(k)
        for kind in ("ih", "hh"):
            w = getattr(sparse, f"weight_{kind}{s}")
            expect = w.layout.values_from_dense(getattr(dense, f"weight_{kind}{s}").grad)
            assert rel_err(w.values.grad, expect) < TOL
            if case["bias"]:
                assert rel_err(getattr(sparse, f"bias_{kind}{s}").grad, getattr(dense, f"bias_{kind}{s}").grad) < TOL


@given(case=lstm_cases())
def test_equals_nn_lstm_with_the_same_weights(case):
    torch.manual_seed(case["seed"])
    ref = nn.LSTM(case["input_size"], case["hidden"], case["layers"], bias=case["bias"],
                  batch_first=case["batch_first"], bidirectional=case["bidirectional"]).double()
    sparse = BlockSparseLSTM.from_dense(ref, density=case["density"], block_size=case["block"])
    if case["density"] == 1.0:
        dense = ref  # the user's own LSTM: same weights, nothing masked
    else:
        dense = sparse.to_dense_module()
    _compare(case, sparse, dense)


@pytest.mark.parametrize("pattern", ["random", "small_world", "scale_free"])
def test_fresh_patterns_share_one_graph_across_the_four_gates(pattern):
    lays = lstm_layouts(48, 128, num_layers=2, bidirectional=True, block_size=16, density=0.25, pattern=pattern,
                        seed=7)
    assert len(lays) == 4
    for _ih, hh in lays:
        mask = hh.block_mask()
        gate = mask[:8]
        assert all(torch.equal(mask[8 * g: 8 * (g + 1)], gate) for g in range(4))
        assert hh.density == pytest.approx(0.25)
    again = lstm_layouts(48, 128, num_layers=2, bidirectional=True, block_size=16, density=0.25, pattern=pattern,
                         seed=7)
    assert [tuple(p) for p in again] == [tuple(p) for p in lays]  # deterministic given the seed
    assert lays[0][1] != lays[1][1]  # each weight draws its own pattern


def test_init_scales_the_variance_to_the_kept_fan_in():
    torch.manual_seed(0)
    h = 256
    lstm = BlockSparseLSTM(64, h, density=0.25, block_size=16, pattern="random", seed=0)
    w = lstm.weight_hh_l0.to_dense().detach().double()
    # nn.LSTM: U(-1/sqrt(H), 1/sqrt(H)), so each row's sum of squares is H * (1/H) / 3 = 1/3
    row_ss = w.pow(2).sum(1)
    assert abs(float(row_ss.mean()) - 1 / 3) < 0.02
    kept = w.ne(0).sum(1).double().clamp_min(1)  # kept fan-in of each row (init draws no exact zeros)
    assert bool((w.abs().max(1).values <= 1 / kept.sqrt() + 1e-12).all())  # U(-1/sqrt(kept), 1/sqrt(kept))
    dense_default = BlockSparseLSTM(64, h, density=1.0, block_size=16, pattern="random")
    assert float(dense_default.weight_hh_l0.values.detach().abs().max()) <= 1 / math.sqrt(h)


def test_dropout_acts_between_layers_in_training_only():
    torch.manual_seed(0)
    lstm = BlockSparseLSTM(8, 16, num_layers=2, dropout=1.0, density=1.0, block_size=8).double()
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    out_train, _ = lstm(x)
    # with every unit dropped, layer 2 sees zeros: its output is the LSTM of a zero input
    single = BlockSparseLSTM(16, 16, density=1.0, block_size=8).double()
    single.load_state_dict({k.replace("_l1", "_l0"): v for k, v in lstm.state_dict().items() if "_l1" in k})
    zero_out, _ = single(torch.zeros(5, 2, 16, dtype=torch.float64))
    assert torch.allclose(out_train, zero_out)
    lstm.eval()
    ref = lstm.to_dense_module().eval()
    assert torch.allclose(lstm(x)[0], ref(x)[0], atol=1e-12)


def test_refusals_say_why():
    with pytest.raises(ValueError, match="proj_size=4 is not supported"):
        BlockSparseLSTM(8, 16, proj_size=4, density=0.5, block_size=8)
    with pytest.raises(ValueError, match="proj_size=4 is not supported"):
        BlockSparseLSTM.from_dense(nn.LSTM(8, 16, proj_size=4), density=0.5, block_size=8)
    with pytest.raises(ValueError, match="multiple of block_size=8"):
        BlockSparseLSTM(8, 20, density=0.5, block_size=8)
    with pytest.raises(ValueError, match="give density="):
        BlockSparseLSTM(8, 16)
    lstm = BlockSparseLSTM(8, 16, density=0.5, block_size=8)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(4, 2, 8), [4, 3])
    with pytest.raises(TypeError, match="does not take a PackedSequence"):
        lstm(packed)
    with pytest.raises(ValueError, match="expected input_size=8"):
        lstm(torch.randn(4, 2, 7))
    with pytest.raises(ValueError, match=r"expected h0 of shape \(1, 2, 16\)"):
        lstm(torch.randn(4, 2, 8), (torch.zeros(2, 2, 16), torch.zeros(2, 2, 16)))


def test_state_dict_round_trip_adopts_the_pattern():
    a = BlockSparseLSTM(8, 32, density=0.25, block_size=8, pattern="small_world", seed=1)
    b = BlockSparseLSTM(8, 32, density=0.5, block_size=8, pattern="random", seed=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 2, 8)
    assert torch.equal(a(x)[0], b(x)[0])
    assert "density=0.25" in repr(a)


def test_recurrence_op_passes_opcheck():
    torch.manual_seed(0)
    lstm = BlockSparseLSTM(4, 16, density=0.5, block_size=8).double()
    hh = lstm.weight_hh_l0
    meta = [getattr(hh, m) for m in ("row_offsets", "col_indices", "row_indices", "t_row_offsets",
                                     "t_col_indices", "t_block_ids")]
    xproj = torch.randn(3, 2, 64, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.sparsify.bslstm_recurrence, (xproj, h0, c0, hh.values, *meta),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_exports():
    lstm = BlockSparseLSTM(8, 16, num_layers=2, batch_first=True, density=0.5, block_size=8)
    x = torch.randn(2, 5, 8)
    ep = torch.export.export(lstm, (x,))
    out, (h, c) = ep.module()(x)
    ref, (h2, c2) = lstm(x)
    assert torch.allclose(out, ref) and torch.allclose(h, h2) and torch.allclose(c, c2)


@pytest.mark.parametrize("grad", [False, True])
def test_runs_under_autocast_as_nn_lstm_does(grad):
    # the ops have no autocast rule: a bfloat16 projection met float32 states and weights and was refused
    torch.manual_seed(0)
    lstm = nn.LSTM(32, 32, num_layers=2, bidirectional=True, batch_first=True)
    sparse = BlockSparseLSTM.from_dense(lstm, density=1.0, block_size=16)
    x = torch.randn(3, 4, 32)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        want, (wh, _) = lstm(x)
        got, (gh, _) = sparse(x)
    assert got.dtype == want.dtype
    # bfloat16 (eps 7.8e-3) through 4 steps of 2 layers: each step rounds the state again
    torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(gh.float(), wh.float(), rtol=5e-2, atol=5e-2)
    if grad:
        got.float().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in sparse.parameters()
                   if p.requires_grad)


def test_builds_under_a_meta_device_context_and_loads_into_it():
    # layouts are CPU objects: under `with torch.device("meta")` (the skeleton idiom of
    # docs/distributed.md) the patterns were drawn on meta and construction failed or read garbage
    from sparsify.patterns import random_layout, small_world_layout

    torch.manual_seed(0)
    ref = BlockSparseLSTM(16, 32, block_size=8, density=0.5, seed=1)
    with torch.device("meta"):
        skeleton = BlockSparseLSTM(16, 32, block_size=8, density=0.5, seed=1)
        lays = [random_layout((64, 32), 8, 0.25, seed=3), small_world_layout((64, 32), 8, 0.25, seed=3)]
    assert all(not t.is_meta for lay in lays for t in lay.metadata().values())
    assert lays == [random_layout((64, 32), 8, 0.25, seed=3), small_world_layout((64, 32), 8, 0.25, seed=3)]
    assert all(p.is_meta for p in skeleton.parameters())
    skeleton = skeleton.to_empty(device="cpu")
    skeleton.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 16)
    torch.testing.assert_close(skeleton(x)[0], ref(x)[0], rtol=0, atol=0)


def test_a_model_that_calls_flatten_parameters_converts_and_runs():
    # the usual RNN idiom (cuDNN / DataParallel): the converted layer had no flatten_parameters, so the
    # model's forward raised and sparsify refused the model on its example inputs
    import sparsify

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.LSTM(16, 32, num_layers=2, batch_first=True), nn.Linear(32, 8)

        def forward(self, x):
            self.rnn.flatten_parameters()
            return self.head(self.rnn(x)[0])

    torch.manual_seed(0)
    model, x = Net().double().eval(), torch.randn(2, 5, 16, dtype=torch.float64)
    sparse = sparsify.sparsify(model, method="block_sparse", density=1.0, block_size=16, min_size=0,
                               example_inputs=(x,), dense_if_larger=False)
    assert isinstance(sparse.rnn, BlockSparseLSTM)
    assert rel_err(sparse(x), model(x)) < TOL  # density 1: the same function
    assert sparse.rnn.mode == model.rnn.mode == "LSTM"
