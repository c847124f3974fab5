"""The emulator under the CUDA executor: the block-sparse kernels on CPU tensors.

:class:`EmulatedKernelRuntime` has the interface of
:class:`sparsify.runtime.cuda.launcher.KernelRuntime` (``kernel``, ``launch``,
``empty``, ``device``, ``device_name``, ``sm_count``, ``timed``), so
:class:`~sparsify.runtime.cuda.executor.CUDAExecutor` built on it picks kernels,
grids, arguments and workspaces exactly as on a GPU; only the tensors are on the
CPU and the pointers are host pointers.  Differences a caller can see:

* outputs and workspaces come from ``empty``, which fills them with NaN
  (0xFF bytes), so an element a kernel forgets to write is visible;
* the autotuner never times (``timed = False``): the heuristic kernel runs
  unless a test forces one (``executor.forced``);
* ``sm_count`` (default 132, an H100 SXM) decides when dW splits M across
  thread blocks, as the GPU's SM count does;
* each kernel is built on its own (``#include "bsmm.cuh"`` plus its macro line
  from ``kernels.py``), so a test builds only the kernels it runs.

``SPARSIFY_EMULATE_CUDA=1`` (read when ``sparsify`` is imported) registers the
emulated executor for CPU tensors: every block-sparse op on the CPU then runs
its CUDA kernel under the emulator (slowly: see docs/cuda_runtime.md).

Example:
    >>> rt = EmulatedKernelRuntime(sm_count=8)
    >>> rt.device, rt.timed
    (device(type='cpu'), False)
"""

from __future__ import annotations

import threading
import warnings

import torch

from ..cuda import kernels
from ..cuda.launcher import check_grid
from . import SCHEDULES, Program, build

__all__ = ["EMULATE_ENV", "EmulatedKernelRuntime", "emulated_executor", "register"]

#: The switch: "1" (or true/yes/on) runs block-sparse ops on CPU tensors through the emulator.
EMULATE_ENV = "SPARSIFY_EMULATE_CUDA"


class EmulatedKernelRuntime:
    """The CUDA kernels of ``kernels.py``, built for the host and run by the emulator.

    A kernel is built from ``#include "<header>"`` plus ``spec.macro()``: any spec object with
    ``name``, ``threads`` and ``macro()`` (another kernel family's too) can be launched.
    ``schedule`` / ``seed`` choose the thread-scheduling order of every launch (tests change them
    between runs); ``launches`` records ``(kernel name, grid, block, LaunchStats)`` of each launch."""

    timed = False

    def __init__(self, *, sm_count: int = 132, schedule: str = "round_robin", seed: int = 0,
                 device_name: str | None = None, src_dir: str | None = None, header: str = "bsmm.cuh") -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"sparsify emulator: unknown schedule {schedule!r}; expected one of {SCHEDULES}.")
        if int(sm_count) < 1:
            raise ValueError(f"sparsify emulator: sm_count must be at least 1. Got {sm_count}.")
        self.device = torch.device("cpu")
        self.sm_count = int(sm_count)
        self.device_name = device_name or f"sparsify CUDA emulator ({self.sm_count} SMs)"
        self.schedule = schedule
        self.seed = int(seed)
        self.launches: list[tuple] = []
        #: the kernel sources (default: the installed cuda_src; tests point it at modified copies)
        self.src_dir = src_dir
        #: the header whose macros define the kernels (another kernel family passes its own)
        self.header = header
        self._programs: dict[str, Program] = {}
        self._lock = threading.Lock()

    def kernel(self, spec: kernels.KernelSpec) -> Program:
        """The program holding ``spec`` (built on first use): the header and the kernel's macro line."""
        prog = self._programs.get(spec.name)
        if prog is None:
            from ..cuda.compiler import SRC_DIR

            source = f'// {spec.name}: emulated\n#include "{self.header}"\n{spec.macro()}\n'
            prog = build(source, name=spec.name, include_dirs=(str(self.src_dir or SRC_DIR),))
            with self._lock:
                self._programs[spec.name] = prog
        return prog

    def empty(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        """A poisoned output or workspace: NaN bytes (0xFF), so an unwritten element shows."""
        t = torch.empty(*shape, dtype=dtype, device=self.device)
        if t.numel():
            t.view(torch.uint8).fill_(0xFF)
        return t

    def launch(self, spec: kernels.KernelSpec, grid: tuple[int, int, int], args: tuple) -> None:
        """Run ``spec`` over ``grid`` as KernelRuntime.launch does on a GPU (synchronously)."""
        if not check_grid(spec, grid):
            return
        prog = self.kernel(spec)
        stats = prog.launch(spec.name, grid, (spec.threads, 1, 1), args, schedule=self.schedule, seed=self.seed)
        self.launches.append((spec.name, tuple(grid), (spec.threads, 1, 1), stats))


def emulated_executor(*, sm_count: int = 132, schedule: str = "round_robin", seed: int = 0,
                      src_dir: str | None = None):
    """A :class:`~sparsify.runtime.cuda.executor.CUDAExecutor` for CPU tensors on the emulator.

    Example:
        >>> ex = emulated_executor(sm_count=4)
        >>> ex.device.type, ex.runtime.sm_count
        ('cpu', 4)
    """
    from ..cuda.executor import CUDAExecutor

    rt = EmulatedKernelRuntime(sm_count=sm_count, schedule=schedule, seed=seed, src_dir=src_dir)
    return CUDAExecutor(torch.device("cpu"), runtime=rt)


def _factory(device: torch.device):
    try:
        from .builder import compiler, cuda_include_dirs

        compiler()
        cuda_include_dirs()
        return emulated_executor()
    except Exception as exc:
        warnings.warn(
            f"sparsify: {EMULATE_ENV} is set but the CUDA emulator cannot run here ({type(exc).__name__}: {exc}); "
            "CPU tensors use the reference executor.",
            RuntimeWarning,
            stacklevel=3,
        )
        raise


def enabled() -> bool:
    from ..environment import switch

    return switch(EMULATE_ENV, False)


def register() -> None:
    """Make the emulated executor the executor of CPU tensors when ``SPARSIFY_EMULATE_CUDA`` is set.

    Never raises (``import sparsify`` must not fail); without the switch it does nothing."""
    if not enabled():
        return
    try:
        from ..executors import register_executor

        register_executor("cpu", _factory)
    except Exception:  # registration must never break `import sparsify`
        pass
