"""The tensor decompositions behind the factorized layers, through tensorly.

Every tensorly call runs inside ``tl.backend_context("pytorch")``: tensorly's
global backend is never changed, so a user's own tensorly code (numpy backend,
say) is unaffected.  Inputs are computed in float64 whatever the layer's dtype,
so that the error of a factorization is that of its rank, not of arithmetic.

tensorly's API is pinned in pyproject (``tensorly>=0.8,<0.11``): since 0.8
``partial_tucker`` returns ``((core, factors), errors)``;
``tests/test_factorized_linear.py::test_tensorly_api`` checks the shapes this
module relies on.

CP is guarded against the blow-up tensorly's own ``init="svd"`` has when the
rank exceeds a mode (it asks for a full SVD of a mode unfolding, a matrix of
``(numel / n)^2`` elements): we initialize from the eigenvectors of each mode's
Gram matrix (``n x n``), padded with random columns past the mode size, and cap
the rank so that ALS's intermediates stay within ``CP_MEMORY_MULTIPLE`` times
the weight.  ALS runs with tensorly's ``einsum`` tensor-algebra backend (also
inside a context, never set globally): its MTTKRP is one einsum that opt_einsum
orders pairwise instead of materializing the Khatri-Rao product (``numel / n_k
x rank``), which is both the memory blow-up and, measured here, 5-15x slower.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import opt_einsum
import tensorly as tl
import torch

__all__ = [
    "CP_MEMORY_MULTIPLE",
    "cp",
    "cp_exact_rank",
    "cp_max_rank",
    "mode_singular_values",
    "tt_matrix",
    "tucker",
]

def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


@contextmanager
def _one_thread():
    """ALS / HOOI / TT-SVD are long chains of small BLAS calls: with OpenMP threads they
    lose more to synchronization than they gain, and on shared cores catastrophically
    (measured here: CP of a 32x16x16x8 tensor at rank 224, 10 sweeps, 0.3 s on one
    thread vs 7-23 s on two).  The thread count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


#: ALS's intermediates (the MTTKRP contractions, as torch.einsum orders them, and
#: the rank x rank Gram matrices) stay within this multiple of the tensor's size.
CP_MEMORY_MULTIPLE = 16
#: A sweep budget: a CP runs at most this many FLOPs of ALS sweeps (and at least
#: ``CP_MIN_SWEEPS`` sweeps), so a large CP converts in seconds, not minutes.
CP_FLOP_BUDGET = 3e11
CP_MIN_SWEEPS = 8


def _mttkrp_cost(shape: tuple[int, ...], rank: int) -> tuple[int, int]:
    """(largest intermediate, FLOPs) of one ALS sweep's MTTKRPs, as opt_einsum orders them."""
    letters = "abcdefghijklmnop"[: len(shape)]
    largest, flops = 0, 0
    for mode in range(len(shape)):
        ops = [letters, "z"] + [letters[i] + "z" for i in range(len(shape)) if i != mode]
        shapes = [shape, (rank,)] + [(shape[i], rank) for i in range(len(shape)) if i != mode]
        _, info = opt_einsum.contract_path(",".join(ops) + "->" + letters[mode] + "z", *shapes, shapes=True,
                                           optimize="auto")
        largest, flops = max(largest, int(info.largest_intermediate)), flops + int(info.opt_cost)
    # and per mode the rank x rank Gram (Hadamard products) and its solve
    flops += len(shape) * (2 * rank**3 + rank * rank * (len(shape) + max(shape)))
    return largest, flops


@functools.lru_cache(maxsize=256)
def cp_max_rank(shape: tuple[int, ...]) -> int:
    """The largest CP rank this module computes for a tensor of ``shape``: ALS's
    intermediates (MTTKRP contractions, ``rank x rank`` Grams) stay within
    ``CP_MEMORY_MULTIPLE`` times the tensor, and ``CP_MIN_SWEEPS`` sweeps within
    ``CP_FLOP_BUDGET`` (a sweep costs ~``2 numel rank`` per mode plus ``rank^3``
    solves, so an unbounded rank would take minutes).

    Example:
        >>> cp_max_rank((64, 32, 3, 3))
        543
    """
    shape = tuple(int(n) for n in shape)
    limit = CP_MEMORY_MULTIPLE * math.prod(shape)

    def fits(r: int) -> bool:
        if r * r > limit:
            return False
        largest, sweep = _mttkrp_cost(shape, r)
        return largest <= limit and sweep * CP_MIN_SWEEPS <= CP_FLOP_BUDGET

    lo, hi = 1, max(1, math.prod(shape))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _gram_init(t: torch.Tensor, rank: int, seed: int) -> list[torch.Tensor]:
    """Leading eigenvectors of each mode's Gram matrix (the left singular vectors
    of the unfolding, computed in ``n x n`` memory), padded with random columns."""
    gen = torch.Generator().manual_seed(seed)
    factors = []
    for mode, n in enumerate(t.shape):
        unf = t.movedim(mode, 0).reshape(n, -1)
        evals, evecs = torch.linalg.eigh(unf @ unf.T)
        k = min(rank, n)
        f = evecs[:, -k:].flip(1)                      # descending eigenvalues
        if rank > n:
            extra = torch.randn(n, rank - n, generator=gen, dtype=t.dtype)
            f = torch.cat([f, extra / math.sqrt(n)], dim=1)
        factors.append(f.contiguous())
    return factors


def cp_exact_rank(shape: Sequence[int]) -> int:
    """A rank at which a CP is exact for any tensor of ``shape``: ``numel / max(n_k)``
    (one component per entry of the other modes)."""
    return math.prod(shape) // max(shape)


def _exact_cp(t: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """The trivial exact CP when ``rank >= cp_exact_rank``: each component is a fibre
    of the largest mode times unit vectors on the others; spare components get
    weight 0.  ALS would only approach it."""
    full = cp_exact_rank(t.shape)
    if rank < full:
        return None
    big = max(range(t.dim()), key=lambda m: t.shape[m])
    rest = [m for m in range(t.dim()) if m != big]
    fibres = t.movedim(big, 0).reshape(t.shape[big], full)           # [n_big, full]
    norms = torch.linalg.norm(fibres, dim=0)
    gen = torch.Generator().manual_seed(seed)
    weights = torch.zeros(rank, dtype=t.dtype)
    weights[:full] = norms
    factors: list[torch.Tensor] = [torch.empty(0)] * t.dim()
    big_f = torch.randn(t.shape[big], rank, generator=gen, dtype=t.dtype)
    big_f = big_f / torch.linalg.norm(big_f, dim=0)
    big_f[:, :full] = fibres / norms.clamp_min(1e-300)
    factors[big] = big_f
    idx = torch.arange(full)
    sizes = [t.shape[m] for m in rest]
    for j, m in enumerate(rest):
        stride = math.prod(sizes[j + 1:])
        f = torch.zeros(t.shape[m], rank, dtype=t.dtype)
        f[(idx // stride) % sizes[j], idx] = 1.0
        if rank > full:
            f[:, full:] = 1.0 / math.sqrt(t.shape[m])
        factors[m] = f
    return weights, factors


def cp(
    tensor: torch.Tensor,
    rank: int,
    *,
    n_iter_max: int = 50,
    tol: float = 1e-6,
    seed: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """CP decomposition ``tensor ~ sum_r w_r a1_r o a2_r o ...`` by ALS (tensorly ``parafac``).

    Returns ``(weights [rank], factors [n_k, rank])`` in float64, factors with
    unit-norm columns and the scale in ``weights``.  At most ``n_iter_max``
    sweeps, fewer where they would pass ``CP_FLOP_BUDGET`` FLOPs.  Raises if ``rank`` exceeds
    :func:`cp_max_rank` (callers cap it first and report the cap).

    Example:
        >>> w, fs = cp(torch.randn(4, 5, 6, dtype=torch.float64), 3)
        >>> w.shape, [tuple(f.shape) for f in fs]
        (torch.Size([3]), [(4, 3), (5, 3), (6, 3)])
    """
    t = _f64(tensor)
    cap = cp_max_rank(tuple(t.shape))
    if rank < 1 or rank > cap:
        raise ValueError(
            f"cp: rank {rank} is outside [1, {cap}] for a tensor of shape {tuple(t.shape)}; "
            f"larger ranks would need more than {CP_MEMORY_MULTIPLE}x the weight's memory. Lower the rank."
        )
    exact = _exact_cp(t, rank, seed)
    if exact is not None:
        return exact
    sweeps = min(n_iter_max, max(CP_MIN_SWEEPS, int(CP_FLOP_BUDGET // max(1, _mttkrp_cost(tuple(t.shape), rank)[1]))))
    init = tl.cp_tensor.CPTensor((torch.ones(rank, dtype=t.dtype), _gram_init(t, rank, seed)))
    with tl.backend_context("pytorch"), tl.tenalg.backend_context("einsum"), warnings.catch_warnings(), \
            _one_thread():
        warnings.simplefilter("ignore")
        from tensorly.decomposition import parafac

        weights, factors = parafac(t, rank, init=init, n_iter_max=sweeps, tol=tol,
                                   normalize_factors=True, random_state=seed)
    return weights.clone(), [f.clone() for f in factors]


def tucker(
    tensor: torch.Tensor,
    ranks: Sequence[int],
    modes: Sequence[int] | None = None,
    *,
    n_iter_max: int = 20,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(Partial) Tucker decomposition by HOSVD + HOOI (tensorly ``partial_tucker``).

    ``ranks[j]`` is the rank of mode ``modes[j]`` (all modes if ``modes`` is None);
    the other modes stay whole.  Returns ``(core, factors)`` in float64, factors
    with orthonormal columns.  ``n_iter_max=0`` is the plain truncated HOSVD.

    Example:
        >>> core, fs = tucker(torch.randn(8, 6, 3, 3, dtype=torch.float64), (4, 2), modes=(0, 1))
        >>> tuple(core.shape), [tuple(f.shape) for f in fs]
        ((4, 2, 3, 3), [(8, 4), (6, 2)])
    """
    t = _f64(tensor)
    modes = list(range(t.dim())) if modes is None else list(modes)
    ranks = [int(r) for r in ranks]
    for m, r in zip(modes, ranks):
        if not 1 <= r <= t.shape[m]:
            raise ValueError(f"tucker: rank {r} of mode {m} is outside [1, {t.shape[m]}] "
                             f"for a tensor of shape {tuple(t.shape)}.")
    with tl.backend_context("pytorch"), warnings.catch_warnings(), _one_thread():
        # HOOI asks for more singular vectors than a small unfolding has; tensorly caps and warns
        warnings.simplefilter("ignore", UserWarning)
        from tensorly.decomposition import partial_tucker

        out = partial_tucker(t, ranks, modes=modes, n_iter_max=n_iter_max, tol=tol, init="svd")
    (core, factors), _errors = out  # tensorly >= 0.8
    return core.clone(), [f.clone() for f in factors]


def tt_matrix(tensor: torch.Tensor, ranks: Sequence[int]) -> list[torch.Tensor]:
    """TT-matrix (Novikov et al. 2015) by TT-SVD (tensorly ``tensor_train_matrix``).

    ``tensor`` has shape ``(o_1..o_d, i_1..i_d)``; ``ranks`` are the ``d + 1``
    bond ranks ``(1, r_1, ..., r_{d-1}, 1)``.  Returns the cores
    ``[r_{k-1}, o_k, i_k, r_k]`` in float64.  TT-SVD caps each bond at what its
    unfolding supports, so the ranks produced can be smaller than asked: read
    them from the cores.

    Example:
        >>> cores = tt_matrix(torch.randn(4, 4, 4, 4, dtype=torch.float64), (1, 3, 1))
        >>> [tuple(c.shape) for c in cores]
        [(1, 4, 4, 3), (3, 4, 4, 1)]
    """
    t = _f64(tensor)
    d = t.dim() // 2
    ranks = [int(r) for r in ranks]
    if t.dim() != 2 * d or len(ranks) != d + 1 or ranks[0] != 1 or ranks[-1] != 1:
        raise ValueError(f"tt_matrix: expected a tensor of even order and d+1 ranks (1, ..., 1); "
                         f"got shape {tuple(t.shape)} and ranks {ranks}.")
    with tl.backend_context("pytorch"), _one_thread():
        from tensorly.decomposition import tensor_train_matrix

        ttm = tensor_train_matrix(t, ranks)
    return [c.clone() for c in ttm.factors]


def mode_singular_values(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Singular values of the mode-``mode`` unfolding (through its ``n x n`` Gram matrix).

    Example:
        >>> mode_singular_values(torch.eye(3, dtype=torch.float64), 0)
        tensor([1., 1., 1.], dtype=torch.float64)
    """
    t = _f64(tensor)
    n = t.shape[mode]
    unf = t.movedim(mode, 0).reshape(n, -1)
    if unf.shape[1] < n:
        return torch.linalg.svdvals(unf)
    evals = torch.linalg.eigvalsh(unf @ unf.T).flip(0).clamp_min(0)
    return evals.sqrt()
