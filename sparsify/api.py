"""The public API: ``sparsify``, ``densify``, ``report``."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .config import SparsifyConfig
from .decision import Decision, Plan
from .passes import PIPELINE, PassContext, capture, run_passes
from .passes.costs import param_count
from .plan import plan_model
from .report import Report

__all__ = ["sparsify", "densify", "report", "PLAN_ATTR"]

#: Where a converted model keeps its plan (decisions), for ``report``.
PLAN_ATTR = "_sparsify_plan"


def _check_example_inputs(example_inputs: Any) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ValueError(
        f"sparsify(example_inputs=...): expected a tensor or a tuple of the model's positional inputs. "
        f"Got {type(example_inputs).__name__}."
    )


def sparsify(
    model: nn.Module,
    config: SparsifyConfig | dict | None = None,
    *,
    example_inputs: Any = None,
    inplace: bool = False,
    progress: Callable[[str], None] | None = None,
    **shorthand: Any,
) -> nn.Module:
    """Rewrite ``model``'s dense layers as the config says; return the converted model.

    Keyword arguments other than the ones named are shorthand for a
    :class:`SparsifyConfig` (``method=``, ``density=``, ``block_size=``,
    ``rank=``, ``tolerance=``, ``rules=``, ...).  The input model is never
    changed unless ``inplace=True``.  ``example_inputs`` enable FLOP counts,
    BatchNorm folding after Linear layers and residual fusion.

    Example:
        >>> import torch, sparsify
        >>> model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU())
        >>> sparse = sparsify.sparsify(model, method="block_sparse", density=0.25, block_size=32)
        >>> sparse(torch.randn(4, 512)).shape
        torch.Size([4, 512])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify: expected an nn.Module. Got {type(model).__name__}.")
    cfg = SparsifyConfig.coerce(config, shorthand)  # raises before anything is touched
    inputs = _check_example_inputs(example_inputs)
    work = model if inplace else copy.deepcopy(model)
    gm, traced, note = capture(work)
    ctx = PassContext(config=cfg, example_inputs=inputs, traced=traced, capture_note=note,
                      planner=plan_model, progress=progress)
    out = run_passes(gm, ctx, PIPELINE)
    setattr(out, PLAN_ATTR, ctx.plan)
    return out


def _dense_replacement(m: nn.Module) -> nn.Module | None:
    fn = getattr(m, "to_dense_module", None)
    return fn() if callable(fn) else None


def densify(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every rewritten layer replaced by its exact dense equivalent.

    ``densify(sparsify(m))`` computes what ``m`` computes with each layer's
    mask or reconstruction applied.

    Example:
        >>> import torch, sparsify
        >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(256, 256)), density=0.5)
        >>> type(sparsify.densify(m).get_submodule("0")).__name__
        'Linear'
    """
    out = copy.deepcopy(module)
    if isinstance(out, fx.GraphModule):
        graph = out.graph
        for node in list(graph.nodes):
            if node.op != "call_module":
                continue
            new = _dense_replacement(out.get_submodule(node.target))
            if new is None:
                continue
            parent, _, attr = node.target.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, attr, new)
            if len(node.args) > 1:  # a fused residual: call the dense layer, then add
                x, residual = node.args[0], node.args[1]
                node.args = (x,)
                with graph.inserting_after(node):
                    add = graph.call_function(torch.add, (node, residual))
                node.replace_all_uses_with(add, delete_user_cb=lambda u, add=add: u is not add)
        graph.lint()
        out.recompile()
    else:
        for name, m in list(out.named_modules()):
            new = _dense_replacement(m) if name else None
            if new is not None:
                parent, _, attr = name.rpartition(".")
                setattr(out.get_submodule(parent) if parent else out, attr, new)
    if PLAN_ATTR in out.__dict__:
        del out.__dict__[PLAN_ATTR]
    return out


def report(module: nn.Module) -> Report:
    """The per-layer table of a converted model (from its decisions, or from its layers).

    Example:
        >>> import torch, sparsify
        >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(256, 256)), density=0.5)
        >>> sparsify.report(m).rows[0]["method"]
        'block_sparse'
    """
    plan = getattr(module, PLAN_ATTR, None)
    if isinstance(plan, Plan):
        return Report.from_plan(plan)
    # A model without its plan (loaded, or built by hand): describe its rewritten layers.
    rows = []
    for name, m in module.named_modules():
        if hasattr(m, "to_dense_module") and name:
            w = m.to_dense()
            d = Decision(name=name, layer_type=type(m).__name__, weight_shape=tuple(w.shape),
                         method=getattr(m, "method_name", type(m).__name__), reason="found in the model",
                         params_before=w.numel() + (m.bias.numel() if getattr(m, "bias", None) is not None else 0),
                         params_after=param_count(m))
            rows.append(d.to_dict())
    return Report(rows)
