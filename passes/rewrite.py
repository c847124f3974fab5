"""What every rewrite pass does around its own conversion: find the planned
sites, build the new module, install it, and record what it produced."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .costs import module_flops, param_count, weight_bytes
from .infra import PassContext, PassResult
from .sites import LayerSite, find_sites, install_module

__all__ = ["carry_out"]


def carry_out(
    module: nn.Module,
    ctx: PassContext,
    method: str,
    convert: Callable[[LayerSite, dict], tuple[nn.Module, dict]],
) -> PassResult:
    """Rewrite every site whose Decision says ``method`` with ``convert(site, params)``.

    ``convert`` returns the new module and a dict of what it produced
    (actual density, rank, error...), which goes into ``Decision.result``.
    """
    if ctx.plan is None:
        return PassResult(module, False)
    todo = {(d.name, d.node): d for d in ctx.plan.decisions if d.method == method}
    if not todo:
        return PassResult(module, False)
    modified = False
    for site in find_sites(module, ctx.traced):
        d = todo.get((site.name, site.nodes[0].name if site.functional else None))
        if d is None:
            continue
        if ctx.progress is not None:
            ctx.progress(site.name)
        new, produced = convert(site, d.params)
        d.result.update(produced)
        d.result["module"] = install_module(module, site, new)
        d.params_after = param_count(new)
        d.bytes_after = weight_bytes(new)
        in_shape, out_shape = ctx.shapes.get(d.node or d.name, (None, None))
        d.flops_after = module_flops(new, in_shape, out_shape)
        modified = True
    return PassResult(module, modified)
