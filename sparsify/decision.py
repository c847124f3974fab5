"""``Decision``: what the planner decided for one layer, and why.

The planner makes decisions; rewrite passes carry them out and record what
they produced in ``result``; the report is built from them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Decision", "Plan"]


@dataclass
class Decision:
    name: str                       # qualified name of the module (or of the weight, for F.linear)
    layer_type: str                 # "Linear", "Conv2d", "F.linear", ...
    weight_shape: tuple[int, ...]
    method: str                     # "dense" when left dense
    params: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    rule: str | None = None         # the rule that chose the method, if any
    node: str | None = None         # the fx node, for functional call sites
    input_shape: tuple[int, ...] | None = None
    params_before: int = 0
    params_after: int | None = None
    flops_before: int | None = None
    flops_after: int | None = None
    bytes_before: int = 0             # weight + bias bytes of the dense layer
    bytes_after: int | None = None    # of the rewritten layer: parameters and index buffers
    result: dict[str, Any] = field(default_factory=dict)
    site: bool = True                 # False: a weight no method takes, listed so nothing is silently absent

    @property
    def rewrites(self) -> bool:
        return self.method != "dense"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight_shape"] = list(self.weight_shape)
        d["input_shape"] = None if self.input_shape is None else list(self.input_shape)
        return d


@dataclass
class Plan:
    """Every decision for one model, with how it was captured."""

    decisions: list[Decision]
    traced: bool
    capture_note: str | None = None
    notes: list[str] = field(default_factory=list)

    def __iter__(self):
        return iter(self.decisions)

    def get(self, name: str) -> Decision | None:
        return next((d for d in self.decisions if d.name == name), None)
