"""Spatially sparse tensors with MinkowskiEngine's API: ``import sparsify.spatial as ME``.

SparseTensor / TensorField, the coordinate manager, convolutions (plain,
transposed, generative, channel-wise), pooling, normalization, activations and
the other layers under MinkowskiEngine's names, for dimensions 1 to 4; every
convolution and pooling runs ``torch.ops.sparsify.spatial_*`` (CPU executor, or
NVRTC kernels on a GPU).  Deliberate differences from MinkowskiEngine are listed
in docs/spatial.md.

Example:
    >>> import torch
    >>> import sparsify.spatial as ME
    >>> pts = torch.rand(200, 3)
    >>> coords, feats = ME.utils.sparse_quantize(pts, torch.rand(200, 3), quantization_size=0.1)
    >>> x = ME.SparseTensor(features=feats, coordinates=ME.utils.batched_coordinates([coords]))
    >>> net = torch.nn.Sequential(
    ...     ME.MinkowskiConvolution(3, 8, kernel_size=3, stride=1, dimension=3), ME.MinkowskiBatchNorm(8), ME.MinkowskiReLU(),
    ...     ME.MinkowskiConvolution(8, 16, kernel_size=2, stride=2, dimension=3),
    ...     ME.MinkowskiConvolutionTranspose(16, 8, kernel_size=2, stride=2, dimension=3),
    ...     ME.MinkowskiGlobalMaxPooling())
    >>> y = net(x); y.F.sum().backward()
    >>> tuple(y.F.shape)
    (1, 8)
"""

from ..runtime.spatial import CoordinateManager, CoordinateMapKey
from . import modules, utils
from .conv import (
    ConvolutionMode,
    KernelGenerator,
    MinkowskiChannelwiseConvolution,
    MinkowskiConvolution,
    MinkowskiConvolutionTranspose,
    MinkowskiGenerativeConvolutionTranspose,
    RegionType,
)
from .convert import from_dense
from .network import MinkowskiNetwork, is_cuda_available
from .nonlinearity import *  # noqa: F401,F403  (Minkowski<activation> for every torch.nn activation)
from .nonlinearity import __all__ as _nonlinearity_all
from .norm import (
    MinkowskiBatchNorm,
    MinkowskiInstanceNorm,
    MinkowskiStableInstanceNorm,
    MinkowskiSyncBatchNorm,
)
from .ops import (
    MinkowskiBroadcast,
    MinkowskiBroadcastAddition,
    MinkowskiBroadcastConcatenation,
    MinkowskiBroadcastMultiplication,
    MinkowskiLinear,
    MinkowskiPruning,
    MinkowskiStackCat,
    MinkowskiStackMean,
    MinkowskiStackSum,
    MinkowskiStackVar,
    MinkowskiToDenseTensor,
    MinkowskiToFeature,
    MinkowskiToSparseTensor,
    MinkowskiUnion,
    cat,
    dense_coordinates,
    mean,
    sum,
    to_sparse,
    to_sparse_all,
    var,
)
from .pooling import (
    MinkowskiAvgPooling,
    MinkowskiGlobalAvgPooling,
    MinkowskiGlobalMaxPooling,
    MinkowskiGlobalPooling,
    MinkowskiGlobalSumPooling,
    MinkowskiMaxPooling,
    MinkowskiPoolingTranspose,
    MinkowskiSumPooling,
    PoolingMode,
)
from .tensor import (
    MinkowskiAlgorithm,
    SparseTensor,
    SparseTensorOperationMode,
    SparseTensorQuantizationMode,
    TensorField,
    clear_global_coordinate_manager,
    global_coordinate_manager,
    set_global_coordinate_manager,
    set_sparse_tensor_operation_mode,
    sparse_tensor_operation_mode,
)

CoordsManager = CoordinateManager  # MinkowskiEngine's old name

__all__ = [
    "ConvolutionMode", "CoordinateManager", "CoordinateMapKey", "CoordsManager", "KernelGenerator",
    "MinkowskiAlgorithm", "MinkowskiAvgPooling", "MinkowskiBatchNorm", "MinkowskiBroadcast",
    "MinkowskiBroadcastAddition", "MinkowskiBroadcastConcatenation", "MinkowskiBroadcastMultiplication",
    "MinkowskiChannelwiseConvolution", "MinkowskiConvolution", "MinkowskiConvolutionTranspose",
    "MinkowskiGenerativeConvolutionTranspose", "MinkowskiGlobalAvgPooling", "MinkowskiGlobalMaxPooling",
    "MinkowskiGlobalPooling", "MinkowskiGlobalSumPooling", "MinkowskiInstanceNorm", "MinkowskiLinear",
    "MinkowskiMaxPooling", "MinkowskiNetwork", "MinkowskiPoolingTranspose", "MinkowskiPruning",
    "MinkowskiStableInstanceNorm", "MinkowskiStackCat", "MinkowskiStackMean", "MinkowskiStackSum",
    "MinkowskiStackVar", "MinkowskiSumPooling", "MinkowskiSyncBatchNorm", "MinkowskiToDenseTensor",
    "MinkowskiToFeature", "MinkowskiToSparseTensor", "MinkowskiUnion", "PoolingMode", "RegionType",
    "SparseTensor", "SparseTensorOperationMode", "SparseTensorQuantizationMode", "TensorField", "cat",
    "clear_global_coordinate_manager", "dense_coordinates", "from_dense", "global_coordinate_manager", "is_cuda_available",
    "mean", "modules", "set_global_coordinate_manager", "set_sparse_tensor_operation_mode",
    "sparse_tensor_operation_mode", "sum", "to_sparse", "to_sparse_all", "utils", "var",
] + list(_nonlinearity_all)
