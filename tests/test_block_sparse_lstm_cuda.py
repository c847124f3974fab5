"""The fused LSTM gate kernels: they compile for sm_80 / sm_90 without spills, and on the CPU emulator
equal the torch gate math, alone and inside the whole recurrence (against nn.LSTM).

Tolerances: the reference is float64 on the inputs as the kernel reads them; the kernel
computes in fp32 (expf / tanhf within a few ulp), so 1e-5 absolute on values in [-1, 1]
plus half an ulp of the 16-bit output (2**-11 f16, 2**-8 bf16) relative.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

pytest.importorskip("cuda.core", reason="cuda-python is not installed (pip install -e '.[cuda]')")
emulator = pytest.importorskip("sparsify.runtime.emulator")
try:
    emulator.builder.compiler()
    emulator.builder.cuda_include_dirs()
except emulator.EmulatorUnavailableError as exc:  # pragma: no cover - CI has both
    pytest.skip(f"emulator toolchain missing: {exc}", allow_module_level=True)

from sparsify.runtime import ops_lstm  # noqa: E402
from sparsify.runtime.cuda import compiler  # noqa: E402
from sparsify.runtime.cuda import executor_lstm as el  # noqa: E402
from sparsify.runtime.cuda.cache import DiskCache  # noqa: E402
from sparsify.runtime.emulator import EmulatedKernelRuntime  # noqa: E402

from tests.kernel_cases import GATE_CASES, check_gates  # noqa: E402

pytestmark = pytest.mark.xdist_group("nvrtc")
_GATES = el.LSTMGateKernels(EmulatedKernelRuntime(header="lstm_gates.cuh"))


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_gate_kernels_compile_without_spills(tmp_path, arch):
    result = compiler.compile_source(el.PROGRAM.name, el.PROGRAM.source(), arch, cache=DiskCache(tmp_path))
    for spec in el.PROGRAM.kernels:
        res = result.resources[spec.name]
        assert (res.spill_stores, res.spill_loads, res.stack_bytes, res.smem_bytes) == (0, 0, 0, 0), res
        assert res.registers * spec.threads <= 65536


@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(**GATE_CASES)
def test_gate_kernels_equal_the_torch_gate_math(dtype, n, hid, seed):
    check_gates(_GATES, "cpu", dtype, n, hid, seed)


def test_the_recurrence_with_the_gate_kernels_equals_nn_lstm(monkeypatch):
    from sparsify.modules.block_sparse_lstm import BlockSparseLSTM

    monkeypatch.setitem(ops_lstm._GATE_KERNELS, "cpu", _GATES)  # CPU tensors take the emulated kernels
    torch.manual_seed(0)
    ref = torch.nn.LSTM(8, 16, batch_first=True)
    lstm = BlockSparseLSTM.from_dense(ref, density=1.0, block_size=8)
    x = torch.randn(2, 4, 8, requires_grad=True)
    out, (h, c) = lstm(x)
    out_ref, (h_ref, c_ref) = ref(x)
    assert torch.allclose(out, out_ref, atol=1e-5) and torch.allclose(c, c_ref, atol=1e-5)
    (gx,) = torch.autograd.grad(out.sum() + c.sum(), x)
    (gx_ref,) = torch.autograd.grad(out_ref.sum() + c_ref.sum(), x)
    assert torch.allclose(gx, gx_ref, atol=1e-5)  # float32 over 4 steps of 16 units
