"""Saved models: ``save(module, path)`` and ``load(path)``.  The format is in docs/saved_models.md.

An artifact is a folder::

    OUT/
      manifest.json        format version, versions, the model spec, the Hugging Face
                           class and config (when it is one), the config, the input
                           shapes, the plan (decisions), layouts, tensor table, checksums
      weights.safetensors  the converted model's state_dict (plus tensors only the
                           program needs), shared tensors stored once
      program.json         optional: the inference graph in sparsify's own program
                           format (see sparsify.program)

A streamed conversion (sparsify.streaming) may shard the weights instead:
``weights-0000k-of-0000n.safetensors`` with ``weights.safetensors.index.json``
(Hugging Face's index format); the manifest lists each shard with its checksum
and tensors (format version 3).

It is staged in a folder beside OUT and renamed into place with a rename that never
replaces anything, so a crash or Ctrl-C never leaves a half-written OUT and a folder
that appears at OUT meanwhile is never touched (see sparsify.files).  Loading reads
only regular files inside the folder, parses JSON and safetensors within limits,
validates the manifest field by field (sparsify.manifest) and never unpickles,
imports or evaluates anything named in a file; text from the artifact that an error
quotes is made printable (sparsify.report.printable).  ``load`` rebuilds the model

* from the stored program (no source needed; an inference module),
* for a Hugging Face model, from its config and class, found only in transformers'
  own auto-class registry, then the saved decisions replayed (the class comes back),
* from the original factory you pass (the saved decisions replayed, then the weights).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import files as _files
from .errors import InputError
from .manifest import MAX_MANIFEST_BYTES, MAX_PROGRAM_BYTES, MAX_TENSOR_ENTRIES, validate_manifest
from .model_spec import ARTIFACT_MANIFEST, InputSpec, ModelSpec, make_inputs, parse_model
from .report import printable

__all__ = ["save", "load", "read_manifest", "FORMAT", "FORMAT_VERSION", "check_output_path", "check_output_file",
           "artifact_files", "stage_artifact", "write_file"]

FORMAT = "sparsify.artifact"
#: Bumped when a reader of an older version could not read the new layout correctly.
#: 2: the program is sparsify's own format (sparsify.program); format 1 stored torch's serde JSON.
FORMAT_VERSION = 2
#: 3: the weights may be sharded (streamed conversions; ``weights.shards``).  Written only for sharded
#: weights, so single-file artifacts stay readable by readers of version 2.
SHARDED_FORMAT_VERSION = 3
WEIGHTS_FILE = "weights.safetensors"
WEIGHTS_INDEX = "weights.safetensors.index.json"
PROGRAM_FILE = "program.json"
#: Every file an artifact consists of: all that ``--force`` may delete (and the shards, SHARD_FILE).
ARTIFACT_FILES = (ARTIFACT_MANIFEST, WEIGHTS_FILE, PROGRAM_FILE, WEIGHTS_INDEX)
SHARD_FILE = re.compile(r"weights-([0-9]{5})-of-([0-9]{5})\.safetensors")
_PROGRAM_PREFIX = "__program__."
#: safetensors' own limit on the JSON header.
_MAX_HEADER = 100_000_000
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "C64": "complex64"}
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16}


# ---------------------------------------------------------------------- helpers
def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float):
        return o if o == o and abs(o) != float("inf") else repr(o)
    if isinstance(o, (str, int, bool)) or o is None:
        return o
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    return repr(o)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def artifact_files(path: str | os.PathLike) -> list[str] | None:
    """The files of the sparsify artifact at ``path`` (what ``--force`` may delete), or None if it is not one.

    An empty folder counts as an artifact with no files.  A folder holding
    anything sparsify did not write is not one.
    """
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return None
    try:
        names = os.listdir(p)
    except OSError:
        return None
    if not names:
        return []
    if any(n not in ARTIFACT_FILES and not SHARD_FILE.fullmatch(n) for n in names) or ARTIFACT_MANIFEST not in names:
        return None
    if not all(_files.is_regular_file(p / n) for n in names):  # a folder or link under our name is not ours
        return None
    try:
        m = _files.parse_json(_files.read_regular(p, ARTIFACT_MANIFEST, max_bytes=MAX_MANIFEST_BYTES,
                                                  what="manifest"), f"{p}/{ARTIFACT_MANIFEST}")
    except InputError:
        return None
    return names if isinstance(m, dict) and m.get("format") == FORMAT else None


def is_artifact(path: str | os.PathLike) -> bool:
    return bool(artifact_files(path))


def _inputs_of(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    return [Path(i) for i in inputs if i is not None]


def _clashes(out: Path, inputs: list[Path]) -> str | None:
    """Why ``out`` may not be written, given the command's inputs (None when it may)."""
    out_abs = out.resolve()
    for inp in inputs:
        ip = inp.resolve()
        if ip == out_abs or out_abs in ip.parents:
            return f"is the input {inp}{' (or holds it)' if ip != out_abs else ''}"
        if ip.is_dir() and ip in out_abs.parents:
            return f"is inside the input {inp}"
        if out.exists() and inp.exists():
            try:
                if os.path.samefile(out, inp):
                    return f"is the input {inp} (the same file under another name)"
            except OSError:
                pass
    return None


def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *, force: bool = False,
                      need_bytes: int = 0) -> Path:
    """Refuse an artifact OUT that is (or holds, or is inside) an input, or that exists without ``force``.

    With ``force`` an existing OUT is replaced only if it is a sparsify artifact
    (or an empty folder) holding nothing but an artifact's files: a user's other
    files are never deleted.  The folder must be writable (with ``need_bytes``
    free, when given).
    """
    out_p = Path(out)
    why = _clashes(out_p, _inputs_of(inputs))
    if why:
        raise InputError(f"output {out} {why}; choose another output path. sparsify never overwrites its input.")
    if out_p.exists() or out_p.is_symlink():
        if not force:
            raise InputError(f"output {out} exists; pass --force (overwrite=True) to replace it.")
        if artifact_files(out_p) is None:
            extra = ""
            if out_p.is_dir() and not out_p.is_symlink():
                with_others = sorted(n for n in os.listdir(out_p) if n not in ARTIFACT_FILES
                                     and not SHARD_FILE.fullmatch(n))
                extra = f" (it holds {with_others[0]!r})" if with_others else ""
            raise InputError(f"output {out} exists and is not a sparsify artifact{extra}; refusing to replace it "
                             "even with --force. Remove it yourself or choose another path.")
    _files.check_writable(out_p, "output", need_bytes=need_bytes)
    return out_p


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *, force: bool = False,
                      is_ours: Callable[[Path], bool] | None = None, what: str = "output") -> Path:
    """The same checks for a single output file (``--report``, ``--json``)."""
    p = Path(path)
    why = _clashes(p, _inputs_of(inputs))
    if why:
        raise InputError(f"{what} {path} {why}; choose another path. sparsify never overwrites its input.")
    if p.exists() or p.is_symlink():
        if not force:
            raise InputError(f"{what} {path} exists; pass --force to replace it.")
        if p.is_symlink() or not p.is_file() or is_ours is None or not is_ours(p):
            raise InputError(f"{what} {path} exists and was not written by sparsify; refusing to replace it even "
                             "with --force. Remove it yourself or choose another path.")
    _files.check_writable(p, what)
    return p


def write_file(path: str | os.PathLike, data: bytes | str, *, force: bool = False,
               is_ours: Callable[[Path], bool] | None = None, what: str = "output") -> Path:
    """Write one output file exclusively (created with the umask's mode; replaced only with ``force`` if ours).

    Example:
        >>> import tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "out.txt")
        >>> _ = write_file(f, "hello")
        >>> write_file(f, "again")
        Traceback (most recent call last):
        ...
        sparsify.errors.InputError: output ... exists; pass --force to replace it.
    """
    p = Path(path)
    if (p.exists() or p.is_symlink()) and not force:
        raise InputError(f"{what} {p} exists; pass --force to replace it.")
    pending = _files.PendingFile(p, data.encode() if isinstance(data, str) else data, force=force,
                                 is_ours=is_ours, what=what)
    _files.commit_all([pending])
    return p


# ------------------------------------------------------------------------ save
def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses shared storage: store each shared tensor once and record aliases."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: dict[int, int] = {}
    for t in tensors.values():
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            storages[ptr] = storages.get(ptr, 0) + 1
    for k, t in tensors.items():
        t = t.detach()
        if t.numel():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if key in seen:
                aliases[k] = seen[key]
                continue
            seen[key] = k
            shared = storages[t.untyped_storage().data_ptr()] > 1
            full = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
            if shared or not full:
                t = t.clone(memory_format=torch.contiguous_format)  # partial views: own copy
        out[k] = t.to("cpu").contiguous()
    return out, aliases


def hf_info(module: nn.Module) -> dict[str, Any] | None:
    """What rebuilds a Hugging Face model: its class name and config (None for other models)."""
    import sys

    transformers = sys.modules.get("transformers")
    if transformers is None:
        return None
    cfg = getattr(module, "config", None)
    if not isinstance(module, transformers.PreTrainedModel) or not isinstance(cfg, transformers.PretrainedConfig):
        return None
    return {"class": type(module).__name__, "config": _jsonable(cfg.to_dict()),
            "transformers_version": transformers.__version__}


def _input_record(x: Any) -> dict[str, Any] | None:
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise InputError(f"save(example_inputs=...): expected tensors (or None). Got {type(x).__name__}.")
    return {"shape": list(x.shape), "dtype": _dtype_name(x.dtype)}


def stage_artifact(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    model_spec: ModelSpec | dict | None = None,
    config: Any = None,
    example_inputs: tuple | None = None,
    export: bool = True,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    hf: dict[str, Any] | None = None,
) -> _files.PendingDir:
    """Write the artifact into a staging folder beside ``path``; commit it with :func:`sparsify.files.commit_all`."""
    from safetensors.torch import save_file

    from . import __version__
    from .api import PLAN_ATTR
    from .decision import Plan

    if not isinstance(module, nn.Module):
        raise InputError(f"save: expected an nn.Module. Got {type(module).__name__}.")
    out = Path(path)
    plan = getattr(module, PLAN_ATTR, None)
    if isinstance(model_spec, ModelSpec):
        model_spec = model_spec.to_dict()
    if config is not None and hasattr(config, "to_dict"):
        config = config.to_dict()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    input_names = None
    if isinstance(example_inputs, dict):  # keyword inputs, as Hugging Face models take them
        if not all(isinstance(k, str) for k in example_inputs):
            raise InputError("save(example_inputs=...): a dict of keyword inputs needs string keys.")
        input_names = list(example_inputs)
        inputs_record = [_input_record(x) for x in example_inputs.values()]
    elif example_inputs is not None:
        example_inputs = tuple(example_inputs)
        inputs_record = [_input_record(x) for x in example_inputs]
    else:
        inputs_record = None
    hf = hf if hf is not None else hf_info(module)
    state = module.state_dict()
    tensors, aliases = _dedupe(dict(state))
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    check_output_path(out, force=overwrite, need_bytes=need + (1 << 20))

    pending = _files.PendingDir(out, force=overwrite, is_ours=artifact_files, what="output")
    try:
        tmp = pending.tmp
        program: bytes | None = None
        program_note = None
        if export and example_inputs is None:
            program_note = "no example inputs were given, so no program was stored"
        elif export:
            from .program import Unsupported, export_program, forward_kwargs_for_export

            try:
                doc, ptensors = export_program(module, example_inputs, forward_kwargs_for_export(module))
            except Unsupported as exc:
                program_note = str(exc)
            else:
                by_view = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                            t.dtype): k for k, t in state.items() if t.numel()}
                for i, (_, t) in enumerate(ptensors):
                    key = by_view.get((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                                       tuple(t.stride()), t.dtype)) if t.numel() else None
                    if key is not None:
                        key = aliases.get(key, key)
                    else:
                        key = f"{_PROGRAM_PREFIX}t{i}"
                        tensors[key] = t.detach().to("cpu").contiguous().clone()
                    doc["tensors"][i]["key"] = key
                program = json.dumps(doc, separators=(",", ":")).encode()

        layouts: dict[str, Any] = {}
        for name, m in module.named_modules():
            lay = getattr(m, "layout", None)
            if name and lay is not None and hasattr(lay, "block_size"):
                layouts[name] = {"kind": "block_sparse", "shape": list(lay.shape), "block_size": lay.block_size,
                                 "nnz_blocks": lay.nnz, "density": lay.density}
            elif name and hasattr(m, "to_dense_module") and hasattr(m, "rank"):
                layouts[name] = {"kind": type(m).__name__, "rank": _jsonable(m.rank)}

        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "sparsify_version": __version__,
            "torch_version": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": model_spec,
            "hf": hf,
            "config": _jsonable(config),
            "inputs": inputs_record,
            "input_names": input_names,
            "training": module.training,
            "plan": None if not isinstance(plan, Plan) else {
                "traced": plan.traced, "capture_note": plan.capture_note, "notes": list(plan.notes),
                "decisions": [_jsonable(d.to_dict()) for d in plan.decisions]},
            "layouts": layouts,
            "weights": None,
            "program": None,
            "program_note": program_note,
            **(extra or {}),
        }
        try:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
            _files.apply_umask(tmp / WEIGHTS_FILE)  # safetensors creates it 0600
            h, size = hashlib.sha256(), 0
            with open(tmp / WEIGHTS_FILE, "rb") as f:  # our own file, written an instant ago
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
            manifest["weights"] = {
                "file": WEIGHTS_FILE, "sha256": h.hexdigest(), "bytes": size,
                "tensors": {k: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for k, t in tensors.items()},
                "aliases": aliases,
                "state_dict_keys": list(state.keys()),
            }
            if program is not None:
                _files.write_new(tmp / PROGRAM_FILE, program)
                manifest["program"] = {"file": PROGRAM_FILE, "sha256": hashlib.sha256(program).hexdigest(),
                                       "bytes": len(program)}
            _files.write_new(tmp / ARTIFACT_MANIFEST, json.dumps(manifest, indent=1).encode())
        except OSError as exc:
            raise InputError(f"output {out}: writing failed ({exc.strerror or exc}); nothing was written.") from None
        validate_manifest(manifest, str(tmp))  # what we write must be what we read
    except BaseException:
        pending.discard()
        raise
    return pending


def save(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    model_spec: ModelSpec | dict | None = None,
    config: Any = None,
    example_inputs: tuple | None = None,
    export: bool = True,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save a converted model as an artifact folder at ``path`` (atomically, never over anything not ours).

    ``model_spec`` (how to rebuild the original model), ``config`` and
    ``example_inputs`` are recorded when given.  A Hugging Face model's class and
    config are recorded too, so ``load`` gives the class back.  With example
    inputs and ``export=True`` the inference graph is stored in sparsify's own
    program format, so ``load`` needs no source; a model whose graph cannot be
    stored is saved without it, with the reason in the manifest.  An example
    input may be ``None`` (an optional positional argument).  An existing
    ``path`` needs ``overwrite=True`` and must be a sparsify artifact.

    Example:
        >>> import torch, sparsify, tempfile, os
        >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(256, 256)), density=0.5)
        >>> out = sparsify.save(m, os.path.join(tempfile.mkdtemp(), "m"), export=False)
        >>> sorted(os.listdir(out))
        ['manifest.json', 'weights.safetensors']
    """
    pending = stage_artifact(module, path, model_spec=model_spec, config=config, example_inputs=example_inputs,
                             export=export, overwrite=overwrite, extra=extra)
    _files.commit_all([pending])
    return Path(path)


# ------------------------------------------------------------------------ load
def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the artifact at ``path``, checked field by field (see sparsify.manifest)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: no such file or folder.")
    if not p.is_dir():
        raise InputError(f"{path}: not a sparsify artifact (not a folder).")
    if not (p / ARTIFACT_MANIFEST).exists() and not (p / ARTIFACT_MANIFEST).is_symlink():
        raise InputError(f"{path}: not a sparsify artifact (no {ARTIFACT_MANIFEST}).")
    data = _files.read_regular(p, ARTIFACT_MANIFEST, max_bytes=MAX_MANIFEST_BYTES, what="manifest")
    m = _files.parse_json(data, f"{path}/{ARTIFACT_MANIFEST}")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise InputError(f"{path}/{ARTIFACT_MANIFEST}: not a sparsify manifest (format is not {FORMAT!r}).")
    v = m.get("format_version")
    if isinstance(v, int) and not isinstance(v, bool) and v > SHARDED_FORMAT_VERSION:
        raise InputError(f"{path} was written in artifact format version {v} by sparsify "
                         f"{printable(str(m.get('sparsify_version', '?'))[:20])}; this sparsify reads up to version "
                         f"{SHARDED_FORMAT_VERSION}. Upgrade sparsify to load it.")
    return validate_manifest(m, str(path))


def _check_bytes(path: Path, name: str, data: bytes, entry: dict[str, Any], what: str) -> None:
    if len(data) != entry["bytes"]:
        raise InputError(f"{path / name}: {len(data)} bytes, the manifest says {entry['bytes']}: the file is "
                         "truncated or was replaced. Re-create the artifact.")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise InputError(f"{path / name}: checksum mismatch (sha256 differs from the manifest's): the {what} are "
                         "corrupted. Re-create the artifact.")


def _check_safetensors_header(path: Path, data: bytes, expected: dict[str, Any], name: str = WEIGHTS_FILE) -> None:
    """Parse and check the safetensors header ourselves (within limits) before safetensors allocates anything."""
    where = f"{path / name}"
    if len(data) < 8:
        raise InputError(f"{where}: not a readable safetensors file (too short).")
    n = int.from_bytes(data[:8], "little")
    if n > min(_MAX_HEADER, len(data) - 8):
        raise InputError(f"{where}: not a readable safetensors file (header length {n}).")
    header = _files.parse_json(data[8:8 + n], f"{where} (header)", max_depth=4)
    if not isinstance(header, dict):
        raise InputError(f"{where}: not a readable safetensors file (header is not an object).")
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSOR_ENTRIES:
        raise InputError(f"{where}: {len(header)} tensors, more than {MAX_TENSOR_ENTRIES}.")
    body = len(data) - 8 - n
    for k, h in header.items():
        meta = expected.get(k)
        if meta is None:
            raise InputError(f"{where}: tensor {k[:80]!r} is not in the manifest; the artifact is corrupted.")
        if (not isinstance(h, dict) or not isinstance(h.get("dtype"), str) or _ST_DTYPES.get(h["dtype"]) != meta["dtype"]
                or h.get("shape") != meta["shape"]):
            raise InputError(f"{where}: tensor {k[:80]!r} does not match the manifest; the artifact is corrupted.")
        off = h.get("data_offsets")
        numel = 1
        for s in meta["shape"]:
            numel *= s
        if (not isinstance(off, list) or len(off) != 2 or not all(isinstance(o, int) and not isinstance(o, bool)
                                                                   for o in off)
                or not 0 <= off[0] <= off[1] <= body or off[1] - off[0] != numel * _ITEMSIZE[meta["dtype"]]):
            raise InputError(f"{where}: tensor {k[:80]!r} has invalid data offsets; the artifact is corrupted.")
    missing = set(expected) - set(header)
    if missing:
        raise InputError(f"{where}: tensor {sorted(missing)[0][:80]!r} is missing; the artifact is corrupted.")


def _load_tensors(path: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    w = manifest["weights"]
    if w["file"] == WEIGHTS_INDEX:
        tensors = _load_shards(path, w)
    else:
        data = _files.read_regular(path, WEIGHTS_FILE, max_bytes=w["bytes"], what="weights file")
        _check_bytes(path, WEIGHTS_FILE, data, w, "weights")
        _check_safetensors_header(path, data, w["tensors"])
        try:
            tensors = st_load(data)
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"{path / WEIGHTS_FILE}: not a readable safetensors file ({printable(exc)}).") from None
        del data
    for alias, src in w.get("aliases", {}).items():
        tensors[alias] = tensors[src]
    return tensors


def _load_shards(path: Path, w: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Sharded weights: each shard read, checked against its checksum and the manifest, and loaded in turn.

    The shard names are generated here from their count (the manifest's are checked against them,
    never used to open anything), and the index file is checked against its checksum only: the
    manifest's shard table says which tensors each shard holds."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    index = _files.read_regular(path, WEIGHTS_INDEX, max_bytes=w["bytes"], what="weights index")
    _check_bytes(path, WEIGHTS_INDEX, index, w, "weights index")
    shards = w["shards"]
    tensors: dict[str, torch.Tensor] = {}
    for i, shard in enumerate(shards):
        name = f"weights-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data = _files.read_regular(path, name, max_bytes=shard["bytes"], what="weights shard")
        _check_bytes(path, name, data, shard, "weights")
        _check_safetensors_header(path, data, {k: w["tensors"][k] for k in shard["tensors"]}, name)
        try:
            tensors.update(st_load(data))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"{path / name}: not a readable safetensors file ({printable(exc)}).") from None
        del data
    return tensors


#: Parameters that select a rank from the weights (cleared when a saved rank is replayed).
_RANK_SELECTORS = ("tolerance", "energy", "compression", "flops", "calibration_data")


def _escape_glob(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _replay_params(d: dict[str, Any]) -> dict[str, Any]:
    """The parameters that rebuild a decision's layer with the same shapes as the saved one."""
    from .methods import METHODS

    spec = METHODS.get(d["method"])
    if spec is None:
        raise InputError(f"layer {d['name']!r} was converted with method {d['method']!r}, which this "
                         "sparsify does not know. Upgrade sparsify.")
    from .config import RULE_FIELDS

    # A parameter named like a Rule field cannot go through Rule(...) (none is today: block_sparse's
    # from-scratch option is ``layout``, not ``pattern``); the block pattern comes from the state_dict.
    params = {k: v for k, v in (d.get("params") or {}).items() if k in spec.defaults and k not in RULE_FIELDS}
    res = d.get("result") or {}
    r = res.get("rank", res.get("ranks"))
    if r is not None and "rank" in spec.defaults:
        if isinstance(r, list):
            r = r[0] if len(r) == 1 else tuple(r)  # one rank recorded as a list (cp) is one rank
        params["rank"] = r
        # The rank is fixed now: every other way of selecting one goes back to its default (off).
        for k in _RANK_SELECTORS:
            if k in spec.defaults:
                params[k] = spec.defaults[k]
    return params


def _replay_inputs(manifest: dict[str, Any], where: str) -> tuple | dict | None:
    recs = manifest.get("inputs")
    if not recs:
        return None
    specs = [None if r is None else InputSpec.from_dict(r, f"{where}/manifest.json: field inputs[{i}]")
             for i, r in enumerate(recs)]
    real = make_inputs([s for s in specs if s is not None], int_high=1)
    it = iter(real)
    values = tuple(None if s is None else next(it) for s in specs)
    names = manifest.get("input_names")
    if names:
        if len(names) != len(values):
            raise InputError(f"{where}/manifest.json: field input_names: {len(names)} names for {len(values)} inputs")
        return dict(zip(names, values))
    return values


def _check_hf_fits(skeleton: nn.Module, manifest: dict[str, Any], where: str) -> None:
    """Refuse a recorded Hugging Face config that builds another model than the one whose weights are saved
    (``skeleton``: built from it on the meta device), before any memory is spent on it.

    Every tensor of the dense model that the artifact stores must have the stored shape; the others must
    be the dense weights of layers the plan converted (or of a BatchNorm folded into one): so a config
    edited to a larger vocabulary, width or depth is refused here, not after building it."""
    plan = manifest.get("plan")
    if not plan:
        raise InputError(f"{where}: the artifact holds no plan (decisions), so it cannot be rebuilt from its "
                         "config; it was not saved from a model made by sparsify().")
    w = manifest["weights"]
    shapes = {k: tuple(v["shape"]) for k, v in w["tensors"].items()}
    for alias, src in (w.get("aliases") or {}).items():
        if src in shapes:
            shapes[alias] = shapes[src]
    converted = {d["name"] for d in plan["decisions"] if d["method"] != "dense"}
    folded = {n for n, m in skeleton.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for name, t in skeleton.state_dict().items():
        want = shapes.get(name)
        if want is not None:
            if tuple(t.shape) != want:
                raise InputError(f"{where}: the config builds {printable(name)} of shape {list(t.shape)}, but the saved "
                                 f"weights hold it as {list(want)}: the config does not belong to these weights "
                                 "(the manifest was edited, or the artifact is corrupted).")
            continue
        owner = name.rpartition(".")[0]
        if owner not in converted and owner not in folded:
            raise InputError(f"{where}: the config builds {printable(name)} ({list(t.shape)}), which the saved weights do "
                             "not hold and no converted layer explains: the config does not belong to these "
                             "weights (the manifest was edited, or the artifact is corrupted).")


_FLOAT_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}


def _to_saved_dtype(model: nn.Module, manifest: dict[str, Any]) -> nn.Module:
    """The model in the floating dtype its saved weights have, when they all have one and the model (built
    from a config or factory, float32 by default) has another: a bfloat16 or float64 model comes back in
    its own dtype, not silently cast to float32 by ``load_state_dict``."""
    saved = {v["dtype"] for v in manifest["weights"]["tensors"].values() if v["dtype"] in _FLOAT_DTYPES}
    have = {t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}
    if len(saved) == 1 and len(have) == 1:
        want = _FLOAT_DTYPES[saved.pop()]
        if have.pop() != want:
            return model.to(want)
    return model


def _rebuild(manifest: dict[str, Any], model: nn.Module, tensors: dict[str, torch.Tensor], where: str,
             maker: str = "the factory") -> nn.Module:
    from .api import sparsify
    from .config import Rule, SparsifyConfig

    plan = manifest.get("plan")
    if not plan:
        raise InputError(f"{where}: the artifact holds no plan (decisions), so it cannot be rebuilt from a "
                         "factory; it was not saved from a model made by sparsify().")
    saved = plan["decisions"]
    try:
        rules = []
        for d in saved:
            if d["method"] == "dense":
                rules.append(Rule(_escape_glob(d["name"]), skip=True))
            else:
                rules.append(Rule(_escape_glob(d["name"]), method=d["method"], **_replay_params(d)))
        cfg = manifest.get("config") or {}
        fold = cfg.get("fold_batchnorm", any(n.startswith("folded BatchNorm") for n in plan.get("notes", [])))
        fuse = cfg.get("fuse_epilogues", True)
        # dense_if_larger=False: the saved decisions are final; a layer saved converted above break-even
        # (the user's dense_if_larger=False) must come back converted, not be re-judged and left dense
        config = SparsifyConfig(rules=rules, min_size=0, fold_batchnorm=fold if isinstance(fold, bool) else True,
                                fuse_epilogues=fuse if isinstance(fuse, bool) else True, dense_if_larger=False)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{where}: the saved plan cannot be replayed: {printable(exc)}") from None
    inputs = _replay_inputs(manifest, where)
    model = _to_saved_dtype(model, manifest)
    model.train(bool(manifest.get("training", False)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the capture warning was shown when the model was converted
        try:
            # No check against densify here: the weights it would check are replaced just below.
            rebuilt = sparsify(model, config, example_inputs=inputs, inplace=True, check=False)
        except ValueError as exc:
            raise InputError(f"{where}: the model does not fit the artifact: {printable(exc)}") from exc
    new = rebuilt._sparsify_plan.decisions
    key = lambda d: (d["name"], d["method"], list(d["weight_shape"]))  # noqa: E731
    old_k = [key(d) for d in saved]
    new_k = [key(d.to_dict()) for d in new]
    if old_k != new_k:
        diff = next(((a, b) for a, b in zip(old_k, new_k) if a != b), None)
        detail = (f"layer {diff[0][0]!r} was {diff[0][1]} {diff[0][2]}, now {diff[1][0]!r} {diff[1][1]} {diff[1][2]}"
                  if diff else f"{len(old_k)} layers were converted, the factory's model has {len(new_k)}")
        raise InputError(f"{where}: {maker} builds a different model than the one saved ({detail}). "
                         + ("Use the factory (and --factory-args) the artifact was made from." if maker == "the factory"
                            else "The artifact was edited or is corrupted."))
    sd_keys = manifest["weights"].get("state_dict_keys")
    have = list(rebuilt.state_dict().keys())
    if sd_keys is not None and set(sd_keys) != set(have):
        missing = sorted(set(sd_keys) - set(have))
        extra = sorted(set(have) - set(sd_keys))
        raise InputError(f"{where}: the factory's model has different tensors than the saved one "
                         f"(saved only: {missing[:3]}, factory only: {extra[:3]}). Use the original factory.")
    try:
        sd = {k: tensors[k] for k in (sd_keys or have)}
    except KeyError as exc:
        raise InputError(f"{where}: the weights lack the tensor {exc.args[0]!r}; the artifact is corrupted.") from None
    try:
        rebuilt.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise InputError(f"{where}: the saved weights do not fit the model: "
                         f"{printable(str(exc).strip().splitlines()[-1].strip())}") from exc
    rebuilt.train(bool(manifest.get("training", False)))
    _attach_plan(rebuilt, manifest)  # the original decisions and reasons, not the replay's
    return rebuilt


def _attach_plan(module: nn.Module, manifest: dict[str, Any]) -> None:
    from .api import PLAN_ATTR
    from .decision import Decision, Plan

    plan = manifest.get("plan")
    if not plan:
        return
    ds = []
    for d in plan["decisions"]:
        d = dict(d)
        d["weight_shape"] = tuple(d["weight_shape"])
        d["input_shape"] = None if d.get("input_shape") is None else tuple(d["input_shape"])
        ds.append(Decision(**{k: v for k, v in d.items() if k in Decision.__dataclass_fields__}))
    object.__setattr__(module, PLAN_ATTR, Plan(ds, plan["traced"], plan.get("capture_note"), list(plan.get("notes", []))))


def load(
    path: str | os.PathLike,
    factory: str | Callable[..., nn.Module] | nn.Module | None = None,
    *,
    factory_args: Any = None,
    source: str = "auto",
) -> nn.Module:
    """Load an artifact written by :func:`save`.  Nothing is unpickled, imported or evaluated from the files.

    ``source="auto"`` rebuilds from ``factory`` when one is given (a MODEL
    string such as ``"pkg.mod:make"``, a callable, or a freshly built original
    model); else, for a Hugging Face model, from its recorded class and config
    (``source="hf"``: the class is found only in transformers' own registry);
    else from the stored program (``source="program"``).  The factory and HF
    paths return the full converted model (trainable, ``densify``-able, of its
    own class); the program path an inference module that needs no source
    code.  A factory recorded in the manifest is never run on its own: it is
    code named by a file, so pass it explicitly if you trust the artifact.

    Example:
        >>> import torch, sparsify, tempfile, os
        >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(256, 256)), density=0.5)
        >>> out = sparsify.save(m, os.path.join(tempfile.mkdtemp(), "m"), example_inputs=torch.randn(2, 256))
        >>> x = torch.randn(3, 256)
        >>> torch.allclose(sparsify.load(out)(x), m(x))
        True
    """
    p = Path(path)
    if source == "exported":  # the name format 1 used
        source = "program"
    if source not in ("auto", "factory", "program", "hf"):
        raise InputError(f"load(source={source!r}): expected 'auto', 'factory', 'hf' or 'program'.")
    manifest = read_manifest(p)
    spec = manifest.get("model") or {}
    if source == "auto":
        source = "factory" if factory is not None else ("hf" if manifest.get("hf") else "program")
    if source == "program":
        return _load_program(p, manifest)
    if source == "hf":
        if not manifest.get("hf"):
            raise InputError(f"{path} is not a Hugging Face model (no class and config recorded).")
        from .model_spec import build_hf_model

        h = manifest["hf"]
        where = f"{path}/{ARTIFACT_MANIFEST}: field hf"
        # The config is read from the file: check on the meta device (no memory) that it builds the model
        # whose weights the artifact holds, before building it for real.
        try:
            with torch.device("meta"):
                skeleton = build_hf_model(h["config"], h["class"], where, seed=None)
            _check_hf_fits(skeleton, manifest, where)
            del skeleton
            model = build_hf_model(h["config"], h["class"], where, seed=int(spec.get("seed", 0)))
        except InputError as exc:  # transformers' own message may quote the recorded config's text
            raise InputError(printable(exc)) from exc.__cause__
        return _rebuild(manifest, model, _load_tensors(p, manifest), str(path), maker="its recorded config")
    if factory is None:
        raise InputError(f"load({str(path)!r}, source='factory') needs factory=: the recorded one is "
                         f"{spec.get('target')!r}; pass it if you trust the artifact.")
    where = str(path)
    if isinstance(factory, nn.Module):
        model = copy.deepcopy(factory)
    elif isinstance(factory, str):
        s = parse_model(factory, factory_args=factory_args if factory_args is not None else
                        (spec.get("factory_args") if _same_target(factory, spec) else None),
                        seed=int(spec.get("seed", 0)))
        if s.kind == "artifact":
            raise InputError(f"factory={factory!r} is an artifact; give the original model's factory.")
        model = s.build()
    elif callable(factory):
        model = factory(*(factory_args or [])) if not isinstance(factory_args, dict) else factory(**factory_args)
        if not isinstance(model, nn.Module):
            raise InputError(f"load(factory=...): the factory returned a {type(model).__name__}, expected an nn.Module.")
    else:
        raise InputError(f"load(factory=...): expected a MODEL string, a callable or an nn.Module. Got {type(factory).__name__}.")
    return _rebuild(manifest, model, _load_tensors(p, manifest), where)


def _same_target(factory: str, spec: dict[str, Any]) -> bool:
    return factory in (spec.get("target"), spec.get("target_abs"))


def _load_program(p: Path, manifest: dict[str, Any]) -> nn.Module:
    from .program import build_program

    spec = manifest.get("model") or {}
    rec = spec.get("target_abs") or spec.get("target")
    hint = (f" It was converted from {printable(rec)}: if you trust this artifact, pass that factory: "
            f"sparsify.load({str(p)!r}, factory={rec!r}) (CLI: --factory {printable(rec)}).") if rec and spec.get(
        "kind") == "factory" else " Pass the factory that builds the original model: sparsify.load(path, factory=...)."
    if manifest["format_version"] < 2 and manifest.get("exported"):
        raise InputError(f"{p} stores its program in format 1 (torch's private serde JSON), which sparsify no "
                         "longer loads because a crafted one could run code. Load it from the original factory and "
                         f"save it again to get a format-2 program: sparsify.save(sparsify.load({str(p)!r}, "
                         "factory=...), NEW_PATH, example_inputs=...) (CLI: sparsify convert MODEL -o NEW_PATH).")
    entry = manifest.get("program")
    if not entry:
        why = printable(manifest.get("program_note") or manifest.get("exported_note") or "it was saved without one")
        raise InputError(f"{p} has no stored program ({why}), so it must be rebuilt from the original model's "
                         f"factory.{hint}")
    data = _files.read_regular(p, PROGRAM_FILE, max_bytes=MAX_PROGRAM_BYTES, what="program")
    _check_bytes(p, PROGRAM_FILE, data, entry, "program")
    doc = _files.parse_json(data, f"{p / PROGRAM_FILE}")
    del data
    entries = doc.get("tensors") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise InputError(f"{p / PROGRAM_FILE}: field tensors: expected a list.")
    tensors = _load_tensors(p, manifest)
    picked = []
    for i, e in enumerate(entries):
        key = e.get("key") if isinstance(e, dict) else None
        t = tensors.get(key) if isinstance(key, str) else None
        if t is None:
            raise InputError(f"{p / PROGRAM_FILE}: field tensors[{i}].key: names no tensor of the weights file.")
        if (e.get("dtype", _dtype_name(t.dtype)) != _dtype_name(t.dtype)
                or e.get("shape", list(t.shape)) != list(t.shape)):
            raise InputError(f"{p / PROGRAM_FILE}: field tensors[{i}]: dtype or shape differs from the stored tensor.")
        picked.append(t)
    try:
        module = build_program(doc, picked)
    except InputError as exc:
        raise InputError(f"{p}/{printable(exc)}") from None
    _attach_plan(module, manifest)
    return module
