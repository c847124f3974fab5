"""The coordinate manager: the coordinate maps of one network and their cached kernel maps.

Tensors that flow through one network share a :class:`CoordinateManager`.  It
holds one :class:`~.coords.CoordinateMap` per :class:`CoordinateMapKey`
(tensor stride + a string id), creates strided and expanded maps on demand
(stride-2 downsampling, transposed upsampling, generative expansion, pruning,
unions), and caches kernel maps keyed by
``(in key, out key, kernel size, stride, dilation, region, transposed, pool)``
so the layers of a U-Net build each map once per input.  A transposed kernel
map reuses the forward one with input and output swapped, as MinkowskiEngine
does, which is what makes a transposed convolution the adjoint of the strided
convolution that made its coordinates.

Example:
    >>> import torch
    >>> cm = CoordinateManager(D=1)
    >>> key, (uniq, inv) = cm.insert_and_map(torch.tensor([[0, 0], [0, 1], [0, 1], [0, 3]]), (1,))
    >>> uniq.tolist(), inv.tolist(), cm.size(key)
    ([0, 1, 3], [0, 1, 1, 2], 3)
    >>> down = cm.stride(key, (2,))
    >>> cm.get_coordinates(down).tolist(), down.get_tensor_stride()
    ([[0, 0], [0, 2]], [2])
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .coords import (
    CoordinateIndex,
    CoordinateMap,
    KernelMap,
    build_kernel_map,
    check_coordinates,
    expand_region,
    index_dtype,
    kernel_offsets,
    stride_coordinates,
    unique_coordinates,
)

__all__ = ["CoordinateManager", "CoordinateMapKey", "as_stride"]


def as_stride(value, dimension: int, what: str = "stride") -> tuple[int, ...]:
    """An int / sequence / tensor as a ``dimension``-tuple of positive ints (MinkowskiEngine's
    ``convert_to_int_list``), with a specific error otherwise.

    Example:
        >>> as_stride(2, 3), as_stride([1, 2], 2)
        ((2, 2, 2), (1, 2))
    """
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()
    if isinstance(value, int):
        out = (int(value),) * dimension
    elif isinstance(value, (list, tuple)):
        if len(value) != dimension:
            raise ValueError(f"{what} {tuple(value)} has {len(value)} entries; expected {dimension} (one per spatial axis) or one int.")
        out = tuple(int(v) for v in value)
    else:
        raise TypeError(f"{what}: expected an int or a sequence of {dimension} ints. Got {type(value).__name__}.")
    if what != "tensor_stride(0)" and any(v <= 0 for v in out):
        raise ValueError(f"{what} must be positive on every axis. Got {out}.")
    return out


@dataclass(frozen=True)
class CoordinateMapKey:
    """Names one coordinate map of a manager: its tensor stride and a string id."""

    tensor_stride: tuple[int, ...]
    string_id: str = ""

    def get_key(self) -> tuple[tuple[int, ...], str]:
        return self.tensor_stride, self.string_id

    def get_tensor_stride(self) -> list[int]:
        return list(self.tensor_stride)

    def get_coordinate_size(self) -> int:
        return len(self.tensor_stride) + 1

    def is_key_set(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"coordinate map key:[{', '.join(map(str, self.tensor_stride))}]{self.string_id and ':' + self.string_id}"


class CoordinateManager:
    """Coordinate maps and kernel maps of one network (MinkowskiEngine's ``CoordinateManager``).

    ``coordinate_map_type``, ``allocator_type`` and ``minkowski_algorithm`` are accepted for
    MinkowskiEngine compatibility and ignored (the device follows the coordinates; there is
    one algorithm)."""

    def __init__(self, D: int = -1, coordinate_map_type=None, allocator_type=None,
                 minkowski_algorithm=None, num_threads: int = -1, **_ignored) -> None:
        if not isinstance(D, int) or D < 1:
            raise ValueError(f"CoordinateManager: D (the spatial dimension) must be a positive int. Got {D!r}.")
        self.D = D
        self.minkowski_algorithm = minkowski_algorithm
        self._maps: dict[CoordinateMapKey, CoordinateMap] = {}
        # lineage of strided maps: (input key, tensor stride) -> the map stride() made, and back
        self._strided: dict[tuple[CoordinateMapKey, tuple[int, ...]], CoordinateMapKey] = {}
        self._parent: dict[CoordinateMapKey, CoordinateMapKey] = {}
        self._kernel_maps: dict[tuple, KernelMap] = {}
        self._ids = itertools.count(1)
        self._field_maps: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # -------------------------------------------------------------- maps
    def _new_key(self, tensor_stride: tuple[int, ...], string_id: str = "") -> CoordinateMapKey:
        key = CoordinateMapKey(tuple(tensor_stride), string_id)
        while key in self._maps:
            key = CoordinateMapKey(tuple(tensor_stride), f"{string_id}_{next(self._ids)}")
        return key

    def insert(self, cmap: CoordinateMap, string_id: str = "") -> CoordinateMapKey:
        """Add an already-unique map under a fresh key."""
        key = self._new_key(cmap.tensor_stride, string_id)
        self._maps[key] = cmap
        return key

    def exists(self, key: CoordinateMapKey) -> bool:
        return key in self._maps

    def coordinate_map(self, key: CoordinateMapKey) -> CoordinateMap:
        try:
            return self._maps[key]
        except KeyError:
            raise KeyError(
                f"{key!r} is not a coordinate map of this coordinate manager (it has "
                f"{list(self._maps)}). Tensors combined in one operation must share a coordinate_manager."
            ) from None

    def insert_and_map(self, coordinates: torch.Tensor, tensor_stride: Sequence[int] = None,
                       string_id: str = "") -> tuple[CoordinateMapKey, tuple[torch.Tensor, torch.Tensor]]:
        """Quantize-free insertion: unique rows (first appearance) as a new map.

        Returns ``(key, (unique_index, inverse_mapping))``."""
        check_coordinates(coordinates, "CoordinateManager.insert_and_map")
        if coordinates.shape[1] - 1 != self.D:
            raise ValueError(
                f"CoordinateManager.insert_and_map: coordinates have {coordinates.shape[1] - 1} spatial "
                f"dimensions; this manager is for D={self.D}."
            )
        ts = as_stride(1 if tensor_stride is None else tensor_stride, self.D, "tensor_stride")
        if any(t != 1 for t in ts):
            s = torch.tensor([1, *ts], dtype=coordinates.dtype, device=coordinates.device)
            if bool((coordinates % s != 0).any()):
                raise ValueError(
                    f"CoordinateManager.insert_and_map: coordinates are not multiples of the tensor stride {ts}; "
                    "every coordinate of a tensor at stride s must be divisible by s."
                )
        # The map's index for kernels of size 2 and 3 comes with the uniqueness check (one table).
        uniq, inv, index = CoordinateIndex.build_unique(coordinates, ts, ts)
        if uniq.shape[0] == coordinates.shape[0]:  # already unique: uniq is 0 .. n - 1
            kept = coordinates.to(torch.int32, copy=True)
        else:
            kept = coordinates[uniq].to(torch.int32)
        cmap = CoordinateMap(kept, ts)
        if index is not None:
            cmap.adopt_index(index)
        return self.insert(cmap, string_id), (uniq, inv)

    def get_coordinates(self, key: CoordinateMapKey) -> torch.Tensor:
        return self.coordinate_map(key).coordinates

    def size(self, key: CoordinateMapKey) -> int:
        return len(self.coordinate_map(key))

    def number_of_unique_batch_indices(self) -> int:
        any_map = next(iter(self._maps.values()), None)
        return 0 if any_map is None else int(torch.unique(any_map.coordinates[:, 0]).numel())

    def stride(self, in_key: CoordinateMapKey, stride: Sequence[int], string_id: str = "",
               where: str = "CoordinateManager.stride") -> CoordinateMapKey:
        """The map at ``tensor_stride * stride`` of ``in_key`` (created once, then reused).  ``where``
        (the layer asking) names the error when a strided coordinate would leave int32."""
        stride = as_stride(stride, self.D)
        if all(s == 1 for s in stride):
            return in_key
        ts = tuple(a * b for a, b in zip(in_key.tensor_stride, stride))
        # Reused only if made from this very map: another map at the same stride (a tensor created
        # at that stride on this manager) is not this one's downsampling.
        out_key = self._strided.get((in_key, ts))
        if out_key is None:
            src = self.coordinate_map(in_key).coordinates
            strided = stride_coordinates(src, ts, where)
            uniq, _, index = CoordinateIndex.build_unique(strided, ts, ts)
            cmap = CoordinateMap(strided[uniq], ts)
            if index is not None:
                cmap.adopt_index(index)
            out_key = self._new_key(ts, string_id or in_key.string_id)
            self._maps[out_key] = cmap
            self._strided[(in_key, ts)] = out_key
            self._parent[out_key] = in_key
        return out_key

    def finer(self, key: CoordinateMapKey, tensor_stride: tuple[int, ...]) -> CoordinateMapKey | None:
        """The map at ``tensor_stride`` that ``key`` was downsampled from (through :meth:`stride`,
        any number of times), or None if ``key`` was not made that way."""
        while key in self._parent:
            key = self._parent[key]
            if key.tensor_stride == tuple(tensor_stride):
                return key
        return None

    def transposed_stride(self, in_key: CoordinateMapKey, stride: Sequence[int]) -> tuple[int, ...]:
        stride = as_stride(stride, self.D)
        if any(t % s for t, s in zip(in_key.tensor_stride, stride)):
            raise ValueError(
                f"a transposed stride {stride} does not divide the input's tensor stride {in_key.tensor_stride}; "
                "upsampling can only undo an earlier downsampling."
            )
        return tuple(t // s for t, s in zip(in_key.tensor_stride, stride))

    def stride_region(self, in_key: CoordinateMapKey, offsets: torch.Tensor, out_stride: tuple[int, ...],
                      expand_coordinates: bool, is_transpose: bool,
                      where: str = "CoordinateManager.stride_region") -> CoordinateMapKey:
        """MinkowskiEngine's ``stride_region``: the map at ``out_stride`` if it exists and no
        expansion is asked for; else every (aligned, unless transposed) ``coord + offset``.
        ``where`` (the layer asking) names the error when one would leave int32."""
        if is_transpose and not expand_coordinates:
            back = self.finer(in_key, tuple(out_stride))  # the map the matching downsampling came from
            if back is not None:
                return back
        out_key = CoordinateMapKey(tuple(out_stride), "")
        if out_key in self._maps and not expand_coordinates:
            return out_key
        src = self.coordinate_map(in_key).coordinates
        coords = expand_region(src, offsets, None if is_transpose else out_stride, where)
        cmap = CoordinateMap(coords, tuple(out_stride))
        if out_key in self._maps:
            return self.insert(cmap, "expanded")
        self._maps[out_key] = cmap
        return out_key

    def origin(self, in_key: CoordinateMapKey | None = None, batch: torch.Tensor | None = None) -> CoordinateMapKey:
        """The map of one point per batch index (``[b, 0, ..., 0]``, tensor stride 0), sorted by b,
        for the batch indices of ``in_key`` (or of ``batch``)."""
        if batch is None:
            src = self.coordinate_map(in_key) if in_key is not None else next(iter(self._maps.values()))
            batch = src.coordinates[:, 0]
        batches = torch.unique(batch)
        key = CoordinateMapKey((0,) * self.D, "origin")
        coords = torch.zeros(batches.numel(), self.D + 1, dtype=torch.int32, device=batches.device)
        coords[:, 0] = batches
        old = self._maps.get(key)
        if old is not None and torch.equal(old.coordinates, coords):
            return key
        cmap = CoordinateMap(coords, (0,) * self.D)
        if old is None:
            self._maps[key] = cmap
            return key
        return self.insert(cmap, "origin")

    def prune(self, in_key: CoordinateMapKey, keep: torch.Tensor) -> CoordinateMapKey:
        """A new map with the rows of ``in_key`` where ``keep`` is true, in the same order."""
        src = self.coordinate_map(in_key)
        return self.insert(CoordinateMap(src.coordinates[keep], src.tensor_stride), "pruned")

    def union(self, keys: Sequence[CoordinateMapKey]) -> tuple[CoordinateMapKey, list[torch.Tensor]]:
        """The union of maps at one tensor stride, and for each input the rows its points land on."""
        maps = [self.coordinate_map(k) for k in keys]
        strides = {m.tensor_stride for m in maps}
        if len(strides) != 1:
            raise ValueError(f"MinkowskiUnion: all inputs must have the same tensor stride. Got {sorted(strides)}.")
        allc = torch.cat([m.coordinates for m in maps])
        uniq, inv = unique_coordinates(allc)
        key = self.insert(CoordinateMap(allc[uniq], maps[0].tensor_stride), "union")
        rows = list(torch.split(inv, [len(m) for m in maps]))
        return key, rows

    # -------------------------------------------------------------- kernel maps
    def kernel_map(self, in_key: CoordinateMapKey, out_key: CoordinateMapKey, kernel_size: Sequence[int],
                   stride: Sequence[int] = None, dilation: Sequence[int] = None, region_type: str = "hypercube",
                   region_offsets: torch.Tensor | None = None, is_transpose: bool = False,
                   is_pool: bool = False) -> KernelMap:
        """The cached kernel map from ``in_key`` to ``out_key`` (see the module docstring)."""
        ks = as_stride(kernel_size, self.D, "kernel_size")
        st = as_stride(1 if stride is None else stride, self.D)
        dil = as_stride(1 if dilation is None else dilation, self.D, "dilation")
        roff = None if region_offsets is None else tuple(map(tuple, region_offsets.tolist()))
        key = (in_key, out_key, ks, st, dil, region_type, roff, is_transpose, is_pool)
        hit = self._kernel_maps.get(key)
        if hit is not None:
            return hit
        in_map, out_map = self.coordinate_map(in_key), self.coordinate_map(out_key)
        if is_transpose:
            fwd_key = (out_key, in_key, ks, st, dil, region_type, roff, False, is_pool)
            fwd = self._kernel_maps.get(fwd_key)
            if fwd is None:
                fwd = self._forward_map(out_map, in_map, ks, st, dil, region_type, region_offsets, is_pool)
                self._kernel_maps[fwd_key] = fwd
            km = fwd.transposed()
        else:
            km = self._forward_map(in_map, out_map, ks, st, dil, region_type, region_offsets, is_pool)
        self._kernel_maps[key] = km
        return km

    def _forward_map(self, in_map, out_map, ks, st, dil, region_type, region_offsets, is_pool) -> KernelMap:
        if is_pool and ks == st and in_map.tensor_stride != out_map.tensor_stride:
            # Pooling with kernel == stride: each input row goes to its strided parent
            # (MinkowskiEngine's stride_map), as in dense pooling without padding.
            parent = stride_coordinates(in_map.coordinates, out_map.tensor_stride)
            rows = out_map.index().lookup(parent)
            hit = rows >= 0
            itype = index_dtype(rows.device)
            ii = torch.nonzero(hit).squeeze(1).to(itype)
            return KernelMap(ii, rows[hit].to(itype), (0, int(ii.numel())), len(in_map), len(out_map))
        offsets = kernel_offsets(region_type, ks, dil, in_map.tensor_stride, region_offsets)
        return build_kernel_map(in_map, out_map, offsets)

    def clear_kernel_maps(self) -> None:
        self._kernel_maps.clear()

    # -------------------------------------------------------------- fields
    def set_field_map(self, field_id: int, key: CoordinateMapKey, inverse: torch.Tensor,
                      unique_index: torch.Tensor) -> None:
        self._field_maps[(field_id, key)] = (unique_index, inverse)

    def field_map(self, field_id: int, key: CoordinateMapKey) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._field_maps.get((field_id, key))

    def __repr__(self) -> str:
        maps = ", ".join(f"{k!r}: {len(v)}" for k, v in self._maps.items())
        return f"CoordinateManager(D={self.D}, maps={{{maps}}}, kernel_maps={len(self._kernel_maps)})"
