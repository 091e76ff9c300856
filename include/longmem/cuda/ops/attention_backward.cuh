#pragma once
// Device causal attention backward, for training on the GPU.
//   causal_attention_backward   d_q, d_k, d_v (T, H, dh) from d_out (T, H, dh); the probabilities
//                               are recomputed from q and k (nothing is kept from the forward)
//
// Per head h (cuBLASLt strided-batched GEMMs over the H heads; a head's rows are H dh apart):
//   S  = q k^T                      (T, T)
//   P  = softmax_s(scale S + alibi(s - t)), keys s <= t      (scale = 1/sqrt(dh); 0 above the diagonal)
//   dP = d_out v^T                  (T, T)
//   dS = scale P (dP - rowsum(P dP))                         (softmax backward; 0 above the diagonal)
//   d_v = P^T d_out,  d_q = dS k,  d_k = dS^T q
// Scratch: two (H, T, T) float matrices (8 H T^2 bytes: 2 MiB at T 256, H 8). The GEMMs are whole
// T x T products; the masked half costs flops but no extra passes. The products follow the device
// math mode (cuda/math_mode.hpp) like linear; the softmax is in float, its normaliser in float.
#include <cmath>

#include "longmem/cuda/ops/attention.cuh"
#include "longmem/cuda/ops/common.cuh"
#include "longmem/cuda/ops/linear.cuh"
#include "longmem/detail/alibi.hpp"

namespace longmem::detail::cuda {

inline constexpr unsigned attention_backward_block = 256;

/// Row (h, t) of S (H, T, T): P = causal softmax(scale S + alibi) in place.
template <class T>
__global__ void __launch_bounds__(attention_backward_block)
    causal_softmax_rows_kernel(T* __restrict__ S, index_t n_tok, int H, float scale, bool alibi) {
  __shared__ float partial[32];
  for (index_t row = blockIdx.x; row < index_t{H} * n_tok; row += gridDim.x) {
    const int h = static_cast<int>(row / n_tok);
    const index_t t = row % n_tok;
    T* s = S + row * n_tok;
    const double slope = alibi ? alibi_slope(h, H) : 0.0;
    float mx = -INFINITY;
    for (index_t j = threadIdx.x; j <= t; j += blockDim.x) {
      float val = scale * s[j];
      if (alibi) val += static_cast<float>(slope * static_cast<double>(j - t));
      s[j] = val;
      mx = fmaxf(mx, val);
    }
    mx = block_max(mx, partial);
    float z = 0;
    for (index_t j = threadIdx.x; j <= t; j += blockDim.x) {
      const float e = expf(s[j] - mx);
      s[j] = e;
      z += e;
    }
    const float inv = 1.0f / block_sum(z, partial);
    for (index_t j = threadIdx.x; j < n_tok; j += blockDim.x) s[j] = j <= t ? s[j] * inv : 0.0f;
  }
}

/// Row (h, t): dP (H, T, T) becomes dS = scale P (dP - sum_s P dP), in place.
template <class T>
__global__ void __launch_bounds__(attention_backward_block)
    softmax_backward_rows_kernel(T* __restrict__ dP, const T* __restrict__ P, index_t n_tok, int H, float scale) {
  __shared__ float partial[32];
  for (index_t row = blockIdx.x; row < index_t{H} * n_tok; row += gridDim.x) {
    const index_t t = row % n_tok;
    const T* p = P + row * n_tok;
    T* g = dP + row * n_tok;
    float dot = 0;
    for (index_t j = threadIdx.x; j <= t; j += blockDim.x) dot += p[j] * g[j];
    dot = block_sum(dot, partial);
    for (index_t j = threadIdx.x; j < n_tok; j += blockDim.x) g[j] = j <= t ? scale * p[j] * (g[j] - dot) : 0.0f;
  }
}

/// Checks as the host backend (d_q, d_k, d_v and d_out like q; no gradient overlapping an input
/// or another gradient); returns the gathered forward arguments (n_tok, heads, head dim, scale).
inline AttentionArgs attention_backward_args(const char* op, TensorView<float, Device> d_q, TensorView<float, Device> d_k,
                                             TensorView<float, Device> d_v, TensorView<const float, Device> d_out,
                                             TensorView<const float, Device> q, TensorView<const float, Device> k,
                                             TensorView<const float, Device> v) {
  const AttentionArgs a = attention_args(op, d_q, q, k, v, {}, {}, {}, false);
  for (auto [x, name] : {std::pair{TensorView<const float, Device>(d_k), "d_k"},
                         std::pair{TensorView<const float, Device>(d_v), "d_v"}, std::pair{d_out, "d_out"}}) {
    if (!(x.shape() == q.shape()) && !(x.shape() == Shape{q.dim(0), q.dim(1) * q.dim(2)})) {
      fail<ShapeError>(op, ": ", name, ": expected shape ", q.shape().str(), " like q, got ", x.shape().str());
    }
  }
  for (auto [out, oname] : {std::pair{TensorView<const float, Device>(d_q), "d_q"},
                            std::pair{TensorView<const float, Device>(d_k), "d_k"},
                            std::pair{TensorView<const float, Device>(d_v), "d_v"}}) {
    for (auto [in, name] : {std::pair{q, "q"}, std::pair{k, "k"}, std::pair{v, "v"}, std::pair{d_out, "d_out"}}) {
      if (overlaps(out, in)) fail<InputError>(op, ": ", oname, " overlaps ", name, "; gradients need separate buffers");
    }
  }
  if (overlaps(d_q, d_k) || overlaps(d_q, d_v) || overlaps(d_k, d_v)) {
    fail<InputError>(op, ": d_q, d_k and d_v must be separate buffers");
  }
  return a;
}

template <class T>
void causal_attention_backward(TensorView<T, Device> d_q, TensorView<T, Device> d_k, TensorView<T, Device> d_v,
                               TensorView<const T, Device> d_out, TensorView<const T, Device> q,
                               TensorView<const T, Device> k, TensorView<const T, Device> v, PositionScheme positions) {
  require_float<T>();
  const char* op = "causal_attention_backward";
  const AttentionArgs a = attention_backward_args(op, d_q, d_k, d_v, d_out, q, k, v);
  const index_t Tn = a.n_tok, H = a.n_head, dh = a.head_dim, ld = H * dh;
  if (Tn == 0 || H == 0 || dh == 0) return;
  const index_t square = Tn * Tn;
  Scratch scratch(2 * static_cast<std::size_t>(H * square) * sizeof(float), op);
  float* P = scratch.as<float>();
  float* dS = scratch.as<float>(static_cast<std::size_t>(H * square) * sizeof(float));
  const DeviceMath math = device_math();
  const int batch = static_cast<int>(H);
  auto heads = [&](const float* x, bool transposed) { return GemmOperand{x, ld, dh, transposed}; };
  auto squares = [&](const float* x, bool transposed) { return GemmOperand{x, Tn, square, transposed}; };
  // S = q k^T, then P in place
  gemm(op, Tn, Tn, dh, heads(q.data(), false), heads(k.data(), true), 0.0f, P, Tn, square, batch, math);
  const dim3 block(attention_backward_block), grid(grid_for(H * Tn, 1));
  causal_softmax_rows_kernel<float><<<grid, block, 0, stream()>>>(P, Tn, static_cast<int>(H), a.scale,
                                                           positions == PositionScheme::Alibi);
  check_launch(op, "the softmax kernel for ", H, " heads of ", Tn, " rows (", launch_str(grid, block), ")");
  // dP = d_out v^T, then dS in place
  gemm(op, Tn, Tn, dh, heads(d_out.data(), false), heads(v.data(), true), 0.0f, dS, Tn, square, batch, math);
  softmax_backward_rows_kernel<float><<<grid, block, 0, stream()>>>(dS, P, Tn, static_cast<int>(H), a.scale);
  check_launch(op, "the softmax backward kernel for ", H, " heads of ", Tn, " rows (", launch_str(grid, block), ")");
  // d_v = P^T d_out;  d_q = dS k;  d_k = dS^T q
  gemm(op, Tn, dh, Tn, squares(P, true), heads(d_out.data(), false), 0.0f, d_v.data(), ld, dh, batch, math);
  gemm(op, Tn, dh, Tn, squares(dS, false), heads(k.data(), false), 0.0f, d_q.data(), ld, dh, batch, math);
  gemm(op, Tn, dh, Tn, squares(dS, true), heads(q.data(), false), 0.0f, d_k.data(), ld, dh, batch, math);
}

}  // namespace longmem::detail::cuda
