"""KernelRuntime.load_kernel, the one place every kernel family's runtime loads kernels through.

Without a GPU the driver is faked (the CUDA context and module loading are the only parts
replaced): a kernel is compiled once per name, a compiled program's module is loaded once per
compiled key however many kernels it holds, and the loader matches the compiled target.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from sparsify.runtime.cuda.launcher import KernelRuntime


class _Module:
    def __init__(self, binary, name):
        self.binary, self.name = binary, name

    def get_kernel(self, name):
        return (self.name, name)


def _runtime(monkeypatch, loads):
    rt = object.__new__(KernelRuntime)
    rt._kernels, rt._modules, rt._lock = {}, {}, threading.Lock()
    rt.index, rt.arch, rt.target = 0, "sm_90", "cubin"
    rt._make_current = lambda: None
    rt._ObjectCode = SimpleNamespace(
        from_cubin=lambda b, name: loads.append(("cubin", name)) or _Module(b, name),
        from_ptx=lambda b, name: loads.append(("ptx", name)) or _Module(b, name))
    monkeypatch.setattr(torch.cuda, "device", lambda index: __import__("contextlib").nullcontext())
    return rt


@pytest.mark.parametrize("target", ["cubin", "ptx"])
def test_each_kernel_compiles_once_and_each_program_loads_once(monkeypatch, target):
    loads, builds = [], []
    rt = _runtime(monkeypatch, loads)

    def build(kernel):
        def b():
            builds.append(kernel)
            return "prog", SimpleNamespace(key="k1", target=target, binary=b"\0")
        return b

    assert rt.load_kernel("a", build("a")) == ("prog", "a")
    assert rt.load_kernel("a", build("a")) == ("prog", "a")   # cached by name: no second build
    assert rt.load_kernel("b", build("b")) == ("prog", "b")   # same program: module reused
    assert builds == ["a", "b"] and loads == [(target, "prog")]


@pytest.mark.parametrize("family", ["bsconv", "lstm_gates", "spatial"])
def test_every_family_compiles_its_own_program(monkeypatch, family):
    """Each family's runtime hands ``load_kernel`` its program (compilation faked: NVRTC itself is
    tested in test_cuda_compile.py and the kernels under the emulator)."""
    from sparsify.runtime.cuda import compiler, executor_conv, executor_lstm
    from sparsify.runtime.spatial import cuda as spatial_cuda

    cls, spec, prog = {
        "bsconv": (executor_conv._kernel_runtime_class(), executor_conv.ConvKernelSpec("fwd", "f32", 16, 64, 128),
                   executor_conv.program_for(16)),
        "lstm_gates": (executor_lstm._kernel_runtime_class(), executor_lstm.GateKernelSpec("fwd", "f32"),
                       executor_lstm.PROGRAM),
        "spatial": (spatial_cuda._kernel_runtime_class(), spatial_cuda.SpatialKernel("hash", "f32"),
                    spatial_cuda.program_for("f32")),
    }[family]
    compiled = []
    monkeypatch.setattr(compiler, "compile_source", lambda name, source, arch, target: compiled.append(
        (name, source == prog.source(), arch, target)) or SimpleNamespace(key=name, target=target, binary=b"\0"))
    loads = []
    rt = _runtime(monkeypatch, loads)
    rt.__class__ = cls
    assert rt.kernel(spec) == (prog.name, spec.name)
    assert rt.kernel(spec) == (prog.name, spec.name)
    assert compiled == [(prog.name, True, "sm_90", "cubin")] and loads == [("cubin", prog.name)]
