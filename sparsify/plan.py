"""The planner: config rules -> one Decision per candidate layer.

Every candidate gets a Decision, including the ones left dense, each with the
reason.  Planning never changes the model and needs no shapes, so a config
that does not fit the model fails before the example inputs run;
``annotate_shapes`` adds shapes and FLOPs to the decisions afterwards.
"""

from __future__ import annotations

from collections import Counter

import torch.fx as fx
from torch import nn

from .decision import Decision, Plan
from .methods import METHODS
from .passes.infra import PassContext
from .passes.sites import find_sites, param_owners

__all__ = ["plan_model"]


def _getattr_users(gm: nn.Module) -> Counter:
    """How many graph uses each get_attr target has."""
    uses: Counter = Counter()
    if isinstance(gm, fx.GraphModule):
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                uses[node.target] += len(node.users)
    return uses


def plan_model(module: nn.Module, ctx: PassContext) -> Plan:
    config = ctx.config
    sites = find_sites(module, ctx.traced)
    owners = param_owners(module)
    site_weights = Counter(id(s.weight) for s in sites)
    attr_uses = _getattr_users(module)
    used_rules: set[int] = set()
    decisions: list[Decision] = []
    for site in sites:
        w = site.weight
        d = Decision(
            name=site.name,
            layer_type=site.display_type,
            weight_shape=tuple(w.shape),
            method="dense",
            node=site.nodes[0].name if site.functional else None,
            params_before=w.numel() + (site.bias.numel() if site.bias is not None else 0),
            bytes_before=w.numel() * w.element_size()
            + (site.bias.numel() * site.bias.element_size() if site.bias is not None else 0),
        )
        d.params_after, d.bytes_after = d.params_before, d.bytes_before
        decisions.append(d)

        method, params, rule = config.choose(site.name, site.layer_type)
        if rule is not None:
            used_rules.add(id(rule))
            d.rule = repr(rule)
        tied = [n for n in owners.get(id(w), []) if n != f"{site.name}.weight" and n != site.name]
        if method == "dense":
            d.reason = f"skipped by {rule!r}"
        elif site.layer_type not in METHODS[method].layer_types:
            d.reason = (f"method {method!r} does not apply to {site.layer_type} layers "
                        f"(it rewrites {', '.join(METHODS[method].layer_types)})")
        elif w.numel() < config.min_size:
            d.reason = (f"weight has {w.numel()} elements, fewer than min_size={config.min_size} "
                        "(a 128x128 Linear); too small to gain")
        elif tied or site_weights[id(w)] > 1:
            d.reason = (f"weight is shared with {', '.join(tied) or 'another call site'} (tied); "
                        "left dense so the tie survives")
        elif site.functional and attr_uses[site.name] > 1:
            d.reason = "the weight is also used outside this F.linear call; left dense"
        elif site.functional and site.bias_name is not None and len(owners.get(id(site.bias), [])) > 1:
            d.reason = "the bias is shared with another layer; left dense"
        else:
            d.method = method
            d.params = params
            src = f"rule {rule!r}" if rule is not None else "the default method"
            d.reason = f"{method} by {src}"
    if config.strict:
        for r in config.rules:
            if id(r) not in used_rules:
                names = ", ".join(s.name for s in sites[:8]) + (" ..." if len(sites) > 8 else "")
                raise ValueError(
                    f"SparsifyConfig(strict=True): {r!r} matches no layer. "
                    f"Candidate layers: {names or 'none'}. Fix the pattern or type, or drop the rule."
                )
    return Plan(decisions, traced=ctx.traced, capture_note=ctx.capture_note, notes=ctx.notes)
