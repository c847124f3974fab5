"""Saved models: ``save(module, path)`` and ``load(path)``.  The format is in docs/saved_models.md.

An artifact is a folder::

    OUT/
      manifest.json        format version, versions, the model spec, the config, the
                           input shapes, the plan (decisions), layouts, tensor table,
                           checksums
      weights.safetensors  the converted model's state_dict (plus the exported
                           program's constants), shared tensors stored once
      program.json         optional: the torch.export graph (see sparsify.exported)

It is written into a temporary folder beside OUT and renamed into place, so a
crash or Ctrl-C never leaves a half-written OUT.  Loading reads JSON and
safetensors only: nothing is unpickled.  ``load`` rebuilds the model either
from the stored program (no source needed) or from the original factory
(re-running the saved decisions, then ``load_state_dict(strict=True)``).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError
from .model_spec import ARTIFACT_MANIFEST, InputSpec, ModelSpec, make_inputs, parse_model

__all__ = ["save", "load", "read_manifest", "FORMAT", "FORMAT_VERSION", "check_output_path", "atomic_write"]

FORMAT = "sparsify.artifact"
#: Bumped when a reader of an older version could not read the new layout correctly.
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
PROGRAM_FILE = "program.json"
_EXPORTED_PREFIX = "__exported__."
_CHUNK = 1 << 20


# ---------------------------------------------------------------------- helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (str, int, float, bool)) or o is None:
        return o
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    return repr(o)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def is_artifact(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not (p / ARTIFACT_MANIFEST).is_file():
        return False
    try:
        return json.loads((p / ARTIFACT_MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *, force: bool = False) -> Path:
    """Refuse an OUT that is an input (or holds one), or that exists without ``force``.

    With ``force`` an existing OUT is replaced only if it is a sparsify artifact
    or an empty folder: a user's other files are never deleted.
    """
    out_p = Path(out)
    out_abs = out_p.resolve()
    for inp in inputs:
        ip = Path(inp).resolve()
        if ip == out_abs or out_abs in ip.parents:
            raise InputError(f"output {out} is the input {inp}{' (or holds it)' if ip != out_abs else ''}; "
                             "choose another output path. sparsify never overwrites its input.")
    if out_p.exists() or out_p.is_symlink():
        if not force:
            raise InputError(f"output {out} exists; pass --force (overwrite=True) to replace it.")
        if out_p.is_symlink() or not (is_artifact(out_p) or (out_p.is_dir() and not any(out_p.iterdir()))):
            raise InputError(f"output {out} exists and is not a sparsify artifact; refusing to replace it "
                             "even with --force. Remove it yourself or choose another path.")
    if not out_p.parent.resolve().is_dir():
        raise InputError(f"output {out}: the folder {out_p.parent} does not exist.")
    return out_p


def _sibling(path: Path, kind: str) -> Path:
    """A fresh hidden name beside ``path`` (``.NAME.kind-PID-RANDOM``), not yet created."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(6)}"


@contextlib.contextmanager
def _staging_dir(out: Path):
    """A temporary folder beside ``out``; removed unless renamed into place."""
    # The name is chosen before the folder exists, so an interrupt that lands just
    # after the mkdir (inside tempfile.mkdtemp it would) still knows what to remove.
    tmp = _sibling(out, "tmp")
    ours = True
    try:
        try:
            tmp.mkdir(mode=0o700)
        except FileExistsError:
            ours = False  # never remove a folder this call did not make
            raise
        yield tmp
    finally:
        if ours and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` is moved aside first and removed after."""
    _fsync_dir(tmp)
    if out.exists():
        old = _sibling(out, "old")
        os.rename(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    _fsync_dir(out.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write a file via a temporary file beside it and ``os.replace``."""
    p = Path(path)
    tmp = _sibling(p, "tmp")
    ours = True
    try:
        try:  # O_EXCL: the name is ours only if this call creates it
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            ours = False
            raise
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        if ours and tmp.exists():
            tmp.unlink()


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
    before_commit: Callable[[], None] | None = None,
) -> Path:
    """Save a converted model as an artifact folder at ``path`` (atomically).

    ``model_spec`` (how to rebuild the original model), ``config`` and
    ``example_inputs`` are recorded when given; with example inputs and
    ``export=True`` a ``torch.export`` program is stored too, so ``load`` needs
    no source.  An existing ``path`` needs ``overwrite=True`` and must be an
    artifact.  ``before_commit`` is called just before the finished folder is
    renamed into place (the CLI holds Ctrl-C from there on).

    Example:
        >>> import torch, sparsify, tempfile, os
        >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(256, 256)), density=0.5)
        >>> out = sparsify.save(m, os.path.join(tempfile.mkdtemp(), "m"), export=False)
        >>> sorted(os.listdir(out))
        ['manifest.json', 'weights.safetensors']
    """
    from safetensors.torch import save_file

    from . import __version__
    from .api import PLAN_ATTR
    from .decision import Plan

    if not isinstance(module, nn.Module):
        raise InputError(f"save: expected an nn.Module. Got {type(module).__name__}.")
    out = check_output_path(path, force=overwrite)
    plan = getattr(module, PLAN_ATTR, None)
    if isinstance(model_spec, ModelSpec):
        model_spec = model_spec.to_dict()
    if config is not None and hasattr(config, "to_dict"):
        config = config.to_dict()
    if example_inputs is not None and isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)

    state = module.state_dict()
    # Everything happens inside the staging folder, so an interrupt at any point leaves no OUT.
    with _staging_dir(out) as tmp:
        tensors, aliases = _dedupe(dict(state))
        exported: dict[str, Any] | None = None
        exported_note = None
        program = None
        if export and example_inputs is None:
            exported_note = "no example inputs were given, so no program was exported"
        elif export:
            from .exported import export_program

            try:
                program, ep_state, ep_consts = export_program(module, tuple(example_inputs))
            except Exception as exc:  # export is optional: record why not
                exported_note = f"torch.export failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            else:
                mapping: dict[str, str] = {}
                by_ptr = {(t.data_ptr(), tuple(t.shape)): k for k, t in state.items() if t.numel()}
                for k, t in list(ep_state.items()) + [(f"const:{k}", t) for k, t in ep_consts.items()]:
                    src = by_ptr.get((t.data_ptr(), tuple(t.shape))) if t.numel() else None
                    if src is not None:
                        mapping[k] = aliases.get(src, src)
                    else:
                        key = _EXPORTED_PREFIX + k
                        tensors[key] = t.detach().to("cpu").contiguous().clone()
                        mapping[k] = key
                exported = {"file": PROGRAM_FILE, "tensors": mapping}

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
            "config": _jsonable(config),
            "inputs": None if example_inputs is None else [
                {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in example_inputs],
            "training": module.training,
            "plan": None if not isinstance(plan, Plan) else {
                "traced": plan.traced, "capture_note": plan.capture_note, "notes": list(plan.notes),
                "decisions": [_jsonable(d.to_dict()) for d in plan.decisions]},
            "layouts": layouts,
            "weights": None,
            "exported": exported,
            "exported_note": exported_note,
            **(extra or {}),
        }
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        manifest["weights"] = {
            "file": WEIGHTS_FILE, "sha256": _sha256(tmp / WEIGHTS_FILE), "bytes": (tmp / WEIGHTS_FILE).stat().st_size,
            "tensors": {k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
                        for k, t in tensors.items()},
            "aliases": aliases,
            "state_dict_keys": list(state.keys()),
        }
        if program is not None:
            _write_bytes(tmp / PROGRAM_FILE, program)
            manifest["exported"]["sha256"] = hashlib.sha256(program).hexdigest()
            manifest["exported"]["bytes"] = len(program)
        _write_bytes(tmp / ARTIFACT_MANIFEST, json.dumps(manifest, indent=1).encode())
        if before_commit is not None:
            before_commit()
        _replace_dir(tmp, out)
    return out


# ------------------------------------------------------------------------ load
def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the artifact at ``path``, checked for format and version."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: no such file or folder.")
    if not p.is_dir() or not (p / ARTIFACT_MANIFEST).is_file():
        raise InputError(f"{path}: not a sparsify artifact (no {ARTIFACT_MANIFEST}).")
    try:
        m = json.loads((p / ARTIFACT_MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}/{ARTIFACT_MANIFEST}: corrupted, not valid JSON ({exc}).") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise InputError(f"{path}/{ARTIFACT_MANIFEST}: not a sparsify manifest (format is not {FORMAT!r}).")
    v = m.get("format_version")
    if not isinstance(v, int):
        raise InputError(f"{path}/{ARTIFACT_MANIFEST}: corrupted, no integer format_version.")
    if v > FORMAT_VERSION:
        raise InputError(f"{path} was written in artifact format version {v} by sparsify "
                         f"{m.get('sparsify_version', '?')}; this sparsify reads up to version {FORMAT_VERSION}. "
                         "Upgrade sparsify to load it.")
    if not isinstance(m.get("weights"), dict) or "sha256" not in m["weights"]:
        raise InputError(f"{path}/{ARTIFACT_MANIFEST}: corrupted, no weights entry.")
    return m


def _read_checked(path: Path, entry: dict[str, Any], what: str) -> bytes | None:
    f = path / entry["file"]
    if os.path.basename(entry["file"]) != entry["file"]:
        raise InputError(f"{path}: the manifest names a file outside the artifact ({entry['file']!r}).")
    if not f.is_file():
        raise InputError(f"{path}: {entry['file']} is missing; the artifact is incomplete.")
    size = f.stat().st_size
    if size != entry.get("bytes", size):
        raise InputError(f"{f}: {size} bytes, the manifest says {entry['bytes']}: the file is truncated "
                         "or was replaced. Re-create the artifact.")
    if _sha256(f) != entry["sha256"]:
        raise InputError(f"{f}: checksum mismatch (sha256 differs from the manifest's): the {what} are "
                         "corrupted. Re-create the artifact.")
    return None


def _load_tensors(path: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    w = manifest["weights"]
    _read_checked(path, w, "weights")
    try:
        tensors = load_file(str(path / w["file"]))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path / w['file']}: not a readable safetensors file ({exc}).") from None
    for k, meta in w.get("tensors", {}).items():
        t = tensors.get(k)
        if t is None or list(t.shape) != meta["shape"] or str(t.dtype).removeprefix("torch.") != meta["dtype"]:
            raise InputError(f"{path / w['file']}: tensor {k!r} does not match the manifest; the artifact is corrupted.")
    for alias, src in w.get("aliases", {}).items():
        tensors[alias] = tensors[src]
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
    params = {k: v for k, v in (d.get("params") or {}).items() if k in spec.defaults}
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


def _rebuild(manifest: dict[str, Any], model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    from .api import sparsify
    from .config import Rule, SparsifyConfig

    plan = manifest.get("plan")
    if not plan:
        raise InputError(f"{where}: the artifact holds no plan (decisions), so it cannot be rebuilt from a "
                         "factory; it was not saved from a model made by sparsify().")
    saved = plan["decisions"]
    rules = []
    for d in saved:
        if d["method"] == "dense":
            rules.append(Rule(_escape_glob(d["name"]), skip=True))
        else:
            rules.append(Rule(_escape_glob(d["name"]), method=d["method"], **_replay_params(d)))
    cfg = manifest.get("config") or {}
    fold = cfg.get("fold_batchnorm", any(n.startswith("folded BatchNorm") for n in plan.get("notes", [])))
    config = SparsifyConfig(rules=rules, min_size=0, fold_batchnorm=fold,
                            fuse_epilogues=cfg.get("fuse_epilogues", True))
    inputs = None
    if manifest.get("inputs"):
        inputs = make_inputs([InputSpec.from_dict(s) for s in manifest["inputs"]], int_high=1)
    model.train(bool(manifest.get("training", False)))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the capture warning was shown when the model was converted
        try:
            rebuilt = sparsify(model, config, example_inputs=inputs, inplace=True)
        except ValueError as exc:
            raise InputError(f"{where}: the factory's model does not fit the artifact: {exc}") from exc
    new = rebuilt._sparsify_plan.decisions
    key = lambda d: (d["name"], d["method"], list(d["weight_shape"]))  # noqa: E731
    old_k = [key(d) for d in saved]
    new_k = [key(d.to_dict()) for d in new]
    if old_k != new_k:
        diff = next(((a, b) for a, b in zip(old_k, new_k) if a != b), None)
        detail = (f"layer {diff[0][0]!r} was {diff[0][1]} {diff[0][2]}, now {diff[1][0]!r} {diff[1][1]} {diff[1][2]}"
                  if diff else f"{len(old_k)} layers were converted, the factory's model has {len(new_k)}")
        raise InputError(f"{where}: the factory builds a different model than the one saved ({detail}). "
                         "Use the factory (and --factory-args) the artifact was made from.")
    sd_keys = manifest["weights"].get("state_dict_keys")
    have = list(rebuilt.state_dict().keys())
    if sd_keys is not None and set(sd_keys) != set(have):
        missing = sorted(set(sd_keys) - set(have))
        extra = sorted(set(have) - set(sd_keys))
        raise InputError(f"{where}: the factory's model has different tensors than the saved one "
                         f"(saved only: {missing[:3]}, factory only: {extra[:3]}). Use the original factory.")
    sd = {k: tensors[k] for k in (sd_keys or have)}
    try:
        rebuilt.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise InputError(f"{where}: the saved weights do not fit the factory's model: "
                         f"{str(exc).strip().splitlines()[-1].strip()}") from exc
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
    """Load an artifact written by :func:`save`.  Nothing is unpickled.

    ``source="auto"`` rebuilds from ``factory`` when one is given (a MODEL
    string such as ``"pkg.mod:make"``, a callable, or a freshly built original
    model), else from the stored exported program.  The factory path returns
    the full converted model (trainable, ``densify``-able); the exported path
    an inference module (eval mode) that needs no source code.  The factory
    recorded in the manifest is never run on its own: it is code named by a
    file, so pass it explicitly if you trust the artifact.

    Example:
        >>> import torch, sparsify, tempfile, os
        >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(256, 256)), density=0.5)
        >>> out = sparsify.save(m, os.path.join(tempfile.mkdtemp(), "m"), example_inputs=torch.randn(2, 256))
        >>> x = torch.randn(3, 256)
        >>> torch.allclose(sparsify.load(out)(x), m(x))
        True
    """
    p = Path(path)
    manifest = read_manifest(p)
    if source not in ("auto", "factory", "exported"):
        raise InputError(f"load(source={source!r}): expected 'auto', 'factory' or 'exported'.")
    tensors = _load_tensors(p, manifest)
    exported = manifest.get("exported")
    spec = manifest.get("model") or {}
    if source == "exported" or (source == "auto" and factory is None):
        if not exported:
            why = manifest.get("exported_note") or "it was saved without one"
            rec = spec.get("target_abs") or spec.get("target")
            hint = (f" It was converted from {rec}: if you trust this artifact, pass that factory: "
                    f"sparsify.load({str(path)!r}, factory={rec!r}) (CLI: --factory {rec}).") if rec else \
                " Pass the factory that builds the original model: sparsify.load(path, factory=...)."
            raise InputError(f"{path} has no exported program ({why}), so it must be rebuilt from the "
                             f"original model's factory.{hint}")
        return _load_exported(p, manifest, tensors)
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
    return _rebuild(manifest, model, tensors, where)


def _same_target(factory: str, spec: dict[str, Any]) -> bool:
    return factory in (spec.get("target"), spec.get("target_abs"))


def _load_exported(p: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    from . import exported as exp

    entry = manifest["exported"]
    _read_checked(p, entry, "exported program")
    data = (p / entry["file"]).read_bytes()
    if (manifest.get("model") or {}).get("kind") == "hf":
        with contextlib.suppress(ImportError):
            import transformers  # noqa: F401  (registers its output types with torch's pytree)
    state, consts = {}, {}
    for k, src in entry["tensors"].items():
        if src not in tensors:
            raise InputError(f"{p}: the exported program needs tensor {src!r}, which the weights lack; corrupted.")
        if k.startswith("const:"):
            consts[k[len("const:"):]] = tensors[src]
        else:
            state[k] = tensors[src]
    try:
        module = exp.program_from_json(data, state, consts)
    except InputError as exc:
        raise InputError(f"{p / entry['file']}: {exc}") from None
    except Exception as exc:
        raise InputError(f"{p / entry['file']}: torch {torch.__version__} could not load the exported program "
                         f"({type(exc).__name__}: {str(exc).strip()[:200]}); it was saved with torch "
                         f"{manifest.get('torch_version')}. Rebuild from the factory instead (factory=...).") from exc
    _attach_plan(module, manifest)
    return module
