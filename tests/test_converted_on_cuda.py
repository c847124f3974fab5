"""What sparsify() does for a model on CUDA, checked without a GPU: the report says which
block-sparse layers save parameters but not time there (conv and LSTM kernels measured slower
than cuDNN on an H200), nothing on the CPU; and the copies it makes re-pack torch RNNs'
weights (cuDNN compacts scattered ones on every call)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import sparsify
from sparsify.api import _gpu_speed_note


def _plan():
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Flatten(), nn.Linear(64 * 4 * 4, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = sparsify.sparsify(model, method="block_sparse", density=0.5, block_size=32, min_size=1,
                                   example_inputs=(torch.randn(1, 64, 4, 4),))
    return sparse._sparsify_plan


def test_cuda_model_gets_the_note_naming_its_conv_layers():
    plan = _plan()
    before = len(plan.notes)
    _gpu_speed_note(torch.device("cuda", 0), plan)
    (note,) = plan.notes[before:]
    assert "'0'" in note and "not time" in note and "'2'" not in note  # the conv, not the Linear


def test_cpu_model_gets_no_note():
    plan = _plan()
    before = len(plan.notes)
    _gpu_speed_note(torch.device("cpu"), plan)
    _gpu_speed_note(None, plan)
    assert len(plan.notes) == before


def test_kept_and_densified_rnns_are_reflattened(monkeypatch):
    """The copy sparsify() and densify() make re-packs every torch RNN's weights (on CUDA, a
    deep-copied nn.LSTM is otherwise compacted by cuDNN on every call; a no-op on the CPU)."""
    calls = []
    orig = nn.LSTM.flatten_parameters
    monkeypatch.setattr(nn.LSTM, "flatten_parameters", lambda self: (calls.append(self), orig(self))[1])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.rnn = nn.Linear(64, 64), nn.LSTM(64, 64, batch_first=True)

        def forward(self, x):
            return self.rnn(self.fc(x))[0]

    net = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = sparsify.sparsify(net, method="low_rank", rank=0.25, min_size=1)  # the LSTM stays an nn.LSTM
    assert isinstance(sparse.rnn, nn.LSTM) and any(c is sparse.rnn for c in calls)
    calls.clear()
    dense = sparsify.densify(sparse)
    assert any(c is dense.rnn for c in calls)
