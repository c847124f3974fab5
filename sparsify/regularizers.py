"""Fine-tuning regularizers for factorized layers: tensor dropout and a rank lasso.

Both are opt-in and act on every factorized module in a model (CP / Tucker /
TT Linear, CP / Tucker-2 / TT conv, and the SVD ``LowRankLinear``) through its *rank
components*: the slices of its parameters that one rank index owns.

    module          rank components (parameter, axis)
    CPLinear/CPConv ``weights`` (the CP weights), axis 0
    TuckerLinear    each factor ``factors.j``, axis 1 (one per mode)
    TuckerConv      ``first_weight`` axis 0 (R_in), ``last_weight`` axis 1 (R_out)
    TTLinear        each internal bond: ``cores.k`` axis 3, k < d - 1
    TTConv          each internal bond: ``first_weight`` and ``spatial_weights.a`` axis 0
    LowRankLinear   ``V``, axis 0

* :func:`tensor_dropout` (Kolbeinsson et al. 2021) zeroes each rank component
  with probability ``p`` in training mode (rescaling the rest by ``1 / (1 - p)``),
  through ``torch.nn.utils.parametrize``; in eval mode it is the identity.
* :func:`rank_lasso` adds ``penalty * sum |w_r|`` of the CP weights, and for the
  others the group lasso ``penalty * sum_r ||component_r||_2``, after every
  forward of a factorized module, to ``.loss`` (add it to the training loss,
  then ``.reset()``), pushing whole rank components to zero.

Example:
    >>> import torch, sparsify
    >>> from sparsify.regularizers import rank_lasso, tensor_dropout
    >>> m = torch.nn.Sequential(sparsify.CPLinear.from_dense(torch.nn.Linear(16, 16), rank=4))
    >>> drop, lasso = tensor_dropout(m, p=0.25), rank_lasso(m, penalty=1e-3)
    >>> loss = m(torch.randn(2, 16)).square().mean() + lasso.loss
    >>> loss.backward(); lasso.reset(); drop.remove(); lasso.remove()
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from .modules.factorized_conv import CPConv, TTConv, TuckerConv
from .modules.factorized_linear import CPLinear, TTLinear, TuckerLinear
from .modules.low_rank import LowRankLinear

__all__ = ["RankLasso", "TensorDropout", "rank_components", "rank_lasso", "tensor_dropout"]


def rank_components(module: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """``(owner, parameter name, rank axis)`` of each rank-component group of ``module``
    ([] for modules that are not factorized)."""
    if isinstance(module, (CPLinear, CPConv)):
        return [(module, "weights", 0)]
    if isinstance(module, TuckerLinear):
        return [(module.factors, str(j), 1) for j in range(len(module.factors))]
    if isinstance(module, TuckerConv):
        return [(module, "first_weight", 0), (module, "last_weight", 1)]
    if isinstance(module, TTLinear):
        return [(module.cores, str(k), 3) for k in range(len(module.cores) - 1)]
    if isinstance(module, TTConv):
        return [(module, "first_weight", 0)] + [(module.spatial_weights, str(a), 0)
                                                for a in range(len(module.spatial_weights))]
    if isinstance(module, LowRankLinear):
        return [(module, "V", 0)]
    return []


def _factorized(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if rank_components(m):
            yield name, m


class _RankDropout(nn.Module):
    """Parametrization: drop whole slices along ``dim`` with probability ``p`` in training."""

    def __init__(self, p: float, dim: int) -> None:
        super().__init__()
        self.p, self.dim = p, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[self.dim], device=x.device) >= self.p
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return x * (keep.to(x.dtype) / (1.0 - self.p)).view(shape)


class TensorDropout:
    """Handle of :func:`tensor_dropout`; ``remove()`` takes the parametrizations off."""

    def __init__(self, targets: list[tuple[nn.Module, str]]) -> None:
        self.targets = targets

    def remove(self) -> None:
        for owner, name in self.targets:
            if parametrize.is_parametrized(owner, name):
                parametrize.remove_parametrizations(owner, name, leave_parametrized=False)
        self.targets = []


def tensor_dropout(model: nn.Module, p: float = 0.1) -> TensorDropout:
    """Drop each rank component of every factorized module with probability ``p`` while training.

    Raises ``ValueError`` if ``p`` is not in [0, 1) or the model has no factorized module.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"tensor_dropout: expected p in [0, 1); got {p!r}")
    targets = []
    for _, m in _factorized(model):
        for owner, name, dim in rank_components(m):
            parametrize.register_parametrization(owner, name, _RankDropout(p, dim))
            targets.append((owner, name))
    if not targets:
        raise ValueError("tensor_dropout: the model has no factorized module (CP / Tucker / TT / low-rank); "
                         "convert it with sparsify.sparsify(..., method='cp' | 'tucker' | 'tt' | 'low_rank') first")
    return TensorDropout(targets)


class RankLasso:
    """Accumulates the rank lasso after each forward of a factorized module.

    ``loss`` is the sum since the last ``reset()`` (a tensor in the graph);
    ``penalty_now()`` computes it once from the current parameters.
    """

    def __init__(self, model: nn.Module, penalty: float) -> None:
        self.penalty = float(penalty)
        self.loss: torch.Tensor | float = 0.0
        self._modules = [m for _, m in _factorized(model)]
        if not self._modules:
            raise ValueError("rank_lasso: the model has no factorized module (CP / Tucker / TT / low-rank); "
                             "convert it first")
        self._handles = [m.register_forward_hook(self._hook) for m in self._modules]

    @staticmethod
    def module_penalty(m: nn.Module) -> torch.Tensor:
        total = None
        for owner, name, dim in rank_components(m):
            t = getattr(owner, name)
            if isinstance(m, (CPLinear, CPConv)):
                term = t.abs().sum()
            else:
                term = t.movedim(dim, 0).reshape(t.shape[dim], -1).norm(dim=1).sum()
            total = term if total is None else total + term
        return total

    def _hook(self, module: nn.Module, args, out) -> None:
        self.loss = self.loss + self.penalty * self.module_penalty(module)

    def penalty_now(self) -> torch.Tensor:
        return self.penalty * sum(self.module_penalty(m) for m in self._modules)

    def reset(self) -> None:
        self.loss = 0.0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def rank_lasso(model: nn.Module, penalty: float = 1e-4) -> RankLasso:
    """L1 on CP weights (group lasso on the rank components of the other factorized
    modules), collected by forward hooks into ``.loss``."""
    if penalty < 0:
        raise ValueError(f"rank_lasso: expected penalty >= 0; got {penalty!r}")
    return RankLasso(model, penalty)
