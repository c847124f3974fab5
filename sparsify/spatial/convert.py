"""``from_dense``: a dense voxel network as the equivalent spatially sparse network.

Runs the ``sparsify_voxels`` pass (``passes/sparsify_voxels.py``, where the exact
semantics under which the two networks agree are stated) on an fx trace of a copy
of the model.  The result takes a :class:`~sparsify.spatial.SparseTensor` where the
dense model took a ``[B, C, *spatial]`` tensor (``sparsify.spatial.to_sparse``
converts one).

Example:
    >>> import torch
    >>> from torch import nn
    >>> import sparsify.spatial as ME
    >>> dense = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2)).eval()
    >>> grid = torch.zeros(1, 1, 6, 6); grid[0, 0, 1, 2] = 1.0; grid[0, 0, 4, 4] = 2.0
    >>> sparse = ME.from_dense(dense)
    >>> y = sparse(ME.to_sparse(grid))
    >>> mask = torch.zeros(1, 1, 6, 6); mask[0, 0, 1, 2] = mask[0, 0, 4, 4] = 1  # the active sites
    >>> ref = dense[2](dense[:2](grid) * mask)  # masked dense evaluation, read at coordinate // 2
    >>> torch.allclose(y.F, ref[0, :, y.C[:, 1] // 2, y.C[:, 2] // 2].T, atol=1e-6)
    True
"""

from __future__ import annotations

import copy

import torch.fx as fx
from torch import nn

__all__ = ["from_dense"]


def from_dense(model: nn.Module, inplace: bool = False) -> fx.GraphModule:
    """The sparse form of a dense voxel network (the model is copied unless ``inplace=True``).

    Raises ``sparsify.passes.sparsify_voxels.VoxelRewriteError`` (a ValueError) naming the first
    layer or function with no exact sparse form, before anything is returned."""
    from ..passes.sparsify_voxels import VoxelRewriteError, sparsify_voxels

    if not isinstance(model, nn.Module):
        raise TypeError(f"from_dense: expected an nn.Module. Got {type(model).__name__}.")
    src = model if inplace else copy.deepcopy(model)
    try:
        gm = fx.symbolic_trace(src)
    except Exception as exc:
        raise VoxelRewriteError(
            f"from_dense: torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "the rewrite needs a traceable forward (no data-dependent control flow)."
        ) from exc
    return sparsify_voxels(gm, None).module
