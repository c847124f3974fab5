"""check_lowered: every decision to rewrite produced a runtime module in the model."""

from __future__ import annotations

from torch import nn

from .infra import PassContext, PassResult

__all__ = ["check_lowered"]


def check_lowered(module: nn.Module, ctx: PassContext) -> PassResult:
    if ctx.plan is None:
        return PassResult(module, False)
    missing = []
    for d in ctx.plan.decisions:
        if not d.rewrites:
            continue
        qualname = d.result.get("module")
        try:
            m = module.get_submodule(qualname) if qualname else None
        except AttributeError:
            m = None
        if m is None or not hasattr(m, "to_dense_module"):
            missing.append(d.name)
    if missing:
        raise RuntimeError(f"layers planned for rewriting were not rewritten: {', '.join(missing)}")
    return PassResult(module, False)
