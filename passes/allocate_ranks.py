"""allocate_ranks: the planning step that needs the weights and the shapes.

It runs after ``annotate_shapes`` and before any factorize pass, changes no
module, and writes into each factorization Decision:

1. concrete ranks (``params["ranks"]``; ``params["rank"]`` an int for
   ``low_rank``) from the layer's own setting: an int, a parameter fraction,
   ``tolerance=``, ``energy=``, ``'vbmf'``, rounded to ``rank_multiple``;
2. for layers with ``compression=`` (and no per-layer rank), ranks from a
   global allocation: each layer gets an error-vs-size curve (relative squared
   weight error, or with ``calibration_data=`` relative squared output error on
   those inputs; size = parameters, or FLOPs with ``flops=True``) and
   :func:`sparsify.ranks.allocate` picks the levels whose summed error is
   smallest within ``sum(before) / compression``.  A layer may come out dense
   (the "dense" level) when no factorization of it is worth its size;
3. the forward (``params["forward"]``, ``result["forward"]`` and why): the
   factorized contraction where its FLOPs are at most the dense layer's and,
   where the shapes are known (example inputs), its roofline cost
   (:func:`~sparsify.passes.costs.roofline_cost`: per stage ``max(FLOPs,
   BALANCE * bytes)``) is at most the dense layer's too; else the weight
   reconstructed from the factors and one dense op.  The reconstructed module
   caches the rebuilt weight in eval mode with grad off, so an inference call
   costs exactly the dense layer's FLOPs (the rebuild is paid once per weight
   change, and every step in training).  With ``forward=`` set in the config,
   that.  A factorization
   with at least the dense layer's parameters is left dense unless
   ``forward=`` forces it.

``low_rank`` decisions with only issue-#2 settings (int / float rank,
tolerance) keep them; their rank is checked against break-even (below).

It also plans what needs the weights for ``block_sparse`` and ``low_rank``
(issue 10):

4. **block_sparse densities by sensitivity.**  With calibration data (or
   ``allocate=True``), ``density=`` is a model-wide target: each layer gets an
   error-vs-size curve over its kept-block counts (relative squared output
   error on the calibration inputs, or weight error without them; size = kept
   blocks x b^2) and :func:`sparsify.ranks.allocate` picks the counts whose
   summed error is smallest within ``density x`` the layers' weight elements.
   A layer whose rule sets ``density=`` keeps it and counts toward the target.
   The curve's error at a count is the saliency error of the dropped blocks
   (exact for uncorrelated inputs), scaled by the ratio of the error after the
   least-squares refit to it, measured at a few counts and interpolated.
5. **never larger than dense** (``dense_if_larger=True``, the default): a
   block-sparse layer (Linear, conv or nn.LSTM, any pattern) whose kept blocks
   (padding included, a conv's blocks times its taps) hold more elements than
   the dense weight, and a low-rank layer whose rank is above break-even
   (``r (in + out) > in out``), stay dense with the reason, ranks as asked
   (never silently clamped).

Allocation with calibration data reads the statistics of the dense model's
layers (one pass over the data, in parts when they would not fit in
``calibrate.STATS_MEMORY``); the conversion itself (``calibrate``) then fits
each layer to the inputs of the partly converted model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from .. import decompose
from .. import ranks as rs
from ..calibration import (
    DEFAULT_DAMPING,
    InputStats,
    centered,
    collect_stats,
    damped,
    output_sq_norm,
    output_variation,
    site_watch,
    weight_groups,
)
from ..errors import InputError
from ..modules.factorized_conv import tt_conv_weight
from ..modules.low_rank import svd_rank
from ..patterns import block_norms, magnitude_layout
from .costs import BALANCE, dense_flops, roofline_cost
from .factorized import FACTORIZED_METHODS, as_layer, build, layer_tensor, param_formula, tokens_of
from .infra import PassContext, PassResult
from .sites import LayerSite, find_sites

__all__ = ["allocate_ranks"]

_PER_LAYER = ("rank", "tolerance", "energy")
_ANCHORS = 6           # levels at which the output error is measured, then interpolated
_SAMPLE_ROWS = 6       # block rows on which a block-sparse layer's refit gain is measured


def _key(site: LayerSite) -> tuple[str, str | None]:
    return site.name, site.nodes[0].name if site.functional else None


def _nominal_input(layer: nn.Module) -> tuple[int, ...]:
    """Without example inputs: 256 tokens for a Linear (the batch its path is planned
    for), one 32x32 image for a conv."""
    if isinstance(layer, nn.Linear):
        return (256, layer.in_features)
    side = [max(32, d * (k - 1) + 1) for k, d in zip(layer.kernel_size, layer.dilation)]
    return (1, layer.in_channels, *side)


def _dense_flops_of(layer: nn.Module, in_shape) -> int:
    """The dense layer's FLOPs with its bias adds, counted as the factorized modules count them."""
    if isinstance(layer, nn.Linear):
        out_shape = tuple(in_shape[:-1]) + (layer.out_features,)
        bias = math.prod(out_shape) if layer.bias is not None else 0
        return dense_flops("Linear", tuple(layer.weight.shape), in_shape, out_shape) + bias
    return build("tucker", layer, (1, 1), meta=True).dense_flops(in_shape)


# ------------------------------------------------------------- per-layer ranks
def _resolve_layer(method: str, layer: nn.Module, p: dict[str, Any]) -> tuple[Any, str | None]:
    """Concrete ranks from the layer's own setting, and a note if they were capped."""
    mult = p.get("rank_multiple", 1)
    rank, tol, energy = p.get("rank"), p.get("tolerance"), p.get("energy")
    ts = layer_tensor(method, layer)
    if method == "low_rank":
        s = torch.linalg.svdvals(ts[0])
        if rank == "vbmf" and tol is None and energy is None:
            r = rs.evbmf_rank(ts[0])
        elif energy is not None and tol is None:
            r = rs.spectrum_rank(s, energy=energy)
        else:
            r = svd_rank(s, rank=rank, tolerance=tol)
        return rs.round_rank(r, mult, s.numel()), None
    if method == "cp":
        r = rs.cp_rank(ts, rank, tolerance=tol, energy=energy, rank_multiple=mult)
        note = None
        if isinstance(rank, int) and r < rank:
            note = (f"rank {rank} capped at {r} (ALS memory limit {decompose.CP_MEMORY_MULTIPLE}x the weight)")
        return r, note
    if method == "tucker":
        modes = list(range(ts[0].dim())) if isinstance(layer, nn.Linear) else [0, 1]
        return rs.tucker_ranks(ts, modes, rank, tolerance=tol, energy=energy, rank_multiple=mult), None
    return rs.tt_ranks(ts, rank, tolerance=tol, energy=energy, rank_multiple=mult), None


# ------------------------------------------------------------------- curves
def _tails(s: torch.Tensor) -> list[float]:
    s2 = s.double().pow(2)
    return torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0]).tolist() + [0.0]


def _weight_levels(method: str, layer: nn.Module, mult: int) -> list[tuple[Any, float]]:
    """``(ranks, relative squared weight error)`` candidates, smallest first (errors
    exact for SVD; for Tucker / TT one minus the product of the kept energy of each
    mode / bond unfolding; measured for CP)."""
    ts = layer_tensor(method, layer)
    total = sum(float(t.pow(2).sum()) for t in ts) or 1.0
    if method == "low_rank":
        tail = _tails(torch.linalg.svdvals(ts[0]))
        n = len(tail) - 1
        levels = sorted({rs.round_rank(r, mult, n) for r in rs.sample_levels(n, 512)})
        return [(r, tail[r] / total) for r in levels]
    if method == "tucker":
        modes = list(range(ts[0].dim())) if isinstance(layer, nn.Linear) else [0, 1]
        tails = [[_tails(decompose.mode_singular_values(t, m)) for m in modes] for t in ts]
        caps = [ts[0].shape[m] for m in modes]

        norms = [tl[0][0] or 1.0 for tl in tails]

        def err(r):
            # the fraction of energy kept is about the product of each mode's kept fraction
            # (exact for a separable spectrum; the additive HOSVD bound overstates the error
            # of flat spectra so much that it starves one mode)
            return sum(n * (1.0 - math.prod(1.0 - tl[j][r[j]] / n for j in range(len(modes))))
                       for n, tl in zip(norms, tails)) / total

        cur = [min(mult, c) for c in caps]
        out = [(tuple(cur), err(cur))]
        while any(c < cap for c, cap in zip(cur, caps)):
            best = None
            for j in range(len(modes)):
                if cur[j] >= caps[j]:
                    continue
                nxt = list(cur)
                nxt[j] = min(caps[j], cur[j] + mult)
                gain = (err(cur) - err(nxt)) / max(1, param_formula(method, layer, nxt) - param_formula(method, layer, cur))
                if best is None or gain > best[0]:
                    best = (gain, nxt)
            cur = best[1]
            out.append((tuple(cur), err(cur)))
        return out
    if method == "tt":
        shape = tuple(ts[0].shape)
        dd = len(shape) // 2
        perm = [i for k in range(dd) for i in (k, dd + k)]
        group_tails = []  # (group energy, tails per bond) for each group (one for a Linear)
        for t in ts:
            merged = t.permute(perm).reshape([shape[k] * shape[dd + k] for k in range(dd)])
            group_tails.append((float(t.pow(2).sum()) or 1.0, [
                _tails(torch.linalg.svdvals(merged.reshape(math.prod(merged.shape[:k]), -1))) for k in range(1, dd)]))
        caps = rs.tt_caps(shape)
        levels = sorted({rs.round_rank(r, mult, max(caps)) for r in rs.sample_levels(max(caps), 128)})
        out = []
        for r in levels:
            ranks = tuple(rs._tt_uniform(shape, r))
            lost = sum(n * (1.0 - math.prod(1.0 - tl[ranks[k + 1]] / n for k, tl in enumerate(tails)))
                       for n, tails in group_tails)
            out.append((ranks, lost / total))
        return out
    # cp: measured at a few ranks (short ALS runs), interpolated between them
    shape = tuple(ts[0].shape)
    dense = layer.weight.numel()
    r_max = 1
    while r_max < decompose.cp_max_rank(tuple(shape)) and param_formula("cp", layer, r_max + 1) < dense:
        r_max += 1
    grid = sorted({rs.round_rank(r, mult, r_max) for r in rs.sample_levels(r_max, 64)})
    anchors = sorted({grid[round(i * (len(grid) - 1) / 4)] for i in range(5)})
    known = {}
    for r in anchors:
        e = 0.0
        for t in ts:
            w, fs = decompose.cp(t, r, n_iter_max=15)
            e += float((rs._cp_full(w, fs) - t).pow(2).sum())
        known[r] = e / total
    return list(zip(grid, rs.interpolate_errors(grid, known)))


def _reconstruct(method: str, layer: nn.Module, ranks: Any) -> torch.Tensor:
    """A quick reconstruction at ``ranks`` (truncated SVD / HOSVD / TT-SVD / short ALS)."""
    ts = layer_tensor(method, layer)
    outs = []
    for t in ts:
        if method == "low_rank":
            u, s, vh = torch.linalg.svd(t, full_matrices=False)
            outs.append((u[:, :ranks] * s[:ranks]) @ vh[:ranks])
        elif method == "tucker":
            modes = list(range(t.dim())) if isinstance(layer, nn.Linear) else [0, 1]
            core, fs = decompose.tucker(t, ranks, modes, n_iter_max=0)
            rec = core
            for m, f in zip(modes, fs):
                rec = torch.movedim(torch.tensordot(f, rec, dims=([1], [m])), 0, m)
            outs.append(rec)
        elif method == "tt":
            cores = decompose.tt_matrix(t, ranks)
            rec = cores[0]
            for c in cores[1:]:
                rec = torch.tensordot(rec, c, dims=([-1], [0]))
            dd = len(cores)
            rec = rec.reshape([x for c in cores for x in c.shape[1:3]])
            perm = [2 * k for k in range(dd)] + [2 * k + 1 for k in range(dd)]
            rec = rec.permute(perm)
            outs.append(rec if isinstance(layer, nn.Linear) else tt_conv_weight(rec))
        else:
            w, fs = decompose.cp(t, ranks, n_iter_max=15)
            outs.append(rs._cp_full(w, fs))
    return torch.cat([o.reshape(-1, *layer.weight.shape[1:]) for o in outs]).reshape(layer.weight.shape)


def _output_levels(method: str, layer: nn.Module, levels, st: InputStats, damping: float,
                   center: bool = False) -> list[float]:
    """Relative squared output error on the calibration inputs (statistics ``st``) for each level:
    exact for low rank (the tail of the whitened spectrum: what the whitened SVD reaches); for
    the others the weight-only decomposition's, measured at a few levels (``tr(D H D^T)``) and
    the ratio to the weight error interpolated in between."""
    groups = getattr(layer, "groups", 1)
    w = weight_groups(layer.weight, groups)
    y2 = output_variation(w, st) or output_sq_norm(w, layer.bias, st) or 1.0
    h = centered(st) if center and layer.bias is not None else st.h  # the bias takes the mean (calibrate)
    if method == "low_rank":
        from ..calibration import whitened_svd

        hd, _ = damped(h, damping)
        s, _ = whitened_svd(w[0], hd[0])
        tail = _tails(s)
        return [tail[r] / y2 for r, _ in levels]
    idx = sorted({round(i * (len(levels) - 1) / (_ANCHORS - 1)) for i in range(_ANCHORS)})
    ratio = {}
    for i in idx:
        ranks, werr = levels[i]
        dw = w - weight_groups(_reconstruct(method, layer, ranks), groups)
        e = float(torch.einsum("god,gde,goe->", dw, h, dw)) / y2
        ratio[float(i)] = e / werr if werr > 0 else 1.0
    q = rs.interpolate_errors([float(i) for i in range(len(levels))], ratio)
    return [werr * qi for (_, werr), qi in zip(levels, q)]


def _curve(d, method: str, layer: nn.Module, p: dict[str, Any], st: InputStats | None, ctx) -> rs.Curve:
    mult = p.get("rank_multiple", 1)
    levels = _weight_levels(method, layer, mult)
    damping = getattr(ctx.config, "calibration_damping", DEFAULT_DAMPING)
    center = getattr(ctx.config, "correct_bias", True)
    errors = [e for _, e in levels] if st is None else _output_levels(method, layer, levels, st, damping, center)
    use_flops = bool(p.get("flops"))
    in_shape = d.input_shape
    out = []
    hint = tokens_of(in_shape) if isinstance(layer, nn.Linear) else 256
    for (ranks, _), e in zip(levels, errors):
        if method != "low_rank" or use_flops:
            flops, _, _ = _chosen_flops(build(method, layer, ranks, meta=True, batch_hint=hint), d, layer, p)
        size = flops if use_flops else param_formula(method, layer, ranks)
        out.append((float(size), float(e), ranks))
    dense_size = (d.flops_before if use_flops else d.params_before)
    out.append((float(dense_size), 0.0, "dense"))
    return rs.Curve(d.name if d.node is None else f"{d.name}@{d.node}", out)


# ------------------------------------------------------------------ forward
def _chosen_flops(meta: nn.Module, d, layer: nn.Module, p: dict[str, Any]) -> tuple[int, str, str]:
    """``(FLOPs, forward, why)`` of the forward the planner picks for ``meta``'s ranks."""
    forced = p.get("forward", "auto")
    nominal = d.input_shape is None
    in_shape = _nominal_input(layer) if nominal else d.input_shape
    if isinstance(meta, nn.Module) and not hasattr(meta, "factorized_flops"):  # LowRankLinear
        return int(meta.flops(in_shape)), "factorized", "LowRankLinear has only the factorized forward"
    dense = _dense_flops_of(layer, in_shape)
    fact, rebuild = meta.factorized_flops(in_shape), meta.reconstruction_flops()
    at = f" at a nominal input {in_shape} (no example_inputs)" if nominal else ""
    rec = (f"the weight is rebuilt from the factors ({_n(rebuild)} FLOPs, once per weight change in inference, "
           f"where it is cached; every step in training) and used in one dense op: {_n(dense)} FLOPs per "
           "inference call, the dense layer's")
    if forced == "factorized":
        return fact, forced, f"forward='factorized' set in the config ({_n(fact)} FLOPs, dense {_n(dense)})"
    if forced == "reconstructed":
        return dense, forced, f"forward='reconstructed' set in the config; {rec}"
    if fact > dense:
        return dense, "reconstructed", f"the factorized contraction would cost {_n(fact)} FLOPs > dense {_n(dense)}{at}; {rec}"
    if nominal:
        return fact, "factorized", f"{_n(fact)} FLOPs <= dense {_n(dense)}{at}"
    size = layer.weight.element_size()
    fc, dc = roofline_cost(meta.factorized_stages(in_shape), size), roofline_cost(meta.dense_stages(in_shape), size)
    cost = f"roofline cost (per stage max(FLOPs, {BALANCE:g} x bytes))"
    if fc > dc:
        return dense, "reconstructed", (f"the factorized forward has {_n(fact)} FLOPs <= dense {_n(dense)}, but its "
                                        f"memory-bound stages make its {cost} {_n(fc)} > dense {_n(dc)}; {rec}")
    return fact, "factorized", f"{_n(fact)} FLOPs <= dense {_n(dense)}, {cost} {_n(fc)} <= dense {_n(dc)}"


def _n(x: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return str(x)


# ------------------------------------------------------------- calibration
def _dense_stats(module: nn.Module, ctx: PassContext, items: list, visit) -> None:
    """``visit(item, stats or None)`` for every ``(decision, site)`` item, with the statistics of
    the site's inputs in the model as it is now (dense) on the calibration data; in parts that
    fit ``calibrate.STATS_MEMORY``, each part one pass over the data, its statistics dropped
    after its visits."""
    from .calibrate import STATS_MEMORY, _stat_bytes

    data = getattr(ctx, "calibration", None)
    if data is None:
        for it in items:
            visit(it, None)
        return
    parts, part, used = [], [], 0
    for it in items:
        size = _stat_bytes(it[1])
        if part and used + size > STATS_MEMORY:
            parts.append(part)
            part, used = [], 0
        part.append(it)
        used += size
    if part:
        parts.append(part)
    for part in parts:
        watches = [site_watch(site) for _, site in part]
        try:
            stats = collect_stats(module, watches, data)
        except InputError:
            raise  # the data itself (non-finite inputs), said as such
        except Exception as exc:
            raise ValueError(f"sparsify(calibration_data=...): the model did not run on it "
                             f"({type(exc).__name__}: {exc}); pass inputs its forward accepts.") from exc
        for it in part:
            visit(it, stats.get(it[1].key))
        del stats


def _sensitivities(module: nn.Module, ctx: PassContext, items: list) -> dict:
    """``site key -> s^2``: how much the model's output moves per unit of each layer's relative output
    error (``calibration.sensitivity``), so the allocation weighs each layer's error by its effect on
    the model.  Layers it cannot perturb alone get the median; all 1 without calibration data or with
    ``sensitivity=False``."""
    from ..calibration import sensitivity

    data = getattr(ctx, "calibration", None)
    if data is None or not getattr(ctx.config, "sensitivity", True):
        return {it[1].key: 1.0 for it in items}
    try:
        s = sensitivity(module, [site_watch(site) for _, site in items], data)
    except Exception as exc:
        raise ValueError(f"sparsify(calibration_data=...): the model did not run on it "
                         f"({type(exc).__name__}: {exc}); pass inputs its forward accepts.") from exc
    vals = sorted(s.values())
    median = vals[len(vals) // 2] if vals else 1.0
    return {it[1].key: s.get(it[1].key, median) ** 2 for it in items}


def _weighted(curve: rs.Curve, weight: float) -> rs.Curve:
    return rs.Curve(curve.name, [(size, err * weight, spec) for size, err, spec in curve.levels])


# ------------------------------------------------------------ block sparse
def _block_levels(d, site: LayerSite, st: InputStats | None, damping: float, center: bool = False) -> rs.Curve:
    """Kept-block counts of one layer with their estimated relative squared output (or weight)
    error; see the module docstring (4)."""
    from ..calibration import refit_blocks

    b = d.params["block_size"]
    # On the CPU whatever the model's device: the layouts it scores are built there
    # (magnitude_layout), and the 40-level curve is bookkeeping, not a hot path.
    w = site.weight.detach().to("cpu", torch.float64)
    if st is not None:
        st = dataclasses.replace(st, h=st.h.cpu(), s=st.s.cpu())
    bias = None if site.bias is None else site.bias.detach().cpu()
    out_f, in_f = w.shape
    nbr, nbc = -(-out_f // b), -(-in_f // b)
    total_blocks = nbr * nbc
    if st is None:
        hd = None
        scale = torch.ones(in_f, dtype=torch.float64)
        y2 = float(w.pow(2).sum()) or 1.0
    else:
        h = centered(st) if center and bias is not None else st.h  # the bias takes the mean
        hd = damped(h, damping)[0][0]
        scale = hd.diagonal().clamp_min(0).sqrt()
        y2 = output_variation(w[None], st) or output_sq_norm(w[None], bias, st) or 1.0
    ws = w * scale[None, :]
    scores = block_norms(ws, b).pow(2)
    first = scores.argmax(1)
    keep0 = torch.zeros_like(scores, dtype=torch.bool)
    keep0[torch.arange(nbr), first] = True
    rest = scores.masked_fill(keep0, -1.0).flatten()
    ordered = torch.sort(rest, descending=True, stable=True).values[: total_blocks - nbr]
    kept = float(scores[keep0].sum()) + torch.cat([torch.zeros(1, dtype=torch.float64),
                                                   torch.cumsum(ordered.clamp_min(0), 0)])
    total = float(scores.sum())
    extra = sorted({0, *rs.sample_levels(total_blocks - nbr, 40)}) if total_blocks > nbr else [0]
    dense = w.numel()
    grid = [j for j in extra if (nbr + j) * b * b < dense]  # every block kept: the dense level instead
    if not grid:
        return rs.Curve(_label(d), [(float(dense), 0.0, "dense")])
    est = [max(total - float(kept[j]), 0.0) / y2 for j in grid]
    if st is not None:
        anchors = sorted({grid[round(i * (len(grid) - 1) / 4)] for i in range(5)})
        ratio = {}
        # the refit's gain is measured on a few block rows (it is a ratio per layer, and the
        # solves of every row at every anchor would cost more than the conversion itself)
        sample = sorted({round(i * (nbr - 1) / max(1, _SAMPLE_ROWS - 1)) for i in range(min(nbr, _SAMPLE_ROWS))})
        rows = torch.cat([torch.arange(r * b, min((r + 1) * b, out_f)) for r in sample])
        for j in anchors:
            gi = grid.index(j)
            if est[gi] <= 0:
                continue
            mask = magnitude_layout(ws, density=(nbr + j) / total_blocks, block_size=b).block_mask()
            dropped = float(scores[sample][~mask[sample]].sum())
            if dropped <= 0:
                continue
            refit = refit_blocks(w, hd, mask, b, rows=sample)
            dw = (w - refit)[rows][None]
            true = float(torch.einsum("god,gde,goe->", dw, h, dw))
            ratio[float(gi)] = true / dropped
        if ratio:
            q = rs.interpolate_errors([float(i) for i in range(len(grid))], ratio)
            est = [e * qi for e, qi in zip(est, q)]
    levels = [(float((nbr + j) * b * b), e, (nbr + j) / total_blocks) for j, e in zip(grid, est)]
    levels.append((float(dense), 0.0, "dense"))
    return rs.Curve(_label(d), levels)


def _label(d) -> str:
    return d.name if d.node is None else f"{d.name}@{d.node}"


def linear_block_sparse(d) -> bool:
    """A block_sparse decision on a linear-like layer that keeps the trained weight's blocks (the
    conversions calibration and allocation serve; convs, LSTMs and from-scratch patterns are
    ``block_sparsify_layers``')."""
    return (d.method == "block_sparse" and d.layer_type not in ("Conv1d", "Conv2d", "LSTM")
            and d.params.get("layout", "magnitude") == "magnitude" and d.params.get("init", "copy") == "copy")


def _allocate_blocks(module: nn.Module, ctx: PassContext, sites: dict, plan) -> None:
    cfg = ctx.config
    ds = [d for d in plan.decisions if linear_block_sparse(d)]
    if not ds:
        return
    data = getattr(ctx, "calibration", None)
    allocate = getattr(cfg, "allocate", None)
    if not (allocate if allocate is not None else data is not None):
        return
    pinned, groups = [], {}
    for d in ds:
        _, _, rule = cfg.choose(d.name, sites[(d.name, d.node)].rule_types)
        if rule is not None and "density" in rule.params:
            pinned.append(d)
        else:
            groups.setdefault(float(d.params["density"]), []).append(d)
    damping = getattr(cfg, "calibration_damping", DEFAULT_DAMPING)
    center = getattr(cfg, "correct_bias", True)
    fixed = sum(_block_elements(d) for d in pinned)
    for density, group in groups.items():
        curves: dict[int, rs.Curve] = {}
        items = [(d, sites[(d.name, d.node)]) for d in group]
        _dense_stats(module, ctx, items,
                     lambda it, st, curves=curves: curves.__setitem__(id(it[0]), _block_levels(
                         it[0], it[1], st, damping, center)))
        weights = _sensitivities(module, ctx, items)
        cs = [_weighted(curves[id(d)], weights[site.key]) for d, site in items]
        total = sum(math.prod(d.weight_shape) for d in group + pinned)
        budget = density * total
        where = f"density={density:g} across {len(group) + len(pinned)} block_sparse layers"
        least = fixed + sum(c.levels[c.hull[0]][0] for c in cs)
        if least > budget:
            ctx.notes.append(f"{where}: below one block per block row; every allocated layer keeps one block per "
                             f"block row ({least / total:.3g} of the weight elements)")
            budget = least
        rs.allocate(cs, budget, fixed=fixed)
        what = "output" if data is not None else "weight"
        got = fixed + sum(c.size for c in cs)
        ctx.notes.append(f"{where} allocated by sensitivity ({what} error): {got / total:.3g} of the weight "
                         f"elements kept")
        for d, c in zip(group, cs):
            if c.spec == "dense":
                d.method, d.params = "dense", {}
                d.reason += (f"; the model-wide allocation ({where}) kept it dense: its blocks buy more "
                             f"{what} error per element than the other layers' blocks")
                continue
            d.params = {**d.params, "density": float(c.spec)}
            d.result["allocated_error"] = c.error
            d.reason += (f"; density {c.spec:.3g} from the model-wide allocation ({where}; est. rel. sq. {what} "
                         f"error {c.error:.3g})")


def _block_elements(d) -> int:
    """Weight elements the block-sparse layer of ``d`` stores (padding included)."""
    from ..patterns import target_blocks

    b = d.params["block_size"]
    out_f, in_f = d.weight_shape[0], math.prod(d.weight_shape[1:])
    nbr, nbc = -(-out_f // b), -(-in_f // b)
    return target_blocks(nbr, nbc, float(d.params["density"])) * b * b


# ------------------------------------------------------------ never larger than dense
def _block_sparse_size(d, site: LayerSite | None) -> tuple[int, int, str] | None:
    """``(weight elements the block-sparse layer of d stores, the dense layer's, what the blocks are)``,
    counted as the layer stores them: a Linear ``nnz`` blocks ``b x b``; a conv ``nnz`` channel blocks
    ``b x b`` times its taps; an nn.LSTM its stacked ``W_ih`` / ``W_hh`` of every layer and direction.
    Blocks cover padded rows and columns, so a thin weight (3 input channels at b=32) stores far more
    than it holds.  None for a layer ``block_sparsify_layers`` refuses (it says why itself)."""
    from ..patterns import pattern_blocks, target_blocks
    from .block_sparsify_layers import _refusal

    p = d.params
    b, density = p["block_size"], float(p["density"])
    magnitude = p.get("layout", "magnitude") == "magnitude"

    def blocks(rows: int, cols: int, gates: int = 1) -> int:
        # magnitude: one layout over the whole (stacked) weight; from-scratch: one pattern per gate, stacked
        if magnitude:
            return target_blocks(-(-gates * rows // b), -(-cols // b), density)
        return gates * pattern_blocks(-(-rows // b), -(-cols // b), density)

    if d.layer_type in ("Conv1d", "Conv2d", "LSTM") and (site is None or _refusal(site, p) is not None):
        return None
    if d.layer_type == "LSTM":
        m = site.module
        dirs, h = (2 if m.bidirectional else 1), m.hidden_size
        stored = dense = 0
        for layer in range(m.num_layers):
            for cols in (m.input_size if layer == 0 else h * dirs, h):
                stored += dirs * blocks(h, cols, gates=4) * b * b
                dense += dirs * 4 * h * cols
        return stored, dense, f"{b}x{b} blocks"
    if d.layer_type in ("Conv1d", "Conv2d"):
        out_c, in_c, *kernel = d.weight_shape
        taps = math.prod(kernel)
        return (blocks(out_c, in_c) * b * b * taps, math.prod(d.weight_shape),
                f"{b}x{b} channel blocks over {taps} kernel taps")
    out_f, in_f = d.weight_shape[0], math.prod(d.weight_shape[1:])
    return blocks(out_f, in_f) * b * b, out_f * in_f, f"{b}x{b} blocks"


def _larger_than_dense(plan, ctx: PassContext, sites: dict) -> None:
    if not getattr(ctx.config, "dense_if_larger", True):
        return
    data = getattr(ctx, "calibration", None)
    for d in plan.decisions:
        if d.method == "block_sparse":
            size = _block_sparse_size(d, sites.get((d.name, d.node)))
            if size is not None and size[0] > size[1]:
                stored, dense, what = size
                d.reason += (f"; left dense: at density {d.params['density']:g} its {what} hold {stored} elements "
                             f"(padding included), more than the dense {'weights' if d.layer_type == 'LSTM' else 'weight'}"
                             f"'s {dense}; dense_if_larger=False converts it anyway")
                d.method, d.params = "dense", {}
        elif d.method == "low_rank":
            p = d.params
            out_f, in_f = d.weight_shape
            full = min(out_f, in_f)
            r = p.get("rank")
            if p.get("tolerance") is not None and not isinstance(r, int):
                if data is not None:
                    continue  # decided on the whitened spectrum in calibrate
                s = torch.linalg.svdvals(sites[(d.name, d.node)].weight.detach().double())
                r = svd_rank(s, tolerance=p["tolerance"])
                why = f"from tolerance={p['tolerance']}"
            elif isinstance(r, bool) or not isinstance(r, (int, float)):
                continue
            else:
                why = f"rank={r!r}"
                r = max(1, min(full, round(r * full))) if isinstance(r, float) else int(r)
            if r * (in_f + out_f) > in_f * out_f:
                even = (in_f * out_f) // (in_f + out_f)
                d.reason += (f"; left dense: rank {r} ({why}) is above break-even rank {even} for a {out_f}x{in_f} "
                             f"weight ({r * (in_f + out_f)} parameters > {in_f * out_f} dense); "
                             "dense_if_larger=False converts it anyway")
                d.method, d.params = "dense", {}


# --------------------------------------------------------------------- pass
def _passes_through(d) -> bool:
    p = d.params
    return (d.method == "low_rank" and p.get("compression") is None and p.get("energy") is None
            and p.get("rank") != "vbmf" and p.get("rank_multiple", 1) == 1)


def allocate_ranks(module: nn.Module, ctx: PassContext) -> PassResult:
    plan = ctx.plan
    if plan is None:
        return PassResult(module, False)
    data = getattr(ctx, "calibration", None)
    if data is not None:
        desc = data.describe()
        for d in plan.decisions:
            if "calibration_data" in d.params:  # a decision stays JSON-ready: what the data was, not the data
                d.params = {**d.params, "calibration_data": desc}
    if not any(d.rewrites for d in plan.decisions):
        return PassResult(module, False)
    sites = {_key(s): s for s in find_sites(module, ctx)}
    _allocate_blocks(module, ctx, sites, plan)
    todo = [d for d in plan.decisions if d.method in FACTORIZED_METHODS and not _passes_through(d)]
    fixed, pooled = [], {}
    for d in todo:
        p = d.params
        if any(p.get(k) is not None for k in _PER_LAYER):
            fixed.append(d)
        else:
            pooled.setdefault((float(p["compression"]), bool(p.get("flops"))), []).append(d)
    for d in fixed:
        layer = as_layer(sites[(d.name, d.node)])
        ranks, note = _resolve_layer(d.method, layer, d.params)
        _set_ranks(d, ranks)
        if note:
            d.reason += f"; {note}"
    for (compression, use_flops), group in pooled.items():
        _allocate_group(module, ctx, sites, group, fixed, compression, use_flops)
    for d in todo:
        if d.method in ("cp", "tucker", "tt"):
            _plan_forward(d, as_layer(sites[(d.name, d.node)]))
    _larger_than_dense(plan, ctx, sites)
    return PassResult(module, False)


def _set_ranks(d, ranks) -> None:
    if d.method == "low_rank":
        d.params = {**d.params, "rank": int(ranks), "tolerance": None}
    else:
        d.params = {**d.params, "ranks": ranks}


def _allocate_group(module, ctx, sites, group, fixed, compression, use_flops) -> None:
    where = f"compression={compression}" + (", flops=True" if use_flops else "")
    if use_flops and any(d.input_shape is None for d in group):
        raise ValueError(f"sparsify({where}): a FLOP target needs the layers' shapes; pass example_inputs=.")
    curves_by: dict[int, rs.Curve] = {}

    def visit(it, st):
        d = it[0]
        curves_by[id(d)] = _curve(d, d.method, as_layer(it[1]), d.params, st, ctx)

    items = [(d, sites[(d.name, d.node)]) for d in group]
    _dense_stats(module, ctx, items, visit)
    calib = getattr(ctx, "calibration", None)
    weights = _sensitivities(module, ctx, items)
    curves = [_weighted(curves_by[id(d)], weights[site.key]) for d, site in items]
    # layers of the same method and settings with a per-layer rank count toward the target as they are
    same = [d for d in fixed if d.params.get("compression") == compression and bool(d.params.get("flops")) == use_flops]
    before = sum((d.flops_before if use_flops else d.params_before) or 0 for d in group + same)
    fixed_size = 0.0
    for d in same:
        layer = as_layer(sites[(d.name, d.node)])
        ranks = d.params["rank"] if d.method == "low_rank" else d.params["ranks"]
        if use_flops:
            meta = build(d.method, layer, ranks, meta=True, batch_hint=tokens_of(d.input_shape))
            fixed_size += _chosen_flops(meta, d, layer, d.params)[0]
        else:
            fixed_size += param_formula(d.method, layer, ranks)
    budget = before / compression
    try:
        rs.allocate(curves, budget, fixed=fixed_size)
    except ValueError as exc:
        raise ValueError(f"sparsify({where}): unreachable: {exc}. Lower compression= or leave more layers "
                         "to the allocation.") from None
    unit = "FLOPs" if use_flops else "parameters"
    got = fixed_size + sum(c.size for c in curves)
    if got < 0.98 * budget:
        ctx.notes.append(
            f"{where}: reached {before / max(got, 1):.3g}x, not {compression:g}x: the largest factorizations whose "
            "forward costs no more than the dense layers (at these shapes) are smaller than the target asks")
    for d, c in zip(group, curves):
        if c.spec == "dense":
            d.method = "dense"
            d.reason += (f"; the global allocation ({where}) kept it dense: a factorization gains less "
                         "error per unit of size elsewhere")
            d.params = {}
            continue
        _set_ranks(d, c.spec)
        what = "output" if calib is not None else "weight"
        d.result["allocated_error"] = c.error
        d.reason += f"; ranks from the global allocation ({where}, {unit}; est. rel. sq. {what} error {c.error:.3g})"


def _plan_forward(d, layer: nn.Module) -> None:
    p = d.params
    ranks = p["ranks"]
    params_after = param_formula(d.method, layer, ranks)
    if p.get("forward", "auto") == "auto" and params_after >= d.params_before:
        d.method = "dense"
        d.reason += (f"; left dense: the factorization at ranks {ranks} has {params_after} parameters, "
                     f"not fewer than the dense layer's {d.params_before}")
        d.params = {}
        return
    tokens = tokens_of(d.input_shape) if isinstance(layer, nn.Linear) else 256
    meta = build(d.method, layer, ranks, meta=True, batch_hint=tokens)
    _, forward, why = _chosen_flops(meta, d, layer, p)
    d.params = {**p, "forward": forward, "batch_hint": tokens}
    d.result["forward"] = forward
    d.result["forward_reason"] = why
    d.reason += f"; forward {forward}: {why}"

