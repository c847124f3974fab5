"""plan_layers: one Decision per candidate layer, made by the planner in the context.

The planner (``sparsify.plan.plan_model``) applies the config; this pass only
calls it and stores the plan, so that passes carry out decisions and never
make them.
"""

from __future__ import annotations

from torch import nn

from .infra import PassContext, PassResult

__all__ = ["plan_layers"]


def plan_layers(module: nn.Module, ctx: PassContext) -> PassResult:
    if ctx.planner is None:
        raise RuntimeError("no planner in the pass context")
    ctx.plan = ctx.planner(module, ctx)
    return PassResult(module, False)
