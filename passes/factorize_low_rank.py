"""factorize_low_rank: Linear layers and F.linear calls -> LowRankLinear (truncated SVD)."""

from __future__ import annotations

from torch import nn

from ..modules.low_rank import LowRankLinear
from .infra import PassContext, PassResult
from .rewrite import carry_out
from .sites import LayerSite

__all__ = ["factorize_low_rank"]


def _convert(site: LayerSite, params: dict) -> tuple[nn.Module, dict]:
    bias = None if site.bias is None else site.bias.detach()
    new = LowRankLinear.from_weight(site.weight.detach(), bias, rank=params.get("rank"),
                                    tolerance=params.get("tolerance"))
    return new, {"rank": new.rank, "relative_error": new.truncation_error}


def factorize_low_rank(module: nn.Module, ctx: PassContext) -> PassResult:
    return carry_out(module, ctx, "low_rank", _convert)
