#pragma once
// Brute-force chunk retrieval in float64, for tests: every stored chunk is scored for
// every (t, h), the whole list is sorted by (score desc, chunk_sequence asc) and the
// first k are kept. Plain loops, no Eigen, nothing clever.
//
// As in every retriever, a NaN score counts as -infinity.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "longmem/dtype.hpp"
#include "longmem/error.hpp"
#include "longmem/memory_bank.hpp"
#include "longmem/tensor.hpp"

namespace longmem::reference {

/// A stored element as double (exact for every storage type).
template <class S>
double widen(S x) {
  if constexpr (std::is_same_v<S, double>) {
    return x;
  } else {
    return static_cast<double>(to_float(x));
  }
}

/// One stored chunk and its score against one query.
struct ScoredChunk {
  double score = 0;
  index_t sequence = 0;
  std::int32_t slot = 0;
};

/// Every stored chunk of head h scored against queries[t, h] (T, H, dh), best first.
template <MemoryBank M, class T>
std::vector<ScoredChunk> rank_chunks(const M& bank, TensorView<const T, Host> queries, index_t t, int h) {
  const MemoryGeometry g = bank.geometry();
  if (queries.rank() != 3 || queries.dim(1) != g.n_head || queries.dim(2) != g.head_dim) {
    detail::fail<ShapeError>("reference::rank_chunks: queries must be (T, ", g.n_head, ", ", g.head_dim, "), got ",
                             queries.shape().str());
  }
  const TensorView<const float, Host> ck = bank.chunk_keys();  // (H, C, dh)
  std::vector<ScoredChunk> all;
  for (index_t slot = 0; slot < bank.num_chunks(); ++slot) {
    double s = 0;
    for (int d = 0; d < g.head_dim; ++d) {
      s += static_cast<double>(queries(t, h, d)) * static_cast<double>(ck(h, slot, d));
    }
    if (std::isnan(s)) s = -std::numeric_limits<double>::infinity();
    all.push_back({s, bank.chunk_sequence(slot), static_cast<std::int32_t>(slot)});
  }
  std::sort(all.begin(), all.end(), [](const ScoredChunk& a, const ScoredChunk& b) {
    if (a.score != b.score) return a.score > b.score;
    return a.sequence < b.sequence;
  });
  return all;
}

/// What reference::retrieve returns: slots, scores (T, H, k') and keys, values
/// (T, H, k' * csz, dh), all in double.
struct RetrievedF64 {
  int chunks = 0;                    // k'
  std::vector<std::int32_t> slots;   // (T, H, k')
  std::vector<double> scores;        // (T, H, k')
  std::vector<double> keys;          // (T, H, k' * csz, dh)
  std::vector<double> values;        // (T, H, k' * csz, dh)
};

/// Top-k of every (t, h): k' = min(k, num_chunks), keys/values gathered from the bank.
template <MemoryBank M, class T>
RetrievedF64 retrieve(const M& bank, TensorView<const T, Host> queries, int k) {
  if (k < 1) detail::fail<ConfigError>("reference::retrieve: k must be >= 1, got ", k);
  const MemoryGeometry g = bank.geometry();
  if (queries.rank() != 3 || queries.dim(1) != g.n_head || queries.dim(2) != g.head_dim) {
    detail::fail<ShapeError>("reference::retrieve: queries must be (T, ", g.n_head, ", ", g.head_dim, "), got ",
                             queries.shape().str());
  }
  const index_t Tq = queries.dim(0), H = g.n_head, csz = g.chunk_size, dh = g.head_dim;
  const index_t kk = std::min<index_t>(k, bank.num_chunks());
  RetrievedF64 r;
  r.chunks = static_cast<int>(kk);
  const auto keys = bank.keys();      // (H, C, csz, dh)
  const auto values = bank.values();  // (H, C, csz, dh)
  for (index_t t = 0; t < Tq; ++t) {
    for (index_t h = 0; h < H; ++h) {
      const std::vector<ScoredChunk> ranked = rank_chunks(bank, queries, t, static_cast<int>(h));
      for (index_t i = 0; i < kk; ++i) {
        const ScoredChunk& c = ranked[static_cast<std::size_t>(i)];
        r.slots.push_back(c.slot);
        r.scores.push_back(c.score);
        for (index_t j = 0; j < csz; ++j) {
          for (index_t d = 0; d < dh; ++d) r.keys.push_back(widen(keys(h, c.slot, j, d)));
        }
        for (index_t j = 0; j < csz; ++j) {
          for (index_t d = 0; d < dh; ++d) r.values.push_back(widen(values(h, c.slot, j, d)));
        }
      }
    }
  }
  return r;
}

}  // namespace longmem::reference
