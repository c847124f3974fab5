"""Rank selection: per layer (int, parameter fraction, tolerance, energy, VBMF) and
across the model (a global compression target allocated by error-vs-size curves).

Rank semantics, per method (see docs/factorized.md):

    low_rank   int = the rank; float = a fraction of min(in, out) (issue #2, kept
               for compatibility); 'same' = full rank; 'vbmf' = EVBMF of the matrix
    cp         int = the CP rank; float = a fraction of the dense weight's
               parameters ('same' = 1.0, as in tensorly)
    tucker     int = the rank of every factorized mode (capped at the mode size);
               a tuple = per-mode ranks; float / 'same' = fraction of parameters;
               'vbmf' = EVBMF of each mode's unfolding (Kim et al. 2016)
    tt         int = every internal bond rank (capped at what TT-SVD supports);
               a tuple = the d+1 bond ranks (1, r_1, ..., 1); float / 'same' =
               fraction of parameters

    tolerance  the relative Frobenius error of the weight to stay within
               (exact for SVD; the HOSVD / TT-SVD bounds for Tucker / TT, so the
               error produced is at most that; a search over ranks for CP)
    energy     the fraction of each unfolding's squared spectrum to keep (SVD,
               Tucker, TT); for CP, whose factors have no spectrum, it means
               tolerance = sqrt(1 - energy), what it means for an SVD
    rank_multiple  round every rank to a multiple (8 for tensor cores), never
               past the largest valid rank

Global allocation (``allocate``) is greedy on each layer's lower convex hull of
(size, error) points: it starts every layer at its smallest level and keeps
taking the step with the largest error decrease per unit of size that still
fits the budget, then fills what is left with the best partial steps.  For
convex curves this is the optimum of the Lagrangian relaxation; the result
is within one (small) step of the budget.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import decompose

__all__ = [
    "Curve",
    "allocate",
    "cp_rank",
    "evbmf_rank",
    "round_rank",
    "spectrum_rank",
    "tt_ranks",
    "tt_params",
    "tucker_params",
    "tucker_ranks",
]

RankSpec = Any  # int | float | str | Sequence[int] | None


# ----------------------------------------------------------------- basic rules
def round_rank(r: int, multiple: int, cap: int) -> int:
    """``r`` rounded to the nearest multiple of ``multiple``, within ``[1, cap]``
    (the largest multiple under ``cap`` when rounding up would pass it).

    Example:
        >>> round_rank(13, 8, 100), round_rank(3, 8, 100), round_rank(60, 8, 50)
        (16, 8, 48)
    """
    r = max(1, min(int(r), cap))
    if multiple > 1:
        r = max(multiple, int(round(r / multiple)) * multiple)
        if r > cap:
            r = max(1, (cap // multiple) * multiple) if cap >= multiple else cap
    return max(1, min(r, cap))


def spectrum_rank(s: torch.Tensor, *, tolerance: float | None = None, energy: float | None = None,
                  share: float = 1.0) -> int:
    """The smallest rank whose discarded squared singular values are at most
    ``share * tolerance^2`` of the total (or that keeps ``energy`` of it).

    Example:
        >>> spectrum_rank(torch.tensor([3.0, 2.0, 1.0]), energy=0.9)
        2
    """
    s2 = s.double().pow(2)
    total = float(s2.sum())
    if total == 0.0:
        return 1
    if tolerance is not None:
        allowed = share * tolerance**2 * total
    elif energy is not None:
        allowed = (1.0 - energy) * total
    else:
        raise ValueError("spectrum_rank: give tolerance= or energy=.")
    tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0]).tolist() + [0.0]  # tail[r] = sum_{i>=r}
    # a little slack for round-off in the spectrum itself
    for r, t in enumerate(tail):
        if r >= 1 and t <= allowed * (1 + 1e-9) + 1e-300:
            return r
    return len(s)


def evbmf_rank(matrix: torch.Tensor) -> int:
    """The rank that empirical variational Bayesian matrix factorization keeps
    (the global analytic solution, Nakajima et al. 2013, noise variance unknown).

    The noise variance ``sigma^2`` minimizes the free energy; components whose
    singular value exceeds ``sqrt(M sigma^2 (1 + tau)(1 + alpha / tau))`` survive.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> low = torch.randn(60, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 80, generator=g, dtype=torch.float64)
        >>> evbmf_rank(low * 3 + 0.1 * torch.randn(60, 80, generator=g, dtype=torch.float64))
        5
    """
    y = matrix.double()
    if y.shape[0] > y.shape[1]:
        y = y.T
    L, M = y.shape
    s = torch.linalg.svdvals(y)
    alpha = L / M
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    s2 = s.pow(2)
    total = float(s2.sum())
    if total == 0.0:
        return 1
    h_ub = max(0, min(math.ceil(L / (1 + alpha)) - 1, L) - 1)
    upper = total / (L * M)
    lower = max(float(s2[h_ub + 1]) / (M * x_bar) if h_ub + 1 < L else 0.0,
                float(s2[h_ub + 1:].mean()) / M if h_ub + 1 < L else 0.0, upper * 1e-12)

    def free_energy(log_sigma2: float) -> float:
        sigma2 = math.exp(log_sigma2)
        x = s2 / (M * sigma2)
        big = x > x_bar
        z1, z2 = x[big], x[~big]
        tau = 0.5 * (z1 - (1 + alpha) + torch.sqrt((z1 - (1 + alpha)).pow(2) - 4 * alpha))
        f = (z2 - torch.log(z2)).sum() + (z1 - tau).sum() + torch.log((tau + 1) / z1).sum() \
            + alpha * torch.log(tau / alpha + 1).sum()
        return float(f)

    lo, hi = math.log(lower), math.log(upper)
    if hi <= lo:
        sigma2 = upper
    else:
        # a grid, then golden-section refinement around the best grid point
        grid = [lo + (hi - lo) * i / 64 for i in range(65)]
        vals = [free_energy(g) for g in grid]
        i = min(range(len(grid)), key=vals.__getitem__)
        a, b = grid[max(0, i - 1)], grid[min(64, i + 1)]
        phi = (math.sqrt(5) - 1) / 2
        c, d = b - phi * (b - a), a + phi * (b - a)
        for _ in range(60):
            if free_energy(c) < free_energy(d):
                b = d
            else:
                a = c
            c, d = b - phi * (b - a), a + phi * (b - a)
        sigma2 = math.exp((a + b) / 2)
    threshold = math.sqrt(M * sigma2 * x_bar)
    return max(1, int((s > threshold).sum()))


def _check_fraction(rank: Any, where: str) -> float:
    f = 1.0 if rank == "same" else float(rank)
    if not 0.0 < f:
        raise ValueError(f"{where}: a fractional rank must be > 0; got {rank!r}")
    return f


def _is_fraction(rank: Any) -> bool:
    return rank == "same" or (isinstance(rank, float) and not isinstance(rank, bool))


# ----------------------------------------------------------------------- CP
def cp_params(shape: Sequence[int], rank: int, groups: int = 1) -> int:
    """Parameters of a CP factorization: ``rank * (sum(shape) + 1)`` per group."""
    return groups * rank * (sum(shape) + 1)


def cp_rank(tensors: torch.Tensor | Sequence[torch.Tensor], rank: RankSpec = None, *,
            tolerance: float | None = None, energy: float | None = None, rank_multiple: int = 1,
            n_iter_max: int = 30) -> int:
    """The CP rank for ``tensors`` (one per group; all of one shape).

    ``rank`` int is the rank, float / 'same' a fraction of the parameters;
    ``tolerance`` (or ``energy``, meaning tolerance = sqrt(1 - energy)) searches
    the smallest rank that meets it (doubling, then bisection; each probe is a
    short ALS run).  Capped at :func:`sparsify.decompose.cp_max_rank`.

    Example:
        >>> cp_rank(torch.zeros(8, 8, 3, 3), 0.5)
        12
    """
    ts = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    shape = tuple(ts[0].shape)
    cap = decompose.cp_max_rank(tuple(shape))
    if tolerance is None and energy is not None:
        tolerance = math.sqrt(max(0.0, 1.0 - energy))
    if tolerance is not None:
        def err(r: int) -> float:
            worst = 0.0
            for t in ts:
                w, fs = decompose.cp(t, r, n_iter_max=n_iter_max)
                rec = _cp_full(w, fs)
                worst = max(worst, float(torch.linalg.norm(rec - t.double()) / torch.linalg.norm(t.double()).clamp_min(1e-300)))
            return worst
        lo, hi = 0, 1
        while hi < cap and err(hi) > tolerance:
            lo, hi = hi, min(cap, hi * 2)
        while hi - lo > max(1, hi // 32):  # bisection to ~3% of the rank: each probe is an ALS run
            mid = (lo + hi) // 2
            if err(mid) <= tolerance:
                hi = mid
            else:
                lo = mid
        r = hi
    elif _is_fraction(rank):
        f = _check_fraction(rank, "cp")
        r = int(f * math.prod(shape) // (sum(shape) + 1))
    elif isinstance(rank, int):
        r = rank
    else:
        raise ValueError(f"cp: expected rank= an int, a fraction or 'same', or tolerance= / energy=; got {rank!r}")
    return round_rank(r, rank_multiple, cap)


def _cp_full(weights: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    letters = "abcdefgh"[: len(factors)]
    eq = "r," + ",".join(c + "r" for c in letters) + "->" + letters
    return torch.einsum(eq, weights, *factors)


# -------------------------------------------------------------------- Tucker
def tucker_params(shape: Sequence[int], modes: Sequence[int], ranks: Sequence[int], groups: int = 1) -> int:
    """Core plus factors: ``prod(core shape) + sum(n_k r_k)``, per group."""
    core = list(shape)
    for m, r in zip(modes, ranks):
        core[m] = r
    return groups * (math.prod(core) + sum(shape[m] * r for m, r in zip(modes, ranks)))


def tucker_ranks(tensors: torch.Tensor | Sequence[torch.Tensor], modes: Sequence[int], rank: RankSpec = None, *,
                 tolerance: float | None = None, energy: float | None = None,
                 rank_multiple: int = 1) -> tuple[int, ...]:
    """Per-mode Tucker ranks for ``tensors`` (one per group) on ``modes``.

    Tolerance uses the HOSVD bound ``err^2 <= sum_k tail_k``: each of the N
    modes may discard ``tolerance^2 / N`` of the energy, so the HOSVD (and the
    HOOI that refines it) stays within ``tolerance``.

    Example:
        >>> tucker_ranks(torch.zeros(16, 8, 3, 3), (0, 1), 4)
        (4, 4)
    """
    ts = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    shape = tuple(ts[0].shape)
    modes = list(modes)
    caps = [shape[m] for m in modes]
    if tolerance is not None or energy is not None or rank == "vbmf":
        out = [1] * len(modes)
        for t in ts:
            for j, m in enumerate(modes):
                if rank == "vbmf" and tolerance is None and energy is None:
                    n = t.shape[m]
                    r = evbmf_rank(t.double().movedim(m, 0).reshape(n, -1))
                else:
                    s = decompose.mode_singular_values(t, m)
                    r = spectrum_rank(s, tolerance=tolerance, energy=energy, share=1.0 / len(modes))
                out[j] = max(out[j], r)
        rs = out
    elif _is_fraction(rank):
        f = _check_fraction(rank, "tucker")
        budget = f * math.prod(shape)

        def at(scale: float) -> list[int]:
            return [max(1, min(n, round(scale * n))) for n in caps]

        lo, hi = 0.0, 1.0
        if tucker_params(shape, modes, at(hi)) <= budget:
            lo = hi
        for _ in range(50):
            mid = (lo + hi) / 2
            if tucker_params(shape, modes, at(mid)) <= budget:
                lo = mid
            else:
                hi = mid
        rs = at(lo)
    elif isinstance(rank, int):
        rs = [rank] * len(modes)
    elif isinstance(rank, (tuple, list)):
        if len(rank) != len(modes):
            raise ValueError(f"tucker: expected {len(modes)} ranks (one per mode {modes} of shape {shape}); got {rank!r}")
        rs = [int(r) for r in rank]
    else:
        raise ValueError(f"tucker: expected rank= an int, per-mode ints, a fraction, 'same' or 'vbmf', "
                         f"or tolerance= / energy=; got {rank!r}")
    return tuple(round_rank(r, rank_multiple, c) for r, c in zip(rs, caps))


# ------------------------------------------------------------------------ TT
def tt_caps(shape: Sequence[int]) -> list[int]:
    """The largest bond ranks TT-SVD can produce for a TT-matrix of ``shape`` ``(o.., i..)``."""
    d = len(shape) // 2
    sizes = [shape[k] * shape[d + k] for k in range(d)]
    return [1] + [min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, d)] + [1]


def tt_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Parameters of a TT-matrix: ``sum_k r_{k-1} o_k i_k r_k``."""
    d = len(shape) // 2
    return sum(ranks[k] * shape[k] * shape[d + k] * ranks[k + 1] for k in range(d))


def _tt_uniform(shape: Sequence[int], r: int) -> list[int]:
    caps = tt_caps(shape)
    return [min(r, c) for c in caps[:-1]] + [1] if len(caps) > 1 else [1]


def tt_ranks(tensor: torch.Tensor | Sequence[torch.Tensor], rank: RankSpec = None, *,
             tolerance: float | None = None, energy: float | None = None, rank_multiple: int = 1) -> tuple[int, ...]:
    """The ``d + 1`` bond ranks ``(1, r_1, ..., 1)`` for a TT-matrix of ``tensor`` ``(o.., i..)``
    (or of each of several tensors of one shape, one per conv group: the largest rank each bond needs).

    Tolerance: the TT-SVD bound ``err^2 <= sum_k tail_k`` over the d-1 bonds
    (Oseledets 2011), each bond discarding at most ``tolerance^2 / (d - 1)`` of
    the energy of the unfolding of the whole tensor at that bond.

    Example:
        >>> tt_ranks(torch.zeros(4, 4, 4, 4, 4, 4), 8)
        (1, 8, 8, 1)
    """
    ts = [tensor] if isinstance(tensor, torch.Tensor) else list(tensor)
    shape = tuple(ts[0].shape)
    d = len(shape) // 2
    caps = tt_caps(shape)
    if d == 1:
        return (1, 1)
    if tolerance is not None or energy is not None:
        # the TT-matrix is the TT of the tensor with (o_k, i_k) merged per core
        perm = [i for k in range(d) for i in (k, d + k)]
        rs = [1] * (d + 1)
        for t in ts:
            merged = t.double().permute(perm).reshape([shape[k] * shape[d + k] for k in range(d)])
            for k in range(1, d):
                n = math.prod(merged.shape[:k])
                s = torch.linalg.svdvals(merged.reshape(n, -1))
                rs[k] = max(rs[k], spectrum_rank(s, tolerance=tolerance, energy=energy, share=1.0 / (d - 1)))
    elif _is_fraction(rank):
        f = _check_fraction(rank, "tt")
        budget = f * math.prod(shape)
        lo, hi = 1, max(caps)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if tt_params(shape, _tt_uniform(shape, mid)) <= budget:
                lo = mid
            else:
                hi = mid - 1
        rs = _tt_uniform(shape, lo)
    elif isinstance(rank, int):
        rs = _tt_uniform(shape, rank)
    elif isinstance(rank, (tuple, list)):
        rank = [int(r) for r in rank]
        if len(rank) == d - 1:
            rank = [1, *rank, 1]
        if len(rank) != d + 1 or rank[0] != 1 or rank[-1] != 1:
            raise ValueError(f"tt: expected {d + 1} bond ranks (1, ..., 1) or {d - 1} internal ones; got {rank!r}")
        rs = rank
    else:
        raise ValueError(f"tt: expected rank= an int, bond ranks, a fraction or 'same', or tolerance= / energy=; "
                         f"got {rank!r}")
    return tuple([1] + [round_rank(r, rank_multiple, c) for r, c in zip(rs[1:-1], caps[1:-1])] + [1])


# ----------------------------------------------------------- global allocation
@dataclass
class Curve:
    """One layer's candidates: ``levels[i] = (size, error, spec)``, sizes increasing.

    ``error`` is what the allocation minimizes summed over layers (relative
    squared weight error, or relative squared output error on calibration data);
    ``spec`` is what the level means to the layer (its ranks, or ``"dense"``).
    """

    name: str
    levels: list[tuple[float, float, Any]]
    chosen: int = 0
    hull: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.levels.sort(key=lambda t: (t[0], t[1]))
        # lower convex hull of (size, error), from the smallest size
        hull: list[int] = []
        for i, (x, y, _) in enumerate(self.levels):
            if hull and y >= self.levels[hull[-1]][1]:
                continue  # bigger and no better: never worth it
            while len(hull) >= 2:
                (x1, y1, _), (x2, y2, _) = self.levels[hull[-2]], self.levels[hull[-1]]
                if (y2 - y1) * (x - x1) >= (y - y1) * (x2 - x1):  # middle point above the chord
                    hull.pop()
                else:
                    break
            hull.append(i)
        self.hull = hull

    @property
    def size(self) -> float:
        return self.levels[self.chosen][0]

    @property
    def error(self) -> float:
        return self.levels[self.chosen][1]

    @property
    def spec(self) -> Any:
        return self.levels[self.chosen][2]


def allocate(curves: list[Curve], budget: float, fixed: float = 0.0) -> list[Curve]:
    """Choose a level per curve so that ``fixed + sum(sizes) <= budget`` with the
    smallest summed error (greedy on the convex hulls, then a fill).

    Raises ``ValueError`` if even the smallest levels exceed the budget.

    Greedy is not always optimal: below, ``[1, 3]`` has error 1.0 and greedy
    finds ``[3, 1]`` with 1.1, because b's big step does not fit once a's
    steeper first step is taken.

    Example:
        >>> a = Curve("a", [(1, 1.0, 1), (2, 0.2, 2), (3, 0.1, 3)])
        >>> b = Curve("b", [(1, 1.0, 1), (2, 0.9, 2), (3, 0.0, 3)])
        >>> [c.spec for c in allocate([a, b], 4)]
        [3, 1]
    """
    for c in curves:
        c.chosen = c.hull[0]
    used = fixed + sum(c.size for c in curves)
    if used > budget * (1 + 1e-12):
        raise ValueError(f"the smallest factorizations of the {len(curves)} layers need {used:.4g}, more than "
                         f"the budget {budget:.4g}")
    pos = {id(c): 0 for c in curves}  # position within the hull

    def push(heap, c):
        h = c.hull
        p = pos[id(c)]
        if p + 1 < len(h):
            (x1, y1, _), (x2, y2, _) = c.levels[h[p]], c.levels[h[p + 1]]
            heapq.heappush(heap, (-(y1 - y2) / max(x2 - x1, 1e-300), id(c), c))

    heap: list = []
    for c in curves:
        push(heap, c)
    stuck: list[Curve] = []
    while heap:
        _, _, c = heapq.heappop(heap)
        nxt = c.hull[pos[id(c)] + 1]
        step = c.levels[nxt][0] - c.size
        if used + step <= budget:
            used += step
            pos[id(c)] += 1
            c.chosen = nxt
            push(heap, c)
        else:
            stuck.append(c)
    # fill: the best affordable level (any level, not only the hull) among the stuck layers
    improved = True
    while improved:
        improved = False
        best = None
        for c in curves:
            for i, (x, y, _) in enumerate(c.levels):
                if x > c.size and y < c.error and used + x - c.size <= budget:
                    gain = (c.error - y)
                    if best is None or gain > best[0]:
                        best = (gain, c, i)
        if best is not None:
            _, c, i = best
            used += c.levels[i][0] - c.size
            c.chosen = i
            improved = True
    return curves


def sample_levels(n_max: int, count: int = 48) -> list[int]:
    """About ``count`` ranks in ``[1, n_max]``: every rank up to ``count``, then geometric."""
    if n_max <= count:
        return list(range(1, n_max + 1))
    out = set(range(1, count // 2 + 1))
    r = count // 2
    ratio = (n_max / r) ** (1 / (count // 2))
    x = float(r)
    while x < n_max:
        x *= ratio
        out.add(min(n_max, int(round(x))))
    out.add(n_max)
    return sorted(out)


def interpolate_errors(xs: Sequence[float], known: dict[float, float]) -> list[float]:
    """Piecewise-linear interpolation of ``known`` (x -> error) at ``xs``."""
    pts = sorted(known.items())
    out = []
    for x in xs:
        if x <= pts[0][0]:
            out.append(pts[0][1])
            continue
        if x >= pts[-1][0]:
            out.append(pts[-1][1])
            continue
        for (x1, y1), (x2, y2) in zip(pts, pts[1:]):
            if x1 <= x <= x2:
                out.append(y1 + (y2 - y1) * (x - x1) / (x2 - x1))
                break
    return out


ErrorFn = Callable[[Any], float]
