"""Per-layer cost: parameters, FLOPs and weight bytes of dense layers and rewritten ones.

A rewritten layer module reports its own FLOPs through ``flops(input_shape)``;
this module knows the dense layers the rewrites start from.
"""

from __future__ import annotations

import math

from torch import nn

__all__ = ["BALANCE", "dense_flops", "module_flops", "param_count", "roofline_cost", "weight_bytes"]


#: FLOPs one byte of memory traffic is worth (the machine balance of the roofline),
#: fitted to benchmarks/results/factorized_cpu.json (one CPU thread, fp32): the dense
#: convs and matmuls there run at ~70 GFLOP/s, while the 1x1 and depthwise stages of
#: the factorized convs at 56x56 move data at ~1.2 GB/s effective.  With 60, the
#: roofline's factorized/dense cost ratio is within ~25% of the measured time ratio for
#: every conv row (CP 1.47 vs 1.40 measured, 2.74 vs 2.72; Tucker-2 0.88 vs 0.67, 1.15
#: vs 1.17); a hardware balance of 10-20 (peak FLOPs / DRAM bandwidth) calls all of
#: them memory-cheap (0.2-0.7), which the measurements contradict: torch's CPU 1x1
#: and depthwise kernels stay far from the bandwidth roof.
BALANCE = 60.0


def roofline_cost(stages, element_size: int, balance: float | None = None) -> float:
    """Sum over stages of ``max(FLOPs, balance * bytes)``: a stage costs its FLOPs when
    compute-bound, its memory traffic (input + weight + output, each read or written
    once) times the machine balance when memory-bound.

    Example:
        >>> roofline_cost([(1000, 10), (10, 100)], 4, balance=2.0)
        1800.0
    """
    b = BALANCE if balance is None else balance
    return float(sum(max(f, b * e * element_size) for f, e in stages))


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
