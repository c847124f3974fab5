"""The block-sparse layout: the one format that every executor reads.

A ``BlockSparseLayout`` describes which ``block_size x block_size`` blocks of a
``(rows, cols)`` matrix are stored.  The values live elsewhere (a module's
``values`` parameter, shape ``[nnz, block_size, block_size]``, blocks in
row-major block order); the layout holds only the pattern:

* ``row_offsets``  ``int32[n_block_rows + 1]``  CSR offsets into the blocks,
* ``col_indices``  ``int32[nnz]``               block column of each block,
                                                sorted within a block row.

Dimensions that are not multiples of the block size are zero-padded *inside*
the layout: the padded shape is rounded up, the logical shape is kept, and the
padding is always zero in ``to_dense``.

Derived metadata is computed once per pattern and cached:

* ``row_indices``          block row of each block (block coordinates for dW),
* ``t_row_offsets`` / ``t_col_indices`` / ``t_block_ids``  the layout of the
  transpose (for dX), with ``t_block_ids[j]`` the index into ``values`` of the
  j-th block of the transpose.

Layouts with identical patterns are interned: ``from_block_mask`` and friends
return the same object (and so the same cached metadata) for the same pattern.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from functools import cached_property

import torch

__all__ = ["BlockSparseLayout", "SUPPORTED_BLOCK_SIZES"]

#: Block sizes the planner accepts (the CUDA kernels take 16/32/64 in every
#: dtype and 8 in float32; the CPU executor takes any).
SUPPORTED_BLOCK_SIZES = (8, 16, 32, 64)

_INTERN: weakref.WeakValueDictionary[str, BlockSparseLayout] = weakref.WeakValueDictionary()
_INTERN_LOCK = threading.Lock()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def scatter_blocks(
    values: torch.Tensor, row_indices: torch.Tensor, col_indices: torch.Tensor, n_block_cols: int,
    n_block_rows: int, shape: tuple[int, int],
) -> torch.Tensor:
    """Blocks ``values [nnz, b, b]`` at block coordinates -> a dense ``shape`` matrix (padding cropped)."""
    b = values.shape[-1]
    out = values.new_zeros(n_block_rows, b, n_block_cols, b)
    out.permute(0, 2, 1, 3)[row_indices.long(), col_indices.long()] = values
    return out.view(n_block_rows * b, n_block_cols * b)[: shape[0], : shape[1]]


def gather_blocks(padded: torch.Tensor, row_indices: torch.Tensor, col_indices: torch.Tensor, b: int) -> torch.Tensor:
    """The ``[nnz, b, b]`` blocks of a padded dense matrix at the given block coordinates."""
    blocks = padded.reshape(padded.shape[0] // b, b, padded.shape[1] // b, b).permute(0, 2, 1, 3)
    return blocks[row_indices.long(), col_indices.long()].contiguous()


class BlockSparseLayout:
    """The pattern of a block-sparse matrix: shape, block size, CSR block indices.

    Example:
        >>> import torch
        >>> mask = torch.tensor([[True, False], [False, True]])
        >>> layout = BlockSparseLayout.from_block_mask(mask, shape=(64, 64), block_size=32)
        >>> layout.nnz, layout.density
        (2, 0.5)
    """

    __slots__ = ("shape", "block_size", "row_offsets", "col_indices", "key", "__dict__", "__weakref__")

    def __init__(
        self,
        shape: tuple[int, int],
        block_size: int,
        row_offsets: torch.Tensor,
        col_indices: torch.Tensor,
        *,
        validate: bool = True,
    ) -> None:
        rows, cols = (int(s) for s in shape)
        self.shape = (rows, cols)
        self.block_size = int(block_size)
        self.row_offsets = row_offsets.detach().to("cpu", torch.int32).contiguous()
        self.col_indices = col_indices.detach().to("cpu", torch.int32).contiguous()
        if validate:
            self._validate()
        h = hashlib.sha256()
        h.update(f"{rows},{cols},{self.block_size};".encode())
        h.update(self.row_offsets.numpy().tobytes())
        h.update(b";")
        h.update(self.col_indices.numpy().tobytes())
        self.key = h.hexdigest()

    # ------------------------------------------------------------------ checks
    def _validate(self) -> None:
        rows, cols = self.shape
        b = self.block_size
        if rows < 1 or cols < 1:
            raise ValueError(f"BlockSparseLayout: expected a positive shape. Got {self.shape}.")
        if b < 1:
            raise ValueError(f"BlockSparseLayout: expected a positive block size. Got {b}.")
        ro, ci = self.row_offsets, self.col_indices
        if ro.dim() != 1:
            raise ValueError(f"Expected 1D row_offsets. Got {ro.dim()}D row_offsets.")
        if ci.dim() != 1:
            raise ValueError(f"Expected 1D col_indices. Got {ci.dim()}D col_indices.")
        nbr, nbc = _ceil_div(rows, b), _ceil_div(cols, b)
        if ro.numel() != nbr + 1:
            raise ValueError(
                f"Expected {nbr + 1} row_offsets for {rows} rows in blocks of {b}. Got {ro.numel()}."
            )
        if int(ro[0]) != 0 or int(ro[-1]) != ci.numel():
            raise ValueError(
                f"Expected row_offsets to start at 0 and end at nnz={ci.numel()}. "
                f"Got {int(ro[0])} .. {int(ro[-1])}."
            )
        counts = ro.diff()
        if bool((counts < 0).any()):
            raise ValueError("Expected non-decreasing row_offsets. Got a decreasing step.")
        if ci.numel():
            if int(ci.min()) < 0 or int(ci.max()) >= nbc:
                raise ValueError(
                    f"Expected col_indices in [0, {nbc}). Got [{int(ci.min())}, {int(ci.max())}]."
                )
            # strictly increasing within each block row
            row_of = torch.repeat_interleave(torch.arange(nbr, device="cpu"), counts.long())
            same_row = row_of[1:] == row_of[:-1]
            if bool((same_row & (ci[1:] <= ci[:-1])).any()):
                raise ValueError("Expected strictly increasing col_indices within each block row.")

    # ------------------------------------------------------------ constructors
    @classmethod
    def _interned(cls, layout: BlockSparseLayout) -> BlockSparseLayout:
        with _INTERN_LOCK:
            existing = _INTERN.get(layout.key)
            if existing is not None:
                return existing
            _INTERN[layout.key] = layout
            return layout

    @classmethod
    def from_csr(
        cls, shape: tuple[int, int], block_size: int, row_offsets: torch.Tensor, col_indices: torch.Tensor
    ) -> BlockSparseLayout:
        """Build (and intern) a layout from CSR block indices, validating them."""
        return cls._interned(cls(shape, block_size, row_offsets, col_indices))

    @classmethod
    def from_block_mask(
        cls, mask: torch.Tensor, *, shape: tuple[int, int], block_size: int
    ) -> BlockSparseLayout:
        """Build a layout from a boolean ``[n_block_rows, n_block_cols]`` mask."""
        rows, cols = shape
        nbr, nbc = _ceil_div(rows, block_size), _ceil_div(cols, block_size)
        if mask.shape != (nbr, nbc):
            raise ValueError(
                f"Expected a block mask of shape ({nbr}, {nbc}) for shape {tuple(shape)} "
                f"in blocks of {block_size}. Got {tuple(mask.shape)}."
            )
        mask = mask.to("cpu", torch.bool)
        counts = mask.sum(dim=1)
        row_offsets = torch.zeros(nbr + 1, dtype=torch.int64, device="cpu")
        row_offsets[1:] = counts.cumsum(0)
        col_indices = mask.nonzero(as_tuple=True)[1]  # row-major, so sorted per row
        return cls.from_csr(shape, block_size, row_offsets, col_indices)

    @classmethod
    def dense(cls, shape: tuple[int, int], block_size: int) -> BlockSparseLayout:
        """The layout with every block kept."""
        nbr, nbc = _ceil_div(shape[0], block_size), _ceil_div(shape[1], block_size)
        return cls.from_block_mask(torch.ones(nbr, nbc, dtype=torch.bool, device="cpu"), shape=shape,
                                   block_size=block_size)

    # ----------------------------------------------------------------- basics
    @property
    def n_block_rows(self) -> int:
        return self.row_offsets.numel() - 1

    @property
    def n_block_cols(self) -> int:
        return _ceil_div(self.shape[1], self.block_size)

    @property
    def padded_shape(self) -> tuple[int, int]:
        return (self.n_block_rows * self.block_size, self.n_block_cols * self.block_size)

    @property
    def nnz(self) -> int:
        """Number of stored blocks."""
        return self.col_indices.numel()

    @property
    def density(self) -> float:
        """Fraction of blocks stored."""
        return self.nnz / (self.n_block_rows * self.n_block_cols)

    def __repr__(self) -> str:
        return (
            f"BlockSparseLayout(shape={self.shape}, block_size={self.block_size}, "
            f"nnz={self.nnz}, density={self.density:.4g})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockSparseLayout) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    # ------------------------------------------------------- derived metadata
    @cached_property
    def row_indices(self) -> torch.Tensor:
        """``int32[nnz]``: block row of each stored block (block coordinates for dW)."""
        counts = self.row_offsets.diff().long()
        return torch.repeat_interleave(torch.arange(self.n_block_rows, device="cpu"), counts).to(torch.int32)

    @cached_property
    def _transpose_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Sort the blocks by (column, row): a stable sort on the column keeps rows ascending.
        order = torch.sort(self.col_indices.long(), stable=True).indices
        t_col = self.row_indices[order]
        counts = torch.bincount(self.col_indices.long(), minlength=self.n_block_cols)
        t_off = torch.zeros(self.n_block_cols + 1, dtype=torch.int64, device="cpu")
        t_off[1:] = counts.cumsum(0)
        return t_off.to(torch.int32), t_col.to(torch.int32), order.to(torch.int32)

    @property
    def t_row_offsets(self) -> torch.Tensor:
        """``int32[n_block_cols + 1]``: row offsets of the transposed layout (for dX)."""
        return self._transpose_parts[0]

    @property
    def t_col_indices(self) -> torch.Tensor:
        """``int32[nnz]``: column indices of the transposed layout."""
        return self._transpose_parts[1]

    @property
    def t_block_ids(self) -> torch.Tensor:
        """``int32[nnz]``: index into ``values`` of each block of the transposed layout."""
        return self._transpose_parts[2]

    def transpose(self) -> BlockSparseLayout:
        """The layout of the transposed matrix (its blocks are ``values[t_block_ids].mT``)."""
        return BlockSparseLayout.from_csr(
            (self.shape[1], self.shape[0]), self.block_size, self.t_row_offsets, self.t_col_indices
        )

    def metadata(self) -> dict[str, torch.Tensor]:
        """Every index tensor an executor needs, by name (all ``int32`` on the CPU)."""
        return {
            "row_offsets": self.row_offsets,
            "col_indices": self.col_indices,
            "row_indices": self.row_indices,
            "t_row_offsets": self.t_row_offsets,
            "t_col_indices": self.t_col_indices,
            "t_block_ids": self.t_block_ids,
        }

    def block_mask(self) -> torch.Tensor:
        """Boolean ``[n_block_rows, n_block_cols]`` mask of the stored blocks."""
        mask = torch.zeros(self.n_block_rows, self.n_block_cols, dtype=torch.bool, device="cpu")
        mask[self.row_indices.long(), self.col_indices.long()] = True
        return mask

    def element_mask(self) -> torch.Tensor:
        """Boolean ``shape`` mask of the elements the stored blocks cover (padding cropped)."""
        b = self.block_size
        m = self.block_mask().repeat_interleave(b, 0).repeat_interleave(b, 1)
        return m[: self.shape[0], : self.shape[1]]

    # ------------------------------------------------------ values <-> dense
    def values_from_dense(self, dense: torch.Tensor) -> torch.Tensor:
        """Gather the stored blocks of ``dense`` (logical shape) into ``[nnz, b, b]``."""
        if tuple(dense.shape) != self.shape:
            raise ValueError(f"Expected a dense matrix of shape {self.shape}. Got {tuple(dense.shape)}.")
        pr, pc = self.padded_shape
        padded = torch.nn.functional.pad(dense, (0, pc - self.shape[1], 0, pr - self.shape[0]))
        return gather_blocks(padded, self.row_indices.to(dense.device), self.col_indices.to(dense.device),
                             self.block_size)

    def to_dense(self, values: torch.Tensor) -> torch.Tensor:
        """Scatter ``values [nnz, b, b]`` into a dense matrix of the logical shape."""
        b = self.block_size
        if tuple(values.shape) != (self.nnz, b, b):
            raise ValueError(
                f"Expected values of shape ({self.nnz}, {b}, {b}) for {self!r}. Got {tuple(values.shape)}."
            )
        return scatter_blocks(values, self.row_indices.to(values.device), self.col_indices.to(values.device),
                              self.n_block_cols, self.n_block_rows, self.shape)
