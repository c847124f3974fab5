"""annotate_shapes: record the input and output shape of every candidate layer.

With a graph, ``torch.fx.passes.shape_prop.ShapeProp`` runs the example
inputs through it (``node.meta['tensor_meta']``); without one, forward hooks on
the leaf modules record the same.  Without example inputs the pass does
nothing, and everything that needs no shapes still works.  It also fills the
shapes and dense FLOPs of the plan's decisions.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .costs import dense_flops
from .infra import PassContext, PassResult
from .sites import MODULE_TYPES, find_sites

__all__ = ["annotate_shapes"]


def _shape(meta) -> tuple[int, ...] | None:
    tm = meta.get("tensor_meta") if meta else None
    return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def annotate_shapes(module: nn.Module, ctx: PassContext) -> PassResult:
    if not ctx.example_inputs:
        return PassResult(module, False)
    inputs = ctx.example_inputs
    try:
        with torch.no_grad():
            if isinstance(module, fx.GraphModule):
                ShapeProp(module).propagate(*inputs)
                for site in find_sites(module, traced=True):
                    for node in site.nodes:
                        x = node.args[0] if node.args else node.kwargs.get("input")
                        in_shape = _shape(x.meta) if isinstance(x, fx.Node) else None
                        out_shape = _shape(node.meta)
                        if in_shape is not None and out_shape is not None:
                            ctx.shapes.setdefault(site.name, (in_shape, out_shape))
                            ctx.shapes[node.name] = (in_shape, out_shape)
            else:
                handles = []
                for name, m in module.named_modules():
                    if isinstance(m, MODULE_TYPES):
                        def hook(mod, args, out, name=name):
                            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                                ctx.shapes.setdefault(name, (tuple(args[0].shape), tuple(out.shape)))
                        handles.append(m.register_forward_hook(hook))
                try:
                    module(*inputs)
                finally:
                    for h in handles:
                        h.remove()
    except Exception as exc:
        raise ValueError(
            f"sparsify: the example inputs do not fit the model ({type(exc).__name__}: {exc}). "
            f"Got inputs of shapes {[tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs]}; "
            "pass example_inputs= that the model's forward accepts."
        ) from exc
    if ctx.plan is not None:
        for d in ctx.plan.decisions:
            in_shape, out_shape = ctx.shapes.get(d.node or d.name, (None, None))
            d.input_shape = in_shape
            layer_type = "Linear" if d.layer_type == "F.linear" else d.layer_type
            d.flops_before = dense_flops(layer_type, d.weight_shape, in_shape, out_shape)
            d.flops_after = d.flops_before
    return PassResult(module, False)
