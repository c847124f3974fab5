"""factorize_cp: Linear / F.linear -> CPLinear; Conv1d / Conv2d -> CPConv (Lebedev et al. 2015).

Carries out the decisions at the ranks and forward ``allocate_ranks`` wrote
into them (``params["ranks"]``, ``params["forward"]``); decides nothing.
"""

from __future__ import annotations

from torch import nn

from .factorized import as_layer, build
from .infra import PassContext, PassResult
from .rewrite import carry_out
from .sites import LayerSite

__all__ = ["factorize_cp"]


def _convert(site: LayerSite, params: dict) -> tuple[nn.Module, dict]:
    if "ranks" not in params:
        raise RuntimeError(f"{site.name}: no ranks in its decision; allocate_ranks must run before factorize_cp")
    new = build("cp", as_layer(site), params["ranks"], forward=params.get("forward", "factorized"),
                batch_hint=params.get("batch_hint", 256))
    return new, {"rank": new.ranks, "relative_error": new.relative_error, "forward": new.forward_mode}


def factorize_cp(module: nn.Module, ctx: PassContext) -> PassResult:
    return carry_out(module, ctx, "cp", _convert)
