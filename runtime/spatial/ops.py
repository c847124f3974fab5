"""The spatial runtime ops, registered with ``torch.library`` under ``torch.ops.sparsify``.

* ``spatial_conv(x, weight, in_idx, out_idx, k_offsets, n_out, identity_k, depthwise)``:
  sparse convolution over a kernel map (gather-GEMM-scatter);
* ``spatial_conv_dgrad(dy, weight, ..., n_in, ...)`` and ``spatial_conv_wgrad(x, dy, ...)``:
  its input and weight gradients, which are the autograd formula of ``spatial_conv``;
* ``spatial_pool(x, in_idx, out_idx, n_out, mode) -> (y, aux)`` (sum / avg / max; ``aux`` is
  the pair count per output, or the arg-max input row per output and channel) and
  ``spatial_pool_backward``.

A transposed convolution is ``spatial_conv`` over the transposed kernel map.  Each
op has a fake implementation, so models that use them re-trace and compile.  The
executor is :func:`spatial_executor_for` the device: the CUDA kernels where they
can run, else the CPU (torch) reference.

Example:
    >>> import torch
    >>> x = torch.ones(2, 3, dtype=torch.float64); w = torch.ones(1, 3, 2, dtype=torch.float64)
    >>> i = torch.tensor([0, 1], dtype=torch.int32)
    >>> torch.ops.sparsify.spatial_conv(x, w, i, i, [0, 2], 2, 0, False).tolist()
    [[3.0, 3.0], [3.0, 3.0]]
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .cpu import POOL_MODES, SpatialCPUExecutor

__all__ = [
    "register_spatial_executor",
    "spatial_conv",
    "spatial_conv_backward",
    "spatial_conv_dgrad",
    "spatial_conv_wgrad",
    "spatial_executor_for",
    "spatial_pool",
    "spatial_pool_backward",
]

_CPU = SpatialCPUExecutor()
_FACTORIES: dict[str, Callable] = {}
_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()
_WARNED: set[str] = set()


def register_spatial_executor(device_type: str, factory: Callable) -> None:
    """Register ``factory(device) -> executor`` for ``device_type``; a raising factory means
    the CPU reference runs there (one warning)."""
    with _LOCK:
        _FACTORIES[device_type] = factory
        for key in [k for k in _CACHE if k[0] == device_type]:
            del _CACHE[key]


def spatial_executor_for(device: torch.device):
    """The spatial executor for tensors on ``device``.

    Example:
        >>> spatial_executor_for(torch.device("cpu")).name
        'cpu'
    """
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
            except Exception as exc:  # a missing driver must not break the model
                reason = f"{type(exc).__name__}: {exc}"
        if ex is None:
            ex = _CPU
            if device.type != "cpu" and device.type not in _WARNED:
                _WARNED.add(device.type)
                warnings.warn(
                    f"sparsify.spatial: running sparse convolutions on {device.type} with the reference "
                    f"(torch) executor: {reason or 'no kernel executor is available'}. "
                    "Run `sparsify doctor` to see what is missing.",
                    RuntimeWarning, stacklevel=3,
                )
        _CACHE[key] = ex
        return ex


def _check_conv(op: str, x: Tensor, weight: Tensor, in_idx: Tensor, out_idx: Tensor, k_offsets, depthwise: bool,
                x_name: str = "x") -> None:
    k_vol = len(k_offsets) - 1
    want = 2 if depthwise else 3
    if weight.dim() != want or weight.shape[0] != k_vol:
        shape = "[K, C]" if depthwise else "[K, C_in, C_out]"
        raise ValueError(
            f"sparsify.{op}: expected a weight of shape {shape} with K={k_vol} (the kernel map's offsets). "
            f"Got {tuple(weight.shape)}."
        )
    if x.dim() != 2:
        raise ValueError(f"sparsify.{op}: expected {x_name} of shape [N, C]. Got {tuple(x.shape)}.")
    if x.dtype != weight.dtype:
        raise TypeError(f"sparsify.{op}: {x_name} is {x.dtype} but the weight is {weight.dtype}; cast one of them.")
    if x.device != weight.device or in_idx.device != x.device or out_idx.device != x.device:
        raise ValueError(
            f"sparsify.{op}: {x_name} ({x.device}), weight ({weight.device}) and the kernel map "
            f"({in_idx.device}) must be on one device."
        )
    if in_idx.shape != out_idx.shape or in_idx.shape[0] != k_offsets[-1]:
        raise ValueError(
            f"sparsify.{op}: the kernel map has {tuple(in_idx.shape)} input and {tuple(out_idx.shape)} output "
            f"indices, and k_offsets ends at {k_offsets[-1]}; they must agree."
        )


# ------------------------------------------------------------------ convolution
@torch.library.custom_op("sparsify::spatial_conv", mutates_args=())
def spatial_conv(x: Tensor, weight: Tensor, in_idx: Tensor, out_idx: Tensor, k_offsets: list[int],
                 n_out: int, identity_k: int, depthwise: bool) -> Tensor:
    """Sparse convolution ``y[out] += x[in] @ W[k]`` over a kernel map; ``y [n_out, C_out]``."""
    _check_conv("spatial_conv", x, weight, in_idx, out_idx, k_offsets, depthwise)
    if depthwise and weight.shape[1] != x.shape[1]:
        raise ValueError(f"sparsify.spatial_conv: channel-wise weight has {weight.shape[1]} channels; x has {x.shape[1]}.")
    if not depthwise and weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"sparsify.spatial_conv: x has {x.shape[1]} channels but the weight expects {weight.shape[1]} "
            "(in_channels of the layer)."
        )
    y = spatial_executor_for(x.device).conv_forward(
        x.contiguous(), weight.contiguous(), in_idx, out_idx, k_offsets, n_out, identity_k, depthwise)
    return y.contiguous()


@spatial_conv.register_fake
def _(x, weight, in_idx, out_idx, k_offsets, n_out, identity_k, depthwise):
    return x.new_empty(n_out, weight.shape[-1])


@torch.library.custom_op("sparsify::spatial_conv_dgrad", mutates_args=())
def spatial_conv_dgrad(dy: Tensor, weight: Tensor, in_idx: Tensor, out_idx: Tensor, k_offsets: list[int],
                       n_in: int, identity_k: int, depthwise: bool) -> Tensor:
    """Input gradient of ``spatial_conv``: ``dx[in] += dy[out] @ W[k]^T``; ``dx [n_in, C_in]``."""
    _check_conv("spatial_conv_dgrad", dy, weight, in_idx, out_idx, k_offsets, depthwise, "dy")
    dx = spatial_executor_for(dy.device).conv_dgrad(
        dy.contiguous(), weight.contiguous(), in_idx, out_idx, k_offsets, n_in, identity_k, depthwise)
    return dx.contiguous()


@spatial_conv_dgrad.register_fake
def _(dy, weight, in_idx, out_idx, k_offsets, n_in, identity_k, depthwise):
    return dy.new_empty(n_in, weight.shape[-1] if depthwise else weight.shape[1])


@torch.library.custom_op("sparsify::spatial_conv_wgrad", mutates_args=())
def spatial_conv_wgrad(x: Tensor, dy: Tensor, in_idx: Tensor, out_idx: Tensor, k_offsets: list[int],
                       identity_k: int, depthwise: bool) -> Tensor:
    """Weight gradient of ``spatial_conv``: ``dW[k] = x[in_k]^T @ dy[out_k]``."""
    dw = spatial_executor_for(x.device).conv_wgrad(
        x.contiguous(), dy.contiguous(), in_idx, out_idx, k_offsets, identity_k, depthwise)
    return dw.contiguous()


@spatial_conv_wgrad.register_fake
def _(x, dy, in_idx, out_idx, k_offsets, identity_k, depthwise):
    k = len(k_offsets) - 1
    return x.new_empty(k, x.shape[1]) if depthwise else x.new_empty(k, x.shape[1], dy.shape[1])


@torch.library.custom_op("sparsify::spatial_conv_backward", mutates_args=())
def spatial_conv_backward(x: Tensor, dy: Tensor, weight: Tensor, in_idx: Tensor, out_idx: Tensor,
                          k_offsets: list[int], identity_k: int, depthwise: bool) -> tuple[Tensor, Tensor]:
    """``(dx, dW)`` of ``spatial_conv`` in one pass (each offset gathers ``dy`` and ``x`` once)."""
    _check_conv("spatial_conv_backward", dy, weight, in_idx, out_idx, k_offsets, depthwise, "dy")
    ex = spatial_executor_for(dy.device)
    args = (in_idx, out_idx, k_offsets)
    if hasattr(ex, "conv_backward"):
        dx, dw = ex.conv_backward(x.contiguous(), dy.contiguous(), weight.contiguous(), *args, identity_k, depthwise)
    else:
        dx = ex.conv_dgrad(dy.contiguous(), weight.contiguous(), *args, x.shape[0], identity_k, depthwise)
        dw = ex.conv_wgrad(x.contiguous(), dy.contiguous(), *args, identity_k, depthwise)
    return dx.contiguous(), dw.contiguous()


@spatial_conv_backward.register_fake
def _(x, dy, weight, in_idx, out_idx, k_offsets, identity_k, depthwise):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _conv_setup(ctx, inputs, output):
    x, weight, in_idx, out_idx, k_offsets, n_out, identity_k, depthwise = inputs
    ctx.save_for_backward(x, weight, in_idx, out_idx)
    ctx.k_offsets, ctx.identity_k, ctx.depthwise = k_offsets, identity_k, depthwise


def _conv_backward(ctx, dy):
    x, weight, in_idx, out_idx = ctx.saved_tensors
    dy = dy.contiguous()
    dx = dw = None
    if ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:
        dx, dw = torch.ops.sparsify.spatial_conv_backward(x, dy, weight, in_idx, out_idx, ctx.k_offsets,
                                                          ctx.identity_k, ctx.depthwise)
        return dx, dw, None, None, None, None, None, None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.sparsify.spatial_conv_dgrad(dy, weight, in_idx, out_idx, ctx.k_offsets, x.shape[0],
                                                   ctx.identity_k, ctx.depthwise)
    if ctx.needs_input_grad[1]:
        dw = torch.ops.sparsify.spatial_conv_wgrad(x, dy, in_idx, out_idx, ctx.k_offsets, ctx.identity_k,
                                                   ctx.depthwise)
    return dx, dw, None, None, None, None, None, None


spatial_conv.register_autograd(_conv_backward, setup_context=_conv_setup)


# ------------------------------------------------------------------ pooling
@torch.library.custom_op("sparsify::spatial_pool", mutates_args=())
def spatial_pool(x: Tensor, in_idx: Tensor, out_idx: Tensor, n_out: int, mode: str) -> tuple[Tensor, Tensor]:
    """Pool ``x`` over the pairs of a kernel map: ``(y [n_out, C], aux)``; ``mode`` is sum | avg | max."""
    if mode not in POOL_MODES:
        raise ValueError(f"sparsify.spatial_pool: unknown mode {mode!r}; expected one of {POOL_MODES}.")
    if x.dim() != 2:
        raise ValueError(f"sparsify.spatial_pool: expected x of shape [N, C]. Got {tuple(x.shape)}.")
    y, aux = spatial_executor_for(x.device).pool_forward(x.contiguous(), in_idx, out_idx, n_out, mode)
    return y.contiguous(), aux.contiguous()


@spatial_pool.register_fake
def _(x, in_idx, out_idx, n_out, mode):
    aux = x.new_empty(n_out, x.shape[1], dtype=torch.int64) if mode == "max" else x.new_empty(n_out, dtype=torch.int64)
    return x.new_empty(n_out, x.shape[1]), aux


@torch.library.custom_op("sparsify::spatial_pool_backward", mutates_args=())
def spatial_pool_backward(dy: Tensor, aux: Tensor, in_idx: Tensor, out_idx: Tensor, n_in: int, mode: str) -> Tensor:
    """Input gradient of ``spatial_pool``."""
    return spatial_executor_for(dy.device).pool_backward(dy.contiguous(), aux, in_idx, out_idx, n_in, mode).contiguous()


@spatial_pool_backward.register_fake
def _(dy, aux, in_idx, out_idx, n_in, mode):
    return dy.new_empty(n_in, dy.shape[1])


def _pool_setup(ctx, inputs, output):
    x, in_idx, out_idx, n_out, mode = inputs
    ctx.save_for_backward(output[1], in_idx, out_idx)
    ctx.n_in, ctx.mode = x.shape[0], mode
    ctx.mark_non_differentiable(output[1])


def _pool_backward(ctx, dy, _daux):
    aux, in_idx, out_idx = ctx.saved_tensors
    dx = torch.ops.sparsify.spatial_pool_backward(dy.contiguous(), aux, in_idx, out_idx, ctx.n_in, ctx.mode)
    return dx, None, None, None, None


spatial_pool.register_autograd(_pool_backward, setup_context=_pool_setup)
