"""Coordinate maps and kernel maps: the format of spatially sparse tensors.

A :class:`CoordinateMap` is a set of integer coordinates ``[N, 1 + D]`` (batch
index first) at one tensor stride, with row ``i`` being the ``i``-th point.  It
answers "which row holds this coordinate?" for many queries at once through a
:class:`CoordinateIndex`: every coordinate is packed into one int64 key by a
mixed-radix code over the map's bounding box, and keys are looked up either in
a dense table over the box (when the box is small, as it is for voxelized
scenes) or by binary search in the sorted keys.  No Python loop runs per point.

A :class:`KernelMap` lists, for each kernel offset ``k``, the pairs
``(in_row, out_row)`` such that ``out_coord + offset_k == in_coord``: the
gather / scatter indices of a sparse convolution.  Pairs are grouped by offset
(``k_offsets`` gives each group's slice); indices are int32 on CUDA (what the
kernels read) and int64 on the CPU (:func:`index_dtype`).

Kernel offsets follow MinkowskiEngine's ``HYPER_CUBE`` / ``HYPER_CROSS`` order:
the first spatial axis varies fastest; an odd size ``k`` spans
``-(k // 2) .. k // 2``, an even size ``0 .. k - 1``; each step is
``dilation * tensor_stride`` on its axis.

Example:
    >>> import torch
    >>> m = CoordinateMap(torch.tensor([[0, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.int32), (1, 1))
    >>> m.index().lookup(torch.tensor([[0, 1, 0], [0, 5, 5]], dtype=torch.int32)).tolist()
    [1, -1]
    >>> kernel_offsets("hypercube", (3, 3), (1, 1), (1, 1))[:4].tolist()
    [[-1, -1], [0, -1], [1, -1], [-1, 0]]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "REGION_TYPES",
    "CoordinateIndex",
    "CoordinateMap",
    "KernelMap",
    "build_kernel_map",
    "check_batch_indices",
    "check_coordinate_range",
    "check_coordinates",
    "expand_region",
    "floor_coordinates",
    "index_dtype",
    "kernel_offsets",
    "kernel_volume",
    "stride_coordinates",
    "unique_coordinates",
]

REGION_TYPES = ("hypercube", "hypercross", "custom")
# A dense lookup table is used when the padded bounding box has at most this many
# cells (an int32 table of 256 MiB) and at most _DENSE_PER_POINT cells per point.
_DENSE_MAX_CELLS = 1 << 26
_DENSE_PER_POINT = 256
# Above this many output points the kernel-map builder queries the table in key order (the
# table reads then walk memory forward).  Below it the table stays in cache and the sort
# (torch's CPU sort: ~60 ns a key) costs more than it saves.
_KEY_ORDER_MIN = 1 << 16
_INT64_SAFE = 1 << 62
# Coordinate maps hold int32 coordinates (what MinkowskiEngine and the CUDA kernels use).
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
_RANGE_HINT = ("quantize the points with a larger quantization_size (sparsify.spatial.utils.sparse_quantize) "
               "or shift them (subtract their minimum) so that every coordinate fits")


def _dot(rel: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """``rel @ mult`` for int64 ``[n, D] x [D]``.  On CUDA elementwise and summed: CUDA has no
    integer matmul (``addmv_impl_cuda`` is not implemented for Long; found on an H200, out of the
    CPU emulator's sight since this is torch code around the kernels).  On the CPU the matmul,
    about a quarter faster than the elementwise form at 1M points."""
    return rel @ mult if rel.device.type == "cpu" else (rel * mult).sum(-1)


def index_dtype(device: torch.device) -> torch.dtype:
    """The dtype of kernel-map indices on ``device``: int32 on CUDA (what the kernels read),
    int64 on the CPU (torch's CPU ``index_add_`` is several times slower with int32).

    Example:
        >>> index_dtype(torch.device("cpu"))
        torch.int64
    """
    return torch.int32 if device.type == "cuda" else torch.int64


def check_coordinates(coords: torch.Tensor, where: str) -> None:
    """Raise a specific error unless ``coords`` is an integer ``[N, 1 + D]`` tensor with D >= 1.

    Example:
        >>> check_coordinates(torch.zeros(3, 4, dtype=torch.int32), "here")
    """
    if not isinstance(coords, torch.Tensor):
        raise TypeError(f"{where}: expected coordinates as a torch.Tensor. Got {type(coords).__name__}.")
    if coords.dim() != 2 or coords.shape[1] < 2:
        raise ValueError(
            f"{where}: expected coordinates of shape [N, 1 + D] (batch index first, D >= 1). "
            f"Got shape {tuple(coords.shape)}; use sparsify.spatial.utils.batched_coordinates to add the batch column."
        )
    if coords.dtype.is_floating_point or coords.dtype == torch.bool or coords.is_complex():
        raise TypeError(
            f"{where}: expected integer coordinates (int32). Got {coords.dtype}; quantize them first "
            "(sparsify.spatial.utils.sparse_quantize, or a TensorField)."
        )
    check_coordinate_range(coords, where)
    check_batch_indices(coords, where)


def check_batch_indices(coords: torch.Tensor, where: str) -> None:
    """Raise a ValueError naming the first row of ``coords`` ``[N, 1 + D]`` whose batch index (column 0;
    floored, for floating input) is negative.  Batch indices number the items of a batch 0, 1, ...;
    a negative one is no item, yet would be kept as a batch of its own (decomposition, pooling,
    ``dense``).  One pass over the batch column; NaN is left to :func:`check_coordinate_range`.

    Example:
        >>> check_batch_indices(torch.tensor([[0, 5], [-1, 2]]), "here")
        Traceback (most recent call last):
            ...
        ValueError: here: row 1 has batch index -1 (column 0 of the coordinates); batch indices must be >= 0...
    """
    if coords.dim() != 2 or coords.shape[0] == 0 or coords.dtype == torch.bool:
        return
    b = coords[:, 0]
    if not bool(b.min() < 0):
        return
    bad = b < 0
    rows = int(bad.sum())
    first = int(torch.nonzero(bad)[0, 0])
    more = f" ({rows} rows are affected)" if rows > 1 else ""
    raise ValueError(f"{where}: row {first} has batch index {b[first].item()!r} (column 0 of the coordinates); "
                     f"batch indices must be >= 0{more}, since each value names one item of the batch and a "
                     "negative one would become a batch of its own. Number the items 0, 1, ... "
                     "(sparsify.spatial.utils.batched_coordinates does) or drop those rows.")


def check_coordinate_range(coords: torch.Tensor, where: str, hint: str = _RANGE_HINT, what: str = "coordinate",
                           source: torch.Tensor | None = None, source_unit: str = "") -> None:
    """Raise a ValueError naming the first entry of ``coords`` ``[N, C]`` that a coordinate map
    cannot hold: not finite, or (floored, for floating input) outside int32; ``hint`` says what
    to do about a value out of range.  Vectorized: one comparison pass, none for int32 input.
    ``source`` (same shape), when given, is the value named, ``coords`` shown as its value
    ``source_unit`` (e.g. points before and after dividing by the voxel size).

    Example:
        >>> check_coordinate_range(torch.tensor([[0, 1], [0, 2**32]]), "here")
        Traceback (most recent call last):
            ...
        ValueError: here: coordinate row 1, column 1 is 4294967296, outside the int32 range [-2147483648, 2147483647] coordinate maps use; quantize the points ...
    """
    dt = coords.dtype
    if coords.numel() == 0 or dt == torch.bool:
        return
    if not dt.is_floating_point and torch.iinfo(dt).min >= INT32_MIN and torch.iinfo(dt).max <= INT32_MAX:
        return
    c = coords.float() if dt.is_floating_point and dt.itemsize < 4 else coords  # 2^31 is inf in half precision
    # floor(c) fits iff INT32_MIN <= c < INT32_MAX + 1; NaN propagates into the bounds and fails both
    lo, hi = torch.aminmax(c)
    if bool(lo >= INT32_MIN) and bool(hi < INT32_MAX + 1):
        return
    bad = ~((c >= INT32_MIN) & (c < INT32_MAX + 1))
    rows = int(bad.any(1).sum()) if bad.dim() == 2 else int(bad.sum())
    first = tuple(torch.nonzero(bad)[0].tolist())
    v = coords[first].item()
    shown = repr(v)
    if source is not None:
        shown = f"{source[first].item()!r} ({v!r} {source_unit})".replace(" )", ")")
    at = f"row {first[0]}" + (f", column {first[1]}" if len(first) > 1 else "")
    more = f" ({rows} rows are affected)" if rows > 1 else ""
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{where}: {what} {at} is {shown}, not a finite number{more}; drop or repair the points "
                         "that are not finite first.")
    raise ValueError(f"{where}: {what} {at} is {shown}, outside the int32 range [{INT32_MIN}, {INT32_MAX}] "
                     f"coordinate maps use{more}; {hint}.")


def floor_coordinates(coords: torch.Tensor, where: str, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """``floor(coords)`` as ``dtype`` (integer input: cast), after :func:`check_coordinate_range`:
    never a silent wrap of a NaN, an infinity or a value outside int32.

    Example:
        >>> floor_coordinates(torch.tensor([[0.0, -0.5, 2.7]]), "here").tolist()
        [[0, -1, 2]]
    """
    if not dtype.is_floating_point:
        check_coordinate_range(coords, where)
    if coords.dtype.is_floating_point:
        coords = torch.floor(coords)
    return coords.to(dtype)


# --------------------------------------------------------------------- kernels
def kernel_volume(region_type: str, kernel_size: Sequence[int], offsets: torch.Tensor | None = None) -> int:
    """Number of offsets of a kernel region.

    Example:
        >>> kernel_volume("hypercube", (3, 3, 3)), kernel_volume("hypercross", (3, 3, 3))
        (27, 7)
    """
    if region_type == "hypercube":
        return math.prod(kernel_size)
    if region_type == "hypercross":
        return 1 + sum(k - 1 for k in kernel_size)
    if region_type == "custom":
        if offsets is None:
            raise ValueError("region_type 'custom' needs region_offsets of shape [K, D].")
        return int(offsets.shape[0])
    raise ValueError(f"unknown region_type {region_type!r}; expected one of {REGION_TYPES}.")


@functools.lru_cache(maxsize=256)
def _kernel_offsets_cached(region_type: str, kernel_size: tuple, dilation: tuple, tensor_stride: tuple) -> torch.Tensor:
    return _kernel_offsets(region_type, kernel_size, dilation, tensor_stride, None)


def kernel_offsets(
    region_type: str,
    kernel_size: Sequence[int],
    dilation: Sequence[int],
    tensor_stride: Sequence[int],
    region_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernel's offsets ``[K, D]`` (int64) in MinkowskiEngine's order, in coordinate units.

    ``custom`` offsets are given in units of ``dilation * tensor_stride`` per axis.  The
    offsets of a shape (not of custom ones) are computed once per process (a fresh copy is
    returned every call).

    Example:
        >>> kernel_offsets("hypercube", (2,), (1,), (4,)).tolist()
        [[0], [4]]
        >>> kernel_offsets("hypercross", (3, 3), (1, 1), (1, 1)).tolist()
        [[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]]
    """
    if region_type in ("hypercube", "hypercross"):
        key = (region_type, tuple(int(k) for k in kernel_size), tuple(int(d) for d in dilation),
               tuple(int(t) for t in tensor_stride))
        return _kernel_offsets_cached(*key).clone()
    return _kernel_offsets(region_type, kernel_size, dilation, tensor_stride, region_offsets)


def _kernel_offsets(region_type: str, kernel_size: Sequence[int], dilation: Sequence[int], tensor_stride: Sequence[int],
                    region_offsets: torch.Tensor | None) -> torch.Tensor:
    d = len(kernel_size)
    step = torch.tensor([int(a) * int(b) for a, b in zip(dilation, tensor_stride)], dtype=torch.int64)
    if region_type == "hypercube":
        axes = []
        for k in kernel_size:
            r = torch.arange(k, dtype=torch.int64)
            axes.append(r - k // 2 if k % 2 else r)
        # meshgrid with the LAST axis slowest: index k = a0 + K0 * (a1 + K1 * a2 ...)
        grids = torch.meshgrid(*reversed(axes), indexing="ij")
        units = torch.stack([g.reshape(-1) for g in reversed(grids)], dim=1)
        return units * step
    if region_type == "hypercross":
        if any(k % 2 == 0 for k in kernel_size):
            raise ValueError(f"region_type 'hypercross' needs odd kernel sizes. Got {tuple(kernel_size)}.")
        rows = [torch.zeros(d, dtype=torch.int64)]
        for axis, k in enumerate(kernel_size):
            r = (k - 1) // 2
            for ind in range(k - 1):
                v = torch.zeros(d, dtype=torch.int64)
                v[axis] = ind + 1 if ind < r else ind - 2 * r
                rows.append(v)
        return torch.stack(rows) * step
    if region_type == "custom":
        if region_offsets is None or region_offsets.dim() != 2 or region_offsets.shape[1] != d:
            raise ValueError(
                f"region_type 'custom' needs region_offsets of shape [K, {d}]. "
                f"Got {None if region_offsets is None else tuple(region_offsets.shape)}."
            )
        return region_offsets.to(torch.int64).cpu() * step
    raise ValueError(f"unknown region_type {region_type!r}; expected one of {REGION_TYPES}.")


# ------------------------------------------------------------------- indexing
@dataclass
class CoordinateIndex:
    """Lookup of coordinates in one map: a mixed-radix int64 key over a padded box.

    ``pad`` (per spatial axis) is how far queries may stray outside the map's box
    and still be encoded without wrapping; queries further out are misses."""

    lo: torch.Tensor  # int64 [1 + D], lowest encodable coordinate per column
    step: torch.Tensor  # int64 [1 + D], the tensor stride (1 for the batch column): keys count cells
    hi: torch.Tensor  # int64 [1 + D], highest encodable coordinate per column
    mult: torch.Tensor  # int64 [1 + D], key = sum((c - lo) * mult)
    table: torch.Tensor | None  # int32 [cells] row or -1 (dense mode)
    sorted_keys: torch.Tensor | None  # int64 [N] (search mode)
    order: torch.Tensor | None  # int64 [N] row of each sorted key
    n: int
    pad: tuple[int, ...] = ()  # per spatial axis: lo and hi are the points' bounds -/+ 2 * pad

    @staticmethod
    def _box(coords: torch.Tensor, pad: Sequence[int], tensor_stride: Sequence[int] | None):
        """``(lo, step, hi, mult, cells, keys)`` of the padded box around ``coords``."""
        c = coords.to(torch.int64)
        n, cols = c.shape
        ts = [max(int(t), 1) for t in (tensor_stride or [1] * (cols - 1))]
        step = torch.tensor([1, *ts], dtype=torch.int64, device=c.device)
        # pad is a multiple of the tensor stride (offsets are), so lo stays on the lattice
        padv = torch.tensor([0, *[2 * int(p) for p in pad]], dtype=torch.int64, device=c.device)
        if n:
            lo = c.amin(0) - padv
            hi = c.amax(0) + padv
        else:
            lo = torch.zeros(cols, dtype=torch.int64, device=c.device)
            hi = lo.clone()
        ext = ((hi - lo) // step + 1).tolist()
        mult_l, acc = [], 1
        for e in reversed(ext):
            mult_l.append(acc)
            acc *= e
        if acc >= _INT64_SAFE:
            raise ValueError(
                f"sparsify.spatial: the coordinates span a box of {ext} cells, too large to index with "
                "64-bit keys; shift or quantize them into a smaller range."
            )
        mult = torch.tensor(list(reversed(mult_l)), dtype=torch.int64, device=c.device)
        rel = c - lo
        if any(t != 1 for t in ts):
            rel = rel // step
        keys = _dot(rel, mult) if n else torch.zeros(0, dtype=torch.int64, device=c.device)
        return lo, step, hi, mult, acc, keys

    @staticmethod
    def _dense(cells: int, n: int) -> bool:
        return bool(n) and cells <= _DENSE_MAX_CELLS and cells <= max(_DENSE_PER_POINT * n, 1 << 20)

    @classmethod
    def build(cls, coords: torch.Tensor, pad: Sequence[int], tensor_stride: Sequence[int] | None = None) -> CoordinateIndex:
        lo, step, hi, mult, acc, keys = cls._box(coords, pad, tensor_stride)
        n = coords.shape[0]
        if cls._dense(acc, n):
            table = torch.full((acc,), -1, dtype=torch.int32, device=coords.device)
            # Several rows with one key (unquantized input) keep the LAST row here;
            # maps are unique by construction, so this only matters for misuse.
            table[keys] = torch.arange(n, dtype=torch.int32, device=coords.device)
            return cls(lo, step, hi, mult, table, None, None, n, tuple(pad))
        sorted_keys, order = torch.sort(keys)
        return cls(lo, step, hi, mult, None, sorted_keys, order, n, tuple(pad))

    @classmethod
    def build_unique(cls, coords: torch.Tensor, pad: Sequence[int], tensor_stride: Sequence[int] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, CoordinateIndex | None]:
        """:func:`unique_coordinates` of ``coords`` (on the ``tensor_stride`` lattice) and, where the
        padded box is small enough for a dense table, the index of the unique rows with that
        ``pad``: one table answers both, with no sort.  ``(unique_index, inverse, index or None)``.

        Example:
            >>> c = torch.tensor([[0, 4], [0, 2], [0, 4], [0, 8]], dtype=torch.int32)
            >>> u, inv, idx = CoordinateIndex.build_unique(c, (2,), (2,))
            >>> u.tolist(), inv.tolist(), idx.lookup(torch.tensor([[0, 8], [0, 6]])).tolist()
            ([0, 1, 3], [0, 1, 0, 2], [2, -1])
        """
        n = coords.shape[0]
        lo, step, hi, mult, acc, keys = cls._box(coords, pad, tensor_stride)
        # Stricter than an index's rule: a sort of few keys beats filling a large table.
        if not (cls._dense(acc, n) and acc <= _DENSE_PER_POINT * n):
            uniq, inv = unique_coordinates(coords)
            return uniq, inv, None
        dev = coords.device
        table = torch.full((acc,), -1, dtype=torch.int32, device=dev)
        rows = torch.arange(n, dtype=torch.int32, device=dev)
        table.index_put_((keys,), rows)  # with repeated keys one of their rows lands: the check below sees it
        if torch.equal(table.index_select(0, keys), rows):  # already unique: the common case
            r = torch.arange(n, device=dev)
            return r, r.clone(), cls(lo, step, hi, mult, table, None, None, n, tuple(pad))
        # The first row of each key (the largest n - 1 - row), in order of first appearance.
        table.fill_(-1)
        rev = torch.sub(n - 1, rows)
        table.scatter_reduce_(0, keys, rev, reduce="amax")
        first = torch.nonzero(table.index_select(0, keys) == rev).squeeze(1)
        m = first.shape[0]
        table.index_put_((keys.index_select(0, first),), torch.arange(m, dtype=torch.int32, device=dev))
        inv = table.index_select(0, keys).to(torch.int64)
        return first, inv, cls(lo, step, hi, mult, table, None, None, m, tuple(pad))

    def encode(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, inside)`` for query coordinates ``[M, 1 + D]``."""
        d = q.to(torch.int64) - self.lo
        inside = ((d >= 0) & (q <= self.hi) & (d % self.step == 0)).all(1)
        keys = ((d // self.step) * self.mult).sum(1)
        return keys, inside

    def lookup_keys(self, keys: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        """Row (int64) of each key, -1 where absent or outside the box."""
        if self.n == 0:
            return torch.full_like(keys, -1)
        if self.table is not None:
            safe = torch.where(inside, keys, torch.zeros_like(keys))
            rows = self.table[safe].to(torch.int64)
            return torch.where(inside, rows, torch.full_like(rows, -1))
        pos = torch.searchsorted(self.sorted_keys, keys).clamp_max(self.n - 1)
        hit = (self.sorted_keys[pos] == keys) & inside
        return torch.where(hit, self.order[pos], torch.full_like(pos, -1))

    @property
    def unit_step(self) -> bool:
        """Whether every column's step is 1 (no division needed to encode)."""
        hit = getattr(self, "_unit", None)
        if hit is None:
            hit = self._unit = bool((self.step == 1).all())
        return hit

    def rows_of_inside_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """Row of each key known to lie inside the padded box (-1 where absent); int32 or int64."""
        if self.n == 0:
            return torch.full_like(keys, -1)
        if self.table is not None:
            return self.table.index_select(0, keys)
        pos = torch.searchsorted(self.sorted_keys, keys).clamp_max(self.n - 1)
        hit = self.sorted_keys.index_select(0, pos) == keys
        return torch.where(hit, self.order.index_select(0, pos), torch.full_like(pos, -1))

    def lookup(self, q: torch.Tensor) -> torch.Tensor:
        """Row of each query coordinate (int64), -1 where absent."""
        keys, inside = self.encode(q)
        return self.lookup_keys(keys, inside)


@dataclass(eq=False)
class CoordinateMap:
    """Unique integer coordinates ``[N, 1 + D]`` (int32, batch first) at one tensor stride."""

    coordinates: torch.Tensor
    tensor_stride: tuple[int, ...]
    _indexes: dict = field(default_factory=dict, repr=False)
    _bounds: tuple | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_coordinates(self.coordinates, "CoordinateMap")
        if self.coordinates.dtype != torch.int32:
            self.coordinates = self.coordinates.to(torch.int32)
        self.tensor_stride = tuple(int(s) for s in self.tensor_stride)
        if len(self.tensor_stride) != self.dimension:
            raise ValueError(
                f"CoordinateMap: tensor_stride {self.tensor_stride} has {len(self.tensor_stride)} entries; "
                f"the coordinates have {self.dimension} spatial dimensions."
            )

    @property
    def dimension(self) -> int:
        return self.coordinates.shape[1] - 1

    def __len__(self) -> int:
        return self.coordinates.shape[0]

    def index(self, pad: Sequence[int] | None = None) -> CoordinateIndex:
        """The lookup structure for queries up to ``pad`` outside the box (cached per pad; an
        index built for a larger pad on every axis serves a smaller one)."""
        key = tuple(int(p) for p in pad) if pad is not None else (0,) * self.dimension
        idx = self._indexes.get(key)
        if idx is None:
            for have, cand in self._indexes.items():
                if all(a >= b for a, b in zip(have, key)):
                    return cand
            idx = CoordinateIndex.build(self.coordinates, key, self.tensor_stride)
            self._indexes[key] = idx
        return idx

    def adopt_index(self, index: CoordinateIndex) -> None:
        """Keep ``index`` (built over exactly this map's rows, e.g. by
        :meth:`CoordinateIndex.build_unique`) for queries up to its ``pad``."""
        if index.n != len(self):
            raise ValueError(f"CoordinateMap.adopt_index: the index has {index.n} rows; the map has {len(self)}.")
        self._indexes[tuple(index.pad)] = index

    @property
    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lowest, highest)`` coordinate per column (int64) of a non-empty map, cached (read off
        an index when one exists)."""
        b = self._bounds
        if b is None:
            idx = next(iter(self._indexes.values()), None)
            if idx is not None and idx.pad and idx.n:
                padv = torch.tensor([0, *[2 * p for p in idx.pad]], dtype=torch.int64, device=idx.lo.device)
                b = (idx.lo + padv, idx.hi - padv)
            else:
                c = self.coordinates.to(torch.int64)
                b = (c.amin(0), c.amax(0))
            self._bounds = b
        return b


# ------------------------------------------------------------------ unique / stride
def unique_coordinates(coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(unique_index, inverse_mapping)``: the first row of each distinct coordinate, in order of
    first appearance (MinkowskiEngine's CPU order), and for each row the position of its coordinate.

    Example:
        >>> c = torch.tensor([[0, 5], [0, 2], [0, 5], [1, 2]])
        >>> [t.tolist() for t in unique_coordinates(c)]
        [[0, 1, 3], [0, 1, 0, 2]]
    """
    n = coords.shape[0]
    if n == 0:
        z = torch.zeros(0, dtype=torch.int64, device=coords.device)
        return z, z.clone()
    c = coords.to(torch.int64)
    lo = c.amin(0)
    ext = (c.amax(0) - lo + 1).tolist()
    if math.prod(ext) < _INT64_SAFE:
        mult_l, acc = [], 1
        for e in reversed(ext):
            mult_l.append(acc)
            acc *= e
        mult = torch.tensor(list(reversed(mult_l)), dtype=torch.int64, device=c.device)
        keys = _dot(c - lo, mult)
        sorted_keys, _ = torch.sort(keys)
        if not bool((sorted_keys[1:] == sorted_keys[:-1]).any()):  # already unique: the common case
            r = torch.arange(n, device=c.device)
            return r, r.clone()
        _, inv = torch.unique(keys, return_inverse=True)
    else:
        _, inv = torch.unique(c, dim=0, return_inverse=True)
    m = int(inv.max()) + 1
    first = torch.full((m,), n, dtype=torch.int64, device=c.device)
    first.scatter_reduce_(0, inv, torch.arange(n, device=c.device), reduce="amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(m, device=c.device)
    return first[order], rank[inv]


def stride_coordinates(coords: torch.Tensor, tensor_stride: Sequence[int], where: str = "stride_coordinates"
                       ) -> torch.Tensor:
    """``floor(c / s) * s`` on the spatial columns (the coordinates a strided map holds).

    A stride that does not divide 2^31 can floor an int32 coordinate near ``INT32_MIN`` below
    it: that raises (naming ``where`` and the stride) instead of wrapping.

    Example:
        >>> stride_coordinates(torch.tensor([[0, -1, 3]], dtype=torch.int32), (2, 2)).tolist()
        [[0, -2, 2]]
    """
    s = torch.tensor([1, *tensor_stride], dtype=coords.dtype, device=coords.device)
    out = torch.div(coords, s, rounding_mode="floor") * s
    # floor(c / s) * s <= c; in int32 only a wrap past INT32_MIN can make it larger, and only
    # for a stride that is not a power of two (INT32_MIN is a multiple of every other one).
    if coords.dtype == torch.int32 and coords.shape[0] and any(int(t) & (int(t) - 1) for t in tensor_stride):
        wrapped = (out > coords).any(1)
        if bool(wrapped.any()):
            r = int(torch.nonzero(wrapped)[0])
            raise ValueError(
                f"{where}: coordinate row {r} {coords[r].tolist()} at tensor stride {tuple(tensor_stride)} floors to "
                f"below {INT32_MIN}, outside the int32 range coordinate maps use; shift the coordinates toward 0."
            )
    return out


def expand_region(coords: torch.Tensor, offsets: torch.Tensor, out_stride: Sequence[int] | None,
                  where: str = "expand_region") -> torch.Tensor:
    """Every ``coord + offset`` (optionally only those aligned to ``out_stride``), unique, in order
    of first appearance with coordinates outer and offsets inner (MinkowskiEngine's
    ``stride_region``: generative transposed convolution and ``expand_coordinates``).

    An output coordinate outside int32 raises (naming ``where``, the input row and the offset)
    instead of wrapping.

    Example:
        >>> c = torch.tensor([[0, 0]], dtype=torch.int32)
        >>> expand_region(c, torch.tensor([[0], [1]]), None).tolist()
        [[0, 0], [0, 1]]
    """
    k = offsets.shape[0]
    off = torch.cat([torch.zeros(k, 1, dtype=torch.int64), offsets.to(torch.int64)], 1).to(coords.device)
    cand = (coords.to(torch.int64)[:, None, :] + off[None]).reshape(-1, coords.shape[1])
    keep = None
    if out_stride is not None:
        s = torch.tensor(list(out_stride), dtype=torch.int64, device=coords.device)
        keep = (cand[:, 1:] % s == 0).all(1)
    if coords.shape[0] and k:
        # The bounds decide for every candidate at once; only a map at the edge of int32 looks closer.
        lo = coords[:, 1:].amin(0).to(torch.int64).cpu() + off[:, 1:].amin(0).cpu()
        hi = coords[:, 1:].amax(0).to(torch.int64).cpu() + off[:, 1:].amax(0).cpu()
        if bool((lo < INT32_MIN).any() or (hi > INT32_MAX).any()):
            bad = ((cand[:, 1:] < INT32_MIN) | (cand[:, 1:] > INT32_MAX)).any(1)
            if keep is not None:
                bad &= keep
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0])
                raise ValueError(
                    f"{where}: output coordinate {cand[i].tolist()} (input row {i // k} {coords[i // k].tolist()} + "
                    f"kernel offset {off[i % k, 1:].tolist()}) is outside the int32 range [{INT32_MIN}, {INT32_MAX}] "
                    "coordinate maps use; shift the input coordinates toward 0."
                )
    if keep is not None:
        cand = cand[keep]
    first, _ = unique_coordinates(cand)
    return cand[first].to(torch.int32)


# ------------------------------------------------------------------ kernel maps
def hash_free_device(device: torch.device) -> bool:
    return device.type == "cpu"


def _hash_executor(device: torch.device):
    """The executor whose hash kernels build kernel maps on ``device`` (None: torch lookups)."""
    if device.type == "cpu":
        return None
    from .ops import spatial_executor_for

    ex = spatial_executor_for(device)
    return ex if hasattr(ex, "hash_table") else None


@dataclass(eq=False)
class KernelMap:
    """Gather / scatter pairs of a sparse convolution, grouped by kernel offset.

    ``in_idx[p]`` / ``out_idx[p]`` (:func:`index_dtype`) for ``p`` in ``k_offsets[k] .. k_offsets[k + 1]``
    are the pairs of offset ``k``.  ``identity_k`` is the offset whose pairs are exactly
    ``(i, i)`` for every row ``i = 0 .. n - 1`` in order (the centre of a same-map odd
    kernel), or -1: executors run it as one dense product without gather or scatter."""

    in_idx: torch.Tensor
    out_idx: torch.Tensor
    k_offsets: tuple[int, ...]
    n_in: int
    n_out: int
    identity_k: int = -1

    @property
    def volume(self) -> int:
        return len(self.k_offsets) - 1

    @property
    def pairs(self) -> int:
        return self.k_offsets[-1]

    def transposed(self) -> KernelMap:
        """The same pairs with input and output swapped (transposed convolution)."""
        return KernelMap(self.out_idx, self.in_idx, self.k_offsets, self.n_out, self.n_in, self.identity_k)

    def to(self, device: torch.device) -> KernelMap:
        return KernelMap(self.in_idx.to(device), self.out_idx.to(device), self.k_offsets,
                         self.n_in, self.n_out, self.identity_k)


def _bags_signature(rows: torch.Tensor, k_offsets: Sequence[int], n: int, identity_k: int) -> tuple:
    return rows._version, rows.shape[0], tuple(int(v) for v in k_offsets), int(n), int(identity_k)


def pair_bags_built(rows: torch.Tensor, k_offsets: Sequence[int], n: int, identity_k: int = -1) -> bool:
    """Whether :func:`pair_bags` of these arguments is cached already (a call costs nothing).

    Example:
        >>> rows = torch.tensor([1, 0, 1, 2])
        >>> before = pair_bags_built(rows, (0, 1, 4), 3); _ = pair_bags(rows, (0, 1, 4), 3)
        >>> before, pair_bags_built(rows, (0, 1, 4), 3)
        (False, True)
    """
    hit = getattr(rows, "_sparsify_bags", None)
    return hit is not None and hit[0] == _bags_signature(rows, k_offsets, n, identity_k)


def pair_bags(rows: torch.Tensor, k_offsets: Sequence[int], n: int,
              identity_k: int = -1) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The pairs of a kernel map grouped by the row they reduce into: ``(order, ptr)`` (int32),
    the positions (into the offset-grouped pair list) of the pairs of row ``r`` being
    ``order[ptr[r]:ptr[r + 1]]``, the identity offset's pair first, then by ascending offset.

    ``rows`` is ``out_idx`` (forward: the rows ``y`` sums into) or ``in_idx`` (input gradient),
    with ``n`` rows on that side.  This is the order the reference gather-GEMM-scatter adds
    the products in (the identity product starts the sum, then offset by offset), so a
    segmented sum in this order reproduces it exactly.  Needs each row at most once per
    offset (true of every convolution map); otherwise returns None.  The result is
    cached on ``rows`` (kernel maps are immutable; the cache is checked against the tensor's
    version counter), so every layer and backward pass over one map builds it once.

    Example:
        >>> order, ptr = pair_bags(torch.tensor([1, 0, 1, 2]), (0, 1, 4), 3)
        >>> order.tolist(), ptr.tolist()
        ([1, 0, 2, 3], [0, 1, 3, 4])
    """
    sig = _bags_signature(rows, k_offsets, n, identity_k)
    hit = getattr(rows, "_sparsify_bags", None)
    if hit is not None and hit[0] == sig:
        return hit[1]
    k_vol = len(k_offsets) - 1
    pairs = int(k_offsets[-1])
    dev = rows.device
    if pairs >= 2**31:
        return None  # beyond the int32 positions a segmented sum takes
    # A counting sort by row, offset by offset in bag order: each offset's pairs take the
    # next free slot of their rows (a row occurs at most once per offset).
    ptr = torch.zeros(n + 1, dtype=torch.int32, device=dev)
    if pairs:
        torch.cumsum(torch.bincount(rows, minlength=n), 0, out=ptr[1:])
    cursor = ptr[:-1].clone()
    order = torch.empty(pairs, dtype=torch.int32, device=dev)
    positions = torch.arange(pairs, dtype=torch.int32, device=dev)
    for k in ([identity_k] if 0 <= identity_k < k_vol else []) + [k for k in range(k_vol) if k != identity_k]:
        a, b = int(k_offsets[k]), int(k_offsets[k + 1])
        if b == a:
            continue
        r = rows[a:b]
        slot = cursor.index_select(0, r)
        order.scatter_(0, slot.to(torch.int64), positions[a:b])
        cursor.scatter_(0, r.to(torch.int64), slot.add_(1))
    out = (order, ptr)
    if pairs and not bool(torch.equal(cursor, ptr[1:])):
        out = None  # a row twice in one offset (a pooling map): no such grouping
    rows._sparsify_bags = (sig, out)
    return out


@functools.lru_cache(maxsize=256)
def _mirrors(offsets: tuple) -> dict[int, int]:
    """``{k: j}`` for every offset ``k`` whose negation is an earlier offset ``j`` (read-only)."""
    pos = {o: k for k, o in enumerate(offsets)}
    mirror = {}
    for k, o in enumerate(offsets):
        j = pos.get(tuple(-v for v in o))
        if j is not None and j < k:
            mirror[k] = j
    return mirror


def build_kernel_map(in_map: CoordinateMap, out_map: CoordinateMap, offsets: torch.Tensor) -> KernelMap:
    """Pairs ``(i, o)`` with ``out_map[o] + offsets[k] == in_map[i]``, grouped by offset.

    Example:
        >>> a = CoordinateMap(torch.tensor([[0, 0], [0, 1], [0, 3]], dtype=torch.int32), (1,))
        >>> km = build_kernel_map(a, a, kernel_offsets("hypercube", (3,), (1,), (1,)))
        >>> km.k_offsets, km.in_idx.tolist(), km.out_idx.tolist(), km.identity_k
        ((0, 1, 4, 5), [0, 0, 1, 2, 1], [1, 0, 1, 2, 0], 1)
    """
    offsets = offsets.to(torch.int64)
    dev = out_map.coordinates.device
    itype = index_dtype(dev)
    pad = offsets.abs().amax(0).tolist() if offsets.numel() else [0] * in_map.dimension
    index = in_map.index(pad)
    oc = out_map.coordinates.to(torch.int64)
    # Out points more than `pad` outside the input box have no neighbours; the
    # rest stay inside the padded box after any offset, so a key shift is exact.
    padv = torch.tensor([0, *pad], device=dev)
    # Out points off the input's lattice (a tensor-stride multiple) have none either.
    rel = oc - index.lo
    unit = index.unit_step
    # The box's lo is on the input's lattice, so an output stride that is a multiple of the
    # input's keeps every out point on it; then the out map's bounds decide for all points.
    aligned = unit or all(o % max(i, 1) == 0 for o, i in zip(out_map.tensor_stride, in_map.tensor_stride))
    if oc.shape[0] == 0:
        all_near = True
    elif aligned:
        omin, omax = out_map.bounds
        all_near = bool(((omin >= index.lo + padv) & (omax <= index.hi - padv)).all())
    else:
        all_near = False
    if all_near:
        rows_near = torch.arange(oc.shape[0], dtype=itype, device=dev)
    else:
        near = ((oc >= index.lo + padv) & (oc <= index.hi - padv)).all(1)
        if not unit:
            near &= (rel % index.step == 0).all(1)
        rows_near = torch.nonzero(near).squeeze(1).to(itype)
        rel = rel.index_select(0, rows_near)
    base = _dot(rel if unit else rel // index.step, index.mult) if rel.shape[0] else rel.new_zeros(0)
    if hash_free_device(dev) and base.shape[0] > _KEY_ORDER_MIN:
        # Query in key order: the table reads then walk memory forward instead of jumping;
        # pairs stay grouped by offset.  Keys below 2^31 sort as int32 (twice as fast).
        if index.table is not None:
            _, order = torch.sort(base.to(torch.int32))
            base = base.index_select(0, order)
        else:
            base, order = torch.sort(base)
        rows_near = rows_near.index_select(0, order)
    if bool((offsets.to(dev) % index.step[1:] != 0).any()):
        raise ValueError("build_kernel_map: kernel offsets must be multiples of the input's tensor stride.")
    shifts = ((offsets.to(dev) // index.step[1:]) * index.mult[1:]).sum(1).tolist()
    same = in_map is out_map
    identity_k = next((k for k, sh in enumerate(shifts) if sh == 0), -1) if same else -1
    hash_ex = _hash_executor(dev)
    # Every (offset, point) query at once, in chunks of offsets bounded in memory; the
    # identity offset of a same-map kernel needs no query.
    # A same-map kernel whose offsets come in +/- pairs (odd hyper-cubes and crosses) has a
    # symmetric map: the pairs of -offset are those of +offset swapped.  Query half of them.
    mirror = _mirrors(tuple(map(tuple, offsets.tolist()))) if same else {}
    query = [k for k in range(len(shifts)) if k not in mirror and k != identity_k]
    got_in: dict[int, torch.Tensor] = {}
    got_out: dict[int, torch.Tensor] = {}
    if identity_k >= 0:  # every point pairs with itself, listed in row order
        got_in[identity_k] = got_out[identity_k] = torch.arange(len(in_map), dtype=itype, device=dev)
    per = max(1, (1 << 24) // max(1, base.shape[0]))
    for c0 in range(0, len(query), per):
        ks = query[c0:c0 + per]
        if hash_ex is not None:  # CUDA: the hash kernels answer the queries
            from .cuda import kernel_map_rows

            in_keys = (((in_map.coordinates.to(torch.int64) - index.lo) // index.step) * index.mult).sum(1)
            rows = kernel_map_rows(hash_ex, in_keys, base, [shifts[k] for k in ks])
        else:
            sh = torch.tensor([shifts[k] for k in ks], dtype=torch.int64, device=dev)
            rows = index.rows_of_inside_keys((base[None, :] + sh[:, None]).reshape(-1)).reshape(len(ks), -1)
        m = rows.shape[1]
        flat = torch.nonzero(rows.reshape(-1) >= 0).squeeze(1)  # ordered by offset, then by point
        kk = torch.div(flat, m, rounding_mode="floor")
        ins_c = rows.reshape(-1).index_select(0, flat).to(itype)
        outs_c = rows_near.index_select(0, flat - kk * m)
        sizes = torch.bincount(kk, minlength=len(ks)).tolist()
        for k, a, b in zip(ks, ins_c.split(sizes), outs_c.split(sizes)):
            got_in[k], got_out[k] = a, b
    for k, j in mirror.items():
        got_in[k], got_out[k] = got_out[j], got_in[j]
    ins = [got_in[k] for k in range(len(shifts))]
    outs = [got_out[k] for k in range(len(shifts))]
    counts = [t.shape[0] for t in ins]
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + int(c))
    in_idx = torch.cat(ins) if ins else torch.zeros(0, dtype=itype, device=dev)
    out_idx = torch.cat(outs) if outs else torch.zeros(0, dtype=itype, device=dev)
    return KernelMap(in_idx, out_idx, tuple(bounds), len(in_map), len(out_map), identity_k)
