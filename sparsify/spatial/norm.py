"""Normalization of sparse features: batch norm over all points, instance norm per batch item.

Example:
    >>> import torch
    >>> import sparsify.spatial as ME
    >>> x = ME.SparseTensor(torch.tensor([[1.], [3.], [10.], [20.]]),
    ...                     torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=torch.int32))
    >>> [round(v, 3) for v in ME.MinkowskiInstanceNorm(1)(x).F.squeeze(1).tolist()]
    [-1.0, 1.0, -1.0, 1.0]
"""

from __future__ import annotations

import torch
from torch import nn

from .tensor import SparseTensor, TensorField

__all__ = ["MinkowskiBatchNorm", "MinkowskiInstanceNorm", "MinkowskiStableInstanceNorm", "MinkowskiSyncBatchNorm"]


def _check(layer, input):
    if not isinstance(input, (SparseTensor, TensorField)):
        raise TypeError(f"{type(layer).__name__}: expected a SparseTensor or TensorField. Got {type(input).__name__}.")


class MinkowskiBatchNorm(nn.Module):
    """``torch.nn.BatchNorm1d`` over the features of all points (``self.bn`` as in MinkowskiEngine)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, eps=eps, momentum=momentum, affine=affine,
                                 track_running_stats=track_running_stats)

    def forward(self, input):
        _check(self, input)
        return input._with_features(self.bn(input.F))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.bn.extra_repr()})"


class MinkowskiSyncBatchNorm(MinkowskiBatchNorm):
    """Batch norm whose ``bn`` is a ``torch.nn.SyncBatchNorm`` (statistics across processes)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.bn = nn.SyncBatchNorm(num_features, eps=eps, momentum=momentum, affine=affine,
                                   track_running_stats=track_running_stats, process_group=process_group)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Every MinkowskiBatchNorm of ``module`` as a MinkowskiSyncBatchNorm (weights kept)."""
        out = module
        if isinstance(module, MinkowskiBatchNorm) and not isinstance(module, MinkowskiSyncBatchNorm):
            bn = module.bn
            out = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group)
            out.bn.load_state_dict(bn.state_dict())
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out


class MinkowskiInstanceNorm(nn.Module):
    """Normalize each batch item's features to zero mean and unit variance (biased), then scale."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, num_features))
        self.bias = nn.Parameter(torch.zeros(1, num_features))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, input):
        _check(self, input)
        f = input.F
        _, inv, count = torch.unique(input.C[:, 0], return_inverse=True, return_counts=True)
        n = count.numel()
        cnt = count.to(f.dtype)[:, None]
        mean = f.new_zeros(n, f.shape[1]).index_add(0, inv, f) / cnt
        centred = f - mean[inv]
        var = f.new_zeros(n, f.shape[1]).index_add(0, inv, centred * centred) / cnt
        out = centred / torch.sqrt(var[inv] + self.eps)
        return input._with_features(out * self.weight + self.bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, eps={self.eps}"


class MinkowskiStableInstanceNorm(MinkowskiInstanceNorm):
    """Instance norm (the same computation: centred variance is already the stable form)."""
