"""The CUDA executor equals the float64 CPU reference (needs a GPU; skipped without one).

Properties, each on fresh random inputs, with the allocator poisoned with NaN
first so an output element a kernel forgets to write shows up:
* for every math path (float16, bfloat16, float32 FFMA, float32 TF32) x block
  size x epilogue (activation x bias x residual x output cast) x M in
  {1, 7, 64, 1000, 4096}, forward equals the reference;
* every kernel instantiation (each tile configuration, forced) computes its op
  (forward, dX, dW) correctly at every M, on row-aligned and ragged shapes;
* gradients through ``torch.ops.sparsify.bsmm`` equal float64 autograd on the CPU;
* misaligned inputs, side streams and a second GPU give the same results.

Tolerances (``||y - ref|| / ||ref||``): 1e-5 for float32 FFMA; 3e-3 for
float16, bfloat16 and TF32.  A 16-bit output is compared with the reference
rounded to that dtype: the rounding of the result itself is not kernel error.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache
from types import SimpleNamespace

import pytest
import torch
from sparsify.runtime.executors.cpu import CPUExecutor
from sparsify.runtime.layout import BlockSparseLayout

from tests.helpers import rel_err

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
MS = (1, 7, 64, 1000, 4096)
ACTS = ("none", "relu", "gelu", "gelu_tanh", "silu")
EPILOGUES = list(itertools.product(ACTS, (False, True), (False, True), ("same", "cast")))
MATH_DTYPE = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "tf32": torch.float32}
TOL = {"f16": 3e-3, "bf16": 3e-3, "tf32": 3e-3, "f32": 1e-5}
CAST_TO = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.bfloat16}


def _math_blocks():
    from sparsify.runtime.cuda import kernels

    return [(m, b) for m in kernels.MATHS for b in kernels.BLOCK_SIZES[m]]


def _all_specs(op):
    from sparsify.runtime.cuda import kernels

    return [k for p in kernels.programs() for k in p.kernels if k.op == op]


@pytest.fixture(scope="module")
def executor():
    from sparsify.runtime.cuda.executor import CUDAExecutor

    return CUDAExecutor(torch.device("cuda"))  # on a GPU machine this must work


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory, executor):
    monkeypatch.setenv("SPARSIFY_AUTOTUNE", "0")
    executor.forced.clear()
    yield
    executor.forced.clear()
    torch.backends.cuda.matmul.allow_tf32 = False


def _set_math(math_):
    torch.backends.cuda.matmul.allow_tf32 = math_ == "tf32"


def poison(*shapes_dtypes):
    """Leave NaN-filled blocks of each output's size in the caching allocator, so outputs that
    torch.empty hands out next start as NaN (0xFF bytes are NaN in every float dtype)."""
    blocks = []
    for shape, dtype in shapes_dtypes:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        for _ in range(4):
            blocks.append(torch.full((max(1, nbytes),), 255, dtype=torch.uint8, device=DEVICE))
    del blocks


@lru_cache(maxsize=64)
def _case(block: int, m: int, ragged: bool, seed: int):
    """A random layout (one empty block row, one full) and float64 operands, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    n = 3 * block + (5 if ragged else 0)
    k = 4 * block + (3 if ragged else 0)
    nbr, nbc = -(-n // block), -(-k // block)
    mask = torch.rand(nbr, nbc, generator=g) < 0.5
    mask[0] = False
    mask[-1] = True
    layout = BlockSparseLayout.from_block_mask(mask, shape=(n, k), block_size=block)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    return SimpleNamespace(
        layout=layout, n=n, k=k, m=m,
        values=layout.values_from_dense(w),
        x=torch.randn(m, k, generator=g, dtype=torch.float64),
        dy=torch.randn(m, n, generator=g, dtype=torch.float64),
        bias=torch.randn(n, generator=g, dtype=torch.float64),
        residual=torch.randn(m, n, generator=g, dtype=torch.float64),
    )


def _meta(layout, device):
    return SimpleNamespace(**{name: t.to(device) for name, t in layout.metadata().items()})


def _rounded(t, dtype):
    """``t`` as the kernel sees it: rounded to ``dtype`` (float64 on the CPU)."""
    return t.to(dtype).double()


def _check(got, ref, math_, what, tol=None):
    got = got.detach().cpu()
    assert not got.isnan().any(), f"{what}: NaN in the output (an element was not written)"
    tol = TOL[math_] if tol is None else tol
    if got.dtype in (torch.float16, torch.bfloat16):
        # Compare with the reference rounded the same way; a result within 1e-5 can still round
        # to the neighbouring 16-bit value, so a 16-bit output gets the 16-bit tolerance.
        ref = ref.to(got.dtype).double()
        tol = max(tol, TOL["bf16"])
    err = rel_err(got, ref)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"


def _forward(executor, math_, c, act, has_bias, has_res, out, what):
    dtype = MATH_DTYPE[math_]
    _set_math(math_)
    out_dtype = dtype if out == "same" else CAST_TO[dtype]
    x, values = c.x.to(dtype), c.values.to(dtype)
    bias = c.bias.to(dtype) if has_bias else None
    residual = c.residual.to(dtype) if has_res else None
    ref = CPUExecutor().forward(
        _rounded(c.x, dtype), _rounded(c.values, dtype), c.layout, None if bias is None else bias.double(),
        None if residual is None else residual.double(), act, c.n,
    )
    poison(((c.m, c.n), out_dtype))
    y = executor.forward(
        x.to(DEVICE), values.to(DEVICE), _meta(c.layout, DEVICE), None if bias is None else bias.to(DEVICE),
        None if residual is None else residual.to(DEVICE), act, c.n, out_dtype,
    )
    assert y.dtype == out_dtype and tuple(y.shape) == (c.m, c.n) and y.device.type == torch.device(DEVICE).type
    _check(y, ref, math_, what)


# ----------------------------------------------------------- forward, full product
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("act,has_bias,has_res,out", EPILOGUES)
@pytest.mark.parametrize("math_,block", _math_blocks())
def test_forward_equals_reference(executor, math_, block, act, has_bias, has_res, out, m):
    c = _case(block, m, True, seed=block * 7919 + m)
    _forward(executor, math_, c, act, has_bias, has_res, out, f"{math_} b{block} {act} M={m}")


# ----------------------------------------------------------- every instantiation
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("spec", _all_specs("fwd"), ids=lambda s: s.name)
def test_every_forward_kernel(executor, spec, m, ragged):
    executor.forced["fwd"] = spec.name
    act, has_bias, has_res, out = EPILOGUES[(sum(map(ord, spec.name)) + m) % len(EPILOGUES)]
    c = _case(spec.block, m, ragged, seed=m + 17)
    _forward(executor, spec.math, c, act, has_bias, has_res, out, spec.name)


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("spec", _all_specs("dx"), ids=lambda s: s.name)
def test_every_dx_kernel(executor, spec, m, ragged):
    executor.forced["dx"] = spec.name
    dtype = MATH_DTYPE[spec.math]
    _set_math(spec.math)
    c = _case(spec.block, m, ragged, seed=m + 29)
    ref = CPUExecutor().grad_input(_rounded(c.dy, dtype), _rounded(c.values, dtype), c.layout, c.k)
    poison(((c.m, c.k), dtype))
    dx = executor.grad_input(c.dy.to(dtype).to(DEVICE), c.values.to(dtype).to(DEVICE), _meta(c.layout, DEVICE), c.k)
    assert dx.dtype == dtype and tuple(dx.shape) == (c.m, c.k)
    _check(dx, ref, spec.math, spec.name)


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("spec", _all_specs("dw"), ids=lambda s: s.name)
def test_every_dw_kernel(executor, spec, m, ragged):
    executor.forced["dw"] = spec.name
    dtype = MATH_DTYPE[spec.math]
    _set_math(spec.math)
    c = _case(spec.block, m, ragged, seed=m + 41)
    ref = CPUExecutor().grad_weight(_rounded(c.dy, dtype), _rounded(c.x, dtype), c.layout, spec.block)
    poison(((c.layout.nnz, spec.block, spec.block), dtype))
    dw = executor.grad_weight(c.dy.to(dtype).to(DEVICE), c.x.to(dtype).to(DEVICE), _meta(c.layout, DEVICE), spec.block)
    assert dw.dtype == dtype and tuple(dw.shape) == (c.layout.nnz, spec.block, spec.block)
    _check(dw, ref, spec.math, spec.name)


@pytest.mark.parametrize("m", [4096, 20000])
@pytest.mark.parametrize("math_,block", [("f16", 32), ("bf16", 64), ("f32", 8)])
def test_dw_split_over_m_with_few_blocks(executor, math_, block, m):
    """Few stored blocks and a long M: the reduction is split across thread blocks."""
    dtype = MATH_DTYPE[math_]
    g = torch.Generator().manual_seed(m)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1, 2] = mask[3, 0] = True
    layout = BlockSparseLayout.from_block_mask(mask, shape=(4 * block, 4 * block), block_size=block)
    dy = torch.randn(m, 4 * block, generator=g, dtype=torch.float64)
    x = torch.randn(m, 4 * block, generator=g, dtype=torch.float64)
    ref = CPUExecutor().grad_weight(_rounded(dy, dtype), _rounded(x, dtype), layout, block)
    dw = executor.grad_weight(dy.to(dtype).to(DEVICE), x.to(dtype).to(DEVICE), _meta(layout, DEVICE), block)
    _check(dw, ref, math_, f"dw split {math_} b{block} M={m}")


# ----------------------------------------------------------- dX and gradients
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("math_,block", _math_blocks())
def test_grad_input_equals_reference(executor, math_, block, m):
    dtype = MATH_DTYPE[math_]
    _set_math(math_)
    c = _case(block, m, True, seed=block + m)
    ref = CPUExecutor().grad_input(_rounded(c.dy, dtype), _rounded(c.values, dtype), c.layout, c.k)
    poison(((c.m, c.k), dtype))
    dx = executor.grad_input(c.dy.to(dtype).to(DEVICE), c.values.to(dtype).to(DEVICE), _meta(c.layout, DEVICE), c.k)
    _check(dx, ref, math_, f"dx {math_} b{block} M={m}")


@pytest.mark.parametrize("act", ["none", "gelu"])
@pytest.mark.parametrize("m", [1, 7, 1000])
@pytest.mark.parametrize("math_,block", _math_blocks())
def test_gradients_through_the_op(math_, block, m, act):
    """Autograd through torch.ops.sparsify.bsmm on the GPU equals float64 autograd on the CPU.

    With an activation, ops.py computes its gradient with torch in the input dtype (outside
    the kernels), so 16-bit runs get 1e-2 there; without one, every step is a kernel."""
    from sparsify.runtime.executors import executor_for

    assert executor_for(torch.device("cuda")).name == "cuda"
    dtype = MATH_DTYPE[math_]
    _set_math(math_)
    c = _case(block, m, True, seed=3 * m + block)
    meta64 = list(c.layout.metadata().values())

    def run(device, dt):
        x = _rounded(c.x, dtype).to(device, dt).requires_grad_()
        v = _rounded(c.values, dtype).to(device, dt).requires_grad_()
        b = _rounded(c.bias, dtype).to(device, dt).requires_grad_()
        r = _rounded(c.residual, dtype).to(device, dt).requires_grad_()
        meta = [t.to(device) for t in meta64]
        y = torch.ops.sparsify.bsmm(x, v, *meta, b, r, c.n, c.k, act)
        y.backward(_rounded(c.dy, dtype).to(device, dt))
        return y, x.grad, v.grad, b.grad, r.grad

    got = run(DEVICE, dtype)
    ref = run("cpu", torch.float64)
    tol = 1e-2 if act != "none" and dtype != torch.float32 else None
    for name, gt, rf in zip(("y", "dx", "dvalues", "dbias", "dresidual"), got, ref):
        _check(gt, rf, math_, f"{name} {math_} b{block} M={m} {act}", tol)


# ----------------------------------------------------------- launch conditions
@pytest.mark.parametrize("math_", ["f16", "f32"])
def test_misaligned_inputs(executor, math_):
    dtype = MATH_DTYPE[math_]
    c = _case(32, 100, False, seed=5)
    flat = torch.empty(c.m * c.k + 1, dtype=dtype, device=DEVICE)
    x = flat[1:].view(c.m, c.k)  # contiguous, but 2 or 4 bytes off a 16-byte boundary
    x.copy_(c.x.to(dtype))
    assert x.data_ptr() % 16 != 0
    ref = CPUExecutor().forward(_rounded(c.x, dtype), _rounded(c.values, dtype), c.layout, None, None, "none", c.n)
    y = executor.forward(x, c.values.to(dtype).to(DEVICE), _meta(c.layout, DEVICE), None, None, "none", c.n)
    _check(y, ref, math_, "misaligned x")


def test_runs_on_the_current_stream(executor):
    c = _case(32, 1000, True, seed=11)
    values, meta = c.values.half().to(DEVICE), _meta(c.layout, DEVICE)
    ref = CPUExecutor().forward(_rounded(c.x, torch.float16), _rounded(c.values, torch.float16), c.layout,
                                None, None, "relu", c.n)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(10_000_000)  # a busy stream: a launch elsewhere would read x too early
        x = c.x.half().cuda(non_blocking=True) * 1.0
        y = executor.forward(x, values, meta, None, None, "relu", c.n)
        y2 = y * 1.0
    torch.cuda.current_stream().wait_stream(side)
    _check(y2, ref, "f16", "side stream")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device_with_another_current_device():
    from sparsify.runtime.cuda.executor import CUDAExecutor

    ex1 = CUDAExecutor(torch.device("cuda", 1))
    c = _case(16, 64, True, seed=13)
    ref = CPUExecutor().forward(_rounded(c.x, torch.float16), _rounded(c.values, torch.float16), c.layout,
                                None, None, "none", c.n)
    with torch.cuda.device(0):
        y = ex1.forward(c.x.half().to("cuda:1"), c.values.half().to("cuda:1"), _meta(c.layout, "cuda:1"),
                        None, None, "none", c.n)
    assert y.device == torch.device("cuda", 1)
    _check(y, ref, "f16", "cuda:1")


def test_autotuner_chooses_and_persists(executor, monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSIFY_AUTOTUNE", "1")
    monkeypatch.setenv("SPARSIFY_CACHE_DIR", str(tmp_path))
    from sparsify.runtime.cuda.autotune import Autotuner

    monkeypatch.setattr(executor, "tuner", Autotuner(executor.device_name))
    c = _case(32, 1000, True, seed=17)
    _forward(executor, "f16", c, "silu", True, True, "same", "autotuned")
    assert executor.tuner.path.is_file()
    assert any(k.startswith("fwd|m1024|") for k in executor.tuner._load())


def test_operand_errors_name_the_operand(executor):
    c = _case(16, 7, True, seed=19)
    x, values, meta = c.x.half().to(DEVICE), c.values.half().to(DEVICE), _meta(c.layout, DEVICE)
    with pytest.raises(ValueError, match="residual"):
        executor.forward(x, values, meta, None, torch.zeros(3, 3, device=DEVICE), "none", c.n)
    with pytest.raises(ValueError, match="bias.*cpu|cpu.*bias"):
        executor.forward(x, values, meta, torch.zeros(c.n), None, "none", c.n)
    meta.col_indices = meta.col_indices.long()
    with pytest.raises(TypeError, match="col_indices"):
        executor.forward(x, values, meta, None, None, "none", c.n)


def test_unsupported_dtype_falls_back_with_a_warning(executor):
    c = _case(16, 7, True, seed=23)
    with pytest.warns(RuntimeWarning, match="no CUDA kernel"):
        y = executor.forward(c.x.to(DEVICE), c.values.to(DEVICE), _meta(c.layout, DEVICE), None, None, "none", c.n)
    ref = CPUExecutor().forward(c.x, c.values, c.layout, None, None, "none", c.n)
    assert rel_err(y.cpu(), ref) < 1e-12
