"""A CPU emulator of the CUDA and PTX our kernels use: any kernel runs, unmodified, without a GPU.

The kernel sources are compiled by the host C++ compiler (g++ >= 9) with a shim
(``csrc/emu_shim.h``) that provides the CUDA built-ins, and run by a runtime
(``csrc/emu_runtime.cpp``) in which every CUDA thread is a fiber with its own
stack, ``__syncthreads`` is a block barrier, warp collectives (``ldmatrix``,
``mma.sync``, shuffles, votes, ``__syncwarp``) rendezvous their lanes and follow
the PTX ISA's fragment layouts, and ``cp.async`` copies land only at their
``cp.async.wait_group``.  Shared memory, outputs the caller poisons and thread
stacks start as NaN bytes.  Misuse (a deadlock, a misaligned or non-shared
``ldmatrix`` / ``cp.async`` address, a lane missing from a collective, an
``assert``, a segmentation fault) raises :class:`EmulatedKernelError` naming the
kernel, block, thread and source line.  docs/cuda_runtime.md says what is exact,
what is approximated and what the emulator cannot see.

The API
-------
``build(source, *, name, include_dirs=(), defines=None, options=(), max_dynamic_shared_bytes=49152)``
    compiles a CUDA source string (like one NVRTC program: ``#include`` s are
    looked up in ``include_dirs``, then the CUDA headers) and returns a
    :class:`Program`; built libraries are cached on disk and in the process.
``Program.kernels``
    ``{name: KernelInfo(name, params, max_threads)}`` for every non-template
    ``__global__`` function (declare them ``extern "C"``, as the CUDA launcher needs).
``Program.launch(kernel, grid, block, args, *, shared_bytes=0, schedule="round_robin", seed=0)``
    runs the grid like ``cuLaunchKernel``: ``args`` as the CUDA launcher passes
    them (``np.uint64`` pointers of CPU tensors, ``np.int32`` ints, ...), checked
    against the kernel's parameter types; returns :class:`LaunchStats`.
    ``schedule`` is one of :data:`SCHEDULES`.
``EmulatedKernelRuntime`` / ``emulated_executor()``
    the emulator under ``runtime/cuda/executor.py``: the block-sparse ops run
    their CUDA kernels on CPU tensors.  ``SPARSIFY_EMULATE_CUDA=1`` makes it the
    executor of CPU tensors (read when ``sparsify`` is imported).

Example (a kernel with a barrier and a warp shuffle, on CPU memory):
    >>> import numpy as np, torch
    >>> from sparsify.runtime import emulator
    >>> prog = emulator.build('''
    ... extern "C" __global__ void rev(const float* x, float* y) {
    ...   __shared__ float s[64];
    ...   s[threadIdx.x] = x[threadIdx.x];
    ...   __syncthreads();
    ...   y[threadIdx.x] = s[63 - threadIdx.x] + __shfl_xor_sync(0xffffffffu, 0.f, 1);
    ... }''', name="doc_example")
    >>> x = torch.arange(64, dtype=torch.float32); y = torch.full((64,), float("nan"))
    >>> stats = prog.launch("rev", grid=1, block=64, args=(np.uint64(x.data_ptr()), np.uint64(y.data_ptr())))
    >>> bool(torch.equal(y, x.flip(0))), stats.barriers
    (True, 1)
"""

from __future__ import annotations

import threading

from .builder import (
    DEFAULT_DYNAMIC_SHARED_BYTES,
    EmulatorBuildError,
    EmulatorUnavailableError,
    build_library,
)
from .program import SCHEDULES, EmulatedKernelError, KernelInfo, LaunchStats, Param, Program

__all__ = [
    "EmulatedKernelError",
    "EmulatedKernelRuntime",
    "EmulatorBuildError",
    "EmulatorUnavailableError",
    "KernelInfo",
    "LaunchStats",
    "Param",
    "Program",
    "SCHEDULES",
    "build",
    "emulated_executor",
    "register",
]

_PROGRAMS: dict[str, Program] = {}
_LOCK = threading.Lock()


def build(source: str, *, name: str = "program", include_dirs: tuple[str, ...] | list[str] = (),
          defines: dict[str, str] | None = None, options: tuple[str, ...] = (),
          max_dynamic_shared_bytes: int = DEFAULT_DYNAMIC_SHARED_BYTES) -> Program:
    """Compile ``source`` for the emulator (or take it from the cache) and load it.

    ``include_dirs`` are searched for ``#include "..."`` before the emulator's and the CUDA
    headers; ``defines`` become ``-DNAME=VALUE``; ``options`` are extra host-compiler flags;
    ``max_dynamic_shared_bytes`` is the most dynamic shared memory a launch may ask for.

    Example:
        >>> prog = build('extern "C" __global__ void k(int* p) { p[threadIdx.x] = 1; }', name="doc_k")
        >>> [(p.kind, p.size) for p in prog.kernels["k"].params]
        [('pointer', 8)]
    """
    result = build_library(source, name=name, include_dirs=tuple(str(d) for d in include_dirs), defines=defines,
                           options=tuple(options), max_dynamic_shared_bytes=max_dynamic_shared_bytes)
    with _LOCK:
        prog = _PROGRAMS.get(result.key)
        if prog is None:
            prog = Program(result, name)
            _PROGRAMS[result.key] = prog
    return prog


def __getattr__(name: str):
    # The launcher-level runtime imports torch and the CUDA executor: only on demand.
    if name in ("EmulatedKernelRuntime", "emulated_executor", "register"):
        from . import device

        return getattr(device, name)
    raise AttributeError(name)
