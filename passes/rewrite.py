"""What every rewrite pass does around its own conversion: find the planned
sites, build the new module, install it, and record what it produced."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch.fx as fx
from torch import nn

from .costs import module_flops, param_count, weight_bytes
from .infra import PassContext, PassResult
from .sites import LayerSite, find_sites, install_module

__all__ = ["carry_out"]


def _owner_training(root: nn.Module, site: LayerSite) -> bool:
    if site.module is not None:
        return site.module.training
    parent = (site.mha if site.mha is not None else site.param_name.rpartition(".")[0]) or ""
    try:
        return (root.get_submodule(parent) if parent else root).training
    except AttributeError:
        return root.training


def carry_out(
    module: nn.Module,
    ctx: PassContext,
    method: str,
    convert: Callable[[LayerSite, dict], tuple[nn.Module, dict]],
) -> PassResult:
    """Rewrite every site whose Decision says ``method`` with ``convert(site, params)``.

    ``convert`` returns the new module and a dict of what it produced
    (actual density, rank, error...), which goes into ``Decision.result``.
    A functional site in the user's model keeps its bias where the model's
    code passes it (``F.linear(x, self.w, self.b)``), so it is converted without one.
    """
    if ctx.plan is None:
        return PassResult(module, False)
    # a decision that already has its module was carried out earlier (passes/calibrate.py)
    todo = {(d.name, d.node): d for d in ctx.plan.decisions if d.method == method and "module" not in d.result}
    if not todo:
        return PassResult(module, False)
    modified = False
    graph_mode = isinstance(module, fx.GraphModule)
    for site in find_sites(module, ctx):
        d = todo.get(site.key)
        if d is None:
            continue
        if ctx.progress is not None:
            ctx.progress(site.name)
        if site.functional and not graph_mode and site.bias is not None:
            site = dataclasses.replace(site, bias=None, kept_bias=site.bias.numel())
        training = _owner_training(module, site)
        new, produced = convert(site, d.params)
        new.train(training)
        d.result.update(produced)
        note = d.result.pop("note", None)  # what the conversion changed of what was asked
        if note:
            d.reason += f"; {note}"
        d.result["module"] = install_module(module, site, new, ctx.notes)
        d.params_after = param_count(new) + site.kept_bias
        d.bytes_after = weight_bytes(new) + site.kept_bias * site.weight.element_size()
        in_shape, out_shape = ctx.shapes.get(d.node or d.name, (None, None))
        d.flops_after = module_flops(new, in_shape, out_shape)
        modified = True
    return PassResult(module, modified)
