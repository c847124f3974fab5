"""The ``sparsify`` command: inspect, convert, verify, bench, doctor.  See docs/cli.md.

Exit codes: 0 ok; 2 bad input (one line on stderr starting ``sparsify: error:``,
no output file); 3 ``verify`` found a difference; 130 interrupted (Ctrl-C), 143
terminated (SIGTERM), each with one line and no output left; 1 an unexpected
internal error.  ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
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
EXIT_TERMINATED = 143


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
        from .files import not_a_file

        raise InputError(f"--config {path}: {not_a_file(p)}.")
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unused option is an error here, said below
            cfg = SparsifyConfig.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{where}: {exc}") from None
    unused = cfg.unused_params()
    if unused:
        name = unused[0]
        given = f"--{name.replace('_', '-')}" if flags.get(name) is not None else f"{where}: {name}"
        raise InputError(f"{given}: no method in use ({', '.join(sorted(cfg.methods_used()))}) takes {name}, so it "
                         "would change nothing. Drop it, or choose a method that takes it (--method, or a rule).")
    return cfg


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
        specs = [None if s is None else InputSpec.from_dict(s, f"manifest.json: field inputs[{i}]")
                 for i, s in enumerate(manifest["inputs"])]
    else:
        specs = list(spec.default_inputs) if spec is not None else []
    batch = getattr(args, "batch", None)
    if batch is not None:
        if batch < 1:
            raise InputError(f"--batch {batch}: expected an integer >= 1.")
        specs = [None if s is None else s.with_batch(batch) for s in specs]
    return specs


def _describe_inputs(specs) -> str:
    return " ".join("None" if s is None else str(s) for s in specs) or "none"


def _call(model, inputs) -> Any:
    """Run ``model`` on positional inputs (a tuple) or keyword inputs (a dict, from an artifact's input_names)."""
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _named(inputs: tuple, manifest: dict | None, args) -> tuple | dict:
    """The recorded keyword names, when the inputs came from the artifact (not --input-shape)."""
    names = (manifest or {}).get("input_names")
    if names and not getattr(args, "input_shape", None) and len(names) == len(inputs):
        return dict(zip(names, inputs))
    return inputs


def _check_inputs_fit(model, inputs, specs, what: str) -> Any:
    import torch

    try:
        with torch.no_grad():
            return _call(model, inputs)
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

    cap = capture(model, tuple(inputs) if inputs else None)  # the same analysis convert does
    ctx = PassContext(config=config, example_inputs=inputs, traced=cap.traced, capture_note=cap.note,
                      planner=plan_model, capture=cap)
    run_passes(cap.module, ctx, [plan_layers, annotate_shapes] if inputs else [plan_layers])
    return ctx.plan


def _report_from_manifest(manifest: dict):
    from .report import Report

    plan = manifest.get("plan") or {}
    return Report(list(plan.get("decisions", [])), plan.get("traced", True), plan.get("capture_note"),
                  tuple(plan.get("notes", [])))


# -------------------------------------------------------------------- commands
def cmd_inspect(args) -> int:
    from .io import read_manifest
    from .report import printable

    spec = _spec_from_args(args)
    if spec.kind == "artifact":
        m = read_manifest(spec.target)
        model = m.get("model") or {}
        # The manifest may be someone else's: every line goes through printable(), so no terminal
        # escape (cursor moves, window titles, hyperlinks, hidden text) reaches the terminal.
        lines = [f"sparsify artifact {spec.target} (format {m['format_version']}, sparsify {m.get('sparsify_version')}, "
                 f"torch {m.get('torch_version')}, {m.get('created')})",
                 f"converted from: {model.get('target', 'unknown (saved from Python)')}"]
        if m.get("hf"):
            lines.append(f"Hugging Face class: {m['hf']['class']} (load() rebuilds it from the recorded config)")
        ins = m.get("inputs") or []
        lines.append(f"inputs: {', '.join('None' if i is None else str(i['shape']) + ':' + str(i.get('dtype', 'float32')) for i in ins) or 'none recorded'}")
        if m.get("program"):
            lines.append("stored program: yes (loads without the source)")
        elif m["format_version"] < 2 and m.get("exported"):
            lines.append("stored program: format 1, no longer loaded (load from the factory and save again)")
        else:
            lines.append(f"stored program: no: {m.get('program_note') or m.get('exported_note')}")
        lines.append(f"weights: {m['weights']['bytes']} bytes, sha256 {m['weights']['sha256'][:16]}...")
        for line in lines:
            print(printable(line))
        print()
        print(_report_from_manifest(m))  # Report.__str__ prints every cell and note through printable()
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
        rows.append([printable(c) for c in (
            d.name, d.layer_type, "x".join(map(str, d.weight_shape)),
            "x".join(map(str, d.input_shape)) if d.input_shape else "-", _count(d.params_before),
            _count(d.flops_before), d.method, _setting(d.method, d.params), d.reason)])
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


# --------------------------------------------------------------------- signals
class _State:
    raised: int | None = None      # the signal that interrupted the command
    written: list[str] = []        # outputs committed so far (for a truthful interrupt message)


def _on_signal(signum: int, _frame: Any) -> None:
    """SIGINT / SIGTERM: interrupt the command once; while outputs are committed or temporary
    files removed (sparsify.files.held_signals), or once already interrupting, only record it."""
    from . import files

    if files.signals_held() or _State.raised is not None:
        files.record_signal(signum)
        return
    _State.raised = signum
    raise files.Interrupted(signum)


def _interrupt_exit(signum: int) -> int:
    what = "terminated" if signum == signal.SIGTERM else "interrupted"
    if _State.written:
        print(f"sparsify: {what} after {', '.join(_State.written)} was written completely; it is kept",
              file=sys.stderr)
    else:
        print(f"sparsify: {what}; no output was written", file=sys.stderr)
    return EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED


def _commit(pending: list) -> None:
    """Commit staged outputs as one transaction (all or none; see sparsify.files.commit_all)."""
    from . import files

    with files.held_signals():  # until the outputs are known to be written, a signal is only recorded
        left = files.commit_all(pending)
        _State.written = [str(p.out) for p in pending]
    for name in left:
        print(f"sparsify: warning: kept {name!r}, which sparsify did not write, beside the replaced output",
              file=sys.stderr)
    late = files.pending_signals()
    if late:
        raise files.Interrupted(late[0])


def _state_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def cmd_convert(args) -> int:
    import torch

    from . import files
    from .api import sparsify
    from .html_report import check_report_path, stage_report
    from .io import check_output_path, hf_info, stage_artifact

    spec = _spec_from_args(args)
    if spec.kind == "artifact":
        raise InputError(f"{args.model} is already a converted sparsify artifact; convert the original model.")
    config = _config_from_args(args)
    if args.stream or args.distributed or (spec.weights and str(spec.weights).endswith(".json")):
        if args.calibration:
            raise InputError("--calibration runs the whole model on the batches; it does not combine with --stream / "
                             "--distributed / a sharded --weights index (convert without them).")
        return _convert_streaming(args, spec, config)
    if args.max_shard_size is not None:
        raise InputError(f"--max-shard-size {args.max_shard_size}: shards are written by streaming conversion only; "
                         "add --stream (with --weights), or drop the option (OUT is then one weights file).")
    calib = None
    if args.calibration:  # read and checked before any work (sparsify.calibration.read_batches)
        from .calibration import read_batches

        calib = read_batches(args.calibration)
    inputs_paths = spec.input_paths() + ([Path(args.config)] if args.config else []) + \
        ([Path(args.calibration)] if args.calibration else [])
    out = check_output_path(args.output, inputs_paths, force=args.force)
    if args.report:  # also refuses a report, or its pictures folder, at or inside OUT (and OUT inside it)
        check_report_path(args.report, inputs_paths + [out], force=args.force, output=out)
    model = _build(spec)
    # The artifact never needs more than the dense weights (+ index); refuse a disk that cannot hold them
    # now, not after the conversion work.
    check_output_path(out, inputs_paths, force=args.force, need_bytes=_state_bytes(model) + (1 << 20))
    specs = _input_specs(args, spec)
    inputs = _make_inputs(specs, spec, args.seed) if specs else None
    if inputs:
        _check_inputs_fit(model, inputs, specs, spec.target)
    fingerprint = _fingerprint(model)
    hf = hf_info(model) if spec.kind == "hf" else None
    total = None
    with contextlib.suppress(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        total = sum(d.method != "dense" for d in _planned(model, config, None).decisions)
    with _progress(not args.no_progress and sys.stderr.isatty(), total, "converting") as step:
        converted = sparsify(model, config, example_inputs=inputs, progress=step, calibration_data=calib)
    rep = __import__("sparsify").report(converted)
    print(rep)
    if not specs:
        print("note: no --input-shape: FLOPs are unknown and no program is stored.")
    export = inputs is not None and not args.no_export
    t = time.perf_counter()
    pending: list = []
    try:
        if args.report:
            pending += stage_report(args.report, rep, converted, title=f"sparsify report: {spec.target}",
                                    meta={"model": spec.target, "config": repr(config),
                                          "inputs": _describe_inputs(specs), "artifact": str(out)},
                                    force=args.force)
        pending.append(stage_artifact(converted, out, model_spec=spec, config=config, example_inputs=inputs,
                                      export=export, overwrite=args.force, hf=hf,
                                      extra={"source_fingerprint": fingerprint,
                                             "torch_threads": torch.get_num_threads()}))
        # The report and OUT are committed together at the very end: an interrupt before leaves
        # neither, one during the commit takes both back.
        _commit(pending)
    except BaseException:
        files.discard_all(pending)
        raise
    from .io import read_manifest

    m = read_manifest(out)
    ex = "program stored" if m.get("program") else f"no program ({m.get('program_note') or 'disabled'})"
    if args.report:
        print(f"wrote {', '.join(str(p.out) for p in pending[:-1])}")
    print(f"wrote {out} ({ex}; {time.perf_counter() - t:.1f} s)")
    return EXIT_OK


def _convert_streaming(args, spec, config) -> int:
    """convert --stream / --distributed / --weights INDEX.json: one layer at a time (sparsify.streaming),
    split across torchrun's ranks with --distributed; rank 0 prints and writes."""
    import torch

    from . import files
    from .html_report import check_report_path, stage_report
    from .io import _input_record, hf_info
    from .report import Report
    from .streaming import convert_checkpoint, parse_size

    if not spec.weights:
        raise InputError("--stream / --distributed convert a checkpoint one layer at a time: give it with --weights "
                         "(a .safetensors file or a sharded model.safetensors.index.json).")
    try:
        max_shard = parse_size(args.max_shard_size if args.max_shard_size is not None else "128MB")
    except ValueError as exc:
        raise InputError(f"--max-shard-size {args.max_shard_size}: {exc}") from None
    distributed = args.distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.distributed and not distributed:
        print("note: --distributed outside torchrun (no WORLD_SIZE > 1): converting in this one process.",
              file=sys.stderr)
    first = not distributed or int(os.environ.get("RANK", "0")) == 0
    inputs_paths = spec.input_paths() + ([Path(args.config)] if args.config else [])
    if args.report and first:  # as in cmd_convert: the report and its pictures stay out of OUT
        check_report_path(args.report, inputs_paths + [Path(args.output)], force=args.force, output=args.output)
    skeleton = spec.build_skeleton()
    specs = _input_specs(args, spec)
    inputs = _make_inputs(specs, spec, args.seed) if specs else None
    outcome = convert_checkpoint(
        skeleton, spec.weights, args.output, config, example_inputs=inputs, max_shard_size=max_shard,
        overwrite=args.force, progress=first and not args.no_progress and sys.stderr.isatty(),
        distributed=distributed, model_spec=spec, hf=hf_info(skeleton) if spec.kind == "hf" else None,
        inputs_record=[_input_record(x) for x in inputs] if inputs else None,
        extra={"torch_threads": torch.get_num_threads()}, record_fingerprint=True, commit=False)
    if outcome is None:  # a rank other than 0: its layers went to rank 0
        return EXIT_OK
    rep = Report.from_plan(outcome.plan)
    print(rep)
    pending: list = []
    try:
        if args.report:
            pending += stage_report(args.report, rep, None, title=f"sparsify report: {spec.target}",
                                    meta={"model": spec.target, "config": repr(config),
                                          "inputs": _describe_inputs(specs), "artifact": str(outcome.path)},
                                    force=args.force)
        pending.append(outcome.pending)
        _commit(pending)
    except BaseException:
        files.discard_all(pending)
        raise
    if args.report:
        print(f"wrote {', '.join(str(p.out) for p in pending[:-1])}")
    print(f"wrote {outcome.path} (streamed {outcome.units} layers, {outcome.bytes_read / 2**20:.1f} MiB read, "
          f"{outcome.processes} process{'es' if outcome.processes > 1 else ''}, {outcome.seconds:.1f} s; "
          "no program: load it with its class or factory)")
    return EXIT_OK


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

    if not math.isfinite(args.tol) or args.tol < 0:
        raise InputError(f"--tol {args.tol}: expected a finite relative error >= 0 (e.g. 1e-4).")
    if args.max_error is not None and (not math.isfinite(args.max_error) or args.max_error < 0):
        raise InputError(f"--max-error {args.max_error}: expected a finite relative error >= 0 (e.g. 0.05).")
    held = None
    if args.data:  # read and checked before any work (sparsify.calibration.read_batches)
        from .calibration import read_batches

        held = read_batches(args.data)
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
    inputs = _named(_make_inputs(specs, spec, args.seed + 1), manifest, args)
    _check_inputs_fit(original, inputs, specs, spec.target)
    converted = load(args.artifact, factory=original)
    converted.eval()
    reference = densify(converted).eval()
    from .check import standard_attention

    with torch.no_grad(), standard_attention():  # the same arithmetic in all three (sparsify.check)
        outs = {"original": _flatten(_call(original, inputs)), "converted": _flatten(_call(converted, inputs)),
                "reference": _flatten(_call(reference, inputs))}
        exported_outs = None
        if manifest.get("program"):
            exported_outs = _flatten(_call(load(args.artifact, source="program"), inputs))
    fp = manifest.get("source_fingerprint")
    same_source = fp is None or fp == _fingerprint(original)
    rows = [["output", "shape", "vs dense reference: max abs", "max rel", "vs original: max abs", "max rel"]]
    worst = 0.0
    for (name, c), (_, r), (_, o) in zip(outs["converted"], outs["reference"], outs["original"]):
        ra, rr = _errors(c, r)
        oa, orel = _errors(c, o)
        worst = rr if math.isnan(rr) or math.isnan(worst) else max(worst, rr)  # a NaN is never hidden
        rows.append([name, "x".join(map(str, c.shape)), f"{ra:.3g}", f"{rr:.3g}", f"{oa:.3g}", f"{orel:.3g}"])
    print(f"verify {args.artifact} against {spec.target} on random inputs {_describe_inputs(specs)}")
    print(_table(rows))
    ok = worst <= args.tol and len(outs["converted"]) == len(outs["reference"]) > 0  # (False for NaN)
    if exported_outs is not None:
        ex_worst = max((_errors(e, c)[1] for (_, e), (_, c) in zip(exported_outs, outs["converted"])), default=0.0)
        ex_ok = ex_worst <= args.tol and len(exported_outs) == len(outs["converted"])
        print(f"stored program vs rebuilt model: max rel {ex_worst:.3g} ({'equal' if ex_ok else 'DIFFERENT'})")
        ok = ok and ex_ok
    if not same_source:
        print("note: MODEL's weights differ from those the artifact was converted from; the error vs original "
              "measures a different model (use the same factory, --factory-args, --weights and --seed).")
    verdict = "yes" if ok else "NO"
    print(f"converted model equals its dense reference: {verdict} (max rel {worst:.3g}, tolerance {args.tol:g})")
    # The number that says what conversion cost: the error against the original, per output.
    if held is not None:
        from .calibration import model_error

        try:
            against = model_error(original, converted, held)["outputs"]
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"--data {args.data}: the models did not run on its batches ({type(exc).__name__}: "
                             f"{str(exc)[:200]}).") from None
        on = f"{held.describe()} from {args.data}"
    else:
        against = {}
        for (name, c), (_, o) in zip(outs["converted"], outs["original"]):
            if c.is_floating_point() and c.shape == o.shape:
                num, den = float((c.double() - o.double()).norm()), float(o.double().norm())
                against[name] = num / den if den > 0 else (0.0 if num == 0 else math.inf)
        on = f"random inputs {_describe_inputs(specs)} (pass --data FILE with held-out data for a real measure)"
    if against:
        name = max(against, key=lambda n: math.inf if math.isnan(against[n]) else against[n])  # NaN: the worst
        err = against[name]
        print(f"==> error against the original: {err:.3g} (output {name!r}; relative ||converted - original|| / "
              f"||original|| on {on})")
        if args.max_error is not None:
            if not err <= args.max_error:  # NaN is above every bound
                times = f", {err / args.max_error:.3g}x the bound" if args.max_error > 0 else ""
                print(f"==> ABOVE --max-error {args.max_error:g}: output {name!r} is {err:.3g} from the original"
                      f"{times}")
                ok = False
            else:
                print(f"==> within --max-error {args.max_error:g}")
    return EXIT_OK if ok else EXIT_MISMATCH


def _time(fn, inputs, *, warmup: int, repeat: int, cuda: bool) -> list[float]:
    import torch

    with torch.no_grad():
        for _ in range(warmup):
            _call(fn, inputs)
        if cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            _call(fn, inputs)
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
    return times


_BENCH_GENERATOR = "sparsify bench"


def _is_bench_json(path: Path) -> bool:
    """A file ``bench --json`` wrote (the only kind ``--force`` replaces)."""
    from .files import parse_json, read_regular

    try:
        doc = parse_json(read_regular(path.parent, path.name, max_bytes=64 * 2**20, what="bench JSON"), str(path))
    except InputError:
        return False
    return isinstance(doc, dict) and doc.get("generator") == _BENCH_GENERATOR


def cmd_bench(args) -> int:
    import torch

    from .api import densify, sparsify
    from .io import check_output_file, load, read_manifest, write_file

    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False).")
    if args.repeat < 1 or args.warmup < 0 or args.repeat > 100_000 or args.warmup > 100_000:
        raise InputError("--repeat must be in [1, 100000] and --warmup in [0, 100000].")
    spec = _spec_from_args(args)
    if args.json:
        inputs_paths = spec.input_paths() + ([Path(args.config)] if getattr(args, "config", None) else [])
        if args.factory:
            inputs_paths += _spec_from_args(args, args.factory).input_paths()
        check_output_file(args.json, inputs_paths, force=args.force, is_ours=_is_bench_json, what="--json")
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
    inputs = _named(tuple(None if x is None else x.to(dev) for x in inputs), manifest, args)
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
        doc = {"generator": _BENCH_GENERATOR, "model": args.model, "device": str(dev),
               "threads": torch.get_num_threads(),
               "inputs": [s.to_dict() for s in specs], "warmup": args.warmup, "repeat": args.repeat,
               "results": results, "speedup": speedup, "torch_version": torch.__version__}
        from . import files

        with files.held_signals():
            write_file(args.json, json.dumps(doc, indent=1) + "\n", force=args.force, is_ours=_is_bench_json,
                       what="--json")
            _State.written = [str(args.json)]
        if files.pending_signals():
            raise files.Interrupted(files.pending_signals()[0])
        print(f"wrote {args.json}")
    return EXIT_OK


def cmd_doctor(args) -> int:
    from .runtime import doctor

    return int(doctor.main(list(args.doctor_args), prog="sparsify doctor") or 0)


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
    p.add_argument("--force", action="store_true",
                   help="replace an existing artifact at OUT (and a report sparsify wrote at --report)")
    p.add_argument("--report", metavar="FILE", help="also write a report (.html or .md)")
    p.add_argument("--no-export", action="store_true", help="do not store the inference program")
    p.add_argument("--calibration", metavar="FILE",
                   help="calibration batches (safetensors, tensors named '<batch>.<input>', see docs/accuracy.md): "
                        "every layer is fitted to its outputs on them, and the report gives the output errors")
    p.add_argument("--stream", action="store_true",
                   help="convert one layer at a time from --weights (implied by a sharded *.index.json)")
    p.add_argument("--max-shard-size", default=None, metavar="SIZE",
                   help="streaming: largest weights shard of OUT, e.g. 128MB or 2GiB (128MB: the writer holds one)")
    p.add_argument("--distributed", action="store_true",
                   help="under torchrun: each process converts a share of the layers, rank 0 writes OUT")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("verify", parents=[common, model], help="compare OUT with its dense reference and MODEL",
                       description="Run the artifact and the original on random inputs; report the errors.")
    p.add_argument("artifact", metavar="OUT", help="a sparsify artifact folder")
    p.add_argument("--against", required=True, metavar="MODEL", help="the original model: " + models_help)
    p.add_argument("--tol", type=float, default=1e-4, help="max relative error vs the dense reference (1e-4)")
    p.add_argument("--max-error", type=float, metavar="E",
                   help="exit 3 when an output's relative error against the original (||c - o|| / ||o||) is above E")
    p.add_argument("--data", metavar="FILE",
                   help="measure the error against the original on these batches (a --calibration-style file; "
                        "use held-out data) instead of one random batch")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("bench", parents=[common, model, conv], help="dense vs converted latency",
                       description="Median latency of the dense and converted model (warm-up excluded).")
    p.add_argument("model", metavar="MODEL", help=models_help)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, help="batch size (replaces the first dimension of every input)")
    p.add_argument("--repeat", type=int, default=20, help="timed runs (20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs (3)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON (a new file)")
    p.add_argument("--force", action="store_true", help="replace an existing --json FILE that bench wrote")
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


def _doctor_argv(argv: list[str]) -> list[str] | None:
    """``sparsify [--debug] doctor ARGS...``: everything after ``doctor`` is the doctor's own, but
    ``--debug`` (tracebacks), which doctor takes before or after its name as every command does."""
    for i, a in enumerate(argv):
        if a == "doctor":
            return [x for x in argv[i + 1:] if x != "--debug"]  # main() has already read it
        if a != "--debug":
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the ``sparsify`` command; returns the exit code.

    Example:
        >>> main(["inspect", "torch.nn:Identity"])  # doctest: +ELLIPSIS
        factory torch.nn:Identity: Identity, 0 parameters, inputs none
        ...
        0
    """
    from . import files

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    old_showwarning = warnings.showwarning
    old_handlers: dict[int, Any] = {}
    _State.raised, _State.written = None, []
    files.clear_signals()
    for s in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: leave the handlers alone
            old_handlers[s] = signal.signal(s, _on_signal)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Sparse (BSR|CSR) tensor support is in beta")
            warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled")
            if not debug:
                warnings.showwarning = _show_warning
            try:
                from .runtime.environment import check_environment

                check_environment()
                doctor_args = _doctor_argv(argv)
                if doctor_args is not None:
                    return cmd_doctor(argparse.Namespace(doctor_args=doctor_args))
                args = build_parser().parse_args(argv)
                if getattr(args, "seed", 0) is None and args.func is not cmd_verify:
                    args.seed = 0
                if getattr(args, "seed", None) is not None and not 0 <= args.seed < 2**63:
                    raise InputError(f"--seed {args.seed}: expected an integer in [0, 2**63).")
                return int(args.func(args) or 0)
            except SystemExit as exc:  # --help / --version
                return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_BAD_INPUT)
            except KeyboardInterrupt as exc:
                if debug:
                    traceback.print_exc()
                with files.held_signals():
                    files.discard_live()  # staged outputs an interrupt caught mid-way
                    return _interrupt_exit(getattr(exc, "signum", signal.SIGINT))
            except (InputError, ValueError) as exc:
                if debug:
                    traceback.print_exc()
                print(f"sparsify: error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
                      file=sys.stderr)
                return EXIT_BAD_INPUT
            except Exception as exc:
                if debug:
                    traceback.print_exc()
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                print(f"sparsify: internal error: {type(exc).__name__}: {first[:400]} "
                      "(run with --debug for the traceback, and please report it)", file=sys.stderr)
                return EXIT_INTERNAL
    finally:
        files.discard_live()
        warnings.showwarning = old_showwarning
        for s, h in old_handlers.items():
            signal.signal(s, h)
        files.clear_signals()
