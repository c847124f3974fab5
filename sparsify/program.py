"""sparsify's own program format: a converted model's inference graph, stored as data.

``program.json`` holds the graph that ``torch.export.export(model, example_inputs)``
captures (ATen ops and ``torch.ops.sparsify.*``), written and read by this module
alone.  Nothing in it can become code: loading looks every call target up in
:data:`TARGETS`, a fixed table of allowed callables in this file (a dict lookup,
never an import or ``getattr`` of a string from the file); every name in the
rebuilt ``torch.fx`` graph is generated here (``x0``, ``t3``, ``n17``); keyword
names must be argument names of the op's own schema; constant strings are short
identifiers; shapes are plain integers or a symbol ``s0``..``s15`` with an integer
range, so nothing is ever evaluated.  Every count, length and depth is checked
against the limits below before anything is allocated, then the whole graph runs
once on ``meta`` tensors at the recorded example shape, so a program that would
build a tensor larger than :data:`MAX_NUMEL` elements, or an integer beyond int64,
is refused before a byte of real memory is used.  No private torch module is
involved on the load path, so a program saved under one torch release loads under
the next (as long as the ops it names still exist).

The format (version 1) is documented in docs/saved_models.md.

Example:
    >>> import torch, sparsify
    >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(256, 256)), density=0.5).eval()
    >>> x = torch.randn(2, 256)
    >>> doc, tensors = export_program(m, (x,))
    >>> prog = build_program(doc, [t for _, t in tensors])
    >>> torch.equal(prog(x), m(x))
    True
"""

from __future__ import annotations

import inspect
import math
import operator
import re
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import InputError

__all__ = [
    "PROGRAM_FORMAT", "PROGRAM_VERSION", "TARGETS", "ProgramRejected", "Unsupported", "LoadedProgram",
    "export_program", "build_program", "targets",
]

PROGRAM_FORMAT = "sparsify.program"
PROGRAM_VERSION = 1

# ------------------------------------------------------------------ limits
#: Every count in a program is checked against these before anything is built.
#: fx builds and code-generates ~2,000 nodes a second here: 20,000 loads in about ten seconds
#: (a 32-layer decoder exports about 5,000).
MAX_NODES = 20_000
MAX_TENSORS = 100_000
MAX_INPUTS = 64
MAX_RANK = 16                 # dims of one input
MAX_SYMBOLS = 16
MAX_ARGS = 64                 # positional + keyword arguments of one node
MAX_LIST = 4096               # items in one list argument
MAX_ARG_DEPTH = 3             # lists of lists of ...
MAX_VALUES = 4_000_000        # argument values in the whole program
MAX_STR = 64
MAX_OUTPUT_LEAVES = 100_000
MAX_TREE_DEPTH = 32
MAX_DIM = 2**31 - 1           # one dimension of an input
MAX_INT = 2**63 - 1           # any integer constant or computed size
#: The most elements one tensor of the program may have at the example shape.
MAX_NUMEL = 2**31
#: Seconds the meta-tensor check of one program may take.
CHECK_SECONDS = 60.0

_IDENT = re.compile(r"[A-Za-z0-9_]{0,64}\Z")
#: An einsum equation (``"ae,e->ae"``): the one string argument that is not an identifier, and only
#: as the first argument of ``aten.einsum`` (the factorized layers' contractions); torch parses it.
_EQUATION = re.compile(r"[A-Za-z.,]{1,128}(?:->[A-Za-z.]{0,64})?\Z")
_EINSUM = "aten.einsum.default"


def _equation(name: str, k: int, v: Any) -> bool:
    return name == _EINSUM and k == 0 and isinstance(v, str) and bool(_EQUATION.match(v))
_SYMBOL = re.compile(r"s(0|[1-9][0-9]?)\Z")
_DEVICE = re.compile(r"(cpu|cuda|mps)(:[0-9]{1,2})?\Z")


class ProgramRejected(InputError):
    """A stored program holds something sparsify does not load from a file."""


class Unsupported(Exception):
    """The model's exported graph cannot be written in this format (saving records why)."""


# ----------------------------------------------------------- allowed targets
#: ATen ops a stored program may call, as ``name.overload``: pure tensor functions
#: (arithmetic, shapes, indexing, reductions, nn ops).  Nothing that reads files,
#: touches storages directly (``set_``, ``as_strided``, ``from_file``) or returns
#: uninitialised memory (``empty*``).  Ops this torch lacks are left out of the table.
_ATEN = """
abs.default acos.default acosh.default adaptive_avg_pool1d.default adaptive_avg_pool2d.default
adaptive_max_pool1d.default adaptive_max_pool2d.default add.Scalar add.Tensor add_.Scalar add_.Tensor
addcdiv.default addcmul.default addmm.default alias.default all.default all.dim amax.default amin.default
any.default any.dim arange.default arange.start arange.start_step argmax.default argmin.default
asin.default atan.default atan2.default avg_pool1d.default avg_pool2d.default avg_pool3d.default
baddbmm.default batch_norm.default bitwise_and.Tensor bitwise_not.default bitwise_or.Tensor
bitwise_xor.Tensor bmm.default broadcast_to.default cat.default ceil.default chunk.default
clamp.default clamp.Tensor clamp_max.default clamp_min.default clamp_.default clone.default
constant_pad_nd.default contiguous.default conv1d.default conv2d.default conv3d.default
conv1d.padding conv2d.padding conv_transpose1d.default conv_transpose2d.input convolution.default
copy.default cos.default cosh.default cumsum.default detach.default diff.default div.Scalar div.Tensor
div.Tensor_mode div_.Tensor dropout.default einsum.default elu.default embedding.default eq.Scalar
eq.Tensor erf.default exp.default expand.default expand_as.default expm1.default fill.Scalar
flatten.using_ints flip.default floor.default floor_divide.default fmod.Scalar fmod.Tensor
full.default full_like.default gather.default ge.Scalar ge.Tensor gelu.default gelu_.default
glu.default group_norm.default gt.Scalar gt.Tensor hardsigmoid.default hardswish.default
hardtanh.default index.Tensor index_select.default instance_norm.default isinf.default isnan.default
layer_norm.default le.Scalar le.Tensor leaky_relu.default lift_fresh_copy.default linalg_vector_norm.default
linear.default log.default log10.default log1p.default log2.default log_softmax.int logical_and.default
logical_not.default logical_or.default logsumexp.default lt.Scalar lt.Tensor masked_fill.Scalar
masked_fill.Tensor masked_fill_.Scalar matmul.default max.default max.dim max.other max_pool1d.default
max_pool2d.default max_pool3d.default maximum.default mean.default mean.dim min.default min.dim
min.other minimum.default mish.default mm.default mul.Scalar mul.Tensor mul_.Tensor mul_.Scalar
narrow.default ne.Scalar ne.Tensor neg.default new_full.default new_ones.default new_zeros.default
norm.ScalarOpt_dim ones.default ones_like.default pad.default permute.default pixel_shuffle.default
pow.Scalar pow.Tensor_Scalar pow.Tensor_Tensor prod.default prod.dim_int reciprocal.default relu.default
relu_.default remainder.Scalar remainder.Tensor repeat.default repeat_interleave.self_int
repeat_interleave.Tensor reshape.default roll.default round.default rsqrt.default rsub.Scalar
scaled_dot_product_attention.default select.int sigmoid.default sigmoid_.default sign.default silu.default
silu_.default sin.default sinh.default slice.Tensor softmax.int softplus.default split.Tensor
split_with_sizes.default sqrt.default square.default squeeze.default squeeze.dim squeeze.dims
stack.default std.correction sub.Scalar sub.Tensor sub_.Tensor sum.default sum.dim_IntList t.default
tanh.default tanh_.default tensor_split.indices tensor_split.sections tile.default to.device to.dtype
to.dtype_layout topk.default transpose.int tril.default triu.default type_as.default unbind.int
unflatten.int unsqueeze.default upsample_bilinear2d.vec upsample_nearest2d.vec var.correction
view.default view_as.default where.self where.ScalarOther where.ScalarSelf where.Scalar zeros.default
zeros_like.default _assert_tensor_metadata.default _assert_scalar.default sym_size.int sym_numel.default
sym_stride.int _to_copy.default _weight_norm.default _softmax.default _log_softmax.default
_native_batch_norm_legit_no_training.default native_layer_norm.default native_group_norm.default
_unsafe_view.default bitwise_not.default __and__.Tensor __or__.Tensor __xor__.Tensor __not__.default
scalar_tensor.default
""".split()

#: The custom ops of sparsify's runtime a stored (inference) program may call.
_SPARSIFY = ("bsmm.default", "bsconv2d.default")

#: Python-level functions that appear in exported graphs for sizes and multi-output ops,
#: with the number of positional arguments each takes.  No ``pow``: sizes grow at most
#: by one multiplication per node, and every result is checked against int64.
_PYTHON: dict[str, tuple[Callable[..., Any], int]] = {
    "operator.getitem": (operator.getitem, 2),
    "operator.add": (operator.add, 2),
    "operator.sub": (operator.sub, 2),
    "operator.mul": (operator.mul, 2),
    "operator.floordiv": (operator.floordiv, 2),
    "operator.truediv": (operator.truediv, 2),
    "operator.mod": (operator.mod, 2),
    "operator.neg": (operator.neg, 1),
    "operator.eq": (operator.eq, 2),
    "operator.ne": (operator.ne, 2),
    "operator.lt": (operator.lt, 2),
    "operator.le": (operator.le, 2),
    "operator.gt": (operator.gt, 2),
    "operator.ge": (operator.ge, 2),
    "torch.sym_max": (torch.sym_max, 2),
    "torch.sym_min": (torch.sym_min, 2),
    "torch.sym_not": (torch.sym_not, 1),
    "torch.sym_float": (torch.sym_float, 1),
    "torch.sym_int": (torch.sym_int, 1),
}

_TABLE: dict[str, Callable[..., Any]] | None = None


def targets() -> dict[str, Callable[..., Any]]:
    """The table of allowed call targets, by the name a program uses for them."""
    global _TABLE
    if _TABLE is None:
        from . import runtime  # noqa: F401  (registers torch.ops.sparsify.*)

        table: dict[str, Callable[..., Any]] = {}
        for namespace, names in (("aten", _ATEN), ("sparsify", _SPARSIFY)):
            ns = getattr(torch.ops, namespace)
            for full in names:  # strings from this file, never from a program
                op_name, _, overload = full.partition(".")
                try:
                    table[f"{namespace}.{full}"] = getattr(getattr(ns, op_name), overload)
                except (AttributeError, RuntimeError):
                    continue  # this torch has no such op
        for name, (fn, _) in _PYTHON.items():
            table[name] = fn
        _TABLE = table
    return _TABLE


#: Alias kept for readers of the docs: the allowed targets (built on first use).
TARGETS = targets


def _name_of_target(target: Any) -> str | None:
    for name, fn in targets().items():
        if fn is target:
            return name
    return None


_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16,
              torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128)
}
_LAYOUTS = {"strided": torch.strided}
_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format,
                   "channels_last": torch.channels_last}


def _rev(table: dict[str, Any], value: Any, what: str) -> str:
    for k, v in table.items():
        if v == value:
            return k
    raise Unsupported(f"{what} {value!r} is not one a program can store")


# -------------------------------------------------------------------- export
def _treespec_children(spec: Any) -> list[Any]:
    if callable(getattr(spec, "children", None)):  # torch >= 2.13; children_specs is deprecated there
        return list(spec.children())
    return list(spec.children_specs)


def _is_leaf(spec: Any) -> bool:
    f = getattr(spec, "is_leaf", None)
    return bool(f()) if callable(f) else spec.num_children == 0 and spec.type is None


def export_program(
    module: nn.Module, example_inputs: tuple, kwargs: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[tuple[str, torch.Tensor]]]:
    """Export ``module`` (eval mode, batch dimension dynamic where torch allows) as a program.

    Returns ``(doc, tensors)``: the JSON-ready program, whose ``tensors[i]["key"]``
    the caller fills with the key each tensor is stored under, and the
    ``(kind, tensor)`` pairs it refers to.  Raises :class:`Unsupported` (with
    the reason) when the model's graph cannot be stored; the program is rebuilt
    and run once on ``example_inputs`` before it is returned, so what is written
    is what loads.
    """
    kwargs = dict(kwargs or {})
    keyword_inputs: dict[str, Any] = {}
    if isinstance(example_inputs, dict):  # keyword example inputs (as Hugging Face models take them)
        keyword_inputs = dict(example_inputs)
        example_inputs = ()
        kwargs = {**{k: v for k, v in kwargs.items() if k not in keyword_inputs}, **keyword_inputs}
    was_training = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            try:
                auto = lambda x: {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() else None  # noqa: E731
                dyn = tuple(auto(x) for x in example_inputs)
                ep = torch.export.export(module, tuple(example_inputs), kwargs=kwargs or None,
                                         dynamic_shapes=(dyn, {k: auto(v) for k, v in kwargs.items()}) if kwargs
                                         else dyn)
            except Exception:
                try:
                    ep = torch.export.export(module, tuple(example_inputs), kwargs=kwargs or None)
                except Exception as exc:
                    msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                    raise Unsupported(f"torch.export failed: {type(exc).__name__}: {msg}") from exc
            doc, tensors = _encode(ep, example_inputs, kwargs, set(keyword_inputs))
            # What we write must be what we load, and compute what the model computes.
            prog = build_program(doc, [t for _, t in tensors])
            expected = module(*example_inputs, **kwargs)
            got = prog(*example_inputs, **keyword_inputs)
            _compare(expected, got)
    finally:
        for m, t in was_training.items():
            m.training = t
    return doc, tensors


def _compare(expected: Any, got: Any) -> None:
    e, g = _flatten_out(expected), _flatten_out(got)
    if len(e) != len(g):
        raise Unsupported(f"the rebuilt program returns {len(g)} tensors, the model {len(e)}")
    for a, b in zip(e, g):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise Unsupported("the rebuilt program's outputs differ in shape or dtype from the model's")
        if a.is_floating_point():
            # Same ops on the same data: any difference beyond float32 round-off means a
            # different computation, not rounding (1e-4 relative is ~800 float32 ulps).
            scale = a.abs().max().item() if a.numel() else 0.0
            if a.numel() and (a.double() - b.double()).abs().max().item() > 1e-4 * max(scale, 1e-6):
                raise Unsupported("the rebuilt program computes something else than the model")
        elif not torch.equal(a, b):
            raise Unsupported("the rebuilt program computes something else than the model")


def _flatten_out(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten_out(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten_out(v)]
    return []


def _encode(ep: Any, example_inputs: tuple, kwargs: dict[str, Any], keyword_inputs: set[str]) -> tuple[dict, list]:
    sig = ep.graph_signature
    kinds = {"InputKind.PARAMETER": "parameter", "InputKind.BUFFER": "buffer",
             "InputKind.CONSTANT_TENSOR": "buffer", "InputKind.USER_INPUT": "input"}
    for spec in sig.output_specs:
        if str(spec.kind) != "OutputKind.USER_OUTPUT":
            raise Unsupported(f"the exported graph mutates state ({spec.kind}); a stored program is pure")
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(sig.input_specs):
        raise Unsupported("the exported graph's inputs do not match its signature")
    tensors: list[tuple[str, torch.Tensor]] = []
    refs: dict[fx.Node, Any] = {}
    user_leaves: list[Any] = []  # per user-input placeholder: the node, or a constant
    for node, spec in zip(placeholders, sig.input_specs):
        kind = kinds.get(str(spec.kind))
        if kind is None:
            raise Unsupported(f"the exported graph takes a {spec.kind} input")
        if kind == "input":
            if type(spec.arg).__name__ == "ConstantArgument":
                refs[node] = _const(spec.arg.value)
                user_leaves.append(("const", spec.arg.value))
            else:
                user_leaves.append(("tensor", node))
            continue
        t = ep.state_dict.get(spec.target)
        if t is None:
            t = ep.constants.get(spec.target)
        if not isinstance(t, torch.Tensor) or type(t) not in (torch.Tensor, nn.Parameter):
            raise Unsupported(f"the exported graph holds a {type(t).__name__} at {spec.target!r}")
        refs[node] = {"tensor": len(tensors)}
        tensors.append((kind, t.detach()))

    # Inputs: the positional example inputs, each a tensor or None, then the keyword inputs (tensors, by
    # name); other keyword arguments (use_cache=False) are baked in.  The user-input placeholders come in
    # the order torch flattened (args, kwargs): positional first, then the keywords in the spec's order.
    inputs: list[dict[str, Any]] = []
    symbols: dict[Any, str] = {}
    sym_info: dict[str, dict[str, int]] = {}
    in_spec = ep.call_spec.in_spec
    args_spec, kwargs_spec = _treespec_children(in_spec)
    leaves = iter(user_leaves)
    wanted: list[tuple[str | None, Any, Any]] = []  # (keyword or None, example value, leaf)
    for x, child in zip(example_inputs, _treespec_children(args_spec)):
        wanted.append((None, x, next(leaves) if _is_leaf(child) else None))
    for key, child in zip(list(kwargs_spec.context), _treespec_children(kwargs_spec)):
        leaf = next(leaves) if _is_leaf(child) else None
        if key in keyword_inputs:
            wanted.append((key, kwargs[key], leaf))
        elif leaf is not None and leaf[0] == "tensor":
            raise Unsupported(f"keyword argument {key!r} is a tensor but not an example input")
    for key, x, leaf in wanted:
        if key is not None and not _IDENT.match(key):
            raise Unsupported(f"keyword input {key[:40]!r} is not an identifier")
        if x is None:
            if key is None:
                inputs.append({"kind": "none"})
            continue
        if not isinstance(x, torch.Tensor) or leaf is None or leaf[0] != "tensor":
            raise Unsupported(f"an example input is a {type(x).__name__}; a program takes tensors or None")
        node = leaf[1]
        j = sum(1 for i in inputs if i["kind"] == "tensor")
        refs[node] = {"input": j}
        val = node.meta.get("val")
        shape: list[Any] = []
        for d, concrete in zip(val.shape if val is not None else x.shape, x.shape):
            if isinstance(d, int):
                shape.append(int(d))
                continue
            expr = d.node.expr
            if not getattr(expr, "is_Symbol", False):
                raise Unsupported(f"an input dimension is the expression {expr}; only symbols are stored")
            if expr not in symbols:
                name = f"s{len(symbols)}"
                symbols[expr] = name
                rng = ep.range_constraints.get(expr)
                lo = int(rng.lower) if rng is not None and _finite(rng.lower) else 0
                hi = int(rng.upper) if rng is not None and _finite(rng.upper) else MAX_DIM
                sym_info[name] = {"min": lo, "max": min(hi, MAX_DIM), "example": int(concrete)}
            shape.append(symbols[expr])
        spec = {"kind": "tensor", "dtype": _rev(_DTYPES, x.dtype, "dtype"), "shape": shape}
        if key is not None:
            spec["name"] = key
        inputs.append(spec)
    if len(symbols) > MAX_SYMBOLS:
        raise Unsupported(f"{len(symbols)} symbolic dimensions; at most {MAX_SYMBOLS} are stored")

    nodes: list[dict[str, Any]] = []
    output_node = None
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            output_node = node
            continue
        if node.op != "call_function":
            raise Unsupported(f"the exported graph has a {node.op} node ({node.target})")
        name = _name_of_target(node.target)
        if name is None:
            raise Unsupported(f"the exported graph calls {node.target}, which is not in sparsify's table of "
                              "allowed ops (sparsify/program.py)")
        refs[node] = {"node": len(nodes)}
        nodes.append({"target": name, "args": [a if _equation(name, k, a) else _enc(a, refs)
                                               for k, a in enumerate(node.args)],
                      "kwargs": {k: _enc(v, refs) for k, v in node.kwargs.items()}})
    flat_out = list(output_node.args[0]) if output_node is not None else []
    tree = _enc_tree(ep.call_spec.out_spec, iter(flat_out), refs)
    doc = {
        "format": PROGRAM_FORMAT, "version": PROGRAM_VERSION,
        "tensors": [{"kind": k, "key": None, "dtype": _rev(_DTYPES, t.dtype, "dtype"), "shape": list(t.shape)}
                    for k, t in tensors],
        "inputs": inputs, "symbols": sym_info, "nodes": nodes, "outputs": tree,
        "baked_kwargs": sorted(set(kwargs) - keyword_inputs),
    }
    return doc, tensors


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError, OverflowError):
        return False


def _const(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": str(v)}
    raise Unsupported(f"a constant input of type {type(v).__name__}")


def _enc(v: Any, refs: dict) -> Any:
    if isinstance(v, fx.Node):
        if v not in refs:
            raise Unsupported(f"node {v.name} is used before it is defined")
        return refs[v]
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, int):
        if abs(v) > MAX_INT:
            raise Unsupported(f"integer {v} is out of int64 range")
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": str(v)}
    if isinstance(v, str):
        if not _IDENT.match(v):
            raise Unsupported(f"string argument {v[:40]!r} is not a short identifier")
        return v
    if isinstance(v, (list, tuple)):
        return [_enc(x, refs) for x in v]
    if isinstance(v, torch.dtype):
        return {"dtype": _rev(_DTYPES, v, "dtype")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.layout):
        return {"layout": _rev(_LAYOUTS, v, "layout")}
    if isinstance(v, torch.memory_format):
        return {"memory_format": _rev(_MEMORY_FORMATS, v, "memory format")}
    raise Unsupported(f"an argument of type {type(v).__name__}")


def _enc_tree(spec: Any, flat: Any, refs: dict) -> Any:
    if _is_leaf(spec):
        v = next(flat)
        if v is None:
            return None
        if not isinstance(v, fx.Node):
            raise Unsupported(f"the program returns a constant {type(v).__name__}")
        return refs[v]
    t = spec.type
    children = _treespec_children(spec)
    if t is type(None):
        return None
    if t is tuple or (isinstance(t, type) and issubclass(t, tuple)):
        return {"tuple": [_enc_tree(c, flat, refs) for c in children]}
    if t is list:
        return {"list": [_enc_tree(c, flat, refs) for c in children]}
    if isinstance(t, type) and issubclass(t, dict):  # dict, OrderedDict, transformers' ModelOutput
        keys = list(spec.context)
        if not all(isinstance(k, str) for k in keys):
            raise Unsupported("the program returns a dict with non-string keys")
        return {"dict": [[k, _enc_tree(c, flat, refs)] for k, c in zip(keys, children)]}
    raise Unsupported(f"the program returns a {getattr(t, '__name__', t)}")


# ---------------------------------------------------------------------- load
def _reject(msg: str) -> ProgramRejected:
    return ProgramRejected(f"program.json: {msg}")


def _int(v: Any, what: str, lo: int = -MAX_INT, hi: int = MAX_INT) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _reject(f"{what}: expected an integer in [{lo}, {hi}], got {_show(v)}")
    return v


def _show(v: Any) -> str:
    s = repr(v) if isinstance(v, (int, float, str, bool)) or v is None else type(v).__name__
    return s if len(s) <= 60 else s[:57] + "..."


def _dict(v: Any, what: str, keys: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _reject(f"{what}: expected an object, got {_show(v)}")
    extra = set(v) - keys
    if extra:
        raise _reject(f"{what}: unknown key {sorted(extra)[0]!r}")
    missing = required - set(v)
    if missing:
        raise _reject(f"{what}: missing key {sorted(missing)[0]!r}")
    return v


def _list(v: Any, what: str, limit: int) -> list[Any]:
    if not isinstance(v, list):
        raise _reject(f"{what}: expected a list, got {_show(v)}")
    if len(v) > limit:
        raise _reject(f"{what}: {len(v)} entries, more than the limit {limit}")
    return v


class _Decoder:
    """Turns JSON argument values into Python values and fx nodes, counting everything."""

    def __init__(self, n_tensors: int, n_inputs: int, constants_in: dict[int, Any]) -> None:
        self.n_tensors, self.n_inputs = n_tensors, n_inputs
        self.values = 0
        self.graph: fx.Graph | None = None
        self.nodes: list[fx.Node] = []
        self.inputs: list[fx.Node] = []
        self.attrs: dict[int, fx.Node] = {}

    def value(self, v: Any, where: str, depth: int = 0) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            raise _reject(f"more than {MAX_VALUES} argument values")
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, int):
            return _int(v, where)
        if isinstance(v, float):
            if not math.isfinite(v):
                raise _reject(f"{where}: a non-finite float outside the {{'float': ...}} form")
            return v
        if isinstance(v, str):
            if not _IDENT.match(v):
                raise _reject(f"{where}: string {_show(v)} is not a short identifier")
            return v
        if isinstance(v, list):
            if depth >= MAX_ARG_DEPTH:
                raise _reject(f"{where}: lists nested deeper than {MAX_ARG_DEPTH}")
            _list(v, where, MAX_LIST)
            return [self.value(x, where, depth + 1) for x in v]
        if isinstance(v, dict) and len(v) == 1:
            (k, x), = v.items()
            if k == "node":
                i = _int(x, f"{where}.node", 0, len(self.nodes) - 1) if self.nodes else None
                if i is None:
                    raise _reject(f"{where}: refers to a node before any node exists")
                return self.nodes[i]
            if k == "input":
                return self.inputs[_int(x, f"{where}.input", 0, self.n_inputs - 1)] if self.n_inputs else \
                    _fail(f"{where}: refers to an input, the program has none")
            if k == "tensor":
                i = _int(x, f"{where}.tensor", 0, self.n_tensors - 1) if self.n_tensors else \
                    _fail(f"{where}: refers to a tensor, the program has none")
                if i not in self.attrs:
                    self.attrs[i] = self.graph.get_attr(f"t{i}")
                return self.attrs[i]
            if k == "float":
                if x not in ("inf", "-inf", "nan"):
                    raise _reject(f"{where}: float {_show(x)} is not inf, -inf or nan")
                return float(x)
            table = {"dtype": _DTYPES, "layout": _LAYOUTS, "memory_format": _MEMORY_FORMATS}.get(k)
            if table is not None:
                if not isinstance(x, str) or x not in table:
                    raise _reject(f"{where}: unknown {k} {_show(x)}")
                return table[x]
            if k == "device":
                if not isinstance(x, str) or not _DEVICE.match(x):
                    raise _reject(f"{where}: unknown device {_show(x)}")
                return torch.device(x)
        raise _reject(f"{where}: unknown value {_show(v)}")


def _fail(msg: str) -> Any:
    raise _reject(msg)


def _check_call(name: str, fn: Any, args: list, kwargs: dict, where: str) -> None:
    if name in _PYTHON:
        if kwargs or len(args) != _PYTHON[name][1]:
            raise _reject(f"{where}: {name} takes {_PYTHON[name][1]} positional arguments")
        if name == "operator.getitem" and (not isinstance(args[0], fx.Node) or isinstance(args[1], bool)
                                           or not isinstance(args[1], int)):
            raise _reject(f"{where}: getitem takes a node and an integer index")
        return
    schema = fn._schema
    params = [a.name for a in schema.arguments]
    positional = [a.name for a in schema.arguments if not a.kwarg_only]
    if len(args) > len(positional):
        raise _reject(f"{where}: {name} takes at most {len(positional)} positional arguments, got {len(args)}")
    for k in kwargs:
        if k not in params or k in positional[: len(args)]:
            raise _reject(f"{where}: {name} has no keyword argument {_show(k)}")


def _parse_inputs(doc: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    syms_doc = doc["symbols"]
    if not isinstance(syms_doc, dict) or len(syms_doc) > MAX_SYMBOLS:
        raise _reject(f"symbols: expected an object of at most {MAX_SYMBOLS} symbols")
    symbols: dict[str, dict[str, int]] = {}
    for s, r in syms_doc.items():
        if not _SYMBOL.match(s):
            raise _reject(f"symbols: {_show(s)} is not a symbol name s0..s99")
        r = _dict(r, f"symbols.{s}", {"min", "max", "example"}, {"min", "max", "example"})
        lo = _int(r["min"], f"symbols.{s}.min", 0, MAX_DIM)
        hi = _int(r["max"], f"symbols.{s}.max", lo, MAX_DIM)
        ex = _int(r["example"], f"symbols.{s}.example", lo, hi)
        symbols[s] = {"min": lo, "max": hi, "example": ex}
    inputs = []
    for i, spec in enumerate(_list(doc["inputs"], "inputs", MAX_INPUTS)):
        where = f"inputs[{i}]"
        if not isinstance(spec, dict) or spec.get("kind") not in ("tensor", "none"):
            raise _reject(f"{where}: expected {{'kind': 'tensor' | 'none', ...}}")
        if spec["kind"] == "none":
            _dict(spec, where, {"kind"}, {"kind"})
            inputs.append({"kind": "none"})
            continue
        _dict(spec, where, {"kind", "dtype", "shape", "name"}, {"kind", "dtype", "shape"})
        if "name" in spec and (not isinstance(spec["name"], str) or not _IDENT.match(spec["name"])
                               or not spec["name"] or spec["name"][0].isdigit()):
            raise _reject(f"{where}.name: {_show(spec['name'])} is not an identifier")
        if not isinstance(spec["dtype"], str) or spec["dtype"] not in _DTYPES:
            raise _reject(f"{where}.dtype: unknown dtype {_show(spec['dtype'])}")
        shape = []
        for k, d in enumerate(_list(spec["shape"], f"{where}.shape", MAX_RANK)):
            if isinstance(d, str):
                if d not in symbols:
                    raise _reject(f"{where}.shape[{k}]: undeclared symbol {_show(d)}")
                shape.append(d)
            else:
                shape.append(_int(d, f"{where}.shape[{k}]", 0, MAX_DIM))
        example = [symbols[d]["example"] if isinstance(d, str) else d for d in shape]
        if math.prod(example) > MAX_NUMEL:
            raise _reject(f"{where}: example shape {example} has more than {MAX_NUMEL} elements")
        inputs.append({"kind": "tensor", "dtype": spec["dtype"], "shape": shape, "name": spec.get("name")})
    names = [i["name"] for i in inputs if i.get("name")]
    if len(names) != len(set(names)):
        raise _reject("inputs: a keyword input is named twice")
    if any(i.get("name") is None for i in inputs[len([i for i in inputs if not i.get("name")]):]):
        raise _reject("inputs: positional inputs must come before keyword inputs")
    return inputs, symbols


def build_program(doc: Any, tensors: list[torch.Tensor]) -> LoadedProgram:
    """Check ``doc`` (a parsed program.json) against the format and its limits; return the runnable module.

    ``tensors[i]`` is the tensor the program's ``tensors[i]`` entry names.
    Raises :class:`ProgramRejected` naming the first thing outside the format.
    """
    doc = _dict(doc, "program", {"format", "version", "tensors", "inputs", "symbols", "nodes", "outputs",
                                 "baked_kwargs"},
                {"format", "version", "tensors", "inputs", "symbols", "nodes", "outputs"})
    if doc["format"] != PROGRAM_FORMAT:
        raise _reject(f"format is {_show(doc['format'])}, expected {PROGRAM_FORMAT!r}")
    version = _int(doc["version"], "version", 1)
    if version > PROGRAM_VERSION:
        raise _reject(f"program format version {version}; this sparsify reads up to {PROGRAM_VERSION}. "
                      "Upgrade sparsify.")
    entries = _list(doc["tensors"], "tensors", MAX_TENSORS)
    if len(entries) != len(tensors):
        raise _reject(f"{len(entries)} tensors listed, {len(tensors)} given")
    nodes_doc = _list(doc["nodes"], "nodes", MAX_NODES)
    inputs, symbols = _parse_inputs(doc)
    if "baked_kwargs" in doc:
        for k in _list(doc["baked_kwargs"], "baked_kwargs", MAX_ARGS):
            if not isinstance(k, str) or not _IDENT.match(k):
                raise _reject(f"baked_kwargs: {_show(k)} is not an identifier")

    root = nn.Module()
    for i, (entry, t) in enumerate(zip(entries, tensors)):
        entry = _dict(entry, f"tensors[{i}]", {"kind", "key", "dtype", "shape"}, {"kind", "key"})
        if entry["kind"] == "parameter":
            root.register_parameter(f"t{i}", nn.Parameter(t, requires_grad=False))
        elif entry["kind"] == "buffer":
            root.register_buffer(f"t{i}", t)
        else:
            raise _reject(f"tensors[{i}].kind: expected 'parameter' or 'buffer', got {_show(entry['kind'])}")

    graph = fx.Graph()
    n_tensor_inputs = sum(1 for s in inputs if s["kind"] == "tensor")
    dec = _Decoder(len(tensors), n_tensor_inputs, {})
    dec.graph = graph
    dec.inputs = [graph.placeholder(f"x{j}") for j in range(n_tensor_inputs)]
    table = targets()
    for i, nd in enumerate(nodes_doc):
        where = f"nodes[{i}]"
        nd = _dict(nd, where, {"target", "args", "kwargs"}, {"target", "args", "kwargs"})
        name = nd["target"]
        fn = table.get(name) if isinstance(name, str) else None
        if fn is None:
            raise _reject(f"{where}: target {_show(name)} is not in sparsify's table of allowed ops")
        args_doc = _list(nd["args"], f"{where}.args", MAX_ARGS)
        if not isinstance(nd["kwargs"], dict) or len(nd["kwargs"]) + len(args_doc) > MAX_ARGS:
            raise _reject(f"{where}.kwargs: expected an object, at most {MAX_ARGS} arguments in all")
        args = [a if _equation(name, k, a) else dec.value(a, f"{where}.args[{k}]") for k, a in enumerate(args_doc)]
        kwargs = {}
        for k, v in nd["kwargs"].items():
            if not _IDENT.match(k):
                raise _reject(f"{where}.kwargs: key {_show(k)} is not an identifier")
            kwargs[k] = dec.value(v, f"{where}.kwargs.{k}")
        _check_call(name, fn, args, kwargs, where)
        dec.nodes.append(graph.create_node("call_function", fn, tuple(args), kwargs, name=f"n{i}"))
    leaves: list[Any] = []
    tree = _dec_tree(doc["outputs"], dec, leaves, "outputs", 0)
    graph.output(tuple(leaves))
    gm = fx.GraphModule(root, graph, class_name="StoredProgram")
    prog = LoadedProgram(gm, inputs, symbols, tree, len(leaves))
    _check_block_sparse_calls(gm)
    prog.check_on_meta()
    return prog


def _dec_tree(v: Any, dec: _Decoder, leaves: list, where: str, depth: int) -> Any:
    if depth > MAX_TREE_DEPTH:
        raise _reject(f"{where}: output structure nested deeper than {MAX_TREE_DEPTH}")
    if v is None:
        return None
    if not isinstance(v, dict) or len(v) != 1:
        raise _reject(f"{where}: expected a tuple, list, dict, null or a value reference")
    (k, x), = v.items()
    if k in ("tuple", "list"):
        return (k, [_dec_tree(c, dec, leaves, f"{where}.{k}[{i}]", depth + 1)
                    for i, c in enumerate(_list(x, f"{where}.{k}", MAX_OUTPUT_LEAVES))])
    if k == "dict":
        items = []
        for i, pair in enumerate(_list(x, f"{where}.dict", MAX_OUTPUT_LEAVES)):
            if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], str) or len(pair[0]) > 256:
                raise _reject(f"{where}.dict[{i}]: expected [key, value] with a string key")
            items.append((pair[0], _dec_tree(pair[1], dec, leaves, f"{where}.dict[{i}]", depth + 1)))
        return ("dict", items)
    if k in ("node", "input", "tensor"):
        if len(leaves) >= MAX_OUTPUT_LEAVES:
            raise _reject(f"{where}: more than {MAX_OUTPUT_LEAVES} outputs")
        leaves.append(dec.value(v, where))
        return ("leaf", len(leaves) - 1)
    raise _reject(f"{where}: unknown output kind {_show(k)}")


#: The block-sparse ops: how to read (out, in) of the layout and the rank of ``values`` from a call.
#: An op that takes a layout must have an entry here, or its calls are refused.
_BLOCK_SPARSE_OPS: dict[str, tuple[str, str | None, int]] = {
    # name: (argument holding the rows, argument holding the columns or None (from the pattern), values dims)
    "sparsify.bsmm.default": ("out_features", "in_features", 3),
    "sparsify.bsconv2d.default": ("out_channels", None, 5),
}


def _check_block_sparse_calls(gm: fx.GraphModule) -> None:
    """Every block-sparse call's pattern is a valid layout of stored tensors (the check every load path makes)."""
    from .runtime import BlockSparseLayout
    from .runtime.ops import META_NAMES

    table = targets()
    ops = {table[n]: (n, *spec) for n, spec in _BLOCK_SPARSE_OPS.items() if n in table}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in ops:
            continue
        op_name, rows_arg, cols_arg, values_dims = ops[node.target]
        names = [a.name for a in node.target._schema.arguments]
        bound = dict(zip(names, node.args))
        bound.update(node.kwargs)

        def attr(name: str, bound=bound, node=node) -> torch.Tensor:
            a = bound.get(name)
            if not isinstance(a, fx.Node) or a.op != "get_attr":
                raise _reject(f"block-sparse call {node.name}: {name} must be a stored tensor")
            return getattr(gm, a.target)

        v = bound.get("values")
        if (isinstance(v, fx.Node) and v.op == "call_function" and v.target is table.get("aten.unsqueeze.default")
                and isinstance(v.args[0], fx.Node) and v.args[0].op == "get_attr" and isinstance(v.args[1], int)
                and not isinstance(v.args[1], bool) and -4 <= v.args[1] <= 3):
            values = getattr(gm, v.args[0].target).unsqueeze(v.args[1])  # a Conv1d's taps as a 1 x k kernel
        else:
            values = attr("values")
        if (values.dim() != values_dims or values.shape[1] != values.shape[2] or values.shape[1] < 1):
            raise _reject(f"block-sparse call {node.name}: values must be [nnz, b, b{', ...' if values_dims > 3 else ''}]"
                          f" ({values_dims}-D), got {list(values.shape)}")
        b = values.shape[1]
        meta = {n: attr(n) for n in META_NAMES}
        for n, t in meta.items():
            if t.dtype != torch.int32 or t.dim() != 1:
                raise _reject(f"block-sparse call {node.name}: {n} must be 1-D int32")
        out_f = bound.get(rows_arg)
        # A conv's input channels are the input's; the pattern's column blocks say how many blocks of them.
        in_f = bound.get(cols_arg) if cols_arg else (meta["t_row_offsets"].numel() - 1) * b
        if not (isinstance(out_f, int) and isinstance(in_f, int) and 0 < out_f <= MAX_DIM and 0 < in_f <= MAX_DIM):
            raise _reject(f"block-sparse call {node.name}: invalid layout shape ({out_f}, {in_f})")
        try:
            layout = BlockSparseLayout((out_f, in_f), b, meta["row_offsets"], meta["col_indices"])
        except ValueError as exc:
            raise _reject(f"block-sparse call {node.name}: invalid block pattern: {exc}") from None
        if layout.nnz != values.shape[0]:
            raise _reject(f"block-sparse call {node.name}: {values.shape[0]} value blocks for {layout.nnz} "
                          "blocks in the pattern")
        for n, t in layout.metadata().items():
            if n in meta and not torch.equal(meta[n].cpu(), t):
                raise _reject(f"block-sparse call {node.name}: {n} is not the one its pattern derives")
        bias = bound.get("bias")
        if isinstance(bias, fx.Node) and bias.op == "get_attr" and tuple(getattr(gm, bias.target).shape) != (out_f,):
            raise _reject(f"block-sparse call {node.name}: bias must have {out_f} elements")


class _MetaCheck(fx.Interpreter):
    """Runs the graph on meta tensors: shapes and sizes without allocating, with limits per node."""

    def __init__(self, gm: fx.GraphModule, deadline: float) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.deadline = deadline
        self._meta: dict[str, torch.Tensor] = {}

    def fetch_attr(self, target: str) -> Any:
        t = super().fetch_attr(target)
        if target not in self._meta:
            self._meta[target] = torch.empty_like(t, device="meta")
        return self._meta[target]

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        # Factory ops must not allocate: every device named in the program becomes meta, and
        # ops that name none default to meta too.
        args, kwargs = _on_meta(args), {k: _on_meta(v) for k, v in kwargs.items()}
        schema = getattr(target, "_schema", None)
        if schema is not None:
            names = [a.name for a in schema.arguments]
            if "device" in names and names.index("device") >= len(args):
                kwargs["device"] = torch.device("meta")
        with torch.device("meta"):
            return super().call_function(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        if time.monotonic() > self.deadline:
            raise _reject(f"checking the program took more than {CHECK_SECONDS:.0f} s")
        try:
            out = super().run_node(n)
        except ProgramRejected:
            raise
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise _reject(f"node {n.name} ({n.target}) fails on the declared input shapes: "
                          f"{type(exc).__name__}: {msg}") from None
        _check_result(out, n.name)
        return out


def _on_meta(v: Any) -> Any:
    if isinstance(v, torch.device):
        return torch.device("meta")
    if isinstance(v, (list, tuple)):
        return type(v)(_on_meta(x) for x in v)
    return v


def _check_result(out: Any, where: str, depth: int = 0) -> None:
    if isinstance(out, torch.Tensor):
        if out.numel() > MAX_NUMEL:
            raise _reject(f"node {where} would build a tensor of {out.numel()} elements "
                          f"(shape {list(out.shape)}); the limit is {MAX_NUMEL}")
    elif isinstance(out, bool):
        return
    elif isinstance(out, int):
        if abs(out) > MAX_INT:
            raise _reject(f"node {where} computes an integer beyond int64")
    elif isinstance(out, (list, tuple)) and depth < 2:
        for o in out:
            _check_result(o, where, depth + 1)


class LoadedProgram(nn.Module):
    """A stored program, rebuilt: an inference module that takes the saved model's positional inputs.

    ``forward(*inputs)`` checks each input's dtype and shape against the stored
    ones (a symbolic dimension within its stored range), runs the graph, and
    returns the stored output structure (tuples, lists, dicts; a transformers
    ``ModelOutput`` comes back as a plain dict).  Keyword arguments given at save
    time (``use_cache=False``) are part of the graph.  It is inference-only:
    ``train(True)`` raises; load with ``factory=`` for a trainable model.
    """

    def __init__(self, gm: fx.GraphModule, inputs: list[dict], symbols: dict[str, dict[str, int]],
                 tree: Any, n_leaves: int) -> None:
        super().__init__()
        self.program = gm
        self.input_specs = inputs
        self.symbols = symbols
        self._tree = tree
        self._n_leaves = n_leaves
        super().train(False)

    def train(self, mode: bool = True) -> LoadedProgram:
        if mode:
            raise ValueError("a program loaded without its factory runs inference only; "
                             "load(path, factory=...) gives the trainable model")
        return super().train(False)

    def check_on_meta(self) -> None:
        """Run the graph once on meta tensors at the example shape (see the module docstring)."""
        args = []
        for s in self.input_specs:
            if s["kind"] == "tensor":
                shape = [self.symbols[d]["example"] if isinstance(d, str) else d for d in s["shape"]]
                args.append(torch.empty(shape, dtype=_DTYPES[s["dtype"]], device="meta"))
        with torch.no_grad():
            _MetaCheck(self.program, time.monotonic() + CHECK_SECONDS).run(*args)

    def _check_inputs(self, inputs: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor]:
        positional = [s for s in self.input_specs if not s.get("name")]
        keyword = {s["name"]: s for s in self.input_specs if s.get("name")}
        if len(inputs) != len(positional):
            raise ValueError(f"this program takes {len(positional)} positional inputs, got {len(inputs)}")
        unknown = sorted(set(kwargs) - set(keyword))
        if unknown:
            raise ValueError(f"this program takes no keyword input {unknown[0]!r} (it takes: "
                             f"{', '.join(keyword) or 'none'})")
        missing = sorted(set(keyword) - set(kwargs))
        if missing:
            raise ValueError(f"this program needs the keyword input {missing[0]!r}")
        values = list(inputs) + [kwargs[k] for k in keyword]
        specs = positional + list(keyword.values())
        seen: dict[str, int] = {}
        out = []
        for i, (x, s) in enumerate(zip(values, specs)):
            if s["kind"] == "none":
                if x is not None:
                    raise ValueError(f"input {i} must be None (it was None when the program was saved)")
                continue
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"input {i}: expected a tensor, got {type(x).__name__}")
            if str(x.dtype).removeprefix("torch.") != s["dtype"] or x.dim() != len(s["shape"]):
                raise ValueError(f"input {i}: expected a {len(s['shape'])}-D {s['dtype']} tensor, "
                                 f"got {x.dim()}-D {str(x.dtype).removeprefix('torch.')}")
            for k, (d, want) in enumerate(zip(x.shape, s["shape"])):
                if isinstance(want, int):
                    if d != want:
                        raise ValueError(f"input {i}: dimension {k} must be {want}, got {d}")
                    continue
                r = self.symbols[want]
                if not r["min"] <= d <= r["max"] or seen.setdefault(want, d) != d:
                    raise ValueError(f"input {i}: dimension {k} ({want}) must be in [{r['min']}, {r['max']}] "
                                     "and equal wherever it appears")
            out.append(x)
        return out

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        flat = self.program(*self._check_inputs(inputs, kwargs))
        return _build_tree(self._tree, flat)

    def extra_repr(self) -> str:
        n = sum(1 for nd in self.program.graph.nodes if nd.op == "call_function")
        return f"inputs={len(self.input_specs)}, nodes={n}"


def _build_tree(t: Any, flat: tuple) -> Any:
    if t is None:
        return None
    kind, x = t
    if kind == "leaf":
        return flat[x]
    if kind == "tuple":
        return tuple(_build_tree(c, flat) for c in x)
    if kind == "list":
        return [_build_tree(c, flat) for c in x]
    return {k: _build_tree(c, flat) for k, c in x}


def forward_kwargs_for_export(module: nn.Module) -> dict[str, Any]:
    """Keyword arguments that make a model exportable: ``use_cache=False`` where forward takes it."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}
