"""The one schema of an artifact's ``manifest.json``, checked field by field.

Every load path (``load``, ``inspect``, ``verify``, ``bench``) reads the manifest
through :func:`validate_manifest`; a wrong type, a missing key, a list where an
object belongs, a number out of range or a string too long is an
:class:`~sparsify.errors.InputError` that names the field
(``manifest.json: field weights.bytes: expected an integer in [0, ...], got '5'``).
Keys this sparsify does not know are allowed (a newer writer may add optional
ones) but still bounded: the JSON parser has already refused deep nesting and
files over :data:`MAX_MANIFEST_BYTES`.  What a message quotes from the manifest
(a value, a key in the field's path) is quoted printable (``repr``,
:func:`sparsify.report.printable`): a crafted manifest puts no terminal escape or
newline into an error.

Example:
    >>> validate_manifest({"format": "sparsify.artifact", "format_version": "2"}, "m")
    Traceback (most recent call last):
    ...
    sparsify.errors.InputError: m/manifest.json: field format_version: expected an integer in [1, 1000], got '2'
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import InputError
from .report import printable

__all__ = ["validate_manifest", "MAX_MANIFEST_BYTES", "MAX_PROGRAM_BYTES", "MAX_TENSOR_ENTRIES", "Spec"]

MAX_MANIFEST_BYTES = 16 * 2**20
MAX_PROGRAM_BYTES = 64 * 2**20
MAX_TENSOR_ENTRIES = 1_000_000
MAX_DECISIONS = 100_000
_BIG = 2**63 - 1


class Spec:
    desc = "a value"

    def check(self, v: Any, path: str, where: str) -> Any:
        return v

    def fail(self, v: Any, path: str, where: str, why: str | None = None) -> InputError:
        shown = repr(v) if isinstance(v, (int, float, str, bool)) or v is None else (
            "a list" if isinstance(v, list) else "an object" if isinstance(v, dict) else type(v).__name__)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return InputError(f"{where}/manifest.json: field {printable(path)}: {why or 'expected ' + self.desc}, "
                          f"got {shown}")


class Json(Spec):
    desc = "any JSON value"


class Str(Spec):
    def __init__(self, max_len: int = 4096, pattern: str | None = None) -> None:
        self.max_len = max_len
        self.pattern = re.compile(pattern) if pattern else None
        self.desc = f"a string of at most {max_len} characters" + (f" matching {pattern}" if pattern else "")

    def check(self, v, path, where):
        if not isinstance(v, str) or len(v) > self.max_len or (self.pattern and not self.pattern.fullmatch(v)):
            raise self.fail(v, path, where)
        return v


class Int(Spec):
    def __init__(self, lo: int = 0, hi: int = _BIG) -> None:
        self.lo, self.hi = lo, hi
        self.desc = f"an integer in [{lo}, {hi}]"

    def check(self, v, path, where):
        if isinstance(v, bool) or not isinstance(v, int) or not self.lo <= v <= self.hi:
            raise self.fail(v, path, where)
        return v


class Number(Spec):
    desc = "a finite number"

    def check(self, v, path, where):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(v, path, where)
        return v


class Bool(Spec):
    desc = "true or false"

    def check(self, v, path, where):
        if not isinstance(v, bool):
            raise self.fail(v, path, where)
        return v


class Const(Spec):
    def __init__(self, value: Any) -> None:
        self.value = value
        self.desc = repr(value)

    def check(self, v, path, where):
        if type(v) is not type(self.value) or v != self.value:
            raise self.fail(v, path, where)
        return v


class Enum(Spec):
    def __init__(self, *values: str) -> None:
        self.values = values
        self.desc = "one of " + ", ".join(map(repr, values))

    def check(self, v, path, where):
        if not isinstance(v, str) or v not in self.values:
            raise self.fail(v, path, where)
        return v


class Opt(Spec):
    def __init__(self, inner: Spec) -> None:
        self.inner = inner
        self.desc = f"null or {inner.desc}"

    def check(self, v, path, where):
        return None if v is None else self.inner.check(v, path, where)


class List(Spec):
    def __init__(self, item: Spec, max_len: int = 100_000) -> None:
        self.item, self.max_len = item, max_len
        self.desc = f"a list of at most {max_len} entries"

    def check(self, v, path, where):
        if not isinstance(v, list) or len(v) > self.max_len:
            raise self.fail(v, path, where)
        for i, x in enumerate(v):
            self.item.check(x, f"{path}[{i}]", where)
        return v


class Map(Spec):
    def __init__(self, value: Spec, max_len: int = 1_000_000, key_max: int = 1024) -> None:
        self.value, self.max_len, self.key_max = value, max_len, key_max
        self.desc = f"an object of at most {max_len} entries"

    def check(self, v, path, where):
        if not isinstance(v, dict) or len(v) > self.max_len:
            raise self.fail(v, path, where)
        for k, x in v.items():
            if len(k) > self.key_max:
                raise self.fail(k, path, where, f"key longer than {self.key_max} characters")
            self.value.check(x, f"{path}.{k}", where)
        return v


class Obj(Spec):
    """An object with known fields (``required`` must be present); unknown keys allowed unless ``closed``."""

    desc = "an object"

    def __init__(self, fields: dict[str, Spec], required: tuple[str, ...] = (), closed: bool = False) -> None:
        self.fields, self.required, self.closed = fields, required, closed

    def check(self, v, path, where):
        if not isinstance(v, dict):
            raise self.fail(v, path, where)
        for k in self.required:
            if k not in v:
                raise InputError(f"{where}/manifest.json: field {printable(f'{path}.{k}' if path else k)}: missing")
        for k, x in v.items():
            spec = self.fields.get(k)
            if spec is None:
                if self.closed:
                    raise InputError(f"{where}/manifest.json: field {printable(f'{path}.{k}' if path else k)}: "
                                     "unknown key")
                continue
            spec.check(x, f"{path}.{k}" if path else k, where)
        return v


class All(Spec):
    """Every one of ``specs`` holds (a size-bounded map whose known keys are typed)."""

    def __init__(self, *specs: Spec) -> None:
        self.specs = specs
        self.desc = specs[0].desc

    def check(self, v, path, where):
        for s in self.specs:
            s.check(v, path, where)
        return v


class AnyOf(Spec):
    """One of ``specs`` holds."""

    def __init__(self, *specs: Spec) -> None:
        self.specs = specs
        self.desc = " or ".join(s.desc for s in specs)

    def check(self, v, path, where):
        for s in self.specs:
            try:
                return s.check(v, path, where)
            except InputError:
                continue
        raise self.fail(v, path, where)


_HEX64 = Str(64, r"[0-9a-f]{64}")
_DIM = Int(0, 2**31 - 1)
_SHAPE = List(_DIM, 64)
_NAME = Str(1024)
_DTYPE = Enum("float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool",
              "complex64", "complex128")
_INPUT = Opt(Obj({"shape": List(Int(1, 2**31 - 1), 16), "dtype": Str(32)}, ("shape",), closed=True))

#: A decision's params / result: any JSON, with the numbers the report formats typed as numbers.
#: (A non-finite measure is saved as the string "inf" or "nan": JSON has no such numbers.)
_MEASURE = Opt(AnyOf(Number(), Enum("inf", "-inf", "nan")))
_SETTINGS = All(Map(Json(), 256, 64), Obj({k: _MEASURE for k in ("density", "relative_error", "output_error")}))

DECISION = Obj({
    "name": _NAME, "layer_type": Str(256), "weight_shape": _SHAPE, "method": Str(64, r"[A-Za-z0-9_]+"),
    "params": _SETTINGS, "reason": Str(4096), "rule": Opt(Str(4096)), "node": Opt(Str(1024)),
    "input_shape": Opt(_SHAPE), "params_before": Int(), "params_after": Opt(Int()), "flops_before": Opt(Int()),
    "flops_after": Opt(Int()), "bytes_before": Int(), "bytes_after": Opt(Int()), "result": _SETTINGS,
}, ("name", "layer_type", "weight_shape", "method", "params", "reason", "params_before", "params_after",
    "flops_before", "flops_after"))

MANIFEST = Obj({
    "format": Const("sparsify.artifact"),
    "format_version": Int(1, 1000),
    "sparsify_version": Str(64),
    "torch_version": Str(64),
    "created": Str(64),
    "model": Opt(Obj({
        "kind": Enum("factory", "hf", "python"), "target": Str(4096), "target_abs": Str(4096),
        "factory_args": Json(), "weights": Str(4096), "weights_abs": Str(4096), "seed": Int(0, 2**63 - 1),
    }, ("kind", "target"))),
    "hf": Opt(Obj({"class": Str(128, r"[A-Za-z_][A-Za-z0-9_]*"), "config": Map(Json(), 10_000, 256),
                   "transformers_version": Str(64)}, ("class", "config"))),
    "config": Opt(Map(Json(), 1000, 256)),
    "inputs": Opt(List(_INPUT, 64)),
    "input_names": Opt(List(Str(64, r"[A-Za-z_][A-Za-z0-9_]*"), 64)),
    "training": Bool(),
    "plan": Opt(Obj({"traced": Bool(), "capture_note": Opt(Str(4096)), "notes": List(Str(4096), 10_000),
                     "decisions": List(DECISION, MAX_DECISIONS)}, ("traced", "decisions"))),
    "layouts": Map(Map(Json(), 64, 64), MAX_DECISIONS),
    "weights": Obj({
        "file": Enum("weights.safetensors", "weights.safetensors.index.json"), "sha256": _HEX64, "bytes": Int(),
        # sharded weights (streamed conversions): each shard's file, checksum, size and tensors, in order
        "shards": List(Obj({"file": Str(64, r"weights-[0-9]{5}-of-[0-9]{5}\.safetensors"), "sha256": _HEX64,
                            "bytes": Int(), "tensors": List(_NAME, MAX_TENSOR_ENTRIES)},
                           ("file", "sha256", "bytes", "tensors"), closed=True), 99_999),
        "tensors": Map(Obj({"dtype": _DTYPE, "shape": _SHAPE}, ("dtype", "shape"), closed=True),
                       MAX_TENSOR_ENTRIES),
        "aliases": Map(_NAME, MAX_TENSOR_ENTRIES), "state_dict_keys": List(_NAME, MAX_TENSOR_ENTRIES),
    }, ("file", "sha256", "bytes", "tensors")),
    "program": Opt(Obj({"file": Const("program.json"), "sha256": _HEX64, "bytes": Int(0, MAX_PROGRAM_BYTES)},
                       ("file", "sha256", "bytes"))),
    "program_note": Opt(Str(4096)),
    # format 1: a torch-serde program (never loaded now; see docs/saved_models.md)
    "exported": Opt(Map(Json(), 16)),
    "exported_note": Opt(Str(4096)),
    "source_fingerprint": _HEX64,
    "torch_threads": Int(1, 1 << 20),
}, ("format", "format_version", "weights"))


def _check_shards(w: dict[str, Any], where: str) -> None:
    """Sharded weights: the shards are named 1..n in order, and hold every tensor exactly once."""
    shards = w.get("shards")
    if w["file"] != "weights.safetensors.index.json":
        if shards is not None:
            raise InputError(f"{where}/manifest.json: field weights.shards: only for sharded weights "
                             "(weights.file 'weights.safetensors.index.json')")
        return
    if not shards:
        raise InputError(f"{where}/manifest.json: field weights.shards: missing (sharded weights need their shards)")
    seen: set[str] = set()
    for i, sh in enumerate(shards):
        want = f"weights-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        if sh["file"] != want:
            raise InputError(f"{where}/manifest.json: field weights.shards[{i}].file: expected {want!r}, "
                             f"got {sh['file'][:60]!r}")
        for k in sh["tensors"]:
            if k not in w["tensors"] or k in seen:
                raise InputError(f"{where}/manifest.json: field weights.shards[{i}].tensors: {k[:80]!r} is "
                                 f"{'in two shards' if k in seen else 'not in weights.tensors'}")
            seen.add(k)
    if len(seen) != len(w["tensors"]):
        missing = next(k for k in w["tensors"] if k not in seen)
        raise InputError(f"{where}/manifest.json: field weights.shards: no shard holds {missing[:80]!r}")


def validate_manifest(m: Any, where: str) -> dict[str, Any]:
    """Check ``m`` (a parsed manifest.json) against the schema; raise an InputError naming the first bad field."""
    if not isinstance(m, dict):
        raise InputError(f"{where}/manifest.json: expected an object at the top, got "
                         f"{'a list' if isinstance(m, list) else type(m).__name__}")
    # Format and version first: a newer artifact gets "upgrade", not a field error.
    Const("sparsify.artifact").check(m.get("format"), "format", where)
    Int(1, 1000).check(m.get("format_version"), "format_version", where)
    MANIFEST.check(m, "", where)
    w = m["weights"]
    _check_shards(w, where)
    for alias, src in (w.get("aliases") or {}).items():
        if src not in w["tensors"]:
            raise InputError(f"{where}/manifest.json: field weights.aliases.{printable(alias)}: names {src!r}, "
                             "which is not a stored tensor")
    return m
