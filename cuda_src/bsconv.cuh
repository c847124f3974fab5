// Block-sparse convolution kernels: the weight is sparse over (out, in) channel blocks
// of B x B and dense over the kh x kw taps (values [nnz, B, B, KH, KW]); tensors are NCHW.
//
// Implicit GEMM over the taps: no im2col buffer.  A thread block owns one block row of the
// output channels (TRANS = false: output channels, the forward; TRANS = true: input
// channels, dX over the transposed layout) and P output pixels.  It walks the stored
// blocks of its row and, for each block, every tap: the tap's B x B weight slice and the
// B channels x P pixels of the tap-shifted input (zero outside the padded input, or, for
// dX, where the stride does not divide) go to shared memory, and each thread accumulates
// its outputs in fp32 registers.  The epilogue is fused: bias, activation, residual and
// the output cast, in the order of sparsify.runtime.ops_conv.bsconv2d.
//
// dW: a thread block owns one stored block and one tap and reduces over every output
// pixel, P at a time: only the stored blocks' gradients are computed.
//
// Elements are f32, f16 or bf16 (Math tag); products and sums are fp32 FFMA.
// The parameter lists below are the launch ABI of runtime/cuda/executor_conv.py.
#pragma once

#include "bsmm_common.cuh"

namespace sparsify {

struct ConvGeom {
  int N, C_in, H, W, C_out, Ho, Wo, KH, KW, sh, sw, ph, pw, dh, dw;
};

// The input pixel a (pixel, tap) reads, or false where it is padding (forward),
// or the dY pixel a dX (pixel, tap) reads, or false where none does (TRANS).
template <bool TRANS>
__device__ __forceinline__ bool conv_source(const ConvGeom& g, int y, int x, int kh, int kw, int& sy, int& sx) {
  if (!TRANS) {
    sy = y * g.sh - g.ph + kh * g.dh;
    sx = x * g.sw - g.pw + kw * g.dw;
    return sy >= 0 && sy < g.H && sx >= 0 && sx < g.W;
  }
  const int ty = y + g.ph - kh * g.dh;
  const int tx = x + g.pw - kw * g.dw;
  if (ty < 0 || tx < 0 || ty % g.sh != 0 || tx % g.sw != 0) return false;
  sy = ty / g.sh;
  sx = tx / g.sw;
  return sy < g.Ho && sx < g.Wo;
}

template <class Math, int B, int P, int THREADS, bool TRANS>
__device__ __forceinline__ void bsconv_dsd(const void* __restrict__ src_, const void* __restrict__ values_,
                                           const int* __restrict__ offsets, const int* __restrict__ cols,
                                           const int* __restrict__ ids, const ConvGeom g, const Epilogue e) {
  typedef typename Math::T T;
  static_assert((B * P) % THREADS == 0, "every thread owns the same number of outputs");
  constexpr int PER = B * P / THREADS;
  const T* __restrict__ src = static_cast<const T*>(src_);
  const T* __restrict__ values = static_cast<const T*>(values_);
  __shared__ float Ws[B][B + 1];  // [row-local channel][col-local channel] of one tap
  __shared__ float Xs[B][P + 1];  // [col-local channel][pixel]

  const int tid = threadIdx.x;
  const int row = blockIdx.y;
  // output pixels of this kernel: (N, Ho, Wo) for the forward, (N, H, W) for dX
  const int OH = TRANS ? g.H : g.Ho, OW = TRANS ? g.W : g.Wo;
  const int src_c = TRANS ? g.C_out : g.C_in;  // channels of the tensor read
  const int SH = TRANS ? g.Ho : g.H, SW = TRANS ? g.Wo : g.W;
  const i64 pixels = static_cast<i64>(g.N) * OH * OW;
  const i64 q0 = static_cast<i64>(blockIdx.x) * P;
  const int taps = g.KH * g.KW;

  float acc[PER];
#pragma unroll
  for (int r = 0; r < PER; ++r) acc[r] = 0.f;

  for (int k = offsets[row]; k < offsets[row + 1]; ++k) {
    const int blk = TRANS ? ids[k] : k;
    const int col = cols[k];
    for (int tap = 0; tap < taps; ++tap) {
      const int kh = tap / g.KW, kw = tap % g.KW;
      __syncthreads();  // the previous tap's tiles are consumed
      for (int i = tid; i < B * B; i += THREADS) {
        const int a = i / B, b = i % B;  // a: row-local, b: col-local
        const int o = TRANS ? b : a, c = TRANS ? a : b;
        Ws[a][b] = Num<T>::to_float(values[((static_cast<i64>(blk) * B + o) * B + c) * taps + tap]);
      }
      for (int i = tid; i < B * P; i += THREADS) {
        const int b = i / P, p = i % P;
        const i64 q = q0 + p;
        const int ch = col * B + b;
        float v = 0.f;
        if (q < pixels && ch < src_c) {
          const int n = static_cast<int>(q / (static_cast<i64>(OH) * OW));
          const int rem = static_cast<int>(q % (static_cast<i64>(OH) * OW));
          int sy, sx;
          if (conv_source<TRANS>(g, rem / OW, rem % OW, kh, kw, sy, sx))
            v = Num<T>::to_float(src[((static_cast<i64>(n) * src_c + ch) * SH + sy) * SW + sx]);
        }
        Xs[b][p] = v;
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < PER; ++r) {
        const int idx = tid + r * THREADS;
        const int a = idx / P, p = idx % P;
        float s = acc[r];
#pragma unroll 4
        for (int b = 0; b < B; ++b) s = fmaf(Ws[a][b], Xs[b][p], s);
        acc[r] = s;
      }
    }
  }

  // epilogue: bias, activation, residual, cast (NCHW index of the output element)
  // The accumulators go through shared memory to the epilogue, which then needs no per-thread
  // array indexing (an unrolled epilogue with the activation inlined PER times makes NVRTC run
  // for minutes; a rolled one indexes acc dynamically and spills it).
  __syncthreads();
#pragma unroll
  for (int r = 0; r < PER; ++r) {
    const int idx = tid + r * THREADS;
    Xs[idx / P][idx % P] = acc[r];
  }
  __syncthreads();
  const int out_c = TRANS ? g.C_in : g.C_out;
  for (int i = tid; i < B * P; i += THREADS) {
    const int a = i / P, p = i % P;
    const i64 q = q0 + p;
    const int ch = row * B + a;
    if (q >= pixels || ch >= out_c) continue;
    const int n = static_cast<int>(q / (static_cast<i64>(OH) * OW));
    const int rem = static_cast<int>(q % (static_cast<i64>(OH) * OW));
    const i64 out = (static_cast<i64>(n) * out_c + ch) * OH * OW + rem;
    float v = Xs[a][p];
    if (e.bias != nullptr) v += load_as_float(e.bias, ch, e.bias_dtype);
    v = activate(v, e.act);
    if (e.residual != nullptr) v += load_as_float(e.residual, out, e.res_dtype);
    store_from_float(e.y, out, e.out_dtype, v);
  }
}

template <class Math, int B, int P, int THREADS>
__device__ __forceinline__ void bsconv_dw(const void* __restrict__ dy_, const void* __restrict__ x_,
                                          const int* __restrict__ rows, const int* __restrict__ cols,
                                          void* __restrict__ out_, const ConvGeom g) {
  typedef typename Math::T T;
  static_assert((B * B) % THREADS == 0 || THREADS % (B * B) == 0, "outputs split evenly over the threads");
  constexpr int PER = (B * B + THREADS - 1) / THREADS;
  const T* __restrict__ dy = static_cast<const T*>(dy_);
  const T* __restrict__ x = static_cast<const T*>(x_);
  T* __restrict__ out = static_cast<T*>(out_);
  __shared__ float Ds[B][P + 1];  // [output channel][pixel]
  __shared__ float Xs[B][P + 1];  // [input channel][pixel]

  const int tid = threadIdx.x;
  const int k = blockIdx.x;
  const int tap = blockIdx.y;
  const int kh = tap / g.KW, kw = tap % g.KW;
  const int taps = g.KH * g.KW;
  const int row = rows[k], col = cols[k];
  const i64 pixels = static_cast<i64>(g.N) * g.Ho * g.Wo;

  float acc[PER];
#pragma unroll
  for (int r = 0; r < PER; ++r) acc[r] = 0.f;

  for (i64 q0 = 0; q0 < pixels; q0 += P) {
    __syncthreads();
    for (int i = tid; i < B * P; i += THREADS) {
      const int b = i / P, p = i % P;
      const i64 q = q0 + p;
      float dv = 0.f, xv = 0.f;
      if (q < pixels) {
        const int n = static_cast<int>(q / (static_cast<i64>(g.Ho) * g.Wo));
        const int rem = static_cast<int>(q % (static_cast<i64>(g.Ho) * g.Wo));
        const int o = row * B + b;
        if (o < g.C_out) dv = Num<T>::to_float(dy[(static_cast<i64>(n) * g.C_out + o) * g.Ho * g.Wo + rem]);
        const int c = col * B + b;
        int sy, sx;
        if (c < g.C_in && conv_source<false>(g, rem / g.Wo, rem % g.Wo, kh, kw, sy, sx))
          xv = Num<T>::to_float(x[((static_cast<i64>(n) * g.C_in + c) * g.H + sy) * g.W + sx]);
      }
      Ds[b][p] = dv;
      Xs[b][p] = xv;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < PER; ++r) {
      const int idx = tid + r * THREADS;
      if (idx < B * B) {
        const int o = idx / B, c = idx % B;
        float s = acc[r];
#pragma unroll 8
        for (int p = 0; p < P; ++p) s = fmaf(Ds[o][p], Xs[c][p], s);
        acc[r] = s;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < PER; ++r) {
    const int idx = tid + r * THREADS;
    if (idx < B * B) {
      const int o = idx / B, c = idx % B;
      out[((static_cast<i64>(k) * B + o) * B + c) * taps + tap] = Num<T>::from_float(acc[r]);
    }
  }
}

}  // namespace sparsify

#define SPARSIFY_CONV_GEOM_PARAMS                                                                   \
  int N, int C_in, int H, int W, int C_out, int Ho, int Wo, int KH, int KW, int sh, int sw, int ph, \
      int pw, int dh, int dw

#define SPARSIFY_CONV_GEOM sparsify::ConvGeom{N, C_in, H, W, C_out, Ho, Wo, KH, KW, sh, sw, ph, pw, dh, dw}

// Forward (TRANS = false) or dX (TRANS = true).  grid (ceil(pixels / P), block rows).
#define SPARSIFY_BSCONV_DSD(NAME, MATH, B, P, THREADS, TRANS)                                           \
  extern "C" __global__ void __launch_bounds__(THREADS, 1) NAME(                                        \
      const void* src, const void* values, const int* offsets, const int* cols, const int* ids,        \
      const void* bias, const void* residual, void* y, SPARSIFY_CONV_GEOM_PARAMS, int act,             \
      int bias_dtype, int res_dtype, int out_dtype) {                                                  \
    const sparsify::ConvGeom g = SPARSIFY_CONV_GEOM;                                                   \
    const int out_c = (TRANS) ? C_in : C_out;                                                          \
    const int pix = (TRANS) ? H * W : Ho * Wo;                                                         \
    sparsify::bsconv_dsd<sparsify::MATH, B, P, THREADS, TRANS>(                                        \
        src, values, offsets, cols, ids, g,                                                            \
        sparsify::Epilogue{bias, residual, y, N * out_c * pix, out_c, act, bias_dtype, res_dtype, out_dtype}); \
  }

// dW of the stored blocks.  grid (nnz, KH * KW).
#define SPARSIFY_BSCONV_DW(NAME, MATH, B, P, THREADS)                                                   \
  extern "C" __global__ void __launch_bounds__(THREADS, 1) NAME(                                        \
      const void* dy, const void* x, const int* rows, const int* cols, void* out,                      \
      SPARSIFY_CONV_GEOM_PARAMS) {                                                                     \
    sparsify::bsconv_dw<sparsify::MATH, B, P, THREADS>(dy, x, rows, cols, out, SPARSIFY_CONV_GEOM);    \
  }
