"""``BlockSparseLSTM``: a replacement for ``nn.LSTM`` whose input and recurrent weights are block-sparse.

Each layer and direction has a block-sparse input weight ``W_ih [4H, in]`` and
recurrent weight ``W_hh [4H, H]`` (the four gates stacked in ``nn.LSTM``'s
order i, f, g, o) and dense biases.  The input projection of the whole
sequence runs as one large block-sparse product (``T * N`` rows); the
recurrence runs as ``torch.ops.sparsify.bslstm_recurrence`` (the product with
``W_hh`` on the small-M path, the gate math fused, BPTT with one dW product for
all steps; see ``sparsify.runtime.ops_lstm``).

Supported like ``nn.LSTM``: ``num_layers``, ``bias``, ``batch_first``,
``dropout`` (between layers, training only), ``bidirectional``, initial states
``(h0, c0)``, unbatched input, ``mode`` and ``flatten_parameters()`` (a no-op:
no cuDNN buffer to pack).  Refused with the reason: ``proj_size > 0`` and
``PackedSequence`` input.  Not provided: ``all_weights`` (the weights are
``BlockSparseWeight`` modules, not ``[4H, in]`` parameters; iterate
``sparse_weights()`` or ``named_parameters()``).

Patterns (``pattern=``): a from-scratch pattern is drawn on the ``H x H`` grid of
hidden-unit groups and shared by the four gates (the graph is over hidden
units: unit group ``i`` reads group ``j`` in every gate), so the stacked layout
is four copies; the input weight gets the same kind of pattern on its
``H x in`` grid.  ``from_dense`` keeps the largest blocks of each stacked
weight instead (``pattern='magnitude'``).  At density 1.0 the layer computes
exactly what ``nn.LSTM`` does with the same weights.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import (
    BlockSparseLayout,
    ops_lstm,  # noqa: F401  (registers torch.ops.sparsify.bslstm_recurrence)
)
from ..runtime.ops import META_NAMES, bsmm_composite, functorch_active
from ..runtime.ops_lstm import bslstm_recurrence_composite
from .sparse_weight import BlockSparseWeight, autocast_operands, init_block_sparse_

__all__ = ["BlockSparseLSTM", "lstm_layouts"]


def _sub_seed(seed: int, *parts: object) -> int:
    """A seed for one weight, derived from the layer's seed and its position (stable across runs)."""
    h = hashlib.sha256(repr((seed,) + parts).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def _accumulate_dxproj(record: dict, grad: torch.Tensor) -> None:
    """RigL's hook on a cell's input projection (``sparsify.dynamic``): a second backward through a retained
    graph adds to the recorded gradient, as ``.grad`` accumulates and as the Linear / conv hooks sum ``dy``."""
    g = grad.detach()
    record["dxproj"] = g if "dxproj" not in record else record["dxproj"] + g


def lstm_layouts(
    input_size: int,
    hidden_size: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    block_size: int = 32,
    density: float,
    input_density: float | None = None,
    pattern: str = "small_world",
    seed: int = 0,
    rewire: float = 0.1,
) -> list[tuple[BlockSparseLayout, BlockSparseLayout]]:
    """``[(W_ih layout, W_hh layout)]`` per layer and direction (``l * num_directions + d``), each a
    from-scratch ``pattern`` drawn per gate group and stacked for the four gates.

    Example:
        >>> lays = lstm_layouts(64, 128, block_size=16, density=0.25, pattern="scale_free", seed=1)
        >>> ih, hh = lays[0]
        >>> hh.shape, round(hh.density, 2), ih.shape
        ((512, 128), 0.25, (512, 64))
    """
    from ..patterns import layout_for, stack_layouts

    if pattern == "magnitude":
        raise ValueError("lstm_layouts: 'magnitude' needs trained weights: use BlockSparseLSTM.from_dense(lstm, ...).")
    if hidden_size % block_size:
        raise ValueError(f"BlockSparseLSTM: hidden_size={hidden_size} must be a multiple of block_size={block_size} "
                         "so that each of the four stacked gates starts on a block row.")
    dirs = 2 if bidirectional else 1
    input_density = density if input_density is None else input_density
    out = []
    for layer in range(num_layers):
        in_l = input_size if layer == 0 else hidden_size * dirs
        for d in range(dirs):
            gate_ih = layout_for(pattern, (hidden_size, in_l), block_size=block_size, density=input_density,
                                 seed=_sub_seed(seed, layer, d, "ih"), rewire=rewire)
            gate_hh = layout_for(pattern, (hidden_size, hidden_size), block_size=block_size, density=density,
                                 seed=_sub_seed(seed, layer, d, "hh"), rewire=rewire)
            out.append((stack_layouts([gate_ih] * 4), stack_layouts([gate_hh] * 4)))
    return out


class BlockSparseLSTM(nn.Module):
    """``nn.LSTM`` with block-sparse input and recurrent weights (module docstring).

    Either give ``layouts`` (one ``(W_ih, W_hh)`` pair per layer and direction) or
    ``density`` (and ``pattern``, ``block_size``, ``seed``, ``input_density``).

    Example:
        >>> lstm = BlockSparseLSTM(32, 64, num_layers=2, batch_first=True, density=0.5, block_size=16,
        ...                        pattern="small_world", seed=0)
        >>> out, (h, c) = lstm(torch.randn(3, 7, 32))
        >>> out.shape, h.shape
        (torch.Size([3, 7, 64]), torch.Size([2, 3, 64]))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        *,
        layouts: Sequence[tuple[BlockSparseLayout, BlockSparseLayout]] | None = None,
        density: float | None = None,
        input_density: float | None = None,
        block_size: int = 32,
        pattern: str = "small_world",
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if proj_size:
            raise ValueError(f"BlockSparseLSTM: proj_size={proj_size} is not supported (an LSTM with projections); "
                             "leave this layer dense or use proj_size=0.")
        for what, v in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BlockSparseLSTM: {what} must be a positive int. Got {v!r}.")
        if isinstance(dropout, bool) or not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"BlockSparseLSTM: dropout must be a probability in [0, 1]. Got {dropout!r}.")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bool(bias), bool(batch_first), float(dropout)
        self.bidirectional, self.proj_size = bool(bidirectional), 0
        dirs = 2 if bidirectional else 1
        if layouts is None:
            if density is None:
                raise ValueError("BlockSparseLSTM: give density= (with pattern=, block_size=, seed=) or layouts=.")
            layouts = lstm_layouts(input_size, hidden_size, num_layers=num_layers, bidirectional=bidirectional,
                                   block_size=block_size, density=density, input_density=input_density,
                                   pattern=pattern, seed=seed)
        layouts = list(layouts)
        if len(layouts) != num_layers * dirs:
            raise ValueError(f"BlockSparseLSTM: expected {num_layers * dirs} (W_ih, W_hh) layout pairs "
                             f"(num_layers x directions). Got {len(layouts)}.")
        h4 = 4 * hidden_size
        for k, (ih, hh) in enumerate(layouts):
            in_l = input_size if k // dirs == 0 else hidden_size * dirs
            if ih.shape != (h4, in_l) or hh.shape != (h4, hidden_size):
                raise ValueError(f"BlockSparseLSTM: layout pair {k} has shapes {ih.shape} and {hh.shape}; expected "
                                 f"{(h4, in_l)} (W_ih) and {(h4, hidden_size)} (W_hh).")
            if hidden_size % hh.block_size or hidden_size % ih.block_size:
                raise ValueError(f"BlockSparseLSTM: hidden_size={hidden_size} must be a multiple of the block size "
                                 f"({hh.block_size}) so that each gate starts on a block row.")
            sfx = self._suffix(k)
            self.add_module(f"weight_ih{sfx}", BlockSparseWeight(ih, device=device, dtype=dtype))
            self.add_module(f"weight_hh{sfx}", BlockSparseWeight(hh, device=device, dtype=dtype))
            if self.bias:
                self.register_parameter(f"bias_ih{sfx}", nn.Parameter(torch.empty(h4, device=device, dtype=dtype)))
                self.register_parameter(f"bias_hh{sfx}", nn.Parameter(torch.empty(h4, device=device, dtype=dtype)))
        self.reset_parameters()

    def _suffix(self, k: int) -> str:
        dirs = 2 if self.bidirectional else 1
        return f"_l{k // dirs}" + ("_reverse" if k % dirs else "")

    def _cells(self):
        """``(W_ih module, W_hh module, b_ih, b_hh)`` per layer and direction."""
        dirs = 2 if self.bidirectional else 1
        for k in range(self.num_layers * dirs):
            sfx = self._suffix(k)
            yield (getattr(self, f"weight_ih{sfx}"), getattr(self, f"weight_hh{sfx}"),
                   getattr(self, f"bias_ih{sfx}", None), getattr(self, f"bias_hh{sfx}", None))

    #: As ``nn.LSTM.mode`` (code that handles RNNs generically reads it).
    mode = "LSTM"

    def flatten_parameters(self) -> None:
        """Nothing to do; here because models call ``self.rnn.flatten_parameters()`` in their forward.

        ``nn.LSTM`` copies its weights into one contiguous buffer for cuDNN's fused RNN kernel.  This
        layer never calls cuDNN: each weight is its own ``[nnz, b, b]`` block tensor, read by the
        block-sparse ops as it is, so there is nothing to flatten.

        Example:
            >>> lstm = BlockSparseLSTM(16, 32, density=0.5, block_size=16)
            >>> lstm.flatten_parameters(); lstm.mode
            'LSTM'
        """

    def sparse_weights(self) -> list[BlockSparseWeight]:
        """Every block-sparse weight of the layer (dynamic sparsity updates them)."""
        return [w for ih, hh, _, _ in self._cells() for w in (ih, hh)]

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        """nn.LSTM's default ``U(-1/sqrt(H), 1/sqrt(H))``, each weight row's variance scaled to its kept
        fan-in (``sparsify.modules.sparse_weight``); biases exactly as nn.LSTM."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for ih, hh, b_ih, b_hh in self._cells():
            init_block_sparse_(ih.values, ih.layout, dense_bound=bound, full_fan_in=ih.shape[1])
            init_block_sparse_(hh.values, hh.layout, dense_bound=bound, full_fan_in=self.hidden_size)
            for b in (b_ih, b_hh):
                if b is not None:
                    nn.init.uniform_(b, -bound, bound)

    # ------------------------------------------------------------ conversion
    @classmethod
    def from_dense(
        cls,
        lstm: nn.LSTM,
        *,
        density: float | None = None,
        input_density: float | None = None,
        block_size: int = 32,
        layouts: Sequence[tuple[BlockSparseLayout, BlockSparseLayout]] | None = None,
    ) -> BlockSparseLSTM:
        """Keep the largest-norm blocks of each stacked weight of ``lstm`` (or those of ``layouts``)."""
        from ..patterns import magnitude_layout

        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"BlockSparseLSTM.from_dense: expected an nn.LSTM. Got {type(lstm).__name__}.")
        if lstm.proj_size:
            raise ValueError(f"BlockSparseLSTM.from_dense: proj_size={lstm.proj_size} is not supported.")
        dirs = 2 if lstm.bidirectional else 1
        names = [f"_l{k // dirs}" + ("_reverse" if k % dirs else "") for k in range(lstm.num_layers * dirs)]
        if layouts is None:
            if density is None:
                raise ValueError("BlockSparseLSTM.from_dense: give density= or layouts=.")
            dens_ih = density if input_density is None else input_density
            layouts = [(magnitude_layout(getattr(lstm, f"weight_ih{s}").detach(), density=dens_ih,
                                         block_size=block_size),
                        magnitude_layout(getattr(lstm, f"weight_hh{s}").detach(), density=density,
                                         block_size=block_size)) for s in names]
        ref = lstm.weight_ih_l0
        layer = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias, lstm.batch_first, lstm.dropout,
                    lstm.bidirectional, layouts=layouts, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for s in names:
                for kind in ("ih", "hh"):
                    w = getattr(layer, f"weight_{kind}{s}")
                    w.values.copy_(w.layout.values_from_dense(getattr(lstm, f"weight_{kind}{s}").detach()))
                    if lstm.bias:
                        getattr(layer, f"bias_{kind}{s}").copy_(getattr(lstm, f"bias_{kind}{s}"))
        return layer

    def to_dense_module(self) -> nn.LSTM:
        """A plain ``nn.LSTM`` with the same settings and the masked weights."""
        w0 = self.weight_ih_l0.values
        lstm = nn.LSTM(self.input_size, self.hidden_size, self.num_layers, self.bias, self.batch_first, self.dropout,
                       self.bidirectional, device=w0.device, dtype=w0.dtype)
        dirs = 2 if self.bidirectional else 1
        with torch.no_grad():
            for k in range(self.num_layers * dirs):
                s = self._suffix(k)
                for kind in ("ih", "hh"):
                    getattr(lstm, f"weight_{kind}{s}").copy_(getattr(self, f"weight_{kind}{s}").to_dense())
                    if self.bias:
                        getattr(lstm, f"bias_{kind}{s}").copy_(getattr(self, f"bias_{kind}{s}"))
        return lstm

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """Multiply-add FLOPs of the stored blocks for one forward over ``input_shape`` (gate math excluded)."""
        tokens = math.prod(input_shape[:-1])
        return 2 * tokens * sum(w.values.numel() for w in self.sparse_weights())

    # --------------------------------------------------------------- forward
    def forward(self, input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None):  # noqa: A002
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise TypeError(
                "BlockSparseLSTM does not take a PackedSequence: its recurrence runs every sequence for all T "
                "steps. Pad the batch (nn.utils.rnn.pad_packed_sequence) and read each sequence's output at its "
                "own last step, or keep this layer an nn.LSTM (rules=[Rule('<name>', skip=True)]).")
        dirs = 2 if self.bidirectional else 1
        unbatched = input.dim() == 2
        if input.dim() not in (2, 3):
            raise ValueError(f"BlockSparseLSTM: expected a 2-D (unbatched) or 3-D input. Got shape {tuple(input.shape)}.")
        x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
        if x.shape[-1] != self.input_size:
            raise ValueError(f"BlockSparseLSTM: expected input_size={self.input_size} features. "
                             f"Got input of shape {tuple(input.shape)}.")
        n = x.shape[1]
        shape = (self.num_layers * dirs, n, self.hidden_size)
        if hx is None:
            h0 = c0 = x.new_zeros(shape)
        else:
            h0, c0 = hx
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            for name, s in (("h0", h0), ("c0", c0)):
                if tuple(s.shape) != shape:
                    want = shape if not unbatched else (shape[0], shape[2])
                    raise ValueError(f"BlockSparseLSTM: expected {name} of shape {want}. Got {tuple(s.shape)}.")
        cells = list(self._cells())
        rec = getattr(self, "_dynamic_record", None)
        # torch.func.grad / vmap / jacrev: the ops cannot run under them (sparsify.runtime.ops)
        composite = functorch_active()
        h_n, c_n = [], []
        layer_in = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                k = layer * dirs + d
                ih, hh, b_ih, b_hh = cells[k]
                seq = layer_in if d == 0 else layer_in.flip(0)
                bias = None if b_ih is None else b_ih + b_hh
                # under torch.autocast, every operand in its dtype, as nn.LSTM runs (the ops have no rule)
                seq_a, ih_values, bias = autocast_operands(seq, ih.values, bias)
                ih_meta, hh_meta = [getattr(ih, m) for m in META_NAMES], [getattr(hh, m) for m in META_NAMES]
                if composite:
                    xproj = bsmm_composite(seq_a, ih_values, ih_meta, bias, None, 4 * self.hidden_size, ih.shape[1],
                                           "none")
                else:
                    xproj = torch.ops.sparsify.bsmm(seq_a, ih_values, *ih_meta, bias, None, 4 * self.hidden_size,
                                                    ih.shape[1], "none", None, False)
                xproj_a, h0k, c0k, hh_values = autocast_operands(xproj, h0[k], c0[k], hh.values)
                if composite:
                    hs, cs = bslstm_recurrence_composite(xproj_a, h0k, c0k, hh_values, hh_meta)
                else:
                    hs, cs, _ = torch.ops.sparsify.bslstm_recurrence(xproj_a, h0k, c0k, hh_values, *hh_meta)
                if rec is not None and xproj.requires_grad:  # dynamic sparsity (RigL) records its operands
                    r = rec[k] = {"x": seq.detach(), "h0": h0[k].detach(), "hs": hs.detach()}
                    xproj.register_hook(functools.partial(_accumulate_dxproj, r))
                outs.append(hs if d == 0 else hs.flip(0))
                h_n.append(hs[-1])
                c_n.append(cs[-1])
            layer_in = outs[0] if dirs == 1 else torch.cat(outs, dim=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_in = F.dropout(layer_in, self.dropout, training=True)
        out = layer_in
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if unbatched:
            return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return (out.transpose(0, 1) if self.batch_first else out), (h_n, c_n)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        hh = self.weight_hh_l0
        return s + f", block_size={hh.block_size}, density={hh.density:.4g}"
