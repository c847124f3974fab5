"""What every block-sparse weight of a layer module shares: its pattern buffers and its initialization.

* :class:`BlockSparseParams` - a mixin for a module that holds one block-sparse
  weight as ``values [nnz, b, b, *taps]`` plus the pattern as buffers
  (``row_offsets`` / ``col_indices`` persistent, the derived metadata
  non-persistent), with ``layout``, ``set_layout_`` (dynamic sparsity swaps the
  pattern in place) and a state_dict loader that adopts a saved pattern.
* :class:`BlockSparseWeight` - that mixin as a stand-alone module, for layers
  with several weights (the LSTM's input and recurrent weights).
* :func:`init_block_sparse_` - the from-scratch initialization: the dense
  layer's default distribution with its variance scaled to the *kept* fan-in.

Initialization, the rule (docs/training.md)
-------------------------------------------
A dense layer's default init draws ``U(-a, a)`` with ``a`` set from its full
fan-in ``F`` (``1/sqrt(F)`` for ``nn.Linear`` / ``nn.Conv2d``,
``1/sqrt(hidden_size)`` for ``nn.LSTM``).  An output unit of a block-sparse
layer sums only its kept inputs ``F_kept(row)`` (stored blocks of its block row
x block width x taps, padding excluded), so the sum's variance would shrink by
``F_kept / F``.  We draw that unit's weights from ``U(-a s, a s)`` with
``s = sqrt(F / F_kept(row))``: every output has the pre-activation variance the
dense default gives, whatever the pattern (hub rows of a scale-free layout get
smaller weights, sparse rows larger).  At density 1 this is exactly the dense
default.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..runtime import BlockSparseLayout


def autocast_operands(x: torch.Tensor, *tensors: torch.Tensor | None) -> tuple:
    """``(x, *tensors)`` in ``torch.autocast``'s dtype where it is on for ``x``'s device (as ``nn.Linear`` /
    ``nn.Conv2d`` take their input and weight), else unchanged.  The block-sparse ops have no autocast
    rule of their own: under autocast a bfloat16 activation met a float32 ``values`` and the op refused
    the mixed dtypes.  The cast is differentiable, so the stored blocks still train in their own dtype.
    A device type autocast does not know (``meta``) has no autocast state: asking raises, so nothing is cast."""
    if not isinstance(x, torch.Tensor):  # an fx Proxy while tracing: nothing to cast
        return (x, *tensors)
    dev = x.device.type
    if not x.is_floating_point():
        return (x, *tensors)
    try:  # (free when nothing raises; torch.amp.is_autocast_available costs ~250 ns a call)
        enabled = torch.is_autocast_enabled(dev)
    except RuntimeError:  # "unknown device type for autocast": meta, or a backend without autocast
        return (x, *tensors)
    if not enabled:
        return (x, *tensors)
    dt = torch.get_autocast_dtype(dev)
    return tuple(t if t is None or not t.is_floating_point() or t.dtype == dt else t.to(dt) for t in (x, *tensors))


def refresh_derived(module: nn.Module, layout: BlockSparseLayout) -> None:
    """Rewrite ``module``'s derived (non-persistent) metadata buffers from ``layout``, in place where they
    fit.  Loading a state_dict with the same pattern must do it too: after ``to_empty()`` (meta-device
    initialization, FSDP2, accelerate) those buffers hold uninitialized memory, and no state_dict fills
    them: a forward read garbage block indices."""
    device = module.values.device
    for name, t in layout.metadata().items():
        if name in ("row_offsets", "col_indices"):
            continue  # persistent: the state_dict's own
        buf = module._buffers.get(name)
        if buf is not None and buf.shape == t.shape and buf.dtype == t.dtype and buf.device == device:
            with torch.no_grad():
                buf.copy_(t)
        else:
            module.register_buffer(name, t.to(device=device, copy=True), persistent=False)

__all__ = ["BlockSparseParams", "BlockSparseWeight", "init_block_sparse_", "kept_fan_in"]

_PERSISTENT = ("row_offsets", "col_indices")


def kept_fan_in(layout: BlockSparseLayout, taps: int = 1) -> torch.Tensor:
    """``float64 [n_block_rows]``: inputs each output of a block row is connected to (padding excluded).

    Example:
        >>> lay = BlockSparseLayout.from_block_mask(torch.tensor([[True, True], [False, True]]),
        ...                                         shape=(32, 24), block_size=16)
        >>> kept_fan_in(lay, taps=9).tolist()   # 16 + 8 real columns; 8 real columns
        [216.0, 72.0]
    """
    b = layout.block_size
    cols = layout.shape[1]
    width = torch.full((layout.n_block_cols,), float(b), dtype=torch.float64, device="cpu")  # as the layout
    width[-1] = cols - (layout.n_block_cols - 1) * b
    per_block = width[layout.col_indices.long()]
    out = torch.zeros(layout.n_block_rows, dtype=torch.float64, device="cpu")
    out.index_add_(0, layout.row_indices.long(), per_block)
    return out * taps


@torch.no_grad()
def init_block_sparse_(
    values: torch.Tensor,
    layout: BlockSparseLayout,
    *,
    dense_bound: float,
    full_fan_in: int,
    taps: int = 1,
    bias: torch.Tensor | None = None,
    bias_bound: float | None = None,
    scale_bias: bool = True,
) -> torch.Tensor:
    """Fill ``values`` (and ``bias``) with the dense default ``U(-dense_bound, dense_bound)`` scaled to the kept fan-in.

    Each block row's weights are drawn from ``U(-a s, a s)``, ``a = dense_bound``,
    ``s = sqrt(full_fan_in * taps / kept_fan_in(row))`` (module docstring).  The
    bias, if given, is drawn from ``U(-bias_bound, bias_bound)``, scaled by the
    row's ``s`` when ``scale_bias`` (the Linear / Conv rule ``1/sqrt(fan_in)``).
    Parts of edge blocks in the padding are zero.  Uses torch's global RNG, as
    ``nn.init`` does.

    Example:
        >>> lay = BlockSparseLayout.from_block_mask(torch.eye(4, dtype=torch.bool), shape=(64, 64), block_size=16)
        >>> v = torch.empty(4, 16, 16)
        >>> _ = init_block_sparse_(v, lay, dense_bound=1 / 8, full_fan_in=64)
        >>> round(float(v.abs().max()), 2) <= 0.25   # 1/sqrt(16 kept inputs)
        True
    """
    kept = kept_fan_in(layout, taps)
    scale = (full_fan_in * taps / kept.clamp_min(1.0)).sqrt()
    bound = (dense_bound * scale)[layout.row_indices.long()]  # per stored block
    shape = (-1,) + (1,) * (values.dim() - 1)
    values.uniform_(-1.0, 1.0).mul_(bound.to(values.device, values.dtype).view(shape))
    zero_padding_(values, layout)
    if bias is not None:
        bb = dense_bound if bias_bound is None else bias_bound
        per_row = (bb * scale if scale_bias else torch.full_like(scale, bb))
        per_out = per_row.repeat_interleave(layout.block_size)[: layout.shape[0]]
        bias.uniform_(-1.0, 1.0).mul_(per_out.to(bias.device, bias.dtype))
    return values


@torch.no_grad()
def zero_padding_(values: torch.Tensor, layout: BlockSparseLayout) -> None:
    """Zero the parts of edge blocks that lie in the padding of ``layout``."""
    pr, pc = layout.padded_shape
    if (pr, pc) == layout.shape:
        return
    mask = layout.values_from_dense(torch.ones(layout.shape, dtype=torch.bool))  # [nnz, b, b]
    shape = mask.shape + (1,) * (values.dim() - 3)
    values.mul_(mask.view(shape).to(values.device, values.dtype))


class BlockSparseParams:
    """Mixin: one block-sparse weight ``values [nnz, b, b, *taps]`` and its pattern buffers.

    The host module sets ``self._sparse_shape = (rows, cols)`` (the channel
    matrix), ``self.block_size`` and ``self._taps`` (a tuple, ``()`` for a
    matrix) before calling :meth:`_set_layout`.
    """

    _sparse_shape: tuple[int, int]
    _taps: tuple[int, ...]
    block_size: int

    def _set_layout(self, layout: BlockSparseLayout, device=None) -> None:
        self._layout = layout
        for name, t in layout.metadata().items():
            # A copy: buffers must never alias the interned layout's tensors.
            self.register_buffer(name, t.to(device=device, copy=True), persistent=name in _PERSISTENT)

    def _meta(self) -> list[torch.Tensor]:
        return [self.row_offsets, self.col_indices, self.row_indices, self.t_row_offsets, self.t_col_indices,
                self.t_block_ids]

    @property
    def layout(self) -> BlockSparseLayout:
        """The pattern, rebuilt from the buffers if they were replaced (e.g. by load_state_dict)."""
        lay = self._layout
        if lay is None or lay.nnz != self.col_indices.numel():
            lay = BlockSparseLayout.from_csr(self._sparse_shape, self.block_size, self.row_offsets, self.col_indices)
            self._layout = lay
        return lay

    @property
    def density(self) -> float:
        return self.layout.density

    @property
    def taps(self) -> int:
        return math.prod(self._taps)

    def _new_values(self, nnz: int, device, dtype) -> nn.Parameter:
        b = self.block_size
        return nn.Parameter(torch.empty(nnz, b, b, *self._taps, device=device, dtype=dtype))

    def set_layout_(self, layout: BlockSparseLayout, values: torch.Tensor) -> None:
        """Adopt ``layout`` with ``values`` in place (dynamic sparsity).

        With an unchanged block count the ``values`` parameter keeps its identity
        (optimizers and DDP keep referring to it) and its data is overwritten."""
        if layout.shape != tuple(self._sparse_shape) or layout.block_size != self.block_size:
            raise ValueError(f"{type(self).__name__}.set_layout_: expected a layout of shape {self._sparse_shape} "
                             f"in blocks of {self.block_size}. Got {layout!r}.")
        expect = (layout.nnz, self.block_size, self.block_size, *self._taps)
        if tuple(values.shape) != expect:
            raise ValueError(f"{type(self).__name__}.set_layout_: expected values of shape {expect}. "
                             f"Got {tuple(values.shape)}.")
        device = self.values.device
        with torch.no_grad():
            if values.shape == self.values.shape:
                self.values.copy_(values)
            else:
                self.values = nn.Parameter(values.to(device, self.values.dtype).clone())
        self._set_layout(layout, device=device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ro, ci = state_dict.get(prefix + "row_offsets"), state_dict.get(prefix + "col_indices")
        # Compared with the layout the derived metadata was built from, not with the buffers: a loader
        # that writes into the module's own tensors (torch.distributed.checkpoint.load) has already
        # overwritten row_offsets / col_indices in place, leaving the derived buffers stale.
        lay = self.layout
        if ro is not None and ci is not None and (
            ci.shape != lay.col_indices.shape or not torch.equal(ci.cpu().int(), lay.col_indices)
            or not torch.equal(ro.cpu().int(), lay.row_offsets)
        ):
            # A different pattern: adopt it, then let the default loader fill values.
            try:
                layout = BlockSparseLayout.from_csr(self._sparse_shape, self.block_size, ro, ci)
            except ValueError as exc:
                error_msgs.append(f"{prefix}: invalid block-sparse pattern in the state_dict: {exc}")
                return
            # The same block count (a layout changed by dynamic sparsity) keeps the parameter object:
            # optimizers, DDP's reducer and FSDP2 hold it, and the default loader fills it in place.
            if layout.nnz != self.values.shape[0]:
                self.values = self._new_values(layout.nnz, self.values.device, self.values.dtype)
            self._set_layout(layout, device=self.values.device)
        elif ro is not None and ci is not None:
            refresh_derived(self, lay)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _pattern_repr(self) -> str:
        lay = self.layout
        return f"block_size={self.block_size}, density={lay.density:.4g}, nnz_blocks={lay.nnz}"


class BlockSparseWeight(BlockSparseParams, nn.Module):
    """A stand-alone block-sparse weight ``[rows, cols]`` (stored as ``values [nnz, b, b]``).

    Example:
        >>> from sparsify.patterns import random_layout
        >>> w = BlockSparseWeight(random_layout((64, 32), 16, 0.5, seed=0))
        >>> w.values.shape, w.to_dense().shape
        (torch.Size([4, 16, 16]), torch.Size([64, 32]))
    """

    def __init__(self, layout: BlockSparseLayout, *, device=None, dtype=None) -> None:
        super().__init__()
        self._sparse_shape = layout.shape
        self.block_size = layout.block_size
        self._taps = ()
        self.values = self._new_values(layout.nnz, device, dtype)
        self._set_layout(layout, device=device)
        nn.init.zeros_(self.values)

    @property
    def shape(self) -> tuple[int, int]:
        return self._sparse_shape

    def to_dense(self) -> torch.Tensor:
        """The dense ``[rows, cols]`` matrix (zeros outside the stored blocks); differentiable."""
        return self.layout.to_dense(self.values)

    def extra_repr(self) -> str:
        return f"shape={tuple(self._sparse_shape)}, {self._pattern_repr()}"
