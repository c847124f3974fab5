"""The autotuner: time the candidate kernels once, keep the fastest, remember it on disk.

A choice is made per (op, M bucket, layout, math, block, device name): the first
call in that class times every candidate from :func:`.kernels.candidates` with
CUDA events (one warm-up launch, then the median of a few timed launches) and
runs the winner from then on.  Choices persist as JSON in
``<cache root>/autotune/<device name>.json`` (atomic writes; a file that does
not parse is ignored with a warning).

``SPARSIFY_AUTOTUNE=0`` skips timing and uses :func:`.kernels.heuristic`; so
does a call made while a CUDA graph is being captured (timing would need a
synchronization), and so does a tuner made with ``timed=False`` (the CPU
emulator's runtime, whose launches say nothing about GPU speed).

Example:
    >>> m_bucket(1), m_bucket(7), m_bucket(1000), m_bucket(100000)
    (1, 8, 1024, 16384)
"""

from __future__ import annotations

import json
import re
import statistics
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..environment import switch
from .cache import atomic_write, cache_disabled, cache_root, read_private

__all__ = ["Autotuner", "autotune_enabled", "m_bucket"]

FORMAT = 1
TIMED_RUNS = 5


def autotune_enabled() -> bool:
    return switch("SPARSIFY_AUTOTUNE", True)


def m_bucket(m: int) -> int:
    """Rows rounded up to a power of two, capped at 16384: the shape class of a tuning choice."""
    b = 1
    while b < m and b < 16384:
        b *= 2
    return b


class Autotuner:
    """Choices for one device, saved to ``path`` (default: under the cache root).

    ``timer(fn) -> milliseconds`` times one candidate (CUDA events by default)."""

    def __init__(self, device_name: str, path: Path | None = None,
                 timer: Callable[[Callable[[], None]], float] | None = None, timed: bool = True) -> None:
        self.device_name = device_name
        #: False where launches cannot be timed (the CPU emulator): always the heuristic choice
        self.timed = timed
        self._timer = timer or _time
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", device_name).strip("_") or "device"
        self._path = path
        self._slug = slug
        self._lock = threading.Lock()
        self._choices: dict[str, str] | None = None

    @property
    def path(self) -> Path:
        return self._path if self._path is not None else cache_root() / "autotune" / f"{self._slug}.json"

    def _load(self) -> dict[str, str]:
        if self._choices is not None:
            return self._choices
        choices: dict[str, str] = {}
        if not cache_disabled():
            try:
                data = json.loads(read_private(self.path, 16 << 20))  # ours only; never a FIFO or link
                if data.get("format") == FORMAT and data.get("device") == self.device_name:
                    choices = {str(k): str(v) for k, v in data.get("choices", {}).items()}
            except FileNotFoundError:
                pass
            except (OSError, ValueError, AttributeError) as exc:
                warnings.warn(f"sparsify: ignoring the autotuning file {self.path}: {exc}", RuntimeWarning, stacklevel=3)
        self._choices = choices
        return choices

    def _save(self) -> None:
        if cache_disabled():
            return
        try:  # merge with choices another process may have written meanwhile
            on_disk = json.loads(read_private(self.path, 16 << 20)).get("choices", {})
        except (OSError, ValueError, AttributeError):
            on_disk = {}
        merged = {**on_disk, **(self._choices or {})}
        blob = {"format": FORMAT, "device": self.device_name, "choices": dict(sorted(merged.items()))}
        try:
            atomic_write(self.path, json.dumps(blob, indent=1).encode(),
                         root=None if self._path is not None else cache_root())
        except OSError as exc:
            warnings.warn(f"sparsify: cannot save autotuning choices to {self.path}: {exc}", RuntimeWarning, stacklevel=3)

    def lookup(self, key: str) -> str | None:
        with self._lock:
            return self._load().get(key)

    def choose(self, key: str, candidates: list, run: Callable[[object], None], heuristic) -> object:
        """The candidate to run for ``key``; ``run(candidate)`` launches one (for timing).

        Candidates are objects with a ``name``; ``heuristic`` is the one used untimed."""
        if len(candidates) <= 1:
            return candidates[0] if candidates else heuristic
        if not self.timed or not autotune_enabled() or (
            torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        ):
            return heuristic
        by_name = {c.name: c for c in candidates}
        known = self.lookup(key)
        if known in by_name:
            return by_name[known]
        times = {c.name: self._timer(lambda c=c: run(c)) for c in candidates}
        best = min(times, key=times.__getitem__)
        with self._lock:
            self._load()[key] = best
            self._save()
        return by_name[best]


def _time(fn: Callable[[], None]) -> float:
    """Median milliseconds of ``fn`` over TIMED_RUNS launches after one warm-up."""
    fn()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(TIMED_RUNS):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
