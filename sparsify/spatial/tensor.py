"""``SparseTensor`` and ``TensorField``: MinkowskiEngine's tensors over sparsify's coordinate manager.

A :class:`SparseTensor` is features ``F [N, C]`` at unique integer coordinates
``C [N, 1 + D]`` (int32, batch index first) at a tensor stride, registered in a
:class:`~sparsify.runtime.spatial.CoordinateManager` under a
:class:`~sparsify.runtime.spatial.CoordinateMapKey`.  A :class:`TensorField`
holds point-level features at continuous coordinates; ``field.sparse()``
quantizes it and ``sparse_tensor.slice(field)`` brings features back to every
point.

Example:
    >>> import torch
    >>> import sparsify.spatial as ME
    >>> coords = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 0, 1], [1, 2, 2]], dtype=torch.int32)
    >>> x = ME.SparseTensor(features=torch.tensor([[1.], [2.], [4.], [8.]]), coordinates=coords,
    ...                     quantization_mode=ME.SparseTensorQuantizationMode.UNWEIGHTED_AVERAGE)
    >>> x.C.tolist(), x.F.squeeze(1).tolist(), x.tensor_stride
    ([[0, 0, 0], [0, 0, 1], [1, 2, 2]], [1.0, 3.0, 8.0], [1, 1])
"""

from __future__ import annotations

import warnings
from enum import Enum

import torch

from ..runtime.spatial import CoordinateManager, CoordinateMapKey, as_stride, stride_coordinates
from ..runtime.spatial.coords import (
    check_batch_indices,
    check_coordinate_range,
    check_coordinates,
    floor_coordinates,
)

__all__ = [
    "MinkowskiAlgorithm",
    "SparseTensor",
    "SparseTensorOperationMode",
    "SparseTensorQuantizationMode",
    "TensorField",
    "clear_global_coordinate_manager",
    "global_coordinate_manager",
    "set_global_coordinate_manager",
    "set_sparse_tensor_operation_mode",
    "sparse_tensor_operation_mode",
]


class SparseTensorOperationMode(Enum):
    """``SEPARATE_COORDINATE_MANAGER`` (default): each new tensor made from coordinates gets its
    own manager; ``SHARE_COORDINATE_MANAGER``: all share the global one."""

    SEPARATE_COORDINATE_MANAGER = 0
    SHARE_COORDINATE_MANAGER = 1


class SparseTensorQuantizationMode(Enum):
    """How features of rows with the same coordinate are merged."""

    RANDOM_SUBSAMPLE = 0
    UNWEIGHTED_AVERAGE = 1
    UNWEIGHTED_SUM = 2
    NO_QUANTIZATION = 3
    MAX_POOL = 4


class MinkowskiAlgorithm(Enum):
    """Accepted for compatibility and ignored: there is one algorithm."""

    DEFAULT = 0
    MEMORY_EFFICIENT = 1
    SPEED_OPTIMIZED = 2


_MODE = [SparseTensorOperationMode.SEPARATE_COORDINATE_MANAGER]
_GLOBAL: list[CoordinateManager | None] = [None]


def set_sparse_tensor_operation_mode(mode: SparseTensorOperationMode) -> None:
    """Choose whether new tensors share one global coordinate manager."""
    if not isinstance(mode, SparseTensorOperationMode):
        raise TypeError(f"expected a SparseTensorOperationMode. Got {mode!r}.")
    _MODE[0] = mode


def sparse_tensor_operation_mode() -> SparseTensorOperationMode:
    return _MODE[0]


def global_coordinate_manager() -> CoordinateManager | None:
    return _GLOBAL[0]


def set_global_coordinate_manager(manager: CoordinateManager) -> None:
    _GLOBAL[0] = manager


def clear_global_coordinate_manager() -> None:
    _GLOBAL[0] = None


def _manager_for(D: int, manager: CoordinateManager | None, minkowski_algorithm=None) -> CoordinateManager:
    if manager is not None:
        if not isinstance(manager, CoordinateManager):
            raise TypeError(f"coordinate_manager must be a CoordinateManager. Got {type(manager).__name__}.")
        return manager
    if _MODE[0] == SparseTensorOperationMode.SHARE_COORDINATE_MANAGER:
        if _GLOBAL[0] is None or _GLOBAL[0].D != D:
            _GLOBAL[0] = CoordinateManager(D=D, minkowski_algorithm=minkowski_algorithm)
        return _GLOBAL[0]
    return CoordinateManager(D=D, minkowski_algorithm=minkowski_algorithm)


def _check_features(features, where: str) -> None:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{where}: features must be a torch.Tensor. Got {type(features).__name__}.")
    if features.dim() != 2:
        raise ValueError(
            f"{where}: features must be a matrix [N, C]. Got an order-{features.dim()} tensor of shape "
            f"{tuple(features.shape)}; use features.reshape(N, -1)."
        )


def _merge(features: torch.Tensor, uniq: torch.Tensor, inv: torch.Tensor, mode) -> torch.Tensor:
    """Features of the unique rows under a quantization mode (autograd flows through)."""
    if uniq.numel() == inv.numel():  # no repeated coordinate: uniq is 0 .. n - 1 (first appearance order)
        return features
    m = uniq.numel()
    if mode in (SparseTensorQuantizationMode.RANDOM_SUBSAMPLE, SparseTensorQuantizationMode.NO_QUANTIZATION):
        return features[uniq]
    if mode == SparseTensorQuantizationMode.MAX_POOL:
        out = features.new_zeros(m, features.shape[1])
        return out.scatter_reduce(0, inv[:, None].expand(-1, features.shape[1]), features, "amax", include_self=False)
    out = features.new_zeros(m, features.shape[1]).index_add(0, inv, features)
    if mode == SparseTensorQuantizationMode.UNWEIGHTED_AVERAGE:
        count = torch.zeros(m, dtype=features.dtype, device=features.device).index_add_(
            0, inv, torch.ones_like(inv, dtype=features.dtype))
        out = out / count[:, None]
    return out


class _TensorBase:
    """What SparseTensor and TensorField share: features, batch decomposition, arithmetic."""

    _F: torch.Tensor

    @property
    def F(self) -> torch.Tensor:
        return self._F

    @property
    def features(self) -> torch.Tensor:
        return self._F

    @property
    def coordinate_manager(self) -> CoordinateManager:
        return self._manager

    @property
    def D(self) -> int:
        return self._manager.D

    dimension = D

    @property
    def shape(self) -> torch.Size:
        return self._F.shape

    def size(self) -> torch.Size:
        return self._F.size()

    def __len__(self) -> int:
        return self._F.shape[0]

    @property
    def device(self) -> torch.device:
        return self._F.device

    @property
    def dtype(self) -> torch.dtype:
        return self._F.dtype

    @property
    def requires_grad(self) -> bool:
        return self._F.requires_grad

    def requires_grad_(self, flag: bool = True):
        self._F.requires_grad_(flag)
        return self

    def get_device(self):
        return self._F.get_device()

    # batch decomposition ----------------------------------------------------
    def _batch_column(self) -> torch.Tensor:
        return self.C[:, 0]

    @property
    def decomposition_permutations(self) -> list[torch.Tensor]:
        """Row indices of each batch index present, in increasing batch order."""
        b = self._batch_column()
        return [torch.nonzero(b == i).squeeze(1) for i in torch.unique(b).tolist()]

    @property
    def decomposed_coordinates(self) -> list[torch.Tensor]:
        return [self.C[p, 1:] for p in self.decomposition_permutations]

    @property
    def decomposed_features(self) -> list[torch.Tensor]:
        return [self._F[p] for p in self.decomposition_permutations]

    @property
    def decomposed_coordinates_and_features(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        perms = self.decomposition_permutations
        return [self.C[p, 1:] for p in perms], [self._F[p] for p in perms]

    def coordinates_at(self, batch_index: int) -> torch.Tensor:
        return self.C[self._batch_column() == batch_index, 1:]

    def features_at(self, batch_index: int) -> torch.Tensor:
        return self._F[self._batch_column() == batch_index]

    def coordinates_and_features_at(self, batch_index: int):
        m = self._batch_column() == batch_index
        return self.C[m, 1:], self._F[m]

    # arithmetic -------------------------------------------------------------
    def _with_features(self, features: torch.Tensor):
        raise NotImplementedError

    def _binary(self, other, fn):
        if isinstance(other, _TensorBase):
            if type(other) is not type(self):
                raise TypeError(f"cannot combine a {type(self).__name__} with a {type(other).__name__}.")
            if other._manager is not self._manager:
                raise ValueError(
                    "the two tensors have different coordinate managers; build the second one with "
                    "coordinate_manager=first.coordinate_manager."
                )
            if self._same_key(other):
                return self._with_features(fn(self._F, other._F))
            if not isinstance(self, SparseTensor):
                raise ValueError("TensorFields with different coordinates cannot be combined.")
            # Different coordinates: the union, with zeros where a tensor has no point.
            key, (ra, rb) = self._manager.union([self.coordinate_map_key, other.coordinate_map_key])
            n = self._manager.size(key)
            a = self._F.new_zeros(n, self._F.shape[1]).index_copy(0, ra, self._F)
            b = other._F.new_zeros(n, other._F.shape[1]).index_copy(0, rb, other._F)
            return SparseTensor(fn(a, b), coordinate_map_key=key, coordinate_manager=self._manager)
        return self._with_features(fn(self._F, other))

    def __add__(self, other):
        return self._binary(other, torch.add)

    __radd__ = __add__

    def __sub__(self, other):
        return self._binary(other, torch.sub)

    def __rsub__(self, other):
        return self._with_features(other - self._F)

    def __mul__(self, other):
        return self._binary(other, torch.mul)

    __rmul__ = __mul__

    def __truediv__(self, other):
        return self._binary(other, torch.div)

    def __neg__(self):
        return self._with_features(-self._F)

    def __pow__(self, power):
        return self._with_features(self._F ** power)


class SparseTensor(_TensorBase):
    """Features at unique integer coordinates (MinkowskiEngine's ``SparseTensor``).

    Args mirror MinkowskiEngine: ``features [N, C]``; ``coordinates [N, 1 + D]`` (int32,
    batch index first; floating coordinates are floored with a warning, as there) or a
    ``coordinate_map_key`` with its ``coordinate_manager``; ``tensor_stride``;
    ``quantization_mode`` for rows that share a coordinate (first row kept for
    ``RANDOM_SUBSAMPLE``, see docs/spatial.md).  ``allocator_type``,
    ``minkowski_algorithm`` are accepted and ignored; ``device`` moves the inputs first.
    """

    def __init__(self, features: torch.Tensor, coordinates: torch.Tensor | None = None, tensor_stride=1,
                 coordinate_map_key: CoordinateMapKey | None = None,
                 coordinate_manager: CoordinateManager | None = None,
                 quantization_mode: SparseTensorQuantizationMode = SparseTensorQuantizationMode.RANDOM_SUBSAMPLE,
                 allocator_type=None, minkowski_algorithm=None, requires_grad=None, device=None) -> None:
        _check_features(features, "SparseTensor")
        if not isinstance(quantization_mode, SparseTensorQuantizationMode):
            raise TypeError(f"SparseTensor: quantization_mode must be a SparseTensorQuantizationMode. Got {quantization_mode!r}.")
        self.quantization_mode = quantization_mode
        if device is not None:
            features = features.to(device)
            coordinates = None if coordinates is None else coordinates.to(device)
        if coordinates is None and (coordinate_map_key is None or coordinate_manager is None):
            raise ValueError("SparseTensor: give either coordinates, or a coordinate_map_key with its coordinate_manager.")
        if coordinates is not None and coordinate_map_key is not None:
            raise ValueError("SparseTensor: give coordinates or a coordinate_map_key, not both.")
        self.unique_index = self.inverse_mapping = None
        if coordinates is not None:
            if coordinates.dtype.is_floating_point:
                warnings.warn("SparseTensor: coordinates implicitly converted to torch.IntTensor (floor); "
                              "use .int() to convert them yourself.", stacklevel=2)
                coordinates = floor_coordinates(coordinates, "SparseTensor")
            check_coordinates(coordinates, "SparseTensor")
            if features.shape[0] != coordinates.shape[0]:
                raise ValueError(
                    f"SparseTensor: {features.shape[0]} feature rows but {coordinates.shape[0]} coordinate rows; "
                    "they must match."
                )
            if features.device != coordinates.device:
                raise ValueError(f"SparseTensor: features on {features.device}, coordinates on {coordinates.device}.")
            D = coordinates.shape[1] - 1
            self._manager = _manager_for(D, coordinate_manager, minkowski_algorithm)
            key, (uniq, inv) = self._manager.insert_and_map(coordinates, as_stride(tensor_stride, D, "tensor_stride"))
            self.unique_index, self.inverse_mapping = uniq, inv
            features = _merge(features, uniq, inv, quantization_mode)
            coordinate_map_key = key
        else:
            if not isinstance(coordinate_manager, CoordinateManager):
                raise TypeError(f"SparseTensor: coordinate_manager must be a CoordinateManager. Got {type(coordinate_manager).__name__}.")
            self._manager = coordinate_manager
            n = coordinate_manager.size(coordinate_map_key)
            if features.shape[0] != n:
                raise ValueError(
                    f"SparseTensor: {features.shape[0]} feature rows for {coordinate_map_key!r}, which has {n} coordinates."
                )
        if requires_grad is not None:
            features.requires_grad_(requires_grad)
        self._F = features
        self.coordinate_map_key = coordinate_map_key

    # coordinates ------------------------------------------------------------
    @property
    def C(self) -> torch.Tensor:
        return self._manager.get_coordinates(self.coordinate_map_key)

    coordinates = C

    @property
    def coordinate_key(self) -> CoordinateMapKey:
        return self.coordinate_map_key

    @property
    def tensor_stride(self) -> list[int]:
        return list(self.coordinate_map_key.tensor_stride)

    def _same_key(self, other) -> bool:
        return self.coordinate_map_key == other.coordinate_map_key

    def _with_features(self, features: torch.Tensor) -> SparseTensor:
        return SparseTensor(features, coordinate_map_key=self.coordinate_map_key, coordinate_manager=self._manager)

    def replace_feature(self, features: torch.Tensor) -> SparseTensor:
        """The same coordinates with new features."""
        return self._with_features(features)

    # conversions -------------------------------------------------------------
    def detach(self) -> SparseTensor:
        return self._with_features(self._F.detach())

    def float(self) -> SparseTensor:
        return self._with_features(self._F.float())

    def double(self) -> SparseTensor:
        return self._with_features(self._F.double())

    def half(self) -> SparseTensor:
        return self._with_features(self._F.half())

    def to(self, *args, **kwargs) -> SparseTensor:
        """Cast the features; moving to another device re-registers the coordinates there."""
        f = self._F.to(*args, **kwargs)
        if f.device == self._F.device:
            return self._with_features(f)
        return SparseTensor(f, coordinates=self.C.to(f.device), tensor_stride=self.tensor_stride)

    def cpu(self) -> SparseTensor:
        return self.to("cpu")

    def cuda(self, device=None) -> SparseTensor:
        return self.to(device or "cuda")

    def dense(self, shape: torch.Size | None = None, min_coordinate: torch.Tensor | int | None = None,
              contract_stride: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dense [B, C, *spatial], min_coordinate, tensor_stride)`` as in MinkowskiEngine: site
        ``min_coordinate + tensor_stride * index`` holds the features, other sites zero."""
        C, D = self.C, self.D
        ts = torch.tensor(self.tensor_stride, dtype=torch.int32, device=C.device)
        if len(self) == 0:
            if shape is None:
                raise ValueError("SparseTensor.dense: the tensor is empty; pass shape= to densify it.")
            return (torch.zeros(shape, dtype=self.dtype, device=self.device),
                    torch.zeros(D, dtype=torch.int32), torch.tensor(self.tensor_stride, dtype=torch.int32))
        if min_coordinate is None:
            min_coordinate = C[:, 1:].amin(0)
            if bool((min_coordinate < 0).any()):
                raise ValueError(
                    f"SparseTensor.dense: a coordinate is negative (min {min_coordinate.tolist()}); pass "
                    "min_coordinate= to choose the origin of the dense tensor."
                )
            coords = C[:, 1:]
        elif isinstance(min_coordinate, int) and min_coordinate == 0:
            min_coordinate = torch.zeros(D, dtype=torch.int32, device=C.device)
            coords = C[:, 1:]
        else:
            min_coordinate = torch.as_tensor(min_coordinate, dtype=torch.int32, device=C.device).reshape(-1)
            coords = C[:, 1:] - min_coordinate
        if bool((min_coordinate % ts != 0).any()):
            raise ValueError(
                f"SparseTensor.dense: min_coordinate {min_coordinate.tolist()} must be divisible by the "
                f"tensor stride {self.tensor_stride}."
            )
        if contract_stride:
            coords = torch.div(coords, ts, rounding_mode="floor")
        if bool((coords < 0).any()):
            raise ValueError("SparseTensor.dense: a coordinate lies below min_coordinate.")
        c = self._F.shape[1]
        if shape is None:
            size = (coords.amax(0) + 1).tolist()
            shape = torch.Size([int(C[:, 0].max()) + 1, c, *size])
        else:
            shape = torch.Size(shape)
            if len(shape) != D + 2:
                raise ValueError(f"SparseTensor.dense: shape must have {D + 2} entries (batch, channel, spatial). Got {tuple(shape)}.")
            shape = torch.Size([shape[0], c, *shape[2:]])
            if bool((coords >= torch.tensor(shape[2:], device=coords.device)).any()) or int(C[:, 0].max()) >= shape[0]:
                raise ValueError(f"SparseTensor.dense: a coordinate falls outside shape {tuple(shape)}.")
        dense = self._F.new_zeros((shape[0], *shape[2:], c))
        index = (C[:, 0].long(), *coords.long().unbind(1))
        dense = dense.index_put(index, self._F)
        return dense.movedim(-1, 1).contiguous(), min_coordinate.cpu(), torch.tensor(self.tensor_stride, dtype=torch.int32)

    def sparse(self, min_coords=None, max_coords=None, contract_coords: bool = True):
        """A ``torch.sparse_coo_tensor`` ``[B, *spatial, C]`` (hybrid, features dense)."""
        C = self.C.long()
        coords = C[:, 1:]
        if min_coords is None:
            min_coords = coords.amin(0)
        min_coords = torch.as_tensor(min_coords, device=C.device).long().reshape(-1)
        coords = coords - min_coords
        if contract_coords:
            coords = torch.div(coords, torch.tensor(self.tensor_stride, device=C.device), rounding_mode="floor")
        if max_coords is not None:
            keep = (coords <= torch.as_tensor(max_coords, device=C.device).long()).all(1)
            C, coords, feats = C[keep], coords[keep], self._F[keep]
        else:
            feats = self._F
        idx = torch.cat([C[:, :1], coords], 1).T
        return torch.sparse_coo_tensor(idx, feats).coalesce(), min_coords, torch.tensor(self.tensor_stride)

    def slice(self, X):
        """Features at every point of the field (or of the un-quantized rows) ``X`` came from."""
        if isinstance(X, TensorField):
            rows = X.inverse_mapping(self.coordinate_map_key, self)
            return TensorField(self._F[rows], coordinates=X.C, coordinate_manager=X._manager,
                               quantization_mode=X.quantization_mode, _field_id=X._field_id)
        if isinstance(X, SparseTensor):
            if X.coordinate_map_key != self.coordinate_map_key or X.inverse_mapping is None:
                raise ValueError("SparseTensor.slice: X must be the input tensor these coordinates were built from.")
            inv = X.inverse_mapping
            return TensorField(self._F[inv], coordinates=self.C[inv].to(self.dtype), coordinate_manager=self._manager,
                               quantization_mode=X.quantization_mode)
        raise TypeError(f"SparseTensor.slice: expected a TensorField or SparseTensor. Got {type(X).__name__}.")

    def cat_slice(self, X):
        """``slice(X)`` with X's own features concatenated after ours."""
        out = self.slice(X)
        return out._with_features(torch.cat([out.F, X.F], 1))

    def features_at_coordinates(self, query_coordinates: torch.Tensor) -> torch.Tensor:
        """Features of the voxel holding each query coordinate ``[M, 1 + D]`` (zeros where none)."""
        q = floor_coordinates(query_coordinates, "SparseTensor.features_at_coordinates")
        q = stride_coordinates(q, self.tensor_stride, "SparseTensor.features_at_coordinates")
        rows = self._manager.coordinate_map(self.coordinate_map_key).index().lookup(q)
        out = self._F[rows.clamp_min(0)]
        return torch.where((rows >= 0)[:, None], out, torch.zeros_like(out))

    def __repr__(self) -> str:
        return (f"SparseTensor(\n  coordinates={self.C}\n  features={self._F}\n  coordinate_map_key="
                f"{self.coordinate_map_key}\n  coordinate_manager={self._manager}  spatial dimension={self.D})")


class TensorField(_TensorBase):
    """Point features at continuous coordinates ``[N, 1 + D]`` (float, batch first).

    ``sparse()`` quantizes to a :class:`SparseTensor` (floor, then merge by
    ``quantization_mode``, default ``UNWEIGHTED_AVERAGE``); ``SparseTensor.slice``
    maps features back to every point."""

    _next_id = [0]

    def __init__(self, features: torch.Tensor, coordinates: torch.Tensor | None = None, tensor_stride=1,
                 coordinate_field_map_key=None, coordinate_manager: CoordinateManager | None = None,
                 quantization_mode: SparseTensorQuantizationMode = SparseTensorQuantizationMode.UNWEIGHTED_AVERAGE,
                 allocator_type=None, minkowski_algorithm=None, requires_grad=None, device=None,
                 _field_id: int | None = None) -> None:
        _check_features(features, "TensorField")
        if coordinates is None:
            raise ValueError("TensorField: coordinates are required.")
        if device is not None:
            features, coordinates = features.to(device), coordinates.to(device)
        if coordinates.dim() != 2 or coordinates.shape[1] < 2 or coordinates.shape[0] != features.shape[0]:
            raise ValueError(
                f"TensorField: coordinates must be [N, 1 + D] with N = {features.shape[0]} rows. Got {tuple(coordinates.shape)}."
            )
        if not isinstance(quantization_mode, SparseTensorQuantizationMode):
            raise TypeError(f"TensorField: quantization_mode must be a SparseTensorQuantizationMode. Got {quantization_mode!r}.")
        if _field_id is None:  # a new field (copies of a field share its checked coordinates)
            check_coordinate_range(coordinates, "TensorField")  # sparse() floors them into int32 maps
            check_batch_indices(coordinates, "TensorField")
        D = coordinates.shape[1] - 1
        self._manager = _manager_for(D, coordinate_manager, minkowski_algorithm)
        self._C = coordinates
        self.tensor_stride = list(as_stride(tensor_stride, D, "tensor_stride"))
        self.quantization_mode = quantization_mode
        if requires_grad is not None:
            features.requires_grad_(requires_grad)
        self._F = features
        if _field_id is None:
            TensorField._next_id[0] += 1
            _field_id = TensorField._next_id[0]
        self._field_id = _field_id
        self.coordinate_field_map_key = ("field", _field_id)

    @property
    def C(self) -> torch.Tensor:
        return self._C

    coordinates = C

    def _same_key(self, other) -> bool:
        return self._field_id == other._field_id

    def _with_features(self, features: torch.Tensor) -> TensorField:
        return TensorField(features, coordinates=self._C, coordinate_manager=self._manager,
                           quantization_mode=self.quantization_mode, _field_id=self._field_id)

    def detach(self) -> TensorField:
        return self._with_features(self._F.detach())

    def _quantized(self, tensor_stride) -> torch.Tensor:
        c = self._C  # range-checked at construction
        c = torch.floor(c).to(torch.int32) if c.dtype.is_floating_point else c.to(torch.int32)
        return stride_coordinates(c, tensor_stride, "TensorField.sparse")

    def sparse(self, tensor_stride=None, coordinate_map_key=None, quantization_mode=None) -> SparseTensor:
        """Quantize into a SparseTensor on this field's coordinate manager."""
        mode = quantization_mode or self.quantization_mode
        if mode == SparseTensorQuantizationMode.NO_QUANTIZATION:
            mode = SparseTensorQuantizationMode.RANDOM_SUBSAMPLE
        ts = as_stride(tensor_stride if tensor_stride is not None else self.tensor_stride, self.D, "tensor_stride")
        key, (uniq, inv) = self._manager.insert_and_map(self._quantized(ts), ts)
        self._manager.set_field_map(self._field_id, key, inv, uniq)
        out = SparseTensor(_merge(self._F, uniq, inv, mode), coordinate_map_key=key, coordinate_manager=self._manager)
        out.unique_index, out.inverse_mapping, out.quantization_mode = uniq, inv, mode
        return out

    def inverse_mapping(self, key: CoordinateMapKey, tensor: SparseTensor | None = None) -> torch.Tensor:
        """The row of the sparse tensor at ``key`` that holds each point."""
        known = self._manager.field_map(self._field_id, key)
        if known is not None:
            return known[1]
        ts = key.tensor_stride
        rows = self._manager.coordinate_map(key).index().lookup(self._quantized(ts))
        if bool((rows < 0).any()):
            raise ValueError(
                f"TensorField.inverse_mapping: some points fall in no voxel of {key!r}; slice with a tensor "
                "whose coordinates came from this field (field.sparse() and the layers after it)."
            )
        return rows

    def __repr__(self) -> str:
        return f"TensorField(\n  coordinates={self._C}\n  features={self._F}\n  spatial dimension={self.D})"
