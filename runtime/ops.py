"""The runtime ops, registered with ``torch.library`` under ``torch.ops.sparsify``.

* ``bsmm(x, values, <layout>, bias, residual, out_features, activation)``
  ``y = act(x @ W.T + bias) + residual`` with ``W`` block-sparse;
* ``bsmm_dx(dy, values, <layout>, in_features)``  ``dx = dy @ W`` (reads the
  transposed layout);
* ``bsmm_dw(dy, x, <layout>, block_size)``  ``dW`` for the stored blocks only.

``<layout>`` is the six index tensors of :meth:`BlockSparseLayout.metadata`,
on the device of ``x``.  Each op has a fake (meta) implementation, and
``bsmm`` has an autograd formula built from the other two, so converted
models train, re-trace, ``torch.compile`` and ``torch.export``.

Every op runs on the executor that :func:`executor_for` picks for the device.
Executors may return outputs of any strides; the ops return contiguous ones,
as their fake implementations say.  :func:`bsmm_eager` is the same forward
without the dispatcher, for eager calls that need no autograd (see there).

Under ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ``jvp``) the
ops cannot run: torch's autograd wrapper of a ``custom_op`` defines no
``setup_context`` staticmethod, which functorch requires (pytorch/pytorch#168393,
#179652; still so in torch 2.13).  Modules then call :func:`bsmm_composite`, the
same product in standard differentiable torch ops (:func:`functorch_active`).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from .executors import executor_for
from .executors.cpu import ACTIVATIONS, activate, apply_epilogue

__all__ = ["bsmm", "bsmm_dx", "bsmm_dw", "bsmm_eager", "bsmm_composite", "dense_from_blocks", "activate",
           "eager_inference", "functorch_active", "ACTIVATIONS", "META_NAMES"]

META_NAMES = ("row_offsets", "col_indices", "row_indices", "t_row_offsets", "t_col_indices", "t_block_ids")


def _meta(*tensors: Tensor) -> SimpleNamespace:
    return SimpleNamespace(**dict(zip(META_NAMES, tensors)))


def _check_inputs(op: str, x: Tensor, values: Tensor, k_expected: int, what: str) -> None:
    if values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"sparsify.{op}: expected values of shape [nnz, b, b]. Got {tuple(values.shape)}.")
    if x.shape[-1] != k_expected:
        raise ValueError(
            f"sparsify.{op}: expected {what} with last dimension {k_expected}. Got shape {tuple(x.shape)}."
        )
    if x.dtype != values.dtype:
        raise TypeError(
            f"sparsify.{op}: expected {what} of dtype {values.dtype} (the weight's). Got {x.dtype}; "
            f"cast the input or the module (module.to({x.dtype}))."
        )
    if x.device != values.device:
        raise ValueError(
            f"sparsify.{op}: expected {what} on {values.device} (the weight's). Got {x.device}."
        )


@torch.library.custom_op("sparsify::bsmm", mutates_args=())
def bsmm(
    x: Tensor,
    values: Tensor,
    row_offsets: Tensor,
    col_indices: Tensor,
    row_indices: Tensor,
    t_row_offsets: Tensor,
    t_col_indices: Tensor,
    t_block_ids: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    out_features: int,
    in_features: int,
    activation: str,
    out_dtype: torch.dtype | None = None,
    static_weight: bool = False,
) -> Tensor:
    """``act(x @ W.T + bias) + residual`` for a block-sparse ``W [out_features, in_features]``,
    cast to ``out_dtype`` (default: the input's dtype) as the last step of the epilogue.

    ``static_weight=True`` promises that ``values`` changes only through
    in-place ops that bump its version counter (modules pass it in eval mode);
    an executor may then cache forms derived from the weight."""
    meta = [row_offsets, col_indices, row_indices, t_row_offsets, t_col_indices, t_block_ids]
    y = _forward(x, values, meta, bias, residual, out_features, in_features, activation, out_dtype, static_weight)
    # Executors may return any strides; the op's output is contiguous, as its fake says.
    return _owned(y)


def _owned(y: Tensor) -> Tensor:
    """``y`` as a contiguous tensor that is not a view.

    Autograd forbids in-place ops on a view returned by a custom op (``ReLU(inplace=True)``
    after a layer would raise), and the executors' results are reshaped views of
    their 2-D outputs.  A contiguous view is re-wrapped around the same storage
    (no copy); anything else is copied by ``contiguous()``.
    """
    if not y.is_contiguous():
        return y.contiguous()
    if y._base is None:
        return y
    out = y.new_empty(0)
    out.set_(y.untyped_storage(), y.storage_offset(), y.shape, y.stride())
    return out


def bsmm_eager(
    x: Tensor,
    values: Tensor,
    meta: list[Tensor],
    bias: Tensor | None,
    residual: Tensor | None,
    out_features: int,
    in_features: int,
    activation: str,
    static_weight: bool,
) -> Tensor:
    """``bsmm``'s forward called on the executor directly, for eager no-grad calls.

    The dispatcher and the custom-op wrapper cost ~30 us a call, a tenth of a
    whole decode-size product at high sparsity.  Modules call this when nothing
    needs the op (no autograd, no tracing, compiling or tensor subclasses; see
    ``eager_inference``).  The result is contiguous, like ``nn.Linear``'s: the
    executor's natural one may be a transposed view, on which the caller's
    ``y.view(...)`` raises and ``scaled_dot_product_attention`` leaves its fused
    kernel for the slow math path (a whole GPT-2 ran 5% slower for it).
    """
    y = _forward(x, values, meta, bias, residual, out_features, in_features, activation, None, static_weight)
    return y if y.is_contiguous() else y.contiguous()


def _forward(x, values, meta, bias, residual, out_features, in_features, activation, out_dtype, static_weight):
    """Check, flatten to 2-D, run the executor; the result may have any strides."""
    _check_inputs("bsmm", x, values, in_features, "x")
    if activation not in ACTIVATIONS:
        raise ValueError(f"sparsify.bsmm: unknown activation {activation!r}; expected one of {ACTIVATIONS}.")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).contiguous()
    r2 = None if residual is None else residual.reshape(-1, out_features).contiguous()
    y = executor_for(x.device).forward(
        x2, values, _meta(*meta), bias, r2, activation, out_features, out_dtype, static_weight
    )
    return y.reshape(*lead, out_features)


def eager_inference(x: Tensor) -> bool:
    """Whether a call may skip the op: plain tensors with storage, grad off, nothing tracing or compiling.

    ``torch.jit.trace`` must record the op, not the executor's tensor ops: the executor picks its path per
    call and may read a cached dense weight, which a trace would bake in as a constant (a traced module
    then ignores later weight updates, and ``check_trace``, which re-traces under ``no_grad``, sees two
    different graphs).  Meta tensors have no data for an executor: the op's fake implementation runs."""
    return (
        type(x) is Tensor
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()  # first: dynamo folds it and never reads the checks below
        and not x.is_meta
        and not torch._C._is_tracing()  # torch.jit.is_tracing() without its ~120 ns wrapper
        and not torch._C._are_functorch_transforms_active()
    )


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ``jvp``...) is active: then the
    modules run the ``*_composite`` forms of the ops (module docstring).

    Example:
        >>> functorch_active(), torch.func.grad(lambda x: x.sum() * functorch_active())(torch.ones(1))
        (False, tensor([1.]))
    """
    return torch._C._are_functorch_transforms_active()


def dense_from_blocks(values: Tensor, row_indices: Tensor, col_indices: Tensor, n_block_rows: int,
                      n_block_cols: int, shape: tuple[int, int]) -> Tensor:
    """Blocks ``values [nnz, b, b, *taps]`` -> the dense ``[*shape, *taps]`` weight, zeros elsewhere.

    Made of out-of-place ops (an index map, a gather, views), not the in-place scatter of
    ``layout.scatter_blocks``: ``torch.vmap`` refuses an in-place write of a batched tensor into an
    unbatched one, so this runs under every ``torch.func`` transform (per-sample gradients, stacked
    ensembles whose weights and index buffers are batched) and differentiates like any op.

    Example:
        >>> v = torch.arange(8.0).view(2, 2, 2)   # blocks (0, 1) and (1, 0) of a 4 x 3 matrix
        >>> dense_from_blocks(v, torch.tensor([0, 1]), torch.tensor([1, 0]), 2, 2, (4, 3))[:, :3].tolist()
        [[0.0, 0.0, 0.0], [0.0, 0.0, 2.0], [4.0, 5.0, 0.0], [6.0, 7.0, 0.0]]
    """
    nnz, b = values.shape[0], values.shape[1]
    taps = tuple(values.shape[3:])
    # each grid cell's block, or the appended zero block (index nnz) where none is stored
    # (out of place: under vmap over stacked modules the index buffers are batched too)
    cell = row_indices.long() * n_block_cols + col_indices.long()
    slot = torch.full((n_block_rows * n_block_cols,), nnz, dtype=torch.long, device=values.device).scatter(
        0, cell, torch.arange(nnz, device=values.device))
    padded = F.pad(values, (0, 0) * (values.dim() - 1) + (0, 1))
    grid = padded[slot].view(n_block_rows, n_block_cols, b, b, *taps).transpose(1, 2)
    return grid.reshape(n_block_rows * b, n_block_cols * b, *taps)[: shape[0], : shape[1]]


def bsmm_composite(
    x: Tensor,
    values: Tensor,
    meta: list[Tensor],
    bias: Tensor | None,
    residual: Tensor | None,
    out_features: int,
    in_features: int,
    activation: str,
) -> Tensor:
    """``bsmm``'s result in standard differentiable torch ops: the blocks scattered into the dense weight,
    then ``F.linear``.  For ``torch.func`` transforms, which the op does not support (module docstring);
    it costs a dense product and a dense weight per call.

    Example:
        >>> from sparsify.runtime import BlockSparseLayout
        >>> lay = BlockSparseLayout.from_block_mask(torch.tensor([[True], [False]]), shape=(8, 4), block_size=4)
        >>> meta = list(lay.metadata().values())
        >>> loss = lambda v: bsmm_composite(torch.ones(2, 4), v, meta, None, None, 8, 4, "relu").sum()
        >>> torch.func.grad(loss)(torch.ones(1, 4, 4)).shape   # the gradient of the stored block
        torch.Size([1, 4, 4])
    """
    b = values.shape[-1]
    w = dense_from_blocks(values, meta[2], meta[1], meta[0].numel() - 1, -(-in_features // b),
                          (out_features, in_features))
    y = activate(F.linear(x, w, bias), activation)
    return y if residual is None else y + residual


@bsmm.register_fake
def _(x, values, row_offsets, col_indices, row_indices, t_row_offsets, t_col_indices, t_block_ids,
      bias, residual, out_features, in_features, activation, out_dtype=None, static_weight=False):
    # the same checks as a real call, so tracing (and a loaded program's check on its declared inputs)
    # refuses what running would refuse
    if isinstance(x.shape[-1], int):
        _check_inputs("bsmm", x, values, in_features, "x")
    if activation not in ACTIVATIONS:
        raise ValueError(f"sparsify.bsmm: unknown activation {activation!r}; expected one of {ACTIVATIONS}.")
    return x.new_empty(*x.shape[:-1], out_features, dtype=out_dtype or x.dtype)


@torch.library.custom_op("sparsify::bsmm_dx", mutates_args=())
def bsmm_dx(
    dy: Tensor,
    values: Tensor,
    row_offsets: Tensor,
    col_indices: Tensor,
    row_indices: Tensor,
    t_row_offsets: Tensor,
    t_col_indices: Tensor,
    t_block_ids: Tensor,
    in_features: int,
) -> Tensor:
    """``dy @ W`` for a block-sparse ``W``: the input gradient of ``bsmm``."""
    out_features = dy.shape[-1]
    lead = dy.shape[:-1]
    meta = _meta(row_offsets, col_indices, row_indices, t_row_offsets, t_col_indices, t_block_ids)
    dx = executor_for(dy.device).grad_input(dy.reshape(-1, out_features).contiguous(), values, meta, in_features)
    return _owned(dx.reshape(*lead, in_features))


@bsmm_dx.register_fake
def _(dy, values, row_offsets, col_indices, row_indices, t_row_offsets, t_col_indices, t_block_ids, in_features):
    return dy.new_empty(*dy.shape[:-1], in_features)


@torch.library.custom_op("sparsify::bsmm_dw", mutates_args=())
def bsmm_dw(
    dy: Tensor,
    x: Tensor,
    row_offsets: Tensor,
    col_indices: Tensor,
    row_indices: Tensor,
    t_row_offsets: Tensor,
    t_col_indices: Tensor,
    t_block_ids: Tensor,
    block_size: int,
) -> Tensor:
    """The gradient of the stored blocks only: ``[nnz, b, b]``."""
    meta = _meta(row_offsets, col_indices, row_indices, t_row_offsets, t_col_indices, t_block_ids)
    dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    return _owned(executor_for(dy.device).grad_weight(dy2, x2, meta, block_size))


@bsmm_dw.register_fake
def _(dy, x, row_offsets, col_indices, row_indices, t_row_offsets, t_col_indices, t_block_ids, block_size):
    return dy.new_empty(col_indices.shape[0], block_size, block_size)


# ------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    (x, values, *meta, bias, residual, out_features, in_features, activation, _out_dtype, _static) = inputs
    ctx.save_for_backward(x, values, *meta, bias)
    ctx.out_features = out_features
    ctx.in_features = in_features
    ctx.activation = activation
    ctx.has_bias = bias is not None


def _activation_grad(grad: Tensor, pre: Tensor, activation: str) -> Tensor:
    with torch.enable_grad():
        p = pre.detach().requires_grad_(True)
        out = apply_epilogue(p.clone(), None, None, activation)
        (g,) = torch.autograd.grad(out, p, grad)
    return g


def _backward(ctx, grad_out):
    x, values, *rest = ctx.saved_tensors
    meta, bias = rest[:6], rest[6]
    grad_out = grad_out.to(x.dtype)
    grad = grad_out
    if ctx.activation != "none":
        # Recompute the pre-activation instead of storing it: inference keeps
        # the fused epilogue's memory saving, training pays one extra product.
        pre = torch.ops.sparsify.bsmm(x, values, *meta, bias, None, ctx.out_features, ctx.in_features, "none")
        grad = _activation_grad(grad, pre, ctx.activation)
    grad = grad.contiguous()
    dx = dvalues = dbias = dresidual = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.sparsify.bsmm_dx(grad, values, *meta, ctx.in_features)
    if ctx.needs_input_grad[1]:
        dvalues = torch.ops.sparsify.bsmm_dw(grad, x, *meta, values.shape[-1])
    if ctx.has_bias and ctx.needs_input_grad[8]:
        dbias = grad.reshape(-1, ctx.out_features).sum(0)
    if ctx.needs_input_grad[9]:
        dresidual = grad_out  # the residual is added after the activation
    return (dx, dvalues, None, None, None, None, None, None, dbias, dresidual, None, None, None, None, None)


bsmm.register_autograd(_backward, setup_context=_setup_context)
