"""What a ``MODEL`` argument names, and how to build it: ``ModelSpec`` and ``InputSpec``.

A MODEL is one of

* ``package.module:factory`` or ``path/to/file.py:factory``: a callable that
  returns an ``nn.Module``, called with ``factory_args`` (JSON: a list of
  positional arguments or an object of keyword arguments);
* a Hugging Face ``config.json`` (or the folder holding it) with ``hf=True``:
  built offline with ``transformers`` from the config, with random weights
  unless ``weights`` names a safetensors file;
* a saved sparsify artifact (a folder with ``manifest.json``).

Models are built under ``torch.manual_seed(seed)`` so that a factory with
random initialisation builds the same weights every time (``verify`` compares
against a rebuilt original).  Every failure is an :class:`InputError` that
names the spec and says what to do.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError

__all__ = ["ModelSpec", "InputSpec", "parse_model", "parse_input_spec", "make_inputs", "ARTIFACT_MANIFEST"]

#: The file that marks a folder as a sparsify artifact.
ARTIFACT_MANIFEST = "manifest.json"

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float64": torch.float64, "double": torch.float64, "fp64": torch.float64,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "int": torch.int32,
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class InputSpec:
    """One positional input of the model: a shape and a dtype (integer inputs are token ids).

    Example:
        >>> parse_input_spec("2,16:int64")
        InputSpec(shape=(2, 16), dtype='int64')
    """

    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def with_batch(self, batch: int, where: str = "--batch") -> InputSpec:
        """The same input with ``batch`` rows, held to the same limits as ``--input-shape``."""
        if not self.shape:
            return self
        shape = (batch, *self.shape[1:])
        if batch > MAX_INPUT_ELEMENTS or math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise InputError(f"{where} {batch}: the input would be {','.join(map(str, shape))}, more than "
                             f"{MAX_INPUT_ELEMENTS} elements, too large for a random test input; give a smaller "
                             f"{where}.")
        return InputSpec(shape, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Any, where: str = "input spec") -> InputSpec:
        """An input spec read from a file, held to the same checks as ``--input-shape``."""
        if not isinstance(d, dict) or not isinstance(d.get("shape"), list):
            raise InputError(f"{where}: expected {{\"shape\": [...], \"dtype\": ...}}.")
        shape, dtype = d["shape"], d.get("dtype", "float32")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in shape) or not isinstance(dtype, str):
            raise InputError(f"{where}: the shape must be integers and the dtype a string.")
        return _checked_spec(tuple(shape), dtype, where, f"{','.join(map(str, shape))}:{dtype}"[:80])

    def __str__(self) -> str:
        s = ",".join(map(str, self.shape))
        return s if self.dtype == "float32" else f"{s}:{self.dtype}"


#: The most elements one random test input may have (1 GiB of float32): ``--input-shape`` and an
#: artifact's recorded inputs alike, so a manifest cannot make ``verify`` allocate terabytes.
MAX_INPUT_ELEMENTS = 2**28
#: The most dimensions one input may have.
MAX_INPUT_DIMS = 16


def _checked_spec(shape: tuple, dtype: str, where: str, text: str) -> InputSpec:
    dtype = dtype.strip().lower() or "float32"
    if dtype not in _DTYPES:
        raise InputError(f"{where} {text!r}: unknown dtype {dtype[:20]!r}. Use one of: "
                         f"{', '.join(sorted(set(_DTYPES)))}.")
    if not shape or len(shape) > MAX_INPUT_DIMS or any(s < 1 for s in shape):
        raise InputError(f"{where} {text!r}: expected 1 to {MAX_INPUT_DIMS} sizes >= 1, e.g. 8,3,224,224.")
    if any(s > MAX_INPUT_ELEMENTS for s in shape) or math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise InputError(f"{where} {text!r}: more than {MAX_INPUT_ELEMENTS} elements is too large for a random "
                         "test input; give a smaller shape (--input-shape).")
    return InputSpec(tuple(int(s) for s in shape), _dtype_name(_DTYPES[dtype]))


def parse_input_spec(text: str, where: str = "--input-shape") -> InputSpec:
    """``"8,3,224,224"`` or ``"2,16:int64"`` -> :class:`InputSpec`."""
    shape_text, _, dtype = text.strip().partition(":")
    parts = shape_text.split(",")
    if len(parts) > MAX_INPUT_DIMS or any(len(p.strip()) > 12 for p in parts):
        raise InputError(f"{where} {text[:80]!r}: expected 1 to {MAX_INPUT_DIMS} sizes, e.g. 8,3,224,224.")
    try:
        shape = tuple(int(s) for s in parts)
    except ValueError:
        raise InputError(f"{where} {text!r}: expected comma-separated integers, e.g. 8,3,224,224.") from None
    return _checked_spec(shape, dtype, where, text)


def make_inputs(specs: list[InputSpec], *, seed: int = 0, int_high: int = 2) -> tuple[torch.Tensor, ...]:
    """Random inputs for ``specs``: normal floats, integers in ``[0, int_high)`` (token ids)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in specs:
        if s is None:  # an optional positional input that was None
            out.append(None)
        elif s.torch_dtype.is_floating_point:
            out.append(torch.randn(s.shape, generator=g).to(s.torch_dtype))
        else:
            out.append(torch.randint(0, max(1, int_high), s.shape, generator=g, dtype=s.torch_dtype))
    return tuple(out)


def _is_artifact(path: Path) -> bool:
    return path.is_dir() and (path / ARTIFACT_MANIFEST).is_file()


@dataclass
class ModelSpec:
    """A resolvable description of a model; ``to_dict()`` goes into an artifact's manifest.

    ``kind`` is ``"factory"`` (``target`` is ``module:callable`` or ``file.py:callable``),
    ``"hf"`` (``target`` is a config.json) or ``"artifact"`` (``target`` is its folder).

    Example:
        >>> spec = parse_model("torch.nn:Identity")
        >>> type(spec.build()).__name__
        'Identity'
    """

    kind: str
    target: str
    factory_args: Any = None
    weights: str | None = None
    seed: int = 0
    #: Input shapes the factory suggests (its ``input_shape`` attribute), filled by ``build``.
    default_inputs: list[InputSpec] = field(default_factory=list)
    #: Upper bound for random integer inputs (an HF model's vocab_size).
    int_high: int = 2

    # ------------------------------------------------------------------ files
    def input_paths(self) -> list[Path]:
        """The user's files this spec reads (an output must never replace one)."""
        paths = []
        if self.kind == "factory":
            mod, _, _ = self.target.rpartition(":")
            if _looks_like_file(mod):
                paths.append(Path(mod))
        elif self.kind in ("hf", "artifact"):
            paths.append(Path(self.target))
        if self.weights:
            paths.append(Path(self.weights))
        return paths

    def describe(self) -> str:
        s = {"factory": "factory", "hf": "Hugging Face config", "artifact": "sparsify artifact"}[self.kind]
        return f"{s} {self.target}"

    # ------------------------------------------------------------- (de)serial
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "target": self.target, "seed": self.seed}
        if self.kind == "factory" and _looks_like_file(self.target.rpartition(":")[0]):
            d["target_abs"] = f"{os.path.abspath(self.target.rpartition(':')[0])}:{self.target.rpartition(':')[2]}"
        if self.kind == "hf":
            d["target_abs"] = os.path.abspath(self.target)
        if self.factory_args is not None:
            d["factory_args"] = self.factory_args
        if self.weights:
            d["weights"] = self.weights
            d["weights_abs"] = os.path.abspath(self.weights)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(kind=d["kind"], target=d["target"], factory_args=d.get("factory_args"),
                   weights=d.get("weights"), seed=int(d.get("seed", 0)))

    # ------------------------------------------------------------------ build
    def build(self) -> nn.Module:
        """Build the model (seeded); raises :class:`InputError` naming the spec on any failure."""
        if self.kind == "artifact":
            raise InputError(f"{self.target} is a saved sparsify artifact, not an original model; "
                             "give the model it was converted from (e.g. package.module:factory).")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = self._build_factory() if self.kind == "factory" else self._build_hf()
        if self.weights and self.kind == "factory":
            _load_weights(model, self.weights, self.target)
        return model

    def build_skeleton(self) -> nn.Module:
        """The model on the ``meta`` device, in eval mode, without weights: what streaming conversion
        (``sparsify.streaming``) fills one layer at a time from ``weights``.

        Example:
            >>> type(parse_model("torch.nn:Linear", factory_args=[4, 2]).build_skeleton().weight.device).__name__
            'device'
        """
        if self.kind == "artifact":
            raise InputError(f"{self.target} is a saved sparsify artifact, not an original model; "
                             "give the model it was converted from (e.g. package.module:factory).")
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            torch.manual_seed(self.seed)
            model = self._build_factory() if self.kind == "factory" else self._build_hf(load_weights=False)
        return model.eval()

    def _build_factory(self) -> nn.Module:
        fn = resolve_factory(self.target)
        args, kwargs = _split_args(self.factory_args, self.target)
        try:
            model = fn(*args, **kwargs)
        except Exception as exc:
            raise InputError(f"factory {self.target} raised {type(exc).__name__}: {_first_line(exc)}. "
                             "Fix the factory or its --factory-args.") from exc
        if not isinstance(model, nn.Module):
            raise InputError(f"factory {self.target} returned a {type(model).__name__}, expected a "
                             "torch.nn.Module. Make it return the model.")
        shapes = getattr(fn, "input_shape", None)
        if shapes is not None:
            shapes = [shapes] if isinstance(shapes, str) or (shapes and isinstance(shapes[0], int)) else list(shapes)
            self.default_inputs = [
                s if isinstance(s, InputSpec) else parse_input_spec(s, f"{self.target}.input_shape")
                if isinstance(s, str) else InputSpec(tuple(s)) for s in shapes]
        return model

    def _build_hf(self, load_weights: bool = True) -> nn.Module:
        path = Path(self.target)
        cfg_file = path / "config.json" if path.is_dir() else path
        if not cfg_file.is_file():
            raise InputError(f"--hf {self.target}: no such file{' (no config.json in the folder)' if path.is_dir() else ''}.")
        from .files import parse_json, read_regular

        cfg_dict = parse_json(read_regular(cfg_file.parent, cfg_file.name, max_bytes=16 * 2**20, what="config"),
                              f"--hf {cfg_file}")
        if not isinstance(cfg_dict, dict) or "model_type" not in cfg_dict:
            raise InputError(f"--hf {cfg_file}: no \"model_type\" key; expected a Hugging Face config.json.")
        archs = cfg_dict.get("architectures")
        name = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
        model = build_hf_model(cfg_dict, name, f"--hf {cfg_file}", seed=None)
        config = model.config
        self.int_high = int(getattr(config, "vocab_size", 2) or 2)
        self.default_inputs = _hf_default_inputs(model)
        if self.weights and load_weights:
            _load_weights(model, self.weights, str(cfg_file))
        return model


#: Config keys that make transformers fetch or run code from elsewhere; refused in any config sparsify reads.
_HF_REFUSED = {
    "auto_map": "it names remote code",
    "trust_remote_code": "sparsify never trusts remote code",
    "quantization_config": "quantizers load extra code and weights",
    "use_pretrained_backbone": "it downloads a backbone's weights",
}
_HF_ATTENTION = {None, "eager", "sdpa"}


def _check_hf_config(d: Any, where: str, depth: int = 0) -> None:
    if depth > 8:
        raise InputError(f"{where}: sub-configs nested deeper than 8.")
    for k, v in d.items():
        if k in _HF_REFUSED and v not in (None, False, {}, []):
            raise InputError(f"{where}: key {k!r} is refused ({_HF_REFUSED[k]}).")
        if k in ("attn_implementation", "_attn_implementation") and not (v is None or (isinstance(v, str)
                                                                                 and v in _HF_ATTENTION)):
            raise InputError(f"{where}: {k}={str(v)[:40]!r} is refused; sparsify builds with 'eager' or 'sdpa' only "
                             "(other implementations may fetch kernels).")
        if k in ("dtype", "torch_dtype") and v is not None and not (isinstance(v, str) and (v in _DTYPES
                                                                                            or v == "auto")):
            raise InputError(f"{where}: {k}={str(v)[:40]!r} is not a dtype name.")
        if isinstance(v, dict):
            _check_hf_config(v, f"{where}.{k}", depth + 1)


def _hf_mappings() -> list[Any]:
    """transformers' own auto-class registries (MODEL_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, ...)."""
    import re

    from transformers.models.auto import modeling_auto

    names = sorted(n for n in dir(modeling_auto) if re.fullmatch(r"MODEL_(FOR_[A-Z0-9_]+_|WITH_LM_HEAD_)?MAPPING", n))
    names.remove("MODEL_MAPPING")
    return [modeling_auto.MODEL_MAPPING] + [getattr(modeling_auto, n) for n in names]


def hf_model_class(config: Any, class_name: str | None, where: str) -> type:
    """The model class ``class_name`` for ``config``, found only among the values of transformers'
    auto-class registries for that config class (never imported by name); the base model when None."""
    candidates: list[type] = []
    for mapping in _hf_mappings():
        try:
            found = mapping[type(config)]
        except Exception:  # not registered for this config class, or its module needs a missing package
            continue
        for c in found if isinstance(found, (tuple, list)) else (found,):
            if class_name is None:
                return c
            if isinstance(c, type) and c.__name__ == class_name:
                return c
            if isinstance(c, type) and c not in candidates:
                candidates.append(c)
    if class_name is None:
        raise InputError(f"{where}: transformers has no model class for {type(config).__name__}.")
    known = ", ".join(sorted(c.__name__ for c in candidates)[:12]) or "none"
    raise InputError(f"{where}: {class_name[:80]!r} is not a model class transformers registers for "
                     f"{type(config).__name__} (registered: {known}).")


def build_hf_model(config_dict: Any, class_name: str | None, where: str, *, seed: int | None = 0) -> nn.Module:
    """Build a Hugging Face model from a config dict and a class name, offline, without remote code.

    The config is checked for keys that fetch or run code (:data:`_HF_REFUSED`),
    the class is looked up by :func:`hf_model_class`, and the model is built
    with random weights (under ``torch.manual_seed(seed)`` unless seed is None).
    """
    if not isinstance(config_dict, dict) or not isinstance(config_dict.get("model_type"), str):
        raise InputError(f"{where}: no \"model_type\" key; expected a Hugging Face config.")
    _check_hf_config(config_dict, where)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise InputError("Hugging Face models need the transformers package: pip install 'sparsify[hf]'.") from None
    try:
        config = transformers.AutoConfig.for_model(**config_dict)
    except Exception as exc:
        raise InputError(f"{where}: transformers could not read the config ({type(exc).__name__}: "
                         f"{_first_line(exc)[:200]}).") from None
    cls = hf_model_class(config, class_name, where)
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model = cls(config)
    except Exception as exc:
        raise InputError(f"{where}: transformers could not build {cls.__name__} from the config "
                         f"({type(exc).__name__}: {_first_line(exc)[:200]}).") from exc
    return model


def _hf_default_inputs(model: nn.Module) -> list[InputSpec]:
    """Random inputs for a Hugging Face model's main input, from its config (none if unknown)."""
    cfg = model.config
    name = getattr(model, "main_input_name", "input_ids")
    if name == "input_ids":
        return [InputSpec((2, 16), "int64")]
    if name == "pixel_values":
        size = getattr(cfg, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
        return [InputSpec((2, int(getattr(cfg, "num_channels", 3)), int(h), int(w)))]
    if name == "input_values":
        return [InputSpec((2, 4000))]
    return []


def _first_line(exc: BaseException) -> str:
    s = str(exc).strip()
    return s.splitlines()[0] if s else "(no message)"


def _split_args(args: Any, target: str) -> tuple[list, dict]:
    if args is None:
        return [], {}
    if isinstance(args, list):
        return args, {}
    if isinstance(args, dict):
        return [], args
    raise InputError(f"--factory-args for {target}: expected a JSON list (positional) or object (keyword). "
                     f"Got {type(args).__name__}.")


def _load_weights(model: nn.Module, path: str, what: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        from .files import not_a_file

        raise InputError(f"--weights {path}: {not_a_file(path)}.")
    if str(path).endswith(".json"):  # a sharded checkpoint's index (model.safetensors.index.json)
        from .streaming import CheckpointReader

        reader = CheckpointReader(path)
        sd = {n: reader.get(n) for n in reader.names()}
    else:
        try:
            sd = load_file(path)
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"--weights {path}: not a readable safetensors file ({_first_line(exc)}).") from None
    bad = next((k for k, t in sd.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise InputError(f"--weights {path}: tensor {bad!r} holds NaN or inf values; a converted model would "
                         "compute garbage from them. Check the checkpoint (was training diverging?).")
    tied: dict[int, list[str]] = {}
    for n, t in model.state_dict(keep_vars=True).items():
        tied.setdefault(id(t), []).append(n)
    for names in tied.values():
        given = [n for n in names if n in sd]
        for n in given[1:]:
            if sd[n].shape == sd[given[0]].shape and not torch.equal(sd[n], sd[given[0]]):
                raise InputError(f"--weights {path}: {given[0]!r} and {n!r} are one tied tensor in {what}, but "
                                 "the checkpoint holds different values for them. Keep one of them (or make "
                                 "them equal).")
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shape mismatches
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise InputError(f"--weights {path} does not fit {what}: {(lines or [_first_line(exc)])[0][:300]}") from None
    # As transformers does: a checkpoint may carry a buffer the model does not persist (a stale
    # ``embeddings.position_ids``), and may omit a weight tied to one it has (an LM head).
    persistent = set(model.state_dict().keys())
    non_persistent = {n for n, _ in model.named_buffers(remove_duplicate=False)} - persistent
    extra = [k for k in result.unexpected_keys if k not in non_persistent]
    loaded = set(sd) & persistent
    names_of: dict[int, list[str]] = {}
    for n, t in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(t), []).append(n)
    tied_ok = {n for names in names_of.values() if set(names) & loaded for n in names}
    miss = [k for k in result.missing_keys if k not in tied_ok]
    if miss or extra:
        raise InputError(
            f"--weights {path} does not fit {what}: {len(miss)} missing keys"
            f"{' (' + ', '.join(miss[:3]) + (' ...' if len(miss) > 3 else '') + ')' if miss else ''}, "
            f"{len(extra)} unexpected{' (' + ', '.join(extra[:3]) + (' ...' if len(extra) > 3 else '') + ')' if extra else ''}."
            " Check that the weights belong to this model."
        )


def _looks_like_file(mod: str) -> bool:
    return mod.endswith(".py") or "/" in mod or os.sep in mod


def _load_file_module(file: str, target: str):
    path = Path(file)
    if not path.is_file():
        raise InputError(f"{target}: no such file {file!r}.")
    name = f"_sparsify_model_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"{target}: cannot import {file!r} as a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise InputError(f"{target}: importing {file} raised {type(exc).__name__}: {_first_line(exc)}.") from exc
    return module


def resolve_factory(target: str) -> Callable[..., Any]:
    """``module:callable`` or ``file.py:callable`` -> the callable (imports it)."""
    mod_name, sep, attr = target.rpartition(":")
    if not sep or not mod_name or not attr:
        raise InputError(f"{target!r}: expected package.module:factory or path/to/file.py:factory.")
    if _looks_like_file(mod_name):
        module = _load_file_module(mod_name, target)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name and (mod_name == exc.name or mod_name.startswith(exc.name + ".")):
                raise InputError(f"{target}: no module named {exc.name!r}. Check the spelling, or give "
                                 "a file path (path/to/file.py:factory).") from None
            raise InputError(f"{target}: importing {mod_name} failed: {exc}.") from exc
        except Exception as exc:
            raise InputError(f"{target}: importing {mod_name} raised {type(exc).__name__}: {_first_line(exc)}.") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            hint = f" It defines: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}." if names else ""
            raise InputError(f"{target}: {mod_name} has no attribute {attr!r}.{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"{target}: {attr!r} is a {type(obj).__name__}, not a callable that returns a model.")
    return obj


def parse_model(
    text: str, *, hf: bool = False, factory_args: str | Any | None = None, weights: str | None = None,
    seed: int = 0,
) -> ModelSpec:
    """Parse a MODEL argument (without building it).  ``factory_args`` may be JSON text."""
    if isinstance(factory_args, str):
        try:
            factory_args = json.loads(factory_args)
        except json.JSONDecodeError as exc:
            raise InputError(f"--factory-args {factory_args!r}: not valid JSON ({exc.msg} at column {exc.colno}). "
                             'Example: --factory-args \'{"hidden": 256}\'.') from None
    if weights is not None and not Path(weights).is_file():
        from .files import not_a_file

        raise InputError(f"--weights {weights}: {not_a_file(weights)}.")
    path = Path(text)
    if hf:
        if not path.exists():
            raise InputError(f"--hf {text}: no such file or folder.")
        return ModelSpec("hf", text, weights=weights, seed=seed)
    if _is_artifact(path):
        return ModelSpec("artifact", text, seed=seed)
    if path.is_file() and path.suffix == ".json":
        raise InputError(f"{text} is a JSON file: for a Hugging Face config add --hf.")
    if path.is_dir():
        if (path / "config.json").is_file():
            raise InputError(f"{text} holds a config.json: for a Hugging Face model add --hf.")
        raise InputError(f"{text} is a folder without {ARTIFACT_MANIFEST}: not a sparsify artifact.")
    mod, sep, attr = text.rpartition(":")
    if not sep:
        if path.suffix == ".py":
            raise InputError(f"{text}: name the factory too, e.g. {text}:make_model.")
        if not path.exists() and ("/" in text or text.endswith((".json", ".safetensors"))):
            raise InputError(f"{text}: no such file or folder.")
        raise InputError(f"{text!r}: expected package.module:factory, path/to/file.py:factory, "
                         "a config.json with --hf, or a sparsify artifact folder.")
    if _looks_like_file(mod) and not Path(mod).is_file():
        raise InputError(f"{text}: no such file {mod!r}.")
    return ModelSpec("factory", text, factory_args=factory_args, weights=weights, seed=seed)
