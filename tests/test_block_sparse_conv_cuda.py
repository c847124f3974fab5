"""The block-sparse conv CUDA kernels: they compile for sm_80 / sm_90 without spills, and on the CPU
emulator (the executor GPUs run, on ``EmulatedKernelRuntime``) equal F.conv2d with the masked dense weight.

Hypothesis draws the geometry (stride, padding, dilation, kernel, ragged channels),
the layout (empty block rows and columns included), the element type and a bias /
activation / residual epilogue; outputs start as NaN (the emulator poisons them).

Tolerances.  The reference is float64 on the inputs rounded exactly as the kernel
reads them (f16 / bf16 values are exact in float64), so the only error is fp32
accumulation over at most B * taps * blocks terms (< 2000): ~sqrt(K) * 2**-24 of the
norm, so 2e-5 relative for fp32 outputs; a 16-bit output is additionally rounded
once, half an ulp (2**-11 f16, 2**-8 bf16) relative.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
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
from sparsify.runtime.layout import BlockSparseLayout  # noqa: E402
from sparsify.runtime.executors.cpu_conv import dense_conv_weight  # noqa: E402

pytestmark = pytest.mark.xdist_group("nvrtc")
ARCHS = ("sm_80", "sm_90")
HALF_ULP = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 0.0}
F32_TOL = 2e-5


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


def _meta(layout):
    from types import SimpleNamespace

    return SimpleNamespace(**layout.metadata())


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    got, ref = got.double(), ref.double()
    assert not torch.isnan(got).any(), "an output element was never written"
    scale = float(ref.abs().max().clamp_min(1e-30))
    err = (got - ref).abs()
    assert bool((err <= HALF_ULP[dtype] * ref.abs() + F32_TOL * scale).all()), float(err.max() / scale)


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), b=st.sampled_from([8, 16]),
       nbr=st.integers(1, 3), nbc=st.integers(1, 3), rc=st.integers(0, 3), k=st.sampled_from([(1, 1), (3, 3), (2, 3)]),
       stride=st.sampled_from([(1, 1), (2, 1), (2, 2)]), padding=st.sampled_from([(0, 0), (1, 1), (1, 0)]),
       dilation=st.sampled_from([(1, 1), (2, 1)]), act=st.sampled_from(["none", "relu", "silu"]),
       bias=st.booleans(), residual=st.booleans(), schedule=st.sampled_from(["round_robin", "greedy_reverse"]),
       seed=st.integers(0, 1000))
def test_kernels_equal_the_masked_dense_conv(dtype, b, nbr, nbc, rc, k, stride, padding, dilation, act, bias,
                                             residual, schedule, seed):
    g = torch.Generator().manual_seed(seed)
    cout, cin = nbr * b - min(rc, b - 1), nbc * b - min(rc, b - 1)
    mask = torch.rand(nbr, nbc, generator=g) < 0.6
    if nbr > 1:
        mask[0] = False  # an empty block row: its outputs are the epilogue of zero
    mask[-1, -1] = True
    layout = BlockSparseLayout.from_block_mask(mask, shape=(cout, cin), block_size=b)
    n, h, w = 2, 7, 6
    values = (torch.randn(layout.nnz, b, b, *k, generator=g, dtype=torch.float64) / math.sqrt(b)).to(dtype)
    x = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64).to(dtype)
    ho = (h + 2 * padding[0] - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1
    if ho < 1 or wo < 1:
        return
    bias_t = torch.randn(cout, generator=g, dtype=torch.float64).to(dtype) if bias else None
    res_t = torch.randn(n, cout, ho, wo, generator=g, dtype=torch.float64).to(dtype) if residual else None
    meta = _meta(layout)
    ex = _executor(schedule)
    wd = dense_conv_weight(values.double(), meta.row_indices, meta.col_indices, nbr, nbc, cout, cin)
    # forward with the fused epilogue
    y = ex.forward(x, values, meta, bias_t, res_t, act, cout, stride, padding, dilation)
    ref = F.conv2d(x.double(), wd, None if bias_t is None else bias_t.double(), stride, padding, dilation)
    ref = {"none": ref, "relu": F.relu(ref), "silu": F.silu(ref)}[act]
    if res_t is not None:
        ref = ref + res_t.double()
    _close(y, ref, dtype)
    # dX over the transposed layout, and dW of the stored blocks only
    dy = torch.randn(n, cout, ho, wo, generator=g, dtype=torch.float64).to(dtype)
    dx = ex.grad_input(dy, values, meta, cin, (h, w), stride, padding, dilation)
    dx_ref = torch.nn.grad.conv2d_input((n, cin, h, w), wd, dy.double(), stride, padding, dilation)
    _close(dx, dx_ref, dtype)
    dv = ex.grad_weight(dy, x, meta, b, k, stride, padding, dilation)
    dw_ref = torch.nn.grad.conv2d_weight(x.double(), (cout, cin, *k), dy.double(), stride, padding, dilation)
    from sparsify.runtime.executors.cpu_conv import _gather_dense_blocks

    _close(dv, _gather_dense_blocks(dw_ref, meta.row_indices, meta.col_indices, b), dtype)
