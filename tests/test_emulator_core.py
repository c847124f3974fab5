"""The CPU emulator's semantics, on small kernels written for the purpose.

Each PTX instruction is checked against an independent Python transcription of
the PTX ISA text (fragment layouts of ldmatrix and mma, cvt.rna.tf32 rounding,
cp.async group accounting), each CUDA built-in against the Programming Guide's
definition (shuffles, votes, atomics, barriers), and each misuse against the
error it must raise (naming kernel, block, thread and line).  One program holds
all the probe kernels, so the file costs one build.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

emulator = pytest.importorskip("sparsify.runtime.emulator")

try:
    emulator.builder.compiler()
    emulator.builder.cuda_include_dirs()
except emulator.EmulatorUnavailableError as exc:  # pragma: no cover - CI has both
    pytest.skip(f"emulator toolchain missing: {exc}", allow_module_level=True)

P = np.uint64


def ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


PROBES = r"""
#include <cassert>
typedef unsigned u32;

// ldmatrix: 4 row-major 8x8 u16 matrices, rows 16 bytes apart; lane l gives row l%8 of matrix l/8.
template <int N, bool T>
__device__ void ldm_probe(const unsigned short* src, u32* out) {
  __shared__ __align__(16) unsigned short s[4 * 64];
  for (int i = threadIdx.x; i < 256; i += 32) s[i] = src[i];
  __syncthreads();
  const int l = threadIdx.x;
  u32 r[N];
  const u32 addr = (u32)__cvta_generic_to_shared(s + (l / 8) * 64 + (l % 8) * 8);
  if (T) sparsify_emu::ldmatrix_trans(r, addr); else sparsify_emu::ldmatrix(r, addr);
  for (int i = 0; i < N; ++i) out[l * 4 + i] = r[i];
}
extern "C" __global__ void ldm(const unsigned short* src, u32* out, int num, int trans) {
  if (num == 1) { if (trans) ldm_probe<1, true>(src, out); else ldm_probe<1, false>(src, out); }
  if (num == 2) { if (trans) ldm_probe<2, true>(src, out); else ldm_probe<2, false>(src, out); }
  if (num == 4) { if (trans) ldm_probe<4, true>(src, out); else ldm_probe<4, false>(src, out); }
}

// mma: each lane packs its fragment from row-major A [16][K], B [K][8], C [16][8] (raw bits), per
// PTX 9.7.14.5.7 / 9.7.14.5.8, and writes D [16][8] back with the C layout.
extern "C" __global__ void mma(const unsigned short* a16, const u32* a32, const unsigned short* b16, const u32* b32,
                               const float* c, float* d, int op) {
  const int l = threadIdx.x, g = l >> 2, t = l & 3;
  u32 a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float cc[4], dd[4];
  for (int i = 0; i < 4; ++i) cc[i] = c[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)];
  auto pk = [](unsigned short lo, unsigned short hi) { return (u32)lo | ((u32)hi << 16); };
  if (op == 0 || op == 1) {  // m16n8k16
    for (int r = 0; r < 4; ++r) {  // a_{2r}, a_{2r+1} in register r
      const int row = g + ((r & 1) ? 8 : 0), col = 2 * t + ((r & 2) ? 8 : 0);
      a[r] = pk(a16[row * 16 + col], a16[row * 16 + col + 1]);
    }
    for (int r = 0; r < 2; ++r) {
      const int row = 2 * t + (r ? 8 : 0);
      b[r] = pk(b16[row * 8 + g], b16[(row + 1) * 8 + g]);
    }
    if (op == 0) sparsify_emu::mma_m16n8k16_f16(dd, a, b, cc); else sparsify_emu::mma_m16n8k16_bf16(dd, a, b, cc);
  } else if (op == 2) {  // m16n8k8 tf32
    a[0] = a32[g * 8 + t]; a[1] = a32[(g + 8) * 8 + t]; a[2] = a32[g * 8 + t + 4]; a[3] = a32[(g + 8) * 8 + t + 4];
    b[0] = b32[t * 8 + g]; b[1] = b32[(t + 4) * 8 + g];
    sparsify_emu::mma_m16n8k8_tf32(dd, a, b, cc);
  } else {  // m16n8k8 f16 / bf16
    u32 a2[2], b1[1];
    a2[0] = pk(a16[g * 8 + 2 * t], a16[g * 8 + 2 * t + 1]);
    a2[1] = pk(a16[(g + 8) * 8 + 2 * t], a16[(g + 8) * 8 + 2 * t + 1]);
    b1[0] = pk(b16[(2 * t) * 8 + g], b16[(2 * t + 1) * 8 + g]);
    if (op == 3) sparsify_emu::mma_m16n8k8_f16(dd, a2, b1, cc); else sparsify_emu::mma_m16n8k8_bf16(dd, a2, b1, cc);
  }
  for (int i = 0; i < 4; ++i) d[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)] = dd[i];
}

extern "C" __global__ void tf32(const float* x, u32* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = sparsify_emu::cvt_rna_tf32(x[i]);
}

// cp.async: three groups of one 16-byte copy each; after wait_group(n) read all three slots.
extern "C" __global__ void cpasync(const float* src, float* out, int wait_n, int commit_last) {
  __shared__ __align__(16) float s[3][4];
  for (int g = 0; g < 3; ++g) {
    sparsify_emu::cp_async_cg((u32)__cvta_generic_to_shared(s[g]), src + 4 * g, 16);
    if (g < 2 || commit_last) sparsify_emu::cp_async_commit_group();
  }
  sparsify_emu::cp_async_wait_group(wait_n);
  for (int i = 0; i < 12; ++i) out[i] = s[i / 4][i % 4];
}

// Shared memory is poisoned at the start of every block: read before any write.
extern "C" __global__ void fresh_smem(float* out) {
  __shared__ float s[64];
  out[blockIdx.x * 64 + threadIdx.x] = s[threadIdx.x];
  __syncthreads();
  s[threadIdx.x] = 1.0f;
}

// Dynamic shared memory: two extern arrays alias the same bytes.
extern "C" __global__ void dyn(const float* x, float* out, int n) {
  extern __shared__ __align__(16) float dsm[];
  extern __shared__ __align__(16) unsigned char raw[];
  for (int i = threadIdx.x; i < n; i += blockDim.x) dsm[i] = 2.0f * x[i];
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = reinterpret_cast<float*>(raw)[n - 1 - i];
}

// Shuffles and votes; mode 0-3 = idx/up/down/xor, 4 ballot, 5 any, 6 all, 7 reduce_add, 8 syncwarp.
extern "C" __global__ void warpfn(const int* in, int* out, int mode, int arg, int width, unsigned mask) {
  const int l = threadIdx.x & 31;
  if (!((mask >> l) & 1u)) { out[threadIdx.x] = -7; return; }
  const int v = in[threadIdx.x];
  int r = 0;
  switch (mode) {
    case 0: r = __shfl_sync(mask, v, arg, width); break;
    case 1: r = __shfl_up_sync(mask, v, (unsigned)arg, width); break;
    case 2: r = __shfl_down_sync(mask, v, (unsigned)arg, width); break;
    case 3: r = __shfl_xor_sync(mask, v, arg, width); break;
    case 4: r = (int)__ballot_sync(mask, v > arg); break;
    case 5: r = __any_sync(mask, v > arg); break;
    case 6: r = __all_sync(mask, v > arg); break;
    case 7: r = __reduce_add_sync(mask, v); break;
    case 8: __syncwarp(mask); r = v; break;
  }
  out[threadIdx.x] = r;
}

extern "C" __global__ void shfl64(const double* in, double* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, in[threadIdx.x], 5);
}

extern "C" __global__ void atomics(float* f, double* d, int* i, unsigned long long* u) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(f, (float)(t % 7));
  atomicAdd(d, 0.5 * t);
  atomicAdd(i, 1);
  atomicMax(i + 1, t);
  atomicMin(i + 2, -t);
  atomicCAS(i + 3, 0, t + 1);  // only the first thread to arrive wins
  atomicAdd(u, 3ull);
}

extern "C" __global__ void barrier_counts(const int* in, int* out) {
  const int p = in[threadIdx.x];
  out[0 * blockDim.x + threadIdx.x] = __syncthreads_count(p);
  out[1 * blockDim.x + threadIdx.x] = __syncthreads_and(p);
  out[2 * blockDim.x + threadIdx.x] = __syncthreads_or(p);
}

// Without the barrier a thread reads its neighbour's slot before the neighbour wrote it.
extern "C" __global__ void neighbours(const float* x, float* out, int with_barrier) {
  __shared__ float s[64];
  s[threadIdx.x] = x[threadIdx.x];
  if (with_barrier) __syncthreads();
  out[threadIdx.x] = s[threadIdx.x ^ 32];
}

extern "C" __global__ void __launch_bounds__(64) bounded(int* p) { p[threadIdx.x] = (int)blockDim.x; }

extern "C" __global__ void index_vars(int* out) {
  const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int n = blockDim.x * blockDim.y * blockDim.z;
  int* o = out + 4 * (b * n + t);
  o[0] = (int)threadIdx.x + 100 * (int)threadIdx.y + 10000 * (int)threadIdx.z;
  o[1] = (int)blockIdx.x + 100 * (int)blockIdx.y + 10000 * (int)blockIdx.z;
  o[2] = (int)(blockDim.x * blockDim.y * blockDim.z);
  o[3] = (int)(gridDim.x * gridDim.y * gridDim.z);
}

// ---- misuse: each must be an error naming the kernel, block and thread
extern "C" __global__ void early_exit(int* p) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  p[threadIdx.x] = 1;
}
extern "C" __global__ void divergent(u32* out) {
  __shared__ __align__(16) unsigned short s[256];
  s[threadIdx.x] = 0;
  __syncthreads();
  u32 r[4];
  if ((threadIdx.x & 31) < 16) sparsify_emu::ldmatrix(r, (u32)__cvta_generic_to_shared(s + (threadIdx.x % 32) * 8));
  else __syncwarp();
  out[threadIdx.x] = r[0];
}
extern "C" __global__ void misaligned(u32* out, int offset) {
  __shared__ __align__(16) unsigned short s[512];
  s[threadIdx.x] = 0;
  __syncthreads();
  u32 r[4];
  sparsify_emu::ldmatrix(r, (u32)__cvta_generic_to_shared(s + threadIdx.x * 8 + (threadIdx.x == 9 ? offset : 0)));
  out[threadIdx.x] = r[0];
}
extern "C" __global__ void not_shared(const float* g, u32* out) { out[threadIdx.x] = (u32)__cvta_generic_to_shared(g); }
extern "C" __global__ void cp_from_shared(float* out) {
  __shared__ __align__(16) float s[8];
  sparsify_emu::cp_async_cg((u32)__cvta_generic_to_shared(s), s + 4, 16);
  out[0] = 0;
}
extern "C" __global__ void cp_misaligned(const float* g) {
  __shared__ __align__(16) float s[8];
  sparsify_emu::cp_async_cg((u32)__cvta_generic_to_shared(s), g + 1, 16);
}
extern "C" __global__ void deadlock(int* out) {
  int v = 0;
  if (threadIdx.x == 63) __syncthreads();
  else if (threadIdx.x >= 32) v = __shfl_sync(0xffffffffu, 1, 0);
  else __syncthreads();
  out[threadIdx.x] = v;
}
extern "C" __global__ void asserts(int* p) { assert(p[threadIdx.x] == 0); }
extern "C" __global__ void wild(int* p) { p[threadIdx.x] = *reinterpret_cast<volatile int*>(16); }
__device__ int deep(volatile char* prev, int n) {
  volatile char buf[4096];
  buf[0] = prev ? prev[0] : 1;
  return n == 0 ? buf[0] : deep(buf, n - 1) + buf[0];
}
extern "C" __global__ void overflow(int* p, int n) { p[threadIdx.x] = deep(nullptr, n); }
"""


@pytest.fixture(scope="module")
def prog():
    return emulator.build(PROBES, name="test_emulator_probes", max_dynamic_shared_bytes=8192)


def test_program_lists_its_kernels_with_parameter_types(prog):
    assert {"ldm", "mma", "cpasync", "dyn", "warpfn", "atomics", "bounded"} <= set(prog.kernels)
    kinds = [(p.kind, p.size, p.const_pointee) for p in prog.kernels["ldm"].params]
    assert kinds == [("pointer", 8, True), ("pointer", 8, False), ("int", 4, False), ("int", 4, False)]
    assert prog.kernels["bounded"].max_threads == 64
    assert prog.kernels["warpfn"].params[-1].kind == "unsigned"


# ----------------------------------------------------------------------- ldmatrix
def _ldmatrix_reference(m: np.ndarray, num: int, trans: bool) -> np.ndarray:
    """PTX 9.7.14.5.15: in register i, lane l holds row l/4, columns 2(l%4), 2(l%4)+1 of matrix i
    (low half first); with .trans the matrix is read column-major (rows and columns swap)."""
    out = np.zeros((32, 4), dtype=np.uint32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(num):
            mat = m[i].T if trans else m[i]
            out[lane, i] = int(mat[g, 2 * t]) | int(mat[g, 2 * t + 1]) << 16
    return out


@pytest.mark.parametrize("trans", [False, True])
@pytest.mark.parametrize("num", [1, 2, 4])
def test_ldmatrix_fragments_follow_the_ptx_isa(prog, num, trans):
    rng = np.random.default_rng(num * 2 + trans)
    m = rng.integers(0, 2**16, size=(4, 8, 8), dtype=np.uint16)
    src = torch.from_numpy(m.reshape(-1).astype(np.int32)).to(torch.int16).contiguous()
    out = torch.zeros(32 * 4, dtype=torch.int64).to(torch.int32)
    prog.launch("ldm", 1, 32, (ptr(src), ptr(out), np.int32(num), np.int32(trans)))
    got = out.numpy().view(np.uint32).reshape(32, 4)
    ref = _ldmatrix_reference(m, num, trans)
    assert np.array_equal(got[:, :num], ref[:, :num])


# ----------------------------------------------------------------------- mma
def _tf32_rna(x: np.ndarray) -> np.ndarray:
    """cvt.rna.tf32.f32 on finite values: add half an ulp of the 10-bit mantissa to the magnitude
    (ties away from zero) and clear the 13 low bits."""
    b = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return (((b + 0x1000) & 0xFFFFE000) & 0xFFFFFFFF).astype(np.uint32)


@pytest.mark.parametrize("op", [0, 1, 2, 3, 4], ids=["m16n8k16.f16", "m16n8k16.bf16", "m16n8k8.tf32",
                                                     "m16n8k8.f16", "m16n8k8.bf16"])
def test_mma_computes_d_equals_ab_plus_c_in_the_ptx_fragment_layouts(prog, op):
    k = 16 if op in (0, 1) else 8
    dtype = {0: torch.float16, 1: torch.bfloat16, 3: torch.float16, 4: torch.bfloat16}.get(op, torch.float32)
    g = torch.Generator().manual_seed(op)
    a = torch.randn(16, k, generator=g)
    b = torch.randn(k, 8, generator=g)
    c = torch.randn(16, 8, generator=g)
    if dtype == torch.float32:  # tf32: the kernel passes cvt.rna-rounded operands
        a_bits = torch.from_numpy(_tf32_rna(a.numpy()).view(np.int32).copy())
        b_bits = torch.from_numpy(_tf32_rna(b.numpy()).view(np.int32).copy())
        a_ref = torch.from_numpy(a_bits.numpy().view(np.float32).copy()).double()
        b_ref = torch.from_numpy(b_bits.numpy().view(np.float32).copy()).double()
        a16 = b16 = torch.zeros(1, dtype=torch.int16)
    else:
        a16, b16 = a.to(dtype).view(torch.int16).contiguous(), b.to(dtype).view(torch.int16).contiguous()
        a_ref, b_ref = a.to(dtype).double(), b.to(dtype).double()
        a_bits = b_bits = torch.zeros(1, dtype=torch.int32)
    d = torch.full((16, 8), float("nan"))
    prog.launch("mma", 1, 32, (ptr(a16), ptr(a_bits), ptr(b16), ptr(b_bits), ptr(c), ptr(d), np.int32(op)))
    ref = a_ref @ b_ref + c.double()
    # Products of 16-bit / tf32 operands are exact; one rounding to f32 at the end: half an ulp.
    assert torch.allclose(d.double(), ref, rtol=2**-23, atol=1e-6), (d.double() - ref).abs().max()


def test_cvt_rna_tf32_rounds_to_nearest_with_ties_away_from_zero(prog):
    base = np.array([1.0, -1.0, 3.14159, -2.71828, 1e-30, 65504.0, 0.0, -0.0], dtype=np.float32)
    bits = base.view(np.uint32)
    ties = ((bits & 0xFFFFE000) | 0x1000).view(np.float32)  # exactly halfway: away from zero
    below = ((bits & 0xFFFFE000) | 0x0FFF).view(np.float32)
    x = torch.from_numpy(np.concatenate([base, ties, below, np.random.default_rng(0).standard_normal(100).astype(np.float32)]))
    out = torch.zeros(x.numel(), dtype=torch.int32)
    prog.launch("tf32", -(-x.numel() // 64), 64, (ptr(x), ptr(out), np.int32(x.numel())))
    assert np.array_equal(out.numpy().view(np.uint32), _tf32_rna(x.numpy()))
    tie_out = out.numpy().view(np.uint32)[len(base) : 2 * len(base)]
    assert np.all(np.abs(tie_out.view(np.float32)) >= np.abs(ties)), "ties round away from zero"


# ----------------------------------------------------------------------- cp.async
@pytest.mark.parametrize("commit_last", [1, 0])
@pytest.mark.parametrize("wait_n", [0, 1, 2, 3])
def test_cp_async_lands_only_at_the_wait_group_that_covers_it(prog, wait_n, commit_last):
    """PTX 9.7.9.25.3.3: wait_group N waits until at most N of the most recent committed groups
    are pending; copies not yet committed are not covered.  Unlanded bytes stay poisoned (NaN)."""
    src = torch.arange(12, dtype=torch.float32)
    out = torch.zeros(12)
    prog.launch("cpasync", 1, 1, (ptr(src), ptr(out), np.int32(wait_n), np.int32(commit_last)))
    committed = 3 if commit_last else 2
    landed = max(0, committed - wait_n)
    for grp in range(3):
        chunk = out[4 * grp : 4 * grp + 4]
        if grp < landed:
            assert torch.equal(chunk, src[4 * grp : 4 * grp + 4]), (grp, out)
        else:
            assert chunk.isnan().all(), f"group {grp} landed before its wait_group: {out}"


def test_shared_memory_is_poisoned_at_the_start_of_every_block(prog):
    out = torch.zeros(3 * 64)
    prog.launch("fresh_smem", 3, 64, (ptr(out),))
    assert out.isnan().all(), "a block saw shared memory written by an earlier block"


def test_dynamic_shared_memory_extern_arrays_alias(prog):
    n = 300
    x = torch.randn(n)
    out = torch.zeros(n)
    prog.launch("dyn", 1, 64, (ptr(x), ptr(out), np.int32(n)), shared_bytes=4 * n)
    assert torch.equal(out, (2 * x).flip(0))
    with pytest.raises(ValueError, match="dynamic shared memory"):
        prog.launch("dyn", 1, 64, (ptr(x), ptr(out), np.int32(n)), shared_bytes=9000)


# ----------------------------------------------------------------------- warp functions
def _warp_reference(vals: list[int], mode: int, arg: int, width: int, mask: int) -> list[int]:
    """The CUDA Programming Guide's definitions of the warp shuffle and vote functions."""
    out = []
    for lane in range(32):
        if not mask >> lane & 1:
            out.append(-7)
            continue
        seg = lane - lane % width
        if mode == 0:
            src = seg + arg % width
        elif mode == 1:
            src = lane - arg if lane - arg >= seg else lane
        elif mode == 2:
            src = lane + arg if lane + arg < seg + width else lane
        elif mode == 3:
            src = lane ^ arg if seg <= (lane ^ arg) < seg + width else lane
        if mode <= 3:
            out.append(vals[src])
            continue
        members = [i for i in range(32) if mask >> i & 1]
        ballot = sum(1 << i for i in members if vals[i] > arg)
        out.append({4: ballot - (1 << 32 if ballot >= 1 << 31 else 0), 5: int(ballot != 0),
                    6: int(ballot == mask), 7: sum(vals[i] for i in members), 8: vals[lane]}[mode])
    return out


@given(mode=st.integers(0, 8), arg=st.integers(0, 40), width=st.sampled_from([1, 2, 4, 8, 16, 32]),
       seed=st.integers(0, 2**16), partial=st.booleans())
def test_warp_shuffles_and_votes_follow_the_programming_guide(prog, mode, arg, width, seed, partial):
    rng = np.random.default_rng(seed)
    vals = rng.integers(-50, 50, size=32).tolist()
    mask = 0xFFFFFFFF
    if partial and mode >= 4:  # votes and reductions over a subset of lanes
        mask = int(rng.integers(1, 2**32)) | 1
    if mode <= 3 and mode != 0:
        arg = arg % 32
    x = torch.tensor(vals, dtype=torch.int32)
    out = torch.zeros(32, dtype=torch.int32)
    prog.launch("warpfn", 1, 32, (ptr(x), ptr(out), np.int32(mode), np.int32(arg), np.int32(width), np.uint32(mask)))
    assert out.tolist() == _warp_reference(vals, mode, arg, width, mask)


def test_shuffles_move_8_byte_values(prog):
    x = torch.randn(32, dtype=torch.float64)
    out = torch.zeros(32, dtype=torch.float64)
    prog.launch("shfl64", 1, 32, (ptr(x), ptr(out)))
    assert torch.equal(out, x[torch.arange(32) ^ 5])


def test_shuffle_from_a_lane_outside_the_mask_is_an_error(prog):
    x = torch.zeros(32, dtype=torch.int32)
    with pytest.raises(emulator.EmulatedKernelError, match="not in the mask"):
        prog.launch("warpfn", 1, 32, (ptr(x), ptr(x), np.int32(0), np.int32(31), np.int32(32), np.uint32(0xFFFF)))


@pytest.mark.parametrize("schedule", emulator.SCHEDULES)
def test_atomics(prog, schedule):
    f = torch.zeros(1)
    d = torch.zeros(1, dtype=torch.float64)
    i = torch.tensor([0, -1, 1, 0], dtype=torch.int32)
    u = torch.zeros(1, dtype=torch.int64)
    stats = prog.launch("atomics", 3, 96, (ptr(f), ptr(d), ptr(i), ptr(u)), schedule=schedule, seed=3)
    n = 3 * 96
    assert f.item() == sum(t % 7 for t in range(n))  # small integers: exact in any order
    assert d.item() == 0.5 * sum(range(n))
    assert i[0].item() == n and i[1].item() == n - 1 and i[2].item() == -(n - 1)
    assert 1 <= i[3].item() <= n
    assert u.item() == 3 * n
    assert stats.float_atomics == 2 * n


def test_syncthreads_count_and_or(prog):
    p = torch.tensor([1, 0, 1] * 30 + [1, 1], dtype=torch.int32)
    out = torch.zeros(3 * 92, dtype=torch.int32)
    prog.launch("barrier_counts", 1, 92, (ptr(p), ptr(out)))
    assert (out[:92] == int(p.sum())).all() and (out[92:184] == 0).all() and (out[184:] == 1).all()


@pytest.mark.parametrize("schedule", emulator.SCHEDULES)
def test_a_missing_barrier_gives_wrong_results_under_every_schedule(prog, schedule):
    x = torch.arange(64, dtype=torch.float32)
    out = torch.zeros(64)
    prog.launch("neighbours", 1, 64, (ptr(x), ptr(out), np.int32(1)), schedule=schedule, seed=5)
    assert torch.equal(out, x[torch.arange(64) ^ 32])
    prog.launch("neighbours", 1, 64, (ptr(x), ptr(out), np.int32(0)), schedule=schedule, seed=5)
    assert out.isnan().any(), "a read before the neighbour's write must see the poison"


def test_index_variables_in_three_dimensions(prog):
    grid, block = (2, 3, 1), (4, 2, 3)
    nb, nt = 6, 24
    out = torch.zeros(nb * nt * 4, dtype=torch.int32)
    prog.launch("index_vars", grid, block, (ptr(out),), schedule="random", seed=1)
    o = out.view(nb, nt, 4)
    for b in range(nb):
        bx, by = b % 2, b // 2
        for t in range(nt):
            tx, ty, tz = t % 4, (t // 4) % 2, t // 8
            assert o[b, t].tolist() == [tx + 100 * ty + 10000 * tz, bx + 100 * by, nt, nb]


# ----------------------------------------------------------------------- misuse is an error
def _expect(prog, kernel, args, match, block=64, **kw):
    with pytest.raises(emulator.EmulatedKernelError, match=match) as info:
        prog.launch(kernel, 1, block, args, **kw)
    assert f"kernel {kernel}" in str(info.value) and "block (0,0,0)" in str(info.value)
    return str(info.value)


def test_a_thread_that_exits_before_a_barrier_is_an_error(prog):
    p = torch.zeros(64, dtype=torch.int32)
    msg = _expect(prog, "early_exit", (ptr(p),), r"exit")
    assert "test_emulator_probes" in msg or "program.cu" in msg, "the message names the source line"


def test_lanes_diverging_at_a_warp_collective_is_an_error(prog):
    _expect(prog, "divergent", (ptr(torch.zeros(64, dtype=torch.int32)),), r"diverge|disagree")


def test_misaligned_ldmatrix_address_is_an_error_naming_the_lane(prog):
    out = torch.zeros(64, dtype=torch.int32)
    msg = _expect(prog, "misaligned", (ptr(out), np.int32(1)), r"not 16-byte aligned")
    assert "thread (9,0,0)" in msg
    prog.launch("misaligned", 1, 64, (ptr(out), np.int32(8)))  # 16 bytes off: aligned, fine


def test_cvta_of_a_global_address_is_an_error(prog):
    g = torch.zeros(64)
    _expect(prog, "not_shared", (ptr(g), ptr(g)), r"not shared memory")


def test_cp_async_from_shared_memory_or_misaligned_is_an_error(prog):
    _expect(prog, "cp_from_shared", (ptr(torch.zeros(4)),), r"cp.async source .* shared memory", block=1)
    _expect(prog, "cp_misaligned", (ptr(torch.zeros(8)),), r"not aligned to its cp-size 16", block=1)


def test_deadlock_is_reported_with_where_each_thread_waits(prog):
    msg = _expect(prog, "deadlock", (ptr(torch.zeros(64, dtype=torch.int32)),), r"deadlock")
    assert "__syncthreads" in msg and "__shfl_sync" in msg


def test_assert_in_a_kernel_is_an_error_not_an_abort(prog):
    p = torch.zeros(64, dtype=torch.int32)
    prog.launch("asserts", 1, 64, (ptr(p),))
    p[17] = 1
    msg = _expect(prog, "asserts", (ptr(p),), r"assertion failed")
    assert "thread (17,0,0)" in msg


def test_segmentation_fault_and_stack_overflow_are_errors(prog):
    p = torch.zeros(64, dtype=torch.int32)
    _expect(prog, "wild", (ptr(p),), r"invalid memory access")
    _expect(prog, "overflow", (ptr(p), np.int32(1000)), r"stack overflow", block=32)
    prog.launch("overflow", 1, 32, (ptr(p), np.int32(3)))  # and the emulator still works
    assert (p[:32] == 4).all()


# ----------------------------------------------------------------------- launch checks
def test_launch_arguments_are_checked_like_the_driver_would(prog):
    p = torch.zeros(1024, dtype=torch.int32)
    with pytest.raises(TypeError, match="numpy scalar"):
        prog.launch("bounded", 1, 64, (p.data_ptr(),))
    with pytest.raises(TypeError, match="np.uint64"):
        prog.launch("bounded", 1, 64, (np.int64(p.data_ptr()),))
    with pytest.raises(TypeError, match="np.int32"):
        prog.launch("ldm", 1, 32, (ptr(p), ptr(p), np.int64(1), np.int32(0)))
    with pytest.raises(TypeError, match="takes 1 arguments"):
        prog.launch("bounded", 1, 64, (ptr(p), ptr(p)))
    with pytest.raises(ValueError, match="__launch_bounds__"):
        prog.launch("bounded", 1, 128, (ptr(p),))
    with pytest.raises(ValueError, match="at most 1024"):
        prog.launch("warpfn", 1, (64, 32), ())
    with pytest.raises(ValueError, match="grid"):
        prog.launch("bounded", (1, 70000), 64, (ptr(p),))
    with pytest.raises(ValueError, match="grid"):
        prog.launch("bounded", 0, 64, (ptr(p),))
    with pytest.raises(KeyError, match="no kernel"):
        prog.launch("nope", 1, 1, ())
    with pytest.raises(ValueError, match="schedule"):
        prog.launch("bounded", 1, 64, (ptr(p),), schedule="fifo")


def test_build_errors_carry_the_log_and_numbered_source():
    with pytest.raises(emulator.EmulatorBuildError, match=r"(?s)compile.*\|.*undeclared_thing") as info:
        emulator.build('extern "C" __global__ void k(int* p) { p[0] = undeclared_thing; }', name="test_emulator_bad")
    assert "   1 | " in str(info.value)
    with pytest.raises(emulator.EmulatorBuildError, match="no non-template __global__ kernel"):
        emulator.build("__device__ int f() { return 1; }", name="test_emulator_nokernel")
    with pytest.raises(ValueError, match="program name"):
        emulator.build("x", name="bad name")


def test_builds_are_cached_and_a_corrupt_library_is_rebuilt(tmp_path):
    # A source of its own (the tmp path in a comment), so the build is new and only this test corrupts it.
    src = f'// {tmp_path}\nextern "C" __global__ void k(int* p) {{ p[threadIdx.x] = 7; }}'
    first = emulator.builder.build_library(src, name="test_emulator_cache")
    again = emulator.builder.build_library(src, name="test_emulator_cache")
    assert again.library == first.library and first.library.parent == emulator.builder.cache_dir()
    first.library.write_bytes(first.library.read_bytes()[:-8] + b"corrupt!")
    rebuilt = emulator.builder.build_library(src, name="test_emulator_cache")
    assert rebuilt.library == first.library
    assert emulator.builder._valid(rebuilt.library, rebuilt.library.with_suffix(".json"))


def test_the_switch_runs_cpu_ops_through_the_emulator():
    """SPARSIFY_EMULATE_CUDA=1: block-sparse ops on CPU tensors run their CUDA kernels, emulated."""
    code = textwrap.dedent("""
        import torch
        from sparsify.runtime import executor_for, BlockSparseLayout
        from sparsify.runtime.emulator import EmulatedKernelRuntime
        ex = executor_for(torch.device("cpu"))
        assert type(ex).__name__ == "CUDAExecutor" and isinstance(ex.runtime, EmulatedKernelRuntime), ex
        mask = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
        layout = BlockSparseLayout.from_block_mask(mask, shape=(32, 32), block_size=16)
        w = torch.randn(32, 32)
        values = layout.values_from_dense(w)
        x = torch.randn(5, 32)
        y = torch.ops.sparsify.bsmm(x, values, *layout.metadata().values(), None, None, 32, 32, "none")
        ref = x.double() @ (w * layout.element_mask()).double().T
        assert ((y.double() - ref).norm() / ref.norm()) < 1e-5
        assert ex.runtime.launches and ex.runtime.launches[-1][0].startswith("bsmm_fwd_small_f32_b16")
        print("ok")
    """)
    env = {**os.environ, "SPARSIFY_EMULATE_CUDA": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
