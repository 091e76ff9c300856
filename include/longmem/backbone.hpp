#pragma once
// The Backbone concept: a frozen language model that reads one segment and reports
// what LongMem needs from it.
//
//   forward(tokens (T), request, out):
//     out.hidden     (L+1, T, d)  B[0] = embedding, B[j+1] = block j output, B[L] after ln_f
//     out.mem_keys   (T, H, dh)   key projection of layer request.memory_layer, unscaled
//     out.mem_values (T, H, dh)   value projection of the same layer
//     out.logits     (T, V)       only when request.logits
//   token_embedding()  (V, d)     the tied output head, reused by the SideNet
#include <concepts>
#include <cstdint>
#include <span>
#include <vector>

#include "longmem/model_config.hpp"
#include "longmem/tensor.hpp"

namespace longmem {

/// What a caller wants from one backbone forward.
struct BackboneRequest {
  bool logits = true;         ///< compute (T, V) logits through the tied head
  bool hidden_states = true;  ///< keep all L+1 hidden states (else only B[L])
  int memory_layer = -1;      ///< capture keys/values of this layer; -1: none
};

/// Everything one backbone forward produces, in buffers of the backbone's location.
template <class T, class L = Host>
struct BackboneOutput {
  std::vector<index_t> offsets;  // row offsets of the segments (B+1 entries; {0, T} for one segment)
  Tensor<T, L> hidden;      // (L+1, T, d) or (1, T, d) when hidden_states is false
  Tensor<T, L> mem_keys;    // (T, H, dh), empty when no memory layer was requested
  Tensor<T, L> mem_values;  // (T, H, dh)
  Tensor<T, L> logits;      // (T, V), empty when logits were not requested
};

/// A frozen backbone. `value_type` is the compute type, `location` where its buffers live.
template <class B>
concept Backbone = requires(const B& b, std::span<const std::int32_t> tokens, const BackboneRequest& req,
                            BackboneOutput<typename B::value_type, typename B::location>& out) {
  typename B::value_type;
  typename B::location;
  { b.config() } -> std::convertible_to<const BackboneConfig&>;
  { b.forward(tokens, req, out) };
  { b.token_embedding() } -> std::convertible_to<TensorView<const typename B::value_type, typename B::location>>;
};

}  // namespace longmem
