"""The block-sparse conv CUDA kernels: they compile for sm_80 / sm_90 without spills, and on the CPU
emulator (the executor GPUs run, on ``EmulatedKernelRuntime``) equal F.conv2d with the masked dense weight.

Hypothesis draws the geometry (stride, padding, dilation, kernel, ragged channels),
the layout (empty block rows and columns included), the element type and a bias /
activation / residual epilogue; outputs start as NaN (the emulator poisons them).

The property and its tolerances live in tests/kernel_cases.py, shared with the same
property on a real GPU (tests/test_conv_lstm_cuda_gpu.py).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("cuda.core", reason="cuda-python is not installed (pip install -e '.[cuda]')")
emulator = pytest.importorskip("sparsify.runtime.emulator")
try:
    emulator.builder.compiler()
    emulator.builder.cuda_include_dirs()
except emulator.EmulatorUnavailableError as exc:  # pragma: no cover - CI has both
    pytest.skip(f"emulator toolchain missing: {exc}", allow_module_level=True)

from sparsify.runtime.cuda import compiler  # noqa: E402
from sparsify.runtime.cuda import executor_conv as ec  # noqa: E402
from sparsify.runtime.cuda.cache import DiskCache  # noqa: E402
from sparsify.runtime.emulator import EmulatedKernelRuntime  # noqa: E402

from tests.kernel_cases import CONV_GEOMETRY, check_conv_case  # noqa: E402

pytestmark = pytest.mark.xdist_group("nvrtc")
ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    cache = DiskCache(tmp_path_factory.mktemp("bsconv-cache"))
    return {(p.name, a): compiler.compile_source(p.name, p.source(), a, cache=cache)
            for p in ec.programs() for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_conv_kernel_compiles_without_spills(compiled, arch):
    for prog in ec.programs():
        result = compiled[(prog.name, arch)]
        assert result.target == "cubin" and result.binary[:4] == b"\x7fELF"
        for spec in prog.kernels:
            res = result.resources.get(spec.name)
            assert res is not None, f"{spec.name} missing from the ptxas report:\n{result.log}"
            assert (res.spill_stores, res.spill_loads, res.stack_bytes) == (0, 0, 0), f"{spec.name}: {res}"
            assert res.smem_bytes == spec.smem_bytes() <= 48 * 1024, f"{spec.name}: {res}"
            assert res.registers * spec.threads <= 65536, f"{spec.name} cannot launch: {res}"


_EXECUTORS: dict[str, ec.CUDAConvExecutor] = {}


def _executor(schedule: str) -> ec.CUDAConvExecutor:
    if schedule not in _EXECUTORS:
        rt = EmulatedKernelRuntime(header="bsconv.cuh", schedule=schedule)
        _EXECUTORS[schedule] = ec.CUDAConvExecutor(torch.device("cpu"), runtime=rt)
    return _EXECUTORS[schedule]


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(schedule=st.sampled_from(["round_robin", "greedy_reverse"]), **CONV_GEOMETRY)
def test_kernels_equal_the_masked_dense_conv(dtype, b, nbr, nbc, rc, k, stride, padding, dilation, act, bias,
                                             residual, schedule, seed):
    check_conv_case(_executor(schedule), "cpu", dtype, b, nbr, nbc, rc, k, stride, padding, dilation, act, bias,
                     residual, seed)


