"""The CPU executor of the spatial ops: gather-GEMM-scatter, one batched step per kernel offset.

Written with plain torch ops, so it also runs on any device without kernels (it
is the reference the CUDA kernels are tested against).  For a kernel map with
pairs grouped by offset ``k``:

* forward  ``y[out_k] += x[in_k] @ W[k]``
* dgrad    ``dx[in_k] += dy[out_k] @ W[k]^T``
* wgrad    ``dW[k] = x[in_k]^T @ dy[out_k]``

Each offset is one gather (``index_select``), one GEMM and one scatter-add
(``index_add_``): the Python loop runs over the K offsets, never over points.
The identity offset of a same-map odd kernel (every point pairs with itself)
is one plain product with no gather or scatter.  ``depthwise`` (channel-wise
convolution, ``W [K, C]``) replaces the GEMM by an element-wise product.

Pooling reads the same pairs, all offsets together: sum and average with one
``index_add_``, max with ``scatter_reduce('amax')`` and the arg-max row per
output and channel kept for the backward pass (ties go to the first pair).

Example:
    >>> import torch
    >>> ex = SpatialCPUExecutor()
    >>> x = torch.ones(3, 2); w = torch.ones(2, 2, 4)
    >>> i = torch.tensor([0, 1, 2, 0], dtype=torch.int32); o = torch.tensor([0, 1, 2, 1], dtype=torch.int32)
    >>> ex.conv_forward(x, w, i, o, [0, 3, 4], 3, 0, False)[:, 0].tolist()
    [2.0, 4.0, 2.0]
"""

from __future__ import annotations

import threading

import torch

from .coords import pair_bags, pair_bags_built

__all__ = ["POOL_MODES", "SpatialCPUExecutor", "release_workspace"]

POOL_MODES = ("sum", "avg", "max")


def _split(t: torch.Tensor, k_offsets) -> tuple[torch.Tensor, ...]:
    """The rows of every offset of a pair-indexed ``t`` as views (one call, not one slice each)."""
    return t.split([k_offsets[k + 1] - k_offsets[k] for k in range(len(k_offsets) - 1)])


def _groups(k_offsets):
    for k in range(len(k_offsets) - 1):
        a, b = k_offsets[k], k_offsets[k + 1]
        if b > a:
            yield k, a, b


class _Workspace(threading.local):
    """Scratch buffers reused across calls, one set per thread.

    A fresh multi-megabyte CPU tensor is mapped anew by glibc on every allocation and
    its first touch page-faults (~0.3 ms a MB here, three times the cost of writing
    it), which at 100k voxels is as much as the segmented sum itself.  The product
    buffer of a convolution holds every pair's row (5-30 per voxel), so it is kept
    between calls, up to ``limit`` bytes per buffer (larger ones are allocated per
    call).  :func:`release_workspace` frees them."""

    limit = 1 << 30

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, slot: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        numel = rows * cols
        key = (slot, like.dtype, like.device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            self.buffers.pop(key, None)
            buf = torch.empty(numel + numel // 8, dtype=like.dtype, device=like.device)
            if buf.numel() * buf.element_size() <= self.limit:
                self.buffers[key] = buf
        return buf[:numel].view(rows, cols)


_WS = _Workspace()


def release_workspace() -> None:
    """Free the CPU executor's scratch buffers held by this thread.

    Example:
        >>> release_workspace()
    """
    _WS.buffers.clear()


# The segmented sum needs the map's per-row grouping of its pairs (pair_bags: three torch
# calls per offset, built once per map and side, then cached).  It runs where the grouping is
# cached already, or where one use pays for building it: at least _BAG_MIN_WORK products
# (pairs x channels) per offset (index_add_ costs ~0.6 ns a product more than the segmented
# sum; building costs ~27 us an offset).  Never below _BAG_MIN_PAIRS pairs, and never with a
# product buffer above _BAG_MAX_BYTES: the segmented sum reads it in row order, i.e. at random,
# and once it is out of cache that costs more than index_add_ offset by offset (whose products
# stay in cache); measured on the 1M-voxel U-Net (fwd+bwd 18.5 s with every map on the
# segmented sum, 16.8 s with none).
_BAG_MIN_PAIRS = 1 << 10
_BAG_MIN_WORK = 1 << 16
_BAG_MAX_BYTES = 1 << 27


def _bags(x: torch.Tensor, rows: torch.Tensor, k_offsets, n: int, identity_k: int, cols: int):
    """The per-row grouping of the pairs for a segmented sum, or None where the reference
    scatter (``index_add_``) runs: off the CPU, other dtypes than float32 / float64 (where
    ``embedding_bag`` sums in the tensor's own precision, in the order given), small maps."""
    pairs = k_offsets[-1]
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or pairs < _BAG_MIN_PAIRS:
        return None
    if pairs * cols * x.element_size() > _BAG_MAX_BYTES:
        return None
    if pairs * cols < _BAG_MIN_WORK * (len(k_offsets) - 1) and not pair_bags_built(rows, k_offsets, n, identity_k):
        return None
    return pair_bags(rows, k_offsets, n, identity_k)


def _segment_sum(products: torch.Tensor, bags) -> torch.Tensor:
    """``out[r] = sum of products[p]`` over the pairs ``p`` of row ``r``, in bag order."""
    order, ptr = bags
    return torch.embedding_bag(products, order, ptr, False, 0, False, None, True)[0]


def _most(k_offsets, identity_k: int) -> int:
    return max((k_offsets[k + 1] - k_offsets[k] for k in range(len(k_offsets) - 1) if k != identity_k), default=0)


# Up to this many elements (1 MiB of float32), the rows of every pair are gathered with one
# index_select into one buffer (two around the identity offset) instead of one per offset: tiny
# maps spend their time in per-call overhead, not in copies.  Above it each offset's rows are
# gathered right before its GEMM, which then reads them from L2; gathered all at once, a
# multi-megabyte buffer is read back from further away.  Measured on the 10k-voxel U-Net step
# (fwd+bwd, 21 interleaved rounds, paired ratios against per-offset gathers): 16 MiB 1.07x,
# 4 MiB 1.02x, 1 MiB 0.99x; per-shape profiles put the difference in aten::mm.
_GATHER_ALL_MAX = 1 << 18


def _cuts(k_offsets, skip: int) -> list[tuple[int, int]]:
    """The pair ranges around the identity offset ``skip`` (all pairs when ``skip < 0``)."""
    pairs = k_offsets[-1]
    cuts = [(0, pairs)] if skip < 0 else [(0, k_offsets[skip]), (k_offsets[skip + 1], pairs)]
    return [(a, b) for a, b in cuts if b > a]


def _gathered(src: torch.Tensor, idx: torch.Tensor, k_offsets, skip: int, slot: str):
    """``(k, rows)`` for every non-empty offset ``k`` (pairs ``a:b``) with ``rows = src[idx[a:b]]`` (``src``
    itself for the identity offset ``skip``), in offset order, gathered into reused buffers."""
    pairs, cols = k_offsets[-1], src.shape[1]
    if pairs * cols <= _GATHER_ALL_MAX:
        buf = _WS.get(slot + "_all", pairs, cols, src)
        for a, b in _cuts(k_offsets, skip):
            torch.index_select(src, 0, idx[a:b], out=buf[a:b])
        views = _split(buf, k_offsets)
        for k, _, _ in _groups(k_offsets):
            yield k, (src if k == skip else views[k])
        return
    buf = _WS.get(slot, _most(k_offsets, skip), cols, src)
    for k, a, b in _groups(k_offsets):
        yield k, (src if k == skip else torch.index_select(src, 0, idx[a:b], out=buf[: b - a]))


class SpatialCPUExecutor:
    """Reference executor for ``torch.ops.sparsify.spatial_*`` (any device, plain torch ops).

    Large float32 / float64 maps on the CPU put every pair's product in one buffer and
    sum each output row's products with one segmented sum (``embedding_bag`` over the
    map's per-row grouping, :func:`~.coords.pair_bags`) instead of one ``index_add_``
    per offset: the same additions in the same order (the identity product first, then
    offset by offset), so the same result, at a third of the scatter's cost."""

    name = "cpu"

    # ------------------------------------------------------------ convolution
    @staticmethod
    def _workspace(x, k_offsets, identity_k, cols_a: int, cols_b: int, slots=("gather_a", "gather_b")):
        """Two buffers reused by every offset: fresh large tensors cost page faults on each
        allocation (glibc maps them anew), which on the CPU cost as much as the copies."""
        most = _most(k_offsets, identity_k)
        if x.device.type == "cpu":
            return _WS.get(slots[0], most, cols_a, x), _WS.get(slots[1], most, cols_b, x)
        return x.new_empty(most, cols_a), x.new_empty(most, cols_b)

    @staticmethod
    def _all_at_once(x: torch.Tensor, k_offsets, *cols: int) -> bool:
        """Whether the scatter path gathers and multiplies every pair before scattering (CPU,
        small maps: per-call overhead dominates) rather than offset by offset."""
        return x.device.type == "cpu" and k_offsets[-1] * max(cols) <= _GATHER_ALL_MAX

    def _propagate(self, src, ws, gather_idx, scatter_idx, k_offsets, n: int, cols: int, identity_k: int,
                   depthwise: bool):
        """``out[scatter_k] += src[gather_k] @ ws[k]`` over the offsets, ``out [n, cols]``: the forward
        (``x``, ``W``, in -> out) and the input gradient (``dy``, ``W^T``, out -> in)."""
        ident = identity_k >= 0 and src.shape[0] == n
        skip = identity_k if ident else -1
        op = torch.mul if depthwise else torch.mm
        bags = _bags(src, scatter_idx, k_offsets, n, skip, cols)
        if bags is not None:
            # Every pair's product into one buffer, then one segmented sum per output row.
            prod = _WS.get("pairs", k_offsets[-1], cols, src)
            prods = _split(prod, k_offsets)
            for k, g in _gathered(src, gather_idx, k_offsets, skip, "gather_a"):
                op(g, ws[k], out=prods[k])
            return _segment_sum(prod, bags)
        out = op(src, ws[skip]).contiguous() if ident else src.new_zeros(n, cols)
        if self._all_at_once(src, k_offsets, src.shape[1], cols):
            # One index_add_ adds each row's products in pair order: the order of the loop below.
            prod = _WS.get("pairs", k_offsets[-1], cols, src)
            prods = _split(prod, k_offsets)
            for k, g in _gathered(src, gather_idx, k_offsets, skip, "gather_a"):
                if k != skip:
                    op(g, ws[k], out=prods[k])
            for a, b in _cuts(k_offsets, skip):
                out.index_add_(0, scatter_idx[a:b], prod[a:b])
            return out
        gbuf, pbuf = self._workspace(src, k_offsets, skip, src.shape[1], cols)
        for k, a, b in _groups(k_offsets):
            if k == skip:
                continue
            g = torch.index_select(src, 0, gather_idx[a:b], out=gbuf[: b - a])
            out.index_add_(0, scatter_idx[a:b], op(g, ws[k], out=pbuf[: b - a]))
        return out

    def conv_forward(self, x, w, in_idx, out_idx, k_offsets, n_out: int, identity_k: int, depthwise: bool):
        return self._propagate(x, w.unbind(0), in_idx, out_idx, k_offsets, n_out, w.shape[-1], identity_k, depthwise)

    def conv_dgrad(self, dy, w, in_idx, out_idx, k_offsets, n_in: int, identity_k: int, depthwise: bool):
        cin = w.shape[-1] if depthwise else w.shape[1]
        ws = w.unbind(0) if depthwise else w.transpose(1, 2).unbind(0)
        return self._propagate(dy, ws, out_idx, in_idx, k_offsets, n_in, cin, identity_k, depthwise)

    def conv_wgrad(self, x, dy, in_idx, out_idx, k_offsets, identity_k: int, depthwise: bool):
        k_vol = len(k_offsets) - 1
        shape = (k_vol, x.shape[1]) if depthwise else (k_vol, x.shape[1], dy.shape[1])
        dw = x.new_zeros(shape)
        dws = dw.unbind(0)
        ident = identity_k >= 0 and x.shape[0] == dy.shape[0]
        skip = identity_k if ident else -1
        if self._all_at_once(x, k_offsets, x.shape[1], dy.shape[1]):
            gx = _gathered(x, in_idx, k_offsets, skip, "gather_b")
            gy = _gathered(dy, out_idx, k_offsets, skip, "gather_a")
            pairs = ((k, xs, gs) for (k, xs), (_, gs) in zip(gx, gy))
        else:
            xbuf, gbuf = self._workspace(x, k_offsets, skip, x.shape[1], dy.shape[1])
            pairs = ((k, x, dy) if k == skip else
                     (k, torch.index_select(x, 0, in_idx[a:b], out=xbuf[: b - a]),
                      torch.index_select(dy, 0, out_idx[a:b], out=gbuf[: b - a])) for k, a, b in _groups(k_offsets))
        for k, xs, gs in pairs:
            if depthwise:
                dw[k] = (xs * gs).sum(0)
            else:
                torch.mm(xs.T, gs, out=dws[k])
        return dw

    def conv_backward(self, x, dy, w, in_idx, out_idx, k_offsets, identity_k: int, depthwise: bool):
        """``(dx, dW)`` together: each offset gathers ``dy[out_k]`` and ``x[in_k]`` once for both."""
        cin = x.shape[1]
        k_vol = len(k_offsets) - 1
        ident = identity_k >= 0 and x.shape[0] == dy.shape[0]
        skip = identity_k if ident else -1
        dw = x.new_zeros((k_vol, cin) if depthwise else (k_vol, cin, dy.shape[1]))
        dws = dw.unbind(0)
        ws = w.unbind(0) if depthwise else w.transpose(1, 2).unbind(0)
        op = torch.mul if depthwise else torch.mm
        bags = _bags(dy, in_idx, k_offsets, x.shape[0], skip, cin)
        if bags is not None or self._all_at_once(x, k_offsets, cin, dy.shape[1]):
            prod = _WS.get("pairs", k_offsets[-1], cin, dy)
            prods = _split(prod, k_offsets)
            gy = _gathered(dy, out_idx, k_offsets, skip, "gather_a")
            gx = _gathered(x, in_idx, k_offsets, skip, "gather_b")
            for (k, g), (_, xs) in zip(gy, gx):
                if bags is not None or k != skip:
                    op(g, ws[k], out=prods[k])
                if depthwise:
                    dw[k] = (xs * g).sum(0)
                else:
                    torch.mm(xs.T, g, out=dws[k])
            if bags is not None:
                return _segment_sum(prod, bags), dw
            dx = ((dy * w[skip]) if depthwise else dy @ w[skip].T).contiguous() if ident else dy.new_zeros(x.shape[0], cin)
            for a, b in _cuts(k_offsets, skip):
                dx.index_add_(0, in_idx[a:b], prod[a:b])
            return dx, dw
        if ident:
            wk = w[identity_k]
            dx = (dy * wk) if depthwise else dy @ wk.T
            dx = dx.contiguous()
            if depthwise:
                dw[identity_k] = (x * dy).sum(0)
            else:
                torch.mm(x.T, dy, out=dws[identity_k])
        else:
            dx = x.new_zeros(x.shape[0], cin)
        gbuf, pbuf = self._workspace(dy, k_offsets, skip, dy.shape[1], cin)
        xbuf, _ = self._workspace(x, k_offsets, skip, cin, 0, ("gather_c", "gather_d"))
        for k, a, b in _groups(k_offsets):
            if k == skip:
                continue
            g = torch.index_select(dy, 0, out_idx[a:b], out=gbuf[: b - a])
            xs = torch.index_select(x, 0, in_idx[a:b], out=xbuf[: b - a])
            dx.index_add_(0, in_idx[a:b], op(g, ws[k], out=pbuf[: b - a]))
            if depthwise:
                dw[k] = (xs * g).sum(0)
            else:
                torch.mm(xs.T, g, out=dws[k])
        return dx, dw

    # ------------------------------------------------------------ pooling
    def pool_forward(self, x, in_idx, out_idx, n_out: int, mode: str):
        c = x.shape[1]
        oi = out_idx.to(torch.int64)
        if mode == "max":
            g = x.index_select(0, in_idx)
            y = x.new_zeros(n_out, c)
            y.scatter_reduce_(0, oi[:, None].expand(-1, c), g, reduce="amax", include_self=False)
            # The arg-max pair of every (output, channel): the first pair that attains the max.
            p = torch.arange(g.shape[0], device=x.device)[:, None].expand(-1, c)
            cand = torch.where(g == y.index_select(0, oi), p, torch.full_like(p, g.shape[0]))
            first = torch.full((n_out, c), g.shape[0], dtype=torch.int64, device=x.device)
            first.scatter_reduce_(0, oi[:, None].expand(-1, c), cand, reduce="amin", include_self=True)
            n_pairs = g.shape[0]
            if n_pairs == 0:
                return y, torch.full((n_out, c), -1, dtype=torch.int64, device=x.device)
            rows = in_idx.to(torch.int64)[first.clamp_max(n_pairs - 1)]
            rows = torch.where(first < n_pairs, rows, torch.full_like(rows, -1))
            return y, rows
        y = x.new_zeros(n_out, c)
        y.index_add_(0, out_idx, x.index_select(0, in_idx))
        count = torch.zeros(n_out, dtype=torch.int64, device=x.device)
        count.index_add_(0, out_idx, torch.ones_like(oi))
        if mode == "avg":
            y = y / count.clamp_min(1).to(y.dtype)[:, None]
        return y, count

    def pool_backward(self, dy, aux, in_idx, out_idx, n_in: int, mode: str):
        c = dy.shape[1]
        dx = dy.new_zeros(n_in, c)
        if mode == "max":
            has = aux >= 0
            dx.scatter_add_(0, aux.clamp_min(0), torch.where(has, dy, torch.zeros_like(dy)))
            return dx
        if mode == "avg":
            dy = dy / aux.clamp_min(1).to(dy.dtype)[:, None]
        dx.index_add_(0, in_idx, dy.index_select(0, out_idx))
        return dx
