"""Properties of BlockSparseLayout: round trips, transposed metadata, validation, interning."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsify import BlockSparseLayout
from sparsify.patterns import magnitude_layout


@st.composite
def layouts(draw):
    b = draw(st.sampled_from([8, 16, 32, 64]))
    rows, cols = draw(st.integers(1, 200)), draw(st.integers(1, 200))
    nbr, nbc = -(-rows // b), -(-cols // b)
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(nbr, nbc, generator=g) < draw(st.floats(0.0, 1.0))
    return BlockSparseLayout.from_block_mask(mask, shape=(rows, cols), block_size=b), mask, g


@given(layouts())
def test_dense_layout_dense_round_trip(case):
    layout, mask, g = case
    w = torch.randn(*layout.shape, generator=g, dtype=torch.float64)
    values = layout.values_from_dense(w)
    assert values.shape == (layout.nnz, layout.block_size, layout.block_size)
    dense = layout.to_dense(values)
    assert torch.equal(dense, w * layout.element_mask())
    assert torch.equal(layout.values_from_dense(dense), values)
    assert torch.equal(layout.block_mask(), mask)


@given(layouts())
def test_transposed_metadata_is_the_layout_of_the_transpose(case):
    layout, mask, g = case
    t = layout.transpose()
    assert t == BlockSparseLayout.from_block_mask(mask.T, shape=layout.shape[::-1], block_size=layout.block_size)
    w = torch.randn(*layout.shape, generator=g)
    values = layout.values_from_dense(w)
    t_values = values[layout.t_block_ids.long()].transpose(1, 2)
    assert torch.equal(t.to_dense(t_values), layout.to_dense(values).T)


@given(layouts())
def test_block_coordinates_index_the_stored_blocks(case):
    layout, mask, _ = case
    rows, cols = layout.row_indices.long(), layout.col_indices.long()
    assert bool(mask[rows, cols].all()) and rows.numel() == int(mask.sum())
    assert layout.density == pytest.approx(float(mask.float().mean()))


def test_identical_patterns_share_one_layout_and_its_metadata():
    mask = torch.tensor([[True, False], [True, True]])
    a = BlockSparseLayout.from_block_mask(mask, shape=(64, 64), block_size=32)
    b = BlockSparseLayout.from_block_mask(mask.clone(), shape=(64, 64), block_size=32)
    assert a is b and a.t_block_ids is b.t_block_ids
    c = BlockSparseLayout.from_block_mask(mask, shape=(60, 64), block_size=32)
    assert c is not a and c.key != a.key


@pytest.mark.parametrize(
    "row_offsets, col_indices, message",
    [
        ([0, 1], [0], "Expected 3 row_offsets"),
        ([0, 1, 3], [0, 1], "end at nnz=2"),
        ([0, 2, 1], [0], "non-decreasing row_offsets"),
        ([0, 1, 2], [0, 5], r"col_indices in \[0, 2\)"),
        ([0, 2, 2], [1, 0], "strictly increasing"),
        ([[0, 1, 2]], [0, 1], "Expected 1D row_offsets"),
    ],
)
def test_invalid_csr_says_what_was_expected_and_got(row_offsets, col_indices, message):
    with pytest.raises(ValueError, match=message):
        BlockSparseLayout.from_csr((64, 64), 32, torch.tensor(row_offsets), torch.tensor(col_indices))


@given(st.integers(1, 300), st.integers(1, 300), st.sampled_from([8, 16, 32, 64]), st.floats(0.01, 1.0),
       st.integers(0, 2**16))
def test_magnitude_layout_keeps_the_largest_blocks_and_one_per_row(rows, cols, b, density, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    layout = magnitude_layout(w, density=density, block_size=b)
    nbr, nbc = layout.n_block_rows, layout.n_block_cols
    assert layout.nnz == min(nbr * nbc, max(nbr, round(density * nbr * nbc)))
    mask = layout.block_mask()
    assert bool(mask.any(dim=1).all())  # at least one block per block row
    from sparsify.patterns import block_norms

    norms = block_norms(w, b)
    # every kept block beyond each row's best is at least as large as every dropped block
    best = torch.zeros_like(mask)
    best[torch.arange(nbr), norms.argmax(1)] = True
    extra, dropped = norms[mask & ~best], norms[~mask]
    if extra.numel() and dropped.numel():
        assert float(extra.min()) >= float(dropped.max())
