"""The ``sparsify`` command: inspect, convert, verify, bench, doctor.  See docs/cli.md.

Exit codes: 0 ok; 2 bad input (one line on stderr starting ``sparsify: error:``,
no output file); 3 ``verify`` found a difference; 130 interrupted (Ctrl-C);
1 an unexpected internal error.  ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect as _inspect
import json
import math
import os
import signal
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["main", "load_config_file", "build_parser"]

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_MISMATCH, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------------- config
def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML config that mirrors ``SparsifyConfig.to_dict()``; unknown keys are errors.

    Example:
        >>> import tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "cfg.toml")
        >>> _ = open(f, "w").write('density = 0.1\\n[[rules]]\\npattern = "head"\\nskip = true\\n')
        >>> load_config_file(f)
        {'density': 0.1, 'rules': [{'pattern': 'head', 'skip': True}]}
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    from .config import Rule, SparsifyConfig
    from .methods import PARAM_VALIDATORS

    p = Path(path)
    if not p.is_file():
        raise InputError(f"--config {path}: no such file.")
    try:
        data = tomllib.loads(p.read_text())
    except (UnicodeDecodeError, OSError) as exc:
        raise InputError(f"--config {path}: cannot read it ({exc}).") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"--config {path}: malformed TOML: {exc}.") from None

    def known(cls) -> set[str]:
        return {n for n, prm in _inspect.signature(cls.__init__).parameters.items()
                if n != "self" and prm.kind not in (prm.VAR_KEYWORD, prm.VAR_POSITIONAL)}

    top_keys = known(SparsifyConfig) | set(PARAM_VALIDATORS)
    rule_keys = known(Rule) | set(PARAM_VALIDATORS)
    for k in data:
        if k not in top_keys:
            raise InputError(f"--config {path}: unknown key {k!r}. Known keys: {', '.join(sorted(top_keys))}.")
    rules = data.get("rules", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise InputError(f"--config {path}: 'rules' must be an array of tables ([[rules]]).")
    for i, r in enumerate(rules):
        for k in r:
            if k not in rule_keys:
                raise InputError(f"--config {path}: unknown key {k!r} in [[rules]] #{i + 1}. "
                                 f"Known keys: {', '.join(sorted(rule_keys))}.")
    return data


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _config_from_args(args) -> Any:
    """The SparsifyConfig that --config and the method flags mean (flags win); validated."""
    from .config import SparsifyConfig
    from .methods import validate_param

    data = load_config_file(args.config) if getattr(args, "config", None) else {}
    where = f"--config {args.config}" if getattr(args, "config", None) else "options"
    flags = {"density": args.density, "block_size": args.block_size, "rank": args.rank,
             "compression": args.compression, "tolerance": args.tolerance}
    for name, value in flags.items():
        if value is None:
            continue
        try:
            validate_param(name, value, f"--{name.replace('_', '-')}")
        except ValueError as exc:
            raise InputError(str(exc)) from None
        data[name] = value
    if args.method is not None:
        data["method"] = args.method
    if args.min_size is not None:
        data["min_size"] = args.min_size
    try:
        return SparsifyConfig.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{where}: {exc}") from None


# ---------------------------------------------------------------------- models
def _spec_from_args(args, text: str | None = None):
    from .model_spec import parse_model

    return parse_model(text if text is not None else args.model, hf=args.hf, factory_args=args.factory_args,
                       weights=args.weights, seed=args.seed)


def _input_specs(args, spec, manifest: dict | None = None) -> list:
    from .model_spec import InputSpec, parse_input_spec

    if args.input_shape:
        specs = [parse_input_spec(s) for s in args.input_shape]
    elif manifest and manifest.get("inputs"):
        specs = [InputSpec.from_dict(s) for s in manifest["inputs"]]
    else:
        specs = list(spec.default_inputs) if spec is not None else []
    batch = getattr(args, "batch", None)
    if batch is not None:
        if batch < 1:
            raise InputError(f"--batch {batch}: expected an integer >= 1.")
        specs = [s.with_batch(batch) for s in specs]
    return specs


def _describe_inputs(specs) -> str:
    return " ".join(str(s) for s in specs) or "none"


def _check_inputs_fit(model, inputs, specs, what: str) -> Any:
    import torch

    try:
        with torch.no_grad():
            return model(*inputs)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--input-shape {_describe_inputs(specs)} does not fit {what}: "
                         f"{type(exc).__name__}: {msg[:300]}. Give the shape(s) its forward() takes.") from None


def _fingerprint(module) -> str:
    h = hashlib.sha256()
    for k, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _build(spec, int_inputs_hint: bool = False):
    model = spec.build()
    model.eval()
    return model


def _make_inputs(specs, spec, seed: int):
    from .model_spec import make_inputs

    return make_inputs(specs, seed=seed, int_high=getattr(spec, "int_high", 2))


# ---------------------------------------------------------------------- output
def _table(rows: list[list[str]], head_rule: bool = True) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0 and head_rule:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _count(n) -> str:
    from .report import _fmt_count

    return _fmt_count(n)


def _setting(method: str, params: dict) -> str:
    if method == "dense":
        return "-"
    return " ".join(f"{k}={v}" for k, v in params.items() if v is not None)


@contextlib.contextmanager
def _progress(enabled: bool, total: int | None, desc: str):
    from tqdm import tqdm

    if not enabled:
        yield None
        return
    bar = tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, leave=False, dynamic_ncols=True)

    def step(name: str) -> None:
        bar.set_postfix_str(name[-40:], refresh=False)
        bar.update(1)

    try:
        yield step
    finally:
        bar.close()


def _planned(model, config, inputs) -> Any:
    """Plan (and, with inputs, annotate shapes) without rewriting anything."""
    from .passes import PassContext, annotate_shapes, capture, plan_layers, run_passes
    from .plan import plan_model

    gm, traced, note = capture(model)
    ctx = PassContext(config=config, example_inputs=inputs, traced=traced, capture_note=note, planner=plan_model)
    run_passes(gm, ctx, [plan_layers, annotate_shapes] if inputs else [plan_layers])
    return ctx.plan


def _report_from_manifest(manifest: dict):
    from .report import Report

    plan = manifest.get("plan") or {}
    return Report(list(plan.get("decisions", [])), plan.get("traced", True), plan.get("capture_note"),
                  tuple(plan.get("notes", [])))


# -------------------------------------------------------------------- commands
def cmd_inspect(args) -> int:
    from .io import read_manifest

    spec = _spec_from_args(args)
    if spec.kind == "artifact":
        m = read_manifest(spec.target)
        model = m.get("model") or {}
        print(f"sparsify artifact {spec.target} (format {m['format_version']}, sparsify {m.get('sparsify_version')}, "
              f"torch {m.get('torch_version')}, {m.get('created')})")
        print(f"converted from: {model.get('target', 'unknown (saved from Python)')}")
        print(f"inputs: {', '.join(str(i['shape']) + ':' + i['dtype'] for i in m.get('inputs') or []) or 'none recorded'}")
        ex = m.get("exported")
        print(f"exported program: {'yes (loads without the source)' if ex else 'no: ' + str(m.get('exported_note'))}")
        print(f"weights: {m['weights']['bytes']} bytes, sha256 {m['weights']['sha256'][:16]}...")
        print()
        print(_report_from_manifest(m))
        return EXIT_OK
    config = _config_from_args(args)
    model = _build(spec)
    specs = _input_specs(args, spec)
    inputs = _make_inputs(specs, spec, args.seed) if specs else None
    if inputs:
        _check_inputs_fit(model, inputs, specs, spec.target)
    plan = _planned(model, config, inputs)
    rows = [["layer", "kind", "weight", "input", "params", "FLOPs", "would do", "setting", "reason"]]
    for d in plan.decisions:
        rows.append([d.name, d.layer_type, "x".join(map(str, d.weight_shape)),
                     "x".join(map(str, d.input_shape)) if d.input_shape else "-", _count(d.params_before),
                     _count(d.flops_before), d.method, _setting(d.method, d.params), d.reason])
    total_p = sum(p.numel() for p in model.parameters())
    print(f"{spec.describe()}: {type(model).__name__}, {_count(total_p)} parameters, inputs {_describe_inputs(specs)}")
    if len(rows) == 1:
        print("no Linear / Conv layers found: nothing to rewrite.")
    else:
        print(_table(rows))
    n = sum(d.method != "dense" for d in plan.decisions)
    print(f"{n} of {len(plan.decisions)} candidate layers would be rewritten with {config!r}.")
    if not plan.traced:
        print(f"note: not traced ({plan.capture_note}); module-tree fallback")
    if not specs:
        print("note: no --input-shape: input shapes and FLOPs are unknown.")
    return EXIT_OK


_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_held: dict[int, object] = {}
_late_signals: list[int] = []


def _hold_signals() -> None:
    """From the commit of OUT on, Ctrl-C / SIGTERM are recorded, not raised: the command
    then ends as it succeeded (exit 0, OUT complete) instead of reporting an interrupt
    with OUT in place.  Python runs signal handlers in the main thread, so this holds
    whichever thread the signal is delivered to (a signal mask would not)."""
    for s in _HELD_SIGNALS:
        with contextlib.suppress(ValueError):  # not the main thread: nothing to hold
            _held[s] = signal.signal(s, lambda signum, _frame: _late_signals.append(signum))


def _release_signals() -> None:
    while _held:
        s, handler = _held.popitem()
        signal.signal(s, handler)
    _late_signals.clear()


def cmd_convert(args) -> int:
    import torch

    from .api import sparsify
    from .io import check_output_path, save

    spec = _spec_from_args(args)
    if spec.kind == "artifact":
        raise InputError(f"{args.model} is already a converted sparsify artifact; convert the original model.")
    config = _config_from_args(args)
    inputs_paths = spec.input_paths() + ([Path(args.config)] if args.config else [])
    out = check_output_path(args.output, inputs_paths, force=args.force)
    if args.report:
        _check_report_path(args.report, inputs_paths + [out])
    model = _build(spec)
    specs = _input_specs(args, spec)
    inputs = _make_inputs(specs, spec, args.seed) if specs else None
    if inputs:
        _check_inputs_fit(model, inputs, specs, spec.target)
    fingerprint = _fingerprint(model)
    total = None
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        total = sum(d.method != "dense" for d in _planned(model, config, None).decisions)
    with _progress(not args.no_progress and sys.stderr.isatty(), total, "converting") as step:
        converted = sparsify(model, config, example_inputs=inputs, progress=step)
    rep = __import__("sparsify").report(converted)
    print(rep)
    if not specs:
        print("note: no --input-shape: FLOPs are unknown and no exported program is saved.")
    if args.no_export:
        export = False
    else:
        export = inputs is not None
    if args.report:
        # Written before OUT: committing OUT is the last step, so an interrupt at any
        # point before it leaves no OUT, and none after it can (see _hold_signals).
        from .html_report import write_report

        files = write_report(args.report, rep, converted, title=f"sparsify report: {spec.target}",
                             meta={"model": spec.target, "config": repr(config), "inputs": _describe_inputs(specs),
                                   "artifact": str(out)})
        print(f"wrote {', '.join(str(f) for f in files)}")
    t = time.perf_counter()
    save(converted, out, model_spec=spec, config=config, example_inputs=inputs, export=export,
         overwrite=args.force, extra={"source_fingerprint": fingerprint, "torch_threads": torch.get_num_threads()},
         before_commit=_hold_signals)
    if _late_signals:
        print("sparsify: interrupt received after OUT was complete; OUT is kept", file=sys.stderr)
    from .io import read_manifest

    m = read_manifest(out)
    ex = "exported program saved" if m.get("exported") else f"no exported program ({m.get('exported_note') or 'disabled'})"
    print(f"wrote {out} ({ex}; {time.perf_counter() - t:.1f} s)")
    return EXIT_OK


def _check_report_path(path: str, inputs: list) -> None:
    from .html_report import REPORT_SUFFIXES

    p = Path(path)
    if p.suffix.lower() not in REPORT_SUFFIXES:
        raise InputError(f"--report {path}: unknown report format {p.suffix or '(none)'}; use .html or .md.")
    for i in inputs:
        if p.resolve() == Path(i).resolve():
            raise InputError(f"--report {path} is the input {i}; choose another path.")
    if not p.parent.resolve().is_dir():
        raise InputError(f"--report {path}: the folder {p.parent} does not exist.")


def _flatten(out: Any, prefix: str = "output") -> list[tuple[str, Any]]:
    import torch

    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, dict):  # includes transformers' ModelOutput
        return [x for k, v in out.items() for x in _flatten(v, f"{prefix}.{k}" if prefix != "output" else str(k))]
    if isinstance(out, (list, tuple)):
        return [x for i, v in enumerate(out) for x in _flatten(v, f"{prefix}[{i}]")]
    return []


def _errors(a, b) -> tuple[float, float]:
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return math.inf, math.inf
    if a.numel() == 0:
        return 0.0, 0.0
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    return diff, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def cmd_verify(args) -> int:
    import torch

    from .api import densify
    from .io import load, read_manifest

    manifest = read_manifest(args.artifact)
    recorded = manifest.get("model") or {}
    if args.seed is None:
        args.seed = int(recorded.get("seed", 0))
    spec = _spec_from_args(args, args.against)
    if spec.kind == "artifact":
        raise InputError(f"--against {args.against} is an artifact; give the original model (factory or --hf config).")
    original = _build(spec)
    specs = _input_specs(args, spec, manifest)
    if not specs:
        raise InputError("verify needs input shapes: pass --input-shape (the artifact recorded none).")
    inputs = _make_inputs(specs, spec, args.seed + 1)
    _check_inputs_fit(original, inputs, specs, spec.target)
    converted = load(args.artifact, factory=original)
    converted.eval()
    reference = densify(converted).eval()
    with torch.no_grad():
        outs = {"original": _flatten(original(*inputs)), "converted": _flatten(converted(*inputs)),
                "reference": _flatten(reference(*inputs))}
        exported_outs = None
        if manifest.get("exported"):
            exported_outs = _flatten(load(args.artifact, source="exported")(*inputs))
    fp = manifest.get("source_fingerprint")
    same_source = fp is None or fp == _fingerprint(original)
    rows = [["output", "shape", "vs dense reference: max abs", "max rel", "vs original: max abs", "max rel"]]
    worst = 0.0
    for (name, c), (_, r), (_, o) in zip(outs["converted"], outs["reference"], outs["original"]):
        ra, rr = _errors(c, r)
        oa, orel = _errors(c, o)
        worst = max(worst, rr)
        rows.append([name, "x".join(map(str, c.shape)), f"{ra:.3g}", f"{rr:.3g}", f"{oa:.3g}", f"{orel:.3g}"])
    print(f"verify {args.artifact} against {spec.target} on random inputs {_describe_inputs(specs)}")
    print(_table(rows))
    ok = worst <= args.tol and len(outs["converted"]) == len(outs["reference"]) > 0
    if exported_outs is not None:
        ex_worst = max((_errors(e, c)[1] for (_, e), (_, c) in zip(exported_outs, outs["converted"])), default=0.0)
        ex_ok = ex_worst <= args.tol and len(exported_outs) == len(outs["converted"])
        print(f"exported program vs rebuilt model: max rel {ex_worst:.3g} ({'equal' if ex_ok else 'DIFFERENT'})")
        ok = ok and ex_ok
    if not same_source:
        print("note: MODEL's weights differ from those the artifact was converted from; the error vs original "
              "measures a different model (use the same factory, --factory-args, --weights and --seed).")
    verdict = "yes" if ok else "NO"
    print(f"converted model equals its dense reference: {verdict} (max rel {worst:.3g}, tolerance {args.tol:g})")
    return EXIT_OK if ok else EXIT_MISMATCH


def _time(fn, inputs, *, warmup: int, repeat: int, cuda: bool) -> list[float]:
    import torch

    with torch.no_grad():
        for _ in range(warmup):
            fn(*inputs)
        if cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn(*inputs)
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
    return times


def cmd_bench(args) -> int:
    import torch

    from .api import densify, sparsify
    from .io import atomic_write, load, read_manifest

    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False).")
    if args.repeat < 1 or args.warmup < 0:
        raise InputError("--repeat must be >= 1 and --warmup >= 0.")
    spec = _spec_from_args(args)
    manifest = None
    if spec.kind == "artifact":
        manifest = read_manifest(spec.target)
        fspec = None
        if args.factory:
            fspec = _spec_from_args(args, args.factory)
            fspec.seed = int((manifest.get("model") or {}).get("seed", 0))
        converted = load(spec.target, factory=_build(fspec) if fspec else None)
        has_layers = any(hasattr(m, "to_dense_module") for m in converted.modules())
        dense = densify(converted) if has_layers else None
        int_spec = fspec
    else:
        config = _config_from_args(args)
        dense = _build(spec)
        pre = _input_specs(argparse.Namespace(input_shape=args.input_shape, batch=None), spec)
        example = _make_inputs(pre, spec, args.seed) if pre else None
        if example:
            _check_inputs_fit(dense, example, pre, spec.target)
        with _progress(not args.no_progress and sys.stderr.isatty(), None, "converting") as step:
            converted = sparsify(dense, config, example_inputs=example, progress=step)
        int_spec = spec
    specs = _input_specs(args, spec if spec.kind != "artifact" else None, manifest)
    if not specs:
        raise InputError("bench needs input shapes: pass --input-shape.")
    inputs = _make_inputs(specs, int_spec or spec, args.seed)
    dev = torch.device(args.device)
    inputs = tuple(x.to(dev) for x in inputs)
    models = {"dense": dense, "converted": converted}
    results: dict[str, Any] = {}
    for name, m in models.items():
        if m is None:
            continue
        m = m.to(dev)
        with contextlib.suppress(NotImplementedError):  # an exported program is always in eval mode
            m.eval()
        _check_inputs_fit(m, inputs, specs, f"the {name} model")
        times = _time(m, inputs, warmup=args.warmup, repeat=args.repeat, cuda=dev.type == "cuda")
        results[name] = {"median_ms": statistics.median(times), "min_ms": min(times), "times_ms": times}
    rows = [["model", "median ms", "min ms", "runs"]]
    for name, r in results.items():
        rows.append([name, f"{r['median_ms']:.3f}", f"{r['min_ms']:.3f}", str(len(r["times_ms"]))])
    print(f"bench {args.model} on {dev} ({torch.get_num_threads()} threads), inputs {_describe_inputs(specs)}, "
          f"{args.warmup} warm-up runs excluded")
    print(_table(rows))
    speedup = None
    if "dense" in results:
        speedup = results["dense"]["median_ms"] / results["converted"]["median_ms"]
        print(f"speedup (dense median / converted median): {speedup:.2f}x")
    else:
        print("dense: n/a (the artifact has only its exported program; pass --factory MODEL to time the dense model)")
    if args.json:
        doc = {"model": args.model, "device": str(dev), "threads": torch.get_num_threads(),
               "inputs": [s.to_dict() for s in specs], "warmup": args.warmup, "repeat": args.repeat,
               "results": results, "speedup": speedup, "torch_version": torch.__version__}
        atomic_write(args.json, json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}")
    return EXIT_OK


def cmd_doctor(args) -> int:
    try:
        doctor = importlib.import_module("sparsify.runtime.doctor")
    except ModuleNotFoundError as exc:
        if exc.name not in ("sparsify.runtime.doctor",):
            raise
        import torch

        print("sparsify doctor: the CUDA runtime diagnostics are not part of this build yet "
              "(sparsify.runtime.doctor is missing). Basic facts:")
        print(f"  torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
        if torch.cuda.is_available():
            print(f"  device: {torch.cuda.get_device_name()}")
        print("  executor: CPU reference" + ("" if torch.cuda.is_available() else " (no CUDA device)"))
        return EXIT_OK
    return int(doctor.main(list(args.doctor_args)) or 0)


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")

    model = _Parser(add_help=False)
    model.add_argument("--factory-args", metavar="JSON", help="arguments for the factory: a JSON list or object")
    model.add_argument("--hf", action="store_true", help="MODEL is a Hugging Face config.json (or its folder)")
    model.add_argument("--weights", metavar="FILE", help="safetensors weights for the model")
    model.add_argument("--input-shape", action="append", metavar="SHAPE",
                       help="shape of one positional input, e.g. 8,3,224,224 or 2,16:int64 (repeat for more inputs)")
    model.add_argument("--seed", type=int, default=None,
                       help="seed for building the model and random inputs (0; verify: the artifact's)")

    conv = _Parser(add_help=False)
    conv.add_argument("--config", metavar="TOML", help="a TOML file mirroring SparsifyConfig")
    conv.add_argument("--method", help="default method (block_sparse, low_rank, ...)")
    conv.add_argument("--density", type=float, help="fraction of blocks kept, in (0, 1]")
    conv.add_argument("--block-size", type=int, help="block size (e.g. 32)")
    conv.add_argument("--rank", type=_number, help="rank: an int, or a fraction in (0, 1]")
    conv.add_argument("--compression", type=float, help="target compression for factorizations")
    conv.add_argument("--tolerance", type=float, help="relative error for rank selection, in (0, 1)")
    conv.add_argument("--min-size", type=int, help="smallest weight (elements) to rewrite")
    conv.add_argument("--no-progress", action="store_true", help="no progress bar")

    parser = _Parser(prog="sparsify", description="Rewrite dense PyTorch models into block-sparse / factorized ones.",
                     parents=[common])
    parser.add_argument("--version", action="version", version=f"sparsify {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    models_help = ("package.module:factory, path/to/file.py:factory, a config.json with --hf, "
                   "or a sparsify artifact folder")

    p = sub.add_parser("inspect", parents=[common, model, conv], help="the layer table and what a config would do",
                       description="Show the candidate layers: shapes, params, FLOPs and what the config would do.")
    p.add_argument("model", metavar="MODEL", help=models_help)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", parents=[common, model, conv], help="convert MODEL and save it to OUT",
                       description="Convert MODEL, print the report, and write the artifact OUT atomically.")
    p.add_argument("model", metavar="MODEL", help=models_help)
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the artifact folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing artifact at OUT")
    p.add_argument("--report", metavar="FILE", help="also write a report (.html or .md)")
    p.add_argument("--no-export", action="store_true", help="do not store a torch.export program")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("verify", parents=[common, model], help="compare OUT with its dense reference and MODEL",
                       description="Run the artifact and the original on random inputs; report the errors.")
    p.add_argument("artifact", metavar="OUT", help="a sparsify artifact folder")
    p.add_argument("--against", required=True, metavar="MODEL", help="the original model: " + models_help)
    p.add_argument("--tol", type=float, default=1e-4, help="max relative error vs the dense reference (1e-4)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("bench", parents=[common, model, conv], help="dense vs converted latency",
                       description="Median latency of the dense and converted model (warm-up excluded).")
    p.add_argument("model", metavar="MODEL", help=models_help)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, help="batch size (replaces the first dimension of every input)")
    p.add_argument("--repeat", type=int, default=20, help="timed runs (20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs (3)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--factory", metavar="MODEL", help="for an artifact: its original model (trusted), to time dense")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("doctor", parents=[common], help="check the CUDA runtime (drivers, NVRTC, cache)",
                       description="Diagnose the CUDA runtime.", add_help=False)
    p.add_argument("doctor_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_doctor)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    text = text.removeprefix("sparsify: ")
    print(f"sparsify: warning: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the ``sparsify`` command; returns the exit code.

    Example:
        >>> main(["inspect", "torch.nn:Identity"])  # doctest: +ELLIPSIS
        factory torch.nn:Identity: Identity, 0 parameters, inputs none
        ...
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    old_showwarning = warnings.showwarning
    old_term = None
    with contextlib.suppress(ValueError):  # not the main thread: leave SIGTERM alone
        old_term = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Sparse (BSR|CSR) tensor support is in beta")
            warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled")
            if not debug:
                warnings.showwarning = _show_warning
            try:
                args = build_parser().parse_args(argv)
                if getattr(args, "seed", 0) is None and args.func is not cmd_verify:
                    args.seed = 0
                return int(args.func(args) or 0)
            except SystemExit as exc:  # --help / --version
                return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_BAD_INPUT)
            except (InputError, ValueError) as exc:
                if debug:
                    traceback.print_exc()
                print(f"sparsify: error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
                      file=sys.stderr)
                return EXIT_BAD_INPUT
            except KeyboardInterrupt:
                if debug:
                    traceback.print_exc()
                print("sparsify: interrupted; no output was written", file=sys.stderr)
                return EXIT_INTERRUPTED
            except Exception as exc:
                if debug:
                    traceback.print_exc()
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                print(f"sparsify: internal error: {type(exc).__name__}: {first[:400]} "
                      "(run with --debug for the traceback, and please report it)", file=sys.stderr)
                return EXIT_INTERNAL
    finally:
        warnings.showwarning = old_showwarning
        _release_signals()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
