"""sparsify(method="block_sparse") on convolutions, LSTMs and from-scratch patterns (layout=, init=, seed=).

Properties: convs and LSTMs are rewritten and the result equals its densify; a
from-scratch conversion uses exactly the pattern ``sparsify.patterns`` draws for
the layer's seed, discards the trained values (init='fresh') and repeats for the
same seed; settings the layers cannot take stay dense with the reason; bad
options are refused before the model is touched.
"""

from __future__ import annotations

import pytest
import torch
from sparsify.passes.block_sparsify_layers import layer_seed
from torch import nn

import sparsify
from sparsify.modules.block_sparse_conv import BlockSparseConv2d
from sparsify.modules.block_sparse_lstm import BlockSparseLSTM
from sparsify.patterns import small_world_layout

from .helpers import rel_err


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(32, 64, 3, padding=1, padding_mode="reflect")
        self.conv1 = nn.Conv1d(64, 64, 5, padding="same")
        self.lstm = nn.LSTM(64, 128, num_layers=2, batch_first=True)
        self.fc = nn.Linear(128, 256)

    def forward(self, x):  # x [N, 32, 6, 6]
        h = self.conv(x).flatten(2)[..., :8]  # [N, 64, 8]
        h = self.conv1(h).transpose(1, 2)  # [N, 8, 64]
        out, _ = self.lstm(h)
        return self.fc(out)


def _convert(model, **kw):
    x = torch.randn(2, 32, 6, 6)
    return sparsify.sparsify(model, method="block_sparse", density=0.25, block_size=16, example_inputs=(x,), **kw), x


def test_convs_and_lstm_are_rewritten_and_equal_their_densify():
    torch.manual_seed(0)
    model = Net()
    sparse, x = _convert(model)
    assert type(sparse) is Net
    assert isinstance(sparse.conv, BlockSparseConv2d) and isinstance(sparse.lstm, BlockSparseLSTM)
    assert type(sparse.conv1).__name__ == "BlockSparseConv1d"
    dense = sparsify.densify(sparse)
    assert type(dense.conv) is nn.Conv2d and type(dense.lstm) is nn.LSTM
    assert rel_err(sparse(x), dense(x)) < 1e-5  # float32
    # magnitude + copy: the kept blocks are the trained weights' own
    mask = sparse.conv.layout.element_mask()[:, :, None, None]
    assert torch.equal(dense.conv.weight, model.conv.weight * mask)
    assert sparse.conv.weight.shape == model.conv.weight.shape  # the dense weight, as a view


def test_from_scratch_patterns_are_the_seeded_ones_and_fresh():
    torch.manual_seed(0)
    model = Net()
    a, x = _convert(model, layout="small_world", init="fresh", seed=7)
    b, _ = _convert(model, layout="small_world", init="fresh", seed=7)
    c, _ = _convert(model, layout="small_world", init="fresh", seed=8)
    assert a.fc.layout == small_world_layout((256, 128), 16, 0.25, seed=layer_seed(7, "fc"))
    assert a.conv.layout == small_world_layout((64, 32), 16, 0.25, seed=layer_seed(7, "conv"))
    assert a.fc.layout == b.fc.layout and a.lstm.weight_hh_l1.layout == b.lstm.weight_hh_l1.layout
    assert a.fc.layout != c.fc.layout
    # fresh values: not the trained weight's blocks, and within the kept-fan-in bound
    kept = a.fc.layout.values_from_dense(model.fc.weight.detach())
    assert not torch.allclose(a.fc.values, kept)
    per_row = a.fc.layout.row_offsets.diff().double() * 16
    bound = (1 / per_row.sqrt())[a.fc.layout.row_indices.long()]
    assert bool((a.fc.values.detach().abs().flatten(1).max(1).values <= bound + 1e-6).all())
    # and it trains
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    loss = a(x).pow(2).mean()
    loss.backward()
    opt.step()
    assert a(x).pow(2).mean().item() < loss.item()


def test_what_the_layers_cannot_take_stays_dense_with_the_reason():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Conv2d(256, 256, 3, groups=4)
            self.p = nn.LSTM(64, 128, proj_size=32)
            self.h = nn.LSTM(64, 136)

        def forward(self, x):
            return self.g(x)  # the LSTMs are planned from the module tree

    sparse = sparsify.sparsify(Odd(), method="block_sparse", density=0.5, block_size=16)
    rows = {d.name: d for d in sparse._sparsify_plan.decisions}
    assert rows["g"].method == "dense" and "groups=4" in rows["g"].reason
    assert rows["p"].method == "dense" and "proj_size=32" in rows["p"].reason
    assert rows["h"].method == "dense" and "not a multiple of block_size=16" in rows["h"].reason


@pytest.mark.parametrize("kw,match", [(dict(layout="smallworld"), "invalid layout"),
                                      (dict(init="zeros"), "invalid init"), (dict(seed=1.5), "invalid seed")])
def test_bad_options_are_refused_first(kw, match):
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        sparsify.sparsify(model, method="block_sparse", **kw)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_rule_draws_a_layout_and_pattern_is_the_rules_glob():
    """``layout=`` is a method option a rule can carry (its ``pattern`` is the name glob);
    ``pattern=`` as a method option is refused with a hint naming ``layout=``."""
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))
    conv = sparsify.sparsify(model, method="block_sparse", density=0.25, block_size=16, min_size=0,
                             rules=[sparsify.Rule("0", layout="small_world", init="fresh", seed=3)])
    rows = {d.name: d for d in conv._sparsify_plan.decisions}
    assert rows["0"].result["layout"] == "small_world" and rows["0"].params["layout"] == "small_world"
    assert "layout" not in rows["2"].params  # the default (magnitude) is not spelled out
    assert "small_world fresh" in str(sparsify.report(conv))
    with pytest.raises(ValueError, match="unknown option 'pattern'.*layout="):
        sparsify.sparsify(model, method="block_sparse", pattern="small_world")
