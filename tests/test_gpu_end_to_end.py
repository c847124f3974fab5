"""A converted model on a real GPU (skipped without one): it runs on our CUDA kernels, never the
torch fallback, computes what ``densify()`` says, and trains.

The model mixes every kernel family a conversion produces: block-sparse Linear (bsmm),
block-sparse Conv2d (bsconv) and the block-sparse LSTM (bsmm + gate kernels).  Any fallback
warning is an error here, so a kernel that does not build or load on the hardware fails the
test instead of silently running the CPU reference code on the device.

Tolerances: float32 inputs through TF32-free float32 kernels against the float64 dense
reference: 1e-4 relative (accumulation over at most a few thousand terms); float16 /
bfloat16 model: the reference is the same dense model in float64, so the bound is the
16-bit rounding of activations between layers: 2e-2 (bf16 has 8 bits of mantissa: 2**-8
per rounding, a few roundings in a row).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import sparsify
from tests.helpers import rel_err

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(64, 128, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc1 = nn.Linear(128, 256)
        self.fc2 = nn.Linear(256, 128)
        self.lstm = nn.LSTM(128, 128, batch_first=True)
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        y = self.act(self.conv(x))                    # [B, 128, H, W]
        seq = y.flatten(2).transpose(1, 2)            # [B, H*W, 128]
        seq = self.fc2(torch.relu(self.fc1(seq)))
        out, _ = self.lstm(seq)
        return self.head(out[:, -1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_converted_model_runs_on_the_kernels_and_trains(dtype):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 64, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = sparsify.sparsify(model, method="block_sparse", density=0.5, block_size=32, min_size=1,
                                   example_inputs=(x,))
    rewritten = [r for r in sparsify.report(sparse).rows if r["method"] == "block_sparse"]
    assert len(rewritten) >= 4, sparsify.report(sparse)
    ref = sparsify.densify(copy.deepcopy(sparse)).double()
    sparse = sparse.to("cuda", dtype)
    xd = x.to("cuda", dtype)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to torch code warns: that is a failure here
        with torch.no_grad():
            y = sparse(xd)
        assert rel_err(y.double().cpu(), ref(x.double())) < TOL[dtype]
        sparse.train()
        opt = torch.optim.SGD([p for p in sparse.parameters() if p.requires_grad], lr=1e-3)
        loss = sparse(xd).float().square().mean()
        loss.backward()
        grads = [p.grad for p in sparse.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        opt.step()
    from sparsify.runtime.executors import executor_for

    assert executor_for(torch.device("cuda")).name != "cpu"


@pytest.mark.parametrize("method", ["block_sparse", "low_rank"])
def test_a_model_on_the_gpu_converts_there(method):
    """``sparsify()`` of a model whose weights are on the GPU: layouts and factors are computed from
    device tensors (no CPU/GPU mix-up) and the result stays on the device and matches densify."""
    torch.manual_seed(0)
    model = Net().eval().cuda()
    x = torch.randn(2, 64, 6, 6, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        budget = dict(density=0.5, block_size=32) if method == "block_sparse" else dict(rank=0.25)
        sparse = sparsify.sparsify(model, method=method, min_size=1, example_inputs=(x,), **budget)
    assert all(p.device.type == "cuda" for p in sparse.parameters())
    notes = " ".join(sparsify.report(sparse).notes)
    assert ("save parameters, not time" in notes) == (method == "block_sparse"), notes
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        y = sparse(x)
        ref = sparsify.densify(copy.deepcopy(sparse)).double()(x.double())
    assert rel_err(y, ref) < TOL[torch.float32]


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(128, 256), nn.Linear(256, 256), nn.Linear(256, 64)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("method, budget", [("block_sparse", dict(density=0.5, block_size=32)),
                                            ("low_rank", dict(compression=2.0))])
def test_calibrated_conversion_on_the_gpu(method, budget):
    """Calibration data and a model-wide budget on the GPU: statistics, the allocation's error
    curves (whose layouts are built on the CPU) and the refit all meet device tensors there. The
    H200 found the block-sparse curve mixing the two (2026-11-30)."""
    torch.manual_seed(0)
    model = _Mlp().eval().cuda()
    calib = [torch.randn(64, 128, device="cuda") for _ in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = sparsify.sparsify(model, method=method, min_size=1, calibration_data=calib, **budget)
    rep = sparsify.report(sparse)
    assert any(r["method"] == method for r in rep.rows), rep
    assert rep.model_error is not None and rep.model_error < 1.0, rep
    assert all(p.device.type == "cuda" for p in sparse.parameters())
    x = calib[0]
    with torch.no_grad():
        ref = sparsify.densify(copy.deepcopy(sparse)).double()(x.double())
        assert rel_err(sparse(x), ref) < TOL[torch.float32]
