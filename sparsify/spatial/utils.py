"""Data helpers with MinkowskiEngine's names: quantization and batching of coordinates.

Example:
    >>> import torch
    >>> from sparsify.spatial import utils
    >>> pts = torch.tensor([[0.01, 0.0, 0.0], [0.015, 0.001, 0.0], [0.05, 0.0, 0.0]])
    >>> coords, feats = utils.sparse_quantize(pts, torch.ones(3, 1), quantization_size=0.02)
    >>> coords.tolist(), feats.tolist()
    ([[0, 0, 0], [2, 0, 0]], [[1.0], [1.0]])
    >>> utils.batched_coordinates([coords, coords]).tolist()
    [[0, 0, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [1, 2, 0, 0]]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..runtime.spatial import unique_coordinates
from ..runtime.spatial.coords import check_coordinate_range, floor_coordinates

__all__ = ["batch_sparse_collate", "batched_coordinates", "sparse_collate", "sparse_quantize"]


def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, torch.Tensor):
        return x
    raise TypeError(f"{what}: expected a torch.Tensor or numpy array. Got {type(x).__name__}.")


def sparse_quantize(coordinates, features=None, labels=None, ignore_label: int = -100, return_index: bool = False,
                    return_inverse: bool = False, return_maps_only: bool = False, quantization_size=None,
                    device: str = "cpu"):
    """Voxelize points: ``floor(coordinates / quantization_size)``, one row per occupied voxel
    (the first point of each voxel, in order of first appearance).

    Returns, as MinkowskiEngine does: the coordinates (int32); then the features and the labels
    when given (a voxel whose points disagree on the label gets ``ignore_label``); then the
    unique index and the inverse mapping when asked.  ``return_maps_only`` returns just those.

    ``quantization_size`` must be finite and positive, and large enough that every voxel
    coordinate fits int32; a NaN or infinite point raises naming its row (nothing wraps).
    """
    coords = _as_tensor(coordinates, "sparse_quantize(coordinates)")
    if coords.dim() != 2:
        raise ValueError(f"sparse_quantize: coordinates must be [N, D]. Got shape {tuple(coords.shape)}.")
    if quantization_size is not None:
        q = torch.as_tensor(quantization_size, dtype=torch.float64).reshape(-1)
        if not bool((torch.isfinite(q) & (q > 0)).all()):
            raise ValueError(f"sparse_quantize: quantization_size must be finite and positive. Got {quantization_size}.")
        scaled = coords.to(torch.float64) / q
        check_coordinate_range(scaled, "sparse_quantize", what="point", source=coords,
                               source_unit=f"in voxels of quantization_size {quantization_size}",
                               hint="use a larger quantization_size or shift the points (subtract their minimum)")
        coords = scaled
    else:
        check_coordinate_range(coords, "sparse_quantize", what="point")
    coords = (torch.floor(coords) if coords.dtype.is_floating_point else coords).to(torch.int32).to(device)
    uniq, inv = unique_coordinates(coords)
    if return_maps_only:
        return (uniq, inv) if return_inverse else uniq
    out = [coords[uniq]]
    if features is not None:
        f = _as_tensor(features, "sparse_quantize(features)")
        if f.shape[0] != coords.shape[0]:
            raise ValueError(f"sparse_quantize: {f.shape[0]} feature rows for {coords.shape[0]} points.")
        out.append(f[uniq.to(f.device)])
    if labels is not None:
        lab = _as_tensor(labels, "sparse_quantize(labels)").to(torch.int64)
        first = lab[uniq]
        # a voxel disagrees if any of its points differs from its first point's label
        bad = torch.zeros(uniq.numel(), dtype=torch.int64).index_add_(0, inv.cpu(), (lab.cpu() != first.cpu()[inv.cpu()]).long())
        out.append(torch.where(bad > 0, torch.full_like(first, ignore_label), first))
    if return_index:
        out.append(uniq)
    if return_inverse:
        out.append(inv)
    return out[0] if len(out) == 1 else tuple(out)


def batched_coordinates(coords: Sequence, dtype: torch.dtype = torch.int32, device=None) -> torch.Tensor:
    """Stack per-item coordinates ``[N_i, D]`` into ``[sum N_i, 1 + D]`` with the batch index first."""
    if not isinstance(coords, (list, tuple)) or not coords:
        raise ValueError("batched_coordinates: expected a non-empty list of [N, D] coordinate tensors.")
    items = [_as_tensor(c, "batched_coordinates") for c in coords]
    d = items[0].shape[1]
    if any(c.dim() != 2 or c.shape[1] != d for c in items):
        raise ValueError("batched_coordinates: every item must be a [N, D] matrix with the same D.")
    rows = [torch.cat([torch.full((c.shape[0], 1), b, dtype=dtype), floor_coordinates(c, f"batched_coordinates(item {b})", dtype)], 1)
            for b, c in enumerate(items)]
    out = torch.cat(rows)
    return out if device is None else out.to(device)


def sparse_collate(coords, feats, labels=None, dtype: torch.dtype = torch.int32, device=None):
    """``(batched coordinates, concatenated features[, concatenated labels])``."""
    if len(coords) != len(feats):
        raise ValueError(f"sparse_collate: {len(coords)} coordinate items but {len(feats)} feature items.")
    bc = batched_coordinates(coords, dtype=dtype, device=device)
    f = torch.cat([_as_tensor(x, "sparse_collate(feats)") for x in feats])
    if device is not None:
        f = f.to(device)
    if labels is None:
        return bc, f
    lab = torch.cat([_as_tensor(x, "sparse_collate(labels)") for x in labels])
    return bc, f, lab if device is None else lab.to(device)


def batch_sparse_collate(data, dtype: torch.dtype = torch.int32, device=None):
    """A DataLoader ``collate_fn``: a list of ``(coords, feats[, labels])`` tuples."""
    parts = list(zip(*data))
    return sparse_collate(*parts, dtype=dtype, device=device)
