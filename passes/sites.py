"""Finding the layers a pass can rewrite: module call sites and functional ones.

A ``LayerSite`` is one rewritable layer: an ``nn.Linear`` / ``nn.ConvNd``
module (every call site of it), or an ``F.linear(x, self.weight, self.bias)``
call whose weight and bias are parameters of the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerSite", "find_sites", "MODULE_TYPES", "LINEAR_FUNCTIONS", "param_owners"]

#: Module types that are candidates for some method (by class name).
MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear)


@dataclass
class LayerSite:
    name: str                       # module qualname, or the weight's qualname for F.linear
    layer_type: str                 # "Linear", "Conv2d", ... ("Linear" for F.linear too)
    weight: torch.Tensor
    bias: torch.Tensor | None
    module: nn.Module | None = None
    nodes: list[fx.Node] = field(default_factory=list)
    functional: bool = False
    bias_name: str | None = None

    @property
    def display_type(self) -> str:
        return "F.linear" if self.functional else self.layer_type


def param_owners(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> every qualified name it is reachable by`` (tied weights have several)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return owners


def _attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def find_sites(module: nn.Module, traced: bool) -> list[LayerSite]:
    """Every candidate layer, in graph order (module-tree order without a graph)."""
    sites: dict[str, LayerSite] = {}
    if not traced:
        for name, m in module.named_modules():
            if name and isinstance(m, MODULE_TYPES):
                sites[name] = LayerSite(name, type(m).__name__, m.weight, m.bias, module=m)
        return list(sites.values())
    assert isinstance(module, fx.GraphModule)
    for node in module.graph.nodes:
        if node.op == "call_module":
            m = module.get_submodule(node.target)
            if isinstance(m, MODULE_TYPES):
                site = sites.get(node.target)
                if site is None:
                    site = sites[node.target] = LayerSite(node.target, type(m).__name__, m.weight, m.bias, module=m)
                site.nodes.append(node)
        elif node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
            args = list(node.args) + [None] * 3
            w = node.kwargs.get("weight", args[1])
            b = node.kwargs.get("bias", args[2])
            if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                continue
            weight = _attr(module, w.target)
            if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
                continue
            bias = None
            bias_name = None
            if isinstance(b, fx.Node):
                if b.op != "get_attr":
                    continue
                bias, bias_name = _attr(module, b.target), b.target
            elif b is not None:
                continue
            key = f"{w.target}@{node.name}"
            sites[key] = LayerSite(w.target, "Linear", weight, bias, nodes=[node], functional=True,
                                   bias_name=bias_name)
    return list(sites.values())


def _free_name(root: nn.Module, parent: str, base: str) -> str:
    owner = root.get_submodule(parent) if parent else root
    name, i = base, 0
    while hasattr(owner, name):
        i += 1
        name = f"{base}_{i}"
    return f"{parent}.{name}" if parent else name


def install_module(root: nn.Module, site: LayerSite, new: nn.Module) -> str:
    """Put ``new`` where ``site`` was; return its qualified name.

    A module site is replaced under its own name.  A functional site gets the
    module registered beside the weight (``<weight name>_rewritten``) and its
    ``F.linear`` node becomes a call of that module; the dense weight and bias
    are then removed from their owner if nothing else uses them.
    """
    from .infra import set_submodule

    if not site.functional:
        set_submodule(root, site.name, new)
        return site.name
    assert isinstance(root, fx.GraphModule)
    (node,) = site.nodes
    parent, _, attr = site.name.rpartition(".")
    qualname = _free_name(root, parent, f"{attr}_rewritten")
    root.add_submodule(qualname, new)
    x = node.args[0] if node.args else node.kwargs["input"]
    with root.graph.inserting_before(node):
        call = root.graph.call_module(qualname, (x,))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    root.graph.erase_node(node)
    root.graph.eliminate_dead_code()
    still_used = {n.target for n in root.graph.nodes if n.op == "get_attr"}
    for qn in (site.name, site.bias_name):
        if qn is not None and qn not in still_used:
            p, _, a = qn.rpartition(".")
            owner = root.get_submodule(p) if p else root
            if a in owner._parameters:
                del owner._parameters[a]
    return qualname
