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
    if isinstance(v, bool) or not isinstance(v, int) or v not in SUPPORTED_BLOCK_SIZES:  # 32.0 is not an int
        raise ValueError(f"expected an integer, one of {SUPPORTED_BLOCK_SIZES}; got {v!r}")


def _rank(v: Any) -> None:
    if v is None or v in ("same", "vbmf"):
        return
    if isinstance(v, (tuple, list)):
        if not v or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in v):
            raise ValueError(f"expected per-mode ranks as ints >= 1; got {v!r}")
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


def _energy(v: Any) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
        raise ValueError(f"expected a fraction of the spectrum's energy in (0, 1]; got {v!r}. 0.9 keeps 90%")


def _compression(v: Any) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1.0 < float(v) < float("inf"):
        raise ValueError(f"expected a finite reduction factor > 1; got {v!r}. 4.0 keeps a quarter of the parameters")


def _flag(v: Any) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"expected True or False; got {v!r}")


def _calibration_data(v: Any) -> None:
    import torch

    if v is None or isinstance(v, torch.Tensor):
        return
    if isinstance(v, (tuple, list)) and v and all(isinstance(t, torch.Tensor) for t in v):
        return
    raise ValueError(f"expected a tensor or a tuple of tensors (the model's positional inputs); "
                     f"got {type(v).__name__}")


def _rank_multiple(v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"expected an int >= 1; got {v!r}. 8 rounds ranks for tensor cores")


def _forward(v: Any) -> None:
    if v not in ("auto", "factorized", "reconstructed"):
        raise ValueError(f"expected 'auto', 'factorized' or 'reconstructed'; got {v!r}")


def _layout(v: Any) -> None:
    from .patterns import PATTERNS

    if v not in PATTERNS:
        raise ValueError(f"expected one of {', '.join(map(repr, PATTERNS))}; got {v!r}. 'magnitude' keeps the "
                         "largest trained blocks; the others draw a pattern for training from scratch. (The option is "
                         "layout=; a rule's pattern= is the glob over layer names)")


def _init(v: Any) -> None:
    if v not in ("copy", "fresh"):
        raise ValueError(f"expected 'copy' (keep the trained weights' blocks) or 'fresh' (initialize for "
                         f"training from scratch); got {v!r}")


def _seed(v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"expected an int; got {v!r}. The same seed draws the same patterns")


#: Validators by parameter name; a method's parameters must all appear here.
PARAM_VALIDATORS: dict[str, Callable[[Any], None]] = {
    "density": _density,
    "block_size": _block_size,
    "rank": _rank,
    "tolerance": _fraction_open,
    # tensor factorizations (issue #3): see sparsify/ranks.py and docs/factorized.md
    "energy": _energy,
    "compression": _compression,
    "flops": _flag,
    "calibration_data": _calibration_data,
    "rank_multiple": _rank_multiple,
    "forward": _forward,
    # training from scratch (issue #12): see sparsify/patterns.py and docs/training.md
    "layout": _layout,
    "init": _init,
    "seed": _seed,
}


def validate_param(name: str, value: Any, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` and the option if ``value`` is invalid."""
    check = PARAM_VALIDATORS.get(name)
    if check is None:
        known = ", ".join(sorted(PARAM_VALIDATORS))
        hint = (" A block pattern to train from scratch is layout= ('small_world', ...); a rule's pattern is "
                "the glob over layer names.") if name == "pattern" else ""
        raise ValueError(f"{where}: unknown option {name!r}. Known options: {known}.{hint}")
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


def _resolve_block_sparse(params: dict[str, Any]) -> dict[str, Any]:
    """The options of training from scratch appear only when they differ from conversion's defaults,
    so a plain conversion's parameters (report, saved decisions) read as before."""
    out = dict(params)
    if out.get("layout") == "magnitude":
        out.pop("layout")
        out.pop("seed", None)  # only a drawn pattern uses the seed
    if out.get("init") == "copy":
        out.pop("init")
    return out


register_method(MethodSpec(
    name="block_sparse",
    defaults={"density": 0.25, "block_size": 32, "layout": "magnitude", "init": "copy", "seed": 0},
    layer_types=("Linear", "Conv1d", "Conv2d", "LSTM"),
    resolve=_resolve_block_sparse,
    description="keep the largest-norm blocks of the weight (layout='magnitude', init='copy'), or draw a "
                "random / small-world / scale-free block pattern (layout=..., seed=...) and initialize it "
                "for training from scratch (init='fresh'); Linear, Conv1d / Conv2d (channel blocks), nn.LSTM",
))
#: Parameters every factorization takes beyond ``rank`` / ``tolerance`` (issue #3).
_GLOBAL_DEFAULTS: dict[str, Any] = {
    "energy": None, "compression": None, "flops": False, "calibration_data": None, "rank_multiple": 1,
}
_RANK_SOURCES = ("rank", "tolerance", "energy", "compression")


def _resolve_factorization(method: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def resolve(params: dict[str, Any]) -> dict[str, Any]:
        if params.get("flops") and params.get("compression") is None:
            raise ValueError(f"method {method!r}: flops=True makes compression= a FLOP reduction target; "
                             "give compression= too (e.g. compression=2.0, flops=True)")
        if params.get("calibration_data") is not None and params.get("compression") is None:
            raise ValueError(f"method {method!r}: calibration_data= is used by the global allocation; "
                             "give compression= too, or drop calibration_data=")
        if method == "low_rank" and isinstance(params.get("rank"), (tuple, list)):
            raise ValueError("method 'low_rank' takes one rank, not per-mode ranks")
        if method == "low_rank" and params.get("rank") == "same":
            params = {**params, "rank": 1.0}
        if method != "tucker" and method != "low_rank" and params.get("rank") == "vbmf":
            raise ValueError(f"method {method!r}: rank='vbmf' is for 'tucker' and 'low_rank'")
        return params
    return resolve


register_method(MethodSpec(
    name="low_rank",
    defaults={"rank": None, "tolerance": None, **_GLOBAL_DEFAULTS},
    layer_types=("Linear",),
    description="truncated SVD into two thin Linear factors",
    required_any=_RANK_SOURCES,
    resolve=_resolve_factorization("low_rank"),
))
for _name, _types, _what in (
    ("cp", ("Linear", "Conv1d", "Conv2d"),
     "CP: Lebedev 1x1 / depthwise / 1x1 convs; CP of the tensorized weight for Linear"),
    ("tucker", ("Linear", "Conv1d", "Conv2d"),
     "Tucker: Tucker-2 (1x1, core, 1x1) for convs; Tucker of the tensorized weight for Linear"),
    ("tt", ("Linear", "Conv1d", "Conv2d"),
     "TT: Garipov 1x1 / k_h x 1 / 1 x k_w / 1x1 convs; TT-matrix (tensor train) of the tensorized weight for Linear"),
):
    register_method(MethodSpec(
        name=_name,
        defaults={"rank": None, "tolerance": None, **_GLOBAL_DEFAULTS, "forward": "auto"},
        layer_types=_types,
        description=_what,
        required_any=_RANK_SOURCES,
        resolve=_resolve_factorization(_name),
    ))
