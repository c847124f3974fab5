"""Streaming conversion: a checkpoint bigger than memory, one layer at a time.

The model is built on the ``meta`` device (a skeleton: every module, no data).
Each *unit* of conversion (a layer the plan rewrites, with the BatchNorm that
folds into it, or a whole ``nn.MultiheadAttention``) is materialized from the
safetensors checkpoint with lazy loading (``safe_open``: only that layer's
tensors are read), converted by the ordinary pass pipeline restricted to that
unit, handed to the writer, and turned back into meta tensors.  Every other
tensor (embeddings, norms, layers left dense) is copied from the checkpoint to
the output one at a time.  Peak memory is therefore about the largest layer,
its conversion's working space and the writer's buffer (one output shard), not
the model.

The result equals the in-memory conversion (``sparsify.sparsify`` on the loaded
model) bit for bit: the same planner makes every decision on the whole
skeleton, and each unit runs the same passes on the same tensors; the other
units' decisions are only postponed to their own run.  What needs every layer
at once is refused before any work: a model-wide ``compression=`` target or
``allocate=True`` (they compare all layers' spectra), calibration data (it runs
the model).

Distributed conversion (``sparsify.distributed.convert_distributed``) uses the
same units: each rank converts its share and rank 0 writes them in order.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError

__all__ = ["CheckpointReader", "Unit", "UnitResult", "plan_units", "convert_unit", "StreamPlan"]

INDEX_SUFFIX = ".safetensors.index.json"


# ------------------------------------------------------------------ reading
class CheckpointReader:
    """The tensors of a safetensors checkpoint, read one at a time with ``safe_open``.

    ``path`` is one ``.safetensors`` file or a Hugging Face index
    (``model.safetensors.index.json``, whose ``weight_map`` names each tensor's
    shard).  Only headers are read up front; :meth:`get` reads one tensor (the
    shard is memory-mapped for that call only, so its pages do not stay resident).

    Example:
        >>> import tempfile, os, torch
        >>> from safetensors.torch import save_file
        >>> p = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> save_file({"a": torch.ones(2, 3)}, p)
        >>> r = CheckpointReader(p)
        >>> r.names(), r.nbytes("a"), r.get("a").shape
        (['a'], 24, torch.Size([2, 3]))
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import SafetensorError, safe_open

        from .files import parse_json, read_regular

        self.path = Path(path)
        if not self.path.is_file():
            from .files import not_a_file

            raise InputError(f"--weights {self.path}: {not_a_file(self.path)}.")
        self._file_of: dict[str, Path] = {}
        if self.path.name.endswith(".json"):
            doc = parse_json(read_regular(self.path.parent, self.path.name, max_bytes=64 * 2**20,
                                          what="safetensors index"), f"--weights {self.path}")
            wmap = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in wmap.items()):
                raise InputError(f"--weights {self.path}: expected a safetensors index with a \"weight_map\" "
                                 "object mapping tensor names to shard files (model.safetensors.index.json).")
            for name, shard in wmap.items():
                # A shard is a plain file name in the index's folder: never a path elsewhere.
                if Path(shard).name != shard or shard in ("", ".", ".."):
                    raise InputError(f"--weights {self.path}: shard {shard!r} of {name!r} is not a file name "
                                     "in the index's folder.")
                self._file_of[name] = self.path.parent / shard
            files = sorted(set(self._file_of.values()))
        else:
            files = [self.path]
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for f in files:
            if not f.is_file():
                from .files import not_a_file

                why = not_a_file(f)
                raise InputError(f"--weights {self.path}: shard {f.name} "
                                 f"{'is missing' if why == 'no such file' else why}.")
            try:
                with safe_open(str(f), framework="pt") as h:
                    names = list(h.keys())
                    for n in names:
                        sl = h.get_slice(n)
                        self._meta[n] = (_dtype_of(sl.get_dtype(), f), tuple(sl.get_shape()))
            except (SafetensorError, OSError) as exc:
                raise InputError(f"--weights {f}: not a readable safetensors file ({exc}).") from None
            if len(files) == 1 and not self._file_of:
                self._file_of = {n: f for n in names}
            else:
                for n in names:
                    if self._file_of.get(n) != f:
                        raise InputError(f"--weights {self.path}: shard {f.name} holds {n!r}, which the index "
                                         f"places in {self._file_of[n].name if n in self._file_of else 'no shard'}.")
        missing = [n for n in self._file_of if n not in self._meta]
        if missing:
            raise InputError(f"--weights {self.path}: the index names {missing[0]!r} but its shard "
                             f"{self._file_of[missing[0]].name} does not hold it.")

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][0]

    def nbytes(self, name: str) -> int:
        dtype, shape = self._meta[name]
        return math.prod(shape) * dtype.itemsize

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self._file_of)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._file_of[name]), framework="pt") as h:
            return h.get_tensor(name)


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _dtype_of(code: str, f: Path) -> torch.dtype:
    if code not in _ST_DTYPES:
        raise InputError(f"--weights {f}: tensors of dtype {code} are not supported.")
    return _ST_DTYPES[code]


# ------------------------------------------------------------------ planning
@dataclass
class Unit:
    """One run of the pipeline: the sites it rewrites and the skeleton tensors it needs."""

    index: int
    name: str                                   # the site (or the nn.MultiheadAttention) it converts
    keys: list[tuple[str, str | None]]          # decision keys (name, fx node) rewritten in this run
    tensors: list[str]                          # state-dict names to materialize, in state-dict order
    nbytes: int = 0                             # their bytes in the checkpoint
    method: str = ""


@dataclass
class UnitResult:
    """What converting a unit produced: the tensors now in its place, its decisions, layout records."""

    index: int
    tensors: dict[str, torch.Tensor]
    decisions: list[Any]
    layouts: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)   # within the unit: name -> the stored one


@dataclass
class StreamPlan:
    """The skeleton's capture and plan, and the units to convert."""

    skeleton: nn.Module
    capture: Any
    config: Any
    decisions: list[Any]            # the whole plan, before any unit ran
    units: list[Unit]
    state_keys: list[str]           # the skeleton's state-dict keys before conversion
    aliases: dict[str, str]         # tied tensors: later name -> first name
    example_inputs: Any = None
    example_kwargs: Any = None
    shapes: dict = field(default_factory=dict)      # annotate_shapes' findings on the skeleton
    calls: dict = field(default_factory=dict)


def _refuse_global(decisions: list[Any], config: Any) -> None:
    """What needs every layer at once cannot be streamed: say so before any work."""
    why = None
    if getattr(config, "allocate", False):
        why = "allocate=True spreads a model-wide density over all layers by their sensitivity"
    for d in decisions:
        p = d.params or {}
        if d.rewrites and p.get("compression") is not None and all(
                p.get(k) is None for k in ("rank", "tolerance", "energy")):
            why = (f"layer {d.name!r} takes its rank from a model-wide compression={p['compression']} target, "
                   "which compares every layer's spectrum")
            break
        if d.rewrites and p.get("calibration_data") is not None:
            why = f"layer {d.name!r} is fitted to calibration data, which runs the whole model"
            break
    if why:
        raise InputError(f"streaming conversion converts one layer at a time, so it cannot plan across layers: "
                         f"{why}. Give each layer its own setting (rank=, tolerance=, energy=, density=), or "
                         f"convert in memory (without a sharded --weights index).")


def _bn_partners(cap: Any) -> dict[str, str]:
    """``layer qualname -> BatchNorm qualname`` for every BatchNorm the fx graph shows right after a layer
    (what fold_batchnorm may fold; its own checks then decide)."""
    gm = getattr(cap, "graph", None)
    out: dict[str, str] = {}
    if gm is None:
        return out
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        prev = node.args[0]
        target = gm.get_submodule(node.target)
        if isinstance(target, nn.modules.batchnorm._BatchNorm) and getattr(prev, "op", None) == "call_module":
            out[prev.target] = node.target
    return out


def _module_tensors(root: nn.Module, qualname: str) -> list[str]:
    mod = root.get_submodule(qualname)
    prefix = f"{qualname}." if qualname else ""
    names = [prefix + n for n, _ in mod.named_parameters(remove_duplicate=False)]
    persistent = set(mod.state_dict(keep_vars=True).keys())
    names += [prefix + n for n, _ in mod.named_buffers(remove_duplicate=False) if n in persistent]
    return names


def plan_units(skeleton: nn.Module, config: Any, *, example_inputs: Any = None,
               example_kwargs: Any = None) -> StreamPlan:
    """Capture and plan ``skeleton`` (a model on the meta device) once; group the rewrites into units.

    Example:
        >>> import torch, sparsify
        >>> with torch.device("meta"):
        ...     m = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
        >>> sp = plan_units(m, sparsify.SparsifyConfig(density=0.5))
        >>> [(u.name, u.tensors) for u in sp.units]
        [('0', ['0.weight', '0.bias']), ('2', ['2.weight', '2.bias'])]
    """
    from .passes import PassContext, capture
    from .passes.sites import find_sites
    from .plan import plan_model

    cap = capture(skeleton, example_inputs, example_kwargs=example_kwargs)
    ctx = PassContext(config=config, example_inputs=example_inputs, example_kwargs=example_kwargs,
                      traced=cap.traced, capture_note=cap.note, planner=plan_model, capture=cap)
    plan = plan_model(cap.module, ctx)
    if example_inputs or example_kwargs:
        # Shapes and call counts from one run of the (meta) example inputs through the whole skeleton:
        # in a unit's run the skeleton mixes meta and real tensors, so they are replayed, not re-measured.
        from .passes import annotate_shapes

        ctx.plan = plan
        annotate_shapes(cap.module, ctx)
    decisions = [copy.deepcopy(d) for d in plan.decisions]
    _refuse_global(decisions, config)
    sites = {s.key: s for s in find_sites(cap.module, ctx)}
    state = skeleton.state_dict(keep_vars=True)
    state_keys = list(state.keys())
    order = {k: i for i, k in enumerate(state_keys)}
    first_of: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for k, t in state.items():
        if id(t) in first_of:
            aliases[k] = first_of[id(t)]
        else:
            first_of[id(t)] = k
    partners = _bn_partners(cap) if getattr(config, "fold_batchnorm", True) else {}
    groups: dict[str, Unit] = {}
    for d in decisions:
        if not d.rewrites:
            continue
        site = sites[(d.name, d.node)]
        unit_name = site.mha if site.mha is not None else site.name
        unit = groups.get(unit_name)
        if unit is None:
            if site.mha is not None:
                names = _module_tensors(skeleton, site.mha)
            elif site.module is not None:
                names = _module_tensors(skeleton, site.name)
                if site.name in partners:
                    names += _module_tensors(skeleton, partners[site.name])
            else:  # a functional use: the weight and the bias the call passes
                names = [site.param_name] + ([site.bias_name] if site.bias_name else [])
            unit = groups[unit_name] = Unit(index=-1, name=unit_name, keys=[], tensors=[], method=d.method)
            unit.tensors = sorted({n for n in names if n in order}, key=order.__getitem__)
            unit.nbytes = sum(state[n].numel() * state[n].element_size() for n in unit.tensors)
        unit.keys.append((d.name, d.node))
    units = sorted(groups.values(), key=lambda u: order[u.tensors[0]] if u.tensors else len(order))
    for i, u in enumerate(units):
        u.index = i
    return StreamPlan(skeleton=skeleton, capture=cap, config=config, decisions=decisions, units=units,
                      state_keys=state_keys, aliases=aliases, example_inputs=example_inputs,
                      example_kwargs=example_kwargs, shapes=dict(ctx.shapes), calls=dict(ctx.calls))


# ----------------------------------------------------------------- materializing
def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (root.get_submodule(parent) if parent else root), attr


def _place(root: nn.Module, name: str, t: torch.Tensor) -> tuple[nn.Module, str]:
    """Put ``t`` where the skeleton's tensor ``name`` is (a parameter stays a parameter, with its flag)."""
    mod, attr = _owner(root, name)
    if attr in mod._parameters:
        old = mod._parameters[attr]
        mod._parameters[attr] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=old.requires_grad)
    else:
        mod._buffers[attr] = t
    return mod, attr


def _to_meta(mod: nn.Module, attr: str) -> None:
    """Replace the module's tensor ``attr`` by a meta tensor of the same kind, shape and dtype."""
    store = mod._parameters if attr in mod._parameters else mod._buffers
    if attr not in store:
        return
    old = store[attr]
    if old is None or old.is_meta:
        return
    meta = torch.empty_like(old, device="meta")
    store[attr] = nn.Parameter(meta, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else meta


def read_tensor(reader: CheckpointReader, name: str, like: torch.Tensor, where: str) -> torch.Tensor:
    """The checkpoint's ``name`` with ``like``'s dtype (as ``load_state_dict`` copies it), shape checked."""
    if name not in reader:
        raise InputError(f"--weights {reader.path}: no tensor {name!r}, which {where} needs. Check that the "
                         "weights belong to this model.")
    if tuple(reader.shape(name)) != tuple(like.shape):
        raise InputError(f"--weights {reader.path} does not fit {where}: {name!r} has shape "
                         f"{list(reader.shape(name))}, the model expects {list(like.shape)}.")
    t = reader.get(name)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise InputError(f"--weights {reader.path}: tensor {name!r} holds NaN or inf values; a converted model "
                         "would compute garbage from them. Check the checkpoint (was training diverging?).")
    return t if t.dtype == like.dtype else t.to(like.dtype)


def _restricted_planner(allowed: set[tuple[str, str | None]]) -> Callable:
    from .plan import plan_model

    def planner(module, ctx):
        plan = plan_model(module, ctx)
        for d in plan.decisions:
            if d.rewrites and (d.name, d.node) not in allowed:
                d.method = "dense"  # carried out in its own unit's run
        return plan

    return planner


def _replayed_shapes(sp: StreamPlan) -> Callable:
    """A pass in annotate_shapes' place: the shapes measured once on the skeleton, and the decisions'
    shapes and dense FLOPs filled from them as annotate_shapes fills them."""
    from .passes.annotate_shapes import fill_decisions
    from .passes.infra import PassResult

    def annotate_shapes(module, ctx):
        if not ctx.example_inputs and not ctx.example_kwargs:
            return PassResult(module, False)
        ctx.shapes.update(sp.shapes)
        ctx.calls.update(sp.calls)
        fill_decisions(ctx)
        return PassResult(module, False)

    return annotate_shapes


def _layout_record(m: nn.Module) -> dict[str, Any] | None:
    from .io import _jsonable

    lay = getattr(m, "layout", None)
    if lay is not None and hasattr(lay, "block_size"):
        return {"kind": "block_sparse", "shape": list(lay.shape), "block_size": lay.block_size,
                "nnz_blocks": lay.nnz, "density": lay.density}
    if hasattr(m, "to_dense_module") and hasattr(m, "rank"):
        return {"kind": type(m).__name__, "rank": _jsonable(m.rank)}
    return None


def convert_unit(sp: StreamPlan, unit: Unit, reader: CheckpointReader) -> UnitResult:
    """Materialize ``unit`` in the skeleton, run the pipeline on it alone, return what replaced it.

    Afterwards every tensor of the unit (the dense ones and the converted ones)
    is a meta tensor again, so the next unit starts from the same memory.
    """
    from .passes import PIPELINE, PassContext, annotate_shapes, run_passes

    root = sp.skeleton
    where = f"layer {unit.name!r}"
    placed: list[tuple[nn.Module, str]] = []
    gm = sp.capture.graph
    state = root.state_dict(keep_vars=True)
    for name in unit.tensors:
        old = state[name]
        t = read_tensor(reader, name, old, where)
        placed.append(_place(root, name, t))
        # The fx analysis graph holds its own references to the tensors its get_attr nodes read
        # (a functional weight): the same object goes there too, as in the model it was traced from.
        if gm is not None and gm is not root:
            try:
                mod, attr = _owner(gm, name)
            except AttributeError:
                continue
            if getattr(mod, attr, None) is old:
                placed.append(_place(gm, name, getattr(*placed[-1])))
    del state
    before = set(root.state_dict(keep_vars=True).keys())
    ctx = PassContext(config=sp.config, example_inputs=sp.example_inputs, example_kwargs=sp.example_kwargs,
                      traced=sp.capture.traced, capture_note=sp.capture.note,
                      planner=_restricted_planner(set(unit.keys)), capture=sp.capture)
    replay = _replayed_shapes(sp)
    run_passes(sp.capture.module, ctx, [replay if p is annotate_shapes else p for p in PIPELINE])
    mine = set(unit.keys)
    decisions = [d for d in ctx.plan.decisions if (d.name, d.node) in mine]
    from .io import _dedupe

    own = set(unit.tensors)
    tensors, aliases = _dedupe({k: t.detach() for k, t in root.state_dict(keep_vars=True).items()
                                if k in own or k not in before})
    layouts = {}
    for d in decisions:
        qual = d.result.get("module")
        if qual:
            rec = _layout_record(root.get_submodule(qual))
            if rec is not None:
                layouts[qual] = rec
    # Back to meta: the converted modules and the dense tensors read for them (the capture's graph
    # still refers to the replaced modules, so their tensors are released here, not by the GC).
    for mod, attr in placed:
        _to_meta(mod, attr)
    for k in list(tensors) + list(aliases):
        _to_meta(*_owner(root, k))
    for d in decisions:
        qual = d.result.get("module")
        if qual:
            root.get_submodule(qual).to("meta")  # non-persistent buffers too (derived layout metadata)
    gc.collect(1)  # young generations only: a full collection costs ~0.4 s with torch and transformers loaded
    release_memory()
    return UnitResult(unit.index, tensors, decisions, layouts, list(ctx.notes), aliases)


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    glibc serves allocations below its dynamic mmap threshold (up to 32 MiB) from its heap and keeps
    what is freed there; a layer's transient tensors then fragment the heap, and resident memory
    climbs by ~15 MB per layer of a 2 GB checkpoint although nothing is alive (measured:
    benchmarks/bench_streaming.py).  Trimming after each layer keeps it flat.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc (musl has no malloc_trim)
        pass


def final_decisions(sp: StreamPlan, results: dict[int, UnitResult]) -> list[Any]:
    """The plan in the order the in-memory conversion lists it, each unit's decisions as it carried them out."""
    done = {(d.name, d.node): d for r in results.values() for d in r.decisions}
    return [done.get((d.name, d.node), d) for d in sp.decisions]


def ordered_tensors(sp: StreamPlan, reader: CheckpointReader, result_of: Callable[[Unit], UnitResult],
                    on_unit: Callable[[Unit, UnitResult], None] | None = None,
                    on_tensor: Callable[[str, int], None] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the converted model, in state-dict order, one at a time.

    A unit's tensors come where its first tensor was (``result_of(unit)`` converts
    it or receives it); every other tensor is read from ``reader`` when its turn
    comes.  Tied names (``sp.aliases``) are skipped: the writer records them as aliases.
    """
    owner = {k: u for u in sp.units for k in u.tensors}
    state = sp.skeleton.state_dict(keep_vars=True)
    done: set[int] = set()
    for k in sp.state_keys:
        if k in sp.aliases:
            continue
        unit = owner.get(k)
        if unit is None:  # copied through (a tied tensor may be stored under another of its names)
            name = k if k in reader else next((a for a, b in sp.aliases.items() if b == k and a in reader), k)
            t = read_tensor(reader, name, state[k], f"tensor {k!r}")
            if on_tensor is not None:
                on_tensor(k, t.numel() * t.element_size())
            yield k, t
            continue
        if unit.index in done:
            continue
        done.add(unit.index)
        res = result_of(unit)
        if on_unit is not None:
            on_unit(unit, res)
        for name, t in res.tensors.items():
            yield name, t
        del res


# ------------------------------------------------------------------ checking the checkpoint
def check_checkpoint(sp: StreamPlan, reader: CheckpointReader, where: str) -> int:
    """Every tensor the model needs is in the checkpoint with its shape, and nothing else is (as
    ``--weights`` loading requires); checked on the headers, before any work.  Returns the bytes to read."""
    state = sp.skeleton.state_dict(keep_vars=True)
    persistent = set(state)
    non_persistent = {n for n, _ in sp.skeleton.named_buffers(remove_duplicate=False)} - persistent
    groups: dict[str, list[str]] = {}
    for k in sp.state_keys:
        groups.setdefault(sp.aliases.get(k, k), []).append(k)
    need = 0
    for first, names in groups.items():
        have = [n for n in names if n in reader]
        if not have:
            raise InputError(f"--weights {reader.path} does not fit {where}: no tensor {first!r}"
                             f"{' (or its tied names ' + ', '.join(names[1:]) + ')' if len(names) > 1 else ''}. "
                             "Check that the weights belong to this model.")
        for n in have:
            if tuple(reader.shape(n)) != tuple(state[first].shape):
                raise InputError(f"--weights {reader.path} does not fit {where}: {n!r} has shape "
                                 f"{list(reader.shape(n))}, the model expects {list(state[first].shape)}.")
        if len(have) > 1:  # one tensor in the model: the checkpoint's copies must agree, or one would be dropped
            ref = reader.get(have[0])
            for n in have[1:]:
                if not torch.equal(reader.get(n), ref):
                    raise InputError(f"--weights {reader.path}: {have[0]!r} and {n!r} are one tied tensor in "
                                     f"{where}, but the checkpoint holds different values for them. Keep one of "
                                     "them (or make them equal).")
        need += math.prod(state[first].shape) * state[first].element_size()
    extra = [n for n in reader.names() if n not in persistent and n not in non_persistent]
    if extra:
        raise InputError(f"--weights {reader.path} does not fit {where}: {len(extra)} unexpected tensors ("
                         f"{', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}). Check that the weights belong "
                         "to this model.")
    return need


def fingerprint(sp: StreamPlan, reader: CheckpointReader) -> str:
    """sha256 of the dense model's state_dict, as ``sparsify convert`` records it (``source_fingerprint``,
    which ``verify`` checks): every tensor in sorted order, read one at a time."""
    import hashlib

    state = sp.skeleton.state_dict(keep_vars=True)
    h = hashlib.sha256()
    for k in sorted(sp.state_keys):
        first = sp.aliases.get(k, k)
        names = [k, first] + [a for a, b in sp.aliases.items() if b == first]
        name = next((n for n in names if n in reader), k)
        t = read_tensor(reader, name, state[first], f"tensor {k!r}").contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        del t
    return h.hexdigest()


# ------------------------------------------------------------------ writing
SHARD_NAME = "weights-{:05d}-of-{:05d}.safetensors"
DEFAULT_SHARD_BYTES = 128 * 10**6  # the writer holds one shard: a small one keeps the peak low (docs/distributed.md)


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a size such as ``"512MB"``, ``"2GiB"``, ``"100kB"`` (decimal kB / MB / GB as
    huggingface_hub reads them, binary KiB / MiB / GiB).

    Example:
        >>> parse_size("512MB"), parse_size("1GiB"), parse_size(1000)
        (512000000, 1073741824, 1000)
    """
    import re

    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"max_shard_size: expected bytes or a size like '512MB'. Got {size!r}.")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", size)
        if m is None or m.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"max_shard_size: expected bytes or a size like '512MB' or '2GiB'. Got {size!r}.")
        n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if n < 1:
        raise ValueError(f"max_shard_size: expected a positive size. Got {size!r}.")
    return n


class ShardWriter:
    """The weights of an artifact, written as they come: shards of at most ``max_bytes`` (a tensor larger
    than that gets a shard of its own), one ``weights.safetensors`` if everything fit in one."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.table: dict[str, dict[str, Any]] = {}
        self.aliases: dict[str, str] = {}
        self.keys: list[str] = []

    def add(self, name: str, t: torch.Tensor) -> None:
        from .io import _dtype_name

        n = t.numel() * t.element_size()
        if self.buffer and self.buffered + n > self.max_bytes:
            self.flush()
        self.buffer[name] = t
        self.buffered += n
        self.table[name] = {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
        self.keys.append(name)

    def alias(self, name: str, src: str) -> None:
        self.aliases[name] = src
        self.keys.append(name)

    def flush(self) -> None:
        from safetensors.torch import save_file

        from . import files as _files
        from .io import FORMAT

        if not self.buffer:
            return
        part = self.folder / f".part-{len(self.parts):05d}.safetensors"
        save_file(self.buffer, str(part), metadata={"format": FORMAT})
        _files.apply_umask(part)  # safetensors creates it 0600
        self.parts.append((part, list(self.buffer)))
        self.buffer, self.buffered = {}, 0
        release_memory()

    def finish(self) -> dict[str, Any]:
        """Close the last shard, give the files their final names; the manifest's ``weights`` entry."""
        import hashlib

        from . import files as _files
        from .io import WEIGHTS_FILE, WEIGHTS_INDEX

        self.flush()
        if not self.parts:  # a model without tensors: one empty file, as save writes it
            self.buffer = {}
            from safetensors.torch import save_file

            from .io import FORMAT

            part = self.folder / ".part-00000.safetensors"
            save_file({}, str(part), metadata={"format": FORMAT})
            _files.apply_umask(part)
            self.parts.append((part, []))

        def digest(p: Path) -> tuple[str, int]:
            h, size = hashlib.sha256(), 0
            with open(p, "rb") as f:  # our own file, written an instant ago
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
            return h.hexdigest(), size

        entry: dict[str, Any] = {"tensors": self.table, "aliases": self.aliases, "state_dict_keys": self.keys}
        if len(self.parts) == 1:
            os.rename(self.parts[0][0], self.folder / WEIGHTS_FILE)
            sha, size = digest(self.folder / WEIGHTS_FILE)
            return {"file": WEIGHTS_FILE, "sha256": sha, "bytes": size, **entry}
        total = len(self.parts)
        shards, weight_map = [], {}
        for i, (part, names) in enumerate(self.parts):
            name = SHARD_NAME.format(i + 1, total)
            os.rename(part, self.folder / name)
            sha, size = digest(self.folder / name)
            shards.append({"file": name, "sha256": sha, "bytes": size, "tensors": names})
            weight_map.update({n: name for n in names})
        # The index Hugging Face tools read; sparsify's own loader reads the manifest's shard table.
        index = {"metadata": {"total_size": sum(math.prod(v["shape"]) * _itemsize(v["dtype"])
                                                for v in self.table.values())},
                 "weight_map": weight_map}
        data = json.dumps(index, indent=1).encode()
        _files.write_new(self.folder / WEIGHTS_INDEX, data)
        sha, size = digest(self.folder / WEIGHTS_INDEX)
        return {"file": WEIGHTS_INDEX, "sha256": sha, "bytes": size, "shards": shards, **entry}


def _itemsize(dtype_name: str) -> int:
    return getattr(torch, dtype_name).itemsize


# ------------------------------------------------------------------ the API
@dataclass
class StreamOutcome:
    """What a streaming conversion did (rank 0; other ranks get None)."""

    path: Path
    plan: Any                      # a sparsify.Plan: every decision, as the in-memory conversion makes them
    units: int
    bytes_read: int
    seconds: float
    pending: Any = None            # the staged artifact, when the caller commits it (commit=False)
    processes: int = 1


def _progress_bar(enabled: bool | Callable, total: int, units: int):
    """A tqdm bar over the checkpoint's bytes with the layer count, or the caller's callable."""
    if callable(enabled):
        return enabled
    if not enabled:
        return None
    import sys

    from tqdm import tqdm

    bar = tqdm(total=total, desc="streaming", unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
               dynamic_ncols=True, leave=False)
    done = {"layers": 0}

    def step(kind: str, name: str, nbytes: int) -> None:
        if kind == "layer":
            done["layers"] += 1
        bar.set_postfix_str(f"layer {done['layers']}/{units} {name[-40:]}", refresh=False)
        bar.update(nbytes)
        if kind == "end":
            bar.close()

    return step


def convert_checkpoint(
    model: nn.Module | Callable[[], nn.Module],
    weights: str | os.PathLike,
    out: str | os.PathLike,
    config: Any = None,
    *,
    example_inputs: Any = None,
    max_shard_size: int | str = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool | Callable = False,
    distributed: bool = False,
    model_spec: Any = None,
    hf: dict | None = None,
    extra: dict | None = None,
    inputs_record: Any = None,
    record_fingerprint: bool = False,
    commit: bool = True,
    **shorthand: Any,
) -> StreamOutcome | None:
    """Convert a safetensors checkpoint one layer at a time into an artifact at ``out``.

    ``model`` is the model built on the ``meta`` device (``with torch.device("meta"): model = Make()``),
    or a callable that builds it (called under ``torch.device("meta")``); ``weights`` is a
    ``.safetensors`` file or a Hugging Face ``model.safetensors.index.json`` with its shards.  Only one
    layer's tensors (and the writer's buffer, at most ``max_shard_size``) are in memory at a time; the
    artifact's weights are sharded past ``max_shard_size`` (``weights-0000k-of-0000n.safetensors`` with
    an index) and ``sparsify.load`` reads it.  The result equals ``sparsify.sparsify`` on the loaded
    model bit for bit.  ``example_inputs`` (real or meta tensors) give shapes and FLOPs, as for
    ``sparsify()``; the model never runs on data, so no program is stored and nothing is checked
    against the dense model (``sparsify verify`` can, given the memory; ``record_fingerprint`` stores the
    dense weights' digest it checks, at the cost of reading the checkpoint twice).  With ``distributed=True``
    under ``torchrun`` each rank converts a share of the layers and rank 0 writes (it returns the
    outcome; the other ranks return None).

    Example:
        >>> import torch, sparsify, tempfile, os
        >>> from safetensors.torch import save_file
        >>> make = lambda: torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
        >>> d = tempfile.mkdtemp(); ckpt = os.path.join(d, "model.safetensors")
        >>> save_file(make().state_dict(), ckpt)
        >>> r = convert_checkpoint(make, ckpt, os.path.join(d, "out"), density=0.5)
        >>> r.units, type(sparsify.load(r.path, factory=make)[0]).__name__
        (1, 'BlockSparseLinear')
    """
    import time

    from . import files as _files
    from .config import SparsifyConfig
    from .decision import Plan
    from .io import (
        FORMAT,
        FORMAT_VERSION,
        SHARDED_FORMAT_VERSION,
        _jsonable,
        artifact_files,
        check_output_path,
        hf_info,
    )
    from .manifest import validate_manifest

    cfg = SparsifyConfig.coerce(config, shorthand)
    max_bytes = parse_size(max_shard_size)
    reader = CheckpointReader(weights)
    skeleton = model
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(f"convert_checkpoint: expected a model on the meta device or a callable that builds "
                            f"one. Got {type(model).__name__}.")
        with torch.device("meta"):
            skeleton = model()
        if not isinstance(skeleton, nn.Module):
            raise TypeError(f"convert_checkpoint: the builder returned a {type(skeleton).__name__}, not a model.")
    real = [n for n, t in skeleton.state_dict(keep_vars=True).items() if not t.is_meta]
    if real:
        raise ValueError(f"convert_checkpoint: the model holds real tensors ({real[0]!r}...); build it under "
                         "`with torch.device('meta'):` so that no weights are allocated (they come from the "
                         "checkpoint), or pass the builder itself.")
    group = None
    rank = 0
    if distributed:
        from .distributed import conversion_group

        group = conversion_group()
        rank = 0 if group is None else torch.distributed.get_rank(group)
    inputs = example_inputs
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    kwargs = None
    if isinstance(inputs, dict):
        inputs, kwargs = (), {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    elif inputs is not None:
        inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sp = plan_units(skeleton.eval(), cfg, example_inputs=inputs or None, example_kwargs=kwargs)
    for w in caught[:1]:  # the capture warning, once (not once per unit)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    where = type(skeleton).__name__
    total = check_checkpoint(sp, reader, where)
    outp = Path(out)
    pending = None
    ok = 1
    if rank == 0:
        try:
            check_output_path(outp, [reader.path, *{reader._file_of[n] for n in reader.names()}], force=overwrite,
                              need_bytes=total + (1 << 20))
        except InputError:
            ok = 0
            if group is None:
                raise
    if group is not None:  # every rank learns whether rank 0 can write, before anyone works
        flag = torch.tensor([ok])
        torch.distributed.broadcast(flag, src=0, group=group)
        if not int(flag):
            if rank == 0:
                check_output_path(outp, [reader.path], force=overwrite, need_bytes=total + (1 << 20))
            raise InputError(f"output {out}: rank 0 cannot write it (see rank 0's error); nothing was converted.")
    if group is not None and rank != 0:
        from .distributed import unit_results

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unit_results(sp, reader, group)
        return None
    if record_fingerprint:
        extra = {**(extra or {}), "source_fingerprint": fingerprint(sp, reader)}
    step = _progress_bar(progress, total, len(sp.units))
    results: dict[int, UnitResult] = {}
    if group is not None:
        from .distributed import unit_results

        source = unit_results(sp, reader, group)
    else:
        from .distributed import canonical

        def source(unit):
            return canonical(convert_unit(sp, unit, reader))

    def on_unit(unit, res):
        # Keep what the manifest needs, not the tensors: they go to the writer and are freed after.
        results[unit.index] = UnitResult(res.index, {}, res.decisions, res.layouts, res.notes, res.aliases)
        if step is not None:
            step("layer", unit.name, unit.nbytes)

    def on_tensor(name, nbytes):
        if step is not None:
            step("tensor", name, nbytes)

    pending = _files.PendingDir(outp, force=overwrite, is_ours=artifact_files, what="output")
    try:
        writer = ShardWriter(pending.tmp, max_bytes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the capture warning was shown once above
            for name, t in ordered_tensors(sp, reader, source, on_unit=on_unit, on_tensor=on_tensor):
                writer.add(name, t)
        for k in sp.state_keys:  # tied names: stored once, the others recorded as aliases
            if k in sp.aliases:
                writer.alias(k, sp.aliases[k])
        for i in sorted(results):
            for k, src in results[i].aliases.items():
                writer.alias(k, src)
        weights_entry = writer.finish()
        decisions = final_decisions(sp, results)
        notes = [n for i in sorted(results) for n in results[i].notes]
        layouts = {q: rec for i in sorted(results) for q, rec in results[i].layouts.items()}
        import datetime

        from . import __version__

        config_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else None
        manifest = {
            "format": FORMAT,
            "format_version": SHARDED_FORMAT_VERSION if "shards" in weights_entry else FORMAT_VERSION,
            "sparsify_version": __version__,
            "torch_version": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": model_spec.to_dict() if hasattr(model_spec, "to_dict") else model_spec,
            "hf": hf if hf is not None else hf_info(skeleton),
            "config": _jsonable(config_dict),
            "inputs": inputs_record,
            "input_names": list(kwargs) if kwargs else None,
            "training": False,
            "plan": {"traced": sp.capture.traced, "capture_note": sp.capture.note, "notes": notes,
                     "decisions": [_jsonable(d.to_dict()) for d in decisions]},
            "layouts": layouts,
            "weights": weights_entry,
            "program": None,
            "program_note": ("converted by streaming (the model was never in memory), so no program was stored; "
                             "load it from its class (Hugging Face) or factory"),
            "streamed": {"units": len(sp.units), "max_shard_size": max_bytes,
                         "processes": 1 if group is None else torch.distributed.get_world_size(group)},
            **(extra or {}),
        }
        _files.write_new(pending.tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
        validate_manifest(manifest, str(pending.tmp))
        if step is not None:
            step("end", "", 0)
        if commit:
            _files.commit_all([pending])
    except BaseException:
        pending.discard()
        raise
    plan = Plan(decisions, sp.capture.traced, sp.capture.note, notes)
    return StreamOutcome(outp, plan, len(sp.units), total, time.perf_counter() - t0,
                         None if commit else pending, manifest["streamed"]["processes"])
