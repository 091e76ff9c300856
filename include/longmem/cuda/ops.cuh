#pragma once
// OpsBackend<Device>: the op table (longmem/ops.hpp) for buffers in GPU memory, T = float; the
// forward ops also take T = bfloat16 or half (a bf16 or fp16 model: 16 bits read and written, fp32
// inside). Compile with nvcc. Each op family lives in cuda/ops/, mirroring cpu/ops/, its backward beside it:
//
//   cuda/ops/embedding.cuh           embedding, embedding_backward   (ids checked on the host, then copied)
//   cuda/ops/layer_norm.cuh          layer_norm, layer_norm_backward (one block per row, statistics in double)
//   cuda/ops/linear.cuh              linear, linear_backward         (cuBLASLt, fp32 accumulation, bias in the epilogue)
//   cuda/ops/elementwise.cuh         gelu (in place, out of place), gelu_backward, add, add_difference
//   cuda/ops/attention.cuh           causal_attention, memory_attention<F>   (one flash-style kernel;
//                                    attention_mma.cuh on float tensor cores, attention_mma16.cuh
//                                    on bf16 and fp16 ones)
//   cuda/ops/attention_backward.cuh  causal_attention_backward, memory_attention_backward<F>
//                                    (cuBLASLt batched over heads; one warp per row for memory)
//   cuda/ops/cross_entropy.cuh       cross_entropy (synchronises), cross_entropy_backward
//   cuda/ops/optimizer.cuh           sum_of_squares (synchronises), scale, adamw_update   (the Trainer's update)
//   cuda/ops/common.cuh              stream, launch checks, scratch, column sums, the host backend's argument checks
//
// Arguments are checked as the host backend checks them, with the same exception types and
// messages, before anything is enqueued, so a refused call writes nothing. A failed launch or CUDA
// call is a BackendError that names the op and what was asked for. Work is enqueued on the legacy
// default stream (detail::cuda::stream()); only cross_entropy and sum_of_squares wait for it, to return
// their sums.
// On float buffers longmem::set_device_math (cuda/math_mode.hpp) picks how the inputs of the
// tensor-core products (linear, the local attention branch) are rounded: fp32 (default), tf32, bf16.
// 16-bit buffers ignore it (their products are bf16 or fp16 already).
// Backward ops: everything that training needs, from scratch (BackbonePretraining) and by
// memory-augmented adaptation (SideNetAdaptation), on the device.
#include <cstdint>
#include <span>
#include <utility>

#include "longmem/cuda/math_mode.hpp"
#include "longmem/cuda/ops/attention.cuh"
#include "longmem/cuda/ops/attention_backward.cuh"
#include "longmem/cuda/ops/common.cuh"
#include "longmem/cuda/ops/cross_entropy.cuh"
#include "longmem/cuda/ops/elementwise.cuh"
#include "longmem/cuda/ops/embedding.cuh"
#include "longmem/cuda/ops/layer_norm.cuh"
#include "longmem/cuda/ops/linear.cuh"
#include "longmem/cuda/ops/optimizer.cuh"
#include "longmem/cuda/storage.hpp"
#include "longmem/ops.hpp"
#include "longmem/tensor.hpp"

namespace longmem {

template <>
struct OpsBackend<Device> {
  template <class T>
  using In = TensorView<const T, Device>;
  template <class T>
  using Out = TensorView<T, Device>;

  // Forward.
  template <class T>
  static void embedding(Out<T> out, std::span<const std::int32_t> tokens, In<T> wte, In<T> wpe) {
    detail::cuda::embedding(out, tokens, wte, wpe);
  }
  template <class T>
  static void layer_norm(Out<T> out, In<T> in, In<T> weight, In<T> bias, double eps) {
    detail::cuda::layer_norm(out, in, weight, bias, eps);
  }
  template <class T>
  static void linear(Out<T> out, In<T> in, In<T> weight, In<T> bias, Accumulate acc) {
    detail::cuda::linear(out, in, weight, bias, acc);
  }
  template <class T>
  static void linear_gelu(Out<T> out, In<T> in, In<T> weight, In<T> bias, Activation kind) {
    detail::cuda::linear_gelu(out, in, weight, bias, kind);
  }
  template <class T>
  static void gelu(Out<T> x, Activation kind) {
    detail::cuda::gelu(x, kind);
  }
  template <class T>
  static void gelu(Out<T> out, In<T> in, Activation kind) {
    detail::cuda::gelu(out, in, kind);
  }
  template <class T>
  static void add(Out<T> out, In<T> in) {
    detail::cuda::add(out, in);
  }
  template <class T>
  static void add_difference(Out<T> out, In<T> a, In<T> b) {
    detail::cuda::add_difference(out, a, b);
  }
  template <class T>
  static void causal_attention(Out<T> out, In<T> q, In<T> k, In<T> v, PositionScheme positions) {
    detail::cuda::causal_attention(out, q, k, v, positions);
  }
  template <class T>
  static void causal_attention_segments(Out<T> out, In<T> q, In<T> k, In<T> v, PositionScheme positions,
                                        std::span<const index_t> offsets) {
    detail::cuda::causal_attention_segments(out, q, k, v, positions, offsets);
  }
  template <class Fusion, class T>
  static void memory_attention(Out<T> out, In<T> q, In<T> k, In<T> v, In<T> mem_k, In<T> mem_v, In<T> gate,
                               PositionScheme positions) {
    detail::cuda::memory_attention<Fusion>(out, q, k, v, mem_k, mem_v, gate, positions);
  }
  template <class Fusion, class T>
  static void memory_attention_segments(Out<T> out, In<T> q, In<T> k, In<T> v, In<T> mem_k, In<T> mem_v, In<T> gate,
                                        PositionScheme positions, std::span<const index_t> offsets) {
    detail::cuda::memory_attention_segments<Fusion>(out, q, k, v, mem_k, mem_v, gate, positions, offsets);
  }
  template <class T>
  static std::pair<double, std::int64_t> cross_entropy(In<T> logits, std::span<const std::int32_t> targets,
                                                       TensorView<float, Device> losses) {
    return detail::cuda::cross_entropy(logits, targets, losses);
  }

  // Backward.
  template <class T>
  static void embedding_backward(Out<T> d_wte, Out<T> d_wpe, In<T> d_out, std::span<const std::int32_t> tokens) {
    detail::cuda::embedding_backward(d_wte, d_wpe, d_out, tokens);
  }
  template <class T>
  static void layer_norm_backward(Out<T> d_in, Out<T> d_weight, Out<T> d_bias, In<T> d_out, In<T> in, In<T> weight,
                                  double eps, Accumulate acc) {
    detail::cuda::layer_norm_backward(d_in, d_weight, d_bias, d_out, in, weight, eps, acc);
  }
  template <class T>
  static void linear_backward(Out<T> d_in, Out<T> d_weight, Out<T> d_bias, In<T> d_out, In<T> in, In<T> weight,
                              Accumulate acc) {
    detail::cuda::linear_backward(d_in, d_weight, d_bias, d_out, in, weight, acc);
  }
  template <class T>
  static void gelu_backward(Out<T> d_in, In<T> d_out, In<T> in, Activation kind) {
    detail::cuda::gelu_backward(d_in, d_out, in, kind);
  }
  template <class T>
  static void causal_attention_backward(Out<T> d_q, Out<T> d_k, Out<T> d_v, In<T> d_out, In<T> q, In<T> k, In<T> v,
                                        PositionScheme positions) {
    detail::cuda::causal_attention_backward(d_q, d_k, d_v, d_out, q, k, v, positions);
  }
  template <class T>
  static void cross_entropy_backward(Out<T> d_logits, In<T> logits, std::span<const std::int32_t> targets, double scale) {
    detail::cuda::cross_entropy_backward(d_logits, logits, targets, scale);
  }
  template <class T>
  static void causal_attention_backward_segments(Out<T> d_q, Out<T> d_k, Out<T> d_v, In<T> d_out, In<T> q, In<T> k,
                                                 In<T> v, PositionScheme positions, std::span<const index_t> offsets) {
    detail::cuda::causal_attention_backward_segments(d_q, d_k, d_v, d_out, q, k, v, positions, offsets);
  }
  template <class Fusion, class T>
  static void memory_attention_backward_segments(Out<T> d_q, Out<T> d_k, Out<T> d_v, Out<T> d_gate, In<T> d_out, In<T> q,
                                                 In<T> k, In<T> v, In<T> mem_k, In<T> mem_v, In<T> gate,
                                                 PositionScheme positions, std::span<const index_t> offsets) {
    detail::cuda::memory_attention_backward_segments<Fusion>(d_q, d_k, d_v, d_gate, d_out, q, k, v, mem_k, mem_v, gate,
                                                             positions, offsets);
  }
  template <class Fusion, class T>
  static void memory_attention_backward(Out<T> d_q, Out<T> d_k, Out<T> d_v, Out<T> d_gate, In<T> d_out, In<T> q, In<T> k,
                                        In<T> v, In<T> mem_k, In<T> mem_v, In<T> gate, PositionScheme positions) {
    detail::cuda::memory_attention_backward<Fusion>(d_q, d_k, d_v, d_gate, d_out, q, k, v, mem_k, mem_v, gate, positions);
  }

  // Optimizer.
  template <class T>
  static double sum_of_squares(std::span<const In<T>> xs) {
    return detail::cuda::sum_of_squares(xs);
  }
  template <class T>
  static void scale(std::span<const Out<T>> xs, double factor) {
    detail::cuda::scale(xs, factor);
  }
  template <class T>
  static void adamw_update(Out<T> param, In<T> grad, Out<T> m, Out<T> v, const ops::AdamWStep& s) {
    detail::cuda::adamw_update(param, grad, m, v, s);
  }
};

}  // namespace longmem
