"""Finding the layers a pass can rewrite, and putting rewritten layers in their place.

A ``LayerSite`` is one linear-like or conv weight that a method can rewrite:

* a module: ``nn.Linear`` (and subclasses), ``nn.Conv1d`` / ``nn.Conv2d``, Hugging
  Face ``Conv1D`` (a Linear whose weight is stored ``[in, out]``);
* a projection of ``nn.MultiheadAttention``: the three row blocks of the packed
  ``in_proj_weight`` (or ``q/k/v_proj_weight``) as ``<mha>.q_proj`` / ``k_proj`` /
  ``v_proj``, and ``<mha>.out_proj``;
* a functional use of a 2-D parameter, found in the analysis graph:
  ``F.linear(x, W, b)``, ``x @ W.T``, ``torch.matmul(x, W)``, ``torch.addmm(b, x, W)``.

``site.weight`` is always oriented ``[out, in]`` (a view of the parameter for
``Conv1D`` and transposed uses); ``site.param`` is the parameter itself (for
tie detection); ``site.transposed`` says the source stores it ``[in, out]``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .capture import hf_conv1d

__all__ = ["LayerSite", "find_sites", "MODULE_TYPES", "LINEAR_FUNCTIONS", "param_owners", "install_module",
           "linear_like"]

#: Module types that are candidates for some method.
MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear)
_MATMULS = (torch.matmul, operator.matmul, torch.mm)
_ADDMM = (torch.addmm,)
_LINEAR_LIKE = ("Linear", "Conv1D", "F.linear", "MultiheadAttention")


def linear_like(layer_type: str) -> bool:
    return layer_type in _LINEAR_LIKE


@dataclass
class LayerSite:
    name: str                       # module / projection qualname, or the weight's qualname (functional)
    layer_type: str                 # "Linear", "Conv1d", "Conv2d", "Conv1D", "MultiheadAttention"
    weight: torch.Tensor            # [out, in] (or the conv kernel)
    bias: torch.Tensor | None
    module: nn.Module | None = None
    nodes: list[fx.Node] = field(default_factory=list)
    functional: bool = False
    bias_name: str | None = None
    param: torch.Tensor | None = None       # the Parameter that holds the weight
    transposed: bool = False                # the source stores the weight [in, out]
    mha: str | None = None                  # qualname of the nn.MultiheadAttention a projection belongs to
    detail: str = ""                        # where the weight lives, for the report
    other_uses: int = 0                     # graph uses of the weight besides this site (functional)
    kept_bias: int = 0                      # bias elements that stay on the owner (module-mode functional)
    param_name: str | None = None           # qualified name of ``param``

    def __post_init__(self) -> None:
        if self.param is None:
            self.param = self.weight
        if self.param_name is None:
            self.param_name = self.name if self.functional else f"{self.name}.weight"

    @property
    def display_type(self) -> str:
        return "F.linear" if self.functional else self.layer_type

    @property
    def method_type(self) -> str:
        """The layer kind methods are registered for (``"Linear"`` for every linear-like site)."""
        return "Linear" if linear_like(self.layer_type) else self.layer_type

    @property
    def rule_types(self) -> tuple[str, ...]:
        """Type names a ``Rule(type=...)`` may use for this site."""
        names = {self.layer_type, self.method_type}
        if self.module is not None:
            names.add(type(self.module).__name__)
        return tuple(sorted(names))

    @property
    def key(self) -> tuple[str, str | None]:
        return self.name, self.nodes[0].name if self.functional else None

    @property
    def tie_key(self) -> tuple:
        """Two sites with the same key share one weight (MHA's row blocks do not)."""
        return (id(self.param), self.detail if self.mha else "")


def param_owners(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> every qualified name it is reachable by`` (tied weights have several)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return owners


def _attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ------------------------------------------------------------------ module sites
def _module_sites(name: str, m: nn.Module) -> list[LayerSite]:
    if isinstance(m, nn.MultiheadAttention):
        if hasattr(m, "to_dense_module"):
            return []  # already rewritten
        from ..modules.attention import mha_projection_weights

        out = []
        for proj, (w, b, where) in mha_projection_weights(m).items():
            param = m.in_proj_weight if m._qkv_same_embed_dim else getattr(m, f"{proj}_weight")
            pname = "in_proj_weight" if m._qkv_same_embed_dim else f"{proj}_weight"
            out.append(LayerSite(f"{name}.{proj}" if name else proj, "MultiheadAttention", w, b, module=None,
                                 param=param, mha=name, detail=where,
                                 param_name=f"{name}.{pname}" if name else pname))
        return out
    if hf_conv1d(m):
        return [LayerSite(name, "Conv1D", m.weight.t(), m.bias, module=m, param=m.weight, transposed=True,
                          detail="weight stored [in, out]")]
    if type(m) is nn.LSTM:  # block_sparse rewrites the whole layer (passes/block_sparsify_layers.py)
        return [LayerSite(name, "LSTM", m.weight_hh_l0, None, module=m, param=m.weight_hh_l0,
                          param_name=f"{name}.weight_hh_l0", detail="all its input and recurrent weights")]
    if isinstance(m, MODULE_TYPES):
        return [LayerSite(name, "Linear" if isinstance(m, nn.Linear) else type(m).__name__, m.weight, m.bias,
                          module=m)]
    return []


def _mark_mha_out_proj(root: nn.Module, sites: dict[str, LayerSite]) -> None:
    for name, m in root.named_modules():
        if isinstance(m, nn.MultiheadAttention) and not hasattr(m, "to_dense_module"):
            s = sites.get(f"{name}.out_proj" if name else "out_proj")
            if s is not None:
                s.mha = name
                s.layer_type = "MultiheadAttention"
                s.detail = "out_proj (nn.MultiheadAttention passes its weight to F.multi_head_attention_forward)"


# -------------------------------------------------------------- functional sites
def _unwrap_t(a):
    """``(node, transposed)`` for ``W``, ``W.t()``, ``W.T``, ``torch.t(W)``."""
    if isinstance(a, fx.Node):
        if a.op == "call_method" and a.target == "t" and len(a.args) == 1:
            return a.args[0], True
        if a.op == "call_function" and a.target is torch.t:
            return a.args[0], True
        if a.op == "call_function" and a.target is getattr and len(a.args) == 2 and a.args[1] in ("T", "mT"):
            return a.args[0], True
    return a, False


def _fx_functional(gm: fx.GraphModule, root: nn.Module, sites: dict) -> None:
    """``F.linear`` / ``x @ W.T`` / ``addmm`` calls whose weight is a 2-D parameter (get_attr)."""
    uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            uses[node.target] = uses.get(node.target, 0) + len(node.users)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        args = list(node.args)
        w = b = None
        transposed = False
        if node.target in LINEAR_FUNCTIONS:
            args += [None] * 3
            w, b = node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
        elif node.target in _MATMULS and len(args) == 2 and not node.kwargs:
            w, t = _unwrap_t(args[1])
            transposed = not t
        elif node.target in _ADDMM and len(args) == 3 and not node.kwargs:
            b, (w, t) = args[0], _unwrap_t(args[2])
            transposed = not t
        else:
            continue
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            continue
        weight = _attr(gm, w.target)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            continue
        bias, bias_name = None, None
        if isinstance(b, fx.Node):
            if b.op != "get_attr":
                continue
            bias, bias_name = _attr(gm, b.target), b.target
            if not isinstance(bias, nn.Parameter) or bias.dim() != 1:
                continue
        elif b is not None:
            continue
        key = f"{w.target}@{node.name}"
        sites[key] = LayerSite(w.target, "Linear", weight.t() if transposed else weight, bias, nodes=[node],
                               functional=True, bias_name=bias_name, param=weight, transposed=transposed,
                               other_uses=uses.get(w.target, 0) - 1 + _through_uses(node, w))


def _through_uses(node: fx.Node, w: fx.Node) -> int:
    """Extra uses of a transpose (``W.t()``) that feeds this call and something else."""
    return sum(len(u.users) - 1 for u in w.users if u is not node and node in u.users)


def _export_functional(ep, root: nn.Module, sites: dict, module_params: set[int]) -> None:
    """The same functional uses, found in a ``torch.export`` ATen graph."""
    aten = torch.ops.aten
    sig = ep.graph_signature
    p_of = {k: v.removeprefix("model.") for k, v in sig.inputs_to_parameters.items()}
    t_ops = {aten.t.default, aten.numpy_T.default} if hasattr(aten, "numpy_T") else {aten.t.default}

    def unwrap(a):
        if isinstance(a, fx.Node) and a.op == "call_function" and a.target in t_ops:
            return a.args[0], True
        if (isinstance(a, fx.Node) and a.op == "call_function" and a.target is aten.permute.default
                and list(a.args[1]) == [1, 0]):
            return a.args[0], True
        return a, False

    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        w = b = None
        transposed = False
        if node.target is aten.linear.default:
            w = node.args[1]
            b = node.args[2] if len(node.args) > 2 else None
        elif node.target in (aten.matmul.default, aten.mm.default) and len(node.args) == 2:
            w, t = unwrap(node.args[1])
            transposed = not t
        elif node.target is aten.addmm.default and len(node.args) == 3 and not node.kwargs:
            b, (w, t) = node.args[0], unwrap(node.args[2])
            transposed = not t
        else:
            continue
        if not (isinstance(w, fx.Node) and w.op == "placeholder" and w.name in p_of):
            continue
        wname = p_of[w.name]
        try:
            weight = root.get_parameter(wname)
        except AttributeError:
            continue
        if weight.dim() != 2 or id(weight) in module_params:
            continue
        bias, bias_name = None, None
        if isinstance(b, fx.Node):
            if not (b.op == "placeholder" and b.name in p_of):
                continue
            bias_name = p_of[b.name]
            bias = root.get_parameter(bias_name)
        elif b is not None:
            continue
        direct = [u for u in w.users if u is not node and not (u in node.args and len(u.users) == 1)]
        sites[f"{wname}@{node.name}"] = LayerSite(
            wname, "Linear", weight.t() if transposed else weight, bias, nodes=[node], functional=True,
            bias_name=bias_name, param=weight, transposed=transposed, other_uses=len(direct))


# ------------------------------------------------------------------------ find
def find_sites(module: nn.Module, ctx=None) -> list[LayerSite]:
    """Every candidate layer of ``module``.

    ``module`` is the model (module mode) or a ``GraphModule`` (graph mode).  ``ctx``
    (a ``PassContext``) carries the capture with the analysis graph; ``True`` /
    ``False`` / None are accepted for callers that only know whether ``module`` is a
    traced graph.
    """
    cap = getattr(ctx, "capture", None)
    sites: dict[str, LayerSite] = {}
    graph_mode = isinstance(module, fx.GraphModule) and (cap is None or cap.graph_mode)
    if graph_mode:
        for node in module.graph.nodes:
            if node.op != "call_module":
                continue
            for s in _module_sites(node.target, module.get_submodule(node.target)):
                site = sites.setdefault(s.name, s)
                site.nodes.append(node)
        _mark_mha_out_proj(module, sites)
        _fx_functional(module, module, sites)
        return list(sites.values())
    for name, m in module.named_modules():
        if not name:
            continue
        for s in _module_sites(name, m):
            sites[s.name] = s
    _mark_mha_out_proj(module, sites)
    if cap is not None and cap.graph is not None:
        _fx_functional(cap.graph, module, sites)
    elif cap is not None and cap.exported is not None:
        module_params = {id(s.param) for s in sites.values()}
        _export_functional(cap.exported, module, sites, module_params)
    return list(sites.values())


# ---------------------------------------------------------------------- install
def _free_name(owner: nn.Module, base: str) -> str:
    name, i = base, 0
    while hasattr(owner, name):
        i += 1
        name = f"{base}_{i}"
    return name


def install_module(root: nn.Module, site: LayerSite, new: nn.Module, notes: list[str] | None = None) -> str:
    """Put ``new`` where ``site`` was; return its qualified name.

    * module sites: ``new`` replaces the module under its own name;
    * MHA projections: the ``nn.MultiheadAttention`` becomes a
      ``SparseMultiheadAttention`` (once) and ``new`` its ``q_proj`` / ... / ``out_proj``;
    * functional sites in a graph (``graph=True``): ``new`` is registered beside the
      weight (``<weight>_rewritten``) and the call becomes a call of it;
    * functional sites in the model: ``new`` is registered beside the weight, and
      the weight's attribute reads the layer's dense view (see ``modules.functional``).

    A module that is replaced hands its hooks to its replacement (``hooks.carry_hooks``);
    what could not be carried is said in ``notes``.
    """
    from .hooks import carry_hooks, clear_call_hooks
    from .infra import set_submodule

    def replace(qualname: str, old: nn.Module | None, new: nn.Module, owner: nn.Module | None = None) -> None:
        left = carry_hooks(old, new) if old is not None else []
        if left and notes is not None:
            notes.append(f"{qualname!r}: the hooks of torch's weight reparametrization ({', '.join(sorted(set(left)))}) "
                         "were not carried to the rewritten layer, which holds the weight they computed at conversion")
        if owner is None:
            set_submodule(root, qualname, new)
        else:
            setattr(owner, qualname.rpartition(".")[2], new)

    if site.transposed:
        new.weight_transposed = True
        if site.module is not None:  # HF Conv1D keeps its attributes
            new.nf, new.nx = site.module.nf, site.module.nx
    if site.mha is not None:
        from ..modules.attention import SparseMultiheadAttention

        mha = root.get_submodule(site.mha) if site.mha else root
        if not isinstance(mha, SparseMultiheadAttention):
            if not site.mha:
                raise ValueError("sparsify: the model itself is an nn.MultiheadAttention; wrap it in a module "
                                 "to rewrite its projections.")
            mha_new = SparseMultiheadAttention.from_mha(mha)
            # nn.MultiheadAttention never calls out_proj, so hooks on it never ran; the new module calls it
            silenced = clear_call_hooks(mha_new.out_proj)
            if silenced and notes is not None:
                notes.append(f"{site.mha + '.out_proj'!r}: {silenced} forward / backward hook(s) removed: "
                             "nn.MultiheadAttention never calls out_proj, so they never ran; "
                             "SparseMultiheadAttention calls it and they would")
            replace(site.mha, mha, mha_new)
            mha = mha_new
        attr = site.name.rpartition(".")[2]
        replace(site.name, getattr(mha, attr), new, owner=mha)
        return site.name
    if not site.functional:
        replace(site.name, root.get_submodule(site.name), new)
        return site.name
    parent, _, attr = site.name.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    layer_attr = _free_name(owner, f"{attr}_rewritten")
    qualname = f"{parent}.{layer_attr}" if parent else layer_attr
    if isinstance(root, fx.GraphModule) and site.nodes and site.nodes[0].graph is root.graph:
        return _install_in_graph(root, site, new, qualname)
    from ..modules.functional import replace_parameter

    owner.add_module(layer_attr, new)
    replace_parameter(owner, attr, layer_attr)
    return qualname


def _install_in_graph(root: fx.GraphModule, site: LayerSite, new: nn.Module, qualname: str) -> str:
    (node,) = site.nodes
    root.add_submodule(qualname, new)
    if node.target in LINEAR_FUNCTIONS:
        x = node.args[0] if node.args else node.kwargs["input"]
    elif node.target in _ADDMM:
        x = node.args[1]
    else:
        x = node.args[0]
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
