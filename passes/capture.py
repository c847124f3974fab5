"""Capture: what the passes rewrite, and the graph they read to decide.

The product of ``sparsify()`` is the user's own model (its class, attributes and
methods), with rewritten layers swapped into its module tree.  A graph is the
compiler's map of that model: where layers are called, which weights are used
functionally (``F.linear(x, self.w)``), what feeds what (BatchNorm folding,
epilogue fusion), and shapes.  It is obtained, in order of preference, by

1. ``torch.fx.symbolic_trace`` with a tracer that looks inside torch.nn
   containers (``nn.TransformerEncoderLayer`` ...) and keeps as leaves only the
   layers sparsify rewrites and torch.nn modules without children;
2. ``torch.export.export(..., strict=False)`` on the example inputs, where fx
   cannot trace (data-dependent Python, most Hugging Face models); the ATen graph
   names every parameter and the module each op ran in;
3. neither: the module tree alone (module layers only; functional uses of
   weights are not visible), with exactly one ``CaptureWarning`` naming why.

``graph=True`` asks for the old product instead: the fx ``GraphModule`` itself,
rewritten, which allows fusions that need graph surgery (a residual add into the
block-sparse op, functional activations) at the price of the user's class.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

__all__ = ["Capture", "CaptureWarning", "SiteTracer", "capture", "is_site_module", "hf_conv1d"]


class CaptureWarning(UserWarning):
    """sparsify could not build a graph of the model; it works from the module tree."""


def hf_conv1d(m: nn.Module) -> bool:
    """Whether ``m`` is Hugging Face's ``Conv1D`` (a Linear with a transposed ``[in, out]`` weight)."""
    t = type(m)
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers.")


def is_site_module(m: nn.Module) -> bool:
    """A layer sparsify rewrites (or has rewritten): a leaf of the analysis graph."""
    return (isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)) or hf_conv1d(m)
            or hasattr(m, "to_dense_module"))


class SiteTracer(fx.Tracer):
    """fx tracer that traces into torch.nn containers (``nn.TransformerEncoderLayer``,
    ``nn.Transformer``...) and keeps rewritable layers and childless modules as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_site_module(m):
            return True
        if isinstance(m, nn.Sequential):
            return False
        torch_nn = m.__module__.startswith("torch.nn") or m.__module__.startswith("torch.ao.nn")
        return torch_nn and next(iter(m.children()), None) is None


@dataclass
class Capture:
    """What ``capture`` found.

    ``module``: what the passes rewrite (the model, or the fx ``GraphModule`` with
    ``graph=True``).  ``graph``: an fx graph of the model whose ``call_module``
    targets are the model's qualified names (None if fx failed).  ``exported``:
    the ``torch.export`` program used where fx failed (None otherwise).
    """

    module: nn.Module
    graph: fx.GraphModule | None = None
    exported: object | None = None
    note: str | None = None
    graph_mode: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def traced(self) -> bool:
        """Whether any graph of the model exists (fx or export)."""
        return self.graph is not None or self.exported is not None

    @property
    def how(self) -> str:
        if self.graph is not None:
            return "torch.fx"
        if self.exported is not None:
            return "torch.export"
        return "module tree"

    def __iter__(self):  # ``gm, traced, note = capture(model)``: the older three-tuple
        return iter((self.module, self.traced, self.note))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


class _Leaves(nn.Module):
    """Export wrapper: the model's outputs as a flat list of tensors (export refuses
    output objects it cannot flatten, such as Hugging Face cache objects)."""

    def __init__(self, model: nn.Module, kwargs: dict) -> None:
        super().__init__()
        self.model = model
        self._kwargs = kwargs

    def forward(self, *args):
        out = self.model(*args, **self._kwargs)
        return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _export(model: nn.Module, inputs: tuple, kwargs: dict):
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        if hasattr(torch._dynamo, "config"):
            stack.enter_context(torch._dynamo.config.patch(verbose=False))
        return torch.export.export(_Leaves(model, kwargs), inputs, strict=False)


def capture(model: nn.Module, example_inputs: tuple | None = None, *, graph: bool = False,
            example_kwargs: dict | None = None, warn: bool = True) -> Capture:
    """Build the analysis graph of ``model`` (see the module docstring).

    Example:
        >>> import torch
        >>> c = capture(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
        >>> c.how, c.module.__class__.__name__
        ('torch.fx', 'Sequential')
    """
    reasons = []
    try:
        tracer = SiteTracer()
        g = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, g, type(model).__name__)
        gm.training = model.training  # GraphModule copies the hierarchy, not the mode flag
    except Exception as exc:  # any tracing failure means: try the next way
        gm = None
        reasons.append(f"torch.fx: {_first_line(exc)}")
    if graph:
        if gm is None:
            raise ValueError(f"sparsify(graph=True): torch.fx cannot trace {type(model).__name__} "
                             f"({reasons[0]}); graph=True returns the rewritten fx graph, so it needs a model "
                             "that traces. Drop graph=True to convert the model in place of its class.")
        return Capture(module=gm, graph=gm, graph_mode=True)
    if gm is not None:
        return Capture(module=model, graph=gm)
    exported = None
    if example_inputs is not None:
        try:
            exported = _export(model, tuple(example_inputs), dict(example_kwargs or {}))
        except Exception as exc:
            reasons.append(f"torch.export: {_first_line(exc)}")
    else:
        reasons.append("torch.export: not tried without example_inputs")
    note = "; ".join(reasons)
    if exported is not None:
        return Capture(module=model, exported=exported, note=f"analyzed with torch.export ({reasons[0]})")
    if warn:
        warnings.warn(
            f"sparsify: no graph of {type(model).__name__} ({note}). Rewriting the layers of its module "
            "tree; weights used functionally (F.linear on a parameter), BatchNorm folding and epilogue "
            "fusion need a graph: pass example_inputs= so torch.export can analyze the model.",
            CaptureWarning, stacklevel=3)
    return Capture(module=model, note=note)
