// DSD kernels: dense output = dense input x block-sparse weight.
//
// One walk serves the forward and the input gradient:
//   forward  y  = x  @ W.T   walks W's block rows    (row_offsets, col_indices),
//                            block j is values[j] read as [n][k] (K-major B);
//   dX       dx = dy @ W     walks W.T's block rows  (t_row_offsets, t_col_indices,
//                            t_block_ids), block j is values[t_block_ids[j]]
//                            read as [k][n] (N-major B, ldmatrix.trans).
// Output block row `row` gets sum over its blocks of A[:, col*B : col*B+B] @ B_j.
#pragma once

#include "bsmm_common.cuh"

namespace sparsify {

enum VecFlags { kAVec = 1, kVVec = 2 };  // operand may be read in aligned 16-byte chunks

struct DsdArgs {
  const void* a;       // [M, K] row-major: x (forward) or dy (dX)
  const void* values;  // [nnz, B, B]
  const int* offsets;  // [n_rows + 1]
  const int* cols;     // [nnz]
  const int* ids;      // [nnz] index into values, or null for the identity
  const int* order;    // [n_rows] block rows in schedule order (longest first), or null
  int M, K, n_rows, n_mtiles, flags;
  Epilogue epi;
};

// Tiled kernel: one thread block per (block row, BM rows of A); block rows are
// taken in `order` (longest first) so uneven rows do not leave a tail.
template <class Math, int B, int BM, int BK, int WARPS_M, int WARPS_N, int STAGES, bool TRANS>
__device__ __forceinline__ void dsd_tiled(const DsdArgs& p) {
  typedef typename Math::T T;
  constexpr int NT = WARPS_M * WARPS_N * 32;
  constexpr int PAD = 16 / sizeof(T);  // one 16-byte chunk: conflict-free ldmatrix rows
  constexpr int LDA = BK + PAD;
  constexpr int LDB = TRANS ? B + PAD : BK + PAD;
  constexpr int B_ELEMS = TRANS ? BK * LDB : B * LDB;
  constexpr int WM = BM / WARPS_M, WN = B / WARPS_N;
  constexpr int MF = WM / 16, NF = WN / 8;
  constexpr int KCH = B / BK;
  static_assert(WM % 16 == 0 && WN % 8 == 0 && B % BK == 0 && STAGES >= 2, "bad tile configuration");
  // The staging buffers, and after the main loop the fp32 output tile: the
  // epilogue runs once per element from shared memory (coalesced stores, one
  // copy of the activation code) instead of once per register.
  constexpr int LDC = B + 4;
  constexpr int A_BYTES = STAGES * BM * LDA * static_cast<int>(sizeof(T));
  constexpr int B_BYTES = STAGES * B_ELEMS * static_cast<int>(sizeof(T));
  __shared__ __align__(16) unsigned char smem[cmax(A_BYTES + B_BYTES, BM * LDC * 4)];
  T(*As)[BM * LDA] = reinterpret_cast<T(*)[BM * LDA]>(smem);
  T(*Bs)[B_ELEMS] = reinterpret_cast<T(*)[B_ELEMS]>(smem + A_BYTES);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % WARPS_M, wn = warp / WARPS_M;
  const int slot = blockIdx.x / p.n_mtiles;
  const int m0 = (blockIdx.x % p.n_mtiles) * BM;
  const int row = p.order != nullptr ? p.order[slot] : slot;
  const int start = p.offsets[row];
  const int n_iters = (p.offsets[row + 1] - start) * KCH;
  const T* a = static_cast<const T*>(p.a);
  const T* v = static_cast<const T*>(p.values);
  const bool a_vec = (p.flags & kAVec) != 0, v_vec = (p.flags & kVVec) != 0;

  auto load = [&](int stage, int it) {
    const int j = start + it / KCH;
    const int k0 = (it % KCH) * BK;
    const int col = p.cols[j];
    const int blk = p.ids != nullptr ? p.ids[j] : j;
    load_tile<T, BM, BK, LDA, NT>(As[stage], a, p.K, m0, col * B + k0, p.M, p.K, a_vec, tid);
    const T* vb = v + static_cast<i64>(blk) * B * B;
    if constexpr (TRANS) {
      load_tile<T, BK, B, LDB, NT>(Bs[stage], vb, B, k0, 0, B, B, v_vec, tid);
    } else {
      load_tile<T, B, BK, LDB, NT>(Bs[stage], vb, B, 0, k0, B, B, v_vec, tid);
    }
  };

  float acc[MF][NF][4];
  zero_acc(acc);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_iters) load(s, s);
    cp_async_commit();  // empty groups keep the group count uniform
  }
  for (int it = 0; it < n_iters; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage `it` landed; everyone is done with stage it - 1
    const int nxt = it + STAGES - 1;
    if (nxt < n_iters) load(nxt % STAGES, nxt);
    cp_async_commit();
    const int s = it % STAGES;
    const T* Aw = As[s] + wm * WM * LDA;
    const T* Bw = TRANS ? Bs[s] + wn * WN : Bs[s] + wn * WN * LDB;
    WarpMma<Math>::template run<MF, NF, true, !TRANS, LDA, LDB, BK>(acc, Aw, Bw, lane);
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the staging buffers
  float* Cs = reinterpret_cast<float*>(smem);
  store_fragments<MF, NF, LDC>(Cs + wm * WM * LDC + wn * WN, acc, lane);
  __syncthreads();
  const int rows_here = min(BM, p.M - m0);
  for (int i = tid; i < rows_here * B; i += NT) {
    epilogue_store(p.epi, m0 + i / B, row * B + i % B, Cs[(i / B) * LDC + i % B]);
  }
}

// Small-M kernel (decoding, M <= 16 per thread block): one thread block per
// block row; its warps split the row's blocks between them, so every block of W
// is read once, through a private cp.async pipeline per warp.  Partial sums
// meet in shared memory before the epilogue.
template <class Math, int B, int BK, int WARPS, int STAGES, bool TRANS>
__device__ __forceinline__ void dsd_small(const DsdArgs& p) {
  typedef typename Math::T T;
  constexpr int NT = WARPS * 32;
  constexpr int PAD = 16 / sizeof(T);
  constexpr int LDA = BK + PAD;
  constexpr int LDB = TRANS ? B + PAD : BK + PAD;
  constexpr int B_ELEMS = TRANS ? BK * LDB : B * LDB;
  constexpr int NF = B / 8;
  constexpr int KCH = B / BK;
  static_assert(B % 8 == 0 && B % BK == 0 && STAGES >= 2, "bad tile configuration");
  __shared__ __align__(16) T As[WARPS][STAGES][16 * LDA];
  __shared__ __align__(16) T Bs[WARPS][STAGES][B_ELEMS];
  __shared__ float red[16 * B];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int row = p.order != nullptr ? p.order[blockIdx.x] : blockIdx.x;
  const int m0 = blockIdx.y * 16;
  const int start = p.offsets[row];
  const int n_iters = (p.offsets[row + 1] - start) * KCH;
  const int n_mine = n_iters > warp ? (n_iters - warp + WARPS - 1) / WARPS : 0;
  const T* a = static_cast<const T*>(p.a);
  const T* v = static_cast<const T*>(p.values);
  const bool a_vec = (p.flags & kAVec) != 0, v_vec = (p.flags & kVVec) != 0;

  for (int i = tid; i < 16 * B; i += NT) red[i] = 0.f;

  auto load = [&](int stage, int i) {
    const int it = warp + i * WARPS;
    const int j = start + it / KCH;
    const int k0 = (it % KCH) * BK;
    const int col = p.cols[j];
    const int blk = p.ids != nullptr ? p.ids[j] : j;
    load_tile<T, 16, BK, LDA, 32>(As[warp][stage], a, p.K, m0, col * B + k0, p.M, p.K, a_vec, lane);
    const T* vb = v + static_cast<i64>(blk) * B * B;
    if constexpr (TRANS) {
      load_tile<T, BK, B, LDB, 32>(Bs[warp][stage], vb, B, k0, 0, B, B, v_vec, lane);
    } else {
      load_tile<T, B, BK, LDB, 32>(Bs[warp][stage], vb, B, 0, k0, B, B, v_vec, lane);
    }
  };

  float acc[1][NF][4];
  zero_acc(acc);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_mine) load(s, s);
    cp_async_commit();
  }
  for (int i = 0; i < n_mine; ++i) {
    cp_async_wait<STAGES - 2>();
    __syncwarp();  // the pipeline is private to the warp
    const int nxt = i + STAGES - 1;
    if (nxt < n_mine) load(nxt % STAGES, nxt);
    cp_async_commit();
    const int s = i % STAGES;
    WarpMma<Math>::template run<1, NF, true, !TRANS, LDA, LDB, BK>(acc, As[warp][s], Bs[warp][s], lane);
  }
  cp_async_wait<0>();
  __syncthreads();  // red is zeroed
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int ni = 0; ni < NF; ++ni)
#pragma unroll
    for (int q = 0; q < 4; ++q)
      atomicAdd(&red[(g + (q >> 1) * 8) * B + ni * 8 + 2 * t + (q & 1)], acc[0][ni][q]);
  __syncthreads();
  const int rows_here = min(16, p.M - m0);
  for (int i = tid; i < rows_here * B; i += NT) epilogue_store(p.epi, m0 + i / B, row * B + i % B, red[i]);
}

}  // namespace sparsify
