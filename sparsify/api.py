"""The public API: ``sparsify``, ``densify``, ``report``."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from . import hf_save
from .check import check_converted, standard_attention
from .config import SparsifyConfig
from .decision import Decision, Plan
from .passes import PIPELINE, PassContext, capture, run_passes
from .passes.costs import param_count
from .plan import plan_model
from .report import Report

__all__ = ["sparsify", "densify", "report", "PLAN_ATTR"]

#: Where a converted model keeps its plan (decisions), for ``report``.
PLAN_ATTR = "_sparsify_plan"


def _check_example_inputs(example_inputs: Any) -> tuple[tuple | None, dict | None]:
    """``(positional inputs, keyword inputs)`` from a tensor, a tuple / list or a dict."""
    if example_inputs is None:
        return None, None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), None
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), None
    if isinstance(example_inputs, dict) and all(isinstance(k, str) for k in example_inputs):
        return (), dict(example_inputs)
    raise ValueError(
        f"sparsify(example_inputs=...): expected a tensor, a tuple of the model's positional inputs, or a "
        f"dict of its keyword inputs (as Hugging Face models take them). Got {type(example_inputs).__name__}."
    )


def sparsify(
    model: nn.Module,
    config: SparsifyConfig | dict | None = None,
    *,
    example_inputs: Any = None,
    inplace: bool = False,
    progress: Callable[[str], None] | None = None,
    graph: bool = False,
    check: bool | None = None,
    calibration_data: Any = None,
    **shorthand: Any,
) -> nn.Module:
    """Rewrite ``model``'s dense layers as the config says; return the converted model.

    The result is the user's model: an instance of the same class with the same
    attributes and methods (a copy, or ``model`` itself with ``inplace=True``),
    with rewritten layers in its module tree where the dense ones were.  Code that
    reads a rewritten layer's ``.weight`` keeps working (see
    ``sparsify.modules.weight_view``).  Keyword arguments other than the ones named
    are shorthand for a :class:`SparsifyConfig` (``method=``, ``density=``,
    ``block_size=``, ``rank=``, ``tolerance=``, ``rules=``, ...).

    ``example_inputs`` (a tensor, a tuple of positional inputs, or a dict of keyword
    inputs) give shapes and FLOPs, let torch.export analyze a model that torch.fx
    cannot trace, and, with ``check`` (default: on when inputs are given), run the
    converted model once against its dense reference: a crash or a mismatch raises
    an error naming the layer.  ``graph=True`` returns the rewritten
    ``torch.fx.GraphModule`` instead of the user's class, for fusions that need
    graph surgery (a residual add into the block-sparse op); it needs a model that
    torch.fx can trace, and loses the model's class and methods.

    ``calibration_data`` (an iterable of batches, each a tuple of positional inputs,
    a dict of keyword inputs, or a tensor; see ``sparsify.calibration``) makes every
    method fit the layer's outputs on those inputs instead of its weights: blocks
    chosen by saliency and refit by least squares, low rank by whitened SVD,
    factorizations refit to the outputs; layers are converted in forward order, each
    on the inputs the converted layers before it produce; a model-wide ``density=``
    (block_sparse) or ``compression=`` is allocated across layers by sensitivity.  The
    report then carries each layer's and the model's relative output error on the
    data, and one ``CalibrationWarning`` names the worst layers above ``warn_above``.
    One-shot compression costs accuracy: measure it on held-out data
    (``sparsify verify``) and recover it with :func:`sparsify.finetune`.

    Example:
        >>> import torch, sparsify
        >>> model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU())
        >>> sparse = sparsify.sparsify(model, method="block_sparse", density=0.25, block_size=32)
        >>> type(sparse).__name__, sparse(torch.randn(4, 512)).shape
        ('Sequential', torch.Size([4, 512]))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify: expected an nn.Module. Got {type(model).__name__}.")
    from .runtime.environment import check_environment

    check_environment()  # a bad SPARSIFY_* (or torchrun) variable is named before any work
    cfg = SparsifyConfig.coerce(config, shorthand)  # raises before anything is touched
    if not isinstance(graph, bool) or not (check is None or isinstance(check, bool)):
        raise ValueError("sparsify(graph=..., check=...): expected True or False.")
    args, kwargs = _check_example_inputs(example_inputs)
    calib = _calibration_of(calibration_data, cfg)
    if graph and kwargs:
        raise ValueError("sparsify(graph=True): the fx graph takes positional inputs; give example_inputs "
                         "as a tuple, not a dict.")
    with standard_attention():  # the original and the converted model run the same arithmetic
        work = model if inplace else _copy_model(model, "sparsify")
        dense = hf_save.dense_record(work)  # what a converted HF model's save_pretrained must not pass for
        cap = capture(work, args if args is not None or kwargs else None, graph=graph, example_kwargs=kwargs)
        ctx = PassContext(config=cfg, example_inputs=args, example_kwargs=kwargs, traced=cap.traced,
                          capture_note=cap.note, planner=plan_model, progress=progress, capture=cap,
                          calibration=calib)
        out = run_passes(cap.module, ctx, PIPELINE)
        setattr(out, PLAN_ATTR, ctx.plan)
        hf_save.guard(out, dense)
        _reflatten_rnns(out)
        _gpu_speed_note(next((p.device for p in out.parameters()), None), ctx.plan)
        if check if check is not None else (args is not None or bool(kwargs)):
            if args is None and not kwargs:
                raise ValueError("sparsify(check=True): checking the converted model needs example_inputs=.")
            check_converted(out, args or (), kwargs or {})
        if calib is not None:
            _measure(None if inplace else model, out, ctx.plan, calib, cfg)
        return out


#: Layer types whose block-sparse CUDA kernels were measured slower than cuDNN's dense ones.
_SLOW_ON_GPU = {"Conv1d": "conv", "Conv2d": "conv", "LSTM": "LSTM"}


def _gpu_speed_note(device: torch.device | None, plan) -> None:
    """On a CUDA model, say which rewritten layers save parameters but not time there."""
    if plan is None or device is None or device.type != "cuda":
        return
    slow = [d.name for d in plan.decisions if d.method == "block_sparse" and d.layer_type in _SLOW_ON_GPU]
    if slow:
        shown = ", ".join(repr(n) for n in slow[:4]) + (f" and {len(slow) - 4} more" if len(slow) > 4 else "")
        plan.notes.append(
            f"on CUDA, the block-sparse conv / LSTM layers ({shown}) save parameters, not time: their kernels "
            "were measured 7-46x (conv, fp32 FFMA) and 5-37x (LSTM, a launch per step) slower than cuDNN's "
            "dense layers on an H200 (docs/benchmarks.md). Block-sparse Linear layers win from density 0.1 "
            "at large batch. Exclude these layers with rules= if speed is the goal.")


def _calibration_of(data: Any, cfg: SparsifyConfig):
    """The calibration batches: ``calibration_data=``, or (older configs) the factorizations'
    ``calibration_data`` parameter, one batch of positional inputs."""
    from .calibration import as_batches

    if data is not None:
        return as_batches(data, "sparsify(calibration_data=...)")
    legacy = cfg.params.get("calibration_data")
    if legacy is not None:
        return as_batches([tuple(legacy) if isinstance(legacy, (tuple, list)) else legacy],
                          "SparsifyConfig(calibration_data=...)")
    return None


def _measure(reference: nn.Module | None, out: nn.Module, plan: Plan, calib, cfg: SparsifyConfig) -> None:
    """The model's relative output error on the calibration data (against the original, when it
    still exists), into the plan; one warning naming the worst layers above ``warn_above``."""
    import warnings

    from .calibration import CalibrationWarning, model_error

    result = None
    if reference is not None:
        result = model_error(reference, out, calib)
        plan.calibration = result
        outs = ", ".join(f"{k} {v:.3g}" for k, v in result["outputs"].items())
        plan.notes.append(f"relative output error against the original on the calibration data "
                          f"({result['batches']} batches): {outs}")
    else:
        plan.notes.append("inplace=True: the original model is gone, so the model's output error was not "
                          "measured; compare against a copy with sparsify.calibration.model_error")
    limit = cfg.warn_above
    # `not e <= limit`: a NaN error is above every limit (NaN > limit is False)
    bad = sorted(((d.result["output_error"], d) for d in plan.decisions
                  if d.rewrites and "output_error" in d.result and not d.result["output_error"] <= limit),
                 key=lambda t: -math.inf if math.isnan(t[0]) else -t[0])
    model_bad = result is not None and not result["error"] <= limit
    if not bad and not model_bad:
        return
    parts = []
    if model_bad:
        parts.append(f"the model's output {result['worst']!r} differs from the original's by {result['error']:.3g} "
                     f"(relative) on the calibration data")
    if bad:
        n = sum(1 for d in plan.decisions if d.rewrites and "output_error" in d.result)
        worst = ", ".join(f"{d.name} {e:.3g} ({d.method})" for e, d in bad[:5])
        parts.append(f"{len(bad)} of {n} converted layers have a relative output error above {limit:g}; worst: "
                     f"{worst}{' ...' if len(bad) > 5 else ''}")
    warnings.warn("sparsify: " + "; ".join(parts) + ". One-shot compression costs accuracy: measure it on held-out "
                  "data (sparsify verify --against), recover it with sparsify.finetune(...), or keep more of those "
                  "layers (a Rule with a higher density / rank, or skip=True).", CalibrationWarning, stacklevel=3)


#: torch's reparametrizations that keep a computed (non-leaf) weight on the module, and how to undo them.
_NON_LEAF_WEIGHTS = {
    "torch.nn.utils.prune": "torch.nn.utils.prune.remove(module, name) makes the pruned weight a plain parameter",
    "torch.nn.utils.weight_norm": ("torch.nn.utils.remove_weight_norm(module) makes it a plain parameter, or "
                                   "torch.nn.utils.parametrizations.weight_norm (which copies) replaces it"),
}


def _copy_model(model: nn.Module, who: str = "sparsify") -> nn.Module:
    """``copy.deepcopy(model)``, or an :class:`~sparsify.errors.InputError` saying which weights
    cannot be copied and what to do, where torch refuses to copy a tensor computed by autograd
    (``torch.nn.utils.prune``, the old ``torch.nn.utils.weight_norm``).

    Example:
        >>> from torch.nn.utils import prune
        >>> m = torch.nn.Linear(4, 4)
        >>> _ = prune.l1_unstructured(m, "weight", amount=0.5)
        >>> _copy_model(m)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sparsify.errors.InputError: sparsify: cannot copy the model: weight (torch.nn.utils.prune) is a tensor ...
    """
    try:
        return copy.deepcopy(model)
    except RuntimeError as exc:
        if "deepcopy protocol" not in str(exc):
            raise
        from .errors import InputError

        where, fixes = [], {}
        for name, m in model.named_modules():
            tools = {type(h).__module__ for h in m._forward_pre_hooks.values()} & set(_NON_LEAF_WEIGHTS)
            for attr, v in vars(m).items():
                if isinstance(v, torch.Tensor) and not v.is_leaf:
                    where.append(f"{name + '.' if name else ''}{attr} ({', '.join(sorted(tools)) or 'computed'})")
                    fixes.update({t: _NON_LEAF_WEIGHTS[t] for t in tools})
        shown = ", ".join(where[:4]) + (f" and {len(where) - 4} more" if len(where) > 4 else "")
        todo = "; ".join(fixes.values()) or "make those attributes plain parameters or buffers"
        raise InputError(
            f"{who}: cannot copy the model: {shown or 'some module attributes'} "
            f"{'is a tensor' if len(where) == 1 else 'are tensors'} computed by autograd, "
            f"which copy.deepcopy refuses (torch: {str(exc).split('.')[0]}). {who}() works on a copy of the model. "
            f"Undo the reparametrization first: {todo}; or convert the model itself with "
            "sparsify(..., inplace=True) (the layers converted keep the weight it computes now).") from exc


def _reflatten_rnns(model: nn.Module) -> None:
    """Put the weights of every torch RNN (kept, or made by densify) back into one contiguous
    buffer.  ``copy.deepcopy`` copies them one by one; on CUDA, cuDNN then warns that they are
    "not part of single contiguous chunk of memory" and compacts them on every call (seen on an
    H200 after converting a model that kept its nn.LSTM).  A no-op on the CPU."""
    for m in model.modules():
        if isinstance(m, nn.RNNBase):
            m.flatten_parameters()


def _dense_replacement(m: nn.Module) -> nn.Module | None:
    fn = getattr(m, "to_dense_module", None)
    return fn() if callable(fn) else None


def densify(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every rewritten layer replaced by its exact dense equivalent.

    ``densify(sparsify(m))`` computes what ``m`` computes with each layer's
    mask or reconstruction applied, and is of ``m``'s class.  Hooks registered on a
    rewritten layer move to its dense equivalent, as ``sparsify`` moved them from the
    dense layer.

    Example:
        >>> import torch, sparsify
        >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(256, 256)), density=0.5)
        >>> type(sparsify.densify(m)[0]).__name__
        'Linear'
    """
    from .modules.functional import functional_weights, restore_parameter
    from .passes.hooks import carry_hooks

    out = _copy_model(module, "densify")
    if isinstance(out, fx.GraphModule):
        graph = out.graph
        for node in list(graph.nodes):
            if node.op != "call_module":
                continue
            layer = out.get_submodule(node.target)
            new = _dense_replacement(layer)
            if new is None:
                continue
            parent, _, attr = node.target.rpartition(".")
            carry_hooks(layer, new)
            setattr(out.get_submodule(parent) if parent else out, attr, new)
            # a fused residual (fuse_epilogues): call the dense layer, then add; an attention's
            # (query, key, value) are its own arguments
            if len(node.args) > 1 and "residual" in inspect.signature(layer.forward).parameters:
                x, residual = node.args[0], node.args[1]
                node.args = (x,)
                with graph.inserting_after(node):
                    add = graph.call_function(torch.add, (node, residual))
                node.replace_all_uses_with(add, delete_user_cb=lambda u, add=add: u is not add)
        graph.lint()
        out.recompile()
    else:
        for owner in list(out.modules()):
            for attr, layer_attr in functional_weights(owner).items():
                layer = owner._modules[layer_attr]
                w = layer.to_dense()
                restore_parameter(owner, attr, w.t() if layer.weight_transposed else w)
        replaced: list[str] = []
        for name, m in list(out.named_modules()):
            if not name or any(name.startswith(r + ".") for r in replaced):
                continue  # inside a module already replaced as a whole
            new = _dense_replacement(m)
            if new is not None:
                carry_hooks(m, new)
                parent, _, attr = name.rpartition(".")
                setattr(out.get_submodule(parent) if parent else out, attr, new)
                replaced.append(name)
    if PLAN_ATTR in out.__dict__:
        del out.__dict__[PLAN_ATTR]
    hf_save.unguard(out)  # a dense copy saves and loads as the dense class
    _reflatten_rnns(out)
    return out


def report(module: nn.Module) -> Report:
    """The per-layer table of a converted model (from its decisions, or from its layers).

    Example:
        >>> import torch, sparsify
        >>> m = sparsify.sparsify(torch.nn.Sequential(torch.nn.Linear(256, 256)), density=0.5)
        >>> sparsify.report(m).rows[0]["method"]
        'block_sparse'
    """
    plan = getattr(module, PLAN_ATTR, None)
    if isinstance(plan, Plan):
        return Report.from_plan(plan)
    # A model without its plan (loaded, or built by hand): describe its rewritten layers.
    rows = []
    for name, m in module.named_modules():
        if hasattr(m, "to_dense_module") and hasattr(m, "to_dense") and name:
            w = m.to_dense()
            d = Decision(name=name, layer_type=type(m).__name__, weight_shape=tuple(w.shape),
                         method=getattr(m, "method_name", type(m).__name__), reason="found in the model",
                         params_before=w.numel() + (m.bias.numel() if getattr(m, "bias", None) is not None else 0),
                         params_after=param_count(m))
            rows.append(d.to_dict())
    return Report(rows)
