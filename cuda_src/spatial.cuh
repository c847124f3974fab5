// Spatially sparse convolution kernels: coordinate hashing, kernel-map queries and
// gather-GEMM-scatter (forward, input gradient, weight gradient).
//
// Coordinates reach the kernels already packed into int64 keys (a mixed-radix code
// over the map's padded bounding box, runtime/spatial/coords.py), so a kernel offset
// is a constant shift of the key and a neighbour query is one hash probe sequence.
//
// The hash table is open addressing with linear probing over a power-of-two
// capacity; an empty slot holds key -1 (keys are >= 0).  Insertion claims a slot
// with a 64-bit atomicCAS and keeps the smallest row of equal keys with atomicMin,
// so duplicate coordinates resolve to their first row, as the CPU path does.
//
// Gather-GEMM-scatter: the pairs of a kernel map are grouped by offset k; the
// grid's x dimension walks tiles of BM pairs over all offsets (a tile table gives
// the first tile of each offset), y walks BN output channels.  A thread block
// gathers its BM source rows into shared memory (cp.async when 16-byte aligned),
// multiplies them by W[k] with the warp multiply of bsmm_common.cuh (mma.sync
// m16n8k16 on tensor cores for f16 / bf16, FFMA for f32; fp32 accumulation) and
// scatters with fp32 atomicAdd into a float32 output.  The input gradient is the
// same kernel reading W[k] transposed; the weight gradient reduces over chunks of
// pairs (split over pairs, fp32 atomicAdd into dW).
#pragma once

#include "bsmm_common.cuh"

namespace sparsify {
namespace spatial {

constexpr i64 kEmptyKey = -1;

__device__ __forceinline__ unsigned long long mix64(unsigned long long k) {
  // splitmix64's finalizer: neighbouring keys land in unrelated slots
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ULL;
  k ^= k >> 33;
  return k;
}

__device__ __forceinline__ void hash_insert(i64* tkeys, int* tvals, int mask, i64 key, int row) {
  unsigned long long h = mix64(static_cast<unsigned long long>(key)) & static_cast<unsigned long long>(mask);
  for (int probe = 0; probe <= mask; ++probe) {
    const unsigned long long prev = atomicCAS(reinterpret_cast<unsigned long long*>(tkeys + h),
                                              static_cast<unsigned long long>(kEmptyKey),
                                              static_cast<unsigned long long>(key));
    if (prev == static_cast<unsigned long long>(kEmptyKey) || prev == static_cast<unsigned long long>(key)) {
      atomicMin(tvals + h, row);
      return;
    }
    h = (h + 1) & static_cast<unsigned long long>(mask);
  }
}

__device__ __forceinline__ int hash_find(const i64* tkeys, const int* tvals, int mask, i64 key) {
  unsigned long long h = mix64(static_cast<unsigned long long>(key)) & static_cast<unsigned long long>(mask);
  for (int probe = 0; probe <= mask; ++probe) {
    const i64 k = tkeys[h];
    if (k == key) return tvals[h];
    if (k == kEmptyKey) return -1;
    h = (h + 1) & static_cast<unsigned long long>(mask);
  }
  return -1;
}

// The offset k whose tiles hold tile t: the largest k with tiles[k] <= t (empty offsets skipped).
__device__ __forceinline__ int find_offset(const int* __restrict__ tiles, int K, int t) {
  int lo = 0, hi = K;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (tiles[mid] <= t) lo = mid;
    else hi = mid;
  }
  return lo;
}

// Gathers rows idx[r] (r < nrows; zeros after) of a row-major matrix, columns
// [col0, col0 + COLS) (zeros past col_bound), into shared memory with leading dimension LD.
template <typename T, int ROWS, int COLS, int LD, int NT>
__device__ __forceinline__ void gather_tile(T* __restrict__ s, const T* __restrict__ g, i64 ld,
                                            const int* __restrict__ idx, int nrows, int col0, int col_bound,
                                            bool vec_ok, int tid) {
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
      const int gc = col0 + cc;
      T* dst = s + r * LD + cc;
      if (r < nrows && vec_ok && gc + VEC <= col_bound) {
        cp_async16(dst, g + static_cast<i64>(idx[r]) * ld + gc);
      } else {
        const i64 base = r < nrows ? static_cast<i64>(idx[r]) * ld : 0;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          dst[e] = (r < nrows && gc + e < col_bound) ? g[base + gc + e] : Num<T>::zero();
        }
      }
    }
  }
}

// dst[sidx[p], :] += src[gidx[p], :] @ B_k over the pairs p of every offset k, where
// B_k = W[k] ([C_red, C_n] row-major) or, with TW, W[k]^T (W[k] is [C_n, C_red]).
template <class Math, int BM, int BN, int BK, int WM, int WN, bool TW>
__device__ __forceinline__ void conv_gemm(const typename Math::T* __restrict__ src, const int* __restrict__ gidx,
                                          float* __restrict__ dst, const int* __restrict__ sidx,
                                          const typename Math::T* __restrict__ W, const int* __restrict__ pairs,
                                          const int* __restrict__ tiles, int K, int c_red, int c_n, int vec) {
  typedef typename Math::T T;
  constexpr int NT = 32 * WM * WN;
  constexpr int PAD = 16 / sizeof(T);
  constexpr int LDA = BK + PAD;
  constexpr int LDB = TW ? BK + PAD : BN + PAD;
  constexpr int WTM = BM / WM, WTN = BN / WN;
  constexpr int MF = WTM / 16, NF = WTN / 8;
  static_assert(WTM % 16 == 0 && WTN % 8 == 0, "warp tile must be whole fragments");
  __shared__ __align__(16) T As[BM * LDA];
  __shared__ __align__(16) T Bs[TW ? BN * LDB : BK * LDB];
  __shared__ int gi[BM];
  __shared__ int si[BM];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WN, wn = warp % WN;
  const int t = blockIdx.x;
  const int k = find_offset(tiles, K, t);
  const int p0 = pairs[k] + (t - tiles[k]) * BM;
  const int nrows = min(BM, pairs[k + 1] - p0);
  const int n0 = blockIdx.y * BN;
  const T* Wk = W + static_cast<i64>(k) * c_red * c_n;
  const i64 ldw = TW ? c_red : c_n;
  for (int r = tid; r < BM; r += NT) {
    gi[r] = r < nrows ? gidx[p0 + r] : 0;
    si[r] = r < nrows ? sidx[p0 + r] : 0;
  }
  __syncthreads();

  float acc[MF][NF][4];
  zero_acc(acc);
  for (int k0 = 0; k0 < c_red; k0 += BK) {
    gather_tile<T, BM, BK, LDA, NT>(As, src, c_red, gi, nrows, k0, c_red, (vec & 1) != 0, tid);
    if constexpr (TW) {
      load_tile<T, BN, BK, LDB, NT>(Bs, Wk, ldw, n0, k0, c_n, c_red, (vec & 2) != 0, tid);
    } else {
      load_tile<T, BK, BN, LDB, NT>(Bs, Wk, ldw, k0, n0, c_red, c_n, (vec & 2) != 0, tid);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    const T* Bw = TW ? Bs + wn * WTN * LDB : Bs + wn * WTN;
    WarpMma<Math>::template run<MF, NF, true, TW, LDA, LDB, BK>(acc, As + wm * WTM * LDA, Bw, lane);
    __syncthreads();
  }

  const int g = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int mi = 0; mi < MF; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int m = wm * WTM + mi * 16 + g + half * 8;
      if (m >= nrows) continue;
      float* row = dst + static_cast<i64>(si[m]) * c_n;
#pragma unroll
      for (int ni = 0; ni < NF; ++ni) {
        const int n = n0 + wn * WTN + ni * 8 + 2 * tq;
        if (n < c_n) atomicAdd(row + n, acc[mi][ni][half * 2]);
        if (n + 1 < c_n) atomicAdd(row + n + 1, acc[mi][ni][half * 2 + 1]);
      }
    }
  }
}

// dW[k] += X[in_p]^T @ dY[out_p] over chunks of CH pairs of offset k; dW is fp32 [K, c_in, c_out].
template <class Math, int BM, int BN, int BK, int WM, int WN, int CH>
__device__ __forceinline__ void conv_wgrad(const typename Math::T* __restrict__ x, const int* __restrict__ in_idx,
                                           const typename Math::T* __restrict__ dy, const int* __restrict__ out_idx,
                                           float* __restrict__ dw, const int* __restrict__ pairs,
                                           const int* __restrict__ tiles, int K, int c_in, int c_out, int vec) {
  typedef typename Math::T T;
  constexpr int NT = 32 * WM * WN;
  constexpr int PAD = 16 / sizeof(T);
  constexpr int LDA = BM + PAD;  // As[kk][m]: A(m, kk) is M-major
  constexpr int LDB = BN + PAD;  // Bs[kk][n]
  constexpr int WTM = BM / WM, WTN = BN / WN;
  constexpr int MF = WTM / 16, NF = WTN / 8;
  static_assert(CH % BK == 0, "a chunk is whole reduction steps");
  __shared__ __align__(16) T As[BK * LDA];
  __shared__ __align__(16) T Bs[BK * LDB];
  __shared__ int gi[CH];
  __shared__ int go[CH];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WN, wn = warp % WN;
  const int t = blockIdx.x;
  const int k = find_offset(tiles, K, t);
  const int p0 = pairs[k] + (t - tiles[k]) * CH;
  const int np = min(CH, pairs[k + 1] - p0);
  const int tiles_n = (c_out + BN - 1) / BN;
  const int m0 = (blockIdx.y / tiles_n) * BM, n0 = (blockIdx.y % tiles_n) * BN;
  for (int r = tid; r < CH; r += NT) {
    gi[r] = r < np ? in_idx[p0 + r] : 0;
    go[r] = r < np ? out_idx[p0 + r] : 0;
  }
  __syncthreads();

  float acc[MF][NF][4];
  zero_acc(acc);
  for (int q0 = 0; q0 < np; q0 += BK) {
    gather_tile<T, BK, BM, LDA, NT>(As, x, c_in, gi + q0, np - q0, m0, c_in, (vec & 1) != 0, tid);
    gather_tile<T, BK, BN, LDB, NT>(Bs, dy, c_out, go + q0, np - q0, n0, c_out, (vec & 2) != 0, tid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    WarpMma<Math>::template run<MF, NF, false, false, LDA, LDB, BK>(acc, As + wm * WTM, Bs + wn * WTN, lane);
    __syncthreads();
  }

  float* dwk = dw + static_cast<i64>(k) * c_in * c_out;
  const int g = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int mi = 0; mi < MF; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int m = m0 + wm * WTM + mi * 16 + g + half * 8;
      if (m >= c_in) continue;
#pragma unroll
      for (int ni = 0; ni < NF; ++ni) {
        const int n = n0 + wn * WTN + ni * 8 + 2 * tq;
        if (n < c_out) atomicAdd(dwk + static_cast<i64>(m) * c_out + n, acc[mi][ni][half * 2]);
        if (n + 1 < c_out) atomicAdd(dwk + static_cast<i64>(m) * c_out + n + 1, acc[mi][ni][half * 2 + 1]);
      }
    }
  }
}

}  // namespace spatial
}  // namespace sparsify

// ------------------------------------------------------------------ entry points
// Parameter lists are what runtime/spatial/cuda.py passes (in this order).

#define SPARSIFY_SPATIAL_HASH()                                                                               \
  extern "C" __global__ void __launch_bounds__(256) spatial_hash_insert(                                      \
      const long long* __restrict__ keys, int n, long long* __restrict__ tkeys, int* __restrict__ tvals,       \
      int mask) {                                                                                             \
    const int i = blockIdx.x * blockDim.x + threadIdx.x;                                                      \
    if (i < n) sparsify::spatial::hash_insert(tkeys, tvals, mask, keys[i], i);                                \
  }                                                                                                           \
  extern "C" __global__ void __launch_bounds__(256) spatial_hash_query(                                       \
      const long long* __restrict__ base, int m, const long long* __restrict__ shifts,                        \
      const long long* __restrict__ tkeys, const int* __restrict__ tvals, int mask, int* __restrict__ out) {  \
    const int i = blockIdx.x * blockDim.x + threadIdx.x;                                                      \
    const int k = blockIdx.y;                                                                                 \
    if (i >= m) return;                                                                                       \
    const long long b = base[i];                                                                              \
    out[static_cast<long long>(k) * m + i] =                                                                  \
        b < 0 ? -1 : sparsify::spatial::hash_find(tkeys, tvals, mask, b + shifts[k]);                         \
  }

#define SPARSIFY_SPATIAL_GEMM(NAME, MATH, BM, BN, BK, WM, WN, TW)                                               \
  extern "C" __global__ void __launch_bounds__(32 * WM * WN) NAME(                                            \
      const typename sparsify::MATH::T* __restrict__ src, const int* __restrict__ gidx,                       \
      float* __restrict__ dst, const int* __restrict__ sidx, const typename sparsify::MATH::T* __restrict__ W, \
      const int* __restrict__ pairs, const int* __restrict__ tiles, int K, int c_red, int c_n, int vec) {     \
    sparsify::spatial::conv_gemm<sparsify::MATH, BM, BN, BK, WM, WN, TW>(src, gidx, dst, sidx, W, pairs,      \
                                                                         tiles, K, c_red, c_n, vec);          \
  }

#define SPARSIFY_SPATIAL_WGRAD(NAME, MATH, BM, BN, BK, WM, WN, CH)                                              \
  extern "C" __global__ void __launch_bounds__(32 * WM * WN) NAME(                                            \
      const typename sparsify::MATH::T* __restrict__ x, const int* __restrict__ in_idx,                       \
      const typename sparsify::MATH::T* __restrict__ dy, const int* __restrict__ out_idx,                     \
      float* __restrict__ dw, const int* __restrict__ pairs, const int* __restrict__ tiles, int K, int c_in,  \
      int c_out, int vec) {                                                                                   \
    sparsify::spatial::conv_wgrad<sparsify::MATH, BM, BN, BK, WM, WN, CH>(x, in_idx, dy, out_idx, dw, pairs,  \
                                                                          tiles, K, c_in, c_out, vec);        \
  }
