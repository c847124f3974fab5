"""Kernel properties shared by the CPU-emulator tests and the real-GPU tests of the same kernels.

Each ``check_*`` draws a case from its seed, runs it through an executor on ``device`` (the
emulator's on "cpu", a real GPU's on "cuda") and compares with a float64 reference on the CPU.

Tolerances.  The reference is float64 on the inputs rounded exactly as the kernel reads
them (f16 / bf16 values are exact in float64), so the only error is fp32 accumulation
over at most B * taps * blocks terms (< 2000): ~sqrt(K) * 2**-24 of the norm, so 2e-5
relative for fp32 outputs; a 16-bit output is additionally rounded once, half an ulp
(2**-11 f16, 2**-8 bf16) relative.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from sparsify.runtime import ops_lstm
from sparsify.runtime.executors.cpu_conv import _gather_dense_blocks, dense_conv_weight
from sparsify.runtime.layout import BlockSparseLayout

HALF_ULP = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 0.0}
F32_TOL = 2e-5


def _meta(layout):
    return SimpleNamespace(**layout.metadata())


def _on(device):
    return lambda t: None if t is None else t.to(device)


def _poison(device):
    """On a GPU, leave NaN-filled blocks in the caching allocator so an unwritten output element shows
    (0xFF bytes are NaN in every float dtype); the emulator poisons its outputs itself."""
    if device != "cpu":
        blocks = [torch.full((1 << 20,), 255, dtype=torch.uint8, device=device) for _ in range(4)]
        del blocks


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    got, ref = got.double(), ref.double()
    assert not torch.isnan(got).any(), "an output element was never written"
    scale = float(ref.abs().max().clamp_min(1e-30))
    err = (got - ref).abs()
    assert bool((err <= HALF_ULP[dtype] * ref.abs() + F32_TOL * scale).all()), float(err.max() / scale)


CONV_GEOMETRY = dict(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), b=st.sampled_from([8, 16]),
    nbr=st.integers(1, 3), nbc=st.integers(1, 3), rc=st.integers(0, 3), k=st.sampled_from([(1, 1), (3, 3), (2, 3)]),
    stride=st.sampled_from([(1, 1), (2, 1), (2, 2)]), padding=st.sampled_from([(0, 0), (1, 1), (1, 0)]),
    dilation=st.sampled_from([(1, 1), (2, 1)]), act=st.sampled_from(["none", "relu", "silu"]),
    bias=st.booleans(), residual=st.booleans(), seed=st.integers(0, 1000))


def check_conv_case(ex, device, dtype, b, nbr, nbc, rc, k, stride, padding, dilation, act, bias, residual, seed):
    g = torch.Generator().manual_seed(seed)
    cout, cin = nbr * b - min(rc, b - 1), nbc * b - min(rc, b - 1)
    mask = torch.rand(nbr, nbc, generator=g) < 0.6
    if nbr > 1:
        mask[0] = False  # an empty block row: its outputs are the epilogue of zero
    mask[-1, -1] = True
    layout = BlockSparseLayout.from_block_mask(mask, shape=(cout, cin), block_size=b)
    n, h, w = 2, 7, 6
    values = (torch.randn(layout.nnz, b, b, *k, generator=g, dtype=torch.float64) / math.sqrt(b)).to(dtype)
    x = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64).to(dtype)
    ho = (h + 2 * padding[0] - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1
    if ho < 1 or wo < 1:
        return
    bias_t = torch.randn(cout, generator=g, dtype=torch.float64).to(dtype) if bias else None
    res_t = torch.randn(n, cout, ho, wo, generator=g, dtype=torch.float64).to(dtype) if residual else None
    meta = _meta(layout)
    dev = _on(device)
    dmeta = meta if device == "cpu" else SimpleNamespace(**{k_: dev(v) for k_, v in vars(meta).items()})
    wd = dense_conv_weight(values.double(), meta.row_indices, meta.col_indices, nbr, nbc, cout, cin)
    # forward with the fused epilogue
    _poison(device)
    y = ex.forward(dev(x), dev(values), dmeta, dev(bias_t), dev(res_t), act, cout, stride, padding, dilation).cpu()
    ref = F.conv2d(x.double(), wd, None if bias_t is None else bias_t.double(), stride, padding, dilation)
    ref = {"none": ref, "relu": F.relu(ref), "silu": F.silu(ref)}[act]
    if res_t is not None:
        ref = ref + res_t.double()
    _close(y, ref, dtype)
    # dX over the transposed layout, and dW of the stored blocks only
    dy = torch.randn(n, cout, ho, wo, generator=g, dtype=torch.float64).to(dtype)
    _poison(device)
    dx = ex.grad_input(dev(dy), dev(values), dmeta, cin, (h, w), stride, padding, dilation).cpu()
    dx_ref = torch.nn.grad.conv2d_input((n, cin, h, w), wd, dy.double(), stride, padding, dilation)
    _close(dx, dx_ref, dtype)
    _poison(device)
    dv = ex.grad_weight(dev(dy), dev(x), dmeta, b, k, stride, padding, dilation).cpu()
    dw_ref = torch.nn.grad.conv2d_weight(x.double(), (cout, cin, *k), dy.double(), stride, padding, dilation)
    _close(dv, _gather_dense_blocks(dw_ref, meta.row_indices, meta.col_indices, b), dtype)


GATE_CASES = dict(dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), n=st.integers(1, 5),
              hid=st.integers(1, 40), seed=st.integers(0, 1000))


def _gate_close(got, ref, dtype):
    got, ref = got.double(), ref.double()
    assert not torch.isnan(got).any(), "an output element was never written"
    assert bool(((got - ref).abs() <= 1e-5 + HALF_ULP[dtype] * ref.abs()).all()), float((got - ref).abs().max())


def check_gates(gates, device, dtype, n, hid, seed):
    g = torch.Generator().manual_seed(seed)
    pre = (2 * torch.randn(n, 4 * hid, generator=g, dtype=torch.float64)).to(dtype)
    c_prev = torch.randn(n, hid, generator=g, dtype=torch.float64).to(dtype)
    h, c, act = (t.cpu() for t in gates.forward(pre.to(device), c_prev.to(device)))
    h_ref, c_ref, act_ref = ops_lstm.lstm_gates_cpu.forward(pre.double().clone(), c_prev.double())
    for got, ref in ((h, h_ref), (c, c_ref), (act, act_ref)):
        _gate_close(got, ref, dtype)
    dh, dc = (torch.randn(n, hid, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    dpre, dc_prev = (t.cpu() for t in gates.backward(*(t.to(device) for t in (dh, dc, act, c, c_prev))))
    dpre_ref, dcp_ref = ops_lstm.lstm_gates_cpu.backward(dh.double(), dc.double(), act.double(), c.double(),
                                                         c_prev.double())
    _gate_close(dpre, dpre_ref, dtype)
    _gate_close(dc_prev, dcp_ref, dtype)
