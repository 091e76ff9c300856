#pragma once
// The MemoryBank concept: one stream's cache of backbone keys and values, per head,
// in chunks of csz consecutive tokens, with FIFO eviction as a ring over chunk slots.
//
// Layout every bank exposes (C = capacity in chunks, only slots [0, num_chunks()) valid):
//   chunk_keys()  (H, C, dh)       float   mean of each chunk's csz keys
//   keys()        (H, C, csz, dh)  storage the chunk's token keys, in token order
//   values()      (H, C, csz, dh)  storage the chunk's token values
// Slots fill 0, 1, 2, ...; once full, the oldest chunk's slot is overwritten. A trailing
// partial chunk is pending (not retrievable) until its csz tokens have arrived.
#include <concepts>
#include <cstddef>

#include "longmem/tensor.hpp"

namespace longmem {

/// The fixed geometry of a bank.
struct MemoryGeometry {
  int n_head = 0;
  int head_dim = 0;
  int chunk_size = 0;
  index_t capacity_chunks = 0;

  index_t capacity_tokens() const { return capacity_chunks * chunk_size; }
  friend bool operator==(const MemoryGeometry&, const MemoryGeometry&) = default;
};

/// A memory bank policy. `value_type` is how keys/values are stored (float, half, ...),
/// `location` where they live. append() takes (T, H, dh) keys and values of the
/// compute type; it is a template in implementations, checked here with float.
template <class M>
concept MemoryBank = requires(M& m, const M& cm, TensorView<const float, typename M::location> kv, index_t slot) {
  typename M::value_type;
  typename M::location;
  { cm.geometry() } -> std::convertible_to<MemoryGeometry>;
  { cm.num_chunks() } -> std::convertible_to<index_t>;       // complete chunks stored (<= capacity)
  { cm.size_tokens() } -> std::convertible_to<index_t>;      // num_chunks * chunk_size
  { cm.pending_tokens() } -> std::convertible_to<index_t>;   // tokens of the incomplete chunk
  { cm.capacity_tokens() } -> std::convertible_to<index_t>;
  { cm.bytes_used() } -> std::convertible_to<std::size_t>;   // bytes of stored chunks and pending tokens
  { cm.chunks_appended() } -> std::convertible_to<index_t>;  // chunks ever completed; grows monotonically
  { cm.chunk_sequence(slot) } -> std::convertible_to<index_t>;  // completion order of the chunk in `slot` (0 = first)
  { cm.chunk_position(slot) } -> std::convertible_to<index_t>;  // stream position of its first token
  { cm.chunk_keys() } -> std::convertible_to<TensorView<const float, typename M::location>>;
  { cm.keys() } -> std::convertible_to<TensorView<const typename M::value_type, typename M::location>>;
  { cm.values() } -> std::convertible_to<TensorView<const typename M::value_type, typename M::location>>;
  m.append(kv, kv);
  m.reset();
};

}  // namespace longmem
