"""Pass infrastructure: the context every pass gets, the result it returns, the runner.

A pass is a plain function ``(module, ctx) -> PassResult`` named with a verb.
``module`` is a ``torch.fx.GraphModule`` when the model traced, else the model
itself (the module-tree fallback), and a pass must handle both or say it does
nothing without a graph.  The runner cleans up after a pass that changed a
graph (dead-code elimination, lint, recompile), names the failing pass and the
ones before it, and dumps the graph around the pass named in
``SPARSIFY_DUMP_GRAPH``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch.fx as fx
from torch import nn

__all__ = ["PassContext", "PassResult", "PassError", "Pass", "run_passes", "set_submodule", "tidy"]


class PassResult(NamedTuple):
    module: nn.Module
    modified: bool


@dataclass
class PassContext:
    """What passes share: the config (duck-typed), example inputs, the plan, capture facts."""

    config: Any
    example_inputs: tuple | None = None
    traced: bool = True
    capture_note: str | None = None
    planner: Callable[[nn.Module, PassContext], Any] | None = None
    plan: Any = None
    progress: Callable[[str], None] | None = None
    notes: list[str] = field(default_factory=list)
    #: ``site key -> (input shape, output shape)`` from the example inputs (see annotate_shapes).
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    #: The analysis graph (``capture.Capture``); None for callers that build a context by hand.
    capture: Any = None
    #: Keyword example inputs (Hugging Face style), beside the positional ``example_inputs``.
    example_kwargs: dict | None = None
    #: ``module qualname -> number of calls`` in the example run (module mode).
    calls: dict[str, int] = field(default_factory=dict)
    #: ``sparsify.calibration.CalibrationData`` from ``sparsify(calibration_data=...)``, or None.
    calibration: Any = None


Pass = Callable[[nn.Module, PassContext], PassResult]


class PassError(RuntimeError):
    """A pass failed; the message names it and the passes that ran before it."""


def tidy(gm: fx.GraphModule) -> None:
    """Dead-code elimination, unused-submodule removal, lint and recompile."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()


def set_submodule(root: nn.Module, qualname: str, new: nn.Module) -> None:
    """Replace the submodule at ``qualname`` (works for GraphModules and plain modules)."""
    parent_name, _, attr = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _dump(gm: nn.Module, when: str, name: str) -> None:
    print(f"----- sparsify: graph {when} pass {name!r} -----", file=sys.stderr)
    if isinstance(gm, fx.GraphModule):
        print(gm.graph, file=sys.stderr)
    else:
        print(f"(no graph: module-tree fallback)\n{gm}", file=sys.stderr)


def run_passes(module: nn.Module, ctx: PassContext, passes: Sequence[Pass]) -> nn.Module:
    """Run ``passes`` in order; see the module docstring."""
    dump = {n.strip() for n in os.environ.get("SPARSIFY_DUMP_GRAPH", "").split(",") if n.strip()}
    done: list[str] = []
    for p in passes:
        name = p.__name__
        if name in dump or "all" in dump:
            _dump(module, "before", name)
        try:
            module, modified = p(module, ctx)
            if modified and isinstance(module, fx.GraphModule):
                tidy(module)
        except (ValueError, TypeError) as exc:
            # Errors about the user's input keep their type, with the pass named.
            raise type(exc)(f"{exc} (in pass {name!r})") from exc
        except Exception as exc:
            before = ", ".join(done) or "none"
            raise PassError(f"pass {name!r} failed (passes before it: {before}): {type(exc).__name__}: {exc}") from exc
        if name in dump or "all" in dump:
            _dump(module, "after", name)
        done.append(name)
    return module
