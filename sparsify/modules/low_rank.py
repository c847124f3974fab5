"""``LowRankLinear``: a Linear layer as the product of two thin factors (truncated SVD)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .weight_view import LinearLike

__all__ = ["LowRankLinear", "svd_rank"]


def svd_rank(
    singular_values: torch.Tensor,
    *,
    rank: int | float | None = None,
    tolerance: float | None = None,
) -> int:
    """The rank to keep: an int, a fraction of ``min(in, out)``, or the smallest
    rank whose relative Frobenius error is at most ``tolerance``.

    Example:
        >>> svd_rank(torch.tensor([3.0, 2.0, 1.0]), rank=0.5)
        2
    """
    full = singular_values.numel()
    if tolerance is not None:
        s2 = singular_values.double() ** 2
        total = s2.sum()
        if total == 0:
            return 1
        # err(r)^2 = sum_{i >= r} s_i^2: the Eckart-Young bound.
        tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])  # tail[r] = sum_{i>=r}
        ok = (tail / total) <= tolerance**2
        ok = torch.cat([ok, torch.tensor([True])])
        return max(1, int(ok.nonzero()[0]))
    if rank is None:
        raise ValueError("svd_rank: give rank= or tolerance=.")
    if isinstance(rank, float):
        return max(1, min(full, round(rank * full)))
    return max(1, min(full, int(rank)))


class LowRankLinear(LinearLike, nn.Module):
    """``y = (x @ V.T) @ U.T + bias`` with ``U [out, r]``, ``V [r, in]``.

    Example:
        >>> layer = LowRankLinear.from_dense(torch.nn.Linear(32, 16), rank=4)
        >>> layer.rank, layer(torch.randn(3, 32)).shape
        (4, torch.Size([3, 16]))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LowRankLinear: expected rank >= 1. Got {rank}.")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.V = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.U = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.V, a=5**0.5)
        nn.init.kaiming_uniform_(self.U, a=5**0.5)
        if self.bias is not None:
            bound = 1.0 / max(1, self.in_features) ** 0.5
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_dense(
        cls, linear: nn.Linear, *, rank: int | float | None = None, tolerance: float | None = None
    ) -> LowRankLinear:
        """Truncated SVD of ``linear.weight``: the best rank-r approximation (Eckart-Young)."""
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_weight(linear.weight.detach(), bias, rank=rank, tolerance=tolerance)

    @classmethod
    def from_weight(
        cls, w: torch.Tensor, bias: torch.Tensor | None, *, rank: int | float | None = None,
        tolerance: float | None = None,
    ) -> LowRankLinear:
        """The truncated SVD of ``w`` (``[out, in]``) with ``bias``."""
        # SVD in float64 at least, so the truncation error is that of the rank, not of the arithmetic.
        work = w.double() if w.dtype != torch.float64 else w
        U, S, Vh = torch.linalg.svd(work, full_matrices=False)
        r = svd_rank(S, rank=rank, tolerance=tolerance)
        sqrt_s = S[:r].sqrt()
        layer = cls(w.shape[1], w.shape[0], r, bias=bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            # Split sigma evenly between the factors so both train at similar scales.
            layer.U.copy_((U[:, :r] * sqrt_s).to(w.dtype))
            layer.V.copy_((sqrt_s[:, None] * Vh[:r]).to(w.dtype))
            if bias is not None:
                layer.bias.copy_(bias)
        layer.truncation_error = float(S[r:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt().clamp_min(1e-300))
        return layer

    def to_dense(self) -> torch.Tensor:
        """The exact weight ``U @ V`` the factors represent; differentiable."""
        return self.U @ self.V

    def flops(self, input_shape: tuple[int, ...]) -> int:
        tokens = math.prod(input_shape[:-1])
        return 2 * tokens * self.rank * (self.in_features + self.out_features)

    def _dense_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.U.device, dtype=self.U.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U, self.bias)

    def weight_product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` without the bias."""
        return F.linear(F.linear(x, self.V), self.U)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")
