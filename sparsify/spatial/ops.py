"""Feature-wise layers and tensor operations: linear, concatenation, union, pruning,
broadcasting, and conversion between dense and sparse tensors.

Example:
    >>> import torch
    >>> import sparsify.spatial as ME
    >>> dense = torch.zeros(1, 2, 3, 3); dense[0, :, 1, 2] = torch.tensor([4., 5.])
    >>> x = ME.to_sparse(dense)
    >>> x.C.tolist(), x.F.tolist()
    ([[0, 1, 2]], [[4.0, 5.0]])
    >>> torch.equal(x.dense(shape=dense.shape)[0], dense)
    True
"""

from __future__ import annotations

import torch
from torch import nn

from .tensor import SparseTensor, TensorField

__all__ = [
    "MinkowskiBroadcast",
    "MinkowskiBroadcastAddition",
    "MinkowskiBroadcastConcatenation",
    "MinkowskiBroadcastMultiplication",
    "MinkowskiLinear",
    "MinkowskiPruning",
    "MinkowskiStackCat",
    "MinkowskiStackMean",
    "MinkowskiStackSum",
    "MinkowskiStackVar",
    "MinkowskiToDenseTensor",
    "MinkowskiToFeature",
    "MinkowskiToSparseTensor",
    "MinkowskiUnion",
    "cat",
    "dense_coordinates",
    "mean",
    "sum",
    "to_sparse",
    "to_sparse_all",
    "var",
]


class MinkowskiLinear(nn.Module):
    """``torch.nn.Linear`` on the features (``self.linear`` as in MinkowskiEngine)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, input):
        if not isinstance(input, (SparseTensor, TensorField)):
            raise TypeError(f"MinkowskiLinear: expected a SparseTensor or TensorField. Got {type(input).__name__}.")
        return input._with_features(self.linear(input.F))

    def __repr__(self) -> str:
        return f"MinkowskiLinear({self.linear.extra_repr()})"


def _same_map(tensors, what: str):
    if not tensors:
        raise ValueError(f"{what}: needs at least one tensor.")
    first = tensors[0]
    for t in tensors[1:]:
        if type(t) is not type(first):
            raise TypeError(f"{what}: all inputs must be of one type. Got {type(first).__name__} and {type(t).__name__}.")
        if t.coordinate_manager is not first.coordinate_manager or not first._same_key(t):
            raise ValueError(
                f"{what}: all inputs must share coordinates (the same coordinate_map_key of one coordinate "
                "manager); use MinkowskiUnion to combine tensors on different coordinates."
            )
    return first


def cat(*tensors):
    """Concatenate features of tensors on the same coordinates.

    Example:
        >>> import sparsify.spatial as ME
        >>> x = ME.SparseTensor(torch.ones(2, 1), torch.tensor([[0, 0], [0, 1]], dtype=torch.int32))
        >>> ME.cat(x, x * 2).F.tolist()
        [[1.0, 2.0], [1.0, 2.0]]
    """
    if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
        tensors = tuple(tensors[0])
    first = _same_map(tensors, "cat")
    return first._with_features(torch.cat([t.F for t in tensors], dim=1))


def _reduce(tensors, fn, what):
    if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
        tensors = tuple(tensors[0])
    first = _same_map(tensors, what)
    return first._with_features(fn(torch.stack([t.F for t in tensors])))


def sum(*tensors):  # noqa: A001 - MinkowskiEngine's name
    """Element-wise sum of tensors on the same coordinates."""
    return _reduce(tensors, lambda s: s.sum(0), "sum")


def mean(*tensors):
    """Element-wise mean of tensors on the same coordinates."""
    return _reduce(tensors, lambda s: s.mean(0), "mean")


def var(*tensors):
    """Element-wise (biased) variance of tensors on the same coordinates."""
    return _reduce(tensors, lambda s: s.var(0, unbiased=False), "var")


class MinkowskiUnion(nn.Module):
    """Sum of tensors on the union of their coordinates (zeros where a tensor has no point)."""

    def forward(self, *inputs: SparseTensor) -> SparseTensor:
        if len(inputs) < 2:
            raise ValueError("MinkowskiUnion: needs two or more SparseTensors.")
        manager = inputs[0].coordinate_manager
        for t in inputs:
            if not isinstance(t, SparseTensor):
                raise TypeError(f"MinkowskiUnion: expected SparseTensors. Got {type(t).__name__}.")
            if t.coordinate_manager is not manager:
                raise ValueError("MinkowskiUnion: all inputs must share one coordinate manager.")
            if t.F.shape[1] != inputs[0].F.shape[1]:
                raise ValueError("MinkowskiUnion: all inputs must have the same number of channels.")
        key, rows = manager.union([t.coordinate_map_key for t in inputs])
        n = manager.size(key)
        out = inputs[0].F.new_zeros(n, inputs[0].F.shape[1])
        for t, r in zip(inputs, rows):
            out = out.index_add(0, r, t.F)
        return SparseTensor(out, coordinate_map_key=key, coordinate_manager=manager)


class MinkowskiPruning(nn.Module):
    """Keep the points where ``mask`` (bool ``[N]``) is true, in their order."""

    def forward(self, input: SparseTensor, mask: torch.Tensor) -> SparseTensor:
        if not isinstance(input, SparseTensor):
            raise TypeError(f"MinkowskiPruning: expected a SparseTensor. Got {type(input).__name__}.")
        if mask.dtype != torch.bool or mask.shape != (len(input),):
            raise ValueError(
                f"MinkowskiPruning: mask must be a bool tensor of shape ({len(input)},). Got {mask.dtype} {tuple(mask.shape)}."
            )
        key = input.coordinate_manager.prune(input.coordinate_map_key, mask)
        return SparseTensor(input.F[mask], coordinate_map_key=key, coordinate_manager=input.coordinate_manager)


def _broadcast_rows(input, input_glob) -> torch.Tensor:
    gb = input_glob.C[:, 0].contiguous()
    b = input.C[:, 0].to(gb.dtype).contiguous()
    rows = torch.searchsorted(gb, b).clamp_max(max(gb.numel() - 1, 0))
    if gb.numel() == 0 or not bool((gb[rows] == b).all()):
        raise ValueError("MinkowskiBroadcast: input_glob has no row for some batch index of the input "
                         "(it must be a global pooling of the same batch).")
    return rows


class MinkowskiBroadcastBase(nn.Module):
    op = staticmethod(torch.add)

    def forward(self, input: SparseTensor, input_glob: SparseTensor) -> SparseTensor:
        if not isinstance(input, (SparseTensor, TensorField)) or not isinstance(input_glob, SparseTensor):
            raise TypeError(f"{type(self).__name__}: expected (SparseTensor, global SparseTensor).")
        g = input_glob.F[_broadcast_rows(input, input_glob)]
        return input._with_features(self.op(input.F, g))


class MinkowskiBroadcastAddition(MinkowskiBroadcastBase):
    """``x + g[batch]`` with ``g`` one row per batch item (a global pooling)."""

    op = staticmethod(torch.add)


class MinkowskiBroadcastMultiplication(MinkowskiBroadcastBase):
    """``x * g[batch]`` with ``g`` one row per batch item."""

    op = staticmethod(torch.mul)


class MinkowskiBroadcast(MinkowskiBroadcastBase):
    """``g[batch]`` at every point of the input."""

    op = staticmethod(lambda x, g: g)


class MinkowskiBroadcastConcatenation(MinkowskiBroadcastBase):
    """``[x, g[batch]]`` concatenated along channels."""

    op = staticmethod(lambda x, g: torch.cat([x, g], dim=1))


def dense_coordinates(shape) -> torch.Tensor:
    """Coordinates ``[B * prod(spatial), 1 + D]`` of every site of a dense ``[B, C, *spatial]`` shape.

    Example:
        >>> dense_coordinates(torch.Size([1, 3, 1, 2])).tolist()
        [[0, 0, 0], [0, 0, 1]]
    """
    shape = list(shape)
    grids = torch.meshgrid(*[torch.arange(s) for s in [shape[0], *shape[2:]]], indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], 1).to(torch.int32)


def to_sparse(x: torch.Tensor, format: str | None = None, coordinates: torch.Tensor | None = None,
              device=None) -> SparseTensor:
    """A dense ``[B, C, *spatial]`` tensor as a SparseTensor at its non-zero sites (any channel)."""
    if format not in (None, "BCXXXX"):
        raise ValueError(f"to_sparse: only the BCXXXX (batch, channel, spatial...) format is supported. Got {format!r}.")
    if x.dim() < 3:
        raise ValueError(f"to_sparse: expected a [B, C, *spatial] tensor. Got shape {tuple(x.shape)}.")
    x = x if device is None else x.to(device)
    if coordinates is None:
        nz = (x != 0).any(1)
        coordinates = torch.nonzero(nz).to(torch.int32)
    idx = coordinates.long().unbind(1)
    feats = x.movedim(1, -1)[idx]
    return SparseTensor(feats, coordinates=coordinates.to(torch.int32))


def to_sparse_all(x: torch.Tensor, coordinates: torch.Tensor | None = None) -> SparseTensor:
    """Every site of a dense ``[B, C, *spatial]`` tensor, zeros included."""
    coords = dense_coordinates(x.shape).to(x.device) if coordinates is None else coordinates
    return to_sparse(x, coordinates=coords)


class MinkowskiToSparseTensor(nn.Module):
    """A dense tensor (non-zero sites, or all with ``remove_zeros=False``) or a TensorField, as a SparseTensor."""

    def __init__(self, remove_zeros: bool = True, coordinates: torch.Tensor | None = None) -> None:
        super().__init__()
        self.remove_zeros, self.coordinates = remove_zeros, coordinates

    def forward(self, input):
        if isinstance(input, TensorField):
            return input.sparse()
        if self.coordinates is not None:
            return to_sparse(input, coordinates=self.coordinates)
        return to_sparse(input) if self.remove_zeros else to_sparse_all(input)


class MinkowskiToDenseTensor(nn.Module):
    """``input.dense(shape)[0]``."""

    def __init__(self, shape: torch.Size | None = None) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, input: SparseTensor) -> torch.Tensor:
        return input.dense(shape=self.shape)[0]


class MinkowskiToFeature(nn.Module):
    """The features ``F`` of a sparse tensor."""

    def forward(self, x) -> torch.Tensor:
        return x.F


class MinkowskiStackCat(nn.Sequential):
    """Runs each child on the input and concatenates the results."""

    def forward(self, x):
        return cat([m(x) for m in self])


class MinkowskiStackSum(nn.Sequential):
    def forward(self, x):
        return sum([m(x) for m in self])


class MinkowskiStackMean(nn.Sequential):
    def forward(self, x):
        return mean([m(x) for m in self])


class MinkowskiStackVar(nn.Sequential):
    def forward(self, x):
        return var([m(x) for m in self])
