"""Calibration: what the model's own inputs say about each layer, and what that buys.

``calibration_data`` (``sparsify(..., calibration_data=...)``, ``finetune(data=...)``) is an
iterable of batches.  A batch is a tuple of the model's positional inputs, a dict of its
keyword inputs (a Hugging Face tokenizer's output is one), or a single tensor; a single
dict or tensor given instead of an iterable is one batch.

For every layer a method rewrites, this module collects the second moment of the layer's
inputs, ``H = sum_x x x^T`` (``x`` a token's input row, or an im2col patch of a conv),
their sum ``s`` and count ``n``.  They are accumulated in float64, call by call and batch
by batch, so the activations are never all in memory: a layer costs ``d^2`` doubles
(``d`` its input width; per group ``(in/g * prod(k))^2`` for a conv).  On them rest:

* the relative output error of a converted layer on the calibration inputs, exactly and
  without another forward pass: with ``D = W - W'``,
  ``||X D^T||^2 = tr(D H D^T)`` and ``||X W^T + b||^2 = tr(W H W^T) + 2 b.(W s) + n ||b||^2``;
* block selection by saliency and the least-squares refit of the kept blocks
  (:func:`select_blocks`, :func:`refit_blocks`);
* the whitened truncated SVD (:func:`whitened_svd`, SVD-LLM);
* a refit of a factorization's factors against the layer's outputs (:func:`refit_factors`).

**How the inputs are seen.**  One ``TorchFunctionMode`` watches the calls a layer's weight
goes through: ``F.linear``, ``matmul`` / ``mm`` / ``@``, ``addmm`` (HF ``Conv1D``),
``conv1d`` / ``conv2d``, and ``F.multi_head_attention_forward``.  A call belongs to a layer
when its weight argument IS the layer's parameter (or a row slice or transpose of it), so
the same mechanism serves ``nn.Linear``, HF ``Conv1D``, convolutions, parameters used
functionally by the model's own code (``F.linear(x, self.w)``, ``x @ self.w.T``), and the
projections of ``nn.MultiheadAttention``: ``q`` / ``k`` / ``v`` see ``query`` / ``key`` /
``value``, and ``out_proj`` sees the attention output before the projection (computed by
running the attention once more with an identity ``out_proj``).  A converted layer's weight is
a different tensor, so it is no longer watched.

**Damping.**  Every solve uses ``H_l = H + l I`` with ``l = damping * mean(diag H)``
(``calibration_damping=``, default 0.1).  Refitting with ``H_l`` minimizes
``||X (W' - W)^T||^2 + l ||W' - W||^2``: a ridge that pulls the new weights towards the
original ones in the directions the calibration data leaves unexplored (not towards zero),
so identity statistics reproduce the weight-only results exactly.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .errors import InputError

__all__ = [
    "CalibrationData",
    "CalibrationWarning",
    "InputStats",
    "as_batches",
    "centered",
    "collect_stats",
    "corrected_bias",
    "output_variation",
    "damped",
    "model_error",
    "output_error",
    "probe",
    "read_batches",
    "refit_blocks",
    "refit_factors",
    "save_batches",
    "select_blocks",
    "sensitivity",
    "weight_groups",
    "whitened_svd",
]

#: Default relative ridge of every solve (see the module docstring).
DEFAULT_DAMPING = 0.1
_ROWS_PER_CHUNK = 16384          # rows turned to float64 at a time
_UNFOLD_ELEMENTS = 1 << 26       # im2col elements built at a time (256 MiB of float32)


class CalibrationWarning(UserWarning):
    """A converted layer, or the converted model, is far from the original on the calibration
    data (relative output error above ``warn_above``)."""


# ------------------------------------------------------------------------------ batches
def _batch(item: Any, i: int, where: str, check_nan: bool = True) -> tuple[tuple, dict]:
    if isinstance(item, torch.Tensor):
        out: tuple[tuple, dict] = (item,), {}
    elif isinstance(item, Mapping):
        if not all(isinstance(k, str) for k in item):
            raise ValueError(f"{where}: batch {i} is a dict whose keys are not all strings; a dict batch holds "
                             "the model's keyword inputs by name.")
        out = (), dict(item)
    elif isinstance(item, (tuple, list)):
        if not item:
            raise ValueError(f"{where}: batch {i} is empty; a batch is a tuple of the model's positional inputs.")
        out = tuple(item), {}
    else:
        raise ValueError(f"{where}: batch {i} is a {type(item).__name__}; expected a tensor, a tuple of the "
                         "model's positional inputs, or a dict of its keyword inputs.")
    # NaN is never an input (an additive mask may hold -inf, so infinities are left to the statistics' check)
    named = [(str(k), v) for k, v in enumerate(out[0])] + list(out[1].items()) if check_nan else []
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and bool(torch.isnan(t).any()):
            raise ValueError(f"{where}: batch {i}, input {name!r} holds NaN; calibration data must be numbers. "
                             "Fix or drop that batch.")
    return out


def _to(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, obj)


class CalibrationData:
    """Batches of model inputs, re-iterable, each as ``(args, kwargs)``.

    A list (or any container) is iterated again for every pass; a one-shot iterator (a
    generator) is read once into a list of its batches (inputs, never activations).

    Example:
        >>> data = as_batches([torch.randn(4, 8), (torch.randn(2, 8),), {"x": torch.randn(3, 8)}])
        >>> [(len(a), sorted(k)) for a, k in data], len(data)
        ([(1, []), (1, []), (0, ['x'])], 3)
    """

    def __init__(self, source: Iterable, where: str) -> None:
        self.where = where
        self._source = source

    def __iter__(self) -> Iterator[tuple[tuple, dict]]:
        return self.batches()

    def batches(self, device: torch.device | None = None) -> Iterator[tuple[tuple, dict]]:
        for i, item in enumerate(self._source):
            # a list was checked whole by as_batches: only a lazy source's batches are scanned as read
            args, kwargs = _batch(item, i, self.where, check_nan=not isinstance(self._source, (list, tuple)))
            yield _to(args, device), _to(kwargs, device)

    def first(self, device: torch.device | None = None) -> tuple[tuple, dict]:
        return next(self.batches(device))

    def __len__(self) -> int:
        return len(self._source)  # type: ignore[arg-type]

    def describe(self) -> str:
        """What the data was (for the report; the data itself is not kept in a decision)."""
        try:
            n = len(self._source)  # type: ignore[arg-type]
        except TypeError:
            n = None
        args, kwargs = next(self.batches())
        shapes = [tuple(t.shape) for t in args if isinstance(t, torch.Tensor)]
        shapes += [f"{k}={tuple(v.shape)}" for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        count = f"{n} batch{'es' if n != 1 else ''}" if n is not None else "batches"
        return f"{count} (inputs of shapes {', '.join(map(str, shapes))} in the first)"


#: The most batches read from a one-shot iterator (a generator): calibration sets are hundreds.
MAX_ITERATOR_BATCHES = 10_000


def as_batches(data: Any, where: str = "calibration_data") -> CalibrationData:
    """Check ``data`` (see the module docstring) and return it as :class:`CalibrationData`.

    Every batch of a list is checked here, before any work; a batch of a lazy iterable
    (a ``DataLoader``) when it is read.

    Example:
        >>> len(as_batches(torch.randn(2, 8)))   # one tensor: one batch
        1
        >>> as_batches([])
        Traceback (most recent call last):
        ...
        ValueError: calibration_data: no batches; give an iterable of batches (a list of tensors, of tuples of the model's positional inputs, or of dicts of its keyword inputs).
    """
    if isinstance(data, CalibrationData):
        return data
    if data is None or isinstance(data, (str, bytes)):
        raise ValueError(f"{where}: expected an iterable of batches; got {type(data).__name__}.")
    if isinstance(data, (torch.Tensor, Mapping)):
        data = [data]
    elif isinstance(data, tuple) and data and all(isinstance(t, torch.Tensor) for t in data):
        data = list(data)  # a tuple of tensors: one tensor per batch (say so in the docs)
    elif not isinstance(data, Iterable):
        raise ValueError(f"{where}: expected an iterable of batches; got {type(data).__name__}.")
    elif iter(data) is data:  # a generator / iterator: read it once (an endless one is refused, not waited on)
        data = list(itertools.islice(data, MAX_ITERATOR_BATCHES + 1))
        if len(data) > MAX_ITERATOR_BATCHES:
            raise ValueError(f"{where}: the iterator gave more than {MAX_ITERATOR_BATCHES} batches (an endless "
                             "generator?); calibration reads all of it. Give a list, or a slice: "
                             "itertools.islice(data, N).")
    try:
        n = len(data)
    except TypeError:
        n = None
    if n == 0:
        raise ValueError(f"{where}: no batches; give an iterable of batches (a list of tensors, of tuples of the "
                         "model's positional inputs, or of dicts of its keyword inputs).")
    if isinstance(data, (list, tuple)):
        for i, item in enumerate(data):
            _batch(item, i, where)
    return CalibrationData(data, where)


# --------------------------------------------------------------------------- batch files
#: A calibration file: safetensors whose tensors are named ``<batch>.<input>``: ``0.input_ids``,
#: ``0.attention_mask``, ``1.input_ids``... (keyword inputs) or ``0.0``, ``0.1``... (positional).
BATCH_FILE_MAX_BYTES = 2 << 30
BATCH_FILE_MAX_TENSORS = 100_000
_BATCH_KEY = r"(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,3}|[A-Za-z_][A-Za-z0-9_]{0,127})"
_FILE_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def read_batches(path: str | os.PathLike) -> CalibrationData:
    """Read calibration batches from a safetensors file (``sparsify convert --calibration FILE``).

    Tensor names are ``<batch>.<input>``: batch numbers ``0, 1, ...`` without gaps; inputs either
    all positional (``0``, ``1``, ... without gaps) or all keyword names (Python identifiers, passed
    to the model's forward as keyword arguments).  Nothing in the file becomes code: safetensors has
    no code path (no pickle), the header is parsed and checked here first (dtypes, shapes of at most
    16 dimensions and 2**28 elements, offsets inside the file), names must match the pattern above,
    and the file must be a regular file (no symlink, device or FIFO) of at most 2 GiB.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "calib.safetensors")
        >>> save_batches(p, [{"input_ids": torch.ones(2, 5, dtype=torch.long)}])
        >>> [sorted(k) for _, k in read_batches(p)]
        [['input_ids']]
    """
    import re

    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    from . import files

    where = os.fspath(path)
    if not os.path.lexists(where):
        raise InputError(f"{where}: no such file (a calibration file: safetensors with '<batch>.<input>' tensors).")
    folder, name = os.path.split(os.path.abspath(where))
    data = files.read_regular(folder, name, max_bytes=BATCH_FILE_MAX_BYTES, what="calibration file")
    if len(data) < 8:
        raise InputError(f"{where}: not a safetensors file (too short). Write one with "
                         "sparsify.calibration.save_batches(path, batches).")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8 or n > 100_000_000:
        raise InputError(f"{where}: not a safetensors file (header length {n}).")
    header = files.parse_json(data[8:8 + n], f"{where} (header)", max_depth=4)
    if not isinstance(header, dict):
        raise InputError(f"{where}: not a safetensors file (the header is not an object).")
    header.pop("__metadata__", None)
    if not header:
        raise InputError(f"{where}: holds no tensors; a calibration file holds at least one batch.")
    if len(header) > BATCH_FILE_MAX_TENSORS:
        raise InputError(f"{where}: {len(header)} tensors, more than {BATCH_FILE_MAX_TENSORS}.")
    body = len(data) - 8 - n
    layout: dict[int, dict[str, str]] = {}
    pattern = re.compile(_BATCH_KEY)
    for key, h in header.items():
        m = pattern.fullmatch(key) if isinstance(key, str) else None
        if m is None:
            raise InputError(f"{where}: tensor name {str(key)[:80]!r} is not '<batch>.<input>' (e.g. '0.input_ids' "
                             "or '0.0' for the first positional input of batch 0).")
        shape = h.get("shape") if isinstance(h, dict) else None
        dtype = h.get("dtype") if isinstance(h, dict) else None
        off = h.get("data_offsets") if isinstance(h, dict) else None
        if dtype not in _FILE_DTYPES:
            raise InputError(f"{where}: tensor {key!r} has dtype {str(dtype)[:20]!r}; expected one of "
                             f"{', '.join(_FILE_DTYPES)}.")
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in shape)
                or math.prod(shape) > 1 << 28):
            raise InputError(f"{where}: tensor {key!r} has shape {str(shape)[:80]}; expected at most 16 dimensions "
                             "and 2**28 elements.")
        if (not isinstance(off, list) or len(off) != 2 or not all(isinstance(o, int) and not isinstance(o, bool)
                                                                   for o in off)
                or not 0 <= off[0] <= off[1] <= body or off[1] - off[0] != math.prod(shape) * _FILE_DTYPES[dtype]):
            raise InputError(f"{where}: tensor {key!r} has invalid data offsets; the file is corrupted.")
        layout.setdefault(int(m.group(1)), {})[m.group(2)] = key
    if sorted(layout) != list(range(len(layout))):
        raise InputError(f"{where}: batches must be numbered 0, 1, ... without gaps; found "
                         f"{sorted(layout)[:10]}.")
    for b, names in layout.items():
        positional = [k for k in names if k.isdigit()]
        if positional and len(positional) != len(names):
            raise InputError(f"{where}: batch {b} mixes positional ('{b}.0') and keyword inputs; use one kind.")
        if positional and sorted(int(k) for k in positional) != list(range(len(positional))):
            raise InputError(f"{where}: batch {b}'s positional inputs must be numbered 0, 1, ... without gaps.")
    try:
        tensors = st_load(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{where}: not a readable safetensors file ({exc}).") from None
    del data
    batches: list = []
    for b in range(len(layout)):
        names = layout[b]
        if all(k.isdigit() for k in names):
            batches.append(tuple(tensors[names[str(i)]] for i in range(len(names))))
        else:
            batches.append({k: tensors[v] for k, v in names.items()})
    return as_batches(batches, f"calibration file {where}")


def save_batches(path: str | os.PathLike, batches: Any) -> None:
    """Write calibration batches (as ``calibration_data=`` takes them) to a new safetensors file that
    :func:`read_batches` reads; an existing file is never replaced.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "c.safetensors")
        >>> save_batches(p, [torch.randn(4, 8), torch.randn(2, 8)])
        >>> [tuple(a[0].shape) for a, _ in read_batches(p)]
        [(4, 8), (2, 8)]
    """
    from pathlib import Path

    from safetensors.torch import save as st_save

    from . import files

    data = as_batches(batches, "save_batches(batches=...)")
    out: dict[str, torch.Tensor] = {}
    for i, (args, kwargs) in enumerate(data):
        if args and kwargs:
            raise ValueError(f"save_batches: batch {i} has both positional and keyword inputs; a file holds one kind.")
        items = kwargs.items() if kwargs else ((str(j), a) for j, a in enumerate(args))
        for k, v in items:
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"save_batches: batch {i} input {k!r} is a {type(v).__name__}; a file holds tensors.")
            out[f"{i}.{k}"] = v.detach().cpu().contiguous()
    files.write_new(Path(path), st_save(out))


# ---------------------------------------------------------------------------- statistics
@dataclass
class InputStats:
    """Second moment, sum and count of a layer's inputs, per group (a Linear has one).

    ``h [G, d, d]``, ``s [G, d]`` in float64; ``n`` rows (tokens, or conv patches) per
    group; ``calls`` how many calls contributed.

    Example:
        >>> st = InputStats.empty(1, 3)
        >>> st.add(torch.ones(4, 3)); st.n, float(st.h[0, 0, 0])
        (4, 4.0)
    """

    h: torch.Tensor
    s: torch.Tensor
    n: int = 0
    calls: int = 0

    @classmethod
    def empty(cls, groups: int, d: int, device: torch.device | str | None = None) -> InputStats:
        return cls(torch.zeros(groups, d, d, dtype=torch.float64, device=device),
                   torch.zeros(groups, d, dtype=torch.float64, device=device))

    def add(self, rows: torch.Tensor, group: int = 0) -> None:
        """Accumulate rows ``[m, d]`` (any float dtype) into group ``group``."""
        for chunk in rows.detach().split(_ROWS_PER_CHUNK):
            c = chunk.to(torch.float64)
            self.h[group].addmm_(c.T, c)
            self.s[group] += c.sum(0)
        if group == 0:
            self.n += rows.shape[0]

    @property
    def groups(self) -> int:
        return self.h.shape[0]

    @property
    def nbytes(self) -> int:
        return self.h.numel() * 8


def weight_groups(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """A Linear weight ``[out, in]`` or conv kernel ``[out, in/g, k..]`` as ``[G, out/g, d]`` in float64
    (``d = in/g * prod(k)``, in the order of ``F.unfold``'s patches).

    Example:
        >>> tuple(weight_groups(torch.zeros(8, 2, 3, 3), groups=2).shape)
        (2, 4, 18)
    """
    w = weight.detach().to(torch.float64)
    return w.reshape(groups, w.shape[0] // groups, -1)


def damped(h: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H + l I, l)`` per group, ``l = damping * mean(diag H)`` (``damping`` itself where the
    diagonal is all zero: a layer whose inputs were all zero).

    Example:
        >>> hd, lam = damped(torch.eye(2, dtype=torch.float64)[None] * 4, 0.5)
        >>> hd[0].diagonal().tolist(), lam.tolist()
        ([6.0, 6.0], [2.0])
    """
    mean = h.diagonal(dim1=-2, dim2=-1).mean(-1)
    lam = damping * torch.where(mean > 0, mean, torch.ones_like(mean))
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    return h + lam[:, None, None] * eye, lam


def _cholesky(h: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of a (batch of) symmetric PSD matrices; a matrix that is singular in
    floating point gets the smallest jitter (relative 1e-12, x100 per try) that makes it PD."""
    L, info = torch.linalg.cholesky_ex(h)
    if not bool((info > 0).any()):
        return L
    scale = h.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1e-300)
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    for e in (1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
        L, info = torch.linalg.cholesky_ex(h + (e * scale)[..., None, None] * eye)
        if not bool((info > 0).any()):
            return L
    raise RuntimeError("calibration: the inputs' second moment is not positive definite even with jitter; "
                       "raise calibration_damping=")


def output_sq_norm(w: torch.Tensor, bias: torch.Tensor | None, st: InputStats) -> float:
    """``||X W^T + b||^2`` summed over the calibration inputs, from the statistics (``w`` as
    :func:`weight_groups`)."""
    w = w.to(torch.float64)
    y2 = float(torch.einsum("god,gde,goe->", w, st.h, w))
    if bias is not None:
        b = bias.detach().to(torch.float64).reshape(w.shape[0], w.shape[1])
        y2 += 2.0 * float(torch.einsum("go,god,gd->", b, w, st.s)) + st.n * float(b.pow(2).sum())
    return max(y2, 0.0)


def output_error(w: torch.Tensor, w_new: torch.Tensor, bias: torch.Tensor | None, st: InputStats,
                 bias_new: torch.Tensor | None = None) -> float:
    """Relative output error ``||(X W'^T + b') - (X W^T + b)|| / ||X W^T + b||`` on the calibration
    inputs, exactly, from the statistics (``w``, ``w_new`` as :func:`weight_groups`; ``bias_new``
    the converted layer's bias when it differs from ``bias``).

    Example:
        >>> st = InputStats.empty(1, 2); st.add(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        >>> output_error(torch.ones(1, 1, 2), torch.tensor([[[1.0, 0.0]]]), None, st)
        0.7071067811865476
    """
    w, w_new = w.to(torch.float64), w_new.to(torch.float64)
    d = w - w_new
    e2 = float(torch.einsum("god,gde,goe->", d, st.h, d))
    if bias_new is not None:
        # the output difference is X D^T - delta with delta = b' - b
        delta = (bias_new.detach().to(torch.float64) - (0 if bias is None else bias.detach().to(torch.float64)))
        delta = delta.reshape(d.shape[0], d.shape[1])
        e2 += -2.0 * float(torch.einsum("go,god,gd->", delta, d, st.s)) + st.n * float(delta.pow(2).sum())
    y2 = output_sq_norm(w, bias, st)
    return math.sqrt(max(e2, 0.0) / y2) if y2 > 0 else (0.0 if e2 <= 0 else float("inf"))


def output_variation(w: torch.Tensor, st: InputStats) -> float:
    """``||X W^T - mean||^2``: the energy of the layer's output about its mean on the calibration
    inputs, ``tr(W C W^T)`` (``C`` the centered moment).  The allocation compares layers by the
    fraction of this they lose: a layer whose output is mostly its constant mean (a large bias, or
    inputs with a large mean) would look cheap to compress by ``||Y||`` and be starved.

    Example:
        >>> st = InputStats.empty(1, 1); st.add(torch.tensor([[1.0], [3.0]]))
        >>> output_variation(torch.ones(1, 1, 1), st)
        2.0
    """
    w = w.to(torch.float64)
    return max(float(torch.einsum("god,gde,goe->", w, centered(st), w)), 0.0)


def centered(st: InputStats) -> torch.Tensor:
    """The inputs' moment about their mean, ``C = H - s s^T / n`` per group: what a weight must fit
    when the bias absorbs the mean (see :func:`corrected_bias`)."""
    if st.n == 0:
        return st.h
    c = st.h - torch.einsum("gd,ge->gde", st.s, st.s) / st.n
    return (c + c.transpose(1, 2)) / 2


def corrected_bias(w: torch.Tensor, w_new: torch.Tensor, bias: torch.Tensor, st: InputStats) -> torch.Tensor:
    """``b' = b + (W - W') mu`` (``mu = s / n``, per group): the bias that keeps the mean output on
    the calibration inputs.  With ``W'`` fitted to the centered moment (:func:`centered`), ``(W', b')``
    is the least-squares optimum of the output error over the new weights and the bias together.

    Example:
        >>> st = InputStats.empty(1, 2); st.add(torch.tensor([[1.0, 3.0], [3.0, 1.0]]))
        >>> corrected_bias(torch.ones(1, 1, 2), torch.zeros(1, 1, 2), torch.zeros(1), st).tolist()
        [4.0]
    """
    mu = st.s / max(st.n, 1)
    d = w.to(torch.float64) - w_new.to(torch.float64)
    out = torch.einsum("god,gd->go", d, mu).reshape(-1)
    return (bias.detach().to(torch.float64) + out).to(bias.dtype)


# ----------------------------------------------------------------------------- the watcher
_LINEAR_FUNCS = (F.linear,)
_MM_FUNCS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm)
_ADDMM_FUNCS = (torch.addmm, torch.Tensor.addmm)
_CONV_FUNCS = {torch.conv1d: 1, torch.conv2d: 2}
_MHA = F.multi_head_attention_forward
_MHA_PARAMS = None


def _mha_signature():
    global _MHA_PARAMS
    if _MHA_PARAMS is None:
        import inspect

        _MHA_PARAMS = inspect.signature(_MHA)
    return _MHA_PARAMS


class _StopForward(BaseException):
    """Raised to end a forward pass once every watched layer has seen its inputs
    (a BaseException, so model code's ``except Exception`` does not swallow it)."""


@dataclass
class Watch:
    """One layer to watch: its key, its parameter, the rows of it that are this layer
    (a projection of a packed ``in_proj_weight``), and conv geometry."""

    key: Any
    param: torch.Tensor
    rows: tuple[int, int] | None = None
    groups: int = 1
    d: int = 0                      # input width (per group: in/g * prod(k) for a conv)
    stats: InputStats | None = None
    calls: int = 0
    batch_calls: int = 0

    def __post_init__(self) -> None:
        if not self.d:
            p = self.param
            self.d = math.prod(p.shape[1:]) if p.dim() > 2 else p.shape[1]


def _rows_of(w: torch.Tensor, param: torch.Tensor) -> tuple[int, int] | None:
    """The rows of ``param`` that ``w`` is, when ``w`` is ``param`` or a row slice of it;
    None when ``w`` is something else made from it (a transpose is the whole of it)."""
    if w is param:
        return 0, param.shape[0]
    if w._base is not param or w.dim() != param.dim():
        return None
    if w.shape == param.shape[::-1] and w.dim() == 2 and w.stride() == param.stride()[::-1]:
        return 0, param.shape[0]  # W.T / W.t()
    if w.stride() == param.stride() and w.shape[1:] == param.shape[1:]:
        off = w.storage_offset() - param.storage_offset()
        if off % param.stride(0) == 0:
            r0 = off // param.stride(0)
            return r0, r0 + w.shape[0]
    return None


def site_watch(site) -> Watch:
    """A :class:`Watch` for a ``passes.sites.LayerSite``."""
    param = site.param
    rows = None
    if site.weight is not param and site.weight._base is param and not site.transposed:
        rows = _rows_of(site.weight, param)
    w = site.weight
    groups = getattr(site.module, "groups", 1) if w.dim() > 2 else 1
    return Watch(site.key, param, rows, groups, math.prod(w.shape[1:]))


def _unfold_rows(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups: int, dim: int):
    """The im2col patches of a conv call, ``[groups, m, in/g * prod(k)]``, in chunks."""
    if x.dim() == dim + 1:  # unbatched
        x = x.unsqueeze(0)
    k = tuple(w.shape[2:])
    def tup(v):
        return (v,) * dim if isinstance(v, int) else tuple(v)

    stride, dilation = tup(stride), tup(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            pads = [(0, 0)] * dim
        else:  # 'same': torch pads the extra element on the right
            pads = []
            for kk, dd in zip(k, dilation):
                total = dd * (kk - 1)
                pads.append((total // 2, total - total // 2))
    else:
        pads = [(p, p) for p in tup(padding)]
    if any(a != b for a, b in pads):
        x = F.pad(x, [v for pr in reversed(pads) for v in pr])
        pads = [(0, 0)] * dim
    if dim == 1:
        x, k = x.unsqueeze(-2), (1, *k)
        stride, dilation, pad = (1, *stride), (1, *dilation), (0, pads[0][0])
    else:
        pad = tuple(p for p, _ in pads)
    n = x.shape[0]
    per = max(1, _UNFOLD_ELEMENTS // max(1, x[0:1].numel() * math.prod(k)))
    cg = x.shape[1] // groups
    dg = cg * math.prod(k)
    for i in range(0, n, per):
        cols = F.unfold(x[i:i + per], k, dilation=dilation, padding=pad, stride=stride)  # [b, C*k, L]
        cols = cols.transpose(1, 2)
        for g in range(groups):
            yield g, cols[..., g * dg:(g + 1) * dg].reshape(-1, dg)


class _Watcher(TorchFunctionMode):
    """Feeds the inputs of watched layers to their statistics (see the module docstring)."""

    def __init__(self, watches: Sequence[Watch], *, collect: bool = True, stop_counts: dict | None = None,
                 on_call=None, perturb=None) -> None:
        super().__init__()
        self.by_param: dict[int, list[Watch]] = {}
        for w in watches:
            self.by_param.setdefault(id(w.param), []).append(w)
        self.collect = collect
        self.stop_counts = stop_counts
        self.on_call = on_call
        self.perturb = perturb

    def _targets(self, w: Any) -> tuple[list[Watch], tuple[int, int] | None]:
        if not isinstance(w, torch.Tensor):
            return [], None
        base = w if id(w) in self.by_param else w._base
        if base is None or id(base) not in self.by_param:
            return [], None
        found = self.by_param[id(base)]
        rows = _rows_of(w, found[0].param)
        if rows is None:
            return [], None
        return [t for t in found if t.rows is None and rows == (0, t.param.shape[0])
                or t.rows is not None and rows[0] <= t.rows[0] and t.rows[1] <= rows[1]], rows

    def _observe(self, targets: list[Watch], x: torch.Tensor, conv=None) -> None:
        for t in targets:
            t.calls += 1
            t.batch_calls += 1
            if self.collect:
                if t.stats is None:
                    t.stats = InputStats.empty(t.groups, t.d, device=x.device)
                if conv is None:
                    t.stats.add(x.reshape(-1, x.shape[-1]))
                else:
                    for g, rows in _unfold_rows(x, *conv):
                        t.stats.add(rows, g)
                t.stats.calls += 1
            if self.on_call is not None:
                self.on_call(t, x)
        if self.stop_counts is not None and targets and all(
                t.batch_calls >= c for t, c in self.stop_counts.values()):
            raise _StopForward

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        targets: list[Watch] = []
        if func in _LINEAR_FUNCS:
            x, w = (args + (None, None))[:2]
            x, w = kwargs.get("input", x), kwargs.get("weight", w)
            targets, _ = self._targets(w)
            if targets and isinstance(x, torch.Tensor):
                self._observe(targets, x)
        elif func in _MM_FUNCS and len(args) == 2:
            targets, _ = self._targets(args[1])
            if targets and isinstance(args[0], torch.Tensor) and args[0].dim() >= 1:
                self._observe(targets, args[0])
        elif func in _ADDMM_FUNCS and len(args) >= 3:
            targets, _ = self._targets(args[2])
            if targets and isinstance(args[1], torch.Tensor):
                self._observe(targets, args[1])
        elif func in _CONV_FUNCS:
            dim = _CONV_FUNCS[func]
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            defaults = (None, None, None, 1, 0, 1, 1)
            vals = dict(zip(names, defaults))
            vals.update(zip(names, args))
            vals.update(kwargs)
            targets, rows = self._targets(vals["weight"])
            if targets and rows == (0, vals["weight"].shape[0]):
                self._observe(targets, vals["input"], (vals["weight"], vals["stride"], vals["padding"],
                                                       vals["dilation"], vals["groups"], dim))
        elif func is _MHA:
            self._mha(args, kwargs)
        out = func(*args, **kwargs)
        if self.perturb is not None and len(targets) == 1 and isinstance(out, torch.Tensor):
            out = self.perturb(targets[0], out, conv=func in _CONV_FUNCS)
        return out

    def _mha(self, args, kwargs) -> None:
        bound = _mha_signature().bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        e = a["embed_dim_to_check"]
        inputs = (a["query"], a["key"], a["value"])
        if not a["use_separate_proj_weight"]:
            found, _ = self._targets(a["in_proj_weight"])
            for t in found:
                i = (t.rows[0] // e) if t.rows is not None else None
                if i is not None and t.rows == (i * e, (i + 1) * e) and not (i == 1 and a["static_k"] is not None) \
                        and not (i == 2 and a["static_v"] is not None):
                    self._observe([t], inputs[i])
        else:
            for i, name in enumerate(("q_proj_weight", "k_proj_weight", "v_proj_weight")):
                found, _ = self._targets(a[name])
                if found and not (i == 1 and a["static_k"] is not None) and not (i == 2 and a["static_v"] is not None):
                    self._observe(found, inputs[i])
        found, _ = self._targets(a["out_proj_weight"])
        if found:
            # the attention output before out_proj: the same attention with an identity out_proj
            w = a["out_proj_weight"]
            a2 = dict(a)
            a2["out_proj_weight"] = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
            a2["out_proj_bias"] = None
            a2["need_weights"] = False
            with torch.no_grad():
                pre, _ = _MHA(**a2)
            self._observe(found, pre)


def _eval_no_grad(model: nn.Module):
    from .check import _eval

    return _eval(model)


def _run(model: nn.Module, args: tuple, kwargs: dict) -> None:
    try:
        model(*args, **kwargs)
    except _StopForward:
        pass


def model_device(model: nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def sensitivity(model: nn.Module, watches: Sequence[Watch], data: CalibrationData, *, eps: float = 0.05,
                batches: int = 2) -> dict:
    """How much each watched layer's output error moves the model's output: ``key -> s`` with
    ``||d model output|| / ||model output|| ~= s * ||d layer output|| / ||layer output variation||``,
    measured by adding Gaussian noise of relative size ``eps`` (to the output's variation about its
    mean) to that layer's output alone, on the first ``batches`` batches.  Layers whose output is
    not a separate call (``nn.MultiheadAttention``'s packed q / k / v) are left out.

    Example:
        >>> lin = torch.nn.Linear(4, 4)
        >>> s = sensitivity(torch.nn.Sequential(lin), [Watch("fc", lin.weight)], as_batches([torch.randn(64, 4)]))
        >>> 0.5 < s["fc"] < 2.0   # the model's output is the layer's: about 1 (the bias adds energy)
        True
    """
    device = model_device(model)
    sub = [b for _, b in zip(range(batches), data.batches(device))]
    with torch.no_grad(), _eval_no_grad(model):
        ref = [_leaves(model(*a, **k)) for a, k in sub]
        total = sum(float(t.double().pow(2).sum()) for leaves in ref for _, t in leaves) or 1.0
        out: dict = {}
        for i, watch in enumerate(watches):
            gen = torch.Generator(device=device or "cpu").manual_seed(i)
            hit = [False]

            def perturb(t: Watch, y: torch.Tensor, conv: bool = False, watch=watch, gen=gen, hit=hit) -> torch.Tensor:
                if t is not watch:
                    return y
                hit[0] = True
                v = y.transpose(0, 1).reshape(y.shape[1], -1) if conv and y.dim() > 2 else y.reshape(-1, y.shape[-1])
                var = float((v - v.mean(-1 if conv and y.dim() > 2 else 0, keepdim=True)).double().pow(2).sum())
                noise = torch.randn(y.shape, generator=gen, device=y.device, dtype=y.dtype)
                return y + noise * (eps * math.sqrt(var / max(float(noise.double().pow(2).sum()), 1e-300)))

            moved = 0.0
            with _Watcher([watch], collect=False, perturb=perturb):
                for (a, k), want in zip(sub, ref):
                    got = _leaves(model(*a, **k))
                    moved += sum(float((g.double() - w.double()).pow(2).sum()) for (_, g), (_, w) in zip(got, want))
            if hit[0]:
                out[watch.key] = math.sqrt(moved / total) / eps
    return out


@dataclass
class Order:
    """What one forward pass on the first batch showed: the watched layers in the order of
    their first call, whether each got the same input tensor as the one before it, and how
    many calls each made."""

    keys: list = field(default_factory=list)
    same_input: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)

    def stages(self) -> list[list]:
        """Runs of layers in call order that read the same input tensor (q / k / v): a stage
        is converted together, after the stages before it."""
        out: list[list] = []
        for k in self.keys:
            if out and self.same_input.get(k):
                out[-1].append(k)
            else:
                out.append([k])
        return out


def probe(model: nn.Module, watches: Sequence[Watch], data: CalibrationData) -> Order:
    """Run the first batch and record the call order of the watched layers (no statistics)."""
    order = Order()
    last: list = [None]

    def on_call(t: Watch, x: torch.Tensor) -> None:
        if t.key not in order.calls:
            order.keys.append(t.key)
            order.same_input[t.key] = last[0] is not None and x is last[0]
            last[0] = x
        order.calls[t.key] = order.calls.get(t.key, 0) + 1

    args, kwargs = data.first(model_device(model))
    with torch.no_grad(), _eval_no_grad(model), _Watcher(watches, collect=False, on_call=on_call):
        _run(model, args, kwargs)
    last[0] = None
    return order


def collect_stats(model: nn.Module, watches: Sequence[Watch], data: CalibrationData,
                  stop_counts: dict | None = None) -> dict:
    """Run every batch of ``data`` through ``model`` (eval mode, no grad) and return
    ``key -> InputStats`` for the watched layers that were called.

    ``stop_counts`` (``key -> calls per batch``, from :func:`probe`) ends each forward pass
    as soon as every watched layer has made its calls, so a layer early in the model does
    not pay for the rest of it.

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> w = Watch("fc", lin.weight)
        >>> st = collect_stats(lin, [w], as_batches([torch.ones(4, 3)]))["fc"]
        >>> st.n, float(st.h[0, 0, 1])
        (4, 4.0)
    """
    for w in watches:
        w.stats, w.calls = None, 0
    counts = None
    if stop_counts:
        counts = {w.key: (w, stop_counts[w.key]) for w in watches if w.key in stop_counts}
        if len(counts) != len(watches):
            counts = None
    device = model_device(model)
    mode = _Watcher(watches, stop_counts=counts)
    with torch.no_grad(), _eval_no_grad(model):
        for args, kwargs in data.batches(device):
            for w in watches:
                w.batch_calls = 0
            with mode:
                _run(model, args, kwargs)
    for w in watches:
        if w.stats is not None and not bool(torch.isfinite(w.stats.h).all()):
            name = w.key[0] if isinstance(w.key, tuple) else str(w.key).split("@")[0]
            raise InputError(f"calibration_data: the inputs of layer {name!r} hold inf or NaN on the "
                             "calibration data (or overflow float64 when multiplied), so its output error cannot be "
                             "fitted. Check the data and the layers before it (an inf input, or an overflow).")
    return {w.key: w.stats for w in watches if w.stats is not None}


# ------------------------------------------------------------------------ block sparsity
def select_blocks(w: torch.Tensor, hd: torch.Tensor, density: float, block_size: int, *,
                  selection: str = "saliency"):
    """The block layout of ``w [out, in]`` chosen with the damped input moment ``hd [in, in]``.

    ``saliency`` (Wanda-style): a block's score is ``sum (|W_ij| ||x_j||)^2`` over its
    entries (``||x_j||^2 = Hd_jj``): the output error of removing it if the inputs were
    uncorrelated.  It is :func:`sparsify.patterns.magnitude_layout` of the input-scaled
    weight ``W diag(sqrt(diag Hd))``, so identity statistics choose exactly the magnitude
    layout; each block row keeps its best block, the rest of the budget goes to the best
    remaining blocks of the layer.

    ``obs``: the same number of blocks per block row as ``saliency``, chosen in each block
    row by OBS greedy removal: repeatedly drop the block whose removal, with the optimal
    compensation of the others, costs least (``tr(W_c [Hd^-1]_cc^-1 W_c^T)``), updating
    ``W`` and ``Hd^-1`` after each removal (Optimal Brain Surgeon, Hassibi & Stork 1993, per
    block as in SparseGPT).  Slower (``O(in^2 b)`` per removed block); better where inputs
    are strongly correlated.

    Example:
        >>> w = torch.zeros(32, 32, dtype=torch.float64); w[:16, 16:] = 1; w[16:, :16] = 1
        >>> select_blocks(w, torch.eye(32, dtype=torch.float64), 0.5, 16).block_mask().tolist()
        [[False, True], [True, False]]
    """
    from .patterns import magnitude_layout
    from .runtime import BlockSparseLayout

    scale = hd.diagonal().clamp_min(0).sqrt()
    layout = magnitude_layout(w * scale[None, :], density=density, block_size=block_size)
    if selection == "saliency":
        return layout
    if selection != "obs":
        raise ValueError(f"select_blocks: selection must be 'saliency' or 'obs'; got {selection!r}")
    mask = layout.block_mask().clone()
    counts = mask.sum(1).tolist()
    out_f, in_f = w.shape
    b = block_size
    nbr, nbc = mask.shape
    pc = nbc * b
    # pad to whole blocks: zero weights on padded inputs that are uncorrelated with the rest
    wp = F.pad(w.to(torch.float64), (0, pc - in_f))
    hp = torch.block_diag(hd.to(torch.float64), torch.eye(pc - in_f, dtype=torch.float64, device=w.device))
    hinv = torch.cholesky_inverse(_cholesky(hp))
    idx = torch.arange(pc, device=w.device).reshape(nbc, b)
    for r in range(nbr):
        wr = wp[r * b:min((r + 1) * b, out_f)].clone()
        hi = hinv.clone()
        alive = torch.ones(nbc, dtype=torch.bool)
        while int(alive.sum()) > counts[r]:
            a = alive.nonzero().flatten()
            ii = idx[a]                                               # [A, b]
            hcc = hi[ii[:, :, None], ii[:, None, :]]                  # [A, b, b]
            wc = wr[:, ii].permute(1, 0, 2)                           # [A, rows, b]
            sol = torch.linalg.solve(hcc, wc.transpose(1, 2))         # [A, b, rows]
            cost = (wc * sol.transpose(1, 2)).sum((1, 2))
            c = int(a[int(cost.argmin())])
            ic = idx[c]
            q = hi[ic]                                                # [b, pc]
            step = torch.linalg.solve(hi[ic][:, ic], q)               # [H^-1]_cc^-1 [H^-1]_c,:
            wr -= wr[:, ic] @ step
            hi -= q.T @ step
            alive[c] = False
        mask[r] = alive
    return BlockSparseLayout.from_block_mask(mask, shape=tuple(w.shape), block_size=b)


def refit_blocks(w: torch.Tensor, hd: torch.Tensor, mask: torch.Tensor, block_size: int,
                 rows: Sequence[int] | None = None) -> torch.Tensor:
    """The least-squares refit of the kept blocks: per block row, ``W[rows, S] = W[rows, :] Hd[:, S]
    Hd[S, S]^-1`` (``S`` the columns of the kept blocks, ``Hd`` the damped input moment), the
    minimizer of ``||X (W'[rows] - W[rows])^T||^2 + l ||W'[rows] - W[rows]||^2`` over weights
    supported on ``S``.  Zeros outside the mask (and in block rows not in ``rows``, when only
    some are asked for).  All in float64; block rows that keep the same number of blocks are
    solved as one batch.

    Example:
        >>> w = torch.randn(4, 4, dtype=torch.float64)
        >>> mask = torch.ones(1, 1, dtype=torch.bool)
        >>> torch.allclose(refit_blocks(w, torch.eye(4, dtype=torch.float64), mask, 4), w)
        True
    """
    out_f, in_f = w.shape
    b = block_size
    nbr, nbc = mask.shape
    pr, pc = nbr * b, nbc * b
    # padded to whole blocks; padded inputs get an identity moment (uncorrelated, never used: zero weight)
    wp = F.pad(w.to(torch.float64), (0, pc - in_f, 0, pr - out_f))
    hp = torch.block_diag(hd.to(torch.float64), torch.eye(pc - in_f, dtype=torch.float64, device=w.device))
    hb = hp.reshape(nbc, b, nbc, b)
    mask = mask.to(w.device)
    new = torch.zeros_like(wp)
    by_count: dict[int, list[int]] = {}
    for r in (range(nbr) if rows is None else rows):
        by_count.setdefault(int(mask[r].sum()), []).append(r)
    for k, rs in by_count.items():
        if k == 0:
            continue
        rr = torch.tensor(rs, device=w.device)
        cols = torch.stack([mask[r].nonzero().flatten() for r in rs])              # [m, k] block columns
        hs = hb[cols[:, :, None], :, cols[:, None, :], :]                           # [m, k, k, b, b]
        hs = hs.permute(0, 1, 3, 2, 4).reshape(len(rs), k * b, k * b)
        wh = (wp.reshape(nbr, b, pc)[rr] @ hp).reshape(len(rs), b, nbc, b)          # W[rows] Hd, [m, b, C, b]
        rhs = torch.gather(wh, 2, cols[:, None, :, None].expand(-1, b, -1, b)).reshape(len(rs), b, k * b)
        sol = torch.cholesky_solve(rhs.transpose(1, 2), _cholesky(hs)).transpose(1, 2)  # [m, b, k b]
        sol = sol.reshape(len(rs), b, k, b)
        view = new.reshape(nbr, b, nbc, b)
        for i, r in enumerate(rs):
            view[r][:, cols[i], :] = sol[i]
    return new[:out_f, :in_f].contiguous()


# ----------------------------------------------------------------------------- low rank
def whitened_svd(w: torch.Tensor, hd: torch.Tensor):
    """SVD of the whitened weight: ``W L = U S V^T`` with ``L`` the Cholesky factor of the damped
    input moment ``hd``.  Returns ``(S, factors)`` where ``factors(r)`` gives ``(A [out, r],
    B [r, in])`` with ``A B = U_r S_r V_r^T L^-1``: the rank-r weight with the smallest output
    error on the calibration inputs, ``||(W - A B) L||_F = sqrt(sum_{i >= r} S_i^2)`` exactly
    (SVD-LLM, Wang et al. 2024).  Each component is balanced between the factors
    (``||A[:, i]|| = ||B[i]||``).

    Example:
        >>> w = torch.randn(6, 5, dtype=torch.float64)
        >>> s, factors = whitened_svd(w, torch.eye(5, dtype=torch.float64))
        >>> a, b = factors(5); torch.allclose(a @ b, w)
        True
    """
    w = w.to(torch.float64)
    L = _cholesky(hd.to(torch.float64))
    u, s, vh = torch.linalg.svd(w @ L, full_matrices=False)

    def factors(r: int) -> tuple[torch.Tensor, torch.Tensor]:
        sq = s[:r].sqrt()
        a = u[:, :r] * sq
        # B = sqrt(S_r) V_r^T L^-1  <=>  L^T B^T = V_r sqrt(S_r)
        bt = torch.linalg.solve_triangular(L.T, vh[:r].T * sq, upper=True)
        # Balance each component: ||a_i|| = ||b_i||, as the plain SVD's even split gives.  The
        # whitened split alone leaves B smaller than A by a factor that grows with the number of
        # calibration tokens (L scales with sqrt(n)), 20-40x on MiniLM; Adam moves every element
        # by about lr, so B would train relatively far faster than A.  The product is unchanged.
        c = (bt.norm(dim=0) / a.norm(dim=0)).clamp_min(1e-300).sqrt()
        c = torch.where(torch.isfinite(c) & (c > 0), c, torch.ones_like(c))
        return a * c, (bt / c).T

    return s, factors


# --------------------------------------------------------------------- factorization refit
#: FLOPs one refit may spend (about ten seconds of a CPU core in float32).
REFIT_FLOP_BUDGET = 3e11
REFIT_MAX_EVALS = 100


def refit_factors(module: nn.Module, w: torch.Tensor, hd: torch.Tensor, groups: int = 1) -> dict[str, Any]:
    """Refit every factor of a factorized ``module`` (all parameters but ``bias``) to minimize
    ``tr(D Hd D^T) / tr(W Hd W^T)`` with ``D = W - module.to_dense()`` (per group): the
    relative output error on the calibration inputs, damped.  L-BFGS from the module's
    current (weight-only) factors; the factors are kept only if the objective went down.

    Returns ``{"evaluations", "before", "after", "seconds"}`` (relative errors in the damped
    norm), or ``{"skipped": why}`` when one evaluation would cost so much that the refit does
    not pay (``REFIT_FLOP_BUDGET``).
    """
    params = [p for n, p in module.named_parameters() if n != "bias" and not n.endswith(".bias")]
    if not params:
        return {"skipped": "the module has no factors"}
    wg = weight_groups(w, groups)
    g, o, d = wg.shape
    per_eval = 4 * g * o * d * d + 4 * sum(p.numel() for p in params) * max(o, 1)
    evals = min(REFIT_MAX_EVALS, int(REFIT_FLOP_BUDGET // max(per_eval, 1)))
    if evals < 10:
        return {"skipped": f"one evaluation costs {per_eval / 1e9:.3g} GFLOP; {REFIT_FLOP_BUDGET / 1e9:.0f} "
                           "GFLOP would buy fewer than 10"}
    t0 = time.perf_counter()
    dtype = params[0].dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16, torch.float32) else dtype
    hw = hd.to(work)
    ww = wg.to(work)
    norm = float(torch.einsum("god,gde,goe->", wg, hd, wg)) or 1.0
    saved = [p.detach().clone() for p in params]
    orig = [p.data for p in params]
    for p in params:
        p.data = p.data.to(work)

    def objective() -> torch.Tensor:
        dw = ww - module.to_dense().reshape(g, o, d)
        return torch.einsum("god,gde,goe->", dw, hw, dw) / norm

    with torch.no_grad():
        before = float(objective())
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=evals, max_eval=evals, history_size=20,
                            tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad():
        try:
            opt.step(closure)
        except RuntimeError:
            pass  # a failed line search leaves the best point reached so far
    with torch.no_grad():
        after = float(objective())
        if not math.isfinite(after) or after >= before:
            for p, s in zip(params, saved):
                p.data = s
            after = before
        else:
            for p, o_ in zip(params, orig):
                p.data = p.data.to(o_.dtype)
        for p in params:
            p.grad = None
    clear = getattr(module, "clear_weight_cache", None)
    if callable(clear):
        clear()
    return {"evaluations": evals, "before": math.sqrt(max(before, 0.0)), "after": math.sqrt(max(after, 0.0)),
            "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------- model error
def output_name(path) -> str:
    """A pytree path as ``verify`` names outputs: ``output`` (one tensor), ``logits`` (a dict's or a
    ``ModelOutput``'s key), ``output[0]`` (a tuple's item), ``output[1].hidden``, ``a[0]``.

    Example:
        >>> out = (torch.zeros(1), {"hidden": [torch.zeros(1)]})
        >>> [output_name(p) for p, _ in pytree.tree_flatten_with_path(out)[0]]
        ['output[0]', 'output[1].hidden[0]']
    """
    name = "output"
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "name", None))
        if isinstance(entry, pytree.SequenceKey):
            name = f"{name}[{entry.idx}]"
        else:
            name = str(key) if name == "output" else f"{name}.{key}"
    return name


def _leaves(out: Any) -> list[tuple[str, torch.Tensor]]:
    flat, _ = pytree.tree_flatten_with_path(out)
    return [(output_name(path), leaf) for path, leaf in flat
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]


def model_error(reference: nn.Module, converted: nn.Module, data: CalibrationData) -> dict[str, Any]:
    """Relative output error of ``converted`` against ``reference`` on ``data``, per floating
    output (``sqrt(sum ||a - b||^2 / sum ||b||^2)`` over every batch), both in eval mode.

    Returns ``{"outputs": {name: error}, "worst": name, "error": the worst error, "batches": n}``.

    Example:
        >>> m = torch.nn.Linear(4, 4)
        >>> model_error(m, m, as_batches([torch.randn(2, 4)]))["error"]
        0.0
    """
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    batches = 0
    device = model_device(converted)
    from .check import standard_attention

    with torch.no_grad(), _eval_no_grad(reference), _eval_no_grad(converted), standard_attention():
        for args, kwargs in data.batches(device):
            got = _leaves(converted(*args, **kwargs))
            want = _leaves(reference(*args, **kwargs))
            if [n for n, _ in got] != [n for n, _ in want]:
                raise ValueError("model_error: the two models return different outputs "
                                 f"({[n for n, _ in got]} vs {[n for n, _ in want]}).")
            for (name, a), (_, b) in zip(got, want):
                a64, b64 = a.double(), b.double()
                num[name] = num.get(name, 0.0) + float((a64 - b64).pow(2).sum())
                den[name] = den.get(name, 0.0) + float(b64.pow(2).sum())
            batches += 1
    outputs = {n: (math.sqrt(num[n] / den[n]) if den[n] > 0 else (0.0 if num[n] == 0 else float("inf")))
               for n in num}
    # a NaN (an output that became NaN) is the worst of all, never hidden behind a finite one
    worst = max(outputs, key=lambda n: math.inf if math.isnan(outputs[n]) else outputs[n]) if outputs else None
    return {"outputs": outputs, "worst": worst, "error": outputs[worst] if worst else 0.0, "batches": batches}
