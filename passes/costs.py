"""Per-layer cost: parameters, FLOPs and weight bytes of dense layers and rewritten ones.

A rewritten layer module reports its own FLOPs through ``flops(input_shape)``;
this module knows the dense layers the rewrites start from.
"""

from __future__ import annotations

import math

from torch import nn

__all__ = ["dense_flops", "module_flops", "param_count", "weight_bytes"]


def dense_flops(layer_type: str, weight_shape, in_shape, out_shape) -> int | None:
    """Multiply-adds x 2 of a dense Linear / ConvNd for the given shapes (None without shapes)."""
    if in_shape is None or out_shape is None:
        return None
    if layer_type == "Linear":
        tokens = math.prod(in_shape[:-1])
        return 2 * tokens * weight_shape[0] * weight_shape[1]
    # ConvNd: every output element costs (Cin / groups) * prod(kernel) multiply-adds.
    per_out = math.prod(weight_shape[1:])
    return 2 * math.prod(out_shape) * per_out


def module_flops(module: nn.Module, in_shape, out_shape) -> int | None:
    """FLOPs of a rewritten module (its ``flops``) or of a dense Linear / Conv."""
    if in_shape is None:
        return None
    if hasattr(module, "flops"):
        return int(module.flops(in_shape))
    w = getattr(module, "weight", None)
    if w is None:
        return None
    layer_type = "Linear" if isinstance(module, nn.Linear) else type(module).__name__
    return dense_flops(layer_type, tuple(w.shape), in_shape, out_shape)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def weight_bytes(module: nn.Module) -> int:
    """Bytes of parameters and persistent buffers (block indices count)."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    total += sum(b.numel() * b.element_size() for b in module.state_dict(keep_vars=True).values()
                 if not isinstance(b, nn.Parameter))
    return total
