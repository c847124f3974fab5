"""block_sparsify: Linear layers and F.linear calls -> BlockSparseLinear.

Without calibration data, blocks are ranked by L2 norm and the top ones kept to the
target density, at least one per block row (``sparsify.patterns.magnitude_layout``),
and the kept blocks are the weight's own.

With calibration data (``passes/calibrate.py`` calls :func:`convert` with the layer's
input statistics), blocks are ranked by saliency (``|W_ij| ||x_j||``, squared and
summed per block; or by OBS greedy removal with ``selection='obs'``) and the kept blocks
are refit by exact least squares on the layer's calibration inputs, per block row
(``sparsify.calibration.select_blocks`` / ``refit_blocks``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import (
    DEFAULT_DAMPING,
    InputStats,
    centered,
    corrected_bias,
    damped,
    output_error,
    refit_blocks,
    select_blocks,
)
from ..modules.block_sparse import BlockSparseLinear
from ..patterns import magnitude_layout
from .infra import PassContext, PassResult
from .rewrite import carry_out
from .sites import LayerSite

__all__ = ["block_sparsify", "convert"]


def convert(site: LayerSite, params: dict, stats: InputStats | None = None,
            damping: float = DEFAULT_DAMPING, selection: str = "saliency",
            correct_bias: bool = True) -> tuple[nn.Module, dict]:
    """The block-sparse layer for ``site`` (see the module docstring) and what it produced."""
    w = site.weight.detach()
    bias = None if site.bias is None else site.bias.detach()
    b = params["block_size"]
    if stats is None:
        layout = magnitude_layout(w, density=params["density"], block_size=b)
        new = BlockSparseLinear.from_weight(w, bias, layout)
        return new, {"density": layout.density, "block_size": layout.block_size, "nnz_blocks": layout.nnz}
    w64 = w.to(torch.float64)
    center = correct_bias and bias is not None
    hd, lam = damped((centered(stats) if center else stats.h).to(w64.device), damping)
    layout = select_blocks(w64, hd[0], params["density"], b, selection=selection)
    refit = refit_blocks(w64, hd[0], layout.block_mask(), b)
    new_bias = corrected_bias(w64[None], refit[None], bias, stats) if center else bias
    new = BlockSparseLinear.from_weight(refit.to(w.dtype), new_bias, layout)
    kept_only = layout.to_dense(layout.values_from_dense(w64))  # the same blocks, not refit
    err = output_error(w64[None], refit[None], bias, stats, bias_new=new_bias if center else None)
    before = output_error(w64[None], kept_only[None], bias, stats)
    return new, {
        "density": layout.density, "block_size": layout.block_size, "nnz_blocks": layout.nnz,
        "output_error": err,
        "calibration": (f"blocks by {'OBS greedy removal' if selection == 'obs' else 'saliency |W| ||x||'}, "
                        f"kept blocks refit by least squares (damping {damping:g} x mean diag: "
                        f"lambda {float(lam[0]):.3g}){'; bias corrected for the mean input' if center else ''}; "
                        f"output error {before:.3g} unrefit -> {err:.3g}"),
    }


def _convert(site: LayerSite, params: dict) -> tuple[nn.Module, dict]:
    return convert(site, params)


def block_sparsify(module: nn.Module, ctx: PassContext) -> PassResult:
    return carry_out(module, ctx, "block_sparse", _convert)
