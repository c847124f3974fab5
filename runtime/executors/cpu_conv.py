"""The CPU executor of block-sparse convolution: the reference, in plain torch.

The weight of a block-sparse convolution is sparse over ``(out, in)`` channel
blocks and dense over the kernel taps: ``values [nnz, b, b, kh, kw]``, block
``k`` holding output channels ``rows(k) * b ..`` and input channels
``cols(k) * b ..`` for every tap.  Laid out as a matrix, the weight is
``[out, in * kh * kw]`` with one ``b x (b * kh * kw)`` tile per stored block
(``F.unfold`` orders its columns channel-major, tap-minor, as the values are),
so the convolution is a block-sparse product of that matrix with the unfolded
input.

Two paths, chosen per call by :func:`choose_conv_path` (a static cost model, as
``cpu.choose_path`` is for the matmul; ``SPARSIFY_CPU_PATH`` forces one, with
``bsr`` meaning ``gather``: torch's CPU BSR takes square blocks only):

* ``dense``  - scatter the blocks into the dense weight and run torch's
  convolution (oneDNN); dX and dW through ``aten.convolution_backward``, dW's
  stored blocks gathered from the dense gradient.
* ``gather`` - work on the stored blocks only: gather the input channel blocks
  the stored blocks read, unfold them (``F.unfold``, im2col), and multiply each
  block's ``b x (b * kh * kw)`` tile by its unfolded input in one batched
  matmul, summed into the output block rows with ``index_add_``; dX is the
  same over the transposed layout followed by ``F.fold`` (col2im); dW one
  batched matmul per chunk of stored tiles.

No path has a Python loop over blocks or taps: loops run over chunks of images
and of blocks that bound the temporaries (``_GATHER_BYTES``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .cpu import apply_epilogue

__all__ = ["CPUConvExecutor", "choose_conv_path", "conv_output_size", "dense_conv_weight", "CONV_PATHS"]

CONV_PATHS = ("dense", "gather")
#: Below this block density the gather path beats oneDNN's dense convolution on
#: the CPU (measured on 2 threads, docs/training.md: faster at density 0.03-0.06
#: with 1024 channels, slower at 0.05 and above with 128-256 channels).
GATHER_MAX_DENSITY = 0.05
#: Upper bound on the temporaries of the gather path (bytes).
_GATHER_BYTES = 64 << 20


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one dimension (torch's formula).

    Example:
        >>> conv_output_size(32, 3, 2, 1, 1)
        16
    """
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def choose_conv_path(density: float) -> str:
    """The CPU path for a block-sparse convolution at block ``density``.

    Example:
        >>> choose_conv_path(0.5), choose_conv_path(0.02)
        ('dense', 'gather')
    """
    forced = os.environ.get("SPARSIFY_CPU_PATH")
    if forced:
        if forced not in ("dense", "bsr", "gather"):
            raise ValueError(f"SPARSIFY_CPU_PATH={forced!r}: expected one of ('dense', 'bsr', 'gather').")
        return "dense" if forced == "dense" else "gather"
    return "gather" if density < GATHER_MAX_DENSITY else "dense"


def dense_conv_weight(values: torch.Tensor, row_indices: torch.Tensor, col_indices: torch.Tensor,
                      n_block_rows: int, n_block_cols: int, out_channels: int, in_channels: int) -> torch.Tensor:
    """Blocks ``values [nnz, b, b, kh, kw]`` -> the dense ``[out, in, kh, kw]`` weight (zeros elsewhere); differentiable."""
    nnz, b, _, kh, kw = values.shape
    out = values.new_zeros(n_block_rows, n_block_cols, b, b, kh, kw)
    out[row_indices.long(), col_indices.long()] = values
    out = out.permute(0, 2, 1, 3, 4, 5).reshape(n_block_rows * b, n_block_cols * b, kh, kw)
    return out[:out_channels, :in_channels]


def _gather_dense_blocks(w: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, b: int) -> torch.Tensor:
    """The stored ``[nnz, b, b, kh, kw]`` blocks of a dense ``[out, in, kh, kw]`` tensor (zero-padded)."""
    o, i, kh, kw = w.shape
    nbr, nbc = -(-o // b), -(-i // b)
    w = F.pad(w, (0, 0, 0, 0, 0, nbc * b - i, 0, nbr * b - o))
    w = w.reshape(nbr, b, nbc, b, kh, kw).permute(0, 2, 1, 3, 4, 5)
    return w[rows.long(), cols.long()].contiguous()


def _unfold_blocks(x: torch.Tensor, cols: torch.Tensor, b: int, kernel, stride, padding, dilation) -> torch.Tensor:
    """``[n, k, b * kh * kw, L]``: the unfolded input (im2col) of each block column in ``cols``.

    The channel blocks are gathered first (contiguous ``b x H x W`` chunks),
    then ``F.unfold`` lays out their taps channel-major, tap-minor: the order
    of a block's ``values`` row."""
    n, c, h, w = x.shape
    xg = x.view(n, c // b, b, h, w).index_select(1, cols).view(n, cols.numel() * b, h, w)
    u = F.unfold(xg, kernel, dilation=dilation, padding=padding, stride=stride)  # [n, k*b*taps, L]
    return u.view(n, cols.numel(), b * kernel[0] * kernel[1], -1)


def _chunks(total: int, per_item_bytes: int) -> int:
    return max(1, min(total, _GATHER_BYTES // max(1, per_item_bytes)))


class CPUConvExecutor:
    """Reference executor for ``bsconv2d`` / ``bsconv2d_dx`` / ``bsconv2d_dw`` (see the module docstring)."""

    name = "cpu"

    # ------------------------------------------------------------------ forward
    def forward(self, x, values, meta, bias, residual, activation, out_channels, stride, padding, dilation):
        n, cin, h, w = x.shape
        nnz, b, _, kh, kw = values.shape
        nbr = meta.row_offsets.numel() - 1
        nbc = -(-cin // b)
        ho = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
        wo = conv_output_size(w, kw, stride[1], padding[1], dilation[1])
        if choose_conv_path(nnz / max(1, nbr * nbc)) == "dense":
            weight = dense_conv_weight(values, meta.row_indices, meta.col_indices, nbr, nbc, out_channels, cin)
            y = F.conv2d(x, weight, None, stride, padding, dilation)
        else:
            y = self._gather_forward(x, values, meta, nbr, nbc, out_channels, (kh, kw), stride, padding, dilation,
                                     ho, wo)
        bias4 = None if bias is None else bias.view(1, -1, 1, 1)
        return apply_epilogue(y, bias4, residual, activation)

    def _gather_forward(self, x, values, meta, nbr, nbc, out_channels, kernel, stride, padding, dilation, ho, wo):
        n, cin = x.shape[:2]
        nnz, b = values.shape[:2]
        tile = b * kernel[0] * kernel[1]
        if nbc * b != cin:
            x = F.pad(x, (0, 0, 0, 0, 0, nbc * b - cin))
        v = values.reshape(1, nnz, b, tile)
        rows, cols = meta.row_indices.long(), meta.col_indices.long()
        pix = ho * wo
        y = x.new_zeros(n, nbr, b, pix)  # NCHW, channels split into block rows
        img, blk = self._chunking(n, nnz, pix, tile, b, x.element_size())
        for i0 in range(0, n, img):  # chunks of images and of blocks, never single blocks or taps
            for k0 in range(0, nnz, blk):
                sl = slice(k0, k0 + blk)
                u = _unfold_blocks(x[i0:i0 + img], cols[sl], b, kernel, stride, padding, dilation)
                part = torch.matmul(v[:, sl], u)  # [imgs, k, b, L]: each stored block's output
                y[i0:i0 + img].index_add_(1, rows[sl], part)  # summed into its block row
        return y.view(n, nbr * b, ho, wo)[:, :out_channels]

    @staticmethod
    def _chunking(n: int, nnz: int, pix: int, tile: int, b: int, elt: int) -> tuple[int, int]:
        """(images, blocks) per chunk so that one chunk's unfolded tiles and products fit the budget."""
        per_block_image = pix * (tile + b) * elt
        blk = _chunks(nnz, per_block_image)
        img = _chunks(n, per_block_image * blk)
        return img, blk

    # ---------------------------------------------------------------------- dX
    def grad_input(self, dy, values, meta, in_channels, in_size, stride, padding, dilation):
        n, cout, ho, wo = dy.shape
        nnz, b, _, kh, kw = values.shape
        nbr = meta.row_offsets.numel() - 1
        nbc = meta.t_row_offsets.numel() - 1
        h, w = in_size
        if choose_conv_path(nnz / max(1, nbr * nbc)) == "dense":
            weight = dense_conv_weight(values, meta.row_indices, meta.col_indices, nbr, nbc, cout, in_channels)
            shape = (n, in_channels, h, w)
            dx, _, _ = torch.ops.aten.convolution_backward(
                dy, dy.new_empty(1).expand(shape), weight, None, list(stride), list(padding), list(dilation),
                False, [0, 0], 1, [True, False, False])
            return dx
        tile = b * kh * kw
        t_ids = meta.t_block_ids.long()
        t_rows = torch.repeat_interleave(torch.arange(nbc, device=dy.device), meta.t_row_offsets.diff().long())
        t_cols = meta.t_col_indices.long()  # block row (output block) of each transposed block
        vt = values.index_select(0, t_ids).reshape(1, nnz, b, tile).transpose(2, 3)  # [1, nnz, tile, b]
        if nbr * b != cout:
            dy = F.pad(dy, (0, 0, 0, 0, 0, nbr * b - cout))
        pix = ho * wo
        dyb = dy.view(n, nbr, b, pix)
        dx = dy.new_empty(n, in_channels, h, w)
        img, blk = self._chunking(n, nnz, pix, tile, b, dy.element_size())
        for i0 in range(0, n, img):  # chunks of images and of blocks, never single blocks or taps
            d = dyb[i0:i0 + img]
            ni = d.shape[0]
            unf = dy.new_zeros(ni, nbc, tile, pix)  # F.fold's [n, C * taps, L], channel-major, tap-minor
            for k0 in range(0, nnz, blk):
                sl = slice(k0, k0 + blk)
                part = torch.matmul(vt[:, sl], d.index_select(1, t_cols[sl]))  # [ni, k, tile, L]
                unf.index_add_(1, t_rows[sl], part)
            folded = F.fold(unf.view(ni, nbc * tile, pix), (h, w), (kh, kw), dilation=dilation, padding=padding,
                            stride=stride)
            dx[i0:i0 + img] = folded[:, :in_channels]
        return dx

    # ---------------------------------------------------------------------- dW
    def grad_weight(self, dy, x, meta, block_size, kernel, stride, padding, dilation):
        n, cout, ho, wo = dy.shape
        cin = x.shape[1]
        kh, kw = kernel
        b = block_size
        nbr = meta.row_offsets.numel() - 1
        nbc = -(-cin // b)
        rows, cols = meta.row_indices.long(), meta.col_indices.long()
        nnz = cols.numel()
        if choose_conv_path(nnz / max(1, nbr * nbc)) == "dense":
            _, dw, _ = torch.ops.aten.convolution_backward(
                dy, x, x.new_empty(1).expand(cout, cin, kh, kw), None, list(stride), list(padding),
                list(dilation), False, [0, 0], 1, [False, True, False])
            return _gather_dense_blocks(dw, rows, cols, b)
        tile = b * kh * kw
        if nbc * b != cin:
            x = F.pad(x, (0, 0, 0, 0, 0, nbc * b - cin))
        if nbr * b != cout:
            dy = F.pad(dy, (0, 0, 0, 0, 0, nbr * b - cout))
        pix = ho * wo
        dyb = dy.view(n, nbr, b, pix)
        out = x.new_zeros(nnz, b, tile)
        img, blk = self._chunking(n, nnz, pix, tile, b, x.element_size())
        for i0 in range(0, n, img):  # chunks of images and of blocks, never single blocks or taps
            for k0 in range(0, nnz, blk):
                sl = slice(k0, k0 + blk)
                u = _unfold_blocks(x[i0:i0 + img], cols[sl], b, kernel, stride, padding, dilation)  # [ni, k, tile, L]
                g = dyb[i0:i0 + img].index_select(1, rows[sl])  # [ni, k, b, L]
                out[sl] += torch.matmul(g, u.transpose(2, 3)).sum(0)
        return out.view(nnz, b, b, kh, kw)
