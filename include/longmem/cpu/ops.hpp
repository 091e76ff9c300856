#pragma once
// OpsBackend<Host>: the op table (longmem/ops.hpp) for buffers in host memory, T = float or
// double. Each op family lives in cpu/ops/ with its forward and backward side by side:
//
//   cpu/ops/embedding.hpp      embedding, embedding_backward
//   cpu/ops/layer_norm.hpp     layer_norm, layer_norm_backward
//   cpu/ops/linear.hpp         linear, linear_gelu, linear_backward    (through gemm.hpp)
//   cpu/ops/elementwise.hpp    gelu (in place, out of place), gelu_backward, add, add_difference
//   cpu/ops/attention.hpp      causal_attention, memory_attention<F> and their backwards
//   cpu/ops/cross_entropy.hpp  cross_entropy, cross_entropy_backward
//   cpu/ops/optimizer.hpp      sum_of_squares, scale, adamw_update     (the Trainer's update)
//   cpu/ops/gemm.hpp           the one host GEMM (oneDNN sgemm for float when built with it, else Eigen)
//   cpu/ops/common.hpp         Eigen maps, argument checks, the thresholded parallel loop
//
// Matrix products (linear layers and the attention blocks) go through gemm() on row-major
// buffers; the rest are Eigen expressions and plain loops. Threads come from OpenMP when the
// translation unit is compiled with -fopenmp (and Eigen or oneDNN then thread their GEMMs too);
// without it everything runs on one core. Views whose last
// extents multiply to the feature count are accepted as (N, features): linear reads a
// (T, H, dh) input as (T, H*dh), layer_norm reads any (..., C).
#include <cstdint>
#include <span>
#include <utility>

#include "longmem/cpu/ops/attention.hpp"
#include "longmem/cpu/ops/common.hpp"
#include "longmem/cpu/ops/cross_entropy.hpp"
#include "longmem/cpu/ops/elementwise.hpp"
#include "longmem/cpu/ops/embedding.hpp"
#include "longmem/cpu/ops/layer_norm.hpp"
#include "longmem/cpu/ops/linear.hpp"
#include "longmem/cpu/ops/optimizer.hpp"
#include "longmem/ops.hpp"
#include "longmem/tensor.hpp"

namespace longmem {

template <>
struct OpsBackend<Host> {
  template <class T>
  using In = TensorView<const T, Host>;
  template <class T>
  using Out = TensorView<T, Host>;

  // Forward.
  template <class T>
  static void embedding(Out<T> out, std::span<const std::int32_t> tokens, In<T> wte, In<T> wpe) {
    detail::cpu::embedding(out, tokens, wte, wpe);
  }
  template <class T>
  static void layer_norm(Out<T> out, In<T> in, In<T> weight, In<T> bias, double eps) {
    detail::cpu::layer_norm(out, in, weight, bias, eps);
  }
  template <class T>
  static void linear(Out<T> out, In<T> in, In<T> weight, In<T> bias, Accumulate acc) {
    detail::cpu::linear(out, in, weight, bias, acc);
  }
  template <class T>
  static void linear_gelu(Out<T> out, In<T> in, In<T> weight, In<T> bias, Activation kind) {
    detail::cpu::linear_gelu(out, in, weight, bias, kind);
  }
  template <class T>
  static void gelu(Out<T> x, Activation kind) {
    detail::cpu::gelu(x, kind);
  }
  template <class T>
  static void gelu(Out<T> out, In<T> in, Activation kind) {
    detail::cpu::gelu(out, in, kind);
  }
  template <class T>
  static void add(Out<T> out, In<T> in) {
    detail::cpu::add(out, in);
  }
  template <class T>
  static void add_difference(Out<T> out, In<T> a, In<T> b) {
    detail::cpu::add_difference(out, a, b);
  }
  template <class T>
  static void causal_attention(Out<T> out, In<T> q, In<T> k, In<T> v, PositionScheme positions) {
    detail::cpu::causal_attention(out, q, k, v, positions);
  }
  template <class Fusion, class T>
  static void memory_attention(Out<T> out, In<T> q, In<T> k, In<T> v, In<T> mem_k, In<T> mem_v, In<T> gate,
                               PositionScheme positions) {
    detail::cpu::memory_attention<Fusion>(out, q, k, v, mem_k, mem_v, gate, positions);
  }
  template <class T>
  static std::pair<double, std::int64_t> cross_entropy(In<T> logits, std::span<const std::int32_t> targets,
                                                       TensorView<float, Host> losses) {
    return detail::cpu::cross_entropy(logits, targets, losses);
  }

  // Backward.
  template <class T>
  static void embedding_backward(Out<T> d_wte, Out<T> d_wpe, In<T> d_out, std::span<const std::int32_t> tokens) {
    detail::cpu::embedding_backward(d_wte, d_wpe, d_out, tokens);
  }
  template <class T>
  static void layer_norm_backward(Out<T> d_in, Out<T> d_weight, Out<T> d_bias, In<T> d_out, In<T> in, In<T> weight,
                                  double eps, Accumulate acc) {
    detail::cpu::layer_norm_backward(d_in, d_weight, d_bias, d_out, in, weight, eps, acc);
  }
  template <class T>
  static void linear_backward(Out<T> d_in, Out<T> d_weight, Out<T> d_bias, In<T> d_out, In<T> in, In<T> weight,
                              Accumulate acc) {
    detail::cpu::linear_backward(d_in, d_weight, d_bias, d_out, in, weight, acc);
  }
  template <class T>
  static void gelu_backward(Out<T> d_in, In<T> d_out, In<T> in, Activation kind) {
    detail::cpu::gelu_backward(d_in, d_out, in, kind);
  }
  template <class T>
  static void causal_attention_backward(Out<T> d_q, Out<T> d_k, Out<T> d_v, In<T> d_out, In<T> q, In<T> k, In<T> v,
                                        PositionScheme positions) {
    detail::cpu::causal_attention_backward(d_q, d_k, d_v, d_out, q, k, v, positions);
  }
  template <class Fusion, class T>
  static void memory_attention_backward(Out<T> d_q, Out<T> d_k, Out<T> d_v, Out<T> d_gate, In<T> d_out, In<T> q,
                                        In<T> k, In<T> v, In<T> mem_k, In<T> mem_v, In<T> gate,
                                        PositionScheme positions) {
    detail::cpu::memory_attention_backward<Fusion>(d_q, d_k, d_v, d_gate, d_out, q, k, v, mem_k, mem_v, gate, positions);
  }
  template <class T>
  static void cross_entropy_backward(Out<T> d_logits, In<T> logits, std::span<const std::int32_t> targets,
                                     double scale) {
    detail::cpu::cross_entropy_backward(d_logits, logits, targets, scale);
  }

  // Optimizer.
  template <class T>
  static double sum_of_squares(std::span<const In<T>> xs) {
    return detail::cpu::sum_of_squares(xs);
  }
  template <class T>
  static void scale(std::span<const Out<T>> xs, double factor) {
    detail::cpu::scale(xs, factor);
  }
  template <class T>
  static void adamw_update(Out<T> param, In<T> grad, Out<T> m, Out<T> v, const ops::AdamWStep& s) {
    detail::cpu::adamw_update(param, grad, m, v, s);
  }
};

}  // namespace longmem
