#pragma once
// A synthetic key-value recall task (tests and the recall_backbone fixture): a table of P
// (key, value) pairs, then `gap` filler tokens, then NQ queries "Q key value"; only the queried
// values are scored. With gap = 0 everything is inside one segment (in-window recall, which a
// backbone can learn); with gap >= one segment the table lies beyond the window and only memory
// can answer.
//   ids: 0 = Q, keys 1..16, values 17..32, filler 33..63 (vocabulary 64)
#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "longmem/train/data.hpp"

namespace longmem::test {

struct RecallSpec {
  int pairs = 3;
  int queries = 3;
  int gap = 0;             // filler tokens between the table and the queries
  int segment_length = 32;  // the document is padded with filler to a whole number of segments
};

inline constexpr int recall_vocab = 64;

inline Document recall_document(std::mt19937_64& rng, const RecallSpec& s) {
  Document d;
  std::vector<std::int32_t> keys(16);
  for (int i = 0; i < 16; ++i) keys[static_cast<std::size_t>(i)] = 1 + i;
  std::shuffle(keys.begin(), keys.end(), rng);
  std::uniform_int_distribution<std::int32_t> value(17, 32), filler(33, 63);
  std::vector<std::int32_t> values(static_cast<std::size_t>(s.pairs));
  for (int i = 0; i < s.pairs; ++i) {
    values[static_cast<std::size_t>(i)] = value(rng);
    d.tokens.push_back(keys[static_cast<std::size_t>(i)]);
    d.tokens.push_back(values[static_cast<std::size_t>(i)]);
  }
  for (int i = 0; i < s.gap; ++i) d.tokens.push_back(filler(rng));
  std::vector<int> order(static_cast<std::size_t>(s.pairs));
  for (int i = 0; i < s.pairs; ++i) order[static_cast<std::size_t>(i)] = i;
  std::shuffle(order.begin(), order.end(), rng);
  const std::size_t q0 = d.tokens.size();
  for (int i = 0; i < s.queries; ++i) {
    const auto o = static_cast<std::size_t>(order[static_cast<std::size_t>(i % s.pairs)]);
    d.tokens.push_back(0);
    d.tokens.push_back(keys[o]);
    d.tokens.push_back(values[o]);
  }
  while (d.tokens.size() % static_cast<std::size_t>(s.segment_length) != 0) d.tokens.push_back(filler(rng));
  d.scored.assign(d.tokens.size(), 0);
  for (int i = 0; i < s.queries; ++i) d.scored[q0 + 3 * static_cast<std::size_t>(i) + 2] = 1;
  return d;
}

inline std::vector<Document> recall_documents(std::uint64_t seed, int n, const RecallSpec& s) {
  std::mt19937_64 rng(seed);
  std::vector<Document> docs;
  for (int i = 0; i < n; ++i) {
    docs.push_back(recall_document(rng, s));
    docs.back().name = "recall " + std::to_string(i);
  }
  return docs;
}

}  // namespace longmem::test
