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

import torch

__all__ = ["POOL_MODES", "SpatialCPUExecutor"]

POOL_MODES = ("sum", "avg", "max")


def _groups(k_offsets):
    for k in range(len(k_offsets) - 1):
        a, b = k_offsets[k], k_offsets[k + 1]
        if b > a:
            yield k, a, b


class SpatialCPUExecutor:
    """Reference executor for ``torch.ops.sparsify.spatial_*`` (any device, plain torch ops)."""

    name = "cpu"

    # ------------------------------------------------------------ convolution
    @staticmethod
    def _workspace(x, k_offsets, identity_k, cols_a: int, cols_b: int):
        """Two buffers reused by every offset: fresh large tensors cost page faults on each
        allocation (glibc maps them anew), which on the CPU cost as much as the copies."""
        sizes = [k_offsets[k + 1] - k_offsets[k] for k in range(len(k_offsets) - 1) if k != identity_k]
        most = max(sizes, default=0)
        return x.new_empty(most, cols_a), x.new_empty(most, cols_b)

    def conv_forward(self, x, w, in_idx, out_idx, k_offsets, n_out: int, identity_k: int, depthwise: bool):
        cout = w.shape[-1]
        ident = identity_k >= 0 and x.shape[0] == n_out
        if ident:
            y = (x * w[identity_k]) if depthwise else x @ w[identity_k]
            y = y.contiguous()
        else:
            y = x.new_zeros(n_out, cout)
        gbuf, pbuf = self._workspace(x, k_offsets, identity_k if ident else -1, x.shape[1], cout)
        for k, a, b in _groups(k_offsets):
            if k == identity_k and ident:
                continue
            g = torch.index_select(x, 0, in_idx[a:b], out=gbuf[: b - a])
            p = torch.mul(g, w[k], out=pbuf[: b - a]) if depthwise else torch.mm(g, w[k], out=pbuf[: b - a])
            y.index_add_(0, out_idx[a:b], p)
        return y

    def conv_dgrad(self, dy, w, in_idx, out_idx, k_offsets, n_in: int, identity_k: int, depthwise: bool):
        cin = w.shape[-1] if depthwise else w.shape[1]
        ident = identity_k >= 0 and dy.shape[0] == n_in
        if ident:
            dx = (dy * w[identity_k]) if depthwise else dy @ w[identity_k].T
            dx = dx.contiguous()
        else:
            dx = dy.new_zeros(n_in, cin)
        gbuf, pbuf = self._workspace(dy, k_offsets, identity_k if ident else -1, dy.shape[1], cin)
        for k, a, b in _groups(k_offsets):
            if k == identity_k and ident:
                continue
            g = torch.index_select(dy, 0, out_idx[a:b], out=gbuf[: b - a])
            p = torch.mul(g, w[k], out=pbuf[: b - a]) if depthwise else torch.mm(g, w[k].T, out=pbuf[: b - a])
            dx.index_add_(0, in_idx[a:b], p)
        return dx

    def conv_wgrad(self, x, dy, in_idx, out_idx, k_offsets, identity_k: int, depthwise: bool):
        k_vol = len(k_offsets) - 1
        shape = (k_vol, x.shape[1]) if depthwise else (k_vol, x.shape[1], dy.shape[1])
        dw = x.new_zeros(shape)
        ident = identity_k >= 0 and x.shape[0] == dy.shape[0]
        xbuf, gbuf = self._workspace(x, k_offsets, identity_k if ident else -1, x.shape[1], dy.shape[1])
        for k, a, b in _groups(k_offsets):
            if k == identity_k and ident:
                xs, gs = x, dy
            else:
                xs = torch.index_select(x, 0, in_idx[a:b], out=xbuf[: b - a])
                gs = torch.index_select(dy, 0, out_idx[a:b], out=gbuf[: b - a])
            if depthwise:
                dw[k] = (xs * gs).sum(0)
            else:
                torch.mm(xs.T, gs, out=dw[k])
        return dw

    def conv_backward(self, x, dy, w, in_idx, out_idx, k_offsets, identity_k: int, depthwise: bool):
        """``(dx, dW)`` together: each offset gathers ``dy[out_k]`` and ``x[in_k]`` once for both."""
        cin = x.shape[1]
        k_vol = len(k_offsets) - 1
        ident = identity_k >= 0 and x.shape[0] == dy.shape[0]
        dw = x.new_zeros((k_vol, cin) if depthwise else (k_vol, cin, dy.shape[1]))
        if ident:
            wk = w[identity_k]
            dx = (dy * wk) if depthwise else dy @ wk.T
            dx = dx.contiguous()
            if depthwise:
                dw[identity_k] = (x * dy).sum(0)
            else:
                torch.mm(x.T, dy, out=dw[identity_k])
        else:
            dx = x.new_zeros(x.shape[0], cin)
        gbuf, pbuf = self._workspace(dy, k_offsets, identity_k if ident else -1, dy.shape[1], cin)
        xbuf, _ = self._workspace(x, k_offsets, identity_k if ident else -1, cin, 0)
        for k, a, b in _groups(k_offsets):
            if k == identity_k and ident:
                continue
            g = torch.index_select(dy, 0, out_idx[a:b], out=gbuf[: b - a])
            xs = torch.index_select(x, 0, in_idx[a:b], out=xbuf[: b - a])
            if depthwise:
                dx.index_add_(0, in_idx[a:b], torch.mul(g, w[k], out=pbuf[: b - a]))
                dw[k] = (xs * g).sum(0)
            else:
                dx.index_add_(0, in_idx[a:b], torch.mm(g, w[k].T, out=pbuf[: b - a]))
                torch.mm(xs.T, g, out=dw[k])
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
