// Shared pieces of the block-sparse matmul kernels: element types, the PTX
// wrappers (cp.async, ldmatrix, mma.sync), the tile loader, the warp-level
// multiply and the fused epilogue.
//
// One accumulator layout everywhere: a warp owns a grid of MF x NF fragments of
// 16 x 8 outputs, and lane (g = lane / 4, t = lane % 4) holds, for fragment
// (mi, ni), the four outputs
//     [0] (mi*16 + g,     ni*8 + 2t)    [1] (mi*16 + g,     ni*8 + 2t + 1)
//     [2] (mi*16 + g + 8, ni*8 + 2t)    [3] (mi*16 + g + 8, ni*8 + 2t + 1)
// which is the C layout of mma.sync m16n8k16 / m16n8k8.  The FFMA path computes
// the same outputs with scalar FMAs, so every kernel shares one epilogue.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace sparsify {

typedef unsigned int u32;
typedef long long i64;

__host__ __device__ constexpr int cmax(int a, int b) { return a > b ? a : b; }

// dtype and activation codes; runtime/cuda/kernels.py holds the Python side.
enum DTypeCode { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum ActCode { kNone = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4 };

// ------------------------------------------------------------ element types
template <typename T> struct Num;
template <> struct Num<float> {
  static __device__ __forceinline__ float zero() { return 0.f; }
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <> struct Num<__half> {
  static __device__ __forceinline__ __half zero() { return __float2half_rn(0.f); }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <> struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 zero() { return __float2bfloat16_rn(0.f); }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

__device__ __forceinline__ float load_as_float(const void* p, i64 i, int dtype) {
  switch (dtype) {
    case kF16: return __half2float(static_cast<const __half*>(p)[i]);
    case kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* p, i64 i, int dtype, float v) {
  switch (dtype) {
    case kF16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case kBF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// ------------------------------------------------------------- PTX wrappers
__device__ __forceinline__ u32 smem_addr(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}

// SPARSIFY_EMULATOR: the CPU emulator (sparsify.runtime.emulator) builds these
// sources for the host; each wrapper then runs the host version of the same PTX
// instruction, with the same operands.  This seam is the only emulator-specific code.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#ifdef SPARSIFY_EMULATOR
  sparsify_emu::cp_async_cg(smem_addr(smem), gmem, 16);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef SPARSIFY_EMULATOR
  sparsify_emu::cp_async_commit_group();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef SPARSIFY_EMULATOR
  sparsify_emu::cp_async_wait_group(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], const void* p) {
#ifdef SPARSIFY_EMULATOR
  sparsify_emu::ldmatrix(r, smem_addr(p));
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(u32 (&r)[4], const void* p) {
#ifdef SPARSIFY_EMULATOR
  sparsify_emu::ldmatrix_trans(r, smem_addr(p));
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#endif
}

__device__ __forceinline__ void mma_f16(float (&c)[4], const u32 (&a)[4], const u32 (&b)[2]) {
#ifdef SPARSIFY_EMULATOR
  sparsify_emu::mma_m16n8k16_f16(c, a, b, c);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
__device__ __forceinline__ void mma_bf16(float (&c)[4], const u32 (&a)[4], const u32 (&b)[2]) {
#ifdef SPARSIFY_EMULATOR
  sparsify_emu::mma_m16n8k16_bf16(c, a, b, c);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
__device__ __forceinline__ void mma_tf32(float (&c)[4], const u32 (&a)[4], const u32 (&b)[2]) {
#ifdef SPARSIFY_EMULATOR
  sparsify_emu::mma_m16n8k8_tf32(c, a, b, c);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
__device__ __forceinline__ u32 to_tf32(float v) {
#ifdef SPARSIFY_EMULATOR
  return sparsify_emu::cvt_rna_tf32(v);
#else
  u32 r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return r;
#endif
}

// ------------------------------------------------------------- tile loader
// Copies the ROWS x COLS window at (row0, col0) of a row-major global matrix
// (leading dimension ld) into shared memory with leading dimension LD.
// Elements outside [0, row_bound) x [0, col_bound) read as zero.  16-byte
// chunks that are in bounds go through cp.async when vec_ok (the caller has
// checked base-pointer and leading-dimension alignment); the rest are copied
// element by element, so any shape and any alignment is correct.
template <typename T, int ROWS, int COLS, int LD, int NT>
__device__ __forceinline__ void load_tile(T* __restrict__ s, const T* __restrict__ g, i64 ld, int row0,
                                          int col0, int row_bound, int col_bound, bool vec_ok, int tid) {
  constexpr int VEC = 16 / sizeof(T);
  static_assert(COLS % VEC == 0, "tile width must be a whole number of 16-byte chunks");
  static_assert(LD % VEC == 0, "shared leading dimension must keep 16-byte alignment");
  constexpr int CPR = COLS / VEC;
  constexpr int CHUNKS = ROWS * CPR;
#pragma unroll
  for (int i = 0; i < (CHUNKS + NT - 1) / NT; ++i) {
    const int c = tid + i * NT;
    if (CHUNKS % NT == 0 || c < CHUNKS) {
      const int r = c / CPR;
      const int cc = (c % CPR) * VEC;
      const int gr = row0 + r;
      const int gc = col0 + cc;
      T* dst = s + r * LD + cc;
      if (vec_ok && gr < row_bound && gc + VEC <= col_bound) {
        cp_async16(dst, g + static_cast<i64>(gr) * ld + gc);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          dst[e] = (gr < row_bound && gc + e < col_bound) ? g[static_cast<i64>(gr) * ld + gc + e]
                                                         : Num<T>::zero();
        }
      }
    }
  }
}

// --------------------------------------------------------- the warp multiply
// acc += A * B over KLEN, for the warp's MF*16 x NF*8 tile.
//   A(m, k) = AK ? As[m * LDA + k] : As[k * LDA + m]   (K-major or M-major)
//   B(k, n) = BK ? Bs[n * LDB + k] : Bs[k * LDB + n]   (K-major or N-major)
// As and Bs point at the warp's origin (row m = 0, column n = 0, k = 0).
struct MathF16 { typedef __half T; };
struct MathBF16 { typedef __nv_bfloat16 T; };
struct MathTF32 { typedef float T; };
struct MathFFMA { typedef float T; };

template <class Math> struct WarpMma;

__device__ __forceinline__ void mma16(MathF16, float (&c)[4], const u32 (&a)[4], const u32 (&b)[2]) {
  mma_f16(c, a, b);
}
__device__ __forceinline__ void mma16(MathBF16, float (&c)[4], const u32 (&a)[4], const u32 (&b)[2]) {
  mma_bf16(c, a, b);
}

template <class Math>
struct WarpMma16 {
  typedef typename Math::T T;
  template <int MF, int NF, bool AK, bool BK, int LDA, int LDB, int KLEN>
  static __device__ __forceinline__ void run(float (&acc)[MF][NF][4], const T* As, const T* Bs, int lane) {
    static_assert(KLEN % 16 == 0, "16-bit tensor-core path steps k by 16");
    static_assert(NF % 2 == 0, "B fragments are loaded two n-fragments at a time");
#pragma unroll
    for (int k0 = 0; k0 < KLEN; k0 += 16) {
      u32 a[MF][4];
      u32 b[NF][2];
#pragma unroll
      for (int mi = 0; mi < MF; ++mi) {
        if constexpr (AK) {
          ldsm_x4(a[mi], As + (mi * 16 + (lane & 15)) * LDA + k0 + (lane >> 4) * 8);
        } else {
          ldsm_x4_trans(a[mi], As + (k0 + (lane >> 4) * 8 + (lane & 7)) * LDA + mi * 16 + ((lane >> 3) & 1) * 8);
        }
      }
#pragma unroll
      for (int nj = 0; nj < NF; nj += 2) {
        u32 r[4];
        if constexpr (BK) {
          ldsm_x4(r, Bs + (nj * 8 + (lane >> 4) * 8 + (lane & 7)) * LDB + k0 + ((lane >> 3) & 1) * 8);
        } else {
          ldsm_x4_trans(r, Bs + (k0 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LDB + nj * 8 + (lane >> 4) * 8);
        }
        b[nj][0] = r[0];
        b[nj][1] = r[1];
        b[nj + 1][0] = r[2];
        b[nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MF; ++mi) {
#pragma unroll
        for (int ni = 0; ni < NF; ++ni) {
          mma16(Math(), acc[mi][ni], a[mi], b[ni]);
        }
      }
    }
  }
};
template <> struct WarpMma<MathF16> : WarpMma16<MathF16> {};
template <> struct WarpMma<MathBF16> : WarpMma16<MathBF16> {};

template <bool AK, int LDA>
__device__ __forceinline__ float a_at(const float* As, int m, int k) {
  if constexpr (AK) return As[m * LDA + k];
  else return As[k * LDA + m];
}
template <bool BK, int LDB>
__device__ __forceinline__ float b_at(const float* Bs, int k, int n) {
  if constexpr (BK) return Bs[n * LDB + k];
  else return Bs[k * LDB + n];
}

template <>
struct WarpMma<MathTF32> {
  template <int MF, int NF, bool AK, bool BK, int LDA, int LDB, int KLEN>
  static __device__ __forceinline__ void run(float (&acc)[MF][NF][4], const float* As, const float* Bs, int lane) {
    static_assert(KLEN % 8 == 0, "TF32 tensor-core path steps k by 8");
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int k0 = 0; k0 < KLEN; k0 += 8) {
      u32 a[MF][4];
      u32 b[NF][2];
#pragma unroll
      for (int mi = 0; mi < MF; ++mi) {
        a[mi][0] = to_tf32(a_at<AK, LDA>(As, mi * 16 + g, k0 + t));
        a[mi][1] = to_tf32(a_at<AK, LDA>(As, mi * 16 + g + 8, k0 + t));
        a[mi][2] = to_tf32(a_at<AK, LDA>(As, mi * 16 + g, k0 + t + 4));
        a[mi][3] = to_tf32(a_at<AK, LDA>(As, mi * 16 + g + 8, k0 + t + 4));
      }
#pragma unroll
      for (int ni = 0; ni < NF; ++ni) {
        b[ni][0] = to_tf32(b_at<BK, LDB>(Bs, k0 + t, ni * 8 + g));
        b[ni][1] = to_tf32(b_at<BK, LDB>(Bs, k0 + t + 4, ni * 8 + g));
      }
#pragma unroll
      for (int mi = 0; mi < MF; ++mi) {
#pragma unroll
        for (int ni = 0; ni < NF; ++ni) mma_tf32(acc[mi][ni], a[mi], b[ni]);
      }
    }
  }
};

template <>
struct WarpMma<MathFFMA> {
  template <int MF, int NF, bool AK, bool BK, int LDA, int LDB, int KLEN>
  static __device__ __forceinline__ void run(float (&acc)[MF][NF][4], const float* As, const float* Bs, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll 4
    for (int k = 0; k < KLEN; ++k) {
      float a[MF][2];
      float b[NF][2];
#pragma unroll
      for (int mi = 0; mi < MF; ++mi) {
        a[mi][0] = a_at<AK, LDA>(As, mi * 16 + g, k);
        a[mi][1] = a_at<AK, LDA>(As, mi * 16 + g + 8, k);
      }
#pragma unroll
      for (int ni = 0; ni < NF; ++ni) {
        b[ni][0] = b_at<BK, LDB>(Bs, k, ni * 8 + 2 * t);
        b[ni][1] = b_at<BK, LDB>(Bs, k, ni * 8 + 2 * t + 1);
      }
#pragma unroll
      for (int mi = 0; mi < MF; ++mi) {
#pragma unroll
        for (int ni = 0; ni < NF; ++ni) {
          acc[mi][ni][0] = fmaf(a[mi][0], b[ni][0], acc[mi][ni][0]);
          acc[mi][ni][1] = fmaf(a[mi][0], b[ni][1], acc[mi][ni][1]);
          acc[mi][ni][2] = fmaf(a[mi][1], b[ni][0], acc[mi][ni][2]);
          acc[mi][ni][3] = fmaf(a[mi][1], b[ni][1], acc[mi][ni][3]);
        }
      }
    }
  }
};

// Accumulators to a row-major fp32 tile (leading dimension LDC) at the warp's origin.
template <int MF, int NF, int LDC>
__device__ __forceinline__ void store_fragments(float* Cs, const float (&acc)[MF][NF][4], int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < MF; ++mi)
#pragma unroll
    for (int ni = 0; ni < NF; ++ni) {
      float* c = Cs + (mi * 16 + g) * LDC + ni * 8 + 2 * t;
      *reinterpret_cast<float2*>(c) = make_float2(acc[mi][ni][0], acc[mi][ni][1]);
      *reinterpret_cast<float2*>(c + 8 * LDC) = make_float2(acc[mi][ni][2], acc[mi][ni][3]);
    }
}

template <int MF, int NF>
__device__ __forceinline__ void zero_acc(float (&acc)[MF][NF][4]) {
#pragma unroll
  for (int mi = 0; mi < MF; ++mi)
#pragma unroll
    for (int ni = 0; ni < NF; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
}

// ---------------------------------------------------------------- epilogue
// y[m, n] = cast(act(acc + bias[n]) + residual[m, n]); the order is that of
// sparsify.runtime.ops.bsmm.  Bias, residual and output each carry their own
// dtype code, so one kernel serves every output cast.
struct Epilogue {
  const void* bias;
  const void* residual;
  void* y;
  int M, N;
  int act, bias_dtype, res_dtype, out_dtype;
};

__device__ __forceinline__ float activate(float v, int act) {
  switch (act) {
    case kRelu: return v < 0.f ? 0.f : v;  // keeps NaN, as torch.relu does
    case kGelu: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case kGeluTanh: {
      const float u = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.f + tanhf(u));
    }
    case kSilu: return v / (1.f + expf(-v));
    default: return v;
  }
}

__device__ __forceinline__ void epilogue_store(const Epilogue& e, int m, int n, float v) {
  if (m >= e.M || n >= e.N) return;
  if (e.bias != nullptr) v += load_as_float(e.bias, n, e.bias_dtype);
  v = activate(v, e.act);
  const i64 idx = static_cast<i64>(m) * e.N + n;
  if (e.residual != nullptr) v += load_as_float(e.residual, idx, e.res_dtype);
  store_from_float(e.y, idx, e.out_dtype, v);
}

}  // namespace sparsify
