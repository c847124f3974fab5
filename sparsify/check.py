"""Checking a converted model before ``sparsify()`` returns it.

With example inputs, the converted model runs once and is compared with its
dense reference (``densify``: every rewritten layer replaced by the dense layer
it represents).  A crash names the module that raised; a mismatch names the
first rewritten layer whose output differs from its dense reference on the
inputs it received, or, if every layer matches, says that the difference comes
from how the model uses them.  Both run in eval mode (dropout off, BatchNorm on
its running statistics, nothing updated), and every module's mode is restored.

The tolerance is a relative one per output tensor, by dtype: float64 1e-9,
float32 1e-4, float16 / bfloat16 5e-2.  A rewritten layer computes the same
sums as its dense reference in another order (blocks, factors), so each output
carries a few ulps of rounding per layer (float32: eps 1.2e-7) and a deep model
a few hundred of them at most; an error in a rewrite is of the order of the
output itself.  The bounds sit between the two.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import ConversionCheckError

__all__ = ["check_converted", "TOLERANCE", "relative_error", "standard_attention"]

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|`` in float64 (0 for two empty tensors); inf where only one is finite.

    Example:
        >>> relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))
        0.2
    """
    a64, b64 = a.detach().double(), b.detach().double()
    if a64.numel() == 0:
        return 0.0
    fa, fb = torch.isfinite(a64), torch.isfinite(b64)
    if not torch.equal(fa, fb) or not torch.equal(a64[~fa], b64[~fb]):
        return float("inf")
    scale = b64[fb].abs().max().clamp_min(1e-30) if fb.any() else torch.tensor(1.0, dtype=torch.float64)
    return float((a64[fa] - b64[fb]).abs().max() / scale) if fa.any() else 0.0


@contextlib.contextmanager
def standard_attention():
    """PyTorch's attention fast path off (``torch.backends.mha.set_fastpath_enabled(False)``), restored after.

    In eval mode without gradients, ``nn.MultiheadAttention`` and ``nn.TransformerEncoder(Layer)`` may take a
    fused path that reads the dense weights directly and, given a padding mask, packs the batch as a nested
    tensor and returns zeros at the padded positions, where the standard path (the one training runs)
    returns values.  A converted model always takes the standard path (its rewritten layers are not plain
    weights), so wherever sparsify runs a model to compare it with its converted form, or to collect what
    the conversion fits (shapes, calibration statistics, distillation targets), both run the standard path:
    the same arithmetic on every position, padded ones included.

    Example:
        >>> with standard_attention():
        ...     torch.backends.mha.get_fastpath_enabled()
        False
    """
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    was = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(was)


@contextlib.contextmanager
def _eval(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, t in modes:
            m.training = t


def _tensors(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _rewritten(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules()
            if n and hasattr(m, "to_dense_module") and hasattr(m, "to_dense")}


def _run_naming_the_module(model: nn.Module, args: tuple, kwargs: dict, what: str):
    stack: list[str] = []
    handles = []
    names = {id(m): n or type(model).__name__ for n, m in model.named_modules()}

    def enter(mod, a):
        stack.append(names[id(mod)])

    def leave(mod, a, o):  # a forward hook must return None, or it replaces the output
        if stack:
            stack.pop()

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    try:
        return model(*args, **kwargs)
    except Exception as exc:
        where = stack[-1] if stack else type(model).__name__
        raise ConversionCheckError(
            f"sparsify: the {what} model crashed on the example inputs in module {where!r} "
            f"({type(exc).__name__}: {str(exc).strip()[:300]}). Nothing was returned; report this with the "
            "model, or leave that layer dense with Rule(...skip=True)."
        ) from exc
    finally:
        for h in handles:
            h.remove()


def check_converted(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Run ``model`` on the example inputs and compare it with ``densify(model)``; raise
    :class:`~sparsify.errors.ConversionCheckError` naming the layer on a crash or mismatch."""
    from .api import densify

    layers = _rewritten(model)
    if not layers:
        return
    seen: dict[str, tuple] = {}

    def grab(mod, a, o, n):
        seen.setdefault(n, (a, o))

    handles = [m.register_forward_hook(lambda mod, a, o, n=n: grab(mod, a, o, n)) for n, m in layers.items()]
    with torch.no_grad(), _eval(model), standard_attention():
        try:
            out = _run_naming_the_module(model, args, kwargs, "converted")
        finally:
            for h in handles:
                h.remove()
        reference = densify(model)
        ref = _run_naming_the_module(reference, args, kwargs, "dense reference of the converted")
        got, want = _tensors(out), _tensors(ref)
        if len(got) != len(want):
            raise ConversionCheckError(
                f"sparsify: the converted model returned {len(got)} tensors, its dense reference {len(want)}.")
        worst = 0.0
        for a, b in zip(got, want):
            tol = TOLERANCE.get(b.dtype, 1e-4)
            err = relative_error(a, b)
            worst = max(worst, err)
            if err <= tol:
                continue
            culprit = _first_bad_layer(layers, seen)
            where = (f"layer {culprit[0]!r} ({type(layers[culprit[0]]).__name__}) differs from its dense "
                     f"reference by {culprit[1]:.3g} (relative) on the inputs it received" if culprit else
                     "every rewritten layer matches its dense reference on the inputs it received, so the "
                     "difference comes from how the model uses them (a model reading a rewritten layer's "
                     "weight in a way sparsify does not support)")
            raise ConversionCheckError(
                f"sparsify: the converted model's output differs from its dense reference by {err:.3g} "
                f"(relative; {b.dtype} tolerance {tol:g}): {where}. Nothing was returned; leave that layer "
                "dense with Rule('<name>', skip=True), or report it.")


def _first_bad_layer(layers: dict[str, nn.Module], seen: dict[str, tuple]) -> tuple[str, float] | None:
    for name, (a, o) in seen.items():
        layer = layers[name]
        if not (a and isinstance(a[0], torch.Tensor) and isinstance(o, torch.Tensor)):
            continue
        dense = layer.to_dense_module()
        ref = dense(*a)
        err = relative_error(o, ref)
        if err > TOLERANCE.get(o.dtype, 1e-4):
            return name, err
    return None
