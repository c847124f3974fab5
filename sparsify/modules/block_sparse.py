"""``BlockSparseLinear``: a Linear layer whose weight is stored as nonzero blocks."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..runtime import ACTIVATIONS, BlockSparseLayout
from ..runtime.ops import META_NAMES, bsmm_composite, bsmm_eager, eager_inference, functorch_active
from .sparse_weight import autocast_operands, refresh_derived
from .weight_view import LinearLike

__all__ = ["BlockSparseLinear", "ACTIVATION_MODULES"]

#: Activation modules the epilogue can absorb, by the name the runtime op uses.
ACTIVATION_MODULES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def activation_module(name: str) -> nn.Module:
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    return ACTIVATION_MODULES[name]()


class BlockSparseLinear(LinearLike, nn.Module):
    """``y = act(x @ W.T + bias)`` with ``W`` stored as ``[nnz, b, b]`` nonzero blocks.

    The pattern lives in ``row_offsets`` / ``col_indices`` (persistent buffers,
    saved in the state_dict); the transposed and block-coordinate metadata are
    non-persistent buffers derived from them.  Loading a state_dict with a
    different pattern adopts that pattern.

    Example:
        >>> import torch
        >>> dense = torch.nn.Linear(64, 64)
        >>> layer = BlockSparseLinear.from_dense(dense, density=0.5, block_size=16)
        >>> layer(torch.randn(2, 64)).shape
        torch.Size([2, 64])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        layout: BlockSparseLayout,
        *,
        bias: bool = True,
        activation: str = "none",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if layout.shape != (out_features, in_features):
            raise ValueError(
                f"BlockSparseLinear: expected a layout of shape ({out_features}, {in_features}). "
                f"Got {layout.shape}."
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"BlockSparseLinear: unknown activation {activation!r}; expected one of {ACTIVATIONS}.")
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = layout.block_size
        self.activation = activation
        b = layout.block_size
        self.values = nn.Parameter(torch.empty(layout.nnz, b, b, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self._set_layout(layout, device=device)
        self.reset_parameters()

    # ------------------------------------------------------------------ layout
    def _set_layout(self, layout: BlockSparseLayout, device=None) -> None:
        self._layout = layout
        for name, t in layout.metadata().items():
            persistent = name in ("row_offsets", "col_indices")
            # A copy: buffers must never alias the interned layout's tensors.
            self.register_buffer(name, t.to(device=device, copy=True), persistent=persistent)

    @property
    def layout(self) -> BlockSparseLayout:
        """The pattern, rebuilt from the buffers if they were replaced (e.g. by load_state_dict)."""
        lay = self._layout
        if lay is None or lay.nnz != self.col_indices.numel():
            lay = BlockSparseLayout.from_csr(
                (self.out_features, self.in_features), self.block_size, self.row_offsets, self.col_indices
            )
            self._layout = lay
        return lay

    @property
    def density(self) -> float:
        return self.layout.density

    def reset_parameters(self) -> None:
        """Initialization for training from scratch: nn.Linear's ``U(-1/sqrt(in), 1/sqrt(in))`` with each
        output row's variance scaled to its kept fan-in (``sparsify.modules.sparse_weight``, docs/training.md):
        every output has the dense default's pre-activation variance; at density 1 this is nn.Linear's init."""
        from .sparse_weight import init_block_sparse_

        init_block_sparse_(self.values, self.layout, dense_bound=1.0 / max(1, self.in_features) ** 0.5,
                           full_fan_in=self.in_features, bias=self.bias)

    def _zero_padding(self) -> None:
        """Zero the parts of edge blocks that lie in the padding."""
        lay = self.layout
        pr, pc = lay.padded_shape
        if (pr, pc) == lay.shape:
            return
        mask = lay.values_from_dense(torch.ones(lay.shape, dtype=torch.bool))
        self.values.mul_(mask.to(self.values.device, self.values.dtype))

    # -------------------------------------------------------------- conversion
    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        *,
        density: float | None = None,
        block_size: int = 32,
        layout: BlockSparseLayout | None = None,
        activation: str = "none",
    ) -> BlockSparseLinear:
        """Keep the blocks of ``linear.weight`` with the largest L2 norm (or those of ``layout``)."""
        from ..patterns import magnitude_layout

        weight = linear.weight.detach()
        if layout is None:
            if density is None:
                raise ValueError("BlockSparseLinear.from_dense: give density= or layout=.")
            layout = magnitude_layout(weight, density=density, block_size=block_size)
        return cls.from_weight(weight, None if linear.bias is None else linear.bias.detach(), layout,
                               activation=activation)

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, layout: BlockSparseLayout, *, activation: str = "none"
    ) -> BlockSparseLinear:
        """The layer whose stored blocks are those of ``weight`` under ``layout``."""
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, layout, bias=bias is not None, activation=activation,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.values.copy_(layout.values_from_dense(weight))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def to_dense(self) -> torch.Tensor:
        """The exact dense weight (zeros outside the stored blocks); differentiable."""
        return self.layout.to_dense(self.values)

    def flops(self, input_shape: tuple[int, ...]) -> int:
        """FLOPs over the stored blocks only."""
        tokens = math.prod(input_shape[:-1])
        return 2 * tokens * self.values.numel()

    def _dense_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def to_dense_module(self) -> nn.Module:
        """A plain ``nn.Linear`` (HF ``Conv1D`` for a Conv1D source) with the masked weight,
        followed by the activation if one is fused."""
        dense = super().to_dense_module()
        if self.activation == "none":
            return dense
        return nn.Sequential(dense, activation_module(self.activation))

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(x, self.bias, residual, self.activation)

    def weight_product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` alone: no bias, activation or residual (what ``F.linear(x, self.weight)`` computes)."""
        return self._run(x, None, None, "none")

    def _run(self, x, bias, residual, activation) -> torch.Tensor:
        meta = [getattr(self, n) for n in META_NAMES]
        x, values, bias, residual = autocast_operands(x, self.values, bias, residual)
        # (under autocast `values` is a cast copy: nothing to cache on it)
        static = values is self.values and not self.training
        if eager_inference(x):
            return bsmm_eager(x, values, meta, bias, residual, self.out_features,
                              self.in_features, activation, static)
        if functorch_active():  # torch.func.grad / vmap / jacrev: the op cannot run under them (runtime.ops)
            return bsmm_composite(x, values, meta, bias, residual, self.out_features, self.in_features, activation)
        # Inside the op grad mode always reads False, so the module says whether the
        # weight is static: eval mode and grad off (writes through .data bypass versions).
        # A jit trace records the flag as a constant of its graph, which later runs in any mode: never.
        static = static and not torch.is_grad_enabled() and not torch.jit.is_tracing()
        return torch.ops.sparsify.bsmm(
            x, values, *meta, bias, residual, self.out_features, self.in_features,
            activation, None, static,
        )

    def extra_repr(self) -> str:
        lay = self.layout
        s = (f"in_features={self.in_features}, out_features={self.out_features}, "
             f"block_size={self.block_size}, density={lay.density:.4g}, nnz_blocks={lay.nnz}, "
             f"bias={self.bias is not None}")
        if self.activation != "none":
            s += f", activation={self.activation!r}"
        return s

    # -------------------------------------------------------------- state_dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
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
                layout = BlockSparseLayout.from_csr(
                    (self.out_features, self.in_features), self.block_size, ro, ci
                )
            except ValueError as exc:
                error_msgs.append(f"{prefix}: invalid block-sparse pattern in the state_dict: {exc}")
                return
            device, dtype = self.values.device, self.values.dtype
            b = self.block_size
            # The same block count (a layout changed by dynamic sparsity) keeps the parameter object:
            # optimizers, DDP's reducer and FSDP2 hold it, and the default loader fills it in place.
            if layout.nnz != self.values.shape[0]:
                self.values = nn.Parameter(torch.empty(layout.nnz, b, b, device=device, dtype=dtype))
            self._set_layout(layout, device=device)
        elif ro is not None and ci is not None:
            refresh_derived(self, lay)  # after to_empty() they hold uninitialized memory
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
