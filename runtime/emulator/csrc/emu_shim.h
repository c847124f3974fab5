// The CUDA device environment for kernel sources compiled by the host compiler
// (force-included with -include by sparsify.runtime.emulator; never edit a
// kernel to suit it).  It provides:
//
//   execution-space and memory qualifiers
//     __global__ __device__ __host__ __forceinline__ __noinline__ __launch_bounds__
//     __shared__ (static and extern/dynamic) __constant__ __managed__ __restrict__ __align__
//   built-in variables   threadIdx blockIdx blockDim gridDim warpSize
//   synchronization      __syncthreads __syncthreads_count/_and/_or __syncwarp
//                        __threadfence* (no-ops: one OS thread runs the whole grid)
//   warp functions       __shfl_sync __shfl_up_sync __shfl_down_sync __shfl_xor_sync (4- and 8-byte
//                        types), __ballot_sync __any_sync __all_sync __activemask
//                        __reduce_add_sync __reduce_min_sync __reduce_max_sync
//   atomics              atomicAdd atomicSub atomicExch atomicMin atomicMax atomicCAS atomicAnd
//                        atomicOr atomicXor (int, unsigned, unsigned long long; atomicAdd /
//                        atomicExch also float and double)
//   address spaces       __cvta_generic_to_shared (an error for a non-shared address)
//   math and bits        min max, __popc __clz __ffs __brev, __float_as_uint & co, __ldg,
//                        fast-math intrinsics (__expf ...) as the precise host functions
//   misc                 __nanosleep (yields), clock64, __trap, assert (an error, not an abort)
//   PTX instructions     namespace sparsify_emu: cp_async_ca / cp_async_cg / commit / wait,
//                        ldmatrix x1/x2/x4 (.trans), mma m16n8k16 f16/bf16, m16n8k8 tf32/f16/bf16,
//                        cvt_rna_tf32 -- for the #ifdef SPARSIFY_EMULATOR seam of a kernel's
//                        inline-asm wrappers.
//
// Hooks take the caller's file and line (default arguments evaluated at the call
// site), so errors name the line of the kernel source.
#pragma once

#ifndef SPARSIFY_EMULATOR
#define SPARSIFY_EMULATOR 1
#endif

#include <stdint.h>
#include <string.h>

#include <cmath>
#include <cstdio>
#include <type_traits>

// The CUDA headers in host mode (they define __half, __nv_bfloat16, float2,
// uint3, dim3 ... and their own empty execution-space macros, replaced below).
#include <vector_types.h>
#include <vector_functions.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "emu_api.h"

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __managed__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __grid_constant__
#undef __align__

// The markers (unknown attributes, ignored by the compiler with -Wno-attributes)
// let the builder find kernels and extern __shared__ arrays in the preprocessed source.
#define __global__ __attribute__((__sparsify_emu_kernel__))
#define __device__
#define __host__
// One copy per OS thread: one thread runs a whole launch, blocks one after
// another, so this is exactly one copy per thread block; it is poisoned at the
// start of each block.  thread_local also allows `extern __shared__ T x[];`.
#define __shared__ thread_local __attribute__((__sparsify_emu_shared__))
#define __constant__
#define __managed__
#define __grid_constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...) __attribute__((__sparsify_emu_launch_bounds__(__VA_ARGS__)))
#define __align__(n) __attribute__((aligned(n)))

#define SPARSIFY_EMU_WHERE const char *sparsify_emu_file = __builtin_FILE(), int sparsify_emu_line = __builtin_LINE()
#define SPARSIFY_EMU_AT sparsify_emu_file, sparsify_emu_line

// ------------------------------------------------------------------ built-in variables
#define threadIdx (*reinterpret_cast<const uint3*>(&sparsify_emu_self()->thread_idx))
#define blockIdx (*reinterpret_cast<const uint3*>(&sparsify_emu_self()->block_idx))
#define blockDim (*reinterpret_cast<const dim3*>(&sparsify_emu_self()->block_dim))
#define gridDim (*reinterpret_cast<const dim3*>(&sparsify_emu_self()->grid_dim))
static constexpr int warpSize = 32;

// ------------------------------------------------------------------ synchronization
static inline void __syncthreads(SPARSIFY_EMU_WHERE) { sparsify_emu_syncthreads(SPARSIFY_EMU_AT); }
static inline int __syncthreads_count(int p, SPARSIFY_EMU_WHERE) {
  return sparsify_emu_syncthreads_op(p, 0, SPARSIFY_EMU_AT);
}
static inline int __syncthreads_and(int p, SPARSIFY_EMU_WHERE) {
  return sparsify_emu_syncthreads_op(p, 1, SPARSIFY_EMU_AT);
}
static inline int __syncthreads_or(int p, SPARSIFY_EMU_WHERE) {
  return sparsify_emu_syncthreads_op(p, 2, SPARSIFY_EMU_AT);
}
static inline void __syncwarp(unsigned mask = 0xffffffffu, SPARSIFY_EMU_WHERE) {
  sparsify_emu_syncwarp(mask, SPARSIFY_EMU_AT);
}
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __nanosleep(unsigned) { sparsify_emu_yield(); }
static inline long long clock64() { return sparsify_emu_clock(); }
static inline void __trap(SPARSIFY_EMU_WHERE) { sparsify_emu_trap("__trap() called", SPARSIFY_EMU_AT); }

// ------------------------------------------------------------------ warp functions
namespace sparsify_emu {
template <class T>
static inline unsigned long long to_bits(T v) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8 || sizeof(T) == 2, "shuffles move 2-, 4- or 8-byte values");
  unsigned long long b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
static inline T from_bits(unsigned long long b) {
  T v;
  memcpy(&v, &b, sizeof(T));
  return v;
}
}  // namespace sparsify_emu

template <class T>
static inline T __shfl_sync(unsigned mask, T var, int src, int width = 32, SPARSIFY_EMU_WHERE) {
  return sparsify_emu::from_bits<T>(sparsify_emu_shfl(mask, sparsify_emu::to_bits(var), 0, src, width, SPARSIFY_EMU_AT));
}
template <class T>
static inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, SPARSIFY_EMU_WHERE) {
  return sparsify_emu::from_bits<T>(
      sparsify_emu_shfl(mask, sparsify_emu::to_bits(var), 1, int(delta), width, SPARSIFY_EMU_AT));
}
template <class T>
static inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, SPARSIFY_EMU_WHERE) {
  return sparsify_emu::from_bits<T>(
      sparsify_emu_shfl(mask, sparsify_emu::to_bits(var), 2, int(delta), width, SPARSIFY_EMU_AT));
}
template <class T>
static inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, SPARSIFY_EMU_WHERE) {
  return sparsify_emu::from_bits<T>(
      sparsify_emu_shfl(mask, sparsify_emu::to_bits(var), 3, lane_mask, width, SPARSIFY_EMU_AT));
}
static inline unsigned __ballot_sync(unsigned mask, int pred, SPARSIFY_EMU_WHERE) {
  return sparsify_emu_vote(mask, pred, 0, SPARSIFY_EMU_AT);
}
static inline int __any_sync(unsigned mask, int pred, SPARSIFY_EMU_WHERE) {
  return int(sparsify_emu_vote(mask, pred, 1, SPARSIFY_EMU_AT));
}
static inline int __all_sync(unsigned mask, int pred, SPARSIFY_EMU_WHERE) {
  return int(sparsify_emu_vote(mask, pred, 2, SPARSIFY_EMU_AT));
}
// Approximation: the emulator cannot see which lanes are converged, so this is
// every lane of the warp that exists.
static inline unsigned __activemask() {
  const unsigned n = sparsify_emu_self()->block_dim.x * sparsify_emu_self()->block_dim.y *
                     sparsify_emu_self()->block_dim.z;
  const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned w0 = tid & ~31u;
  const unsigned lanes = n - w0 >= 32 ? 32 : n - w0;
  return lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
}
static inline unsigned __reduce_add_sync(unsigned mask, unsigned v, SPARSIFY_EMU_WHERE) {
  return sparsify_emu_reduce(mask, v, 0, SPARSIFY_EMU_AT);
}
static inline unsigned __reduce_min_sync(unsigned mask, unsigned v, SPARSIFY_EMU_WHERE) {
  return sparsify_emu_reduce(mask, v, 1, SPARSIFY_EMU_AT);
}
static inline unsigned __reduce_max_sync(unsigned mask, unsigned v, SPARSIFY_EMU_WHERE) {
  return sparsify_emu_reduce(mask, v, 2, SPARSIFY_EMU_AT);
}
static inline int __reduce_add_sync(unsigned mask, int v, SPARSIFY_EMU_WHERE) {
  return int(sparsify_emu_reduce(mask, unsigned(v), 0, SPARSIFY_EMU_AT));
}
static inline int __reduce_min_sync(unsigned mask, int v, SPARSIFY_EMU_WHERE) {
  return int(sparsify_emu_reduce(mask, unsigned(v), 3, SPARSIFY_EMU_AT));
}
static inline int __reduce_max_sync(unsigned mask, int v, SPARSIFY_EMU_WHERE) {
  return int(sparsify_emu_reduce(mask, unsigned(v), 4, SPARSIFY_EMU_AT));
}

// ------------------------------------------------------------------ atomics
// Threads of a launch run on one OS thread and switch only at synchronization
// points, so a read-modify-write is atomic among them; the __atomic builtins
// also keep concurrent launches from several OS threads correct.
#define SPARSIFY_EMU_INT_ATOMICS(T)                                                                         \
  static inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }               \
  static inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }               \
  static inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }             \
  static inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }               \
  static inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }                 \
  static inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }               \
  static inline T atomicCAS(T* p, T cmp, T v) {                                                             \
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                     \
    return cmp;                                                                                             \
  }                                                                                                         \
  static inline T atomicMin(T* p, T v) {                                                                    \
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                                           \
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) { \
    }                                                                                                       \
    return old;                                                                                             \
  }                                                                                                         \
  static inline T atomicMax(T* p, T v) {                                                                    \
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                                           \
    while (v > old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) { \
    }                                                                                                       \
    return old;                                                                                             \
  }
SPARSIFY_EMU_INT_ATOMICS(int)
SPARSIFY_EMU_INT_ATOMICS(unsigned)
SPARSIFY_EMU_INT_ATOMICS(unsigned long long)
#undef SPARSIFY_EMU_INT_ATOMICS

namespace sparsify_emu {
template <class F, class U>
static inline F float_rmw_add(F* p, F v) {
  static_assert(sizeof(F) == sizeof(U), "");
  U* q = reinterpret_cast<U*>(p);
  U old = __atomic_load_n(q, __ATOMIC_SEQ_CST);
  for (;;) {
    F cur;
    memcpy(&cur, &old, sizeof(F));
    const F next = cur + v;
    U nb;
    memcpy(&nb, &next, sizeof(F));
    if (__atomic_compare_exchange_n(q, &old, nb, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return cur;
  }
}
}  // namespace sparsify_emu
// Float atomics are counted: their order (and so the rounding of the sum)
// depends on the schedule, which the tests take into account.
static inline float atomicAdd(float* p, float v) {
  sparsify_emu_note_float_atomic();
  return sparsify_emu::float_rmw_add<float, uint32_t>(p, v);
}
static inline double atomicAdd(double* p, double v) {
  sparsify_emu_note_float_atomic();
  return sparsify_emu::float_rmw_add<double, uint64_t>(p, v);
}
static inline float atomicExch(float* p, float v) {
  float old;
  __atomic_exchange(p, &v, &old, __ATOMIC_SEQ_CST);
  return old;
}

// ------------------------------------------------------------------ address spaces
static inline size_t __cvta_generic_to_shared(const void* p, SPARSIFY_EMU_WHERE) {
  return sparsify_emu_cvta_to_shared(p, SPARSIFY_EMU_AT);
}

// ------------------------------------------------------------------ math and bits
static inline int min(int a, int b) { return a < b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }
static inline int __popc(unsigned v) { return __builtin_popcount(v); }
static inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
static inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(unsigned(v)); }
static inline int __clzll(long long v) { return v == 0 ? 64 : __builtin_clzll((unsigned long long)v); }
static inline int __ffs(int v) { return __builtin_ffs(v); }
static inline int __ffsll(long long v) { return __builtin_ffsll(v); }
static inline unsigned __brev(unsigned v) {
  v = ((v >> 1) & 0x55555555u) | ((v & 0x55555555u) << 1);
  v = ((v >> 2) & 0x33333333u) | ((v & 0x33333333u) << 2);
  v = ((v >> 4) & 0x0f0f0f0fu) | ((v & 0x0f0f0f0fu) << 4);
  v = ((v >> 8) & 0x00ff00ffu) | ((v & 0x00ff00ffu) << 8);
  return (v >> 16) | (v << 16);
}
static inline unsigned __float_as_uint(float v) { unsigned u; memcpy(&u, &v, 4); return u; }
static inline float __uint_as_float(unsigned u) { float v; memcpy(&v, &u, 4); return v; }
static inline int __float_as_int(float v) { int u; memcpy(&u, &v, 4); return u; }
static inline float __int_as_float(int u) { float v; memcpy(&v, &u, 4); return v; }
static inline long long __double_as_longlong(double v) { long long u; memcpy(&u, &v, 8); return u; }
static inline double __longlong_as_double(long long u) { double v; memcpy(&v, &u, 8); return v; }
template <class T>
static inline T __ldg(const T* p) { return *p; }
// Device fast-math intrinsics run as the precise host functions (documented
// approximation); glibc itself declares __expf, __logf, __sinf, __cosf, __powf.
static inline float __fdividef(float x, float y) { return x / y; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }

// assert() in a kernel is an error of the launch (as on the GPU), not an abort
// of the process: the module defines its own __assert_fail (see the builder).

// ------------------------------------------------------------------ PTX instructions
// Host versions of the inline-PTX instructions kernels wrap; use them in the
// `#ifdef SPARSIFY_EMULATOR` branch of a wrapper, with the same operands as the asm.
namespace sparsify_emu {
typedef unsigned u32;
// cp.async.ca.shared.global [smem_addr], [gmem], bytes{, src_bytes}   (bytes: 4, 8, 16)
static inline void cp_async_ca(u32 smem_addr, const void* gmem, int bytes, int src_bytes = -1, SPARSIFY_EMU_WHERE) {
  sparsify_emu_cp_async(smem_addr, gmem, bytes, src_bytes < 0 ? bytes : src_bytes, 0, SPARSIFY_EMU_AT);
}
// cp.async.cg.shared.global [smem_addr], [gmem], 16{, src_bytes}
static inline void cp_async_cg(u32 smem_addr, const void* gmem, int bytes = 16, int src_bytes = -1,
                               SPARSIFY_EMU_WHERE) {
  sparsify_emu_cp_async(smem_addr, gmem, bytes, src_bytes < 0 ? bytes : src_bytes, 1, SPARSIFY_EMU_AT);
}
// cp.async.commit_group
static inline void cp_async_commit_group() { sparsify_emu_cp_async_commit(); }
// cp.async.wait_group N
static inline void cp_async_wait_group(int n, SPARSIFY_EMU_WHERE) { sparsify_emu_cp_async_wait(n, SPARSIFY_EMU_AT); }
// cp.async.wait_all (= commit_group; wait_group 0)
static inline void cp_async_wait_all(SPARSIFY_EMU_WHERE) {
  sparsify_emu_cp_async_commit();
  sparsify_emu_cp_async_wait(0, SPARSIFY_EMU_AT);
}
// ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16 {r...}, [smem_addr]
template <int N>
static inline void ldmatrix(u32 (&r)[N], u32 smem_addr, SPARSIFY_EMU_WHERE) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  sparsify_emu_ldmatrix(r, N, 0, smem_addr, SPARSIFY_EMU_AT);
}
template <int N>
static inline void ldmatrix_trans(u32 (&r)[N], u32 smem_addr, SPARSIFY_EMU_WHERE) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  sparsify_emu_ldmatrix(r, N, 1, smem_addr, SPARSIFY_EMU_AT);
}
// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32  d, a, b, c
static inline void mma_m16n8k16_f16(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2], const float (&c)[4],
                                    SPARSIFY_EMU_WHERE) {
  sparsify_emu_mma(SPARSIFY_EMU_MMA_M16N8K16_F16, d, a, b, c, SPARSIFY_EMU_AT);
}
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32  d, a, b, c
static inline void mma_m16n8k16_bf16(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2], const float (&c)[4],
                                     SPARSIFY_EMU_WHERE) {
  sparsify_emu_mma(SPARSIFY_EMU_MMA_M16N8K16_BF16, d, a, b, c, SPARSIFY_EMU_AT);
}
// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32  d, a, b, c
static inline void mma_m16n8k8_tf32(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2], const float (&c)[4],
                                    SPARSIFY_EMU_WHERE) {
  sparsify_emu_mma(SPARSIFY_EMU_MMA_M16N8K8_TF32, d, a, b, c, SPARSIFY_EMU_AT);
}
// mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32  d, a, b, c
static inline void mma_m16n8k8_f16(float (&d)[4], const u32 (&a)[2], const u32 (&b)[1], const float (&c)[4],
                                   SPARSIFY_EMU_WHERE) {
  sparsify_emu_mma(SPARSIFY_EMU_MMA_M16N8K8_F16, d, a, b, c, SPARSIFY_EMU_AT);
}
// mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32  d, a, b, c
static inline void mma_m16n8k8_bf16(float (&d)[4], const u32 (&a)[2], const u32 (&b)[1], const float (&c)[4],
                                    SPARSIFY_EMU_WHERE) {
  sparsify_emu_mma(SPARSIFY_EMU_MMA_M16N8K8_BF16, d, a, b, c, SPARSIFY_EMU_AT);
}
// cvt.rna.tf32.f32
static inline u32 cvt_rna_tf32(float v) { return sparsify_emu_cvt_rna_tf32(v); }
// A pointer to `bytes` bytes at a shared address (for ld.shared / st.shared wrappers).
template <class T>
static inline T* shared_ptr(u32 smem_addr, SPARSIFY_EMU_WHERE) {
  return static_cast<T*>(sparsify_emu_shared_ptr(smem_addr, int(sizeof(T)), SPARSIFY_EMU_AT));
}
}  // namespace sparsify_emu
