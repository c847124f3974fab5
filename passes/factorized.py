"""What the tensor-factorization passes share: from a layer site and concrete
ranks to a factorized module (a real one, or an empty one on the meta device
whose only use is to count its parameters and FLOPs while planning)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..modules.factorized_conv import CPConv, TTConv, TuckerConv, conv_padding, tt_conv_tensor
from ..modules.factorized_linear import CPLinear, TTLinear, TuckerLinear, tensorize
from ..modules.low_rank import LowRankLinear
from .sites import LayerSite

__all__ = ["FACTORIZED_METHODS", "LINEAR_ORDER", "TT_ORDER", "as_layer", "build", "layer_tensor", "param_formula",
           "tensor_modes", "tokens_of"]

#: Methods whose ranks ``allocate_ranks`` resolves (``low_rank`` only where it needs to).
FACTORIZED_METHODS = ("cp", "tucker", "tt", "low_rank")
#: Linear weights are tensorized into this many output and as many input modes.
LINEAR_ORDER = 2
TT_ORDER = 3


def as_layer(site: LayerSite) -> nn.Module:
    """The site's layer module; other sites (functional, HF ``Conv1D``, attention
    projections) get an ``nn.Linear`` view of their ``[out, in]`` weight."""
    if site.module is not None and isinstance(site.module, (nn.Linear, nn.Conv1d, nn.Conv2d)) \
            and not site.transposed and site.bias is site.module.bias:
        return site.module
    out_f, in_f = site.weight.shape
    lin = nn.Linear(in_f, out_f, bias=site.bias is not None, device="meta")
    lin.weight = nn.Parameter(site.weight.detach(), requires_grad=False)
    if site.bias is not None:
        lin.bias = nn.Parameter(site.bias.detach(), requires_grad=False)
    return lin


def tensor_modes(method: str, layer_type: str, weight_shape) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(out_modes, in_modes)`` of the tensorized Linear weight (None for convs)."""
    if layer_type != "Linear" or method == "low_rank":
        return None
    order = TT_ORDER if method == "tt" else LINEAR_ORDER
    return tensorize(weight_shape[0], order), tensorize(weight_shape[1], order)


def layer_tensor(method: str, layer: nn.Module) -> list[torch.Tensor]:
    """The tensors (one per group) whose ranks are chosen, in float64 (TT of a conv: each
    group's kernel as the TT-matrix tensor ``(in, k.., out, 1..)``, see ``tt_conv_tensor``)."""
    w = layer.weight.detach().to(torch.float64)
    if isinstance(layer, nn.Linear):
        modes = tensor_modes(method, "Linear", tuple(w.shape))
        return [w if modes is None else w.reshape(*modes[0], *modes[1])]
    groups = list(w.chunk(layer.groups, dim=0))
    return [tt_conv_tensor(t) for t in groups] if method == "tt" else groups


def build(method: str, layer: nn.Module, ranks: Any, *, forward: str = "factorized", batch_hint: int = 256,
          meta: bool = False) -> nn.Module:
    """A factorized ``layer`` at concrete ``ranks``: decomposed, or empty on the meta device."""
    if isinstance(layer, nn.Linear):
        modes = tensor_modes(method, "Linear", tuple(layer.weight.shape))
        kw = dict(forward=forward, batch_hint=batch_hint)
        if method == "low_rank":
            if meta:
                return LowRankLinear(layer.in_features, layer.out_features, int(ranks), bias=layer.bias is not None,
                                     device="meta")
            bias = None if layer.bias is None else layer.bias.detach()
            return LowRankLinear.from_weight(layer.weight.detach(), bias, rank=int(ranks))
        cls = {"cp": CPLinear, "tucker": TuckerLinear, "tt": TTLinear}[method]
        out_modes, in_modes = modes
        if meta:
            return cls(layer.in_features, layer.out_features, ranks, in_modes=in_modes, out_modes=out_modes,
                       bias=layer.bias is not None, device="meta", **kw)
        if method == "tt":
            kw["order"] = TT_ORDER
        return cls.from_dense(layer, rank=ranks, in_modes=in_modes, out_modes=out_modes, **kw)
    cls = {"cp": CPConv, "tucker": TuckerConv, "tt": TTConv}[method]
    if meta:
        return cls(layer.in_channels, layer.out_channels, layer.kernel_size, ranks, stride=layer.stride,
                   padding=conv_padding(layer), dilation=layer.dilation, groups=layer.groups,
                   padding_mode=layer.padding_mode, bias=layer.bias is not None, forward=forward, device="meta")
    return cls.from_dense(layer, rank=ranks, forward=forward)


def tokens_of(input_shape) -> int:
    return 256 if input_shape is None else max(1, math.prod(input_shape[:-1]))


def param_formula(method: str, layer: nn.Module, ranks: Any) -> int:
    """Parameters of the factorized module at ``ranks``, by formula (tests check it
    against the modules' own counts)."""
    bias = 0 if layer.bias is None else layer.bias.numel()
    if isinstance(layer, nn.Linear):
        out_f, in_f = layer.weight.shape
        if method == "low_rank":
            return int(ranks) * (in_f + out_f) + bias
        out_modes, in_modes = tensor_modes(method, "Linear", (out_f, in_f))
        modes = (*out_modes, *in_modes)
        if method == "cp":
            return int(ranks) * (sum(modes) + 1) + bias
        if method == "tucker":
            return math.prod(ranks) + sum(n * r for n, r in zip(modes, ranks)) + bias
        d = len(in_modes)
        return sum(ranks[k] * out_modes[k] * in_modes[k] * ranks[k + 1] for k in range(d)) + bias
    g, cin, cout = layer.groups, layer.in_channels, layer.out_channels
    k = math.prod(layer.kernel_size)
    if method == "cp":
        r = int(ranks)
        return r * cin + g * r * (sum(layer.kernel_size) + 1) + cout * r + bias
    if method == "tt":
        # cores [r_{k-1}, n_k, r_k] of each group, modes (in/g, k.., out/g)
        modes = (cin // g, *layer.kernel_size, cout // g)
        return g * sum(ranks[j] * n * ranks[j + 1] for j, n in enumerate(modes)) + bias
    r_out, r_in = ranks
    return r_in * cin + g * r_out * r_in * k + cout * r_out + bias
