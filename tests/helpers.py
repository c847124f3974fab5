"""Small shared helpers for the tests."""

from __future__ import annotations

import copy

import torch
from torch import nn

#: float32 has a 24-bit mantissa (eps 1.2e-7); sums over a few hundred terms in a
#: different order stay within ~1e-6 relative, so 1e-5 leaves a 10x margin.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def masked_reference(original: nn.Module, converted: nn.Module) -> nn.Module:
    """``original`` with each block-sparse layer's element mask applied to its weight."""
    ref = copy.deepcopy(original)
    plan = converted._sparsify_plan
    for d in plan.decisions:
        if d.method != "block_sparse":
            continue
        layer = converted.get_submodule(d.result["module"])
        if d.layer_type == "LSTM":  # every weight of the layer: weight_ih_l0, weight_hh_l0, ...
            masks = {f"{d.name}.{n}": w.layout.element_mask() for n, w in layer.named_children()}
        else:
            weight_name = d.name if d.layer_type == "F.linear" else f"{d.name}.weight"
            masks = {weight_name: layer.layout.element_mask()}
        for weight_name, mask in masks.items():
            p = ref.get_parameter(weight_name)
            mask = mask.view(*mask.shape, *([1] * (p.dim() - 2)))  # a conv kernel: the same mask for every tap
            with torch.no_grad():
                p.mul_(mask.to(p.dtype))
    return ref


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert torch.equal(now[k], v), f"{k} changed"
