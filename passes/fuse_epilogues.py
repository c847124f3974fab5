"""fuse_epilogues: fold an activation and a residual add into the block-sparse op.

``act(linear(x))`` becomes one ``BlockSparseLinear`` with ``activation=act``;
``linear(x) + r`` (or ``act(linear(x)) + r``) passes ``r`` as the op's
residual, when the example inputs show ``r`` has the output's shape and dtype.
Only a layer called at a single site, whose output nothing else reads, is
fused.  In graph mode (``graph=True``) both fusions are graph surgery.  On the
user's model only an activation *module* called once, right after the layer,
is fused (the layer takes the activation, the activation module becomes
``nn.Identity``); a residual add or a functional activation lives in the
model's code and stays there.  A layer or activation module with hooks is not
fused: the hooks would see the fused result, or never run.  Needs an fx graph
(the one rewritten, or the fx analysis graph); otherwise it does nothing.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..modules.block_sparse import BlockSparseLinear
from .hooks import has_call_hooks
from .infra import PassContext, PassResult, set_submodule

__all__ = ["fuse_epilogues"]

_ACT_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu"}
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.silu: "silu", F.gelu: "gelu", torch.nn.functional.gelu: "gelu"}
_ACT_METHODS = {"relu": "relu"}


def _activation_of(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if type(m) in _ACT_MODULES and not getattr(m, "inplace", False):
            return _ACT_MODULES[type(m)]
        if type(m) is nn.GELU:
            return "gelu" if m.approximate == "none" else "gelu_tanh"
        return None
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        if node.kwargs.get("inplace"):
            return None
        name = _ACT_FUNCTIONS[node.target]
        if name == "gelu":
            approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            return "gelu" if approx == "none" else "gelu_tanh" if approx == "tanh" else None
        return name if len(node.args) == 1 else None
    if node.op == "call_method" and node.target in _ACT_METHODS and len(node.args) == 1:
        return _ACT_METHODS[node.target]
    return None


def _hooked(name: str, modules: list[nn.Module], what: str, ctx: PassContext) -> bool:
    """Whether hooks forbid a fusion: a hook on the layer would see the fused result (and a forward
    pre-hook the residual as a second input); one on the activation module would never run."""
    if not any(has_call_hooks(m) for m in modules):
        return False
    ctx.notes.append(f"{name!r} not fused with {what}: hooks registered on them would see other tensors or none")
    return True


def _meta(node) -> object | None:
    return node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None


def fuse_epilogues(module: nn.Module, ctx: PassContext) -> PassResult:
    if not getattr(ctx.config, "fuse_epilogues", True):
        return PassResult(module, False)
    cap = ctx.capture
    if isinstance(module, fx.GraphModule) and (cap is None or cap.graph_mode):
        return _fuse_in_graph(module, ctx)
    if cap is None or cap.graph is None:
        return PassResult(module, False)
    gm = cap.graph
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or calls.get(node.target) != 1 or len(node.args) != 1 or node.kwargs:
            continue
        layer = module.get_submodule(node.target)
        if not isinstance(layer, BlockSparseLinear) or layer.activation != "none" or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op != "call_module" or calls.get(user.target) != 1:
            continue
        act = _activation_of(module, user)
        if act is None or _hooked(node.target, [layer, module.get_submodule(user.target)], "its activation", ctx):
            continue
        layer.activation = act
        set_submodule(module, user.target, nn.Identity())
        user.replace_all_uses_with(node)
        gm.graph.erase_node(user)
        ctx.notes.append(f"fused {act} into {node.target!r} (the model's {user.target!r} is now an identity)")
    return PassResult(module, False)


def _fuse_in_graph(module: fx.GraphModule, ctx: PassContext) -> PassResult:
    gm = module
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    modified = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or calls.get(node.target) != 1 or len(node.args) != 1 or node.kwargs:
            continue
        layer = gm.get_submodule(node.target)
        if not isinstance(layer, BlockSparseLinear) or layer.activation != "none":
            continue
        tail = node
        # activation
        if len(tail.users) == 1:
            (user,) = tail.users
            act = _activation_of(gm, user)
            hooked = [layer] + ([gm.get_submodule(user.target)] if user.op == "call_module" else [])
            if act is not None and not _hooked(node.target, hooked, "its activation", ctx):
                layer.activation = act
                user.replace_all_uses_with(node)
                gm.graph.erase_node(user)
                ctx.notes.append(f"fused {act} into {node.target!r}")
                modified = True
        # residual add: needs shapes to be sure the add is not a broadcast
        if len(node.users) == 1:
            (user,) = node.users
            if user.op == "call_function" and user.target in (operator.add, torch.add) and len(user.args) == 2 \
                    and not user.kwargs:
                other = user.args[1] if user.args[0] is node else user.args[0]
                mo, mn = _meta(other), _meta(node)
                if (isinstance(other, fx.Node) and other is not node and mo is not None and mn is not None
                        and tuple(mo.shape) == tuple(mn.shape) and mo.dtype == mn.dtype
                        and not _hooked(node.target, [layer], "the residual add after it", ctx)):
                    node.args = (node.args[0], other)
                    # the residual must be computed before the fused call
                    _move_before(other, node)
                    user.replace_all_uses_with(node)
                    gm.graph.erase_node(user)
                    ctx.notes.append(f"fused the residual add after {node.target!r}")
                    modified = True
    return PassResult(gm, modified)


def _move_before(dep: fx.Node, node: fx.Node) -> None:
    """Make sure ``dep`` comes before ``node`` in the graph's order."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    if order[dep] < order[node]:
        return
    # dep is after node: move node (the call) to just after dep; node's own inputs precede node already.
    dep.append(node)
