"""Factorized Conv1d / Conv2d layers: Tucker-2 (Kim et al. 2016), CP (Lebedev et al. 2015)
and TT (Garipov et al. 2016).

    TuckerConv  1x1 conv to R_in -> k x k core conv (the layer's stride, padding,
                dilation and padding_mode) -> 1x1 conv to out, with the bias
    CPConv      1x1 conv to R -> depthwise k_h x 1 -> depthwise 1 x k_w -> 1x1 conv
                to out, with the bias; stride, padding and dilation split per
                axis, so asymmetric settings survive
    TTConv      tensor train of the kernel with modes (in, k_h, k_w, out): 1x1 conv
                to r_1 -> k_h x 1 conv r_1 -> r_2 -> 1 x k_w conv r_2 -> r_3 -> 1x1
                conv to out, with the bias; per-axis settings as CPConv

Every conv setting is kept exactly:

* ``groups``: each group is factorized on its own, as grouped 1x1 / core convs
  (a ``groups=g`` layer gives ``groups=g`` factor convs; CP's depthwise stages
  have ``g * R`` groups; TT's stages ``g``), so ``to_dense()`` is block-diagonal like the weight.
* ``padding='same'`` (and 'valid', ints, tuples) becomes explicit per-axis
  (left, right) padding, as torch computes it (left = total // 2).
* ``padding_mode`` 'reflect' / 'replicate' / 'circular' pads with ``F.pad`` in
  that mode before the spatial stage(s).  This is exact: the 1x1 stage before
  commutes with padding (padding copies or zero-fills whole pixels, and that
  stage has no bias), and for CP, padding the W axis after the k_h x 1 stage
  equals padding it before, because that stage acts on each column alone (so
  does TT's k_h x 1 stage, which mixes channels but not columns).

The forward is plain ``F.conv1d`` / ``F.conv2d`` / ``F.pad`` calls, so it
traces with torch.fx.  With ``forward="reconstructed"`` the module rebuilds the
weight (``to_dense()``) and runs one conv with the layer's settings instead; in
eval mode with grad off the rebuilt weight is cached on the module
(:class:`~sparsify.modules.factorized_linear.ReconstructedWeightCache`: call
``clear_weight_cache()`` after writes through ``.data``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import decompose
from .. import ranks as rank_sel
from .factorized_linear import FORWARDS, ReconstructedWeightCache
from .weight_view import ConvLike

__all__ = ["TuckerConv", "CPConv", "TTConv", "conv_padding", "tt_conv_tensor", "tt_conv_weight"]

_CONV = {1: F.conv1d, 2: F.conv2d}
_SPATIAL = "xy"


def conv_padding(layer: nn.Module) -> tuple[tuple[int, int], ...]:
    """Per spatial axis ``(left, right)`` padding of a ConvNd, as torch applies it.

    Example:
        >>> conv_padding(torch.nn.Conv2d(1, 1, (4, 3), padding="same", dilation=(1, 2)))
        ((1, 2), (2, 2))
    """
    k, d = layer.kernel_size, layer.dilation
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return tuple((0, 0) for _ in k)
        out = []
        for kk, dd in zip(k, d):
            total = dd * (kk - 1)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    return tuple((p, p) for p in layer.padding)


class _FactorizedConv(ConvLike, ReconstructedWeightCache, nn.Module):
    """Settings shared by the factorized convs and the padded spatial conv they run."""

    method_name = "?"

    def _setup(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
               bias, forward, device, dtype) -> None:
        if forward not in FORWARDS:
            raise ValueError(f"{type(self).__name__}: expected forward= one of {FORWARDS}; got {forward!r}")
        self.dim = len(kernel_size)
        if self.dim not in _CONV:
            raise ValueError(f"{type(self).__name__}: only Conv1d and Conv2d; got a {self.dim}-d kernel")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{type(self).__name__}: groups={groups} must divide in_channels={in_channels} "
                             f"and out_channels={out_channels}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"{type(self).__name__}: unknown padding_mode {padding_mode!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride, self.dilation = tuple(stride), tuple(dilation)
        self.padding = tuple((int(a), int(b)) for a, b in padding)
        self.groups, self.padding_mode = groups, padding_mode
        self.forward_mode = forward
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias else None
        self.relative_error: float | None = None

    def _pointwise(self, channels_out: int, channels_in_per_group: int, device, dtype) -> nn.Parameter:
        return nn.Parameter(torch.randn(channels_out, channels_in_per_group, *([1] * self.dim), device=device,
                                        dtype=dtype) / math.sqrt(channels_in_per_group))

    def _padded_conv(self, x: torch.Tensor, weight: torch.Tensor, groups: int, axes: Sequence[int],
                     bias: torch.Tensor | None = None) -> torch.Tensor:
        """Conv with the layer's padding / stride / dilation on ``axes`` only (identity on the others)."""
        pads = [self.padding[a] if a in axes else (0, 0) for a in range(self.dim)]
        stride = tuple(self.stride[a] if a in axes else 1 for a in range(self.dim))
        dilation = tuple(self.dilation[a] if a in axes else 1 for a in range(self.dim))
        conv = _CONV[self.dim]
        if self.padding_mode == "zeros" and all(a == b for a, b in pads):
            return conv(x, weight, bias, stride, tuple(a for a, _ in pads), dilation, groups)
        flat: list[int] = []
        for a, b in reversed(pads):  # F.pad takes the last axis first
            flat += [a, b]
        if any(flat):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, flat, mode=mode)
        return conv(x, weight, bias, stride, 0, dilation, groups)

    def to_dense_module(self) -> nn.Module:
        """An ``nn.Conv1d`` / ``nn.Conv2d`` with this module's settings and ``to_dense()`` weight."""
        w = self.to_dense()
        cls = nn.Conv1d if self.dim == 1 else nn.Conv2d
        sym = all(a == b for a, b in self.padding)
        if sym:
            padding: int | tuple | str = tuple(a for a, _ in self.padding)
        elif all(s == 1 for s in self.stride):
            padding = "same"  # the only way torch pads asymmetrically; _setup got it from 'same'
        else:
            raise ValueError(f"{type(self).__name__}: asymmetric padding {self.padding} with stride "
                             f"{self.stride} has no nn.Conv equivalent")
        conv = cls(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=padding,
                   dilation=self.dilation, groups=self.groups, bias=self.bias is not None,
                   padding_mode=self.padding_mode, device=w.device, dtype=w.dtype)
        if padding == "same" and conv_padding(conv) != self.padding:
            raise ValueError(f"{type(self).__name__}: padding {self.padding} has no nn.Conv equivalent")
        with torch.no_grad():
            conv.weight.copy_(w)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def _out_spatial(self, spatial: Sequence[int], axes: Sequence[int]) -> list[int]:
        out = list(spatial)
        for a in axes:
            total = spatial[a] + sum(self.padding[a])
            out[a] = (total - self.dilation[a] * (self.kernel_size[a] - 1) - 1) // self.stride[a] + 1
        return out

    def dense_flops(self, input_shape: Sequence[int]) -> int:
        batch, spatial = math.prod(input_shape[:-self.dim - 1]), input_shape[-self.dim:]
        out = math.prod(self._out_spatial(spatial, range(self.dim)))
        per_out = self.in_channels // self.groups * math.prod(self.kernel_size)
        return 2 * batch * out * self.out_channels * per_out + (batch * out * self.out_channels if self.bias is not None else 0)

    def dense_stages(self, input_shape: Sequence[int]) -> list[tuple[int, int]]:
        """The one stage of the dense conv: its FLOPs; input, weight and output elements."""
        batch, spatial = math.prod(input_shape[:-self.dim - 1]), input_shape[-self.dim:]
        s_out = math.prod(self._out_spatial(spatial, range(self.dim)))
        k = math.prod(self.kernel_size)
        elems = (batch * self.in_channels * math.prod(spatial) + self.out_channels * self.in_channels // self.groups * k
                 + batch * self.out_channels * s_out)
        return [(self.dense_flops(input_shape), elems)]

    def factorized_flops(self, input_shape: Sequence[int]) -> int:
        return sum(f for f, _ in self.factorized_stages(input_shape))

    def flops(self, input_shape: Sequence[int]) -> int:
        """FLOPs of an inference call of the forward this module runs (``forward_mode``) on
        ``input_shape``; reconstructed: the dense conv's (the rebuilt weight is cached)."""
        if self.forward_mode == "reconstructed":
            return self.dense_flops(input_shape)
        return self.factorized_flops(input_shape)

    def reconstructed_flops(self, input_shape: Sequence[int]) -> int:
        """Per call with grad on (training): the rebuild and the dense conv."""
        return self.dense_flops(input_shape) + self.reconstruction_flops()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.forward_mode == "reconstructed":
            return self._padded_conv(x, self._reconstructed_weight(x), self.groups, range(self.dim), self.bias)
        return self._factorized(x)

    def _settings_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"padding_mode={self.padding_mode!r}, bias={self.bias is not None}, forward={self.forward_mode!r}")

    @staticmethod
    def _settings_of(layer: nn.Module) -> dict:
        if not isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            raise TypeError(f"expected an nn.Conv1d or nn.Conv2d; got {type(layer).__name__}")
        return dict(kernel_size=layer.kernel_size, stride=layer.stride, padding=conv_padding(layer),
                    dilation=layer.dilation, groups=layer.groups, padding_mode=layer.padding_mode,
                    bias=layer.bias is not None)

    @staticmethod
    def _groups_of(layer: nn.Module) -> list[torch.Tensor]:
        w = layer.weight.detach().to(torch.float64)
        return list(w.chunk(layer.groups, dim=0))

    def _finish(self, layer: nn.Module):
        w64 = layer.weight.detach().to(torch.float64)
        with torch.no_grad():
            if layer.bias is not None:
                self.bias.copy_(layer.bias.detach().to(torch.float64))
            err = torch.linalg.norm(self.to_dense() - w64) / torch.linalg.norm(w64).clamp_min(1e-300)
        self.relative_error = float(err)
        return self.to(layer.weight.dtype)


class TuckerConv(_FactorizedConv):
    """Tucker-2 conv: ``ranks = (R_out, R_in)`` per group.

    Parameters: ``first_weight [g R_in, in/g, 1..]``, ``core_weight [g R_out, R_in, k..]``,
    ``last_weight [out, R_out, 1..]``, ``bias``.

    Example:
        >>> conv = torch.nn.Conv2d(16, 32, 3, stride=(2, 1), padding=1, padding_mode="reflect")
        >>> layer = TuckerConv.from_dense(conv, rank=(8, 4))
        >>> layer.ranks, layer(torch.randn(2, 16, 9, 9)).shape == conv(torch.randn(2, 16, 9, 9)).shape
        ((8, 4), True)
    """

    method_name = "tucker"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int], ranks: Sequence[int], *,
                 stride: Sequence[int], padding: Sequence[tuple[int, int]], dilation: Sequence[int], groups: int = 1,
                 padding_mode: str = "zeros", bias: bool = True, forward: str = "factorized",
                 device=None, dtype=None) -> None:
        super().__init__()
        self._setup(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                    bias, forward, device, dtype)
        r_out, r_in = (int(r) for r in ranks)
        cin, cout = in_channels // groups, out_channels // groups
        if not (1 <= r_out <= cout and 1 <= r_in <= cin):
            raise ValueError(f"TuckerConv: ranks (R_out, R_in) must be within [1, {cout}] x [1, {cin}] "
                             f"(channels per group); got {tuple(ranks)}")
        self.ranks = (r_out, r_in)
        self.first_weight = self._pointwise(groups * r_in, cin, device, dtype)
        self.core_weight = nn.Parameter(torch.randn(groups * r_out, r_in, *self.kernel_size, device=device,
                                                    dtype=dtype) / math.sqrt(r_in * math.prod(self.kernel_size)))
        self.last_weight = self._pointwise(out_channels, r_out, device, dtype)

    def _factorized(self, x: torch.Tensor) -> torch.Tensor:
        conv = _CONV[self.dim]
        h = conv(x, self.first_weight, None, 1, 0, 1, self.groups)
        h = self._padded_conv(h, self.core_weight, self.groups, range(self.dim))
        return conv(h, self.last_weight, self.bias, 1, 0, 1, self.groups)

    def to_dense(self) -> torch.Tensor:
        """The exact weight ``[out, in/g, k..]`` the factors represent; differentiable."""
        g, (r_out, r_in) = self.groups, self.ranks
        sp = _SPATIAL[: self.dim]
        u = self.last_weight.reshape(g, self.out_channels // g, r_out)
        core = self.core_weight.reshape(g, r_out, r_in, *self.kernel_size)
        v = self.first_weight.reshape(g, r_in, self.in_channels // g)
        h = torch.einsum(f"grs{sp},gsi->gri{sp}", core, v)
        w = torch.einsum(f"gor,gri{sp}->goi{sp}", u, h)
        return w.reshape(self.out_channels, self.in_channels // g, *self.kernel_size)

    def factorized_stages(self, input_shape: Sequence[int]) -> list[tuple[int, int]]:
        """``(FLOPs, input + weight + output elements)`` of the 1x1, core and 1x1 convs."""
        batch, spatial = math.prod(input_shape[:-self.dim - 1]), input_shape[-self.dim:]
        r_out, r_in = self.ranks
        g, cin, cout = self.groups, self.in_channels, self.out_channels
        s_in, s_out = math.prod(spatial), math.prod(self._out_spatial(spatial, range(self.dim)))
        k = math.prod(self.kernel_size)
        bias = batch * s_out * cout if self.bias is not None else 0
        return [(2 * batch * s_in * cin * r_in, batch * s_in * (cin + g * r_in) + r_in * cin),
                (2 * batch * s_out * g * r_out * r_in * k, batch * (s_in * g * r_in + s_out * g * r_out) + g * r_out * r_in * k),
                (2 * batch * s_out * cout * r_out + bias, batch * s_out * (g * r_out + cout) + cout * r_out)]

    def reconstruction_flops(self) -> int:
        r_out, r_in = self.ranks
        k, cin = math.prod(self.kernel_size), self.in_channels // self.groups
        return 2 * self.groups * r_out * r_in * k * cin + 2 * self.out_channels * r_out * cin * k

    @classmethod
    def from_dense(cls, layer: nn.Module, rank=0.25, *, tolerance: float | None = None,
                   energy: float | None = None, rank_multiple: int = 1, forward: str = "factorized",
                   n_iter_max: int = 20) -> TuckerConv:
        """Tucker-2 (HOSVD + HOOI on the output- and input-channel modes) of each group's
        kernel; ``rank`` as in :func:`sparsify.ranks.tucker_ranks` on modes (0, 1)."""
        settings = cls._settings_of(layer)
        groups = cls._groups_of(layer)
        rs = rank_sel.tucker_ranks(groups, (0, 1), rank, tolerance=tolerance, energy=energy,
                                   rank_multiple=rank_multiple)
        new = cls(layer.in_channels, layer.out_channels, settings.pop("kernel_size"), rs, **settings,
                  forward=forward, dtype=torch.float64)
        firsts, cores, lasts = [], [], []
        for wg in groups:
            core, (u, v) = decompose.tucker(wg, rs, (0, 1), n_iter_max=n_iter_max)
            lasts.append(u)
            cores.append(core)
            firsts.append(v.T)
        with torch.no_grad():
            new.last_weight.copy_(torch.cat(lasts).reshape(new.last_weight.shape))
            new.core_weight.copy_(torch.cat(cores).reshape(new.core_weight.shape))
            new.first_weight.copy_(torch.cat(firsts).reshape(new.first_weight.shape))
        return new._finish(layer)

    def extra_repr(self) -> str:
        return self._settings_repr() + f", ranks={self.ranks}"


class CPConv(_FactorizedConv):
    """CP conv (Lebedev et al. 2015): rank ``R`` per group, one depthwise stage per spatial axis.

    Parameters: ``weights [g R]`` (the CP weights), ``first_weight [g R, in/g, 1..]``,
    ``spatial_weights[a] [g R, 1, (k_a on axis a, 1 elsewhere)]``, ``last_weight [out, R, 1..]``, ``bias``.

    Example:
        >>> conv = torch.nn.Conv2d(8, 8, 3, stride=(1, 2), padding=(0, 1))
        >>> layer = CPConv.from_dense(conv, rank=6)
        >>> layer(torch.randn(1, 8, 7, 7)).shape
        torch.Size([1, 8, 5, 4])
    """

    method_name = "cp"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int], rank: int, *,
                 stride: Sequence[int], padding: Sequence[tuple[int, int]], dilation: Sequence[int], groups: int = 1,
                 padding_mode: str = "zeros", bias: bool = True, forward: str = "factorized",
                 device=None, dtype=None) -> None:
        super().__init__()
        self._setup(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                    bias, forward, device, dtype)
        if rank < 1:
            raise ValueError(f"CPConv: expected rank >= 1; got {rank}")
        self.rank = int(rank)
        gr = groups * self.rank
        self.weights = nn.Parameter(torch.ones(gr, device=device, dtype=dtype))
        self.first_weight = self._pointwise(gr, in_channels // groups, device, dtype)
        shapes = [[gr, 1] + [k if b == a else 1 for b, k in enumerate(self.kernel_size)] for a in range(self.dim)]
        self.spatial_weights = nn.ParameterList(
            [nn.Parameter(torch.randn(*s, device=device, dtype=dtype) / math.sqrt(self.kernel_size[a]))
             for a, s in enumerate(shapes)])
        self.last_weight = self._pointwise(out_channels, self.rank, device, dtype)

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.rank,)

    def _factorized(self, x: torch.Tensor) -> torch.Tensor:
        conv = _CONV[self.dim]
        gr = self.groups * self.rank
        h = conv(x, self.first_weight, None, 1, 0, 1, self.groups)
        for a, sw in enumerate(self.spatial_weights):
            if a == 0:
                sw = sw * self.weights.view(-1, *([1] * (self.dim + 1)))
            h = self._padded_conv(h, sw, gr, (a,))
        return conv(h, self.last_weight, self.bias, 1, 0, 1, self.groups)

    def to_dense(self) -> torch.Tensor:
        """The exact weight ``[out, in/g, k..]`` the factors represent; differentiable."""
        g, r = self.groups, self.rank
        sp = _SPATIAL[: self.dim]
        a = self.last_weight.reshape(g, self.out_channels // g, r) * self.weights.reshape(g, 1, r)
        b = self.first_weight.reshape(g, r, self.in_channels // g)
        cs = [sw.reshape(g, r, k) for sw, k in zip(self.spatial_weights, self.kernel_size)]
        spatial = cs[0] if self.dim == 1 else torch.einsum("grx,gry->grxy", cs[0], cs[1])
        h = torch.einsum(f"gri,gr{sp}->gri{sp}", b, spatial)
        w = torch.einsum(f"gor,gri{sp}->goi{sp}", a, h)
        return w.reshape(self.out_channels, self.in_channels // g, *self.kernel_size)

    def factorized_stages(self, input_shape: Sequence[int]) -> list[tuple[int, int]]:
        """``(FLOPs, input + weight + output elements)`` of the 1x1, depthwise and 1x1 convs."""
        batch, spatial = math.prod(input_shape[:-self.dim - 1]), list(input_shape[-self.dim:])
        gr, cin, cout = self.groups * self.rank, self.in_channels, self.out_channels
        s = math.prod(spatial)
        out = [(2 * batch * s * cin * self.rank, batch * s * (cin + gr) + gr * cin // self.groups)]
        for a in range(self.dim):
            spatial = self._out_spatial(spatial, (a,))
            s_prev, s = s, math.prod(spatial)
            out.append((2 * batch * s * gr * self.kernel_size[a], batch * gr * (s_prev + s) + gr * self.kernel_size[a]))
        bias = batch * s * cout if self.bias is not None else 0
        out.append((2 * batch * s * cout * self.rank + bias, batch * s * (gr + cout) + cout * self.rank))
        return out

    def reconstruction_flops(self) -> int:
        k, cin = math.prod(self.kernel_size), self.in_channels // self.groups
        gr = self.groups * self.rank
        return 2 * gr * k + 2 * gr * cin * k + 2 * self.out_channels * self.rank * cin * k

    @classmethod
    def from_dense(cls, layer: nn.Module, rank=0.25, *, tolerance: float | None = None,
                   energy: float | None = None, rank_multiple: int = 1, forward: str = "factorized",
                   n_iter_max: int = 50) -> CPConv:
        """CP (ALS, tensorly ``parafac``) of each group's kernel ``[out/g, in/g, k..]``;
        ``rank`` as in :func:`sparsify.ranks.cp_rank`."""
        settings = cls._settings_of(layer)
        groups = cls._groups_of(layer)
        r = rank_sel.cp_rank(groups, rank, tolerance=tolerance, energy=energy, rank_multiple=rank_multiple)
        new = cls(layer.in_channels, layer.out_channels, settings.pop("kernel_size"), r, **settings,
                  forward=forward, dtype=torch.float64)
        lam, firsts, lasts, spat = [], [], [], [[] for _ in range(new.dim)]
        for wg in groups:
            weights, (fo, fi, *fk) = decompose.cp(wg, r, n_iter_max=n_iter_max)
            lam.append(weights)
            lasts.append(fo)
            firsts.append(fi.T)
            for a, f in enumerate(fk):
                spat[a].append(f.T)
        with torch.no_grad():
            new.weights.copy_(torch.cat(lam))
            new.last_weight.copy_(torch.cat(lasts).reshape(new.last_weight.shape))
            new.first_weight.copy_(torch.cat(firsts).reshape(new.first_weight.shape))
            for a, p in enumerate(new.spatial_weights):
                p.copy_(torch.cat(spat[a]).reshape(p.shape))
        return new._finish(layer)

    def extra_repr(self) -> str:
        return self._settings_repr() + f", rank={self.rank}"


def tt_conv_tensor(weight: torch.Tensor) -> torch.Tensor:
    """A conv kernel ``[out, in, k..]`` as the TT-matrix tensor ``(in, k.., out, 1..)`` whose
    TT (one-column cores) :func:`sparsify.decompose.tt_matrix` and :func:`sparsify.ranks.tt_ranks`
    work on: the modes of a plain tensor train of the kernel, ordered (in, k.., out).

    Example:
        >>> tuple(tt_conv_tensor(torch.zeros(8, 4, 3, 2)).shape)
        (4, 3, 2, 8, 1, 1, 1, 1)
    """
    t = weight.movedim(0, -1)
    return t.reshape(*t.shape, *([1] * t.dim()))


def tt_conv_weight(tensor: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`tt_conv_tensor`."""
    d = tensor.dim() // 2
    return tensor.reshape(tensor.shape[:d]).movedim(-1, 0)


class TTConv(_FactorizedConv):
    """TT conv (Garipov et al. 2016): bond ranks ``(1, r_1, .., r_{D+1}, 1)`` per group, one
    full (channel-mixing) conv stage per spatial axis.

    The cores of each group's kernel, modes (in/g, k_1.., out/g), are the stage weights:
    ``first_weight [g r_1, in/g, 1..]``, ``spatial_weights[a] [g r_{a+2}, r_{a+1}, (k_a on
    axis a, 1 elsewhere)]``, ``last_weight [out, r_{D+1}, 1..]``, and ``bias``.  ``ranks`` are
    as produced (TT-SVD can give smaller ranks than asked).

    Example:
        >>> conv = torch.nn.Conv2d(8, 16, 3, stride=(2, 1), padding=(1, 0))
        >>> layer = TTConv.from_dense(conv, rank=4)
        >>> layer.ranks, layer(torch.randn(1, 8, 7, 7)).shape
        ((1, 4, 4, 4, 1), torch.Size([1, 16, 4, 5]))
    """

    method_name = "tt"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int], ranks: Sequence[int], *,
                 stride: Sequence[int], padding: Sequence[tuple[int, int]], dilation: Sequence[int], groups: int = 1,
                 padding_mode: str = "zeros", bias: bool = True, forward: str = "factorized",
                 device=None, dtype=None) -> None:
        super().__init__()
        self._setup(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                    bias, forward, device, dtype)
        ranks = tuple(int(r) for r in ranks)
        if len(ranks) != self.dim + 3 or ranks[0] != 1 or ranks[-1] != 1 or min(ranks) < 1:
            raise ValueError(f"TTConv: expected {self.dim + 3} bond ranks (1, ..., 1) for a {self.dim}-d kernel; "
                             f"got {ranks}")
        self.ranks = ranks
        r = ranks
        self.first_weight = self._pointwise(groups * r[1], in_channels // groups, device, dtype)
        self.spatial_weights = nn.ParameterList([
            nn.Parameter(torch.randn(groups * r[a + 2], r[a + 1],
                                     *[k if b == a else 1 for b, k in enumerate(self.kernel_size)],
                                     device=device, dtype=dtype) / math.sqrt(r[a + 1] * self.kernel_size[a]))
            for a in range(self.dim)])
        self.last_weight = self._pointwise(out_channels, r[-2], device, dtype)

    def _factorized(self, x: torch.Tensor) -> torch.Tensor:
        conv = _CONV[self.dim]
        h = conv(x, self.first_weight, None, 1, 0, 1, self.groups)
        for a, sw in enumerate(self.spatial_weights):
            h = self._padded_conv(h, sw, self.groups, (a,))
        return conv(h, self.last_weight, self.bias, 1, 0, 1, self.groups)

    def to_dense(self) -> torch.Tensor:
        """The exact weight ``[out, in/g, k..]`` the cores represent; differentiable."""
        g, r = self.groups, self.ranks
        sp, bonds = _SPATIAL[: self.dim], "abc"[: self.dim + 1]
        ops = [self.first_weight.reshape(g, r[1], self.in_channels // g)]
        subs = [f"g{bonds[0]}i"]
        for a, sw in enumerate(self.spatial_weights):
            ops.append(sw.reshape(g, r[a + 2], r[a + 1], self.kernel_size[a]))
            subs.append(f"g{bonds[a + 1]}{bonds[a]}{sp[a]}")
        ops.append(self.last_weight.reshape(g, self.out_channels // g, r[-2]))
        subs.append(f"go{bonds[-1]}")
        w = torch.einsum(",".join(subs) + f"->goi{sp}", *ops)
        return w.reshape(self.out_channels, self.in_channels // g, *self.kernel_size)

    def factorized_stages(self, input_shape: Sequence[int]) -> list[tuple[int, int]]:
        """``(FLOPs, input + weight + output elements)`` of the 1x1, per-axis and 1x1 convs."""
        batch, spatial = math.prod(input_shape[:-self.dim - 1]), list(input_shape[-self.dim:])
        g, r, cin, cout = self.groups, self.ranks, self.in_channels, self.out_channels
        s = math.prod(spatial)
        out = [(2 * batch * s * cin * r[1], batch * s * (cin + g * r[1]) + r[1] * cin)]
        for a in range(self.dim):
            spatial = self._out_spatial(spatial, (a,))
            s_prev, s = s, math.prod(spatial)
            w = g * r[a + 1] * self.kernel_size[a] * r[a + 2]
            out.append((2 * batch * s * w, batch * g * (r[a + 1] * s_prev + r[a + 2] * s) + w))
        bias = batch * s * cout if self.bias is not None else 0
        out.append((2 * batch * s * cout * r[-2] + bias, batch * s * (g * r[-2] + cout) + cout * r[-2]))
        return out

    def reconstruction_flops(self) -> int:
        """The contraction of the cores in order (in, k_1, .., out), per group."""
        r, cin = self.ranks, self.in_channels // self.groups
        n, flops = cin, 0
        for a, k in enumerate(self.kernel_size):
            flops += 2 * n * r[a + 1] * k * r[a + 2]
            n *= k
        return self.groups * (flops + 2 * n * r[-2] * (self.out_channels // self.groups))

    @classmethod
    def from_dense(cls, layer: nn.Module, rank="same", *, tolerance: float | None = None,
                   energy: float | None = None, rank_multiple: int = 1, forward: str = "factorized") -> TTConv:
        """TT-SVD of each group's kernel with modes (in/g, k.., out/g); ``rank`` as in
        :func:`sparsify.ranks.tt_ranks` (bond ranks of one group; a group whose TT-SVD
        gives a smaller bond is zero-padded to the largest, which is exact)."""
        settings = cls._settings_of(layer)
        ts = [tt_conv_tensor(wg) for wg in cls._groups_of(layer)]
        asked = rank_sel.tt_ranks(ts, rank, tolerance=tolerance, energy=energy, rank_multiple=rank_multiple)
        per_group = [[c[:, :, 0, :] for c in decompose.tt_matrix(t, asked)] for t in ts]
        produced = (1, *(max(cs[k].shape[-1] for cs in per_group) for k in range(len(asked) - 1)))
        new = cls(layer.in_channels, layer.out_channels, settings.pop("kernel_size"), produced, **settings,
                  forward=forward, dtype=torch.float64)
        padded = [[F.pad(c, (0, produced[k + 1] - c.shape[-1], 0, 0, 0, produced[k] - c.shape[0]))
                   for k, c in enumerate(cs)] for cs in per_group]
        with torch.no_grad():
            # core [r_prev, n, r_next] -> conv weight [r_next, r_prev or n, ..]
            new.first_weight.copy_(torch.cat([cs[0][0].T for cs in padded]).reshape(new.first_weight.shape))
            for a, p in enumerate(new.spatial_weights):
                p.copy_(torch.cat([cs[a + 1].permute(2, 0, 1) for cs in padded]).reshape(p.shape))
            new.last_weight.copy_(torch.stack([cs[-1][:, :, 0].T for cs in padded]).reshape(new.last_weight.shape))
        return new._finish(layer)

    def extra_repr(self) -> str:
        return self._settings_repr() + f", ranks={self.ranks}"
