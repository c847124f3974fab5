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
tolerance) pass through untouched.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import decompose
from .. import ranks as rs
from ..modules.factorized_conv import tt_conv_weight
from ..modules.low_rank import svd_rank
from .costs import BALANCE, dense_flops, roofline_cost
from .factorized import FACTORIZED_METHODS, as_layer, build, layer_tensor, param_formula, tokens_of
from .infra import PassContext, PassResult
from .sites import LayerSite, find_sites

__all__ = ["allocate_ranks"]

_PER_LAYER = ("rank", "tolerance", "energy")
_CALIB_ROWS = 2048     # Linear inputs kept for the output error (rows)
_CALIB_SAMPLES = 8     # conv inputs kept (batch entries)
_ANCHORS = 6           # levels at which the output error is measured, then interpolated


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


def _op(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, w)
    return layer._conv_forward(x, w, None)


def _output_levels(method: str, layer: nn.Module, levels, x: torch.Tensor) -> list[float]:
    """Relative squared output error on calibration inputs ``x`` for each level."""
    w = layer.weight.detach().to(torch.float64)
    x = x.to(torch.float64)
    y2 = float(_op(layer, x, w).pow(2).sum()) or 1.0
    if method == "low_rank":
        # exact for every rank: the output error of dropping component i is s_i^2 ||X v_i||^2
        _, s, vh = torch.linalg.svd(w, full_matrices=False)
        c = s.pow(2) * (x @ vh.T).pow(2).sum(0)
        tail = torch.flip(torch.cumsum(torch.flip(c, [0]), 0), [0]).tolist() + [0.0]
        return [tail[r] / y2 for r, _ in levels]
    idx = sorted({round(i * (len(levels) - 1) / (_ANCHORS - 1)) for i in range(_ANCHORS)})
    ratio = {}
    for i in idx:
        ranks, werr = levels[i]
        e = float(_op(layer, x, w - _reconstruct(method, layer, ranks)).pow(2).sum()) / y2
        ratio[float(i)] = e / werr if werr > 0 else 1.0
    q = rs.interpolate_errors([float(i) for i in range(len(levels))], ratio)
    return [werr * qi for (_, werr), qi in zip(levels, q)]


def _curve(d, method: str, layer: nn.Module, p: dict[str, Any], calib: torch.Tensor | None, ctx) -> rs.Curve:
    mult = p.get("rank_multiple", 1)
    levels = _weight_levels(method, layer, mult)
    errors = [e for _, e in levels] if calib is None else _output_levels(method, layer, levels, calib)
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
def _capture_inputs(module: nn.Module, ctx: PassContext, sites: dict, data: tuple) -> dict:
    """The input of each wanted site when the model runs on ``data`` (subsampled)."""
    got: dict = {}
    by_node = {s.nodes[0].name: k for k, s in sites.items() if s.nodes}

    def keep(key, x):
        if key in got or not isinstance(x, torch.Tensor):
            return
        s = sites[key]
        if s.layer_type == "Linear":
            rows = x.detach().reshape(-1, x.shape[-1])
            if rows.shape[0] > _CALIB_ROWS:
                g = torch.Generator().manual_seed(0)
                rows = rows[torch.randperm(rows.shape[0], generator=g)[:_CALIB_ROWS]]
            got[key] = rows
        else:
            got[key] = x.detach()[:_CALIB_SAMPLES]

    with torch.no_grad():
        if isinstance(module, fx.GraphModule):
            class Grab(fx.Interpreter):
                def run_node(self, n):
                    if n.name in by_node and n.args:
                        a = n.args[0]
                        keep(by_node[n.name], self.env[a] if isinstance(a, fx.Node) else a)
                    return super().run_node(n)
            Grab(module).run(*data)
        else:
            handles = []
            for k, s in sites.items():
                if s.module is not None:
                    handles.append(s.module.register_forward_hook(
                        lambda mod, args, out, k=k: keep(k, args[0] if args else None)))
            try:
                module(*data)
            finally:
                for h in handles:
                    h.remove()
    return got


# --------------------------------------------------------------------- pass
def _passes_through(d) -> bool:
    p = d.params
    return (d.method == "low_rank" and p.get("compression") is None and p.get("energy") is None
            and p.get("rank") != "vbmf" and p.get("rank_multiple", 1) == 1)


def allocate_ranks(module: nn.Module, ctx: PassContext) -> PassResult:
    plan = ctx.plan
    if plan is None:
        return PassResult(module, False)
    todo = [d for d in plan.decisions if d.method in FACTORIZED_METHODS and not _passes_through(d)]
    if not todo:
        return PassResult(module, False)
    sites = {_key(s): s for s in find_sites(module, ctx)}
    fixed, pooled = [], {}
    for d in todo:
        p = d.params
        if any(p.get(k) is not None for k in _PER_LAYER):
            fixed.append(d)
        else:
            cal = p.get("calibration_data")
            pooled.setdefault((float(p["compression"]), bool(p.get("flops")), id(cal)), []).append(d)
    for d in fixed:
        layer = as_layer(sites[(d.name, d.node)])
        ranks, note = _resolve_layer(d.method, layer, d.params)
        _set_ranks(d, ranks)
        if note:
            d.reason += f"; {note}"
    for (compression, use_flops, _), group in pooled.items():
        _allocate_group(module, ctx, sites, group, fixed, compression, use_flops)
    for d in todo:
        if d.method in ("cp", "tucker", "tt"):
            _plan_forward(d, as_layer(sites[(d.name, d.node)]))
        cal = d.params.get("calibration_data")
        if isinstance(cal, torch.Tensor) or isinstance(cal, (tuple, list)):
            # a decision stays JSON-ready: keep what the data was, not the data
            cal = (cal,) if isinstance(cal, torch.Tensor) else cal
            d.params = {**d.params, "calibration_data": "inputs of shapes " + ", ".join(str(tuple(t.shape)) for t in cal)}
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
    p0 = group[0].params
    calib = None
    if p0.get("calibration_data") is not None:
        data = p0["calibration_data"]
        data = (data,) if isinstance(data, torch.Tensor) else tuple(data)
        try:
            calib = _capture_inputs(module, ctx, {(d.name, d.node): sites[(d.name, d.node)] for d in group}, data)
        except Exception as exc:
            raise ValueError(f"sparsify(calibration_data=...): the model did not run on it "
                             f"({type(exc).__name__}: {exc}); pass inputs its forward accepts.") from exc
    curves = []
    for d in group:
        layer = as_layer(sites[(d.name, d.node)])
        x = None if calib is None else calib.get((d.name, d.node))
        curves.append(_curve(d, d.method, layer, d.params, x, ctx))
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

