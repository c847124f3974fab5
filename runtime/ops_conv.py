"""Block-sparse convolution ops, registered with ``torch.library`` under ``torch.ops.sparsify``.

* ``bsconv2d(x, values, <layout>, bias, residual, out_channels, stride, padding, dilation, activation)``
  ``y = act(conv2d(x, W) + bias) + residual`` with ``W [out, in, kh, kw]``
  block-sparse over ``(out, in)`` channel blocks and dense over the taps:
  ``values [nnz, b, b, kh, kw]``;
* ``bsconv2d_dx(dy, values, <layout>, in_channels, in_height, in_width, stride, padding, dilation)``
  the input gradient (reads the transposed layout);
* ``bsconv2d_dw(dy, x, <layout>, block_size, kh, kw, stride, padding, dilation)``
  the gradient of the stored blocks only, ``[nnz, b, b, kh, kw]``.

``<layout>`` is the six index tensors of ``BlockSparseLayout.metadata()`` for
the ``(out_channels, in_channels)`` channel matrix.  Padding is zero padding,
symmetric per dimension; layer modules apply ``padding='same'`` with an odd
total and the other ``padding_mode`` s with ``F.pad`` before the op, as
``nn.Conv2d`` does.  A 1-D convolution is a 2-D one with height 1.

Each op has a fake implementation, and ``bsconv2d`` an autograd formula built
from the other two, so block-sparse convolutions train, trace, compile and
export.  :func:`conv_executor_for` picks the executor for a device: the CUDA
one (NVRTC kernels, ``runtime/cuda/executor_conv.py``) where it can run, else
the CPU reference (``runtime/executors/cpu_conv.py``).  Under ``torch.func``
transforms, which no custom op's autograd supports (``runtime.ops``), the
modules run :func:`bsconv2d_composite` instead.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import Tensor

from .executors.cpu import ACTIVATIONS
from .executors.cpu_conv import CPUConvExecutor, conv_output_size
from .ops import (
    _activation_grad,  # the same recompute-and-differentiate as bsmm's backward
    activate,
    dense_from_blocks,
)

__all__ = ["bsconv2d", "bsconv2d_dx", "bsconv2d_dw", "bsconv2d_composite", "conv_executor_for",
           "register_conv_executor"]

_META = ("row_offsets", "col_indices", "row_indices", "t_row_offsets", "t_col_indices", "t_block_ids")
_CPU = CPUConvExecutor()
_FACTORIES: dict[str, Callable[[torch.device], object | None]] = {}
_CACHE: dict[tuple[str, int | None], object] = {}
_LOCK = threading.Lock()
_WARNED: set[str] = set()


def register_conv_executor(device_type: str, factory: Callable[[torch.device], object | None]) -> None:
    """Register ``factory(device) -> executor | None`` for block-sparse convolutions on ``device_type``."""
    with _LOCK:
        _FACTORIES[device_type] = factory
        for key in [k for k in _CACHE if k[0] == device_type]:
            del _CACHE[key]


def conv_executor_for(device: torch.device):
    """The convolution executor for ``device``: a registered one, else the CPU reference (one warning)."""
    key = (device.type, device.index)
    ex = _CACHE.get(key)
    if ex is not None:
        return ex
    with _LOCK:
        factory = _FACTORIES.get(device.type)
        ex, reason = None, None
        if factory is not None:
            try:
                ex = factory(device)
            except Exception as exc:  # a broken driver must not break the model
                reason = f"{type(exc).__name__}: {exc}"
        if ex is None:
            ex = _CPU
            if device.type != "cpu" and device.type not in _WARNED:
                _WARNED.add(device.type)
                warnings.warn(
                    f"sparsify: running block-sparse convolutions on {device.type} with the reference (torch) "
                    f"executor: {reason or 'no kernel executor is available for it'}. Run `sparsify doctor`.",
                    RuntimeWarning, stacklevel=3)
        _CACHE[key] = ex
        return ex


def _cuda_conv_factory(device: torch.device):
    """The NVRTC conv kernels' executor (imports cuda-python only when a CUDA tensor arrives)."""
    from .cuda.executor_conv import CUDAConvExecutor

    return CUDAConvExecutor(device)


register_conv_executor("cuda", _cuda_conv_factory)


def _meta(tensors) -> SimpleNamespace:
    return SimpleNamespace(**dict(zip(_META, tensors)))


def _check(op: str, x: Tensor, values: Tensor, row_offsets: Tensor, t_row_offsets: Tensor, what: str,
           channels_dim_blocks: Tensor) -> None:
    if values.dim() != 5 or values.shape[1] != values.shape[2]:
        raise ValueError(f"sparsify.{op}: expected values of shape [nnz, b, b, kh, kw]. Got {tuple(values.shape)}.")
    if x.dim() != 4:
        raise ValueError(f"sparsify.{op}: expected a 4-D {what} [N, C, H, W]. Got shape {tuple(x.shape)}.")
    b = values.shape[1]
    n_blocks = channels_dim_blocks.numel() - 1
    if -(-x.shape[1] // b) != n_blocks:
        raise ValueError(
            f"sparsify.{op}: {what} has {x.shape[1]} channels, but the layout has {n_blocks} block(s) of {b} "
            f"there (so {(n_blocks - 1) * b + 1}..{n_blocks * b} channels).")
    if x.dtype != values.dtype:
        raise TypeError(f"sparsify.{op}: expected {what} of dtype {values.dtype} (the weight's). Got {x.dtype}; "
                        f"cast the input or the module (module.to({x.dtype})).")
    if x.device != values.device:
        raise ValueError(f"sparsify.{op}: expected {what} on {values.device} (the weight's). Got {x.device}.")


def _out_hw(h: int, w: int, values_shape, stride, padding, dilation) -> tuple[int, int]:
    kh, kw = values_shape[3], values_shape[4]
    return (conv_output_size(h, kh, stride[0], padding[0], dilation[0]),
            conv_output_size(w, kw, stride[1], padding[1], dilation[1]))


def _owned(y: Tensor) -> Tensor:
    """A contiguous tensor that is not a view (autograd forbids in-place ops on views a custom op returns)."""
    y = y.contiguous()
    return y.clone() if y._base is not None else y


@torch.library.custom_op("sparsify::bsconv2d", mutates_args=())
def bsconv2d(
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
    out_channels: int,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    activation: str,
) -> Tensor:
    """``act(conv2d(x, W, stride, padding, dilation) + bias) + residual`` for a channel-block-sparse ``W``."""
    _check("bsconv2d", x, values, row_offsets, t_row_offsets, "x", t_row_offsets)
    if activation not in ACTIVATIONS:
        raise ValueError(f"sparsify.bsconv2d: unknown activation {activation!r}; expected one of {ACTIVATIONS}.")
    meta = _meta([row_offsets, col_indices, row_indices, t_row_offsets, t_col_indices, t_block_ids])
    ho, wo = _out_hw(x.shape[2], x.shape[3], values.shape, stride, padding, dilation)
    if ho < 1 or wo < 1:
        raise ValueError(
            f"sparsify.bsconv2d: the kernel {tuple(values.shape[3:])} with dilation {tuple(dilation)} does not fit "
            f"the padded input {x.shape[2] + 2 * padding[0]}x{x.shape[3] + 2 * padding[1]}.")
    if residual is not None and tuple(residual.shape) != (x.shape[0], out_channels, ho, wo):
        raise ValueError(f"sparsify.bsconv2d: expected a residual of shape {(x.shape[0], out_channels, ho, wo)}. "
                         f"Got {tuple(residual.shape)}.")
    y = conv_executor_for(x.device).forward(
        x.contiguous(), values.contiguous(), meta, bias, residual, activation, out_channels,
        tuple(stride), tuple(padding), tuple(dilation))
    return _owned(y)


@bsconv2d.register_fake
def _(x, values, row_offsets, col_indices, row_indices, t_row_offsets, t_col_indices, t_block_ids, bias, residual,
      out_channels, stride, padding, dilation, activation):
    ho, wo = _out_hw(x.shape[2], x.shape[3], values.shape, stride, padding, dilation)
    return x.new_empty(x.shape[0], out_channels, ho, wo)


@torch.library.custom_op("sparsify::bsconv2d_dx", mutates_args=())
def bsconv2d_dx(
    dy: Tensor,
    values: Tensor,
    row_offsets: Tensor,
    col_indices: Tensor,
    row_indices: Tensor,
    t_row_offsets: Tensor,
    t_col_indices: Tensor,
    t_block_ids: Tensor,
    in_channels: int,
    in_height: int,
    in_width: int,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> Tensor:
    """The input gradient of ``bsconv2d`` (transposed block-sparse convolution)."""
    _check("bsconv2d_dx", dy, values, row_offsets, t_row_offsets, "dy", row_offsets)
    meta = _meta([row_offsets, col_indices, row_indices, t_row_offsets, t_col_indices, t_block_ids])
    dx = conv_executor_for(dy.device).grad_input(
        dy.contiguous(), values.contiguous(), meta, in_channels, (in_height, in_width),
        tuple(stride), tuple(padding), tuple(dilation))
    return _owned(dx)


@bsconv2d_dx.register_fake
def _(dy, values, row_offsets, col_indices, row_indices, t_row_offsets, t_col_indices, t_block_ids, in_channels,
      in_height, in_width, stride, padding, dilation):
    return dy.new_empty(dy.shape[0], in_channels, in_height, in_width)


@torch.library.custom_op("sparsify::bsconv2d_dw", mutates_args=())
def bsconv2d_dw(
    dy: Tensor,
    x: Tensor,
    row_offsets: Tensor,
    col_indices: Tensor,
    row_indices: Tensor,
    t_row_offsets: Tensor,
    t_col_indices: Tensor,
    t_block_ids: Tensor,
    block_size: int,
    kh: int,
    kw: int,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> Tensor:
    """The gradient of the stored blocks only: ``[nnz, b, b, kh, kw]``."""
    meta = _meta([row_offsets, col_indices, row_indices, t_row_offsets, t_col_indices, t_block_ids])
    return _owned(conv_executor_for(dy.device).grad_weight(
        dy.contiguous(), x.contiguous(), meta, block_size, (kh, kw), tuple(stride), tuple(padding), tuple(dilation)))


@bsconv2d_dw.register_fake
def _(dy, x, row_offsets, col_indices, row_indices, t_row_offsets, t_col_indices, t_block_ids, block_size, kh, kw,
      stride, padding, dilation):
    return dy.new_empty(col_indices.shape[0], block_size, block_size, kh, kw)


# ------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    (x, values, *meta, bias, residual, out_channels, stride, padding, dilation, activation) = inputs
    ctx.save_for_backward(x, values, *meta, bias)
    ctx.out_channels, ctx.stride, ctx.padding, ctx.dilation = out_channels, stride, padding, dilation
    ctx.activation = activation
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, values, *rest = ctx.saved_tensors
    meta, bias = rest[:6], rest[6]
    grad = grad_out.to(x.dtype)
    if ctx.activation != "none":
        # Recompute the pre-activation rather than keep it (as bsmm does).
        pre = torch.ops.sparsify.bsconv2d(x, values, *meta, bias, None, ctx.out_channels, ctx.stride, ctx.padding,
                                          ctx.dilation, "none")
        grad = _activation_grad(grad, pre, ctx.activation)
    grad = grad.contiguous()
    dx = dvalues = dbias = dresidual = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.sparsify.bsconv2d_dx(grad, values, *meta, x.shape[1], x.shape[2], x.shape[3], ctx.stride,
                                            ctx.padding, ctx.dilation)
    if ctx.needs_input_grad[1]:
        dvalues = torch.ops.sparsify.bsconv2d_dw(grad, x, *meta, values.shape[1], values.shape[3], values.shape[4],
                                                 ctx.stride, ctx.padding, ctx.dilation)
    if ctx.has_bias and ctx.needs_input_grad[8]:
        dbias = grad.sum(dim=(0, 2, 3))
    if ctx.needs_input_grad[9]:
        dresidual = grad_out
    return (dx, dvalues, None, None, None, None, None, None, dbias, dresidual, None, None, None, None, None)


bsconv2d.register_autograd(_backward, setup_context=_setup_context)


def bsconv2d_composite(x: Tensor, values: Tensor, meta: list[Tensor], bias: Tensor | None, residual: Tensor | None,
                       out_channels: int, stride: list[int], padding: list[int], dilation: list[int],
                       activation: str) -> Tensor:
    """``bsconv2d``'s result in standard differentiable torch ops (the blocks scattered into the dense
    weight, then ``F.conv2d``), for ``torch.func`` transforms (``runtime.ops.bsmm_composite``).

    Example:
        >>> from sparsify.runtime import BlockSparseLayout
        >>> lay = BlockSparseLayout.from_block_mask(torch.tensor([[True, False]]), shape=(4, 8), block_size=4)
        >>> meta = list(lay.metadata().values())
        >>> loss = lambda v: bsconv2d_composite(torch.ones(1, 8, 5, 5), v, meta, None, None, 4, [1, 1], [1, 1],
        ...                                     [1, 1], "none").sum()
        >>> torch.func.grad(loss)(torch.ones(1, 4, 4, 3, 3)).shape
        torch.Size([1, 4, 4, 3, 3])
    """
    b = values.shape[1]
    w = dense_from_blocks(values, meta[2], meta[1], meta[0].numel() - 1, -(-x.shape[1] // b),
                          (out_channels, x.shape[1]))
    y = activate(torch.nn.functional.conv2d(x, w, bias, stride, padding, dilation), activation)
    return y if residual is None else y + residual
