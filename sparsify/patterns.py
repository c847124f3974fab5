"""Sparsity patterns: which blocks of a weight to keep."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .runtime import BlockSparseLayout

__all__ = ["block_norms", "magnitude_layout", "target_blocks"]


def block_norms(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """L2 norm of each ``block_size`` block of ``weight`` (zero-padded), ``[n_block_rows, n_block_cols]``."""
    rows, cols = weight.shape
    b = block_size
    pr, pc = -(-rows // b) * b, -(-cols // b) * b
    w = F.pad(weight.detach().double(), (0, pc - cols, 0, pr - rows))
    return w.reshape(pr // b, b, pc // b, b).pow(2).sum(dim=(1, 3)).sqrt()


def target_blocks(n_block_rows: int, n_block_cols: int, density: float) -> int:
    """Blocks kept at ``density``: the nearest count, at least one per block row."""
    total = n_block_rows * n_block_cols
    return min(total, max(n_block_rows, round(density * total)))


def magnitude_layout(weight: torch.Tensor, *, density: float, block_size: int) -> BlockSparseLayout:
    """Keep the ``density`` fraction of blocks with the largest L2 norm, at least one per block row.

    Each block row first keeps its largest block (so no output is cut off from
    its input); the rest of the budget goes to the largest remaining blocks
    across the whole layer.  Ties break towards the lower (row, column).

    Example:
        >>> w = torch.zeros(64, 64); w[:32, :32] = 1; w[32:, 32:] = 2
        >>> magnitude_layout(w, density=0.5, block_size=32).block_mask().tolist()
        [[True, False], [False, True]]
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1]. Got {density}.")
    norms = block_norms(weight, block_size)
    nbr, nbc = norms.shape
    k = target_blocks(nbr, nbc, density)
    mask = torch.zeros(nbr, nbc, dtype=torch.bool)
    mask[torch.arange(nbr), norms.argmax(dim=1)] = True
    extra = k - nbr
    if extra > 0:
        rest = norms.masked_fill(mask, -1.0).flatten()
        # stable descending order: equal norms keep their row-major order
        order = torch.sort(rest, descending=True, stable=True).indices[:extra]
        mask.view(-1)[order] = True
    return BlockSparseLayout.from_block_mask(mask, shape=tuple(weight.shape), block_size=block_size)
