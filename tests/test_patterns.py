"""From-scratch sparsity patterns: counts, coverage, determinism and the graph properties they promise.

Properties:
* every from-scratch pattern keeps exactly ``pattern_blocks(R, C, density)`` blocks (so the
  density is within one block per block row of the request), touches every block
  row and column, and is a function of its seed;
* the magnitude pattern keeps exactly ``target_blocks(R, C, density)``, one block per
  block row and none promised per column: the same count unless ``C > R`` and
  ``round(density R C) < C``, then fewer; docs/training.md says so, with an example
  that holds;
* Watts-Strogatz (small world): at rewire=0 a ring lattice (every block row
  keeps the same number of blocks, a band); at rewire=0.1 the average shortest
  path is close to a random pattern's and far below the lattice's at the same
  density, while the clustering stays far above the random pattern's;
* Barabasi-Albert (scale free): a heavy-tailed degree distribution (hubs), far
  more spread than the small-world or random patterns' at the same density.

Path lengths and clustering are measured on ``layout_graph`` (edge j -> i per
kept block (i, j)), directed path lengths with scipy's BFS.
"""

from __future__ import annotations

import re
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import shortest_path

from sparsify.patterns import (
    barabasi_albert_layout,
    layout_for,
    layout_graph,
    magnitude_layout,
    pattern_blocks,
    random_layout,
    small_world_layout,
    stack_layouts,
    target_blocks,
)

ROOT = Path(__file__).resolve().parent.parent
GENERATORS = {
    "random": lambda shape, b, d, seed: random_layout(shape, b, d, seed),
    "small_world": lambda shape, b, d, seed: small_world_layout(shape, b, d, seed=seed),
    "scale_free": lambda shape, b, d, seed: barabasi_albert_layout(shape, b, d, seed),
}


def _avg_path(layout) -> float:
    """Mean directed shortest-path length over the reachable ordered pairs of a square block grid."""
    mask = layout.block_mask().numpy().astype(np.int8)
    np.fill_diagonal(mask, 0)
    dist = shortest_path(csr_matrix(mask.T), method="D", unweighted=True)  # edge j -> i
    off = ~np.eye(len(dist), dtype=bool)
    finite = np.isfinite(dist) & off
    assert finite.mean() > 0.95, "the pattern should connect almost every pair"
    return float(dist[finite].mean())


def _clustering(layout) -> float:
    return nx.average_clustering(layout_graph(layout).to_undirected())


@st.composite
def grids(draw, max_blocks=40):
    b = draw(st.sampled_from([1, 4, 8]))
    r = draw(st.integers(1, max_blocks))
    c = draw(st.integers(1, max_blocks))
    rows = draw(st.integers((r - 1) * b + 1, r * b))  # ragged edges included
    cols = draw(st.integers((c - 1) * b + 1, c * b))
    return (rows, cols), b, r, c


@pytest.mark.parametrize("name", sorted(GENERATORS))
@given(grid=grids(), density=st.floats(0.01, 1.0), seed=st.integers(0, 2**31 - 1))
def test_exact_count_coverage_and_determinism(name, grid, density, seed):
    shape, b, r, c = grid
    make = GENERATORS[name]
    try:
        lay = make(shape, b, density, seed)
    except ValueError as exc:  # the one documented refusal: BA beyond its densest graph
        assert name == "scale_free" and "Barabasi-Albert" in str(exc) and density > 0.4
        return
    assert lay.shape == shape and lay.block_size == b
    k = pattern_blocks(r, c, density)
    assert lay.nnz == k
    if density * r * c >= max(r, c):  # above the one-per-row-and-column floor
        assert abs(lay.nnz - density * r * c) <= r  # within one block per block row
    mask = lay.block_mask()
    assert bool(mask.any(dim=1).all()), "a block row lost every block"
    assert bool(mask.any(dim=0).all()), "a block column lost every block"
    again = make(shape, b, density, seed)
    assert again is lay  # same pattern, so the interned layout itself


@given(grid=grids(), density=st.floats(0.01, 1.0), seed=st.integers(0, 2**31 - 1))
def test_magnitude_keeps_one_block_per_row_and_fewer_than_scratch_only_on_wide_sparse_grids(grid, density, seed):
    shape, b, r, c = grid
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    mask = magnitude_layout(w, density=density, block_size=b).block_mask()
    k = target_blocks(r, c, density)
    assert int(mask.sum()) == k and bool(mask.any(dim=1).all())
    scratch = pattern_blocks(r, c, density)
    if r >= c or round(density * r * c) >= c:
        assert k == scratch
    else:  # wide and sparse: fewer than one block per column, so some column is empty
        assert round(density * r * c) <= k < scratch == c and not bool(mask.any(dim=0).all())


def test_the_training_doc_states_the_counts_the_code_keeps():
    text = (ROOT / "docs" / "training.md").read_text()
    density = " ".join(text.split("* **Density.**", 1)[1].split("\n* ", 1)[0].split())
    assert "`magnitude` keeps exactly `target_blocks(R, C, density)`" in density
    assert "`R >= C` or `round(density R C) >= C`" in density
    ex = re.search(r"a (\d+) x (\d+) block grid at density ([\d.]+) keeps (\d+) blocks from scratch, (\d+) by "
                   r"magnitude", density)
    assert ex, "the Density paragraph of docs/training.md lost its worked example"
    r, c, d, scratch, magnitude = int(ex[1]), int(ex[2]), float(ex[3]), int(ex[4]), int(ex[5])
    b = 8
    assert random_layout((r * b, c * b), b, d).nnz == scratch == pattern_blocks(r, c, d)
    assert magnitude_layout(torch.randn(r * b, c * b), density=d, block_size=b).nnz == magnitude


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_seeds_give_different_patterns(name):
    layouts = {GENERATORS[name]((256, 256), 8, 0.1, seed).key for seed in range(4)}
    assert len(layouts) == 4


@given(n=st.integers(16, 120), half=st.integers(1, 4), seed=st.integers(0, 1000))
def test_ring_lattice_is_a_band_with_equal_rows(n, half, seed):
    # density chosen so the lattice with `half` neighbours per side fits exactly
    density = (1 + 2 * half) / n
    if 2 * half >= n - 1:
        return
    lay = small_world_layout((n, n), 1, density, rewire=0.0, seed=seed)
    counts = lay.row_offsets.diff()
    assert int(counts.min()) == int(counts.max()) == 1 + 2 * half
    i, j = lay.row_indices.long(), lay.col_indices.long()
    ring = torch.minimum((i - j) % n, (j - i) % n)
    assert int(ring.max()) == half  # every block within `half` of the diagonal, around the ring


@given(n=st.integers(100, 200), half=st.integers(3, 5), seed=st.integers(0, 10_000))
def test_small_world_paths_are_short_and_clustering_high(n, half, seed):
    # The small-world regime of Watts & Strogatz (1998; they used k = 10): k = 2 * half >= 6
    # neighbours, and a graph much larger than a neighbourhood (n >= 30 * half: lattice paths
    # n / 2k >= 15 hops; random clustering ~ 4 * half / n <= 0.13).
    n = max(n, 30 * half)
    density = (1 + 2 * half) / n
    ws = small_world_layout((n, n), 1, density, rewire=0.1, seed=seed)
    lattice = small_world_layout((n, n), 1, density, rewire=0.0, seed=seed)
    rnd = random_layout((n, n), 1, density, seed=seed)
    assert ws.nnz == lattice.nnz == rnd.nnz
    l_ws, l_lat, l_rnd = _avg_path(ws), _avg_path(lattice), _avg_path(rnd)
    # Watts & Strogatz (1998) at p=0.1: L(p)/L(0) ~ 0.2-0.4 and close to L_random.  In 100 random
    # draws of this regime the largest ratio to random was 1.60 (to the lattice: 0.40 of 150 draws);
    # clustering: smallest 0.40, at least 3.1x random's.
    assert l_ws <= 0.6 * l_lat, (l_ws, l_lat)
    assert l_ws <= 1.75 * l_rnd, (l_ws, l_rnd)
    # ...while clustering stays near the lattice's (3(k-2)/4(k-1) = 0.5 for k=4) and far above random's (~k/n).
    c_ws, c_rnd = _clustering(ws), _clustering(rnd)
    assert c_ws >= 2.5 * c_rnd and c_ws >= 0.3, (c_ws, c_rnd)


@given(n=st.integers(96, 256), scale=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_scale_free_has_hubs_the_others_do_not(n, scale, seed):
    # at least 5 blocks per row (BA's m >= 2; m = 1 makes a tree), at most 10%
    density = 5 / n + scale * (0.1 - 5 / n)
    ba = barabasi_albert_layout((n, n), 1, density, seed)
    ws = small_world_layout((n, n), 1, density, seed=seed)
    rnd = random_layout((n, n), 1, density, seed=seed)
    deg = {k: lay.row_offsets.diff().double() for k, lay in (("ba", ba), ("ws", ws), ("rnd", rnd))}
    mean = deg["ba"].mean()
    # BA: the oldest nodes collect degree ~ m * sqrt(n / i): the largest is several times the mean.
    # ... and the spread of degrees (coefficient of variation) exceeds random's (Poisson-like) and WS's.
    # The bounds sit below the smallest values of 3,000 random draws of this regime (a third of them
    # at the sparse end, scale < 0.2): max/mean 2.61, CV ratio to random 1.34 (0.1% quantile 1.40,
    # median 2.28), to WS 2.83. The CV ratio's tail is at small n (96-141 rows): n = 96,
    # scale = 0.125, seed = 1601 gave 1.39, under the 1.4 an earlier 150-draw sample had suggested.
    assert deg["ba"].max() >= 2.2 * mean
    cv = {k: float(v.std() / v.mean()) for k, v in deg.items()}
    assert cv["ba"] > 1.2 * cv["rnd"] and cv["ba"] > 2.5 * cv["ws"], cv
    # Power-law tail: more nodes with at least 2.5x the mean degree than a Poisson graph would have.
    assert int((deg["ba"] >= 2.5 * mean).sum()) > int((deg["rnd"] >= 2.5 * mean).sum())


@given(r=st.integers(2, 24), c=st.integers(2, 24), density=st.floats(0.05, 0.5), seed=st.integers(0, 1000))
def test_non_square_graph_patterns_follow_the_stretched_diagonal(r, c, density, seed):
    lay = small_world_layout((r, c), 1, density, rewire=0.0, seed=seed)
    n = max(r, c)
    u = torch.arange(n)
    mask = lay.block_mask()
    assert bool(mask[u * r // n, u * c // n].all()), "each node keeps its own block"
    # the lattice is a band: every block lies near the stretched diagonal (in ring distance)
    i, j = lay.row_indices.double(), lay.col_indices.double()
    ring = ((i + 0.5) / r - (j + 0.5) / c).abs()
    ring = torch.minimum(ring, 1 - ring)
    random_ring = random_layout((r, c), 1, density, seed=seed)
    i2, j2 = random_ring.row_indices.double(), random_ring.col_indices.double()
    ring2 = ((i2 + 0.5) / r - (j2 + 0.5) / c).abs()
    ring2 = torch.minimum(ring2, 1 - ring2)
    assert float(ring.mean()) <= float(ring2.mean()) + 1.0 / min(r, c)


def test_scale_free_refuses_densities_it_cannot_reach():
    with pytest.raises(ValueError, match="Barabasi-Albert graph on 16 block nodes covers at most"):
        barabasi_albert_layout((128, 128), 8, 0.9)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: random_layout((64, 64), 8, 0.0), "density must be in"),
        (lambda: random_layout((64, 64), 8, 1.5), "density must be in"),
        (lambda: random_layout((64, 0), 8, 0.5), "positive ints"),
        (lambda: random_layout((64, 64), 0, 0.5), "positive int block_size"),
        (lambda: small_world_layout((64, 64), 8, 0.5, rewire=2.0), "rewire must be a probability"),
        (lambda: layout_for("magnitude", (64, 64), block_size=8, density=0.5), "needs the trained weight"),
        (lambda: layout_for("smallworld", (64, 64), block_size=8, density=0.5), "unknown pattern"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_seed_must_be_an_int():
    with pytest.raises(TypeError, match="seed must be an int"):
        random_layout((64, 64), 8, 0.5, seed="1")


def test_density_one_is_dense_for_every_pattern():
    for name, make in GENERATORS.items():
        lay = make((40, 72), 8, 1.0, 5)
        assert lay.nnz == 5 * 9 and lay.density == 1.0, name


def test_stack_layouts_keeps_each_part_on_its_block_rows():
    parts = [random_layout((32, 48), 8, 0.3, seed=s) for s in range(4)]
    stacked = stack_layouts(parts)
    mask = stacked.block_mask()
    for g, p in enumerate(parts):
        assert torch.equal(mask[4 * g: 4 * (g + 1)], p.block_mask())
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        stack_layouts([random_layout((30, 48), 8, 0.3), parts[0]])
    with pytest.raises(ValueError, match="expected 8 and 48"):
        stack_layouts([parts[0], random_layout((32, 40), 8, 0.3)])


@pytest.mark.parametrize("shape, density", [((15, 52), 0.3), ((20, 60), 0.16), ((13, 26), 0.25), ((52, 15), 0.3)])
def test_scale_free_reaches_densities_a_non_square_grid_allows(shape, density):
    # on a non-square grid nodes merge and the block count is not monotone in m: the search stopped at
    # a parameter short of the target and refused, though a larger m covers it (found by hypothesis)
    from sparsify.patterns import barabasi_albert_layout

    lay = barabasi_albert_layout(shape, 1, density, seed=0)
    assert lay.nnz == pattern_blocks(shape[0], shape[1], density)
    mask = lay.block_mask()
    assert bool(mask.any(dim=1).all()) and bool(mask.any(dim=0).all())
