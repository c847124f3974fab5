"""Sparsity patterns: which blocks of a weight to keep.

Two kinds of pattern live here:

* ``magnitude_layout`` keeps the largest blocks of a trained weight (conversion);
* ``random_layout``, ``small_world_layout`` and ``barabasi_albert_layout`` draw
  a pattern for a layer trained from scratch.  Each is deterministic given
  ``seed`` (same seed, same networkx and torch versions: same layout).

How a block grid maps to a graph (the graph patterns)
-----------------------------------------------------
A weight ``W [rows, cols]`` in blocks of ``b`` is a grid of ``R x C`` blocks
(``R = ceil(rows / b)`` block rows = groups of output units, ``C`` block
columns = groups of input units).  The generator draws an undirected graph on
``n = max(R, C)`` nodes placed around a ring (networkx numbers them in ring
order), and node ``u`` stands for block row ``r(u) = floor(u * R / n)`` and
block column ``c(u) = floor(u * C / n)``: position on the ring is position
along both axes.  Then

* every node keeps its own block ``(r(u), c(u))`` -- the diagonal of a square
  grid, a stretched diagonal otherwise -- so every block row and every block
  column keeps at least one block;
* an edge ``{u, v}`` keeps blocks ``(r(u), c(v))`` and ``(r(v), c(u))``: unit
  group ``u`` reads ``v`` and ``v`` reads ``u``.

For a square grid this is exactly "adjacency matrix plus identity", the layout
OpenAI's block-sparse LSTMs used, and the mask is symmetric.  For a grid with
``R < C`` several nodes share a block row (they merge); with ``R > C`` several
share a block column.  A ring lattice is then a band along the stretched
diagonal, and a rewired edge is a block far from it.

Density
-------
The from-scratch patterns keep ``pattern_blocks(R, C, density)`` blocks
exactly: the nearest count to ``density * R * C``, but at least ``max(R, C)``
(one block per block row and per block column).  ``magnitude_layout`` keeps
``target_blocks(R, C, density)`` exactly: at least ``R`` (one per block row),
nothing promised per block column; so with ``C > R`` and
``round(density * R * C) < C`` it keeps fewer blocks than the from-scratch
patterns, otherwise the same count.  The graph patterns choose the
generator's degree parameter (``k`` for Watts-Strogatz, ``m`` for
Barabasi-Albert) whose mapped block count is closest to that target, then drop
(or add) uniformly random blocks outside the diagonal to hit it exactly; the
correction is less than one generator step, i.e. about one block per block row
on a square grid, so it does not change the graph's character.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .runtime import BlockSparseLayout

__all__ = [
    "PATTERNS",
    "barabasi_albert_layout",
    "block_norms",
    "layout_for",
    "layout_graph",
    "magnitude_layout",
    "pattern_blocks",
    "random_layout",
    "small_world_layout",
    "stack_layouts",
    "target_blocks",
]


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
    norms = block_norms(weight, block_size).cpu()  # a layout lives on the CPU, whatever the weight's device
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


# --------------------------------------------------------------------------- from scratch
def _grid(shape: Sequence[int], block_size: int, density: float, where: str) -> tuple[int, int, int]:
    """``(R, C, blocks to keep)`` after checking the arguments."""
    if len(shape) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"{where}: expected shape=(rows, cols) with positive ints. Got {tuple(shape)!r}.")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{where}: expected a positive int block_size. Got {block_size!r}.")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"{where}: density must be in (0, 1]. Got {density!r}; 0.25 keeps a quarter of the blocks.")
    r, c = -(-shape[0] // block_size), -(-shape[1] // block_size)
    return r, c, pattern_blocks(r, c, float(density))


def _seed(seed: int, where: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{where}: seed must be an int. Got {type(seed).__name__}.")
    return seed


def pattern_blocks(n_block_rows: int, n_block_cols: int, density: float) -> int:
    """Blocks a from-scratch pattern keeps: ``round(density * R * C)``, at least one per block row and column.

    Example:
        >>> pattern_blocks(8, 8, 0.25), pattern_blocks(2, 16, 0.01)
        (16, 16)
    """
    total = n_block_rows * n_block_cols
    return min(total, max(n_block_rows, n_block_cols, round(density * total)))


def _from_mask(mask: torch.Tensor, shape: Sequence[int], block_size: int) -> BlockSparseLayout:
    return BlockSparseLayout.from_block_mask(mask, shape=(int(shape[0]), int(shape[1])), block_size=block_size)


def _cover(r: int, c: int, gen: torch.Generator) -> torch.Tensor:
    """A random set of ``max(r, c)`` blocks that touches every block row and column."""
    n = max(r, c)
    rows = torch.cat([torch.randperm(r, generator=gen, device="cpu") for _ in range(-(-n // r))])[:n]
    cols = torch.cat([torch.randperm(c, generator=gen, device="cpu") for _ in range(-(-n // c))])[:n]
    mask = torch.zeros(r, c, dtype=torch.bool, device="cpu")
    mask[rows, cols] = True
    return mask


def random_layout(
    shape: Sequence[int], block_size: int, density: float, seed: int = 0
) -> BlockSparseLayout:
    """Blocks drawn uniformly at random, at least one in every block row and block column.

    ``max(R, C)`` blocks first cover every block row and column (a random
    pairing of shuffled rows and columns), the rest are uniform among the
    remaining blocks.

    Example:
        >>> lay = random_layout((64, 128), block_size=16, density=0.25, seed=0)
        >>> lay.nnz, bool(lay.block_mask().any(0).all() and lay.block_mask().any(1).all())
        (8, True)
    """
    r, c, k = _grid(shape, block_size, density, "random_layout")
    gen = torch.Generator("cpu").manual_seed(_seed(seed, "random_layout"))
    mask = _cover(r, c, gen)
    _adjust(mask, k, torch.zeros_like(mask), gen)
    return _from_mask(mask, shape, block_size)


def _adjust(mask: torch.Tensor, k: int, keep: torch.Tensor, gen: torch.Generator, symmetric: bool = False) -> None:
    """Drop random blocks outside ``keep`` (or add random blocks) until ``mask`` has ``k`` blocks.

    ``symmetric`` (a square mask that is symmetric) moves mirrored pairs, and a
    single block only when the count to move is odd, so the mask stays
    symmetric but for at most one block."""
    have = int(mask.sum())
    if have == k:
        return
    flat = mask.view(-1)
    n = mask.shape[0]
    drop = have > k
    pool = (mask & ~keep) if drop else ~mask
    need = abs(have - k)
    if symmetric:
        upper = torch.triu(torch.ones_like(mask), diagonal=1)
        cand = (pool & upper).view(-1).nonzero().squeeze(1)
        pairs = cand[torch.randperm(cand.numel(), generator=gen, device="cpu")[: need // 2]]
        flat[pairs] = not drop
        flat[(pairs % n) * n + pairs // n] = not drop
        need -= 2 * pairs.numel()
        pool = (mask & ~keep) if drop else ~mask
    if need:
        cand = pool.view(-1).nonzero().squeeze(1)
        flat[cand[torch.randperm(cand.numel(), generator=gen, device="cpu")[:need]]] = not drop


def _graph_mask(graph, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The block mask of a graph on ``max(r, c)`` ring-ordered nodes, and its diagonal (see the module doc)."""
    n = max(r, c)
    u = np.arange(n)
    ru, cu = u * r // n, u * c // n
    diag = np.zeros((r, c), dtype=bool)
    diag[ru, cu] = True
    mask = diag.copy()
    edges = np.array(graph.edges(), dtype=np.int64).reshape(-1, 2)
    if edges.size:
        a, b = edges[:, 0], edges[:, 1]
        mask[ru[a], cu[b]] = True
        mask[ru[b], cu[a]] = True
    return torch.from_numpy(mask), torch.from_numpy(diag)


def _closest(make: Callable[[int], object], lo: int, hi: int, r: int, c: int, k: int, exact: Callable[[int], int]):
    """``(graph, block count)`` for the generator parameter in ``[lo, hi]`` whose block count is closest to ``k``.

    On a square grid every edge is two distinct blocks, so ``exact(p)`` gives
    the count without drawing a graph.  Otherwise nodes merge, so ``exact`` is
    an upper bound and the count is measured; it grows with the parameter
    (more edges), so a galloping search from the bound's answer finds the first
    parameter reaching ``k``, and the one before it may be closer."""
    a, b = lo, hi
    while a < b:  # the first parameter whose square-grid count reaches k
        mid = (a + b) // 2
        if exact(mid) >= k:
            b = mid
        else:
            a = mid + 1
    if r == c:
        count = exact
    else:
        memo: dict[int, int] = {}

        def count(p: int) -> int:
            if p not in memo:
                memo[p] = int(_graph_mask(make(p), r, c)[0].sum())
            return memo[p]

        step, b = 1, a
        while b < hi and count(b) < k:  # gallop up: merged counts fall short of the bound
            a, b = b + 1, min(hi, b + step)
            step *= 2
        b = max(a, b)
    while a < b:
        mid = (a + b) // 2
        if count(mid) >= k:
            b = mid
        else:
            a = mid + 1
    best = a
    if a > lo and abs(count(a - 1) - k) <= abs(count(a) - k):
        best = a - 1
    return make(best), count(best)


def small_world_layout(
    shape: Sequence[int], block_size: int, density: float, rewire: float = 0.1, seed: int = 0
) -> BlockSparseLayout:
    """A Watts-Strogatz small-world pattern on the block graph (``networkx.watts_strogatz_graph``).

    A ring lattice in which each block node is joined to its ``k`` nearest
    neighbours (``k`` chosen for ``density``), each edge rewired to a random
    node with probability ``rewire``: short average paths, as a random graph,
    with the lattice's high clustering.  ``rewire=0`` is the ring lattice (a
    banded weight), ``rewire=1`` close to random.  The module docstring says
    how the block grid maps to the graph.

    Example:
        >>> lay = small_world_layout((256, 256), block_size=16, density=0.25, seed=0)
        >>> mask = lay.block_mask()
        >>> lay.nnz, int((mask != mask.T).sum())  # symmetric but for at most one block
        (64, 0)
    """
    import networkx as nx

    where = "small_world_layout"
    r, c, k = _grid(shape, block_size, density, where)
    seed = _seed(seed, where)
    if isinstance(rewire, bool) or not isinstance(rewire, (int, float)) or not 0.0 <= rewire <= 1.0:
        raise ValueError(f"{where}: rewire must be a probability in [0, 1]. Got {rewire!r}; 0.1 is the usual choice.")
    n = max(r, c)
    if k == r * c or n == 1:
        return BlockSparseLayout.dense((int(shape[0]), int(shape[1])), block_size)
    # k nearest neighbours, k // 2 on each side; 2 * half < n keeps networkx's lattice simple.
    graph, _ = _closest(lambda half: nx.watts_strogatz_graph(n, 2 * half, float(rewire), seed=seed),
                        0, (n - 1) // 2, r, c, k, lambda half: n * (1 + 2 * half))
    mask, diag = _graph_mask(graph, r, c)
    gen = torch.Generator("cpu").manual_seed(seed)
    _adjust(mask, k, diag, gen, symmetric=r == c)
    return _from_mask(mask, shape, block_size)


def barabasi_albert_layout(
    shape: Sequence[int], block_size: int, density: float, seed: int = 0
) -> BlockSparseLayout:
    """A scale-free pattern: a Barabasi-Albert graph on the block graph (``networkx.barabasi_albert_graph``).

    Nodes join one by one and attach ``m`` edges to existing nodes with
    probability proportional to their degree (``m`` chosen for ``density``):
    a few hub block rows/columns with many blocks, most with few (a power-law
    degree tail).  A BA graph on ``n`` nodes has at most ``m (n - m)`` edges
    (``m = n / 2``), so densities above about one half are refused.

    Example:
        >>> lay = barabasi_albert_layout((512, 512), block_size=8, density=0.1, seed=0)
        >>> counts = lay.row_offsets.diff()
        >>> lay.nnz, int(counts.max()) > 3 * int(counts.min())
        (410, True)
    """
    import networkx as nx

    where = "barabasi_albert_layout"
    r, c, k = _grid(shape, block_size, density, where)
    seed = _seed(seed, where)
    n = max(r, c)
    if k == r * c or n == 1:
        return BlockSparseLayout.dense((int(shape[0]), int(shape[1])), block_size)
    # m (n - m) edges: the densest BA graph has m = n // 2.
    graph, reach = _closest(lambda m: nx.barabasi_albert_graph(n, m, seed=seed), 1, n // 2, r, c, k,
                            lambda m: n + 2 * m * (n - m))
    if k > reach + r:  # more than one block per row short of the closest BA graph
        # On a non-square grid nodes merge and the count is not monotone in m, so the search can stop
        # below a parameter that does reach k: take the first m that does (its extra blocks are
        # dropped below), and refuse only if none does, with the most any m covers.
        top, found = reach, None
        for m in range(1, n // 2 + 1):
            g = nx.barabasi_albert_graph(n, m, seed=seed)
            cnt = int(_graph_mask(g, r, c)[0].sum())
            top = max(top, cnt)
            if cnt >= k:
                found = g
                break
        if found is None:
            raise ValueError(
                f"{where}: a Barabasi-Albert graph on {n} block nodes covers at most {top} of the "
                f"{r}x{c} blocks (density {top / (r * c):.3g}); got density={density!r} ({k} blocks). "
                "Use a lower density, a smaller block_size, or pattern 'random' / 'small_world'."
            )
        graph = found
    mask, diag = _graph_mask(graph, r, c)
    gen = torch.Generator("cpu").manual_seed(seed)
    _adjust(mask, k, diag, gen, symmetric=r == c)
    return _from_mask(mask, shape, block_size)


def stack_layouts(layouts: Sequence[BlockSparseLayout]) -> BlockSparseLayout:
    """Layouts of equal width stacked along the rows (e.g. the four gates of an LSTM).

    Every layout but the last must have a row count that is a multiple of the
    block size, so that each part starts on a block row.

    Example:
        >>> g = small_world_layout((64, 64), block_size=16, density=0.5, seed=1)
        >>> stack_layouts([g] * 4).shape, stack_layouts([g] * 4).nnz == 4 * g.nnz
        ((256, 64), True)
    """
    if not layouts:
        raise ValueError("stack_layouts: expected at least one layout.")
    b, cols = layouts[0].block_size, layouts[0].shape[1]
    for i, lay in enumerate(layouts):
        if lay.block_size != b or lay.shape[1] != cols:
            raise ValueError(
                f"stack_layouts: layout {i} has block size {lay.block_size} and {lay.shape[1]} columns; "
                f"expected {b} and {cols} like layout 0."
            )
        if i < len(layouts) - 1 and lay.shape[0] % b:
            raise ValueError(
                f"stack_layouts: layout {i} has {lay.shape[0]} rows, not a multiple of the block size {b}, "
                "so the next layout would not start on a block row."
            )
    mask = torch.cat([lay.block_mask() for lay in layouts], dim=0)
    rows = sum(lay.shape[0] for lay in layouts)
    return BlockSparseLayout.from_block_mask(mask, shape=(rows, cols), block_size=b)


def layout_graph(layout: BlockSparseLayout):
    """The directed graph of a layout's blocks (``networkx.DiGraph``): an edge ``j -> i`` per kept block ``(i, j)``.

    For a square block grid the nodes are the block indices ``0 .. R-1`` (input
    group ``j`` feeds output group ``i``; a recurrent layer's flow of
    information); the diagonal's self-loops are dropped.  Otherwise the graph is
    bipartite: nodes ``("in", j)`` and ``("out", i)``.

    Example:
        >>> lay = small_world_layout((128, 128), block_size=8, density=0.25, rewire=0.0)
        >>> g = layout_graph(lay)
        >>> g.number_of_nodes(), g.number_of_edges() == lay.nnz - 16
        (16, True)
    """
    import networkx as nx

    g = nx.DiGraph()
    rows = layout.row_indices.tolist()
    cols = layout.col_indices.tolist()
    if layout.n_block_rows == layout.n_block_cols:
        g.add_nodes_from(range(layout.n_block_rows))
        g.add_edges_from((j, i) for i, j in zip(rows, cols) if i != j)
    else:
        g.add_nodes_from(("out", i) for i in range(layout.n_block_rows))
        g.add_nodes_from(("in", j) for j in range(layout.n_block_cols))
        g.add_edges_from((("in", j), ("out", i)) for i, j in zip(rows, cols))
    return g


#: Pattern names accepted by :func:`layout_for` (and the ``pattern=`` option of ``sparsify``).
PATTERNS = ("magnitude", "random", "small_world", "scale_free")


def layout_for(
    pattern: str,
    shape: Sequence[int],
    *,
    block_size: int,
    density: float,
    seed: int = 0,
    weight: torch.Tensor | None = None,
    rewire: float = 0.1,
) -> BlockSparseLayout:
    """The layout of ``pattern`` (one of :data:`PATTERNS`); ``magnitude`` needs the trained ``weight``.

    Example:
        >>> layout_for("scale_free", (256, 256), block_size=16, density=0.25, seed=3).nnz
        64
    """
    if pattern == "magnitude":
        if weight is None:
            raise ValueError("layout_for('magnitude'): the magnitude pattern needs the trained weight (weight=).")
        return magnitude_layout(weight, density=density, block_size=block_size)
    if pattern == "random":
        return random_layout(shape, block_size, density, seed)
    if pattern == "small_world":
        return small_world_layout(shape, block_size, density, rewire=rewire, seed=seed)
    if pattern == "scale_free":
        return barabasi_albert_layout(shape, block_size, density, seed)
    raise ValueError(f"layout_for: unknown pattern {pattern!r}; expected one of {PATTERNS}.")
