"""Sparse convolutions with MinkowskiEngine's names and argument conventions.

Weights are ``[K, in_channels, out_channels]`` (``[in, out]`` for a 1-volume
kernel with stride 1, as there), kernel offsets in MinkowskiEngine's order
(:func:`sparsify.runtime.spatial.kernel_offsets`), ``stride`` multiplies the
input's tensor stride and downsamples the coordinates (``floor(c / s) * s``);
a transposed convolution divides it and writes to the finer map that the
matching downsampling made (or, if none exists, to every ``coord + offset``);
the generative transposed convolution always expands.  Every forward runs
``torch.ops.sparsify.spatial_conv`` over a kernel map cached in the input's
coordinate manager.

Example:
    >>> import torch
    >>> import sparsify.spatial as ME
    >>> x = ME.SparseTensor(torch.ones(3, 2), torch.tensor([[0, 0, 0], [0, 0, 1], [0, 3, 3]], dtype=torch.int32))
    >>> conv = ME.MinkowskiConvolution(2, 4, kernel_size=3, stride=2, dimension=2)
    >>> y = conv(x)
    >>> y.C.tolist(), y.tensor_stride, tuple(y.F.shape)
    ([[0, 0, 0], [0, 2, 2]], [2, 2], (2, 4))
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import nn

from ..runtime.spatial import CoordinateMapKey, as_stride, kernel_offsets, kernel_volume
from .tensor import SparseTensor

__all__ = [
    "ConvolutionMode",
    "KernelGenerator",
    "MinkowskiChannelwiseConvolution",
    "MinkowskiConvolution",
    "MinkowskiConvolutionTranspose",
    "MinkowskiGenerativeConvolutionTranspose",
    "RegionType",
    "output_key",
]


class RegionType(Enum):
    """Kernel shapes: a hyper-cube, a hyper-cross (the axes through the centre), or custom offsets."""

    HYPER_CUBE = 0
    HYPER_CROSS = 1
    CUSTOM = 2


class ConvolutionMode(Enum):
    """Accepted for compatibility and ignored (MinkowskiEngine's CUDA algorithm choice)."""

    DEFAULT = 0
    DIRECT_GEMM = 1
    COPY_GEMM = 2


_REGION_NAMES = {RegionType.HYPER_CUBE: "hypercube", RegionType.HYPER_CROSS: "hypercross", RegionType.CUSTOM: "custom"}


class KernelGenerator:
    """Kernel size, stride, dilation and region of a layer (MinkowskiEngine's ``KernelGenerator``).

    ``axis_types`` (per-axis region types) is not supported: use ``RegionType.CUSTOM`` with
    ``region_offsets`` for mixed shapes.

    Example:
        >>> KernelGenerator(3, stride=2, dimension=3).kernel_volume
        27
    """

    def __init__(self, kernel_size=-1, stride=1, dilation=1, is_transpose: bool = False,
                 region_type: RegionType = RegionType.HYPER_CUBE, region_offsets: torch.Tensor | None = None,
                 expand_coordinates: bool = False, axis_types=None, dimension: int = -1) -> None:
        if not isinstance(dimension, int) or dimension < 1:
            raise ValueError(f"KernelGenerator: dimension must be a positive int (the spatial dimension). Got {dimension!r}.")
        if axis_types is not None:
            raise ValueError(
                "KernelGenerator: axis_types (RegionType.HYBRID) is not supported; pass "
                "region_type=RegionType.CUSTOM with region_offsets listing the offsets instead."
            )
        if not isinstance(region_type, RegionType):
            raise TypeError(f"KernelGenerator: region_type must be a RegionType. Got {region_type!r}.")
        if region_type == RegionType.CUSTOM:
            if region_offsets is None or region_offsets.dim() != 2 or region_offsets.shape[1] != dimension:
                raise ValueError(f"KernelGenerator: RegionType.CUSTOM needs region_offsets of shape [K, {dimension}].")
            kernel_size = 1 if kernel_size == -1 else kernel_size
        elif kernel_size == -1:
            raise ValueError("KernelGenerator: kernel_size is required unless region_type is RegionType.CUSTOM.")
        self.kernel_size = as_stride(kernel_size, dimension, "kernel_size")
        self.kernel_stride = as_stride(stride, dimension, "stride")
        self.kernel_dilation = as_stride(dilation, dimension, "dilation")
        self.region_type = region_type
        self.region_offsets = None if region_offsets is None else region_offsets.to(torch.int32).cpu()
        self.expand_coordinates = expand_coordinates
        self.dimension = dimension
        self.kernel_volume = kernel_volume(_REGION_NAMES[region_type], self.kernel_size, self.region_offsets)
        self.requires_strided_coordinates = all(s == 1 for s in self.kernel_stride)

    @property
    def region(self) -> str:
        return _REGION_NAMES[self.region_type]

    def offsets(self, tensor_stride) -> torch.Tensor:
        return kernel_offsets(self.region, self.kernel_size, self.kernel_dilation, tensor_stride, self.region_offsets)

    def kernel_map(self, manager, in_key, out_key, is_transpose=False, is_pool=False):
        return manager.kernel_map(in_key, out_key, self.kernel_size, self.kernel_stride, self.kernel_dilation,
                                  self.region, self.region_offsets, is_transpose, is_pool)

    def __repr__(self) -> str:
        return (f"KernelGenerator(kernel_size={list(self.kernel_size)}, stride={list(self.kernel_stride)}, "
                f"dilation={list(self.kernel_dilation)}, region={self.region})")


def output_key(input: SparseTensor, kg: KernelGenerator, coordinates=None, is_transpose: bool = False,
               expand: bool = False, layer: str = "") -> CoordinateMapKey:
    """Where a layer writes: given ``coordinates`` (a tensor, key or SparseTensor), else the
    strided map (transposed: the finer map, expanded when it does not exist or ``expand``).
    An output coordinate outside int32 raises an error naming ``layer`` and ``kg``."""
    manager = input.coordinate_manager
    where = f"{layer or 'output_key'} ({kg!r} at tensor stride {input.tensor_stride})"
    if coordinates is not None and not expand:
        if isinstance(coordinates, SparseTensor):
            if coordinates.coordinate_manager is not manager:
                raise ValueError("coordinates= must be a SparseTensor of the same coordinate manager as the input.")
            return coordinates.coordinate_map_key
        if isinstance(coordinates, CoordinateMapKey):
            manager.coordinate_map(coordinates)
            return coordinates
        if isinstance(coordinates, torch.Tensor):
            ts = (manager.transposed_stride(input.coordinate_map_key, kg.kernel_stride) if is_transpose
                  else tuple(a * b for a, b in zip(input.tensor_stride, kg.kernel_stride)))
            key, _ = manager.insert_and_map(coordinates.to(input.device), ts)
            return key
        raise TypeError(f"coordinates must be a Tensor, CoordinateMapKey or SparseTensor. Got {type(coordinates).__name__}.")
    in_key = input.coordinate_map_key
    if is_transpose:
        out_ts = manager.transposed_stride(in_key, kg.kernel_stride)
        return manager.stride_region(in_key, kg.offsets(out_ts), out_ts, expand, True, where)
    if expand:
        out_ts = tuple(a * b for a, b in zip(input.tensor_stride, kg.kernel_stride))
        return manager.stride_region(in_key, kg.offsets(input.tensor_stride), out_ts, True, False, where)
    return manager.stride(in_key, kg.kernel_stride, where=where)


def _check_input(layer: nn.Module, input, channels: int) -> None:
    if not isinstance(input, SparseTensor):
        raise TypeError(f"{type(layer).__name__}: expected a SparseTensor input. Got {type(input).__name__}.")
    if input.D != layer.dimension:
        raise ValueError(
            f"{type(layer).__name__}: the layer has dimension={layer.dimension} but the input is {input.D}-dimensional."
        )
    if input.F.shape[1] != channels:
        raise ValueError(
            f"{type(layer).__name__}: expected {channels} input channels. Got {input.F.shape[1]}."
        )


def _run(x: torch.Tensor, weight: torch.Tensor, km, depthwise: bool) -> torch.Tensor:
    return torch.ops.sparsify.spatial_conv(x, weight, km.in_idx, km.out_idx, list(km.k_offsets), km.n_out,
                                           km.identity_k, depthwise)


class MinkowskiConvolutionBase(nn.Module):
    """Shared by the convolution layers: parameters, kernel generator, initialization."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=-1, stride=1, dilation=1,
                 bias: bool = False, kernel_generator: KernelGenerator | None = None, is_transpose: bool = False,
                 expand_coordinates: bool = False, convolution_mode=ConvolutionMode.DEFAULT,
                 dimension: int | None = None) -> None:
        super().__init__()
        if dimension is None or not isinstance(dimension, int) or dimension < 1:
            raise ValueError(f"{type(self).__name__}: dimension must be given as a positive int. Got {dimension!r}.")
        if kernel_generator is None:
            kernel_generator = KernelGenerator(kernel_size, stride, dilation, expand_coordinates=expand_coordinates,
                                               dimension=dimension)
        else:
            kernel_generator.expand_coordinates = expand_coordinates
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_generator = kernel_generator
        self.dimension = dimension
        self.is_transpose = is_transpose
        self.convolution_mode = convolution_mode
        self.use_mm = kernel_generator.kernel_volume == 1 and kernel_generator.requires_strided_coordinates \
            and kernel_generator.region_type != RegionType.CUSTOM
        shape = (self.in_channels, self.out_channels) if self.use_mm else \
            (kernel_generator.kernel_volume, self.in_channels, self.out_channels)
        self.kernel = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(1, self.out_channels)) if bias else None
        self.reset_parameters(is_transpose)

    def reset_parameters(self, is_transpose: bool = False) -> None:
        with torch.no_grad():
            n = (self.out_channels if is_transpose else self.in_channels) * self.kernel_generator.kernel_volume
            stdv = 1.0 / math.sqrt(n)
            self.kernel.uniform_(-stdv, stdv)
            if self.bias is not None:
                self.bias.uniform_(-stdv, stdv)

    def forward(self, input: SparseTensor, coordinates=None) -> SparseTensor:
        _check_input(self, input, self.in_channels)
        manager = input.coordinate_manager
        if self.use_mm and coordinates is None:
            out_key, feats = input.coordinate_map_key, input.F @ self.kernel
        else:
            kg = self.kernel_generator
            out_key = output_key(input, kg, coordinates, self.is_transpose, kg.expand_coordinates, type(self).__name__)
            km = kg.kernel_map(manager, input.coordinate_map_key, out_key, is_transpose=self.is_transpose)
            weight = self.kernel.reshape(1, *self.kernel.shape) if self.use_mm else self.kernel
            feats = _run(input.F, weight, km, False)
        if self.bias is not None:
            feats = feats + self.bias
        return SparseTensor(feats, coordinate_map_key=out_key, coordinate_manager=manager)

    def extra_repr(self) -> str:
        kg = self.kernel_generator
        return (f"in={self.in_channels}, out={self.out_channels}, kernel_size={list(kg.kernel_size)}, "
                f"stride={list(kg.kernel_stride)}, dilation={list(kg.kernel_dilation)}, region={kg.region}")


class MinkowskiConvolution(MinkowskiConvolutionBase):
    """Sparse convolution: ``y[o] = sum_k x[o + offset_k] @ W[k]`` at the output coordinates."""

    def __init__(self, in_channels, out_channels, kernel_size=-1, stride=1, dilation=1, bias=False,
                 kernel_generator=None, expand_coordinates=False, convolution_mode=ConvolutionMode.DEFAULT,
                 dimension=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, bias, kernel_generator,
                         False, expand_coordinates, convolution_mode, dimension)


class MinkowskiConvolutionTranspose(MinkowskiConvolutionBase):
    """Transposed sparse convolution (upsampling): the adjoint of the strided convolution."""

    def __init__(self, in_channels, out_channels, kernel_size=-1, stride=1, dilation=1, bias=False,
                 kernel_generator=None, expand_coordinates=False, convolution_mode=ConvolutionMode.DEFAULT,
                 dimension=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, bias, kernel_generator,
                         True, expand_coordinates, convolution_mode, dimension)


class MinkowskiGenerativeConvolutionTranspose(MinkowskiConvolutionTranspose):
    """Transposed convolution that always creates new coordinates (every ``coord + offset``)."""

    def __init__(self, in_channels, out_channels, kernel_size=-1, stride=1, dilation=1, bias=False,
                 kernel_generator=None, convolution_mode=ConvolutionMode.DEFAULT, dimension=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, bias, kernel_generator,
                         True, convolution_mode, dimension)


class MinkowskiChannelwiseConvolution(nn.Module):
    """Depth-wise sparse convolution: ``y[o, c] = sum_k x[o + offset_k, c] * W[k, c]``."""

    def __init__(self, in_channels: int, kernel_size=-1, stride=1, dilation=1, bias: bool = False,
                 kernel_generator: KernelGenerator | None = None, dimension: int | None = None) -> None:
        super().__init__()
        if dimension is None or dimension < 1:
            raise ValueError(f"MinkowskiChannelwiseConvolution: dimension must be a positive int. Got {dimension!r}.")
        if kernel_generator is None:
            kernel_generator = KernelGenerator(kernel_size, stride, dilation, dimension=dimension)
        self.kernel_generator, self.dimension = kernel_generator, dimension
        self.in_channels = self.out_channels = int(in_channels)
        self.kernel = nn.Parameter(torch.empty(kernel_generator.kernel_volume, self.in_channels))
        self.bias = nn.Parameter(torch.empty(1, self.in_channels)) if bias else None
        with torch.no_grad():
            stdv = 1.0 / math.sqrt(kernel_generator.kernel_volume)
            self.kernel.uniform_(-stdv, stdv)
            if self.bias is not None:
                self.bias.uniform_(-stdv, stdv)

    def forward(self, input: SparseTensor, coordinates=None) -> SparseTensor:
        _check_input(self, input, self.in_channels)
        kg = self.kernel_generator
        out_key = output_key(input, kg, coordinates, layer=type(self).__name__)
        km = kg.kernel_map(input.coordinate_manager, input.coordinate_map_key, out_key)
        feats = _run(input.F, self.kernel, km, True)
        if self.bias is not None:
            feats = feats + self.bias
        return SparseTensor(feats, coordinate_map_key=out_key, coordinate_manager=input.coordinate_manager)

    def extra_repr(self) -> str:
        kg = self.kernel_generator
        return f"channels={self.in_channels}, kernel_size={list(kg.kernel_size)}, stride={list(kg.kernel_stride)}"
