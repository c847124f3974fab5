"""fold_batchnorm: fold an eval-mode BatchNorm into the Linear / Conv before it.

The folded layer is a new module (``torch.nn.utils.fusion``), so the user's
modules are never changed.  Only a BatchNorm that is in eval mode, follows a
layer whose output nothing else reads, and has running statistics is folded;
after a Linear, only when the example inputs show a 2-D output (BatchNorm1d
normalizes dim 1).
Needs a graph; in the module-tree fallback it does nothing.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .infra import PassContext, PassResult, set_submodule

__all__ = ["fold_batchnorm"]

_PAIRS = (
    (nn.Conv1d, nn.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv3d, nn.BatchNorm3d),
    (nn.Linear, nn.BatchNorm1d),
)


def fold_batchnorm(module: nn.Module, ctx: PassContext) -> PassResult:
    if not isinstance(module, fx.GraphModule) or not getattr(ctx.config, "fold_batchnorm", True):
        return PassResult(module, False)
    gm = module
    modified = False
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not node.args:
            continue
        bn = gm.get_submodule(node.target)
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1):
            continue
        layer = gm.get_submodule(prev.target)
        if not any(isinstance(layer, lt) and type(bn) is bt for lt, bt in _PAIRS):
            continue
        if bn.training or not bn.track_running_stats or bn.running_mean is None:
            continue
        # A layer or BatchNorm reused elsewhere cannot absorb this one's statistics.
        if calls.get(prev.target, 0) != 1 or calls.get(node.target, 0) != 1:
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
        set_submodule(gm, prev.target, fused)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        ctx.notes.append(f"folded BatchNorm {node.target!r} into {prev.target!r}")
        modified = True
    return PassResult(gm, modified)
