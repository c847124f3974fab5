// The LSTM gate math of one time step, fused into one elementwise kernel per direction
// (forward and backward), for sparsify.runtime.ops_lstm's recurrence on CUDA.
//
// pre [N, 4H] holds the gate pre-activations in nn.LSTM's order (i, f, g, o); one thread
// per (n, j) of [N, H] reads its four gates and the previous cell, and writes
//   forward:  act = (sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)), c = f c_prev + i g, h = o tanh(c)
//   backward: dpre (the four gate gradients) and dc_prev, from dh, dc, act, c, c_prev.
// Math in fp32; elements f32, f16 or bf16 (Math tag).  The parameter lists are the launch
// ABI of runtime/cuda/executor_lstm.py.
#pragma once

#include "bsmm_common.cuh"

namespace sparsify {

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

template <class Math>
__device__ __forceinline__ void lstm_gates_fwd(const void* pre_, const void* c_prev_, void* h_, void* c_, void* act_,
                                               int N, int H) {
  typedef typename Math::T T;
  const i64 idx = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<i64>(N) * H) return;
  const i64 n = idx / H, j = idx % H;
  const T* pre = static_cast<const T*>(pre_) + n * 4 * H;
  T* act = static_cast<T*>(act_) + n * 4 * H;
  const float i = sigmoidf_(Num<T>::to_float(pre[j]));
  const float f = sigmoidf_(Num<T>::to_float(pre[H + j]));
  const float g = tanhf(Num<T>::to_float(pre[2 * H + j]));
  const float o = sigmoidf_(Num<T>::to_float(pre[3 * H + j]));
  const float c = f * Num<T>::to_float(static_cast<const T*>(c_prev_)[idx]) + i * g;
  act[j] = Num<T>::from_float(i);
  act[H + j] = Num<T>::from_float(f);
  act[2 * H + j] = Num<T>::from_float(g);
  act[3 * H + j] = Num<T>::from_float(o);
  static_cast<T*>(c_)[idx] = Num<T>::from_float(c);
  static_cast<T*>(h_)[idx] = Num<T>::from_float(o * tanhf(c));
}

template <class Math>
__device__ __forceinline__ void lstm_gates_bwd(const void* dh_, const void* dc_, const void* act_, const void* c_,
                                               const void* c_prev_, void* dpre_, void* dc_prev_, int N, int H) {
  typedef typename Math::T T;
  const i64 idx = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<i64>(N) * H) return;
  const i64 n = idx / H, j = idx % H;
  const T* act = static_cast<const T*>(act_) + n * 4 * H;
  T* dpre = static_cast<T*>(dpre_) + n * 4 * H;
  const float i = Num<T>::to_float(act[j]), f = Num<T>::to_float(act[H + j]);
  const float g = Num<T>::to_float(act[2 * H + j]), o = Num<T>::to_float(act[3 * H + j]);
  const float dh = Num<T>::to_float(static_cast<const T*>(dh_)[idx]);
  const float tc = tanhf(Num<T>::to_float(static_cast<const T*>(c_)[idx]));
  const float dc = Num<T>::to_float(static_cast<const T*>(dc_)[idx]) + dh * o * (1.f - tc * tc);
  const float cp = Num<T>::to_float(static_cast<const T*>(c_prev_)[idx]);
  dpre[j] = Num<T>::from_float(dc * g * i * (1.f - i));
  dpre[H + j] = Num<T>::from_float(dc * cp * f * (1.f - f));
  dpre[2 * H + j] = Num<T>::from_float(dc * i * (1.f - g * g));
  dpre[3 * H + j] = Num<T>::from_float(dh * tc * o * (1.f - o));
  static_cast<T*>(dc_prev_)[idx] = Num<T>::from_float(dc * f);
}

}  // namespace sparsify

#define SPARSIFY_LSTM_GATES_FWD(NAME, MATH, THREADS)                                                  \
  extern "C" __global__ void __launch_bounds__(THREADS) NAME(const void* pre, const void* c_prev,     \
                                                              void* h, void* c, void* act, int N, int H) { \
    sparsify::lstm_gates_fwd<sparsify::MATH>(pre, c_prev, h, c, act, N, H);                         \
  }

#define SPARSIFY_LSTM_GATES_BWD(NAME, MATH, THREADS)                                                  \
  extern "C" __global__ void __launch_bounds__(THREADS) NAME(                                        \
      const void* dh, const void* dc, const void* act, const void* c, const void* c_prev, void* dpre, \
      void* dc_prev, int N, int H) {                                                                 \
    sparsify::lstm_gates_bwd<sparsify::MATH>(dh, dc, act, c, c_prev, dpre, dc_prev, N, H);          \
  }
