"""``BlockSparseConv2d`` and ``BlockSparseConv1d``: convolutions whose channel blocks are sparse.

The weight ``[out, in, kh, kw]`` is sparse over ``(out, in)`` blocks of
``block_size`` channels and dense over the kernel taps (OpenAI's block-sparse
convolutions for PixelCNN: channels sparse, spatial connectivity untouched):
``values [nnz, b, b, kh, kw]`` with the pattern of the ``(out, in)`` channel
matrix.  Every ``nn.Conv2d`` setting that ``groups=1`` allows is kept: stride,
``padding`` as ints, a tuple, ``'valid'`` or ``'same'`` (asymmetric when the
total is odd, as torch pads it), dilation, ``padding_mode`` (zeros, reflect,
replicate, circular) and bias.  ``groups != 1`` is refused (a grouped conv is
already block-diagonal: a block-sparse layout of its own).

The forward, dX and dW run as ``torch.ops.sparsify.bsconv2d*`` (see
``sparsify.runtime.ops_conv``); a 1-D convolution is the 2-D op with height 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair, _single

from ..runtime import (
    ACTIVATIONS,
    BlockSparseLayout,
    ops_conv,  # noqa: F401  (registers torch.ops.sparsify.bsconv2d*)
)
from ..runtime.executors.cpu_conv import dense_conv_weight
from ..runtime.ops import functorch_active
from ..runtime.ops_conv import bsconv2d_composite
from .block_sparse import activation_module
from .sparse_weight import BlockSparseParams, autocast_operands, init_block_sparse_
from .weight_view import ConvLike

__all__ = ["BlockSparseConv1d", "BlockSparseConv2d", "channel_block_norms"]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def channel_block_norms(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in]``: the L2 norm of each (out, in) channel pair over all taps, so a block's
    L2 norm on this matrix is the L2 norm of the whole ``b x b x taps`` block.

    Example:
        >>> channel_block_norms(torch.ones(2, 3, 3, 3)).tolist()[0]
        [3.0, 3.0, 3.0]
    """
    return weight.detach().flatten(2).pow(2).sum(-1).sqrt()


class _BlockSparseConvNd(ConvLike, BlockSparseParams, nn.Module):
    """The shared body: settings, padding, pattern, init, conversions.  ``weight`` is the dense
    kernel as a view (``sparsify.modules.weight_view.ConvLike``): model code that reads it keeps working."""

    _nd: int

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        layout: BlockSparseLayout,
        *,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        activation: str = "none",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        tup = _pair if self._nd == 2 else _single
        if groups != 1:
            raise ValueError(
                f"{name}: groups={groups} is not supported: a block-sparse conv has groups=1 (a grouped conv is "
                "already block-diagonal; leave it dense or convert its groups separately).")
        if layout.shape != (out_channels, in_channels):
            raise ValueError(f"{name}: expected a layout of shape ({out_channels}, {in_channels}) (out, in channels). "
                             f"Got {layout.shape}.")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"{name}: padding_mode must be one of {_PADDING_MODES}. Got {padding_mode!r}.")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{name}: unknown activation {activation!r}; expected one of {ACTIVATIONS}.")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tup(kernel_size)
        self.stride = tup(stride)
        self.dilation = tup(dilation)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"{name}: padding must be an int, a tuple, 'valid' or 'same'. Got {padding!r}.")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError(f"{name}: padding='same' is not supported for strided convolutions (as in nn.Conv2d).")
            self.padding = padding
        else:
            self.padding = tup(padding)
        for what, v in (("kernel_size", self.kernel_size), ("stride", self.stride), ("dilation", self.dilation)):
            if any(int(e) < 1 for e in v):
                raise ValueError(f"{name}: {what} must be positive. Got {v}.")
        if not isinstance(self.padding, str) and any(int(e) < 0 for e in self.padding):
            raise ValueError(f"{name}: padding must be non-negative. Got {self.padding}.")
        self.groups = 1
        self.padding_mode = padding_mode
        self.activation = activation
        self.block_size = layout.block_size
        self._sparse_shape = (out_channels, in_channels)
        self._taps = tuple(self.kernel_size)
        self.values = self._new_values(layout.nnz, device, dtype)
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self._set_layout(layout, device=device)
        self._pads = self._compute_pads()
        self.reset_parameters()

    # --------------------------------------------------------------- padding
    def _compute_pads(self) -> tuple[tuple[int, int], ...]:
        """``((before, after), ...)`` per spatial dim, as nn.ConvNd pads."""
        if self.padding == "valid":
            return tuple((0, 0) for _ in self.kernel_size)
        if self.padding == "same":
            out = []
            for k, d in zip(self.kernel_size, self.dilation):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))
            return tuple(out)
        return tuple((p, p) for p in self.padding)

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Apply what the op's symmetric zero padding cannot express; return the op's padding (2-D)."""
        pads = self._pads
        if self.padding_mode != "zeros":
            flat = [p for pair in reversed(pads) for p in pair]  # F.pad order: last dim first
            if any(flat):
                x = F.pad(x, flat, mode=self.padding_mode)
            sym = [0] * len(pads)
        else:
            extra = [(0, a - b) for b, a in reversed(pads)]  # after - before (>= 0)
            flat = [p for pair in extra for p in pair]
            if any(flat):
                x = F.pad(x, flat)
            sym = [b for b, _ in pads]
        if self._nd == 1:
            return x.unsqueeze(2), [0, sym[0]]
        return x, sym

    # ----------------------------------------------------------------- init
    def reset_parameters(self) -> None:
        """nn.ConvNd's default (``U(-1/sqrt(F), 1/sqrt(F))``, ``F = in * taps``), variance scaled to
        each output's kept fan-in (``sparsify.modules.sparse_weight``)."""
        full = self.in_channels
        init_block_sparse_(self.values, self.layout, dense_bound=1.0 / math.sqrt(full * self.taps),
                           full_fan_in=full, taps=self.taps, bias=self.bias)

    # ------------------------------------------------------------ conversion
    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv1d | nn.Conv2d,
        *,
        density: float | None = None,
        block_size: int = 32,
        layout: BlockSparseLayout | None = None,
        activation: str = "none",
    ):
        """Keep the channel blocks of ``conv.weight`` with the largest L2 norm over all taps (or those of ``layout``)."""
        from ..patterns import magnitude_layout

        want = nn.Conv2d if cls._nd == 2 else nn.Conv1d
        if not isinstance(conv, want):
            raise TypeError(f"{cls.__name__}.from_dense: expected an {want.__name__}. Got {type(conv).__name__}.")
        if conv.groups != 1:
            raise ValueError(f"{cls.__name__}.from_dense: groups={conv.groups} is not supported (only groups=1).")
        weight = conv.weight.detach()
        if layout is None:
            if density is None:
                raise ValueError(f"{cls.__name__}.from_dense: give density= or layout=.")
            layout = magnitude_layout(channel_block_norms(weight), density=density, block_size=block_size)
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, layout, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, activation=activation, device=weight.device, dtype=weight.dtype)
        layer.load_dense_weight_(weight, None if conv.bias is None else conv.bias.detach())
        return layer

    @torch.no_grad()
    def load_dense_weight_(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Copy the stored blocks of a dense ``[out, in, *kernel]`` weight (and the bias) into this layer."""
        expect = (self.out_channels, self.in_channels, *self.kernel_size)
        if tuple(weight.shape) != expect:
            raise ValueError(f"{type(self).__name__}: expected a weight of shape {expect}. Got {tuple(weight.shape)}.")
        lay = self.layout
        b = self.block_size
        nbr, nbc = lay.n_block_rows, lay.n_block_cols
        pad = [0, 0] * self._nd + [0, nbc * b - self.in_channels, 0, nbr * b - self.out_channels]
        w = F.pad(weight, pad).reshape(nbr, b, nbc, b, *self.kernel_size).transpose(1, 2)
        self.values.copy_(w[lay.row_indices.long(), lay.col_indices.long()])
        if bias is not None:
            self.bias.copy_(bias)

    def to_dense(self) -> torch.Tensor:
        """The exact dense weight ``[out, in, *kernel]`` (zeros outside the stored blocks); differentiable."""
        lay = self.layout
        v = self.values if self._nd == 2 else self.values.unsqueeze(3)
        w = dense_conv_weight(v, self.row_indices, self.col_indices, lay.n_block_rows, lay.n_block_cols,
                              self.out_channels, self.in_channels)
        return w if self._nd == 2 else w.squeeze(2)

    def to_dense_module(self) -> nn.Module:
        """A plain ``nn.Conv1d`` / ``nn.Conv2d`` with every setting and the masked weight
        (followed by the activation if one is fused)."""
        cls = nn.Conv2d if self._nd == 2 else nn.Conv1d
        conv = cls(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
                   dilation=self.dilation, bias=self.bias is not None, padding_mode=self.padding_mode,
                   device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.to_dense())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        if self.activation == "none":
            return conv
        return nn.Sequential(conv, activation_module(self.activation))

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """FLOPs over the stored blocks only, for an input of ``input_shape`` (batched or not)."""
        spatial = input_shape[-self._nd:]
        batch = math.prod(input_shape[:-self._nd - 1])
        out = 1
        for size, k, s, d, (pb, pa) in zip(spatial, self.kernel_size, self.stride, self.dilation, self._pads):
            out *= (size + pb + pa - d * (k - 1) - 1) // s + 1
        return 2 * batch * out * self.values.numel()

    # --------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        unbatched = x.dim() == self._nd + 1
        if unbatched:
            x = x.unsqueeze(0)
            residual = None if residual is None else residual.unsqueeze(0)
        if x.dim() != self._nd + 2:
            raise ValueError(f"{type(self).__name__}: expected a {self._nd + 1}-D (unbatched) or {self._nd + 2}-D "
                             f"(batched) input. Got shape {tuple(x.shape)}.")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: expected {self.in_channels} input channels. "
                             f"Got input of shape {tuple(x.shape)}.")
        x, values, bias, residual = autocast_operands(x, self.values, self.bias, residual)
        x4, pad = self._prepare(x)
        values = values if self._nd == 2 else values.unsqueeze(3)
        stride = list(self.stride) if self._nd == 2 else [1, self.stride[0]]
        dilation = list(self.dilation) if self._nd == 2 else [1, self.dilation[0]]
        res4 = None if residual is None else (residual if self._nd == 2 else residual.unsqueeze(2))
        if functorch_active():  # torch.func.grad / vmap / jacrev: the op cannot run under them (runtime.ops)
            y = bsconv2d_composite(x4, values, self._meta(), bias, res4, self.out_channels, stride, pad, dilation,
                                   self.activation)
        else:
            y = torch.ops.sparsify.bsconv2d(x4, values, *self._meta(), bias, res4, self.out_channels, stride, pad,
                                            dilation, self.activation)
        if self._nd == 1:
            y = y.squeeze(2)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"{self._pattern_repr()}")
        if self.padding not in ((0,) * self._nd, "valid"):
            s += f", padding={self.padding!r}"
        if self.dilation != (1,) * self._nd:
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.activation != "none":
            s += f", activation={self.activation!r}"
        return s


class BlockSparseConv2d(_BlockSparseConvNd):
    """``nn.Conv2d`` with a weight that is block-sparse over (out, in) channel blocks, dense over the taps.

    Example:
        >>> from sparsify.patterns import small_world_layout
        >>> layout = small_world_layout((64, 32), block_size=16, density=0.5, seed=0)
        >>> conv = BlockSparseConv2d(32, 64, 3, layout, padding="same")
        >>> conv(torch.randn(2, 32, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
        >>> dense = conv.to_dense_module()
        >>> torch.allclose(dense(torch.ones(1, 32, 8, 8)), conv(torch.ones(1, 32, 8, 8)), atol=1e-5)
        True
    """

    _nd = 2


class BlockSparseConv1d(_BlockSparseConvNd):
    """``nn.Conv1d`` with a weight that is block-sparse over (out, in) channel blocks, dense over the taps.

    Example:
        >>> conv = BlockSparseConv1d.from_dense(torch.nn.Conv1d(32, 32, 5, padding=2), density=0.5, block_size=16)
        >>> conv(torch.randn(4, 32, 20)).shape, conv.values.shape
        (torch.Size([4, 32, 20]), torch.Size([2, 16, 16, 5]))
    """

    _nd = 1
