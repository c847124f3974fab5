"""The registry of rewrite methods: what each accepts and which layers it can rewrite.

A method is named in a config (``method="block_sparse"``); its ``MethodSpec``
says which parameters it takes (with defaults), how to validate them, and which
layer kinds it applies to.  The planner reads this; the rewrite passes carry
out the decisions it produces.  New methods register here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .runtime import SUPPORTED_BLOCK_SIZES

__all__ = ["MethodSpec", "METHODS", "register_method", "validate_param", "PARAM_VALIDATORS"]


def _density(v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
        raise ValueError(f"expected a number in (0, 1]; got {v!r}. 0.25 keeps a quarter of the blocks")


def _block_size(v: Any) -> None:
    if isinstance(v, bool) or v not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"expected one of {SUPPORTED_BLOCK_SIZES}; got {v!r}")


def _rank(v: Any) -> None:
    if v is None:
        return
    if isinstance(v, bool):
        raise ValueError(f"expected an int >= 1 or a fraction in (0, 1]; got {v!r}")
    if isinstance(v, int):
        if v < 1:
            raise ValueError(f"expected an int >= 1 or a fraction in (0, 1]; got {v!r}")
        return
    if isinstance(v, float):
        if not 0.0 < v <= 1.0:
            raise ValueError(f"expected an int >= 1 or a fraction in (0, 1]; got {v!r}")
        return
    raise ValueError(f"expected an int >= 1 or a fraction in (0, 1]; got {v!r}")


def _fraction_open(v: Any) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) < 1.0:
        raise ValueError(f"expected a number in (0, 1); got {v!r}")


#: Validators by parameter name; a method's parameters must all appear here.
PARAM_VALIDATORS: dict[str, Callable[[Any], None]] = {
    "density": _density,
    "block_size": _block_size,
    "rank": _rank,
    "tolerance": _fraction_open,
}


def validate_param(name: str, value: Any, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` and the option if ``value`` is invalid."""
    check = PARAM_VALIDATORS.get(name)
    if check is None:
        known = ", ".join(sorted(PARAM_VALIDATORS))
        raise ValueError(f"{where}: unknown option {name!r}. Known options: {known}.")
    try:
        check(value)
    except ValueError as exc:
        raise ValueError(f"{where}: invalid {name}={value!r}: {exc}.") from None


@dataclass(frozen=True)
class MethodSpec:
    """What a method takes and what it rewrites.

    ``layer_types`` are the layer kinds (class names: ``"Linear"``, ``"Conv2d"``)
    it can rewrite; ``F.linear`` call sites count as ``"Linear"``.
    ``resolve(params) -> params`` may check parameter combinations.
    """

    name: str
    defaults: dict[str, Any]
    layer_types: tuple[str, ...]
    description: str
    resolve: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    required_any: tuple[str, ...] = field(default=())


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> None:
    for p in spec.defaults:
        if p not in PARAM_VALIDATORS:
            raise ValueError(f"method {spec.name!r}: parameter {p!r} has no validator in PARAM_VALIDATORS")
    METHODS[spec.name] = spec


register_method(MethodSpec(
    name="block_sparse",
    defaults={"density": 0.25, "block_size": 32},
    layer_types=("Linear",),
    description="keep the largest-norm blocks of the weight",
))
register_method(MethodSpec(
    name="low_rank",
    defaults={"rank": None, "tolerance": None},
    layer_types=("Linear",),
    description="truncated SVD into two thin Linear factors",
    required_any=("rank", "tolerance"),
))
