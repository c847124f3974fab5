"""Activations and dropout on the features of a SparseTensor or TensorField.

Each ``Minkowski<Name>`` wraps ``torch.nn.<Name>`` (same arguments) and applies
it to ``F``, keeping the coordinates.

Example:
    >>> import torch
    >>> import sparsify.spatial as ME
    >>> x = ME.SparseTensor(torch.tensor([[-1.], [2.]]), torch.tensor([[0, 0], [0, 1]], dtype=torch.int32))
    >>> ME.MinkowskiReLU()(x).F.squeeze(1).tolist()
    [0.0, 2.0]
"""

from __future__ import annotations

from torch import nn

from .tensor import SparseTensor, TensorField

__all__ = ["MinkowskiNonlinearityBase"]


class MinkowskiNonlinearityBase(nn.Module):
    """Applies ``MODULE(*args, **kwargs)`` to the features."""

    MODULE: type[nn.Module] = nn.Identity

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.module = self.MODULE(*args, **kwargs)

    def forward(self, input):
        if not isinstance(input, (SparseTensor, TensorField)):
            raise TypeError(f"{type(self).__name__}: expected a SparseTensor or TensorField. Got {type(input).__name__}.")
        return input._with_features(self.module(input.F))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.module.extra_repr()})"


_WRAPPED = [
    "ELU", "Hardshrink", "Hardsigmoid", "Hardtanh", "Hardswish", "LeakyReLU", "LogSigmoid", "PReLU", "ReLU",
    "ReLU6", "RReLU", "SELU", "CELU", "GELU", "Sigmoid", "SiLU", "Softplus", "Softshrink", "Softsign", "Tanh",
    "Tanhshrink", "Threshold", "Softmin", "Softmax", "LogSoftmax", "Dropout", "AlphaDropout",
]

for _name in _WRAPPED:
    _cls = type(f"Minkowski{_name}", (MinkowskiNonlinearityBase,), {
        "MODULE": getattr(nn, _name),
        "__doc__": f"``torch.nn.{_name}`` on the features of a sparse tensor.",
        "__module__": __name__,
    })
    globals()[_cls.__name__] = _cls
    __all__.append(_cls.__name__)
