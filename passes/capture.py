"""Capture: turn the model into something the passes can rewrite.

``torch.fx.symbolic_trace`` first.  If tracing fails (data-dependent control
flow, unsupported Python), the passes work on the module tree instead: leaf
modules are rewritten in place of the originals, and exactly one warning names
the reason.  Functional layers (``F.linear``) are only found in a graph.
"""

from __future__ import annotations

import warnings

import torch.fx as fx
from torch import nn

__all__ = ["capture", "CaptureWarning"]


class CaptureWarning(UserWarning):
    """torch.fx could not trace the model; sparsify fell back to the module tree."""


def capture(model: nn.Module) -> tuple[nn.Module, bool, str | None]:
    """``(graph module or the model itself, traced?, why not traced)``."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # any tracing failure means: use the module tree
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {first_line}"[:300]
        warnings.warn(
            f"sparsify: torch.fx could not trace {type(model).__name__} ({reason}). "
            "Rewriting leaf modules in the module tree instead; layers used functionally "
            "(F.linear) and BatchNorm folding need a traceable model.",
            CaptureWarning,
            stacklevel=3,
        )
        return model, False, reason
    # GraphModule copies the module hierarchy, not the root's mode flag.
    gm.training = model.training
    return gm, True, None
