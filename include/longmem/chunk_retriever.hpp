#pragma once
// The ChunkRetriever concept: for every query token and head, the top-k chunks of a
// MemoryBank by inner product of the unscaled query with the chunk keys, and the
// gathered keys and values of all their tokens.
//
//   retrieve(bank, queries (T, H, dh), k, out):
//     out.slots   (T, H, k')          bank slots, best first (k' = min(k, bank.num_chunks()))
//     out.scores  (T, H, k')          q . chunk_key of each, float
//     out.keys    (T, H, k' * csz, dh) token keys of the chosen chunks, chunk after chunk
//     out.values  (T, H, k' * csz, dh)
// Ties are broken in favour of the older chunk (smaller chunk_sequence), on every backend.
// When the bank holds fewer than k chunks, all of them are retrieved (k' < k); when it
// is empty, k' = 0 and the tensors are empty.
#include <algorithm>
#include <concepts>
#include <cstdint>
#include <span>
#include <vector>

#include "longmem/memory_bank.hpp"
#include "longmem/tensor.hpp"

namespace longmem {

/// What one retrieval returns, in buffers at location L; T is the compute type.
template <class T, class L = Host>
struct Retrieved {
  Tensor<std::int32_t, L> slots;  // (T, H, k')
  Tensor<float, L> scores;        // (T, H, k')
  Tensor<T, L> keys;              // (T, H, k' * csz, dh)
  Tensor<T, L> values;            // (T, H, k' * csz, dh)
  int chunks = 0;                 // k'

  int tokens(int chunk_size) const { return chunks * chunk_size; }
};

/// A retriever policy; `location` says which banks it can read.
template <class R>
concept ChunkRetriever = requires { typename R::location; } && Location<typename R::location>;

/// R can search banks of type M (same location, and a retrieve() for them).
template <class R, class M>
concept ChunkRetrieverFor =
    ChunkRetriever<R> && MemoryBank<M> &&
    requires(R& r, const M& bank, TensorView<const float, typename M::location> queries, int k,
             Retrieved<float, typename M::location>& out) { r.retrieve(bank, queries, k, out); };

/// The banks one stacked retrieval (a retriever's retrieve_stacked) can serve together: all of
/// them, when every bank gives the same k' = min(k, stored chunks) and k' > 0; none otherwise, and
/// the caller then retrieves stream by stream.
template <MemoryBank M>
std::vector<const M*> banks_for_stacked_retrieval(std::span<const M> banks, int k) {
  std::vector<const M*> out;
  if (banks.empty()) return out;
  const auto kept = [k](const M& bank) { return std::min<index_t>(k, bank.num_chunks()); };
  for (const M& bank : banks) {
    if (kept(bank) == 0 || kept(bank) != kept(banks.front())) return {};
    out.push_back(&bank);
  }
  return out;
}

}  // namespace longmem
