#pragma once
// The op table: every computation of the forward and backward passes as an explicit
// function over explicit buffers (llm.c style); each *_backward sits beside its forward.
//
// Each function dispatches on the buffers' location to OpsBackend<L>:
//   OpsBackend<Host>    <longmem/cpu/ops.hpp>    Eigen + plain loops, float or double
//   OpsBackend<Device>  <longmem/cuda/ops.cuh>   CUDA kernels, float (every backward but memory_attention_backward)
// Shapes use: T tokens, H heads, dh head dim, d = H*dh width, V vocabulary,
// K retrieved memory tokens, N rows, I/O linear in/out features.
//
// Backward conventions: d_x is the gradient of a scalar loss with respect to x. Gradients of
// parameters (weights, biases, the gate, embeddings) are always accumulated (+=), so several
// calls (streams, micro-batches) sum into one buffer; an empty parameter-gradient view means
// "frozen, skip". Gradients of activations are overwritten unless the op takes an Accumulate
// argument. Backward ops recompute what they need from the forward's inputs (LayerNorm
// statistics, attention probabilities); nothing is kept between calls.
#include <cstdint>
#include <span>
#include <type_traits>

#include "longmem/error.hpp"
#include "longmem/model_config.hpp"
#include "longmem/tensor.hpp"

namespace longmem {

/// Implementation of the op table for location L; specialised by each backend.
template <class L>
struct OpsBackend;

namespace detail {
template <class L>
concept HasOpsBackend = requires { sizeof(OpsBackend<L>); };

template <class L>
constexpr void require_backend() {
  static_assert(HasOpsBackend<L>,
                "no op backend for this location: include <longmem/cpu/ops.hpp> for Host buffers or "
                "<longmem/cuda/ops.cuh> (compiled with nvcc) for Device buffers");
}
}  // namespace detail

/// Whether linear() overwrites its output or adds to it.
enum class Accumulate : bool { No = false, Yes = true };

namespace ops {

/// Inputs are not deduced: T and L come from the first (output) view, and any view or
/// tensor convertible to a const view of them is accepted.
template <class T, class L>
using In = std::type_identity_t<TensorView<const T, L>>;

/// out (T, d) = wte[tokens] (+ wpe[0..T) when wpe is not empty).
/// Throws InputError for an empty segment, a token id outside [0, V) or T > P.
template <class T, class L>
void embedding(TensorView<T, L> out, std::span<const std::int32_t> tokens, In<T, L> wte /*(V,d)*/,
               In<T, L> wpe /*(P,d) or empty*/) {
  detail::require_backend<L>();
  OpsBackend<L>::embedding(out, tokens, wte, wpe);
}

/// out (N, C) = (in - mean) / sqrt(var + eps) * weight + bias, per row; biased variance.
template <class T, class L>
void layer_norm(TensorView<T, L> out, In<T, L> in, In<T, L> weight /*(C)*/,
                In<T, L> bias /*(C)*/, double eps) {
  detail::require_backend<L>();
  OpsBackend<L>::layer_norm(out, in, weight, bias, eps);
}

/// out (N, O) [+]= in (N, I) @ weight (O, I)^T + bias (O); bias may be empty.
/// Weights are in PyTorch Linear layout [out, in]; loaders transpose HF Conv1D.
template <class T, class L>
void linear(TensorView<T, L> out, In<T, L> in, In<T, L> weight,
            In<T, L> bias, Accumulate acc = Accumulate::No) {
  detail::require_backend<L>();
  OpsBackend<L>::linear(out, in, weight, bias, acc);
}

/// out (N, O) = gelu(in (N, I) @ weight (O, I)^T + bias (O)); bias may be empty. The MLP's first
/// layer where the pre-activation is not kept (a forward without a backward): the backends fuse the
/// bias and GELU into the GEMM's output pass (cuBLASLt's GELU epilogue for the tanh form).
template <class T, class L>
void linear_gelu(TensorView<T, L> out, In<T, L> in, In<T, L> weight, In<T, L> bias, Activation kind) {
  detail::require_backend<L>();
  OpsBackend<L>::linear_gelu(out, in, weight, bias, kind);
}

/// x (any shape) = gelu(x), in place, tanh or erf form.
template <class T, class L>
void gelu(TensorView<T, L> x, Activation kind) {
  detail::require_backend<L>();
  OpsBackend<L>::gelu(x, kind);
}

/// out = gelu(in), elementwise, same shapes (training keeps the pre-activation `in`).
template <class T, class L>
void gelu(TensorView<T, L> out, In<T, L> in, Activation kind) {
  detail::require_backend<L>();
  OpsBackend<L>::gelu(out, in, kind);
}

/// out += in, elementwise, same shapes.
template <class T, class L>
void add(TensorView<T, L> out, In<T, L> in) {
  detail::require_backend<L>();
  OpsBackend<L>::add(out, in);
}

/// out += a - b, elementwise, same shapes (the SideNet's cross-network residual).
template <class T, class L>
void add_difference(TensorView<T, L> out, In<T, L> a, In<T, L> b) {
  detail::require_backend<L>();
  OpsBackend<L>::add_difference(out, a, b);
}

/// Causal self-attention per head: out (T, H, dh) = softmax(q k^T / sqrt(dh) [+ alibi]) v,
/// keys s <= t only; ALiBi adds -slope_h * (t - s) when positions is Alibi.
template <class T, class L>
void causal_attention(TensorView<T, L> out, In<T, L> q, In<T, L> k,
                      In<T, L> v, PositionScheme positions) {
  detail::require_backend<L>();
  OpsBackend<L>::causal_attention(out, q, k, v, positions);
}

/// The sequences of a stacked call: offsets run from 0 to the rows of q, never decreasing.
template <class T, class L>
void check_sequence_offsets(const char* op, TensorView<const T, L> q, std::span<const index_t> offsets) {
  const index_t N = q.rank() > 0 ? q.dim(0) : 0;
  if (offsets.size() < 2 || offsets.front() != 0 || offsets.back() != N) {
    longmem::detail::fail<ShapeError>(op, ": offsets must run from 0 to the ", N, " rows of q (", offsets.size(), " offsets given",
                     offsets.empty() ? "" : longmem::detail::concat(", from ", offsets.front(), " to ", offsets.back()), ")");
  }
  for (std::size_t b = 0; b + 1 < offsets.size(); ++b) {
    if (offsets[b + 1] < offsets[b]) {
      longmem::detail::fail<ShapeError>(op, ": offsets decrease at sequence ", b, " (", offsets[b], " then ", offsets[b + 1], ")");
    }
  }
}

/// Calls f(o0, o1) for each non-empty sequence [offsets[b], offsets[b+1]): the per-sequence
/// fallback of the stacked ops below, for backends without a batched version.
template <class F>
void for_each_sequence(std::span<const index_t> offsets, F&& f) {
  for (std::size_t b = 0; b + 1 < offsets.size(); ++b) {
    if (offsets[b] != offsets[b + 1]) f(offsets[b], offsets[b + 1]);
  }
}

/// causal_attention over several independent sequences stacked along the rows: rows
/// [offsets[b], offsets[b+1]) of q, k, v (N, H, dh) and out attend only within their own sequence
/// (the streams of a batched forward). offsets: b+1 non-decreasing row offsets from 0 to N (an
/// empty sequence is skipped). Backends may run every sequence in one launch
/// (OpsBackend<L>::causal_attention_segments); otherwise each is one causal_attention call.
template <class T, class L>
void causal_attention(TensorView<T, L> out, In<T, L> q, In<T, L> k, In<T, L> v, PositionScheme positions,
                      std::span<const index_t> offsets) {
  detail::require_backend<L>();
  check_sequence_offsets("causal_attention", q, offsets);
  if constexpr (requires { OpsBackend<L>::causal_attention_segments(out, q, k, v, positions, offsets); }) {
    OpsBackend<L>::causal_attention_segments(out, q, k, v, positions, offsets);
  } else {
    for_each_sequence(offsets, [&](index_t o0, index_t o1) {
      OpsBackend<L>::causal_attention(out.slice(o0, o1), q.slice(o0, o1), k.slice(o0, o1), v.slice(o0, o1), positions);
    });
  }
}

/// Memory-augmented attention (see fusion.hpp for the formulas):
///   out (T, H, dh) from q, k, v (T, H, dh), retrieved mem_k, mem_v (T, H, K, dh) and
///   gate (H) logits; K = 0 gives plain causal attention. Fusion is GatedFusion or JointFusion.
template <class Fusion, class T, class L>
void memory_attention(TensorView<T, L> out, In<T, L> q, In<T, L> k,
                      In<T, L> v, In<T, L> mem_k, In<T, L> mem_v,
                      In<T, L> gate, PositionScheme positions) {
  detail::require_backend<L>();
  OpsBackend<L>::template memory_attention<Fusion>(out, q, k, v, mem_k, mem_v, gate, positions);
}

/// memory_attention over several sequences stacked along the rows (the streams of a batch), as
/// causal_attention with offsets: rows [offsets[b], offsets[b+1]) attend locally only within their
/// sequence; every row has its own retrieved memory, mem_k, mem_v (N, H, K, dh) (one K for all).
/// Backends may run every sequence in one launch (OpsBackend<L>::memory_attention_segments);
/// otherwise each is one memory_attention call.
template <class Fusion, class T, class L>
void memory_attention(TensorView<T, L> out, In<T, L> q, In<T, L> k, In<T, L> v, In<T, L> mem_k, In<T, L> mem_v,
                      In<T, L> gate, PositionScheme positions, std::span<const index_t> offsets) {
  detail::require_backend<L>();
  check_sequence_offsets("memory_attention", q, offsets);
  if constexpr (requires {
                  OpsBackend<L>::template memory_attention_segments<Fusion>(out, q, k, v, mem_k, mem_v, gate, positions,
                                                                            offsets);
                }) {
    OpsBackend<L>::template memory_attention_segments<Fusion>(out, q, k, v, mem_k, mem_v, gate, positions, offsets);
  } else {
    for_each_sequence(offsets, [&](index_t o0, index_t o1) {
      OpsBackend<L>::template memory_attention<Fusion>(out.slice(o0, o1), q.slice(o0, o1), k.slice(o0, o1),
                                                       v.slice(o0, o1), mem_k.slice(o0, o1), mem_v.slice(o0, o1), gate,
                                                       positions);
    });
  }
}

/// Mean next-token cross-entropy (natural log) of logits (T, V) against targets (T);
/// a target of -1 is ignored. Writes per-token losses (T) when `losses` is not empty.
/// Returns the sum of losses and the number of counted targets.
template <class T, class L>
std::pair<double, std::int64_t> cross_entropy(TensorView<const T, L> logits, std::span<const std::int32_t> targets,
                                              TensorView<float, L> losses) {
  detail::require_backend<L>();
  return OpsBackend<L>::cross_entropy(logits, targets, losses);
}

// ---------------------------------------------------------------------------------------------
// Backward ops

/// d_wte (V, d) += scatter of d_out (T, d) rows by token id; d_wpe (P, d) += d_out rows 0..T-1.
/// Either may be empty (frozen). Token ids are checked as in embedding().
template <class T, class L>
void embedding_backward(TensorView<T, L> d_wte, TensorView<T, L> d_wpe, In<T, L> d_out /*(T,d)*/,
                        std::span<const std::int32_t> tokens) {
  detail::require_backend<L>();
  OpsBackend<L>::embedding_backward(d_wte, d_wpe, d_out, tokens);
}

/// LayerNorm backward over rows of C features; mean and variance are recomputed from `in`.
///   d_in (N, C) [+]= d in;  d_weight (C) += sum_n d_out * xhat;  d_bias (C) += sum_n d_out
/// d_in, d_weight, d_bias may each be empty (not needed / frozen).
template <class T, class L>
void layer_norm_backward(TensorView<T, L> d_in, TensorView<T, L> d_weight, TensorView<T, L> d_bias,
                         In<T, L> d_out, In<T, L> in, In<T, L> weight, double eps,
                         Accumulate acc = Accumulate::No) {
  detail::require_backend<L>();
  OpsBackend<L>::layer_norm_backward(d_in, d_weight, d_bias, d_out, in, weight, eps, acc);
}

/// Linear backward for out = in weight^T + bias:
///   d_in (N, I) [+]= d_out (N, O) weight (O, I);  d_weight (O, I) += d_out^T in;  d_bias (O) += sum_n d_out
/// d_in, d_weight, d_bias may each be empty (not needed / frozen).
template <class T, class L>
void linear_backward(TensorView<T, L> d_in, TensorView<T, L> d_weight, TensorView<T, L> d_bias,
                     In<T, L> d_out, In<T, L> in, In<T, L> weight, Accumulate acc = Accumulate::No) {
  detail::require_backend<L>();
  OpsBackend<L>::linear_backward(d_in, d_weight, d_bias, d_out, in, weight, acc);
}

/// d_in = d_out * gelu'(in), elementwise; d_in may be d_out itself (in place).
template <class T, class L>
void gelu_backward(TensorView<T, L> d_in, In<T, L> d_out, In<T, L> in, Activation kind) {
  detail::require_backend<L>();
  OpsBackend<L>::gelu_backward(d_in, d_out, in, kind);
}

/// Causal attention backward: d_q, d_k, d_v (T, H, dh) from d_out (T, H, dh); probabilities are
/// recomputed from q, k, v.
template <class T, class L>
void causal_attention_backward(TensorView<T, L> d_q, TensorView<T, L> d_k, TensorView<T, L> d_v,
                               In<T, L> d_out, In<T, L> q, In<T, L> k, In<T, L> v, PositionScheme positions) {
  detail::require_backend<L>();
  OpsBackend<L>::causal_attention_backward(d_q, d_k, d_v, d_out, q, k, v, positions);
}

/// causal_attention_backward over sequences stacked along the rows, as causal_attention with
/// offsets: rows [offsets[b], offsets[b+1]) attend only within their sequence (the streams of a
/// training batch). Backends may run every sequence in one batch
/// (OpsBackend<L>::causal_attention_backward_segments); otherwise each is one call.
template <class T, class L>
void causal_attention_backward(TensorView<T, L> d_q, TensorView<T, L> d_k, TensorView<T, L> d_v, In<T, L> d_out,
                               In<T, L> q, In<T, L> k, In<T, L> v, PositionScheme positions,
                               std::span<const index_t> offsets) {
  detail::require_backend<L>();
  check_sequence_offsets("causal_attention_backward", q, offsets);
  if constexpr (requires {
                  OpsBackend<L>::causal_attention_backward_segments(d_q, d_k, d_v, d_out, q, k, v, positions, offsets);
                }) {
    OpsBackend<L>::causal_attention_backward_segments(d_q, d_k, d_v, d_out, q, k, v, positions, offsets);
  } else {
    for_each_sequence(offsets, [&](index_t o0, index_t o1) {
      OpsBackend<L>::causal_attention_backward(d_q.slice(o0, o1), d_k.slice(o0, o1), d_v.slice(o0, o1),
                                               d_out.slice(o0, o1), q.slice(o0, o1), k.slice(o0, o1), v.slice(o0, o1),
                                               positions);
    });
  }
}

/// Memory-augmented attention backward. The retrieved mem_k, mem_v are constants (memory is
/// not differentiable, as in the reference): gradients reach q through both branches, k and v
/// through the local branch, and (GatedFusion) the gate: d_gate (H) += ... (may be empty).
/// K = 0 is exactly causal_attention_backward.
template <class Fusion, class T, class L>
void memory_attention_backward(TensorView<T, L> d_q, TensorView<T, L> d_k, TensorView<T, L> d_v,
                               TensorView<T, L> d_gate, In<T, L> d_out, In<T, L> q, In<T, L> k, In<T, L> v,
                               In<T, L> mem_k, In<T, L> mem_v, In<T, L> gate, PositionScheme positions) {
  detail::require_backend<L>();
  OpsBackend<L>::template memory_attention_backward<Fusion>(d_q, d_k, d_v, d_gate, d_out, q, k, v, mem_k, mem_v,
                                                            gate, positions);
}

/// memory_attention_backward over sequences stacked along the rows, as memory_attention with
/// offsets (mem_k, mem_v (N, H, K, dh)); d_gate (H) gets the sum over every sequence.
template <class Fusion, class T, class L>
void memory_attention_backward(TensorView<T, L> d_q, TensorView<T, L> d_k, TensorView<T, L> d_v,
                               TensorView<T, L> d_gate, In<T, L> d_out, In<T, L> q, In<T, L> k, In<T, L> v,
                               In<T, L> mem_k, In<T, L> mem_v, In<T, L> gate, PositionScheme positions,
                               std::span<const index_t> offsets) {
  detail::require_backend<L>();
  check_sequence_offsets("memory_attention_backward", q, offsets);
  if constexpr (requires {
                  OpsBackend<L>::template memory_attention_backward_segments<Fusion>(d_q, d_k, d_v, d_gate, d_out, q, k,
                                                                                     v, mem_k, mem_v, gate, positions,
                                                                                     offsets);
                }) {
    OpsBackend<L>::template memory_attention_backward_segments<Fusion>(d_q, d_k, d_v, d_gate, d_out, q, k, v, mem_k,
                                                                       mem_v, gate, positions, offsets);
  } else {
    for_each_sequence(offsets, [&](index_t o0, index_t o1) {
      OpsBackend<L>::template memory_attention_backward<Fusion>(
          d_q.slice(o0, o1), d_k.slice(o0, o1), d_v.slice(o0, o1), d_gate, d_out.slice(o0, o1), q.slice(o0, o1),
          k.slice(o0, o1), v.slice(o0, o1), mem_k.slice(o0, o1), mem_v.slice(o0, o1), gate, positions);
    });
  }
}

/// Cross-entropy backward: d_logits (T, V) = scale * (softmax(logits) - onehot(target)) per row,
/// 0 on rows whose target is -1. With scale = 1 / (counted targets) this is the gradient of the
/// mean loss.
template <class T, class L>
void cross_entropy_backward(TensorView<T, L> d_logits, In<T, L> logits, std::span<const std::int32_t> targets,
                            double scale) {
  detail::require_backend<L>();
  OpsBackend<L>::cross_entropy_backward(d_logits, logits, targets, scale);
}

// ---------------------------------------------------------------------------------------------
// Optimizer ops (the Trainer's gradient scaling, global norm and AdamW update, on the buffers'
// location, so training on the GPU keeps weights, gradients and moments there)

/// Sum of x^2 over every element of every tensor, in double. Deterministic: each tensor is cut
/// into fixed blocks of 32 Ki elements, each block summed in a fixed order, and the block sums
/// added in list order, so the result does not depend on the thread count (the host sums a
/// block in element order, the device in a fixed tree: the two differ by rounding).
template <class T, class L>
double sum_of_squares(std::span<const TensorView<const T, L>> xs) {
  detail::require_backend<L>();
  return OpsBackend<L>::sum_of_squares(xs);
}

/// x = x * factor for every element of every tensor (the product in double, rounded to T).
template <class T, class L>
void scale(std::span<const TensorView<T, L>> xs, double factor) {
  detail::require_backend<L>();
  OpsBackend<L>::scale(xs, factor);
}

/// The constants of one AdamW update (optimizer.hpp computes them): step t's bias corrections
/// bias1 = 1 - beta1^t, bias2 = 1 - beta2^t, and this tensor's weight decay.
struct AdamWStep {
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0, bias1 = 1, bias2 = 1, weight_decay = 0;
};

/// One AdamW update of `param` (any shape; grad, m, v the same shape), elementwise in double:
///   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p -= lr wd p;  p -= lr (m / bias1) / (sqrt(v / bias2) + eps)
template <class T, class L>
void adamw_update(TensorView<T, L> param, In<T, L> grad, TensorView<T, L> m, TensorView<T, L> v, const AdamWStep& s) {
  detail::require_backend<L>();
  OpsBackend<L>::adamw_update(param, grad, m, v, s);
}

}  // namespace ops
}  // namespace longmem
