"""block_sparsify: Linear layers and F.linear calls -> BlockSparseLinear.

Blocks are ranked by L2 norm and the top ones kept to the target density, at
least one per block row (``sparsify.patterns.magnitude_layout``).
"""

from __future__ import annotations

from torch import nn

from ..modules.block_sparse import BlockSparseLinear
from ..patterns import magnitude_layout
from .infra import PassContext, PassResult
from .rewrite import carry_out
from .sites import LayerSite

__all__ = ["block_sparsify"]


def _convert(site: LayerSite, params: dict) -> tuple[nn.Module, dict]:
    w = site.weight.detach()
    layout = magnitude_layout(w, density=params["density"], block_size=params["block_size"])
    bias = None if site.bias is None else site.bias.detach()
    new = BlockSparseLinear.from_weight(w, bias, layout)
    return new, {"density": layout.density, "block_size": layout.block_size, "nnz_blocks": layout.nnz}


def block_sparsify(module: nn.Module, ctx: PassContext) -> PassResult:
    return carry_out(module, ctx, "block_sparse", _convert)
