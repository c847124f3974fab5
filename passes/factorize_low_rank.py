"""factorize_low_rank: Linear layers and F.linear calls -> LowRankLinear.

Without calibration data: the truncated SVD of the weight (Eckart-Young: the best rank-r
weight).  With calibration data (``passes/calibrate.py`` calls :func:`convert` with the
layer's input statistics): the truncated SVD of the weight whitened by the Cholesky
factor of the damped input moment (SVD-LLM), the rank-r weight with the smallest output
error on the calibration inputs; ``tolerance=`` then bounds that output error.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import (
    DEFAULT_DAMPING,
    InputStats,
    centered,
    corrected_bias,
    damped,
    output_error,
    whitened_svd,
)
from ..modules.low_rank import LowRankLinear, svd_rank
from .infra import PassContext, PassResult
from .rewrite import carry_out
from .sites import LayerSite

__all__ = ["factorize_low_rank", "convert", "whitened_rank"]


def whitened_rank(w: torch.Tensor, stats: InputStats, params: dict, damping: float = DEFAULT_DAMPING,
                  center: bool = False):
    """``(rank, S, factors)`` of the whitened SVD of ``w [out, in]`` at the decision's rank
    (an int, a fraction of ``min(in, out)``, or the smallest rank whose relative output error,
    in the damped norm, is at most ``tolerance``); whitened by the centered moment with ``center``."""
    hd, _ = damped((centered(stats) if center else stats.h).to(w.device), damping)
    s, factors = whitened_svd(w.to(torch.float64), hd[0])
    r = svd_rank(s, rank=params.get("rank"), tolerance=params.get("tolerance"))
    return r, s, factors


def _clamp_note(w: torch.Tensor, params: dict, produced: dict) -> dict:
    """Say so when an integer rank above the weight's full rank was asked (it is capped at
    ``min(out, in)``; the layer is then larger than dense unless ``dense_if_larger`` kept it dense)."""
    asked = params.get("rank")
    if isinstance(asked, int) and not isinstance(asked, bool) and asked > produced["rank"]:
        produced["note"] = (f"rank={asked} asked; a {w.shape[0]}x{w.shape[1]} weight has rank at most "
                            f"{min(w.shape)}, so rank {produced['rank']} was used")
    return produced


def convert(site: LayerSite, params: dict, stats: InputStats | None = None,
            damping: float = DEFAULT_DAMPING, whitened=None, correct_bias: bool = True) -> tuple[nn.Module, dict]:
    """The low-rank layer for ``site`` (see the module docstring) and what it produced;
    ``whitened`` is a ``whitened_rank`` result already computed for this layer."""
    bias = None if site.bias is None else site.bias.detach()
    w = site.weight.detach()
    if stats is None:
        new = LowRankLinear.from_weight(w, bias, rank=params.get("rank"), tolerance=params.get("tolerance"))
        return new, _clamp_note(w, params, {"rank": new.rank, "relative_error": new.truncation_error})
    center = correct_bias and bias is not None
    r, s, factors = whitened if whitened is not None else whitened_rank(w, stats, params, damping, center)
    a, b = factors(r)
    w64 = w.to(torch.float64)
    rec = a @ b
    if center:
        bias = corrected_bias(w64[None], rec[None], bias, stats)
    new = LowRankLinear(w.shape[1], w.shape[0], r, bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.U.copy_(a.to(w.dtype))
        new.V.copy_(b.to(w.dtype))
        if bias is not None:
            new.bias.copy_(bias)
    new.truncation_error = float(torch.linalg.norm(w64 - rec) / torch.linalg.norm(w64).clamp_min(1e-300))
    bound = float(s[r:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt().clamp_min(1e-300))
    err = output_error(w64[None], rec[None], site.bias, stats, bias_new=bias if center else None)
    return new, _clamp_note(w, params, {"rank": r, "relative_error": new.truncation_error, "output_error": err,
                 "calibration": (f"whitened SVD (Cholesky of the {'centered ' if center else ''}input moment, "
                                 f"damping {damping:g}{'; bias corrected for the mean input' if center else ''}); "
                                 f"relative whitened truncation error {bound:.3g}, output error {err:.3g}")})


def _convert(site: LayerSite, params: dict) -> tuple[nn.Module, dict]:
    return convert(site, params)


def factorize_low_rank(module: nn.Module, ctx: PassContext) -> PassResult:
    return carry_out(module, ctx, "low_rank", _convert)
