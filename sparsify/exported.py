"""A pickle-free, code-free way to store a ``torch.export`` program beside the weights.

``torch.export.save`` / ``torch.export.load`` (torch 2.13) are not safe for a
file someone else wrote: ``load`` unpickles the example inputs (a
``weights_only=True`` attempt that falls back to ``weights_only=False``),
unpickles tensor-subclass weights and opaque constants with full pickle,
``sympify``s shape expressions (which ``eval``s them), ``exec``s the program's
``guards_code`` when ``.module()`` is called, and resolves any ``torch.*``
attribute named in the file as a call target.

So sparsify stores only the serialized graph (``program.json``: torch's own
JSON schema, via ``torch._export.serde``) and keeps every tensor in the
artifact's safetensors file.  Before torch's deserializer sees the JSON,
:func:`check_program` rejects anything outside a small allowlist: call targets
must be ``torch.ops.{aten,prims,sparsify}.*`` overloads or a few
``_operator`` / ``torch.sym_*`` functions, names must be identifiers, shape
expressions must parse as plain arithmetic over symbols, ``guards_code`` must
be empty, and no custom objects or subgraphs may appear.  Example inputs are
never stored.  This uses private torch API; if it changes, loading fails with
a clear error and the factory path still works.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

import torch
from torch import nn

from .errors import InputError

__all__ = ["export_program", "program_from_json", "check_program", "TARGET_NAMESPACES"]

#: Operator namespaces a stored program may call.
TARGET_NAMESPACES = ("aten", "prims", "sparsify")
_OP_RE = re.compile(r"^torch\.ops\.(" + "|".join(TARGET_NAMESPACES) + r")\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+$")
_DENIED_OPS = {"from_file", "_nested_view_from_buffer"}
_OPERATOR_FUNCS = {
    "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow",
    "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "abs",
}
_SYM_FUNCS = {"sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.]*$")
_NAME_KEYS = {"name", "parameter_name", "buffer_name", "tensor_constant_name", "fqn", "forward_arg_names"}
_FORBIDDEN_KEYS = {"as_custom_obj", "as_custom_objs", "as_graph", "as_operator", "as_complex"}
_SYMPY_CALLS = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
    "FloorDiv", "ModularIndexing", "CleanDiv", "CeilDiv", "PythonMod", "Eq", "Ne", "Lt", "Le", "Gt", "Ge",
    "And", "Or", "Not", "floor", "ceiling", "sqrt", "IntTrueDiv", "FloatTrueDiv", "PowByNatural",
    "FloatPow", "ToFloat", "TruncToInt", "TruncToFloat", "FloorToInt", "CeilToInt", "Identity",
}
_SYMBOL_NAME_RE = re.compile(r"^[a-z]{1,8}\d+$")


class ProgramRejected(InputError):
    """The stored program contains something sparsify does not load from a file."""


def _check_expr(expr: str) -> None:
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise ProgramRejected(f"shape expression {expr[:80]!r} does not parse") from None
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.operator,
                             ast.unaryop, ast.cmpop, ast.boolop, ast.Load, ast.keyword)):
            continue
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS):
                raise ProgramRejected(f"shape expression {expr[:80]!r} calls something other than sympy arithmetic")
            continue
        if isinstance(node, ast.Name):
            if node.id not in _SYMPY_CALLS and not _SYMBOL_NAME_RE.match(node.id) and node.id not in ("True", "False", "oo"):
                raise ProgramRejected(f"shape expression {expr[:80]!r} names {node.id!r}")
            continue
        if isinstance(node, ast.Constant):
            if isinstance(node.value, str) and not _SYMBOL_NAME_RE.match(node.value):
                raise ProgramRejected(f"shape expression {expr[:80]!r} holds the string {node.value!r}")
            if not isinstance(node.value, (int, float, bool, str)):
                raise ProgramRejected(f"shape expression {expr[:80]!r} holds a {type(node.value).__name__}")
            continue
        raise ProgramRejected(f"shape expression {expr[:80]!r} uses {type(node).__name__}")


def _check_target(target: str) -> None:
    if _OP_RE.match(target):
        if target.split(".")[3] in _DENIED_OPS:
            raise ProgramRejected(f"the program calls {target}, which sparsify does not load from a file")
        return
    mod, _, fn = target.rpartition(".")
    if (mod == "_operator" and fn in _OPERATOR_FUNCS) or (mod == "torch" and fn in _SYM_FUNCS):
        return
    raise ProgramRejected(
        f"the program calls {target!r}; a stored program may only call torch.ops."
        f"{{{','.join(TARGET_NAMESPACES)}}}.* operators"
    )


def check_program(doc: dict[str, Any]) -> None:
    """Raise :class:`ProgramRejected` unless ``doc`` (a parsed program.json) is in the allowlist."""
    if doc.get("guards_code"):
        raise ProgramRejected("the program carries guards_code (Python source torch would exec)")

    def walk(o: Any, key: str | None) -> None:
        if isinstance(o, dict):
            for k, v in o.items():
                if k in _FORBIDDEN_KEYS and v not in (None, [], {}):
                    raise ProgramRejected(f"the program holds {k!r} entries (custom objects / subgraphs)")
                if k == "metadata":
                    continue  # dropped before deserializing
                walk(v, k)
        elif isinstance(o, list):
            for v in o:
                walk(v, key)
        elif isinstance(o, str):
            if key == "target":
                _check_target(o)
            elif key in _NAME_KEYS and not _NAME_RE.match(o):
                raise ProgramRejected(f"the program holds the name {o[:60]!r}")
            elif key == "expr_str":
                _check_expr(o)

    walk(doc, None)
    for node in doc["graph_module"]["graph"]["nodes"]:
        if node.get("is_hop_single_tensor_return"):
            raise ProgramRejected("the program uses higher-order operators")


def _strip_metadata(doc: dict[str, Any]) -> None:
    """Node metadata (stack traces, source module types) is not needed to run; drop it."""
    for node in doc["graph_module"]["graph"]["nodes"]:
        node["metadata"] = {}
    doc["guards_code"] = []


def export_program(
    module: nn.Module, example_inputs: tuple
) -> tuple[bytes, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Export ``module`` (eval mode, batch dimension dynamic where possible).

    Returns ``(program JSON, state_dict tensors, constant tensors)``; raises on any
    failure (the caller records why there is no exported program).
    """
    from torch._export.serde.serialize import ExportedProgramSerializer, _to_json_bytes

    was_training = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            try:
                dyn = tuple({0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() else None
                            for x in example_inputs)
                ep = torch.export.export(module, tuple(example_inputs), dynamic_shapes=dyn)
            except Exception:
                ep = torch.export.export(module, tuple(example_inputs))
    finally:
        for m, t in was_training.items():
            m.training = t
    constants = {}
    for k, v in ep.constants.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"the exported program holds a non-tensor constant {k!r} ({type(v).__name__})")
        constants[k] = v
    for k, v in ep.state_dict.items():
        if type(v) not in (torch.Tensor, nn.Parameter):
            raise ValueError(f"the exported program holds a tensor subclass {type(v).__name__} at {k!r}")
    sp = ExportedProgramSerializer().serialize(
        ep, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False
    )
    doc = json.loads(_to_json_bytes(sp.exported_program))
    _strip_metadata(doc)
    check_program(doc)  # what we write must be what we would load
    return json.dumps(doc, sort_keys=True).encode(), dict(ep.state_dict), constants


def program_from_json(
    data: bytes, state_dict: dict[str, torch.Tensor], constants: dict[str, torch.Tensor]
) -> nn.Module:
    """The runnable module of a stored program (checked first; see the module docstring)."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"program.json is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or "graph_module" not in doc:
        raise InputError("program.json is not a serialized exported program")
    check_program(doc)
    _strip_metadata(doc)
    serialized = _dict_to_dataclass(schema.ExportedProgram, doc)
    # Parameters must be Parameters for the unlifted module to register them as such.
    sd = {k: nn.Parameter(v, requires_grad=False) if k in _param_names(doc) else v for k, v in state_dict.items()}
    ep = ExportedProgramDeserializer().deserialize(serialized, sd, dict(constants), None)
    return ep.module()


def _param_names(doc: dict[str, Any]) -> set[str]:
    names = set()
    for spec in doc["graph_module"]["signature"]["input_specs"]:
        p = spec.get("parameter")
        if p:
            names.add(p["parameter_name"])
    return names
