"""The block-sparse conv and LSTM-gate kernels on a real GPU (skipped without one).

The same properties as their emulator tests (tests/kernel_cases.py: the case, the
float64 reference and the tolerances), on device memory.  The executors are built
directly, so a kernel that fails to compile or load on the hardware raises here instead
of taking the torch fallback that models use.  More examples than on the emulator: a GPU
runs each case in milliseconds.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from tests.kernel_cases import CONV_GEOMETRY, GATE_CASES, check_conv_case, check_gates

pytestmark = pytest.mark.gpu
_BUILT: dict[str, object] = {}


def _built(name, make):
    if name not in _BUILT:
        _BUILT[name] = make()
    return _BUILT[name]


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(**CONV_GEOMETRY)
def test_conv_kernels_equal_the_masked_dense_conv(dtype, b, nbr, nbc, rc, k, stride, padding, dilation, act, bias,
                                                  residual, seed):
    from sparsify.runtime.cuda import executor_conv as ec

    ex = _built("conv", lambda: ec.CUDAConvExecutor(torch.device("cuda")))
    check_conv_case(ex, "cuda", dtype, b, nbr, nbc, rc, k, stride, padding, dilation, act, bias, residual, seed)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(**GATE_CASES)
def test_gate_kernels_equal_the_torch_gate_math(dtype, n, hid, seed):
    from sparsify.runtime.cuda import executor_lstm as el

    gates = _built("gates", lambda: el.LSTMGateKernels(el._kernel_runtime_class().for_device(torch.device("cuda"))))
    check_gates(gates, "cuda", dtype, n, hid, seed)
