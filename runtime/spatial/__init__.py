"""Spatially sparse tensors in the runtime: coordinate maps, kernel maps and the spatial ops.

Tiers, lowest first: :mod:`.coords` (coordinate maps, hashing / lookup, kernel
offsets, kernel maps) and :mod:`.manager` (the coordinate manager that caches
them) are the format; :mod:`.ops` registers ``torch.ops.sparsify.spatial_*``
with fake implementations and autograd; :mod:`.cpu` is the reference executor
and :mod:`.cuda` the NVRTC kernels.  Nothing here imports passes or the API.
"""

from ..environment import switch as _switch
from . import ops as _ops  # noqa: F401  (registers torch.ops.sparsify.spatial_*)
from .coords import (
    CoordinateIndex,
    CoordinateMap,
    KernelMap,
    build_kernel_map,
    kernel_offsets,
    kernel_volume,
    stride_coordinates,
    unique_coordinates,
)
from .manager import CoordinateManager, CoordinateMapKey, as_stride
from .ops import register_spatial_executor, spatial_executor_for


def _cuda_factory(device):
    from .cuda import SpatialCUDAExecutor

    return SpatialCUDAExecutor.for_device(device)


register_spatial_executor("cuda", _cuda_factory)  # a factory only: nothing CUDA is imported here


def use_emulator(enable: bool = True) -> None:
    """Run the spatial ops of CPU tensors on the CUDA kernels under the CPU emulator (tests, kernel
    work without a GPU); ``SPARSIFY_EMULATE_CUDA=1`` turns it on at import.  ``False`` restores
    the CPU executor."""
    if not enable:
        register_spatial_executor("cpu", lambda device: None)
        return

    def factory(device):
        from .cuda import EmulatedSpatialRuntime, SpatialCUDAExecutor

        return SpatialCUDAExecutor(EmulatedSpatialRuntime())

    register_spatial_executor("cpu", factory)


if _switch("SPARSIFY_EMULATE_CUDA", False):
    use_emulator(True)

__all__ = [
    "CoordinateIndex",
    "CoordinateManager",
    "CoordinateMap",
    "CoordinateMapKey",
    "KernelMap",
    "as_stride",
    "build_kernel_map",
    "kernel_offsets",
    "kernel_volume",
    "register_spatial_executor",
    "spatial_executor_for",
    "stride_coordinates",
    "unique_coordinates",
    "use_emulator",
]
