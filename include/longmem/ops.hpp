#pragma once
// The op table: every computation of the forward pass as an explicit function over
// explicit buffers (llm.c style), so a backward can later sit beside each forward.
//
// Each function dispatches on the buffers' location to OpsBackend<L>:
//   OpsBackend<Host>    <longmem/cpu/ops.hpp>    Eigen + plain loops, float or double
//   OpsBackend<Device>  <longmem/cuda/ops.cuh>   CUDA kernels (later)
// Shapes use: T tokens, H heads, dh head dim, d = H*dh width, V vocabulary,
// K retrieved memory tokens, N rows, I/O linear in/out features.
#include <cstdint>
#include <span>
#include <type_traits>

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

/// x (any shape) = gelu(x), in place, tanh or erf form.
template <class T, class L>
void gelu(TensorView<T, L> x, Activation kind) {
  detail::require_backend<L>();
  OpsBackend<L>::gelu(x, kind);
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

/// Mean next-token cross-entropy (natural log) of logits (T, V) against targets (T);
/// a target of -1 is ignored. Writes per-token losses (T) when `losses` is not empty.
/// Returns the sum of losses and the number of counted targets.
template <class T, class L>
std::pair<double, std::int64_t> cross_entropy(TensorView<const T, L> logits, std::span<const std::int32_t> targets,
                                              TensorView<float, L> losses) {
  detail::require_backend<L>();
  return OpsBackend<L>::cross_entropy(logits, targets, losses);
}

}  // namespace ops
}  // namespace longmem
