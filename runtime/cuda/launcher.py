"""Launching compiled kernels on PyTorch's stream, and the checks before a launch.

* Kernels run on ``torch.cuda.current_stream(device)``, inside a device guard
  (``torch.cuda.device``) with that device's primary context current, so a
  multi-GPU process launches on the tensor's GPU whatever the current device.
* Arguments are explicit: pointers from ``data_ptr()`` as ``np.uint64`` (0 for
  an absent optional tensor), integers as ``np.int32``; their order is the
  parameter list in ``cuda_src/bsmm.cuh``.
* Every operand is checked first (device, dtype, contiguity, index dtype), and
  an error says which operand, what was expected and what to do.  Misalignment
  is not an error: kernels fall back to element-wise loads for an operand whose
  16-byte alignment check (:func:`vec_ok`) fails.

Example:
    >>> import torch
    >>> vec_ok(torch.zeros(4, 8, dtype=torch.float16))
    True
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from . import compiler, kernels

__all__ = ["KernelRuntime", "check_grid", "check_operand", "ptr", "i32", "vec_ok"]


def ptr(t: torch.Tensor | None) -> np.uint64:
    """A tensor's device address as a kernel argument; 0 (nullptr) for None."""
    return np.uint64(0 if t is None else t.data_ptr())


def i32(v: int) -> np.int32:
    """An int kernel argument; refuses values that do not fit (rather than wrapping)."""
    if not -(2**31) <= int(v) < 2**31:
        raise OverflowError(f"sparsify: {v} does not fit the kernels' 32-bit indices; split the operation.")
    return np.int32(v)


def vec_ok(t: torch.Tensor) -> bool:
    """Whether every row of a contiguous tensor starts on a 16-byte boundary (cp.async chunks)."""
    return t.data_ptr() % 16 == 0 and (t.shape[-1] * t.element_size()) % 16 == 0


def check_operand(
    op: str,
    name: str,
    t: torch.Tensor | None,
    device: torch.device,
    dtypes: tuple[torch.dtype, ...] | None = None,
    shape: tuple[int, ...] | None = None,
) -> None:
    """Raise a clear error unless ``t`` is a contiguous tensor on ``device`` with one of ``dtypes``."""
    if t is None:
        return
    where = f"sparsify.{op} (CUDA executor), operand {name!r}"
    if t.device != device:
        raise ValueError(f"{where}: expected a tensor on {device}. Got one on {t.device}; move it with .to({str(device)!r}).")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{where}: expected dtype {' or '.join(map(str, dtypes))}. Got {t.dtype}.")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{where}: expected shape {tuple(shape)}. Got {tuple(t.shape)}.")
    if not t.is_contiguous():
        raise ValueError(f"{where}: expected a contiguous tensor. Got strides {t.stride()}; call .contiguous().")


def check_grid(spec: kernels.KernelSpec, grid: tuple[int, int, int]) -> bool:
    """Whether to launch at all (an empty grid is a no-op); raises for a grid CUDA refuses."""
    if min(grid) <= 0:
        return False
    if grid[1] > 65535 or grid[2] > 65535:
        raise ValueError(f"sparsify: launch grid {grid} of {spec.name} exceeds the CUDA limit of 65535 in y/z.")
    return True


class _TorchStream:
    """A torch stream seen through the ``__cuda_stream__`` protocol."""

    __slots__ = ("handle",)

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


class KernelRuntime:
    """Compiled programs loaded on one device: ``kernel(spec)`` and ``launch(spec, grid, args)``.

    This is the seam below the executor: it also says which device the executor's tensors live
    on (``device``, ``device_name``, ``sm_count``), allocates its outputs (``empty``) and whether
    launches can be timed (``timed``).  The CPU emulator
    (:class:`sparsify.runtime.emulator.EmulatedKernelRuntime`) implements the same interface."""

    #: launches can be timed with CUDA events (the autotuner times candidates only then)
    timed = True

    @classmethod
    def for_device(cls, device: torch.device) -> KernelRuntime:
        """The runtime of a CUDA device; raises CUDAUnavailableError when kernels cannot run there."""
        device = torch.device(device)
        if not torch.cuda.is_available():
            raise compiler.CUDAUnavailableError("torch sees no CUDA device (no driver, or a CPU build of torch)")
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        compiler.nvrtc_version()  # NVRTC loads
        compiler.include_dirs()  # headers are there
        arch, target = compiler.arch_for((props.major, props.minor))
        rt = cls(index, arch, target)
        rt.device_name = props.name
        rt.sm_count = props.multi_processor_count
        return rt

    def __init__(self, index: int, arch: str, target: str) -> None:
        from cuda.core import Device, LaunchConfig, ObjectCode, launch

        self.index, self.arch, self.target = index, arch, target
        self.device = torch.device("cuda", index)
        self.device_name = f"cuda:{index}"
        self.sm_count = 0
        self._Device, self._LaunchConfig, self._ObjectCode, self._launch = Device, LaunchConfig, ObjectCode, launch
        self._device = Device(index)
        self._kernels: dict[str, object] = {}
        self._modules: dict[str, object] = {}
        self._streams: dict[int, object] = {}
        self._configs: dict[tuple, object] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def _make_current(self) -> None:
        # cuda.core needs a current context per thread; torch's device guard
        # has made the primary context of this device current already.
        if getattr(self._local, "current", False):
            return
        self._device.set_current()
        self._local.current = True

    def kernel(self, spec: kernels.KernelSpec):
        """The loaded kernel for ``spec`` (compiling its program on first use)."""
        def build():
            prog_spec = kernels.program_for(spec.math, spec.block)
            return prog_spec.name, compiler.compile_program(prog_spec, self.arch, self.target)

        return self.load_kernel(spec.name, build)

    def load_kernel(self, name: str, build):
        """The loaded kernel ``name``, cached by name; on first use ``build() -> (program name,
        compiled program)`` compiles its program, whose module is loaded once per compiled key.
        Every kernel family's runtime (bsmm, bsconv, LSTM gates, spatial) loads through here."""
        k = self._kernels.get(name)
        if k is not None:
            return k
        prog_name, compiled = build()
        with self._lock, torch.cuda.device(self.index):
            self._make_current()
            mod = self._modules.get(compiled.key)
            if mod is None:
                load = self._ObjectCode.from_cubin if compiled.target == "cubin" else self._ObjectCode.from_ptx
                mod = load(compiled.binary, name=prog_name)
                self._modules[compiled.key] = mod
            k = mod.get_kernel(name)
            self._kernels[name] = k
        return k

    def empty(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized output or workspace on this device."""
        return torch.empty(*shape, dtype=dtype, device=self.device)

    def launch(self, spec: kernels.KernelSpec, grid: tuple[int, int, int], args: tuple) -> None:
        """Launch ``spec`` on the current torch stream of this device.

        This is on every op's path, and at small M the host time is the op's time (measured on
        an H200: 60-120 us a call against cuBLAS's 25-50 us), so what can be is cached: the
        kernel by name, the stream wrapper by handle, the launch configuration by (grid, block);
        the device guard is skipped when this device is already current."""
        if not check_grid(spec, grid):
            return
        kernel = self.kernel(spec)
        if torch.cuda.current_device() == self.index:
            self._launch_here(spec, grid, args, kernel)
        else:
            with torch.cuda.device(self.index):
                self._launch_here(spec, grid, args, kernel)

    def _launch_here(self, spec, grid, args, kernel) -> None:
        self._make_current()
        handle = _raw_stream(self.index)
        stream = self._streams.get(handle)
        if stream is None:
            stream = self._device.create_stream(_TorchStream(handle))
            self._streams[handle] = stream
        key = (grid, spec.threads)
        config = self._configs.get(key)
        if config is None:
            if len(self._configs) > 4096:  # one per grid in use; many sequence lengths would grow it
                self._configs.clear()
            config = self._configs[key] = self._LaunchConfig(grid=grid, block=(spec.threads, 1, 1))
        self._launch(stream, config, kernel, *args)


def _raw_stream(index: int) -> int:
    """The handle of torch's current stream on device ``index`` (torch's own fast accessor where
    it has one, the public API otherwise)."""
    try:
        return torch._C._cuda_getCurrentRawStream(index)
    except (AttributeError, TypeError):
        return torch.cuda.current_stream(index).cuda_stream
