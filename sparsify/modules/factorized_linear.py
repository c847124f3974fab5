"""Tensor-factorized Linear layers: CP, Tucker and TT-matrix of the tensorized weight.

The weight ``W [out, in]`` is viewed as a tensor ``T [o_1..o_m, i_1..i_m]``
(``out = prod o_k``, ``in = prod i_k``, row-major, so ``T`` is a reshape of
``W``) and factorized:

    CPLinear      T = sum_r w_r  a_1[:, r] o ... o a_2m[:, r]
    TuckerLinear  T = G x_1 U_1 ... x_2m U_2m
    TTLinear      T[o, i] = C_1[:, o_1, i_1, :] @ ... @ C_m[:, o_m, i_m, :]  (Novikov et al. 2015)

The forward contracts the input with the factors pairwise in an order found by
opt_einsum's path search, once, at construction, for a nominal batch
(``batch_hint`` tokens) under the memory limit ``batch * (in + out)``: no
intermediate is larger than the input plus the output.  The steps are plain
``torch.einsum`` calls, so the module traces with ``torch.fx``.  The planner
compares the path's FLOPs with the dense matmul's and, where the factorized
forward would cost more, builds the module with ``forward="reconstructed"``:
the weight is rebuilt from the factors (differentiably) and used in one
``F.linear``.  In eval mode with grad off the rebuilt weight is cached on the
module (:class:`ReconstructedWeightCache`), so an inference call costs the
dense layer's FLOPs; with grad on it is rebuilt every call.

Every module has ``from_dense``, ``to_dense`` (the exact weight the factors
represent), ``to_dense_module``, ``flops(input_shape)``, ``ranks`` (what was
produced) and ``relative_error`` (of the conversion).
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence

import opt_einsum
import torch
import torch.nn.functional as F
from torch import nn

from .. import decompose
from .. import ranks as rank_sel
from ..runtime.executors.cpu import fsdp2_in_use, optimizer_steps
from .weight_view import LinearLike

__all__ = ["CPLinear", "TuckerLinear", "TTLinear", "Contraction", "ReconstructedWeightCache", "tensorize"]

_BATCH = "Z"
_LETTERS = [c for c in string.ascii_letters if c != _BATCH]
FORWARDS = ("factorized", "reconstructed")


def tensorize(n: int, order: int) -> tuple[int, ...]:
    """Split ``n`` into ``order`` factors as equal as possible (largest first).

    Example:
        >>> tensorize(1024, 2), tensorize(4096, 3), tensorize(10, 3)
        ((32, 32), (16, 16, 16), (5, 2, 1))
    """
    primes, m, p = [], n, 2
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    buckets = [1] * order
    for q in sorted(primes, reverse=True):
        buckets[buckets.index(min(buckets))] *= q
    return tuple(sorted(buckets, reverse=True))


class Contraction:
    """A pairwise contraction order, found once by opt_einsum and replayed with torch.einsum.

    ``operands`` are einsum subscripts; the batch letter ``Z`` (if any) stands
    for all leading dimensions (``...`` at run time).  ``memory_limit`` bounds
    every intermediate (elements, at ``batch_size``).
    """

    def __init__(self, operands: Sequence[str], shapes: Sequence[Sequence[int]], output: str,
                 *, batch_size: int = 1, memory_limit: int | None = None) -> None:
        self.sizes: dict[str, int] = {}
        for sub, shape in zip(operands, shapes):
            for c, n in zip(sub, shape):
                self.sizes[c] = int(n)
        self.sizes[_BATCH] = batch_size
        full = [tuple(self.sizes[c] for c in sub) for sub in operands]
        eq = ",".join(operands) + "->" + output
        best = None
        for how in (("optimal" if len(operands) <= 6 else "dp"), "greedy"):
            _, info = opt_einsum.contract_path(eq, *full, shapes=True, optimize=how, memory_limit=memory_limit)
            ok = memory_limit is None or info.largest_intermediate <= memory_limit
            if best is None or (ok and not best[0]) or (ok == best[0] and info.opt_cost < best[1].opt_cost):
                best = (ok, info)
        self.fits_memory, info = best
        self.largest_intermediate = int(info.largest_intermediate)
        # (positions to pop, einsum string with the batch letter as "...", letters in the step)
        self.steps: list[tuple[tuple[int, ...], str, str, bool]] = []
        for inds, removed, es, *_ in info.contraction_list:
            letters = "".join(sorted(set(es.replace(",", "").replace("->", ""))))
            self.steps.append((tuple(inds), es.replace(_BATCH, "..."), letters, bool(removed)))

    def __call__(self, *operands: torch.Tensor) -> torch.Tensor:
        ops = list(operands)
        for inds, es, _, _ in self.steps:
            tmp = [ops.pop(i) for i in inds]
            ops.append(torch.einsum(es, *tmp))
        return ops[0]

    def stages(self, batch_size: int = 1) -> list[tuple[int, int]]:
        """``(FLOPs, elements read and written)`` of each step: both operands and the result."""
        out = []
        for (_, es, letters, summed) in self.steps:
            ins, res = es.replace("...", _BATCH).split("->")
            size = {c: batch_size if c == _BATCH else self.sizes[c] for c in letters}
            flops = math.prod(size.values()) * (2 if summed else 1)
            out.append((flops, sum(math.prod(size[c] for c in sub) for sub in (*ins.split(","), res))))
        return out

    def flops(self, batch_size: int = 1) -> int:
        """opt_einsum's count: the product of a step's index sizes, x2 where it sums."""
        total = 0
        for _, _, letters, summed in self.steps:
            n = 1
            for c in letters:
                n *= batch_size if c == _BATCH else self.sizes[c]
            total += n * (2 if summed else 1)
        return total


def _check_forward(forward: str) -> None:
    if forward not in FORWARDS:
        raise ValueError(f"expected forward= one of {FORWARDS}; got {forward!r}")


class ReconstructedWeightCache:
    """Mixin for the factorized modules: the weight rebuilt from the factors, cached for inference.

    ``_reconstructed_weight(x)`` returns ``to_dense()``; in eval mode, with grad
    off, on a plain tensor and outside tracing (fx, ``torch.jit.trace``) / ``torch.compile``, the result is
    kept on the module, keyed by the ``_version`` and ``data_ptr()`` of every
    factor parameter and the process's optimizer step count (a fused optimizer bumps no
    version), so inference pays for the rebuild once per weight change
    (the policy of ``runtime.executors.cpu.dense_weight`` for block-sparse
    layers).  With grad on it is rebuilt every call and never cached: a cached
    tensor must not enter an autograd graph.  Writes through ``.data`` bypass
    the version counter; call :meth:`clear_weight_cache` after them.  Nothing is
    cached while FSDP2 manages modules in the process: it refills parameters with
    their version counters preserved (see ``runtime.executors.cpu.fsdp2_in_use``).
    """

    def _weight_factors(self) -> list[torch.Tensor]:
        return [p for n, p in self.named_parameters() if n != "bias"]

    def _reconstructed_weight(self, x: torch.Tensor) -> torch.Tensor:
        # (a jit trace would bake a cached weight into its graph as a constant; under torch.func
        # transforms the factors may be wrapped, batched tensors that must not outlive the transform)
        if (self.training or type(x) is not torch.Tensor or torch.is_grad_enabled()
                or torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch._C._are_functorch_transforms_active() or fsdp2_in_use()):
            return self.to_dense()
        key = (optimizer_steps(), *((p._version, p.data_ptr()) for p in self._weight_factors()))
        hit = self.__dict__.get("_weight_cache")
        if hit is not None and hit[0] == key:
            return hit[1]
        w = self.to_dense().contiguous()
        self.__dict__["_weight_cache"] = (key, w)
        return w

    def clear_weight_cache(self) -> None:
        """Drop the cached reconstructed weight (needed only after writes through ``.data``).

        Example:
            >>> layer = TuckerLinear.from_dense(torch.nn.Linear(16, 8), forward="reconstructed").eval()
            >>> with torch.no_grad():
            ...     _ = layer(torch.randn(2, 16))
            >>> layer.clear_weight_cache(); "_weight_cache" in layer.__dict__
            False
        """
        self.__dict__.pop("_weight_cache", None)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_weight_cache", None)
        return state


class _TensorizedLinear(LinearLike, ReconstructedWeightCache, nn.Module):
    """Shared machinery: tensorized shapes, the two contractions, forward, dense views."""

    method_name = "?"

    def _setup(self, in_features: int, out_features: int, in_modes, out_modes, bias: bool,
               forward: str, batch_hint: int, device, dtype) -> None:
        _check_forward(forward)
        in_modes = tuple(int(n) for n in in_modes)
        out_modes = tuple(int(n) for n in out_modes)
        if math.prod(in_modes) != in_features or math.prod(out_modes) != out_features:
            raise ValueError(f"{type(self).__name__}: in_modes {in_modes} must multiply to in_features="
                             f"{in_features} and out_modes {out_modes} to out_features={out_features}.")
        self.in_features, self.out_features = in_features, out_features
        self.in_modes, self.out_modes = in_modes, out_modes
        self.forward_mode = forward
        self.batch_hint = int(batch_hint)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.relative_error: float | None = None
        self._letters = iter(_LETTERS)
        self._out_sub = "".join(next(self._letters) for _ in out_modes)
        self._in_sub = "".join(next(self._letters) for _ in in_modes)

    def _plan(self) -> None:
        subs, shapes = self._factor_subscripts(), [tuple(t.shape) for t in self._factors()]
        limit = self.batch_hint * (self.in_features + self.out_features)
        self._forward_path = Contraction([_BATCH + self._in_sub, *subs],
                                         [(self.batch_hint, *self.in_modes), *shapes],
                                         _BATCH + self._out_sub, batch_size=self.batch_hint,
                                         memory_limit=limit)
        self._dense_path = Contraction(subs, shapes, self._out_sub + self._in_sub,
                                       memory_limit=self.in_features * self.out_features)

    # subclasses: the factor tensors (in a fixed order) and their subscripts
    def _factors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def _factor_subscripts(self) -> list[str]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.forward_mode == "reconstructed":
            return F.linear(x, self._reconstructed_weight(x), self.bias)
        y = self.weight_product(x)
        return y if self.bias is None else y + self.bias

    def weight_product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` without the bias, on the forward this module runs."""
        if self.forward_mode == "reconstructed":
            return F.linear(x, self._reconstructed_weight(x))
        y = self._forward_path(x.unflatten(-1, self.in_modes), *self._factors())
        return y.flatten(-len(self.out_modes))

    def to_dense(self) -> torch.Tensor:
        """The exact weight ``[out, in]`` the factors represent; differentiable."""
        return self._dense_path(*self._factors()).reshape(self.out_features, self.in_features)

    def _dense_linear(self) -> nn.Linear:
        w = self.to_dense()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def factorized_flops(self, input_shape: Sequence[int]) -> int:
        tokens = math.prod(input_shape[:-1])
        return self._forward_path.flops(tokens) + (tokens * self.out_features if self.bias is not None else 0)

    def factorized_stages(self, input_shape: Sequence[int]) -> list[tuple[int, int]]:
        """``(FLOPs, elements moved)`` per step of the factorized forward (bias adds in the last)."""
        tokens = math.prod(input_shape[:-1])
        st = self._forward_path.stages(tokens)
        f, e = st[-1]
        st[-1] = (f + (tokens * self.out_features if self.bias is not None else 0), e)
        return st

    def dense_stages(self, input_shape: Sequence[int]) -> list[tuple[int, int]]:
        """The one stage of the dense layer: its FLOPs; input, weight and output elements."""
        tokens = math.prod(input_shape[:-1])
        elems = tokens * self.in_features + self.in_features * self.out_features + tokens * self.out_features
        return [(self.dense_flops(input_shape), elems)]

    def dense_flops(self, input_shape: Sequence[int]) -> int:
        tokens = math.prod(input_shape[:-1])
        bias = tokens * self.out_features if self.bias is not None else 0
        return 2 * tokens * self.in_features * self.out_features + bias

    def reconstruction_flops(self) -> int:
        """FLOPs of rebuilding the weight from the factors (once per weight change in inference)."""
        return self._dense_path.flops()

    def reconstructed_flops(self, input_shape: Sequence[int]) -> int:
        """Per call with grad on (training): the rebuild and the dense op."""
        return self.reconstruction_flops() + self.dense_flops(input_shape)

    def flops(self, input_shape: Sequence[int]) -> int:
        """FLOPs of an inference call of the forward this module runs (``forward_mode``) on
        ``input_shape``; reconstructed: the dense layer's (the rebuilt weight is cached)."""
        if self.forward_mode == "reconstructed":
            return self.dense_flops(input_shape)
        return self.factorized_flops(input_shape)

    def _finish(self, w64: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        with torch.no_grad():
            if bias is not None:
                self.bias.copy_(bias.to(torch.float64))
            err = torch.linalg.norm(self.to_dense() - w64) / torch.linalg.norm(w64).clamp_min(1e-300)
        self.relative_error = float(err)
        return self.to(dtype)

    def _extra(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}, "
                f"bias={self.bias is not None}, forward={self.forward_mode!r}")

    def extra_repr(self) -> str:
        return self._extra()

    @staticmethod
    def _modes_for(layer: nn.Linear, order: int, in_modes, out_modes) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (tuple(in_modes) if in_modes is not None else tensorize(layer.in_features, order),
                tuple(out_modes) if out_modes is not None else tensorize(layer.out_features, order))


def _weight_of(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"expected an nn.Linear; got {type(layer).__name__}")
    return layer.weight.detach(), None if layer.bias is None else layer.bias.detach()


class CPLinear(_TensorizedLinear):
    """CP (canonical polyadic) factorization of the tensorized weight, with CP weights ``w``.

    Parameters: ``weights [R]`` (the CP weights: the L1 regularizer acts on them)
    and ``factors`` — ``[o_k, R]`` for each output mode, then ``[i_k, R]`` for
    each input mode.

    Example:
        >>> layer = CPLinear.from_dense(torch.nn.Linear(64, 32), rank=8)
        >>> layer.ranks, layer(torch.randn(5, 64)).shape
        ((8,), torch.Size([5, 32]))
    """

    method_name = "cp"

    def __init__(self, in_features: int, out_features: int, rank: int, *, in_modes: Sequence[int],
                 out_modes: Sequence[int], bias: bool = True, forward: str = "factorized",
                 batch_hint: int = 256, device=None, dtype=None) -> None:
        super().__init__()
        self._setup(in_features, out_features, in_modes, out_modes, bias, forward, batch_hint, device, dtype)
        if rank < 1:
            raise ValueError(f"CPLinear: expected rank >= 1; got {rank}.")
        self.rank = int(rank)
        self._rank_sub = next(self._letters)
        self.weights = nn.Parameter(torch.ones(rank, device=device, dtype=dtype))
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.randn(n, rank, device=device, dtype=dtype) / math.sqrt(n))
             for n in (*self.out_modes, *self.in_modes)])
        self._plan()

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.rank,)

    def _factors(self) -> list[torch.Tensor]:
        return [self.weights, *self.factors]

    def _factor_subscripts(self) -> list[str]:
        return [self._rank_sub] + [c + self._rank_sub for c in self._out_sub + self._in_sub]

    @classmethod
    def from_dense(cls, layer: nn.Linear, rank: int | float | str = "same", *, tolerance: float | None = None,
                   energy: float | None = None, rank_multiple: int = 1, in_modes=None, out_modes=None,
                   forward: str = "factorized", batch_hint: int = 256, n_iter_max: int = 100) -> CPLinear:
        """CP of ``layer.weight`` reshaped to ``(out_modes, in_modes)``; ``rank`` as in
        :func:`sparsify.ranks.cp_rank` (int, fraction of the parameters, ``'same'``)."""
        w, b = _weight_of(layer)
        in_modes, out_modes = cls._modes_for(layer, 2, in_modes, out_modes)
        shape = (*out_modes, *in_modes)
        t = w.to(torch.float64).reshape(shape)
        r = rank_sel.cp_rank(t, rank, tolerance=tolerance, energy=energy, rank_multiple=rank_multiple)
        weights, factors = decompose.cp(t, r, n_iter_max=n_iter_max)
        new = cls(layer.in_features, layer.out_features, r, in_modes=in_modes, out_modes=out_modes,
                  bias=b is not None, forward=forward, batch_hint=batch_hint, dtype=torch.float64)
        with torch.no_grad():
            new.weights.copy_(weights)
            for p, f in zip(new.factors, factors):
                p.copy_(f)
        return new._finish(w.to(torch.float64), b, w.dtype)


class TuckerLinear(_TensorizedLinear):
    """Tucker factorization of the tensorized weight: core ``G`` and one factor per mode.

    ``ranks`` are per mode: output modes first, then input modes.

    Example:
        >>> layer = TuckerLinear.from_dense(torch.nn.Linear(64, 32), rank=(4, 4, 4, 4))
        >>> layer.ranks, tuple(layer.core.shape)
        ((4, 4, 4, 4), (4, 4, 4, 4))
    """

    method_name = "tucker"

    def __init__(self, in_features: int, out_features: int, ranks: Sequence[int], *, in_modes: Sequence[int],
                 out_modes: Sequence[int], bias: bool = True, forward: str = "factorized",
                 batch_hint: int = 256, device=None, dtype=None) -> None:
        super().__init__()
        self._setup(in_features, out_features, in_modes, out_modes, bias, forward, batch_hint, device, dtype)
        modes = (*self.out_modes, *self.in_modes)
        ranks = tuple(int(r) for r in ranks)
        if len(ranks) != len(modes) or any(not 1 <= r <= n for r, n in zip(ranks, modes)):
            raise ValueError(f"TuckerLinear: expected {len(modes)} ranks, each in [1, mode size] for modes "
                             f"{modes}; got {ranks}.")
        self._ranks = ranks
        self._rank_subs = "".join(next(self._letters) for _ in modes)
        self.core = nn.Parameter(torch.randn(*ranks, device=device, dtype=dtype) / math.sqrt(math.prod(ranks)))
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.randn(n, r, device=device, dtype=dtype) / math.sqrt(n)) for n, r in zip(modes, ranks)])
        self._plan()

    @property
    def ranks(self) -> tuple[int, ...]:
        return self._ranks

    def _factors(self) -> list[torch.Tensor]:
        return [self.core, *self.factors]

    def _factor_subscripts(self) -> list[str]:
        return [self._rank_subs] + [n + r for n, r in zip(self._out_sub + self._in_sub, self._rank_subs)]

    @classmethod
    def from_dense(cls, layer: nn.Linear, rank: int | float | str | Sequence[int] = "same", *,
                   tolerance: float | None = None, energy: float | None = None, rank_multiple: int = 1,
                   in_modes=None, out_modes=None, forward: str = "factorized", batch_hint: int = 256,
                   n_iter_max: int = 20) -> TuckerLinear:
        """Tucker (HOSVD + HOOI) of ``layer.weight`` reshaped to ``(out_modes, in_modes)``;
        ``rank`` as in :func:`sparsify.ranks.tucker_ranks`."""
        w, b = _weight_of(layer)
        in_modes, out_modes = cls._modes_for(layer, 2, in_modes, out_modes)
        t = w.to(torch.float64).reshape(*out_modes, *in_modes)
        modes = list(range(t.dim()))
        rs = rank_sel.tucker_ranks(t, modes, rank, tolerance=tolerance, energy=energy, rank_multiple=rank_multiple)
        core, factors = decompose.tucker(t, rs, modes, n_iter_max=n_iter_max)
        new = cls(layer.in_features, layer.out_features, rs, in_modes=in_modes, out_modes=out_modes,
                  bias=b is not None, forward=forward, batch_hint=batch_hint, dtype=torch.float64)
        with torch.no_grad():
            new.core.copy_(core)
            for p, f in zip(new.factors, factors):
                p.copy_(f)
        return new._finish(w.to(torch.float64), b, w.dtype)


class TTLinear(_TensorizedLinear):
    """TT-matrix (tensor-train) factorization (Novikov et al. 2015).

    ``cores[k]`` is ``[r_k, o_k, i_k, r_{k+1}]`` with ``r_0 = r_d = 1``;
    ``ranks`` is ``(1, r_1, ..., r_{d-1}, 1)`` as produced, read from the cores
    (TT-SVD can give smaller ranks than asked).

    Example:
        >>> layer = TTLinear.from_dense(torch.nn.Linear(64, 64), rank=4)
        >>> layer.ranks
        (1, 4, 4, 1)
    """

    method_name = "tt"

    def __init__(self, in_features: int, out_features: int, ranks: Sequence[int], *, in_modes: Sequence[int],
                 out_modes: Sequence[int], bias: bool = True, forward: str = "factorized",
                 batch_hint: int = 256, device=None, dtype=None) -> None:
        super().__init__()
        self._setup(in_features, out_features, in_modes, out_modes, bias, forward, batch_hint, device, dtype)
        d = len(self.in_modes)
        ranks = tuple(int(r) for r in ranks)
        if len(self.out_modes) != d or len(ranks) != d + 1 or ranks[0] != 1 or ranks[-1] != 1 or min(ranks) < 1:
            raise ValueError(f"TTLinear: expected as many in_modes as out_modes and d+1 ranks (1, ..., 1); "
                             f"got in_modes {self.in_modes}, out_modes {self.out_modes}, ranks {ranks}.")
        self._ranks = ranks
        self._bond_subs = "".join(next(self._letters) for _ in ranks)
        self.cores = nn.ParameterList([
            nn.Parameter(torch.randn(ranks[k], o, i, ranks[k + 1], device=device, dtype=dtype)
                         / math.sqrt(ranks[k] * i))
            for k, (o, i) in enumerate(zip(self.out_modes, self.in_modes))])
        self._plan()

    @property
    def ranks(self) -> tuple[int, ...]:
        return self._ranks

    def _factors(self) -> list[torch.Tensor]:
        return list(self.cores)

    def _factor_subscripts(self) -> list[str]:
        b = self._bond_subs
        return [b[k] + o + i + b[k + 1] for k, (o, i) in enumerate(zip(self._out_sub, self._in_sub))]

    @classmethod
    def from_dense(cls, layer: nn.Linear, rank: int | float | str | Sequence[int] = "same", *,
                   tolerance: float | None = None, energy: float | None = None, rank_multiple: int = 1,
                   in_modes=None, out_modes=None, order: int = 3, forward: str = "factorized",
                   batch_hint: int = 256) -> TTLinear:
        """TT-SVD of ``layer.weight`` reshaped to ``(o_1..o_d, i_1..i_d)``; ``rank`` as in
        :func:`sparsify.ranks.tt_ranks`."""
        w, b = _weight_of(layer)
        in_modes, out_modes = cls._modes_for(layer, order, in_modes, out_modes)
        t = w.to(torch.float64).reshape(*out_modes, *in_modes)
        rs = rank_sel.tt_ranks(t, rank, tolerance=tolerance, energy=energy, rank_multiple=rank_multiple)
        cores = decompose.tt_matrix(t, rs)
        produced = (1, *(c.shape[-1] for c in cores))
        new = cls(layer.in_features, layer.out_features, produced, in_modes=in_modes, out_modes=out_modes,
                  bias=b is not None, forward=forward, batch_hint=batch_hint, dtype=torch.float64)
        with torch.no_grad():
            for p, c in zip(new.cores, cores):
                p.copy_(c)
        return new._finish(w.to(torch.float64), b, w.dtype)
