"""The block-sparse LSTM recurrence as ``torch.library`` ops: ``torch.ops.sparsify.bslstm_recurrence``.

One layer, one direction, the whole sequence in one op:

    pre_t = xproj_t + h_{t-1} @ W_hh.T          (xproj = x @ W_ih.T + b_ih + b_hh, precomputed)
    i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of the four H-wide parts of pre_t  (nn.LSTM's order)
    c_t = f * c_{t-1} + i * g;   h_t = o * tanh(c_t)

* ``bslstm_recurrence(xproj [T, N, 4H], h0 [N, H], c0 [N, H], values, <layout>)``
  -> ``(hs [T, N, H], cs [T, N, H], gates [T, N, 4H])``; ``gates`` holds the
  activated gates for the backward (not differentiable);
* ``bslstm_recurrence_backward(...)`` -> ``(dxproj, dh0, dc0, dvalues)``: BPTT,
  with ``dW_hh`` of the stored blocks computed once for all steps (one SDD
  product of the gate gradients and the previous hidden states), not per step.

The recurrent product ``h_{t-1} @ W_hh.T`` has only ``N`` (batch) rows: it runs
on the executor's small-M path (the CPU executor's gather path; the CUDA
executor's small-M kernel that streams ``W_hh`` once), with ``xproj_t`` added in
its epilogue as the residual.  The gate math is fused into as few passes as
the device allows: on the CPU one sigmoid over all four gates (``g`` as
``2 sigmoid(2x) - 1``) and three fused multiply-adds; on CUDA one elementwise
kernel per step (``cuda_src/lstm_gates.cuh``) where it is available.

The input projection is not part of this op: it has ``T * N`` rows, so it runs
as one large ``bsmm`` before the recurrence.

Under ``torch.func`` transforms, which no custom op's autograd supports
(``runtime.ops``), ``BlockSparseLSTM`` runs :func:`bslstm_recurrence_composite`:
the same recurrence step by step in standard differentiable torch ops.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from .executors import executor_for
from .executors.cpu import GATHER_FEW_ROWS_DENSITY, _gather_matmul, dense_weight
from .layout import gather_blocks
from .ops import dense_from_blocks

__all__ = ["bslstm_recurrence", "bslstm_recurrence_backward", "bslstm_recurrence_composite", "lstm_gates_cpu",
           "register_gate_kernels"]

_META = ("row_offsets", "col_indices", "row_indices", "t_row_offsets", "t_col_indices", "t_block_ids")
_GATE_KERNELS: dict[str, object] = {}


def register_gate_kernels(device_type: str, impl) -> None:
    """Register fused gate kernels for ``device_type``: an object with ``forward(pre, c_prev)`` ->
    ``(h, c, gates)`` and ``backward(dh, dc, gates, c, c_prev)`` -> ``(dpre, dc_prev)``."""
    _GATE_KERNELS[device_type] = impl


def _meta(tensors) -> SimpleNamespace:
    return SimpleNamespace(**dict(zip(_META, tensors)))


class _CPUGates:
    """The gate math in plain torch: one sigmoid pass over the four gates."""

    @staticmethod
    def forward(pre: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h4 = pre.shape[-1]
        hid = h4 // 4
        pre = pre.clone() if pre._base is not None or not pre.is_contiguous() else pre
        pre[:, 2 * hid:3 * hid].mul_(2.0)  # tanh(x) = 2 sigmoid(2x) - 1: one sigmoid for all gates
        act = pre.sigmoid_()
        act[:, 2 * hid:3 * hid].mul_(2.0).sub_(1.0)
        i, f, g, o = act.split(hid, dim=1)
        c = torch.addcmul(f * c_prev, i, g)
        h = o * torch.tanh(c)
        return h, c, act

    @staticmethod
    def backward(dh: Tensor, dc: Tensor, act: Tensor, c: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor]:
        hid = c.shape[-1]
        i, f, g, o = act.split(hid, dim=1)
        tc = torch.tanh(c)
        dc = torch.addcmul(dc, dh * o, 1.0 - tc * tc)
        dpre = torch.empty_like(act)
        di, df, dg, do = dpre.split(hid, dim=1)
        torch.mul(dc * g, i * (1.0 - i), out=di)
        torch.mul(dc * c_prev, f * (1.0 - f), out=df)
        torch.mul(dc * i, 1.0 - g * g, out=dg)
        torch.mul(dh * tc, o * (1.0 - o), out=do)
        return dpre, dc * f


lstm_gates_cpu = _CPUGates


class _LazyCUDAGates:
    """The fused gate kernels (``runtime/cuda/executor_lstm.py``), imported on the first CUDA step."""

    def forward(self, pre, c_prev):
        from .cuda.executor_lstm import cuda_gate_kernels

        return cuda_gate_kernels.forward(pre, c_prev)

    def backward(self, dh, dc, act, c, c_prev):
        from .cuda.executor_lstm import cuda_gate_kernels

        return cuda_gate_kernels.backward(dh, dc, act, c, c_prev)


register_gate_kernels("cuda", _LazyCUDAGates())


def _gates_for(device: torch.device):
    return _GATE_KERNELS.get(device.type, _CPUGates)


#: On the CPU the recurrent product (a few rows: the batch) runs the executor's gather path
#: (its small-M path) below this density, and a dense product with the weight materialized
#: once per call above it (the CPU executor's own few-rows threshold, ``GATHER_FEW_ROWS_DENSITY``).
CPU_GATHER_BELOW = GATHER_FEW_ROWS_DENSITY
#: On the CPU, dW_hh for all steps (``T * N`` rows) is one dense GEMM whose stored blocks are
#: picked out above this density: measured 2.9-4x faster than the per-block gather SDD at
#: density 0.11-0.15 with 1600-3200 rows (docs/training.md); below it, the executor's SDD.
CPU_DW_DENSE_ABOVE = 0.05


class _Product:
    """``x @ W.T`` (+ residual) for the ``T`` steps of one call, on the small-M path.

    On CUDA this is the executor's forward (its small-M kernel streams ``W``
    once per step).  On the CPU it is the gather path, or, at high density, a
    dense product with ``W`` materialized once for all steps."""

    def __init__(self, ex, values: Tensor, meta: SimpleNamespace, out_features: int, in_features: int) -> None:
        self.ex, self.meta, self.out, self.inp = ex, meta, out_features, in_features
        self.values = values.detach().contiguous()
        b = self.values.shape[-1]
        self.nbr, self.nbc = meta.row_offsets.numel() - 1, -(-in_features // b)
        density = self.values.shape[0] / max(1, self.nbr * self.nbc)
        self.mode = "executor"
        if ex.name == "cpu":
            if density >= CPU_GATHER_BELOW:
                self.mode = "dense"
                self.weight_t = dense_weight(self.values, meta, (out_features, in_features)).T
            else:
                self.mode = "gather"
                self.rows, self.cols = meta.row_indices.long(), meta.col_indices.long()

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if self.mode == "dense":
            return x @ self.weight_t if residual is None else torch.addmm(residual, x, self.weight_t)
        if self.mode == "gather":
            b = self.values.shape[-1]
            xp = x if self.nbc * b == self.inp else torch.nn.functional.pad(x, (0, self.nbc * b - self.inp))
            y = _gather_matmul(self.values, self.rows, self.cols, xp, self.nbr, self.out)
            return y + residual if residual is not None else y.contiguous()
        return self.ex.forward(x, self.values, self.meta, None, residual, "none", self.out, None, True)

    @classmethod
    def transposed(cls, ex, values: Tensor, meta: SimpleNamespace, in_features: int) -> _Product:
        """The product with ``W.T`` (for ``dy @ W``): its blocks and the layout of the transpose."""
        t_ids = meta.t_block_ids.long()
        t_values = values.detach().index_select(0, t_ids).transpose(1, 2).contiguous()
        counts = meta.t_row_offsets.diff().long()
        t_meta = SimpleNamespace(
            row_offsets=meta.t_row_offsets,
            col_indices=meta.t_col_indices,
            row_indices=torch.repeat_interleave(
                torch.arange(counts.numel(), device=counts.device), counts).to(torch.int32),
            t_row_offsets=meta.row_offsets,
            t_col_indices=meta.col_indices,
            t_block_ids=torch.argsort(t_ids).to(torch.int32),
        )
        b = values.shape[-1]
        return cls(ex, t_values, t_meta, in_features, (meta.row_offsets.numel() - 1) * b)


def _grad_weight(ex, dy: Tensor, x: Tensor, meta: SimpleNamespace, block_size: int) -> Tensor:
    """dW of the stored blocks for all ``T * N`` rows at once (see ``CPU_DW_DENSE_ABOVE``)."""
    nbr = meta.row_offsets.numel() - 1
    nbc = -(-x.shape[1] // block_size)
    if ex.name == "cpu" and meta.col_indices.numel() / max(1, nbr * nbc) >= CPU_DW_DENSE_ABOVE:
        b = block_size
        pr, pc = nbr * b, nbc * b
        full = torch.nn.functional.pad(dy, (0, pr - dy.shape[1])).T @ torch.nn.functional.pad(x, (0, pc - x.shape[1]))
        return gather_blocks(full, meta.row_indices, meta.col_indices, b)
    return ex.grad_weight(dy, x, meta, block_size)


def _check(xproj: Tensor, h0: Tensor, c0: Tensor, values: Tensor) -> None:
    if xproj.dim() != 3 or xproj.shape[-1] % 4:
        raise ValueError(f"sparsify.bslstm_recurrence: expected xproj [T, N, 4H]. Got {tuple(xproj.shape)}.")
    t, n, h4 = xproj.shape
    for name, s in (("h0", h0), ("c0", c0)):
        if tuple(s.shape) != (n, h4 // 4):
            raise ValueError(f"sparsify.bslstm_recurrence: expected {name} of shape {(n, h4 // 4)}. Got {tuple(s.shape)}.")
        if s.dtype != xproj.dtype or s.device != xproj.device:
            raise TypeError(f"sparsify.bslstm_recurrence: {name} has dtype {s.dtype} on {s.device}; expected "
                            f"{xproj.dtype} on {xproj.device} (the input's).")
    if values.dtype != xproj.dtype:
        raise TypeError(f"sparsify.bslstm_recurrence: expected the weight's dtype {values.dtype}. Got {xproj.dtype}.")


@torch.library.custom_op("sparsify::bslstm_recurrence", mutates_args=())
def bslstm_recurrence(
    xproj: Tensor,
    h0: Tensor,
    c0: Tensor,
    values: Tensor,
    row_offsets: Tensor,
    col_indices: Tensor,
    row_indices: Tensor,
    t_row_offsets: Tensor,
    t_col_indices: Tensor,
    t_block_ids: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The LSTM recurrence over ``T`` steps with a block-sparse ``W_hh [4H, H]``: ``(hs, cs, gates)``."""
    _check(xproj, h0, c0, values)
    meta = _meta([row_offsets, col_indices, row_indices, t_row_offsets, t_col_indices, t_block_ids])
    ex = executor_for(xproj.device)
    gates_impl = _gates_for(xproj.device)
    t_len, n, h4 = xproj.shape
    hid = h4 // 4
    hs = xproj.new_empty(t_len, n, hid)
    cs = xproj.new_empty(t_len, n, hid)
    gates = xproj.new_empty(t_len, n, h4)
    h, c = h0.contiguous(), c0.contiguous()
    xproj = xproj.contiguous()
    product = _Product(ex, values, meta, h4, hid)
    for t in range(t_len):  # the recurrence itself: step t needs h_{t-1}
        # small-M product with xproj_t added in the epilogue
        pre = product(h, xproj[t])
        h, c, act = gates_impl.forward(pre, c)
        hs[t], cs[t], gates[t] = h, c, act
    return hs, cs, gates


@bslstm_recurrence.register_fake
def _(xproj, h0, c0, values, row_offsets, col_indices, row_indices, t_row_offsets, t_col_indices, t_block_ids):
    t_len, n, h4 = xproj.shape
    return xproj.new_empty(t_len, n, h4 // 4), xproj.new_empty(t_len, n, h4 // 4), xproj.new_empty(t_len, n, h4)


@torch.library.custom_op("sparsify::bslstm_recurrence_backward", mutates_args=())
def bslstm_recurrence_backward(
    grad_hs: Tensor,
    grad_cs: Tensor,
    hs: Tensor,
    cs: Tensor,
    gates: Tensor,
    h0: Tensor,
    c0: Tensor,
    values: Tensor,
    row_offsets: Tensor,
    col_indices: Tensor,
    row_indices: Tensor,
    t_row_offsets: Tensor,
    t_col_indices: Tensor,
    t_block_ids: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backpropagation through time: ``(dxproj, dh0, dc0, dvalues)`` (dvalues for the stored blocks only)."""
    meta = _meta([row_offsets, col_indices, row_indices, t_row_offsets, t_col_indices, t_block_ids])
    ex = executor_for(hs.device)
    gates_impl = _gates_for(hs.device)
    t_len, n, hid = hs.shape
    product_t = _Product.transposed(ex, values, meta, hid)  # dpre @ W_hh
    dxproj = gates.new_empty(t_len, n, 4 * hid)
    dh = torch.zeros_like(h0)
    dc = torch.zeros_like(c0)
    for t in range(t_len - 1, -1, -1):
        c_prev = cs[t - 1] if t > 0 else c0
        dpre, dc = gates_impl.backward(grad_hs[t] + dh, grad_cs[t] + dc, gates[t], cs[t], c_prev)
        dxproj[t] = dpre
        dh = product_t(dpre.contiguous())  # small-M dX: dpre @ W_hh
    h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]], dim=0).reshape(t_len * n, hid)
    # dW_hh of the stored blocks for all steps at once: one SDD over T * N rows
    dvalues = _grad_weight(ex, dxproj.reshape(t_len * n, 4 * hid), h_prev.contiguous(), meta, values.shape[-1])
    # (the executors return any strides; the op's outputs are contiguous)
    return dxproj, dh.contiguous(), dc.contiguous(), dvalues.contiguous()


@bslstm_recurrence_backward.register_fake
def _(grad_hs, grad_cs, hs, cs, gates, h0, c0, values, row_offsets, col_indices, row_indices, t_row_offsets,
      t_col_indices, t_block_ids):
    return torch.empty_like(gates), torch.empty_like(h0), torch.empty_like(c0), torch.empty_like(values)


def _setup_context(ctx, inputs, output):
    xproj, h0, c0, values, *meta = inputs
    hs, cs, gates = output
    ctx.save_for_backward(hs, cs, gates, h0, c0, values, *meta)
    ctx.mark_non_differentiable(gates)


def _backward(ctx, grad_hs, grad_cs, _grad_gates):
    hs, cs, gates, h0, c0, values, *meta = ctx.saved_tensors
    grad_hs = torch.zeros_like(hs) if grad_hs is None else grad_hs.contiguous()
    grad_cs = torch.zeros_like(cs) if grad_cs is None else grad_cs.contiguous()
    dxproj, dh0, dc0, dvalues = torch.ops.sparsify.bslstm_recurrence_backward(
        grad_hs, grad_cs, hs, cs, gates, h0, c0, values, *meta)
    return (dxproj, dh0, dc0, dvalues if ctx.needs_input_grad[3] else None) + (None,) * 6


bslstm_recurrence.register_autograd(_backward, setup_context=_setup_context)


def bslstm_recurrence_composite(xproj: Tensor, h0: Tensor, c0: Tensor, values: Tensor,
                                meta: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(hs, cs)`` of ``bslstm_recurrence`` in standard differentiable torch ops, one step at a time
    with ``W_hh`` scattered into a dense weight once: for ``torch.func`` transforms (module docstring).

    Example:
        >>> from sparsify.runtime import BlockSparseLayout
        >>> lay = BlockSparseLayout.from_block_mask(torch.ones(4, 1, dtype=torch.bool), shape=(16, 4), block_size=4)
        >>> meta = list(lay.metadata().values())
        >>> xproj, h0, c0 = torch.randn(3, 2, 16), torch.zeros(2, 4), torch.zeros(2, 4)
        >>> v = torch.randn(4, 4, 4)
        >>> hs, cs = bslstm_recurrence_composite(xproj, h0, c0, v, meta)
        >>> ref = torch.ops.sparsify.bslstm_recurrence(xproj, h0, c0, v, *meta)
        >>> hs.shape, torch.allclose(hs, ref[0], atol=1e-6), torch.allclose(cs, ref[1], atol=1e-6)
        (torch.Size([3, 2, 4]), True, True)
    """
    h4 = xproj.shape[-1]
    hid = h4 // 4
    b = values.shape[-1]
    w = dense_from_blocks(values, meta[2], meta[1], meta[0].numel() - 1, -(-hid // b), (h4, hid))
    h, c = h0, c0
    hs, cs = [], []
    for t in range(xproj.shape[0]):  # step t needs h_{t-1}
        i, f, g, o = (xproj[t] + torch.nn.functional.linear(h, w)).chunk(4, dim=-1)  # nn.LSTM's gate order
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        hs.append(h)
        cs.append(c)
    return torch.stack(hs), torch.stack(cs)
