"""annotate_shapes: record the input and output shape of every candidate layer.

One run of the example inputs.  In graph mode (``graph=True``)
``torch.fx.passes.shape_prop.ShapeProp`` runs them through the graph being
rewritten.  On the user's model, forward hooks on the candidate modules (and on
``nn.MultiheadAttention`` for its projections) record shapes and how often each
module runs; functional sites take their shapes from the analysis graph (fx:
the same run through ``ShapeProp``; torch.export: the shapes the export
recorded).  Without example inputs the pass does nothing, and everything that
needs no shapes still works.  It also fills the shapes and dense FLOPs of the
plan's decisions.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .costs import dense_flops
from .infra import PassContext, PassResult
from .sites import find_sites, linear_like

__all__ = ["annotate_shapes", "fill_decisions", "run_example"]


def _shape(meta) -> tuple[int, ...] | None:
    tm = meta.get("tensor_meta") if meta else None
    if tm is not None and hasattr(tm, "shape"):
        return tuple(tm.shape)
    val = meta.get("val") if meta else None
    return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None


def run_example(module: nn.Module, ctx: PassContext) -> object:
    """Run the model on the example inputs (positional and keyword)."""
    return module(*(ctx.example_inputs or ()), **(ctx.example_kwargs or {}))


def _input_error(exc: Exception, ctx: PassContext) -> ValueError:
    inputs = ctx.example_inputs or ()
    return ValueError(
        f"sparsify: the example inputs do not fit the model ({type(exc).__name__}: {exc}). "
        f"Got inputs of shapes {[tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs]}"
        f"{' and keywords ' + str(sorted(ctx.example_kwargs)) if ctx.example_kwargs else ''}; "
        "pass example_inputs= that the model's forward accepts."
    )


def _graph_mode(module: fx.GraphModule, ctx: PassContext) -> None:
    ShapeProp(module).propagate(*ctx.example_inputs)
    for site in find_sites(module, ctx):
        for node in site.nodes:
            if site.mha is not None:
                continue  # shapes of MHA projections come from the module hooks below
            x = node.args[0] if node.args else node.kwargs.get("input")
            if site.functional and node.target is torch.addmm:
                x = node.args[1]
            in_shape = _shape(x.meta) if isinstance(x, fx.Node) else None
            out_shape = _shape(node.meta)
            if in_shape is not None and out_shape is not None:
                ctx.shapes.setdefault(site.name, (in_shape, out_shape))
                ctx.shapes[node.name] = (in_shape, out_shape)


def _hooks(module: nn.Module, ctx: PassContext, sites) -> list:
    handles = []
    wanted = {s.name: s for s in sites if not s.functional and s.mha is None}
    mhas: dict[str, list] = {}
    for s in sites:
        if s.mha is not None:
            mhas.setdefault(s.mha, []).append(s)
    for name, m in module.named_modules():
        def count(mod, args, name=name):
            ctx.calls[name] = ctx.calls.get(name, 0) + 1
        handles.append(m.register_forward_pre_hook(count))
        if name in wanted:
            def hook(mod, args, out, name=name):
                if (args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor)
                        and not args[0].is_nested and not out.is_nested):  # a nested tensor has no one shape
                    ctx.shapes.setdefault(name, (tuple(args[0].shape), tuple(out.shape)))
            handles.append(m.register_forward_hook(hook))
        if name in mhas:
            def mha_hook(mod, args, kwargs, out, name=name, projs=mhas[name]):
                qkv = list(args[:3]) + [kwargs.get(k) for k in ("query", "key", "value")][len(args[:3]):]
                if len(qkv) < 3 or not all(isinstance(t, torch.Tensor) and not t.is_nested for t in qkv):
                    return
                e = mod.embed_dim
                for s in projs:
                    proj = s.name.rpartition(".")[2]
                    src = {"q_proj": qkv[0], "k_proj": qkv[1], "v_proj": qkv[2]}.get(proj)
                    if src is not None:
                        ctx.shapes.setdefault(s.name, (tuple(src.shape), tuple(src.shape[:-1]) + (e,)))
                    else:  # out_proj: one row per query position
                        rows = tuple(qkv[0].shape[:-1])
                        ctx.shapes.setdefault(s.name, (rows + (e,), rows + (e,)))
            handles.append(m.register_forward_hook(mha_hook, with_kwargs=True))
    return handles


def annotate_shapes(module: nn.Module, ctx: PassContext) -> PassResult:
    if not ctx.example_inputs and not ctx.example_kwargs:
        return PassResult(module, False)
    cap = ctx.capture
    sites = find_sites(module, ctx)
    handles = _hooks(module, ctx, sites)
    try:
        with torch.no_grad():
            if isinstance(module, fx.GraphModule) and (cap is None or cap.graph_mode):
                _graph_mode(module, ctx)
            elif cap is not None and cap.graph is not None and not ctx.example_kwargs:
                ShapeProp(cap.graph).propagate(*ctx.example_inputs)
                for s in sites:
                    if s.functional:
                        _functional_shape(s, ctx)
            else:
                run_example(module, ctx)
                for s in sites:
                    if s.functional:
                        _functional_shape(s, ctx)
    except Exception as exc:
        raise _input_error(exc, ctx) from exc
    finally:
        for h in handles:
            h.remove()
    fill_decisions(ctx)
    return PassResult(module, False)


def fill_decisions(ctx: PassContext) -> None:
    """Each site decision's input shape and dense FLOPs, from the shapes in ``ctx.shapes``."""
    for d in ctx.plan.decisions if ctx.plan is not None else ():
        if not d.site:
            continue
        in_shape, out_shape = ctx.shapes.get(d.node or d.name, (None, None))
        d.input_shape = in_shape
        layer_type = "Linear" if linear_like(d.layer_type) else d.layer_type
        d.flops_before = dense_flops(layer_type, d.weight_shape, in_shape, out_shape)
        d.flops_after = d.flops_before


def _functional_shape(site, ctx: PassContext) -> None:
    (node,) = site.nodes
    x = node.args[1] if "addmm" in str(node.target) else (node.args[0] if node.args else node.kwargs.get("input"))
    in_shape = _shape(x.meta) if isinstance(x, fx.Node) else None
    out_shape = _shape(node.meta)
    if in_shape is not None and out_shape is not None:
        ctx.shapes.setdefault(site.name, (in_shape, out_shape))
        ctx.shapes[node.name] = (in_shape, out_shape)
