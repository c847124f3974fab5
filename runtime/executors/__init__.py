"""Executors: the code that runs a block-sparse op on one kind of device.

There is one dispatch point, :func:`executor_for`.  The CPU executor (the
reference, written with plain torch ops, so it runs on any device) is always
registered.  A device-specific executor registers a factory for its device
type with :func:`register_executor`; the factory returns ``None`` when it
cannot run here (no driver, no compiler), and the CPU executor takes over with
one warning.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Protocol

import torch

from .cpu import CPUExecutor

__all__ = ["Executor", "LayoutMeta", "executor_for", "register_executor", "CPUExecutor"]


class LayoutMeta(Protocol):
    row_offsets: torch.Tensor
    col_indices: torch.Tensor
    row_indices: torch.Tensor
    t_row_offsets: torch.Tensor
    t_col_indices: torch.Tensor
    t_block_ids: torch.Tensor


class Executor(Protocol):
    """What an executor implements. Shapes: ``x [M, in]``, ``values [nnz, b, b]``."""

    name: str

    def forward(
        self, x, values, meta, bias, residual, activation: str, out_features: int,
        out_dtype=None, static_weight: bool = False,
    ) -> torch.Tensor: ...

    def grad_input(self, dy, values, meta, in_features: int) -> torch.Tensor: ...

    def grad_weight(self, dy, x, meta, block_size: int) -> torch.Tensor: ...


_FACTORIES: dict[str, Callable[[torch.device], Executor | None]] = {}
_CACHE: dict[tuple[str, int | None], Executor] = {}
_LOCK = threading.Lock()
_CPU = CPUExecutor()
_WARNED: set[str] = set()


def register_executor(device_type: str, factory: Callable[[torch.device], Executor | None]) -> None:
    """Register ``factory(device) -> Executor | None`` for ``device_type`` (e.g. ``"cuda"``)."""
    with _LOCK:
        _FACTORIES[device_type] = factory
        for key in [k for k in _CACHE if k[0] == device_type]:
            del _CACHE[key]


def executor_for(device: torch.device) -> Executor:
    """The executor for tensors on ``device``: a registered one, else the CPU (reference) executor."""
    key = (device.type, device.index)
    ex = _CACHE.get(key)
    if ex is not None:
        return ex
    with _LOCK:
        factory = _FACTORIES.get(device.type)
        ex = None
        reason = None
        if factory is not None:
            try:
                ex = factory(device)
            except Exception as exc:  # a broken driver must not break the model
                reason = f"{type(exc).__name__}: {exc}"
        if ex is None:
            ex = _CPU
            if device.type != "cpu" and device.type not in _WARNED:
                _WARNED.add(device.type)
                why = reason or "no kernel executor is available for it"
                warnings.warn(
                    f"sparsify: running block-sparse ops on {device.type} with the reference "
                    f"(torch) executor: {why}. Run `sparsify doctor` to see what is missing.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _CACHE[key] = ex
        return ex
