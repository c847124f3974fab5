"""A built program, loaded with ctypes, and the launch of its kernels.

The launch checks what the CUDA driver would reject (grid and block limits,
``__launch_bounds__``, dynamic shared memory) and what it would silently
mis-pack (each argument's numpy type against the kernel's parameter type:
pointers as ``np.uint64``, ``int`` as ``np.int32`` ...), then runs the whole
grid synchronously on the calling thread (ctypes releases the GIL).

Example:
    >>> SCHEDULES
    ('round_robin', 'reverse', 'greedy', 'random', 'greedy_reverse')
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .builder import BuildResult

__all__ = ["EmulatedKernelError", "KernelInfo", "LaunchStats", "Param", "Program", "SCHEDULES"]

#: Thread-scheduling orders (see docs/cuda_runtime.md), in the runtime's numbering:
#: ``round_robin`` resumes the next runnable thread after the last one (blocks in order), so
#: warps advance in lockstep from one synchronization point to the next; ``reverse`` the same,
#: descending (blocks in reverse order); ``greedy`` always the lowest runnable thread, so warp 0
#: runs as far as it can (to the next barrier) before warp 1 starts, which is what exposes a
#: missing barrier; ``random`` a seeded random thread (blocks shuffled); ``greedy_reverse``
#: always the highest runnable thread (the last warp runs ahead; blocks descending).
SCHEDULES = ("round_robin", "reverse", "greedy", "random", "greedy_reverse")
_KINDS = {0: "pointer", 1: "int", 2: "unsigned", 3: "float", 4: "bytes"}
MAX_THREADS = 1024
MAX_BLOCK = (1024, 1024, 64)
MAX_GRID = (2**31 - 1, 65535, 65535)


class EmulatedKernelError(RuntimeError):
    """A kernel did something the hardware would not define or survive (a deadlock, a misaligned
    or non-shared ``ldmatrix`` address, a lane that left a warp collective, an assert, a fault).
    The message names the kernel, the block, the thread and the source line."""

    def __init__(self, kernel: str, message: str) -> None:
        self.kernel = kernel
        super().__init__(message)


class _Param(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("size", ctypes.c_int), ("const_pointee", ctypes.c_int)]


class _Kernel(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("invoke", ctypes.c_void_p),
        ("nparams", ctypes.c_int),
        ("params", ctypes.POINTER(_Param)),
        ("max_threads", ctypes.c_int),
    ]


class _Module(ctypes.Structure):
    _fields_ = [
        ("abi", ctypes.c_int),
        ("nkernels", ctypes.c_int),
        ("kernels", ctypes.POINTER(_Kernel)),
        ("tls_probe", ctypes.c_void_p),
        ("dyn_smem_capacity", ctypes.c_size_t),
    ]


class _Stats(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "blocks", "threads", "switches", "barriers", "warp_collectives", "cp_async_copies", "float_atomics",
        "max_stack_bytes", "smem_window_bytes")]


@dataclass(frozen=True)
class Param:
    """One kernel parameter: ``kind`` is pointer | int | unsigned | float | bytes; ``size`` in bytes."""

    kind: str
    size: int
    const_pointee: bool


@dataclass(frozen=True)
class KernelInfo:
    """A kernel of a program: its name, parameters and ``__launch_bounds__`` (0 when none)."""

    name: str
    params: tuple[Param, ...]
    max_threads: int


@dataclass(frozen=True)
class LaunchStats:
    """What one launch did: blocks, threads, context switches, block barriers, completed warp
    collectives, cp.async copies, float atomics (their order, so their rounding, depends on the
    schedule), the deepest thread stack (bytes) and the shared-memory window (bytes)."""

    blocks: int
    threads: int
    switches: int
    barriers: int
    warp_collectives: int
    cp_async_copies: int
    float_atomics: int
    max_stack_bytes: int
    smem_window_bytes: int


_RUNTIMES: dict[str, ctypes.CDLL] = {}
_LOAD_LOCK = threading.Lock()


def _runtime(path: Path) -> ctypes.CDLL:
    with _LOAD_LOCK:
        lib = _RUNTIMES.get(str(path))
        if lib is None:
            lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            f = lib.sparsify_emu_launch
            f.restype = ctypes.c_int
            f.argtypes = [
                ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_uint64, ctypes.c_size_t,
                ctypes.POINTER(_Stats), ctypes.c_char_p, ctypes.c_size_t,
            ]
            _RUNTIMES[str(path)] = lib
        return lib


def _dims(what: str, v, limits: tuple[int, int, int]) -> tuple[int, int, int]:
    if isinstance(v, (int, np.integer)):
        v = (int(v),)
    try:
        t = tuple(int(x) for x in v)
    except TypeError:
        raise TypeError(f"sparsify emulator: {what} must be an int or a tuple of up to 3 ints. Got {v!r}.") from None
    if not 1 <= len(t) <= 3:
        raise ValueError(f"sparsify emulator: {what} must have 1 to 3 dimensions. Got {t}.")
    t = t + (1,) * (3 - len(t))
    for i, (x, lim) in enumerate(zip(t, limits)):
        if not 1 <= x <= lim:
            raise ValueError(
                f"sparsify emulator: {what} {t} is invalid: dimension {'xyz'[i]} must be in [1, {lim}] "
                "(the CUDA limit; the driver refuses the launch)."
            )
    return t


def _pack(kernel: KernelInfo, i: int, p: Param, arg) -> bytes:
    where = f"sparsify emulator: kernel {kernel.name}, argument {i}"
    if p.kind == "bytes":
        if isinstance(arg, (bytes, bytearray)) and len(arg) == p.size:
            return bytes(arg)
        if isinstance(arg, np.void) and arg.dtype.itemsize == p.size:
            return arg.tobytes()
        raise TypeError(f"{where}: the parameter is a {p.size}-byte struct; pass bytes of that length. Got {arg!r}.")
    if not isinstance(arg, np.generic):
        raise TypeError(
            f"{where}: expected an explicitly typed numpy scalar for a {p.size}-byte {p.kind} parameter "
            f"(pointers np.uint64, int np.int32, float np.float32). Got {type(arg).__name__} {arg!r}."
        )
    ok = {
        "pointer": arg.dtype == np.uint64,
        "int": arg.dtype.kind in "iu" and arg.dtype.itemsize == p.size,
        "unsigned": arg.dtype.kind in "iu" and arg.dtype.itemsize == p.size,
        "float": arg.dtype.kind == "f" and arg.dtype.itemsize == p.size,
    }[p.kind]
    if not ok:
        want = {"pointer": "np.uint64", "int": f"np.int{8 * p.size}", "unsigned": f"np.uint{8 * p.size}",
                "float": f"np.float{8 * p.size}"}[p.kind]
        raise TypeError(
            f"{where}: the parameter is a {p.size}-byte {p.kind}; pass {want}. Got np.{arg.dtype} — on a GPU "
            "this would be packed with the wrong size or type."
        )
    return arg.tobytes()


class Program:
    """A built, loaded program.  ``kernels`` maps names to :class:`KernelInfo`; ``launch`` runs one."""

    def __init__(self, result: BuildResult, name: str) -> None:
        self.name = name
        self.key = result.key
        self.path = result.library
        self.log = result.record.get("log", "")
        self._rt = _runtime(result.runtime)
        self._lib = ctypes.CDLL(str(result.library))
        get = self._lib.sparsify_emu_get_module
        get.restype = ctypes.POINTER(_Module)
        self._module = get()
        mod = self._module.contents
        self.dynamic_shared_capacity = int(mod.dyn_smem_capacity)
        self.kernels: dict[str, KernelInfo] = {}
        self._index: dict[str, int] = {}
        for k in range(mod.nkernels):
            kern = mod.kernels[k]
            params = tuple(
                Param(_KINDS.get(kern.params[j].kind, "bytes"), kern.params[j].size, bool(kern.params[j].const_pointee))
                for j in range(kern.nparams)
            )
            kname = kern.name.decode()
            self.kernels[kname] = KernelInfo(kname, params, int(kern.max_threads))
            self._index[kname] = k

    def __repr__(self) -> str:
        return f"<emulated program {self.name!r}: {', '.join(self.kernels)}>"

    def launch(self, kernel: str, grid, block, args, *, shared_bytes: int = 0, schedule: str = "round_robin",
               seed: int = 0, stack_bytes: int = 64 * 1024) -> LaunchStats:
        """Run ``kernel`` over ``grid`` thread blocks of ``block`` threads, as ``cuLaunchKernel`` would.

        ``args`` are the kernel's arguments in order, as the CUDA launcher passes them: explicitly
        typed numpy scalars (pointers ``np.uint64(tensor.data_ptr())`` of CPU tensors, ``int``
        ``np.int32`` ...).  ``shared_bytes`` is the dynamic shared memory (``extern __shared__``).
        Raises :class:`EmulatedKernelError` when the kernel faults, deadlocks or misuses an
        instruction, ``ValueError`` / ``TypeError`` for a launch the driver would refuse."""
        info = self.kernels.get(kernel)
        if info is None:
            raise KeyError(f"sparsify emulator: program {self.name!r} has no kernel {kernel!r}; it has {sorted(self.kernels)}.")
        g = _dims("grid", grid, MAX_GRID)
        b = _dims("block", block, MAX_BLOCK)
        threads = b[0] * b[1] * b[2]
        if threads > MAX_THREADS:
            raise ValueError(f"sparsify emulator: block {b} has {threads} threads; CUDA allows at most {MAX_THREADS}.")
        if info.max_threads and threads > info.max_threads:
            raise ValueError(
                f"sparsify emulator: kernel {kernel} is declared __launch_bounds__({info.max_threads}); a block of "
                f"{threads} threads would fail to launch on a GPU."
            )
        if schedule not in SCHEDULES:
            raise ValueError(f"sparsify emulator: unknown schedule {schedule!r}; expected one of {SCHEDULES}.")
        if not 0 <= int(shared_bytes) <= self.dynamic_shared_capacity:
            raise ValueError(
                f"sparsify emulator: {shared_bytes} bytes of dynamic shared memory requested; program {self.name!r} "
                f"was built with max_dynamic_shared_bytes={self.dynamic_shared_capacity}."
            )
        if not 16 * 1024 <= int(stack_bytes) <= 64 * 1024 * 1024:
            raise ValueError(f"sparsify emulator: stack_bytes={stack_bytes} must be in [16 KiB, 64 MiB].")
        args = tuple(args)
        if len(args) != len(info.params):
            raise TypeError(
                f"sparsify emulator: kernel {kernel} takes {len(info.params)} arguments; got {len(args)}."
            )
        packed = [_pack(info, i, p, a) for i, (p, a) in enumerate(zip(info.params, args))]
        buffers = [ctypes.create_string_buffer(x, max(len(x), 8)) for x in packed]
        argv = (ctypes.c_void_p * max(1, len(buffers)))(*[ctypes.addressof(x) for x in buffers])
        stats = _Stats()
        err = ctypes.create_string_buffer(4096)
        rc = self._rt.sparsify_emu_launch(
            ctypes.cast(self._module, ctypes.c_void_p), self._index[kernel], (ctypes.c_uint * 3)(*g),
            (ctypes.c_uint * 3)(*b), int(shared_bytes), argv, SCHEDULES.index(schedule), int(seed) & (2**64 - 1),
            int(stack_bytes), ctypes.byref(stats), err, len(err),
        )
        if rc != 0:
            raise EmulatedKernelError(kernel, err.value.decode(errors="replace"))
        return LaunchStats(*(int(getattr(stats, f)) for f, _ in _Stats._fields_))
