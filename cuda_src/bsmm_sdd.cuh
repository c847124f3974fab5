// SDD kernel: the weight gradient of the stored blocks only.
//   dW[blk] = dy[:, r*B : r*B+B].T @ x[:, c*B : c*B+B]      (r, c) = (rows[blk], cols[blk])
// One thread block per stored block (and per split of M when there are too few
// blocks to fill the GPU); warps tile the B x B output and, for small blocks,
// split the reduction over M between them and meet in shared memory.
#pragma once

#include "bsmm_common.cuh"

namespace sparsify {

struct DwArgs {
  const void* dy;     // [M, N]
  const void* x;      // [M, K]
  const int* rows;    // [nnz] block row of each stored block
  const int* cols;    // [nnz] block column of each stored block
  void* out;          // [nnz, B, B] in x's dtype, written when ws is null
  float* ws;          // [splits, nnz, B, B] fp32 partial sums, or null
  int M, N, K, nnz, rows_per_split, flags;  // flags: kAVec (dy), kVVec (x)
};

template <class Math, int B, int BKM, int WI, int WJ, int WK, int STAGES>
__device__ __forceinline__ void sdd_dw(const DwArgs& p) {
  typedef typename Math::T T;
  constexpr int BI = B < 16 ? 16 : B;  // fragments are 16 rows tall: B = 8 pads i with zeros
  constexpr int NT = WI * WJ * WK * 32;
  constexpr int PAD = 16 / sizeof(T);
  constexpr int LDA = BI + PAD;  // A(i, m) = dy tile stored [m][i]  (M-major A)
  constexpr int LDB = B + PAD;   // B(m, j) = x tile stored [m][j]   (N-major B)
  constexpr int TI = BI / WI, TJ = B / WJ, KW = BKM / WK;
  constexpr int MF = TI / 16, NF = TJ / 8;
  static_assert(TI % 16 == 0 && TJ % 8 == 0 && BKM % WK == 0 && STAGES >= 2, "bad tile configuration");
  __shared__ __align__(16) T As[STAGES][BKM * LDA];
  __shared__ __align__(16) T Bs[STAGES][BKM * LDB];
  __shared__ float red[WK > 1 ? BI * B : 1];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wi = warp % WI, wj = (warp / WI) % WJ, wk = warp / (WI * WJ);
  const int blk = blockIdx.x, split = blockIdx.y;
  const int r = p.rows[blk], c = p.cols[blk];
  const int m_begin = split * p.rows_per_split;
  const int m_end = min(p.M, m_begin + p.rows_per_split);
  const int n_iters = m_end > m_begin ? (m_end - m_begin + BKM - 1) / BKM : 0;
  const int a_col_bound = min(p.N, r * B + B);
  const int b_col_bound = min(p.K, c * B + B);
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  const bool a_vec = (p.flags & kAVec) != 0, b_vec = (p.flags & kVVec) != 0;

  if constexpr (WK > 1) {
    for (int i = tid; i < BI * B; i += NT) red[i] = 0.f;
  }

  auto load = [&](int stage, int it) {
    const int mm = m_begin + it * BKM;
    load_tile<T, BKM, BI, LDA, NT>(As[stage], dy, p.N, mm, r * B, m_end, a_col_bound, a_vec, tid);
    load_tile<T, BKM, B, LDB, NT>(Bs[stage], x, p.K, mm, c * B, m_end, b_col_bound, b_vec, tid);
  };

  float acc[MF][NF][4];
  zero_acc(acc);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < n_iters) load(s, s);
    cp_async_commit();
  }
  for (int it = 0; it < n_iters; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int nxt = it + STAGES - 1;
    if (nxt < n_iters) load(nxt % STAGES, nxt);
    cp_async_commit();
    const int s = it % STAGES;
    const T* Aw = As[s] + wk * KW * LDA + wi * TI;
    const T* Bw = Bs[s] + wk * KW * LDB + wj * TJ;
    WarpMma<Math>::template run<MF, NF, false, false, LDA, LDB, KW>(acc, Aw, Bw, lane);
  }
  cp_async_wait<0>();

  auto store = [&](int i, int j, float val) {
    if (i >= B) return;
    const i64 idx = (static_cast<i64>(blk) * B + i) * B + j;
    if (p.ws != nullptr) {
      p.ws[static_cast<i64>(split) * p.nnz * B * B + idx] = val;
    } else {
      static_cast<T*>(p.out)[idx] = Num<T>::from_float(val);
    }
  };
  const int g = lane >> 2, t = lane & 3;
  if constexpr (WK == 1) {
#pragma unroll
    for (int mi = 0; mi < MF; ++mi)
#pragma unroll
      for (int ni = 0; ni < NF; ++ni)
#pragma unroll
        for (int q = 0; q < 4; ++q)
          store(wi * TI + mi * 16 + g + (q >> 1) * 8, wj * TJ + ni * 8 + 2 * t + (q & 1), acc[mi][ni][q]);
  } else {
    __syncthreads();  // red is zeroed
#pragma unroll
    for (int mi = 0; mi < MF; ++mi)
#pragma unroll
      for (int ni = 0; ni < NF; ++ni)
#pragma unroll
        for (int q = 0; q < 4; ++q)
          atomicAdd(&red[(wi * TI + mi * 16 + g + (q >> 1) * 8) * B + wj * TJ + ni * 8 + 2 * t + (q & 1)],
                    acc[mi][ni][q]);
    __syncthreads();
    for (int i = tid; i < BI * B; i += NT) store(i / B, i % B, red[i]);
  }
}

}  // namespace sparsify
