"""Every block-sparse kernel, run on the CPU emulator through the CUDA executor, equals the
float64 CPU reference.

The executor is the GPU's (``CUDAExecutor``) on the emulator's runtime, so kernel
choice, grid, arguments, alignment flags and workspaces are those a GPU would
get; each test forces one kernel instantiation.  Hypothesis draws the case:
layout (with an empty block row and column, ragged in/out features), M (not a
multiple of the tile; large enough to split dW over M when asked), misaligned
operands, epilogue (activation, bias, residual, output cast, each with its own
dtype), and two thread-scheduling orders (one where a warp runs ahead to the
next barrier, one interleaved); outputs start as NaN.

Tolerances.  The reference takes the kernel's inputs rounded exactly as the
kernel sees them (to f16 / bf16, or by cvt.rna to tf32), so products agree
exactly and the only kernel-side error is f32 accumulation and the f32
epilogue: for K <= 2200 terms of random sign that is ~sqrt(K) * 2**-24 ~ 3e-6
of the norm, so f32 outputs must be within 2e-5 (a missed tf32 rounding is
~3e-4, a wrong fragment O(1)).  A 16-bit output is the f32 result rounded once:
each element must be within half an ulp of the exact value (2**-11 relative for
f16, 2**-8 for bf16) plus 2e-5 of the largest output for the accumulation.

CI runs a representative subset of the 106 instantiations (every kernel family
x every math path x several block sizes, see ``CI_KERNELS``) with a few examples
each; ``HYPOTHESIS_PROFILE=thorough`` runs every instantiation with more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

emulator = pytest.importorskip("sparsify.runtime.emulator")
try:
    emulator.builder.compiler()
    emulator.builder.cuda_include_dirs()
except emulator.EmulatorUnavailableError as exc:  # pragma: no cover - CI has both
    pytest.skip(f"emulator toolchain missing: {exc}", allow_module_level=True)

from sparsify.runtime.cuda import kernels  # noqa: E402
from sparsify.runtime.executors.cpu import CPUExecutor  # noqa: E402
from sparsify.runtime.layout import BlockSparseLayout  # noqa: E402

MATH_DTYPE = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "tf32": torch.float32}
ACTS = ("none", "relu", "gelu", "gelu_tanh", "silu")
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
HALF_ULP = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
F32_TOL = 2e-5
ALL_SPECS = [k for p in kernels.programs() for k in p.kernels]
#: One or more instantiations of every (kernel family, math path), across block sizes and tile shapes.
CI_KERNELS = (
    "bsmm_fwd_tiled_f16_b32_m64k32w4x1s3", "bsmm_fwd_tiled_bf16_b64_m128k32w4x2s3",
    "bsmm_fwd_tiled_tf32_b16_m64k16w4x1s3", "bsmm_fwd_tiled_f32_b8_m64k8w4x1s4",
    "bsmm_fwd_small_f16_b16_k16w4s3", "bsmm_fwd_small_bf16_b32_k16w4s3",
    "bsmm_fwd_small_tf32_b64_k8w4s2", "bsmm_fwd_small_f32_b32_k16w4s3",
    "bsmm_dx_tiled_f16_b64_m64k32w2x2s3", "bsmm_dx_tiled_bf16_b16_m128k16w4x1s4",
    "bsmm_dx_tiled_tf32_b32_m64k16w4x1s3", "bsmm_dx_tiled_f32_b16_m64k16w4x1s3",
    "bsmm_dx_small_f16_b32_k16w4s3", "bsmm_dx_small_bf16_b16_k16w4s3",
    "bsmm_dx_small_tf32_b8_k8w4s3", "bsmm_dx_small_f32_b64_k8w4s2",
    "bsmm_dw_dw_f16_b16_k64w1x1x4s3", "bsmm_dw_dw_bf16_b32_k32w2x2x1s4",
    "bsmm_dw_dw_tf32_b64_k16w2x2x1s3", "bsmm_dw_dw_f32_b8_k32w1x1x4s3",
    "bsmm_dw_dw_f16_b64_k64w2x2x1s2",
)
THOROUGH = settings().max_examples >= 400
SPECS = ALL_SPECS if THOROUGH else [k for k in ALL_SPECS if k.name in CI_KERNELS]
EXAMPLES = 10 if THOROUGH else 2
_settings = settings(max_examples=EXAMPLES, deadline=None, derandomize=not THOROUGH,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.function_scoped_fixture])


def test_ci_subset_names_real_kernels_and_covers_every_family_and_math():
    names = {k.name for k in ALL_SPECS}
    assert set(CI_KERNELS) <= names
    chosen = [k for k in ALL_SPECS if k.name in CI_KERNELS]
    assert {(k.op, k.kind, k.math) for k in chosen} == {(k.op, k.kind, k.math) for k in ALL_SPECS}
    assert {k.block for k in chosen} == {8, 16, 32, 64}


# ----------------------------------------------------------------------- cases
_EXECUTORS: dict[tuple[int, str | None], object] = {}


def executor(sm_count: int = 132, src_dir: str | None = None):
    """The GPU executor on the emulator's runtime (one per SM count and source directory)."""
    key = (sm_count, src_dir)
    if key not in _EXECUTORS:
        _EXECUTORS[key] = emulator.emulated_executor(sm_count=sm_count, src_dir=src_dir)
    return _EXECUTORS[key]


@dataclass
class Case:
    spec: kernels.KernelSpec
    layout: BlockSparseLayout
    n: int
    k: int
    m: int
    values: torch.Tensor  # float64, [nnz, b, b]
    a: torch.Tensor  # x (fwd, dw) or dy (dx), float64
    dy: torch.Tensor | None  # dw only
    misalign_a: bool
    misalign_v: bool
    act: str = "none"
    bias_dtype: torch.dtype | None = None
    res_dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    bias: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    split: bool = False


def make_case(spec, *, seed, nbr, nbc, rn, rk, density, m, misalign_a=False, misalign_v=False, act="none",
              bias_dtype=None, res_dtype=None, out_dtype=None, split=False) -> Case:
    b = spec.block
    g = torch.Generator().manual_seed(seed)
    n, k = nbr * b - rn, nbc * b - rk
    mask = torch.rand(nbr, nbc, generator=g) < density
    mask[0] = False  # an empty block row (forward: output columns = epilogue of 0)
    mask[:, 0] = False  # an empty block column (dX: input columns get 0)
    mask[-1, 1:] = True  # a full row: the longest walk
    if nbc == 1:
        mask[-1, 0] = True
    layout = BlockSparseLayout.from_block_mask(mask, shape=(n, k), block_size=b)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / math.sqrt(k)
    values = layout.values_from_dense(w)
    cols = n if spec.op == "dx" else k
    a = torch.randn(m, cols, generator=g, dtype=torch.float64)
    dy = torch.randn(m, n, generator=g, dtype=torch.float64) if spec.op == "dw" else None
    c = Case(spec, layout, n, k, m, values, a, dy, misalign_a, misalign_v, act, bias_dtype, res_dtype, out_dtype,
             split=split)
    if bias_dtype is not None:
        c.bias = torch.randn(n, generator=g, dtype=torch.float64).to(bias_dtype)
    if res_dtype is not None:
        c.residual = torch.randn(m, n, generator=g, dtype=torch.float64).to(res_dtype)
    return c


@st.composite
def cases(draw, spec: kernels.KernelSpec) -> Case:
    b = spec.block
    nbr = draw(st.integers(2, 4))
    nbc = draw(st.integers(2, 5))
    rn = draw(st.integers(0, b - 1))
    rk = draw(st.integers(0, b - 1))
    split = False
    if spec.op == "dw":
        split = draw(st.booleans())
        bkm = spec.config.bkm
        m = draw(st.integers(16 * bkm, 16 * bkm + 2 * bkm)) if split else draw(st.integers(1, 3 * bkm))
    elif spec.kind == "small":
        m = draw(st.integers(1, 40))
    else:
        m = draw(st.integers(1, min(2 * spec.config.bm + 9, 180)))
    kw = dict(seed=draw(st.integers(0, 2**20)), nbr=nbr, nbc=nbc, rn=rn, rk=rk,
              density=draw(st.floats(0.2, 0.9)), m=m, misalign_a=draw(st.booleans()),
              misalign_v=draw(st.booleans()), split=split)
    if spec.op == "fwd":
        kw.update(act=draw(st.sampled_from(ACTS)),
                  bias_dtype=draw(st.sampled_from((None, *FLOATS))),
                  res_dtype=draw(st.sampled_from((None, *FLOATS))),
                  out_dtype=draw(st.sampled_from((None, *FLOATS))))
    return make_case(spec, **kw)


# ----------------------------------------------------------------------- running and checking
def tf32_rna(t: torch.Tensor) -> torch.Tensor:
    """cvt.rna.tf32.f32 of a float32 tensor (finite values): round the magnitude to 10 mantissa
    bits, ties away from zero."""
    bits = t.contiguous().view(torch.int32).to(torch.int64)
    return ((bits + 0x1000) & 0xFFFFE000).to(torch.int64).to(torch.int32).view(torch.float32)


def as_kernel_sees(t: torch.Tensor, math_: str) -> torch.Tensor:
    """The float64 value of an operand after the kernel's own rounding."""
    r = t.to(MATH_DTYPE[math_])
    return (tf32_rna(r) if math_ == "tf32" else r).double()


def _placed(t: torch.Tensor, misalign: bool) -> torch.Tensor:
    """``t`` contiguous, its storage one element past a 16-byte boundary when ``misalign``."""
    if not misalign:
        return t.contiguous()
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


def _meta(layout):
    return SimpleNamespace(**layout.metadata())


def run(ex, case: Case, schedule: str, seed: int = 0) -> tuple[torch.Tensor, list]:
    """Run the case's kernel on the emulated executor; returns the output and the launches."""
    spec = case.spec
    dtype = MATH_DTYPE[spec.math]
    torch.backends.cuda.matmul.allow_tf32 = spec.math == "tf32"
    try:
        ex.forced.clear()
        ex.forced[spec.op] = spec.name
        ex.runtime.schedule, ex.runtime.seed = schedule, seed
        ex.runtime.launches.clear()
        a = _placed(case.a.to(dtype), case.misalign_a)
        v = _placed(case.values.to(dtype), case.misalign_v)
        meta = _meta(case.layout)
        if spec.op == "fwd":
            out = ex.forward(a, v, meta, case.bias, case.residual, case.act, case.n, case.out_dtype)
        elif spec.op == "dx":
            out = ex.grad_input(a, v, meta, case.k)
        else:
            dy = _placed(case.dy.to(dtype), case.misalign_v)
            out = ex.grad_weight(dy, a, meta, spec.block)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        ex.forced.clear()
    return out, list(ex.runtime.launches)


def reference(case: Case) -> torch.Tensor:
    spec, cpu = case.spec, CPUExecutor()
    r = lambda t: as_kernel_sees(t, spec.math)  # noqa: E731
    if spec.op == "fwd":
        return cpu.forward(r(case.a), r(case.values), case.layout,
                           None if case.bias is None else case.bias.double(),
                           None if case.residual is None else case.residual.double(), case.act, case.n)
    if spec.op == "dx":
        return cpu.grad_input(r(case.a), r(case.values), case.layout, case.k)
    return cpu.grad_weight(r(case.dy), r(case.a), case.layout, spec.block)


def mismatch(got: torch.Tensor, ref: torch.Tensor, what: str) -> str | None:
    """Why ``got`` is not ``ref`` within the tolerance of its dtype (module docstring), or None."""
    if got.shape != ref.shape:
        return f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if got.isnan().any():
        idx = got.isnan().nonzero()[0].tolist()
        return f"{what}: NaN in the output (e.g. at {idx}): an element was not written or read poison"
    g = got.double()
    if got.dtype in HALF_ULP:
        bound = HALF_ULP[got.dtype] * ref.abs() + F32_TOL * ref.abs().max().clamp_min(1e-30)
        bad = (g - ref).abs() > bound
        if bad.any():
            i = bad.nonzero()[0].tolist()
            return f"{what}: {int(bad.sum())} elements beyond half an ulp, e.g. {i}: {g[tuple(i)]:.6g} vs {ref[tuple(i)]:.6g}"
        return None
    err = float((g - ref).norm() / ref.norm().clamp_min(1e-30))
    return None if err < F32_TOL else f"{what}: relative error {err:.3g} >= {F32_TOL}"


def check_case(ex, case: Case, schedules: tuple[str, ...], seed: int = 0) -> str | None:
    """Run ``case`` under each schedule: every run must equal the reference, the runs must agree
    bit for bit unless float atomics made their order (and rounding) schedule-dependent, and the
    forced kernel (and the dW split) must be what ran.  Returns the first failure, or None."""
    ref = reference(case)
    outs = []
    for sch in schedules:
        try:
            out, launches = run(ex, case, sch, seed)
        except emulator.EmulatedKernelError as exc:
            return f"{case.spec.name} [{sch}]: {exc}"
        names = [ln[0] for ln in launches]
        assert names == [case.spec.name], f"expected one launch of {case.spec.name}, got {names}"
        if case.spec.op == "dw":
            splits = launches[0][1][1]
            assert (splits > 1) == case.split, f"dW split over M: grid {launches[0][1]}, expected split={case.split}"
        why = mismatch(out, ref, f"{case.spec.name} [{sch}] m={case.m} n={case.n} k={case.k}")
        if why:
            return why
        outs.append((out, sum(ln[3].float_atomics for ln in launches)))
    (first, fa), rest = outs[0], outs[1:]
    for out, fb in rest:
        if fa == 0 and fb == 0 and not torch.equal(out, first):
            return f"{case.spec.name}: schedules {schedules} disagree without float atomics (a race)"
    return None


#: Every example runs under a warp-skewing schedule (one warp runs ahead to the next barrier: the
#: one that exposes a missing barrier) and an interleaving one.
SKEWING = ("greedy", "greedy_reverse")
schedule_pairs = st.tuples(st.sampled_from(SKEWING),
                           st.sampled_from([s for s in emulator.SCHEDULES if s not in SKEWING]))


# ----------------------------------------------------------------------- the properties
@pytest.mark.parametrize("spec", [s for s in SPECS if s.op == "fwd"], ids=lambda s: s.name)
@_settings
@given(data=st.data())
def test_forward_kernel_equals_reference(spec, data):
    case = data.draw(cases(spec))
    assert check_case(executor(), case, data.draw(schedule_pairs), data.draw(st.integers(0, 99))) is None


@pytest.mark.parametrize("spec", [s for s in SPECS if s.op == "dx"], ids=lambda s: s.name)
@_settings
@given(data=st.data())
def test_dx_kernel_equals_reference(spec, data):
    case = data.draw(cases(spec))
    assert check_case(executor(), case, data.draw(schedule_pairs), data.draw(st.integers(0, 99))) is None


@pytest.mark.parametrize("spec", [s for s in SPECS if s.op == "dw"], ids=lambda s: s.name)
@_settings
@given(data=st.data())
def test_dw_kernel_equals_reference(spec, data):
    case = data.draw(cases(spec))
    why = check_case(executor(132 if case.split else 1), case, data.draw(schedule_pairs), data.draw(st.integers(0, 99)))
    assert why is None


def test_heuristic_choice_on_the_emulator_is_the_gpu_heuristic():
    """Unforced, the emulated executor runs what kernels.heuristic picks (no timing)."""
    ex = executor()
    spec = kernels.heuristic("fwd", "f32", 16, 5)
    case = make_case(spec, seed=1, nbr=2, nbc=3, rn=3, rk=1, density=0.6, m=5)
    ex.runtime.launches.clear()
    y = ex.forward(case.a.float(), case.values.float(), _meta(case.layout), None, None, "none", case.n)
    assert [ln[0] for ln in ex.runtime.launches] == [spec.name]
    assert mismatch(y, reference(case), "heuristic") is None


# ----------------------------------------------------------------------- every epilogue, every split
_EPILOGUE_KERNELS = ("bsmm_fwd_small_f16_b16_k16w4s3", "bsmm_fwd_tiled_f32_b16_m64k16w4x1s3")


@pytest.mark.parametrize("out_dtype", (None, *FLOATS), ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kernel", _EPILOGUE_KERNELS)
def test_every_epilogue(kernel, act, out_dtype):
    """Each activation x output cast, with bias and residual in the other dtypes (fixed cases, so
    CI covers them all whatever hypothesis draws above)."""
    spec = next(k for k in ALL_SPECS if k.name == kernel)
    i = ACTS.index(act)
    case = make_case(spec, seed=11 + i, nbr=3, nbc=3, rn=2, rk=5, density=0.6, m=21 if spec.kind == "small" else 70,
                     act=act, bias_dtype=FLOATS[i % 3], res_dtype=FLOATS[(i + 1) % 3], out_dtype=out_dtype)
    assert check_case(executor(), case, ("greedy", "round_robin")) is None


@pytest.mark.parametrize("kernel", ["bsmm_dw_dw_f32_b8_k32w1x1x4s3", "bsmm_dw_dw_bf16_b32_k32w2x2x1s4"])
def test_dw_split_over_m(kernel):
    """Few stored blocks and a long M: the reduction is split across thread blocks into the fp32
    workspace (poisoned like every output) and summed by the executor."""
    spec = next(k for k in ALL_SPECS if k.name == kernel)
    case = make_case(spec, seed=5, nbr=2, nbc=2, rn=1, rk=0, density=0.5, m=16 * spec.config.bkm + 7, split=True)
    assert check_case(executor(132), case, ("greedy_reverse", "random")) is None
