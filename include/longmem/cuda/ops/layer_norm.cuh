#pragma once
// Device LayerNorm over the last C features of each row.
//   layer_norm   y = (x - mean) / sqrt(var + eps) * w + b        (biased variance)
// One warp per row. As on the host, the statistics are two passes in double (mean, then the
// squared deviations) and the output is computed in double and rounded once, so the two backends
// agree to a rounding of the output.
//   layer_norm_backward   d_in [+]= d x;  d_weight += sum_n d_out xhat;  d_bias += sum_n d_out
// (statistics recomputed per row in double; the column sums deterministic, without atomics).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "longmem/cuda/ops/common.cuh"
#include "longmem/ops.hpp"

namespace longmem::detail::cuda {

/// Validates weight (C), the optional bias (C) and eps; returns C.
template <class W, class B>
index_t check_layer_norm_params(const char* op, const W& weight, const B& bias, double eps, const char* bias_name) {
  if (weight.rank() != 1 || weight.dim(0) == 0) {
    fail<ShapeError>(op, ": weight: expected a non-empty (C) vector, got shape ", weight.shape().str());
  }
  const index_t C = weight.dim(0);
  if (!absent(bias)) expect_shape(bias, Shape{C}, (std::string(op) + ": " + bias_name + " (C, like weight)").c_str());
  if (!(eps >= 0) || !std::isfinite(eps)) fail<InputError>(op, ": eps must be a finite number >= 0, got ", eps);
  return C;
}

inline constexpr unsigned layer_norm_block = 256;

/// One warp per row n (grid-stride); out may be in: every element is read by the lane that writes
/// it, after the statistics (warp reductions) are complete. E float or __nv_bfloat16 (bf16 output:
/// the double result rounded to float, then to bf16).
template <class E>
__global__ void __launch_bounds__(layer_norm_block)
    layer_norm_kernel(E* out /*(N,C)*/, const E* in /*(N,C)*/, const E* __restrict__ weight /*(C)*/,
                      const E* __restrict__ bias /*(C) or null*/, index_t N, index_t C, double eps) {
  const index_t warps = blockDim.x / 32;
  const int lane = threadIdx.x % 32;
  for (index_t n = blockIdx.x * warps + threadIdx.x / 32; n < N; n += gridDim.x * warps) {
    const E* x = in + n * C;
    E* y = out + n * C;
    double s = 0;
    for (index_t c = lane; c < C; c += 32) s += static_cast<double>(device_load(x[c]));
    const double mean = warp_sum_lane0(s) / static_cast<double>(C);
    double q = 0;
    for (index_t c = lane; c < C; c += 32) {
      const double dx = static_cast<double>(device_load(x[c])) - mean;
      q += dx * dx;
    }
    const double inv = 1.0 / sqrt(warp_sum_lane0(q) / static_cast<double>(C) + eps);
    for (index_t c = lane; c < C; c += 32) {
      const double b = bias ? static_cast<double>(device_load(bias[c])) : 0.0;
      const double v = (static_cast<double>(device_load(x[c])) - mean) * inv * static_cast<double>(device_load(weight[c])) + b;
      y[c] = device_store<E>(static_cast<float>(v));
    }
  }
}

/// The vector form of layer_norm_kernel for rows of C = chunks x 32 x V elements (V = 16 bytes of E,
/// chunks <= max_chunks, every pointer 16-byte aligned): the warp reads its row once, 16 bytes per
/// lane and access, and keeps it in registers for the three passes. The same double arithmetic
/// (each lane sums its own elements first): one-element reads had the bf16 LayerNorm at 40% of the
/// copy bandwidth (29 us for (8192, 1024) on an H100).
inline constexpr int layer_norm_max_chunks = 8;

template <class E>
__global__ void __launch_bounds__(layer_norm_block)
    layer_norm_vec_kernel(E* out /*(N,C)*/, const E* in /*(N,C)*/, const E* __restrict__ weight /*(C)*/,
                          const E* __restrict__ bias /*(C) or null*/, index_t N, index_t C, double eps) {
  constexpr int V = 16 / static_cast<int>(sizeof(E));
  const index_t warps = blockDim.x / 32;
  const int lane = threadIdx.x % 32, chunks = static_cast<int>(C / (32 * V));
  for (index_t n = blockIdx.x * warps + threadIdx.x / 32; n < N; n += gridDim.x * warps) {
    const E* x = in + n * C;
    E* y = out + n * C;
    float xv[layer_norm_max_chunks][V];
    double s = 0;
#pragma unroll
    for (int ch = 0; ch < layer_norm_max_chunks; ++ch) {
      if (ch < chunks) {
        load_elements<V>(x + (ch * 32 + lane) * V, xv[ch]);
#pragma unroll
        for (int j = 0; j < V; ++j) s += static_cast<double>(xv[ch][j]);
      }
    }
    const double mean = warp_sum_lane0(s) / static_cast<double>(C);
    double q = 0;
#pragma unroll
    for (int ch = 0; ch < layer_norm_max_chunks; ++ch) {
      if (ch < chunks) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const double dx = static_cast<double>(xv[ch][j]) - mean;
          q += dx * dx;
        }
      }
    }
    const double inv = 1.0 / sqrt(warp_sum_lane0(q) / static_cast<double>(C) + eps);
#pragma unroll
    for (int ch = 0; ch < layer_norm_max_chunks; ++ch) {
      if (ch < chunks) {
        const index_t c0 = (ch * 32 + lane) * V;
        float w[V], b[V], o[V];
        load_elements<V>(weight + c0, w);
        if (bias) load_elements<V>(bias + c0, b);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const double bj = bias ? static_cast<double>(b[j]) : 0.0;
          o[j] = static_cast<float>((static_cast<double>(xv[ch][j]) - mean) * inv * static_cast<double>(w[j]) + bj);
        }
        store_elements<V>(y + c0, o);
      }
    }
  }
}

template <class T>
void layer_norm(TensorView<T, Device> out, TensorView<const T, Device> in, TensorView<const T, Device> weight,
                TensorView<const T, Device> bias, double eps) {
  require_forward_element<T>();
  const char* op = "layer_norm";
  const index_t C = check_layer_norm_params(op, weight, bias, eps, "bias");
  const index_t N = rows_of(in, C, op, "in");
  if (rows_of(out, C, op, "out") != N) {
    fail<ShapeError>("layer_norm: out has shape ", out.shape().str(), ", expected ", N, " rows of ", C, " like in ",
                     in.shape().str());
  }
  if (in.data() != out.data()) expect_separate(out, in, op, "in (only exact in-place use is allowed)");
  if (N == 0) return;
  const dim3 block(layer_norm_block), grid(grid_for(N, layer_norm_block / 32));
  constexpr index_t row_unit = 32 * vec_elements<T>;  // a warp's 16-byte reads
  const bool vec = C % row_unit == 0 && C / row_unit <= layer_norm_max_chunks &&
                   vec_aligned(out.data(), in.data(), weight.data()) && (absent(bias) || vec_aligned(bias.data()));
  if (vec) {
    layer_norm_vec_kernel<<<grid, block, 0, stream()>>>(device_ptr(out.data()), device_ptr(in.data()),
                                                        device_ptr(weight.data()),
                                                        absent(bias) ? nullptr : device_ptr(bias.data()), N, C, eps);
  } else {
    layer_norm_kernel<<<grid, block, 0, stream()>>>(device_ptr(out.data()), device_ptr(in.data()), device_ptr(weight.data()),
                                                    absent(bias) ? nullptr : device_ptr(bias.data()), N, C, eps);
  }
  check_launch(op, "the kernel for ", N, " rows of ", C, " features (", launch_str(grid, block), ")");
}

/// Per row: the statistics in double as the forward, then (when d_in)
///   d_in [+]= inv (g - mean(g) - xhat mean(g xhat)),  g = d_out w,  xhat = (x - mean) inv
/// with the row means of g and g xhat in double; mean and inv are kept for the column sums.
template <class T>
__global__ void __launch_bounds__(layer_norm_block)
    layer_norm_backward_kernel(T* __restrict__ d_in /*(N,C) or null*/, double* __restrict__ row_mean,
                               double* __restrict__ row_inv, const T* __restrict__ d_out, const T* __restrict__ in,
                               const T* __restrict__ weight, index_t N, index_t C, double eps, bool accumulate) {
  const index_t warps = blockDim.x / 32;
  const int lane = threadIdx.x % 32;
  for (index_t n = blockIdx.x * warps + threadIdx.x / 32; n < N; n += gridDim.x * warps) {
    const T* x = in + n * C;
    const T* g = d_out + n * C;
    double s = 0;
    for (index_t c = lane; c < C; c += 32) s += static_cast<double>(x[c]);
    const double mean = warp_sum_lane0(s) / static_cast<double>(C);
    double q = 0;
    for (index_t c = lane; c < C; c += 32) {
      const double dx = static_cast<double>(x[c]) - mean;
      q += dx * dx;
    }
    const double inv = 1.0 / sqrt(warp_sum_lane0(q) / static_cast<double>(C) + eps);
    if (lane == 0) row_mean[n] = mean, row_inv[n] = inv;
    if (!d_in) continue;
    double sg = 0, sgx = 0;
    for (index_t c = lane; c < C; c += 32) {
      const double gw = static_cast<double>(g[c]) * static_cast<double>(weight[c]);
      sg += gw;
      sgx += gw * ((static_cast<double>(x[c]) - mean) * inv);
    }
    const double mg = warp_sum_lane0(sg) / static_cast<double>(C);
    const double mgx = warp_sum_lane0(sgx) / static_cast<double>(C);
    T* dx = d_in + n * C;
    for (index_t c = lane; c < C; c += 32) {
      const double gw = static_cast<double>(g[c]) * static_cast<double>(weight[c]);
      const double xhat = (static_cast<double>(x[c]) - mean) * inv;
      const T v = static_cast<T>(inv * (gw - mg - xhat * mgx));
      dx[c] = accumulate ? dx[c] + v : v;
    }
  }
}

/// d_in (N, C) [+]= d in;  d_weight (C) += sum_n d_out xhat;  d_bias (C) += sum_n d_out.
/// The column sums are deterministic (add_column_sums in common.cuh: partials per row split).
template <class T>
void layer_norm_backward(TensorView<T, Device> d_in, TensorView<T, Device> d_weight, TensorView<T, Device> d_bias,
                         TensorView<const T, Device> d_out, TensorView<const T, Device> in,
                         TensorView<const T, Device> weight, double eps, Accumulate acc) {
  require_float<T>();
  const char* op = "layer_norm_backward";
  const index_t C = check_layer_norm_params(op, weight, TensorView<const T, Device>{}, eps, "bias");
  const index_t N = op_checks::check_layer_norm_backward(op, d_in, d_weight, d_bias, d_out, in, C);
  if (N == 0) return;
  Scratch stats(2 * static_cast<std::size_t>(N) * sizeof(double), op);
  double* mean = stats.as<double>();
  double* inv = stats.as<double>(static_cast<std::size_t>(N) * sizeof(double));
  const dim3 block(layer_norm_block), grid(grid_for(N, layer_norm_block / 32));
  layer_norm_backward_kernel<T><<<grid, block, 0, stream()>>>(absent(d_in) ? nullptr : d_in.data(), mean, inv, d_out.data(),
                                                           in.data(), weight.data(), N, C, eps, acc == Accumulate::Yes);
  check_launch(op, "the kernel for ", N, " rows of ", C, " features (", launch_str(grid, block), ")");
  add_column_sums(op, absent(d_bias) ? nullptr : d_bias.data(), absent(d_weight) ? nullptr : d_weight.data(),
                  d_out.data(), in.data(), mean, inv, N, C);
}

}  // namespace longmem::detail::cuda
