"""``MinkowskiNetwork``: the base class MinkowskiEngine's example networks derive from.

Example:
    >>> class Net(MinkowskiNetwork):
    ...     def forward(self, x):
    ...         return x
    >>> Net(D=3).D
    3
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MinkowskiNetwork", "is_cuda_available"]


class MinkowskiNetwork(nn.Module):
    """An ``nn.Module`` that records its spatial dimension ``D``."""

    def __init__(self, D: int) -> None:
        super().__init__()
        self.D = D

    def forward(self, x):  # pragma: no cover - subclasses define it
        raise NotImplementedError(f"{type(self).__name__} must define forward().")

    def init(self, x):
        """Kept for compatibility: nothing to initialize."""
        return None


def is_cuda_available() -> bool:
    """Whether torch sees a CUDA device (sparse convolutions then run on NVRTC kernels)."""
    return torch.cuda.is_available()
