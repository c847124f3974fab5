"""Pooling over sparse tensors: local max / average / sum, unpooling, and global pooling.

Local pooling writes to the strided map (as a convolution with the same kernel
would) and reduces over the input points each output's kernel region holds;
with ``kernel_size == stride`` every input point goes to its strided parent, as
in dense pooling without padding.  Global pooling reduces each batch item to one
point at the origin (rows ordered by batch index).  Everything runs
``torch.ops.sparsify.spatial_pool``.

Example:
    >>> import torch
    >>> import sparsify.spatial as ME
    >>> x = ME.SparseTensor(torch.tensor([[1.], [5.], [2.]]), torch.tensor([[0, 0], [0, 1], [1, 3]], dtype=torch.int32))
    >>> ME.MinkowskiMaxPooling(kernel_size=2, stride=2, dimension=1)(x).F.squeeze(1).tolist()
    [5.0, 2.0]
    >>> ME.MinkowskiGlobalAvgPooling()(x).F.squeeze(1).tolist()
    [3.0, 2.0]
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from ..runtime.spatial import KernelMap
from ..runtime.spatial.coords import index_dtype
from .conv import KernelGenerator, output_key
from .tensor import SparseTensor, TensorField

__all__ = [
    "MinkowskiAvgPooling",
    "MinkowskiGlobalAvgPooling",
    "MinkowskiGlobalMaxPooling",
    "MinkowskiGlobalPooling",
    "MinkowskiGlobalSumPooling",
    "MinkowskiMaxPooling",
    "MinkowskiPoolingTranspose",
    "MinkowskiSumPooling",
    "PoolingMode",
]


class PoolingMode(Enum):
    """MinkowskiEngine's pooling modes; the algorithm variants all run the same op here."""

    LOCAL_SUM_POOLING = 0
    LOCAL_AVG_POOLING = 1
    LOCAL_MAX_POOLING = 2
    GLOBAL_SUM_POOLING_DEFAULT = 3
    GLOBAL_AVG_POOLING_DEFAULT = 4
    GLOBAL_MAX_POOLING_DEFAULT = 5
    GLOBAL_SUM_POOLING_KERNEL = 6
    GLOBAL_AVG_POOLING_KERNEL = 7
    GLOBAL_MAX_POOLING_KERNEL = 8
    GLOBAL_SUM_POOLING_PYTORCH_INDEX = 9
    GLOBAL_AVG_POOLING_PYTORCH_INDEX = 10
    GLOBAL_MAX_POOLING_PYTORCH_INDEX = 11


def _mode_name(mode: PoolingMode) -> str:
    name = mode.name
    return "sum" if "SUM" in name else "avg" if "AVG" in name else "max"


def pool(x: torch.Tensor, km: KernelMap, mode: str) -> torch.Tensor:
    """Reduce ``x`` over all pairs of ``km`` (every offset together)."""
    y, _ = torch.ops.sparsify.spatial_pool(x, km.in_idx, km.out_idx, km.n_out, mode)
    return y


class MinkowskiPoolingBase(nn.Module):
    mode = "sum"

    def __init__(self, kernel_size=-1, stride=1, dilation=1, kernel_generator: KernelGenerator | None = None,
                 is_transpose: bool = False, expand_coordinates: bool = False, dimension: int | None = None) -> None:
        super().__init__()
        if dimension is None or dimension < 1:
            raise ValueError(f"{type(self).__name__}: dimension must be given as a positive int. Got {dimension!r}.")
        if kernel_generator is None:
            kernel_generator = KernelGenerator(kernel_size, stride, dilation, expand_coordinates=expand_coordinates,
                                               dimension=dimension)
        self.kernel_generator, self.dimension, self.is_transpose = kernel_generator, dimension, is_transpose

    def forward(self, input: SparseTensor, coordinates=None) -> SparseTensor:
        if not isinstance(input, SparseTensor):
            raise TypeError(f"{type(self).__name__}: expected a SparseTensor. Got {type(input).__name__}.")
        if input.D != self.dimension:
            raise ValueError(f"{type(self).__name__}: dimension={self.dimension} but the input is {input.D}-dimensional.")
        kg = self.kernel_generator
        out_key = output_key(input, kg, coordinates, self.is_transpose, kg.expand_coordinates, type(self).__name__)
        km = kg.kernel_map(input.coordinate_manager, input.coordinate_map_key, out_key,
                           is_transpose=self.is_transpose, is_pool=True)
        return SparseTensor(pool(input.F, km, self.mode), coordinate_map_key=out_key,
                            coordinate_manager=input.coordinate_manager)

    def extra_repr(self) -> str:
        kg = self.kernel_generator
        return f"kernel_size={list(kg.kernel_size)}, stride={list(kg.kernel_stride)}, dilation={list(kg.kernel_dilation)}"


class MinkowskiSumPooling(MinkowskiPoolingBase):
    """Sum of the input features in each output's kernel region."""

    mode = "sum"

    def __init__(self, kernel_size=-1, stride=1, dilation=1, kernel_generator=None, dimension=None) -> None:
        super().__init__(kernel_size, stride, dilation, kernel_generator, dimension=dimension)


class MinkowskiAvgPooling(MinkowskiPoolingBase):
    """Average over the input points present in each output's kernel region."""

    mode = "avg"

    def __init__(self, kernel_size=-1, stride=1, dilation=1, kernel_generator=None, dimension=None) -> None:
        super().__init__(kernel_size, stride, dilation, kernel_generator, dimension=dimension)


class MinkowskiMaxPooling(MinkowskiPoolingBase):
    """Maximum over the input points present in each output's kernel region."""

    mode = "max"

    def __init__(self, kernel_size=-1, stride=1, dilation=1, kernel_generator=None, dimension=None) -> None:
        super().__init__(kernel_size, stride, dilation, kernel_generator, dimension=dimension)


class MinkowskiPoolingTranspose(MinkowskiPoolingBase):
    """Unpooling: each output averages the inputs that pair with it in the transposed kernel map."""

    mode = "avg"

    def __init__(self, kernel_size, stride, dilation=1, kernel_generator=None, expand_coordinates=False,
                 dimension=None) -> None:
        super().__init__(kernel_size, stride, dilation, kernel_generator, True, expand_coordinates, dimension)


class MinkowskiGlobalPooling(nn.Module):
    """Reduce each batch item to one point at the origin (``mode``: a :class:`PoolingMode`)."""

    def __init__(self, mode: PoolingMode = PoolingMode.GLOBAL_AVG_POOLING_PYTORCH_INDEX) -> None:
        super().__init__()
        if not isinstance(mode, PoolingMode):
            raise TypeError(f"{type(self).__name__}: mode must be a PoolingMode. Got {mode!r}.")
        self.pooling_mode = mode

    def forward(self, input, coordinates=None) -> SparseTensor:
        if not isinstance(input, (SparseTensor, TensorField)):
            raise TypeError(f"{type(self).__name__}: expected a SparseTensor or TensorField. Got {type(input).__name__}.")
        manager = input.coordinate_manager
        batch = input.C[:, 0].to(torch.int32)
        if isinstance(input, SparseTensor):
            out_key = manager.origin(input.coordinate_map_key)
        else:
            out_key = manager.origin(batch=batch)
        origin = manager.get_coordinates(out_key)[:, 0]
        itype = index_dtype(batch.device)
        rows = torch.searchsorted(origin.contiguous(), batch.contiguous()).to(itype)
        n = input.F.shape[0]
        km = KernelMap(torch.arange(n, dtype=itype, device=batch.device), rows, (0, n), n, origin.numel())
        y = pool(input.F, km, _mode_name(self.pooling_mode))
        return SparseTensor(y, coordinate_map_key=out_key, coordinate_manager=manager)

    def extra_repr(self) -> str:
        return f"mode={self.pooling_mode.name}"


class MinkowskiGlobalSumPooling(MinkowskiGlobalPooling):
    def __init__(self, mode: PoolingMode = PoolingMode.GLOBAL_SUM_POOLING_PYTORCH_INDEX) -> None:
        super().__init__(mode)


class MinkowskiGlobalAvgPooling(MinkowskiGlobalPooling):
    def __init__(self, mode: PoolingMode = PoolingMode.GLOBAL_AVG_POOLING_PYTORCH_INDEX) -> None:
        super().__init__(mode)


class MinkowskiGlobalMaxPooling(MinkowskiGlobalPooling):
    def __init__(self, mode: PoolingMode = PoolingMode.GLOBAL_MAX_POOLING_PYTORCH_INDEX) -> None:
        super().__init__(mode)
