"""The emulator catches typical kernel bugs: each is planted in a copy of cuda_src/, the copy is
built for the emulator, and the emulated property check of test_emulator_bsmm must fail on it
(and pass on the unmodified copy).

The cases are fixed, chosen so each bug has something to break: the forward layout has a block
row of 4 blocks (with 3 pipeline stages the last stage is stage 0, which the output tile
aliases), M spans two tiles, and every run uses the ``greedy`` schedule (one warp runs ahead to
the next barrier, so a missing barrier is seen), ``greedy_reverse`` (the last warp runs ahead)
and ``round_robin`` (warps in lockstep: it alone misses the barrier bug).
"""

from __future__ import annotations

import shutil

import pytest
from sparsify.runtime.cuda import kernels
from sparsify.runtime.cuda.compiler import SRC_DIR

from tests.test_emulator_bsmm import check_case, executor, make_case

SCHEDULES = ("greedy", "greedy_reverse", "round_robin")

#: name -> (file, original text, buggy text, kernel that runs it)
BUGS = {
    # A warp's A-fragment rows come from lanes 0-15: using lane & 7 loads rows 0-7 twice.
    "ldmatrix_row_offset": ("bsmm_common.cuh", "ldsm_x4(a[mi], As + (mi * 16 + (lane & 15)) * LDA",
                            "ldsm_x4(a[mi], As + (mi * 16 + (lane & 7)) * LDA",
                            "bsmm_fwd_tiled_f16_b32_m64k32w4x1s3"),
    # Waiting for all but STAGES-1 groups lets the stage about to be read still be in flight.
    "wait_group_off_by_one": ("bsmm_dsd.cuh", "    cp_async_wait<STAGES - 2>();\n    __syncthreads();  // stage",
                              "    cp_async_wait<STAGES - 1>();\n    __syncthreads();  // stage",
                              "bsmm_fwd_tiled_f16_b32_m64k32w4x1s3"),
    # The fp32 output tile reuses the staging buffers: without this barrier a fast warp overwrites
    # a stage that slower warps still read.
    "missing_barrier_before_smem_reuse": ("bsmm_dsd.cuh",
                                          "  cp_async_wait<0>();\n  __syncthreads();  // every warp is done with the staging buffers\n",
                                          "  cp_async_wait<0>();\n",
                                          "bsmm_fwd_tiled_f16_b32_m64k32w4x1s3"),
    # dW block stored transposed.
    "transposed_dw_store": ("bsmm_sdd.cuh", "const i64 idx = (static_cast<i64>(blk) * B + i) * B + j;",
                            "const i64 idx = (static_cast<i64>(blk) * B + j) * B + i;",
                            "bsmm_dw_dw_f16_b32_k32w2x2x1s4"),
    # TF32 path: the B fragment's second register reads k + t instead of k + t + 4.
    "tf32_fragment_index": ("bsmm_common.cuh", "b[ni][1] = to_tf32(b_at<BK, LDB>(Bs, k0 + t + 4, ni * 8 + g));",
                            "b[ni][1] = to_tf32(b_at<BK, LDB>(Bs, k0 + t, ni * 8 + g));",
                            "bsmm_dx_tiled_tf32_b32_m64k16w4x1s3"),
}


def _spec(name: str) -> kernels.KernelSpec:
    return next(k for p in kernels.programs() for k in p.kernels if k.name == name)


def _case(spec):
    if spec.op == "dw":
        return make_case(spec, seed=7, nbr=3, nbc=3, rn=5, rk=3, density=0.7, m=90)
    return make_case(spec, seed=7, nbr=3, nbc=5, rn=5, rk=3, density=0.5, m=100, act="gelu",
                     bias_dtype=None if spec.op == "dx" else kernels.MATHS[spec.math][1])


def _copy(tmp_path, name: str | None):
    dst = tmp_path / (name or "clean")
    shutil.copytree(SRC_DIR, dst, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    if name is not None:
        file, old, new, _ = BUGS[name]
        text = (dst / file).read_text()
        assert text.count(old) == 1, f"the bug site of {name} is gone from {file}: update the mutation"
        (dst / file).write_text(text.replace(old, new))
    return str(dst)


@pytest.mark.parametrize("kernel", sorted({b[3] for b in BUGS.values()}))
def test_the_unmodified_copy_passes(tmp_path, kernel):
    spec = _spec(kernel)
    ex = executor(1, _copy(tmp_path, None))
    assert check_case(ex, _case(spec), SCHEDULES) is None


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_a_planted_bug_fails_the_emulated_property_check(tmp_path, bug):
    spec = _spec(BUGS[bug][3])
    ex = executor(1, _copy(tmp_path, bug))
    why = check_case(ex, _case(spec), SCHEDULES)
    assert why is not None, f"the emulator did not catch {bug}"
    print(f"{bug}: {why}")


def test_the_missing_barrier_needs_a_warp_skewing_schedule(tmp_path):
    """Why every property example runs one warp-skewing schedule: warps in lockstep (round robin)
    finish reading the last stage before any of them writes the output tile over it."""
    spec = _spec(BUGS["missing_barrier_before_smem_reuse"][3])
    ex = executor(1, _copy(tmp_path, "missing_barrier_before_smem_reuse"))
    assert check_case(ex, _case(spec), ("round_robin",)) is None
    assert check_case(ex, _case(spec), ("greedy",)) is not None
