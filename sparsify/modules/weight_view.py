"""``layer.weight`` of a rewritten layer: the dense weight, without building it.

A converted model is still the user's model, and model code reads the weights of
its layers: T5 checks ``self.wo.weight.dtype`` on every call, ViT casts to
``projection.weight.dtype``, ``nn.MultiheadAttention`` passes
``self.out_proj.weight`` to ``F.multi_head_attention_forward`` instead of calling
the module, GPT-2's ``Conv1D`` computes ``torch.addmm(bias, x, self.weight)``.
So every rewritten linear-like layer has a ``weight`` attribute that returns a
:class:`DenseWeightView`: a tensor with the dense weight's shape, dtype, device
and ``requires_grad`` that holds no storage of its own.

* Reading metadata (``.shape``, ``.dtype``, ``.device``, ``.size()``, ...) costs nothing.
* A linear-like call on it (``F.linear(x, W, b)``, ``x @ W.T``, ``torch.matmul``,
  ``torch.mm``, ``torch.addmm(b, x, W)`` for ``[in, out]`` weights) runs the layer's
  own product (block-sparse kernel, factors), and gradients reach the stored
  blocks / factors.
* Anything else (arithmetic, ``.clone()``, ``repr``, indexing, a conv) builds the
  dense weight with the layer's differentiable ``to_dense()`` and runs on it, so
  every result is exact and still differentiable with respect to the layer.

This is a ``__torch_function__`` subclass (as torch's semi-structured sparse
tensors and torchao's quantized weights are), but it is never a parameter: the
parameters stay the layer's ``values`` / factors, so optimizers, DDP, FSDP and
``state_dict`` see ordinary tensors.  A view is created on each attribute read
and refers to its layer, so it always shows the layer's current weights.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

__all__ = ["ConvLike", "DenseWeightView", "LinearLike", "materialize"]

#: Tensor attributes that read metadata only: answered by the view itself.
_META_ATTRS = frozenset({
    "shape", "dtype", "device", "requires_grad", "ndim", "is_cuda", "is_cpu", "is_meta", "layout",
    "is_sparse", "is_quantized", "is_mkldnn", "is_nested", "names", "is_leaf", "itemsize", "nbytes",
    "is_xpu", "is_mps", "grad_fn", "output_nr", "_version", "is_sparse_csr",
})
_META_METHODS = frozenset({
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.nelement,
    torch.Tensor.element_size, torch.Tensor.is_floating_point, torch.Tensor.is_complex,
    torch.Tensor.ndimension, torch.Tensor.get_device, torch.Tensor.is_contiguous,
    torch.Tensor.__len__, torch.Tensor.stride, torch.is_floating_point, torch.is_complex,
    torch.numel, torch.Tensor.__hash__, torch.Tensor.is_signed,
})
_LINEAR = (F.linear, torch._C._nn.linear)
_MATMUL = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm)
_TRANSPOSE = (torch.Tensor.t, torch.t, torch.Tensor.t_)


class DenseWeightView(torch.Tensor):
    """The dense weight of ``layers`` stacked along dim 0 (``[out, in]``), or its
    transpose (``[in, out]``).  See the module docstring.

    Example:
        >>> import torch
        >>> from sparsify import BlockSparseLinear
        >>> layer = BlockSparseLinear.from_dense(torch.nn.Linear(64, 32), density=0.5, block_size=16)
        >>> w = layer.weight
        >>> w.shape, w.dtype
        (torch.Size([32, 64]), torch.float32)
        >>> x = torch.randn(3, 64)
        >>> torch.allclose(torch.nn.functional.linear(x, w), x @ layer.to_dense().T)
        True
    """

    _layers: tuple
    _transposed: bool

    @staticmethod
    def __new__(cls, layers: LinearLike | Sequence[LinearLike], transposed: bool = False) -> DenseWeightView:
        layers = tuple(layers) if isinstance(layers, (list, tuple)) else (layers,)
        p = _reference(layers[0])
        shape = list(_shape(layers[0]))
        shape[0] = sum(int(_shape(m)[0]) for m in layers)
        if transposed:
            shape = shape[::-1]
        requires_grad = any(q.requires_grad for m in layers for q in m.parameters(recurse=True))
        view = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=p.dtype, device=p.device,
                                                   requires_grad=requires_grad)
        view._layers = layers
        view._transposed = transposed
        return view

    def __repr__(self, *, tensor_contents=None) -> str:  # noqa: D105  (shown as the dense weight)
        return f"DenseWeightView({materialize(self)!r})"

    # -------------------------------------------------------------- pieces
    def _flipped(self) -> DenseWeightView:
        return DenseWeightView(self._layers, not self._transposed)

    def _dense(self) -> torch.Tensor:
        _check_gathered(self._layers, "to_dense")
        parts = [m.to_dense() if hasattr(m, "to_dense") else m.weight for m in self._layers]
        w = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        return w.t() if self._transposed else w

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for the ``[out, in]`` weight, on the layers' own forward."""
        _check_gathered(self._layers, "weight_product")
        outs = [m.weight_product(x) if hasattr(m, "weight_product") else F.linear(x, m.weight)
                for m in self._layers]
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1)

    # ------------------------------------------------------ torch function
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) == "__get__":  # a Tensor property
            name = getattr(getattr(func, "__self__", None), "__name__", "")
            (view,) = args
            if name in _META_ATTRS:
                with torch._C.DisableTorchFunctionSubclass():
                    return func(view)
            if name in ("T", "mT", "H", "mH") and view.dim() == 2 and not view.is_complex():
                return view._flipped()
            if name == "grad":
                return None
            if name == "data":
                return view._dense().detach()
            return func(view._dense())
        if func in _META_METHODS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        fast = _linear_like(func, args, kwargs)
        if fast is not None:
            return fast
        if func in _TRANSPOSE and isinstance(args[0], DenseWeightView) and func is not torch.Tensor.t_:
            return args[0]._flipped()
        if func in (torch.Tensor.transpose, torch.transpose) and isinstance(args[0], DenseWeightView):
            dims = [d % 2 for d in (list(args[1:3]) + [kwargs.get("dim0"), kwargs.get("dim1")])[:2] if d is not None]
            if len(dims) == 2 and sorted(dims) == [0, 1]:
                return args[0]._flipped()
        args, kwargs = pytree.tree_map(_dense_of, (args, kwargs))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only where torch functions are disabled (inside other subclasses'
        # handlers): compute on the dense weight; autograd has already been recorded
        # against the view there, so gradients do not reach the layer on this path.
        with torch.no_grad():
            args, kwargs = pytree.tree_map(_dense_of, (args, kwargs or {}))
        return func(*args, **kwargs)


def _check_gathered(layers: tuple, method: str) -> None:
    """Refuse to compute with a layer whose parameters FSDP2 holds sharded (DTensors).

    FSDP2 gathers a module's parameters only around its ``forward``; a weight read
    by other code (an owner's ``F.linear(x, self.w)``) is computed outside it.  The
    check reads ``sys.modules`` only, so it costs nothing where DTensor is unused.
    """
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is None:
        return
    for m in layers:
        if method in m.__dict__:  # register_fsdp_forward_method wrapped it: FSDP gathers around the call
            continue
        for name, p in m.named_parameters():
            if isinstance(p, dtensor):
                raise ValueError(
                    f"{type(m).__name__}.weight was used outside the forward of the module that FSDP2's "
                    f"fully_shard wrapped, while its parameter {name!r} is sharded (a DTensor), so it cannot "
                    f"be computed with. Apply fully_shard to the module whose forward uses this weight (its "
                    f"owner) rather than to the layer alone, or after fully_shard(layer) call "
                    f"torch.distributed.fsdp.register_fsdp_forward_method(layer, {method!r}) so that FSDP "
                    f"gathers the parameters for that call (docs/distributed.md)."
                )


def _reference(m) -> torch.Tensor:
    return m.reference_tensor() if hasattr(m, "reference_tensor") else m.weight


def _shape(m) -> tuple[int, ...]:
    return tuple(m.dense_weight_shape()) if hasattr(m, "dense_weight_shape") else tuple(m.weight.shape)


def _dense_of(a):
    return a._dense() if isinstance(a, DenseWeightView) else a


def materialize(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: the dense weight a :class:`DenseWeightView` stands for (``t`` itself otherwise).

    Example:
        >>> import torch
        >>> materialize(torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    return t._dense() if isinstance(t, DenseWeightView) else t


def _plain(x) -> bool:
    return isinstance(x, torch.Tensor) and not isinstance(x, DenseWeightView)


def _linear_like(func, args, kwargs):
    """The layer's own product for a linear-like call on a view; None if the call is not one."""
    if func in _LINEAR:
        x = args[0] if args else kwargs.get("input")
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        if isinstance(w, DenseWeightView) and not w._transposed and _plain(x) and (b is None or _plain(b)):
            y = w._product(x)
            return y if b is None else y + b
        return None
    if func in _MATMUL and len(args) == 2 and not kwargs:
        x, w = args
        if isinstance(w, DenseWeightView) and w._transposed and _plain(x) and x.dim() >= 1:
            if x.dim() == 1:
                return w._flipped()._product(x[None])[0]
            return w._flipped()._product(x)
        return None
    if func in (torch.addmm, torch.Tensor.addmm):
        b, x, w = (list(args) + [kwargs.get("input"), kwargs.get("mat1"), kwargs.get("mat2")])[:3] \
            if len(args) >= 3 else (kwargs.get("input"), kwargs.get("mat1"), kwargs.get("mat2"))
        extra = {k for k in kwargs if k not in ("input", "mat1", "mat2")}
        if (isinstance(w, DenseWeightView) and w._transposed and _plain(x) and _plain(b) and x.dim() == 2
                and not extra):
            return b + w._flipped()._product(x)
        return None
    return None


class LinearLike:
    """Mixin for modules that replace a linear-like layer (``nn.Linear``, HF ``Conv1D``,
    an attention projection): the ``weight`` attribute and the weight-only product.

    A subclass provides ``in_features``, ``out_features``, ``to_dense()`` (``[out, in]``,
    differentiable), ``weight_product(x)`` (``x @ W.T`` without bias or epilogue) and
    ``_dense_linear()`` (an ``nn.Linear`` with the dense weight).  Where the source
    stored its weight as ``[in, out]`` (HF ``Conv1D``), ``weight_transposed`` is True:
    ``weight`` then has that orientation and ``to_dense_module()`` rebuilds a ``Conv1D``.
    """

    weight_transposed: bool = False

    @property
    def weight(self) -> DenseWeightView:
        """The dense weight, in the source layer's orientation (see :class:`DenseWeightView`)."""
        return DenseWeightView(self, transposed=self.weight_transposed)

    def reference_tensor(self) -> torch.Tensor:
        """A parameter whose dtype and device are the layer's."""
        return next(p for n, p in self.named_parameters() if n != "bias")

    def dense_weight_shape(self) -> tuple[int, ...]:
        return (int(self.out_features), int(self.in_features))

    def weight_product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_dense_module(self):
        """The equivalent plain torch layer: ``nn.Linear`` (HF ``Conv1D`` for a Conv1D source)."""
        lin = self._dense_linear()
        if not self.weight_transposed:
            return lin
        # only reachable for a model that has Conv1D layers
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D(self.out_features, self.in_features).to(device=lin.weight.device, dtype=lin.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(lin.weight.t())
            if lin.bias is not None:
                conv.bias.copy_(lin.bias)
            else:
                conv.bias = None
        return conv


class ConvLike:
    """Mixin for modules that replace a convolution: ``weight`` is the dense kernel
    ``[out, in / groups, *kernel_size]`` (metadata free, built on any other use)."""

    @property
    def weight(self) -> DenseWeightView:
        """The dense kernel (see :class:`DenseWeightView`)."""
        return DenseWeightView(self)

    def reference_tensor(self) -> torch.Tensor:
        return next(p for n, p in self.named_parameters() if n != "bias")

    def dense_weight_shape(self) -> tuple[int, ...]:
        return (int(self.out_channels), int(self.in_channels) // int(self.groups), *map(int, self.kernel_size))
