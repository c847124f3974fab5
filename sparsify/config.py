"""``SparsifyConfig`` and ``Rule``: what to do with which layers.

A config has a default method with its parameters, and ordered rules.  The
first rule that matches a layer (by qualified-name glob and/or layer type)
decides its method and parameters; ``skip`` rules leave it dense.  Everything
is validated when the config is built, before any model is touched.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from typing import Any

from torch import nn

from .methods import METHODS, validate_param

__all__ = ["Rule", "SparsifyConfig", "DEFAULT_MIN_SIZE"]

#: A 128x128 Linear is still a candidate by default; smaller weights stay dense.
DEFAULT_MIN_SIZE = 128 * 128


def _check_method(method: str, where: str) -> None:
    if not isinstance(method, str):
        raise ValueError(f"{where}: invalid method={method!r}: expected a method name (a string).")
    if method not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise ValueError(f"{where}: unknown method {method!r}. Known methods: {known}.")


def _type_name(t: str | type) -> str:
    return t if isinstance(t, str) else t.__name__


# ------------------------------------------------------------------ validation
# The types of the config's own options and of a rule's fields, one entry each: adding an
# option is one line here (a method's parameters are validated by methods.PARAM_VALIDATORS).
def _is_flag(v: Any) -> bool:
    return isinstance(v, bool)  # never "false" / "no" / 0: a string or a number is refused, not read as truthy


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0  # 32.0 is refused, not truncated


def _is_nonneg(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= float(v) < float("inf")


def _is_positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 < float(v) < float("inf")


def _is_types(v: Any) -> bool:
    items = v if isinstance(v, (tuple, list)) else (v,)
    return v is None or (len(items) > 0 and all(
        (isinstance(t, str) and t.strip() != "") or isinstance(t, type) for t in items))


#: SparsifyConfig's own options: (check, what is expected).
CONFIG_FIELDS: dict[str, tuple[Any, str]] = {
    "min_size": (_is_count, "an integer >= 0 (weight elements)"),
    "strict": (_is_flag, "True or False"),
    "fold_batchnorm": (_is_flag, "True or False"),
    "fuse_epilogues": (_is_flag, "True or False"),
    # calibration (issue 10; see docs/accuracy.md)
    "calibration_damping": (_is_nonneg, "a number >= 0 (the ridge l = damping * mean(diag H) of every "
                                        "calibrated solve; 0.1 by default)"),
    "sequential": (_is_flag, "True or False (calibrate each layer on the inputs the converted layers before "
                             "it produce)"),
    "warn_above": (_is_positive, "a number > 0 (warn when a layer's or the model's relative output error on the "
                                 "calibration data is above it)"),
    "allocate": (lambda v: v is None or _is_flag(v), "None (model-wide with calibration data), True or False"),
    "block_selection": (lambda v: v in ("saliency", "obs"), "'saliency' or 'obs' (how block_sparse chooses "
                                                             "blocks with calibration data)"),
    "correct_bias": (_is_flag, "True or False (with calibration data, fit the weights to the inputs' centered "
                               "moment and move the mean into the bias)"),
    "sensitivity": (_is_flag, "True or False (with calibration data, weigh each layer's error in the allocation "
                              "by how much it moves the model's output)"),
    "dense_if_larger": (_is_flag, "True or False (leave a layer dense when its converted form has more "
                                  "parameters than the dense layer)"),
}
#: A Rule's own fields (its other keyword arguments are method parameters).
RULE_FIELDS: dict[str, tuple[Any, str]] = {
    "pattern": (lambda v: v is None or (isinstance(v, str) and v != ""), "a glob over qualified layer names"),
    "type": (_is_types, "a layer type name, a class, or a list of them"),
    "method": (lambda v: v is None or isinstance(v, str), "a method name"),
    "skip": (_is_flag, "True or False"),
}


def _check_field(table: dict[str, tuple[Any, str]], name: str, value: Any, where: str) -> None:
    check, expected = table[name]
    if not check(value):
        raise ValueError(f"{where}: invalid {name}={value!r}: expected {expected}.")


def check_param(name: str, value: Any, where: str) -> None:
    """A method parameter: finite if a number (no nan / inf anywhere), then its own validator."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: invalid {name}={value!r}: expected a finite number.")
    validate_param(name, value, where)


class Rule:
    """Match layers by qualified-name glob and/or type; set their method and parameters.

    Example:
        >>> r = Rule("encoder.*", type="Linear", density=0.1)
        >>> r.matches("encoder.fc1", "Linear"), r.matches("head", "Linear")
        (True, False)
    """

    def __init__(
        self,
        pattern: str | None = None,
        *,
        type: str | type | tuple[str | type, ...] | None = None,  # noqa: A002 - the user-facing name
        method: str | None = None,
        skip: bool = False,
        **params: Any,
    ) -> None:
        for field, value in (("pattern", pattern), ("type", type), ("method", method), ("skip", skip)):
            _check_field(RULE_FIELDS, field, value, "Rule")
        self.pattern = pattern
        types = tuple(type) if isinstance(type, (tuple, list)) else ((type,) if type is not None else ())
        self.types = tuple(_type_name(t) for t in types)
        self.method = method
        self.skip = bool(skip)
        self.params = dict(params)
        where = f"Rule({self.describe()})"
        if pattern is None and not self.types:
            raise ValueError(f"{where}: give a name pattern, a type=, or both.")
        if method is not None:
            _check_method(method, where)
        for k, v in self.params.items():
            check_param(k, v, where)
        if method is not None:
            extra = sorted(set(self.params) - set(METHODS[method].defaults))
            if extra:
                raise ValueError(
                    f"{where}: method {method!r} takes no option {extra[0]!r}. "
                    f"It takes: {', '.join(METHODS[method].defaults) or 'nothing'}."
                )
        if skip and (method or params):
            raise ValueError(f"{where}: a skip rule takes no method or parameters.")

    def describe(self) -> str:
        parts = []
        if self.pattern is not None:
            parts.append(repr(self.pattern))
        if self.types:
            parts.append(f"type={self.types[0]!r}" if len(self.types) == 1 else f"type={self.types!r}")
        if self.method:
            parts.append(f"method={self.method!r}")
        if self.skip:
            parts.append("skip=True")
        parts += [f"{k}={v!r}" for k, v in self.params.items()]
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"Rule({self.describe()})"

    def matches(self, name: str, layer_type: str | tuple[str, ...]) -> bool:
        """Whether the rule applies to a layer; ``layer_type`` may be several names
        (a Hugging Face ``Conv1D`` is also a ``"Linear"``)."""
        if self.pattern is not None and not fnmatch.fnmatchcase(name, self.pattern):
            return False
        types = (layer_type,) if isinstance(layer_type, str) else tuple(layer_type)
        if self.types and not set(types) & set(self.types):
            return False
        return True

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.pattern is not None:
            d["pattern"] = self.pattern
        if self.types:
            d["type"] = self.types[0] if len(self.types) == 1 else list(self.types)
        if self.method:
            d["method"] = self.method
        if self.skip:
            d["skip"] = True
        d.update(self.params)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rule:
        d = dict(d)
        t = d.pop("type", None)
        return cls(d.pop("pattern", None), type=tuple(t) if isinstance(t, list) else t, **d)


class SparsifyConfig:
    """The whole conversion: a default method, its parameters, and ordered rules.

    Keyword arguments of :func:`sparsify.sparsify` are shorthand for this.

    Example:
        >>> cfg = SparsifyConfig(method="block_sparse", density=0.1, block_size=16,
        ...                      rules=[Rule("head", skip=True)])
        >>> cfg.params_for("block_sparse")
        {'density': 0.1, 'block_size': 16}
    """

    def __init__(
        self,
        method: str = "block_sparse",
        *,
        rules: list[Rule] | tuple[Rule, ...] = (),
        min_size: int = DEFAULT_MIN_SIZE,
        strict: bool = False,
        fold_batchnorm: bool = True,
        fuse_epilogues: bool = True,
        calibration_damping: float = 0.1,
        sequential: bool = True,
        warn_above: float = 0.1,
        allocate: bool | None = None,
        dense_if_larger: bool = True,
        block_selection: str = "saliency",
        correct_bias: bool = True,
        sensitivity: bool = True,
        **params: Any,
    ) -> None:
        _check_method(method, "SparsifyConfig(method=...)")
        for field, value in (("min_size", min_size), ("strict", strict), ("fold_batchnorm", fold_batchnorm),
                             ("fuse_epilogues", fuse_epilogues), ("calibration_damping", calibration_damping),
                             ("sequential", sequential), ("warn_above", warn_above), ("allocate", allocate),
                             ("dense_if_larger", dense_if_larger), ("block_selection", block_selection),
                             ("correct_bias", correct_bias), ("sensitivity", sensitivity)):
            _check_field(CONFIG_FIELDS, field, value, "SparsifyConfig")
        self.method = method
        if not isinstance(rules, (list, tuple)):
            raise ValueError(f"SparsifyConfig: invalid rules={rules!r}: expected a list of Rule.")
        self.rules = list(rules)
        for i, r in enumerate(self.rules):
            if not isinstance(r, Rule):
                raise ValueError(f"SparsifyConfig(rules=...): rule {i} is a {type(r).__name__}, expected a Rule.")
        self.min_size = min_size
        self.strict = strict
        self.fold_batchnorm = fold_batchnorm
        self.fuse_epilogues = fuse_epilogues
        self.calibration_damping = float(calibration_damping)
        self.sequential = sequential
        self.warn_above = float(warn_above)
        self.allocate = allocate
        self.dense_if_larger = dense_if_larger
        self.block_selection = block_selection
        self.correct_bias = correct_bias
        self.sensitivity = sensitivity
        for k, v in params.items():
            check_param(k, v, "SparsifyConfig")
        self._check_shadowed()
        self.params = dict(params)
        # The default method must be usable without a rule supplying its parameters.
        self.params_for(method, where="SparsifyConfig")
        for r in self.rules:
            if r.method is not None:
                self.params_for(r.method, r.params, where=repr(r))
            elif r.params and not getattr(r, "skip", False):  # the rule's options go to the default method
                self.params_for(method, r.params, where=repr(r))
        unused = self.unused_params()
        if unused:
            msg = (f"SparsifyConfig: option {unused[0]}= is taken by no method this config uses "
                   f"({', '.join(sorted(self.methods_used()))}), so it changes nothing. Drop it, or choose a method "
                   "that takes it (method=, or a Rule).")
            if self.strict:
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)

    def methods_used(self) -> set[str]:
        """The default method and every rule's."""
        return {self.method} | {r.method for r in self.rules if r.method is not None}

    def unused_params(self) -> list[str]:
        """The model-wide options that no method of :meth:`methods_used` takes (they would change nothing)."""
        used = self.methods_used()
        return [k for k in self.params if not any(k in METHODS[m].defaults for m in used)]

    def _check_shadowed(self) -> None:
        """A rule that can match only layers an earlier rule already takes never applies: say so
        (an error under ``strict``, else a warning), instead of "matches no layer" later."""
        for j, later in enumerate(self.rules):
            for i, earlier in enumerate(self.rules[:j]):
                same_or_any_name = earlier.pattern in (None, "*", later.pattern)
                types_covered = not earlier.types or (later.types and set(later.types) <= set(earlier.types))
                if same_or_any_name and types_covered and (earlier.pattern is None or later.pattern is not None
                                                           or earlier.pattern == "*"):
                    msg = (f"SparsifyConfig: rule #{j + 1} {later!r} is shadowed by rule #{i + 1} {earlier!r}: "
                           "every layer it matches is matched first by that rule, so it never applies. "
                           "Remove it or move it before the other rule.")
                    if self.strict:
                        raise ValueError(msg)
                    warnings.warn(msg, stacklevel=3)
                    break

    def params_for(self, method: str, overrides: dict[str, Any] | None = None, *, where: str = "config") -> dict[str, Any]:
        """The parameters of ``method``: its defaults, then the config's, then ``overrides``."""
        spec = METHODS[method]
        out = dict(spec.defaults)
        for source in (self.params, overrides or {}):
            for k, v in source.items():
                if k in spec.defaults:
                    out[k] = v
        if overrides:
            extra = set(overrides) - set(spec.defaults)
            if extra:
                raise ValueError(
                    f"{where}: method {method!r} takes no option {sorted(extra)[0]!r}. "
                    f"It takes: {', '.join(spec.defaults) or 'nothing'}."
                )
        if spec.required_any and all(out.get(k) is None for k in spec.required_any):
            raise ValueError(
                f"{where}: method {method!r} needs one of {', '.join(spec.required_any)}="
                f" (e.g. {spec.required_any[0]}=0.25)."
            )
        if spec.resolve is not None:
            out = spec.resolve(out)
        return out

    def choose(self, name: str, layer_type: str | tuple[str, ...]) -> tuple[str, dict[str, Any], Rule | None]:
        """``(method, params, rule)`` for a layer: the first matching rule, else the default."""
        for r in self.rules:
            if r.matches(name, layer_type):
                if r.skip:
                    return "dense", {}, r
                method = r.method or self.method
                return method, self.params_for(method, r.params, where=repr(r)), r
        return self.method, self.params_for(self.method), None

    # ------------------------------------------------------------ (de)serialize
    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            **self.params,
            "min_size": self.min_size,
            "strict": self.strict,
            "fold_batchnorm": self.fold_batchnorm,
            "fuse_epilogues": self.fuse_epilogues,
            # calibration (issue 10)
            "calibration_damping": self.calibration_damping,
            "sequential": self.sequential,
            "warn_above": self.warn_above,
            **({} if self.allocate is None else {"allocate": self.allocate}),  # TOML has no None: the default
            "dense_if_larger": self.dense_if_larger,
            "block_selection": self.block_selection,
            "correct_bias": self.correct_bias,
            "sensitivity": self.sensitivity,
            "rules": [r.to_dict() for r in self.rules],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SparsifyConfig:
        d = dict(d)
        rules = [Rule.from_dict(r) for r in d.pop("rules", [])]
        return cls(rules=rules, **d)

    @classmethod
    def coerce(cls, config: SparsifyConfig | dict | None, shorthand: dict[str, Any]) -> SparsifyConfig:
        """The config that ``sparsify(model, config, **shorthand)`` means."""
        if config is None:
            return cls(**shorthand)
        if isinstance(config, dict):
            config = cls.from_dict(config)
        if not isinstance(config, SparsifyConfig):
            raise ValueError(f"sparsify(config=...): expected a SparsifyConfig or a dict. Got {type(config).__name__}.")
        if shorthand:
            merged = config.to_dict()
            merged.update(shorthand)
            return cls.from_dict(merged)
        return config

    def __repr__(self) -> str:
        args = [f"method={self.method!r}"] + [f"{k}={v!r}" for k, v in self.params.items()]
        if self.rules:
            args.append(f"rules={self.rules!r}")
        return f"SparsifyConfig({', '.join(args)})"


def layer_type_of(module: nn.Module) -> str:
    return type(module).__name__
