"""fold_batchnorm: fold an eval-mode BatchNorm into the Linear / Conv before it.

The folded layer is a new module (``torch.nn.utils.fusion``), so the user's
modules are never changed.  Only a BatchNorm that is in eval mode, follows a
layer whose output nothing else reads, and has running statistics is folded;
after a Linear, only when the example inputs show a 2-D output (BatchNorm1d
normalizes dim 1).  A pair with hooks that would see other tensors after folding (any
forward / backward hook on the BatchNorm, a forward or backward hook on the layer) is
not folded; the layer's forward pre-hooks move to the folded layer.
Needs an fx graph: the graph being rewritten (``graph=True``), or the fx analysis
graph of the user's model, where the folded layer replaces the Linear / Conv and
an ``nn.Identity`` the BatchNorm.  With a torch.export analysis or none it does
nothing.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .hooks import carry_hooks, has_call_hooks
from .infra import PassContext, PassResult, set_submodule

__all__ = ["fold_batchnorm"]

_PAIRS = (
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv3d, nn.BatchNorm3d),
    (nn.Linear, nn.BatchNorm1d),
)


def _analysis_graph(module: nn.Module, ctx: PassContext) -> fx.GraphModule | None:
    cap = ctx.capture
    if isinstance(module, fx.GraphModule) and (cap is None or cap.graph_mode):
        return module
    return None if cap is None else cap.graph


def fold_batchnorm(module: nn.Module, ctx: PassContext) -> PassResult:
    gm = _analysis_graph(module, ctx)
    if gm is None or not getattr(ctx.config, "fold_batchnorm", True):
        return PassResult(module, False)
    modified = False
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not node.args:
            continue
        bn = module.get_submodule(node.target)
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1):
            continue
        layer = module.get_submodule(prev.target)
        if not any(isinstance(layer, lt) and type(bn) is bt for lt, bt in _PAIRS):
            continue
        if bn.training or not bn.track_running_stats or bn.running_mean is None:
            continue
        if has_call_hooks(bn) or has_call_hooks(layer, pre=False):
            # a hook on the BatchNorm, or one that sees the layer's output or gradients, would see other tensors
            ctx.notes.append(f"BatchNorm {node.target!r} not folded into {prev.target!r}: hooks registered on "
                             "them would see other tensors")
            continue
        # A layer or BatchNorm reused elsewhere cannot absorb this one's statistics.
        if calls.get(prev.target, 0) != 1 or calls.get(node.target, 0) != 1:
            continue
        if gm is not module:
            # In the user's model only a layer that is rewritten absorbs its BatchNorm:
            # folding changes what training the model later does, so it must buy something.
            d = ctx.plan.get(prev.target) if ctx.plan is not None else None
            if d is None or not d.rewrites:
                continue
        if isinstance(layer, nn.Linear):
            # BatchNorm1d normalizes dim 1, which is the Linear's feature dim only for 2-D outputs.
            shapes = ctx.shapes.get(prev.target)
            if layer.training or shapes is None or len(shapes[1]) != 2:
                continue
            fused = fuse_linear_bn_eval(layer, bn)
        else:
            if layer.training:
                continue
            fused = fuse_conv_bn_eval(layer, bn)
        carry_hooks(layer, fused)  # forward pre-hooks and state-dict hooks (the ones the check above allows)
        set_submodule(module, prev.target, fused)
        if gm is not module:  # the user's model keeps its BatchNorm attribute, as an identity
            set_submodule(module, node.target, nn.Identity())
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        ctx.notes.append(f"folded BatchNorm {node.target!r} into {prev.target!r}")
        modified = True
    return PassResult(module, modified and gm is module)
