"""calibrate: with calibration data, convert the planned layers in forward order, each from
the statistics of the inputs it receives in the partly converted model.

Runs after ``allocate_ranks`` (which fixed every layer's density / ranks) and before the
rewrite passes, and only when ``sparsify(..., calibration_data=...)`` was given.

1. One forward pass on the first batch records the order in which the planned layers are
   first called, and which of them read the same input tensor (q / k / v of an attention
   block).  Runs of such layers form a *stage*.
2. Stage by stage, in forward order: every batch runs through the model as converted so
   far, stopping as soon as the stage's layers have made their calls, while a
   ``TorchFunctionMode`` accumulates each layer's input moment ``H = sum x x^T`` in
   float64 (``sparsify.calibration``); then the stage's layers are converted from their
   statistics and installed.  So each layer is fitted to the inputs that the already
   converted layers before it produce, not to the dense model's (``sequential=False``:
   one stage, every layer from the dense model's inputs, one pass).
3. Block-sparse layers: saliency (or OBS) selection and least-squares refit; low rank:
   whitened SVD; CP / Tucker / TT: the weight-only decomposition, then its factors refit
   against the layer's outputs (L-BFGS on ``tr(D H D^T)``) where one evaluation is cheap
   enough to pay.  Every converted layer records its relative output error on the
   calibration inputs (``Decision.result["output_error"]``) and how it was fitted
   (``result["calibration"]``).

A planned layer the calibration data never reaches is left to the rewrite passes, which
convert it from its weights alone; its reason says so.  The rewrite passes skip the
decisions this pass carried out.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..calibration import (
    DEFAULT_DAMPING,
    InputStats,
    centered,
    collect_stats,
    corrected_bias,
    damped,
    output_error,
    probe,
    refit_factors,
    site_watch,
    weight_groups,
)
from ..decision import Plan
from .block_sparsify import convert as _block_sparse_convert
from .factorize_low_rank import convert as _low_rank_convert
from .factorize_low_rank import whitened_rank
from .factorized import as_layer, build
from .infra import PassContext, PassResult, tidy
from .rewrite import carry_out
from .sites import LayerSite, find_sites

__all__ = ["calibrate", "STATS_MEMORY"]

#: Statistics held at once (bytes); a stage that needs more is split (each part its own pass).
STATS_MEMORY = 2 << 30


def _refit_converter(method: str):
    def convert(site: LayerSite, params: dict, stats: InputStats, damping: float,
                correct_bias: bool = True) -> tuple[nn.Module, dict]:
        layer = as_layer(site)
        new = build(method, layer, params["ranks"], forward=params.get("forward", "factorized"),
                    batch_hint=params.get("batch_hint", 256))
        produced: dict[str, Any] = {"rank": new.ranks, "relative_error": new.relative_error,
                                    "forward": new.forward_mode}
        w = layer.weight.detach()
        groups = getattr(layer, "groups", 1)
        wg = weight_groups(w, groups)
        center = correct_bias and layer.bias is not None
        hd, _ = damped((centered(stats) if center else stats.h).to(w.device), damping)

        def error() -> float:
            wn = weight_groups(new.to_dense().detach(), groups)
            if not center:
                return output_error(wg, wn, layer.bias, stats)
            return output_error(wg, wn, layer.bias, stats, bias_new=corrected_bias(wg, wn, layer.bias, stats))

        before = error()
        fit = refit_factors(new, w, hd, groups)
        after = error()
        if center:
            with torch.no_grad():
                new.bias.copy_(corrected_bias(wg, weight_groups(new.to_dense().detach(), groups), layer.bias, stats))
        if "skipped" in fit:
            how = f"weight-only {method} (factors not refit: {fit['skipped']}); output error {after:.3g}"
        elif after < before:
            how = (f"weight-only {method}, then the factors refit against the layer's outputs on the calibration "
                   f"inputs (L-BFGS, up to {fit['evaluations']} evaluations, {fit['seconds']:.1f} s): output error "
                   f"{before:.3g} -> {after:.3g}")
            with torch.no_grad():
                produced["relative_error"] = float(torch.linalg.norm(new.to_dense().double() - w.double())
                                                   / torch.linalg.norm(w.double()).clamp_min(1e-300))
        else:
            how = f"weight-only {method} (a refit against the outputs did not lower the error); output error {after:.3g}"
        produced["output_error"] = after
        produced["calibration"] = how + ("; bias corrected for the mean input" if center else "")
        return new, produced
    return convert


_CONVERTERS = {
    "block_sparse": _block_sparse_convert,
    "low_rank": _low_rank_convert,
    "cp": _refit_converter("cp"),
    "tucker": _refit_converter("tucker"),
    "tt": _refit_converter("tt"),
}


def _split(stages: list[list], sizes: dict) -> list[list]:
    out = []
    for stage in stages:
        part, used = [], 0
        for k in stage:
            if part and used + sizes[k] > STATS_MEMORY:
                out.append(part)
                part, used = [], 0
            part.append(k)
            used += sizes[k]
        if part:
            out.append(part)
    return out


def _stat_bytes(site: LayerSite) -> int:
    w = site.weight
    groups = getattr(site.module, "groups", 1) if w.dim() > 2 else 1
    d = w[0].numel()
    return groups * d * d * 8


def _low_rank_plan(d, site: LayerSite, st: InputStats, damping: float, cfg) -> Any:
    """The whitened rank of a low-rank decision (known only now for ``tolerance=``); a rank
    past break-even leaves the layer dense, with the reason."""
    w = site.weight.detach()
    center = getattr(cfg, "correct_bias", True) and site.bias is not None
    res = whitened_rank(w, st, d.params, damping, center)
    r = res[0]
    out_f, in_f = w.shape
    if getattr(cfg, "dense_if_larger", True) and r * (in_f + out_f) > in_f * out_f:
        even = (in_f * out_f) // (in_f + out_f)
        d.method = "dense"
        d.reason += (f"; left dense: rank {r} (from tolerance={d.params.get('tolerance')} on the whitened spectrum) "
                     f"is above break-even rank {even}: {r * (in_f + out_f)} parameters > the dense {in_f * out_f}")
        d.params = {}
        return None
    asked = d.params.get("rank")
    if isinstance(asked, int) and not isinstance(asked, bool) and asked > r:
        d.reason += (f"; rank={asked} asked; a {out_f}x{in_f} weight has rank at most {min(out_f, in_f)}, "
                     f"so rank {r} was used")
    d.params = {**d.params, "rank": int(r), "tolerance": None}
    return res


def calibrate(module: nn.Module, ctx: PassContext) -> PassResult:
    data = getattr(ctx, "calibration", None)
    plan = ctx.plan
    if data is None or plan is None:
        return PassResult(module, False)
    from .allocate_ranks import linear_block_sparse

    decisions = {(d.name, d.node): d for d in plan.decisions
                 if d.site and d.rewrites and d.method in _CONVERTERS and "module" not in d.result
                 and (d.method != "block_sparse" or linear_block_sparse(d))}
    for d in plan.decisions:
        if d.method == "block_sparse" and d.rewrites and not linear_block_sparse(d):
            d.reason += ("; chosen without the calibration data (it refits block-sparse Linear layers that keep "
                         "the trained blocks; convs, LSTMs and from-scratch patterns are not calibrated)")
    if not decisions:
        return PassResult(module, False)
    cfg = ctx.config
    damping = getattr(cfg, "calibration_damping", DEFAULT_DAMPING)
    sequential = getattr(cfg, "sequential", True)
    sites = {s.key: s for s in find_sites(module, ctx) if s.key in decisions}
    watches = [site_watch(s) for s in sites.values()]
    try:
        order = probe(module, watches, data)
    except Exception as exc:
        raise ValueError(f"sparsify(calibration_data=...): the model did not run on the first batch "
                         f"({type(exc).__name__}: {exc}); give batches its forward accepts.") from exc
    stages = order.stages() if sequential else [list(order.keys)]
    stages = _split(stages, {k: _stat_bytes(sites[k]) for k in order.keys})
    modified = False
    for i, stage in enumerate(stages):
        if ctx.progress is not None:
            ctx.progress(f"calibration stage {i + 1}/{len(stages)}: {', '.join(k[0] for k in stage)}")
        current = {s.key: s for s in find_sites(module, ctx) if s.key in stage}
        ws = [site_watch(s) for s in current.values()]
        stats = collect_stats(module, ws, data, stop_counts={k: order.calls[k] for k in current})
        whitened = {}
        by_method: dict[str, list] = {}
        for k in stage:
            d = decisions[k]
            st = stats.get(k)
            if st is None or k not in current:
                continue
            if d.method == "low_rank":
                whitened[k] = _low_rank_plan(d, current[k], st, damping, cfg)
                if d.method == "dense":
                    continue
            by_method.setdefault(d.method, []).append(d)
        for method, ds in by_method.items():
            convert = _CONVERTERS[method]

            def run(site, params, convert=convert, method=method, whitened=whitened, stats=stats):
                extra = ({"whitened": whitened.get(site.key)} if method == "low_rank" else
                         {"selection": getattr(cfg, "block_selection", "saliency")} if method == "block_sparse" else {})
                extra["correct_bias"] = getattr(cfg, "correct_bias", True)
                return convert(site, params, stats[site.key], damping, **extra)

            sub = dataclasses.replace(ctx, plan=Plan(ds, plan.traced, plan.capture_note, plan.notes))
            carry_out(module, sub, method, run)
            modified = True
        if modified and isinstance(module, fx.GraphModule):
            tidy(module)  # the next stage runs the graph: its code must call the new modules
    for k, d in decisions.items():
        if d.rewrites and k not in order.calls:
            d.reason += "; the calibration data never reached it: converted from its weights alone"
    plan.notes.append(f"calibrated on {data.describe()}; {'sequentially, ' if sequential else ''}"
                      f"{len(stages)} stage{'s' if len(stages) != 1 else ''}, damping {damping:g}")
    return PassResult(module, modified)
