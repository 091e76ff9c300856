// HostMemoryBank against a plain model of the stream (a deque of chunks and a ring of
// slots kept independently here): FIFO eviction, chunk keys = mean of their keys,
// storage rounding, pending tokens, bookkeeping, reset and errors.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <random>
#include <type_traits>
#include <vector>

#include "longmem/cpu/host_memory_bank.hpp"

using namespace longmem;

namespace {

// What one stored element should be: the input rounded once to S.
template <class S, class T>
double expected_stored(T x) {
  if constexpr (std::is_same_v<S, double>) {
    return static_cast<double>(x);
  } else if constexpr (std::is_same_v<S, float>) {
    return static_cast<double>(static_cast<float>(x));
  } else {
    return static_cast<double>(to_float(from_float<S>(static_cast<float>(x))));
  }
}

template <class S>
double stored_value(S x) {
  if constexpr (std::is_same_v<S, double>) {
    return x;
  } else {
    return static_cast<double>(to_float(x));
  }
}

struct ModelChunk {
  index_t sequence = 0;
  index_t slot = 0;
  std::vector<double> keys;    // (csz, H, dh) input keys, token-major as appended
  std::vector<double> values;  // (csz, H, dh)
};

// The stream as a test sees it: the newest C complete chunks, the slot ring, pending tokens.
struct StreamModel {
  MemoryGeometry g;
  std::deque<ModelChunk> chunks;    // oldest first
  std::vector<double> pend_keys;    // (p, H, dh)
  std::vector<double> pend_values;  // (p, H, dh)
  index_t completed = 0;
  index_t tokens = 0;

  index_t row() const { return static_cast<index_t>(g.n_head) * g.head_dim; }
  index_t pending() const { return static_cast<index_t>(pend_keys.size()) / row(); }

  void push(const double* k, const double* v) {
    pend_keys.insert(pend_keys.end(), k, k + row());
    pend_values.insert(pend_values.end(), v, v + row());
    ++tokens;
    if (pending() < g.chunk_size) return;
    ModelChunk c;
    c.sequence = completed++;
    if (static_cast<index_t>(chunks.size()) < g.capacity_chunks) {
      c.slot = static_cast<index_t>(chunks.size());
    } else {
      c.slot = chunks.front().slot;  // overwrite the oldest
      chunks.pop_front();
    }
    c.keys.swap(pend_keys);
    c.values.swap(pend_values);
    pend_keys.clear();
    pend_values.clear();
    chunks.push_back(std::move(c));
  }
};

template <class T>
std::vector<T> random_tokens(std::mt19937_64& rng, index_t n, index_t row) {
  std::uniform_real_distribution<double> u(-2.0, 2.0);
  std::vector<T> x(static_cast<std::size_t>(n * row));
  for (T& v : x) v = static_cast<T>(u(rng));
  return x;
}

// Appends n tokens of fresh random data to both the bank and the model.
template <class S, class T>
void append_both(HostMemoryBank<S>& bank, StreamModel& model, std::mt19937_64& rng, index_t n) {
  const MemoryGeometry& g = model.g;
  const index_t row = model.row();
  std::vector<T> k = random_tokens<T>(rng, n, row), v = random_tokens<T>(rng, n, row);
  bank.append(TensorView<const T, Host>(k.data(), {n, g.n_head, g.head_dim}),
              TensorView<const T, Host>(v.data(), {n, g.n_head, g.head_dim}));
  std::vector<double> kd(k.begin(), k.end()), vd(v.begin(), v.end());
  for (index_t t = 0; t < n; ++t) model.push(kd.data() + t * row, vd.data() + t * row);
}

// Everything the bank reports must agree with the model.
template <class S>
void check_against_model(const HostMemoryBank<S>& bank, const StreamModel& m) {
  const MemoryGeometry& g = m.g;
  const index_t H = g.n_head, dh = g.head_dim, csz = g.chunk_size;
  const index_t n = static_cast<index_t>(m.chunks.size());
  REQUIRE(bank.geometry() == g);
  REQUIRE(bank.num_chunks() == n);
  REQUIRE(bank.size_tokens() == n * csz);
  REQUIRE(bank.pending_tokens() == m.pending());
  REQUIRE(bank.capacity_tokens() == g.capacity_chunks * csz);
  REQUIRE(bank.chunks_appended() == m.completed);
  REQUIRE(bank.tokens_appended() == m.tokens);
  const std::size_t per_chunk = static_cast<std::size_t>(H * (2 * csz * dh) * index_t(sizeof(S)) + H * dh * 4);
  const std::size_t per_pending = static_cast<std::size_t>(H * 2 * dh) * sizeof(S);
  REQUIRE(bank.bytes_used() == static_cast<std::size_t>(n) * per_chunk + static_cast<std::size_t>(m.pending()) * per_pending);
  if (n > 0) REQUIRE(bank.oldest_slot() == m.chunks.front().slot);

  const auto keys = bank.keys(), values = bank.values();  // (H, C, csz, dh)
  const auto ck = bank.chunk_keys();                      // (H, C, dh)
  REQUIRE(keys.shape() == Shape{H, g.capacity_chunks, csz, dh});
  REQUIRE(ck.shape() == Shape{H, g.capacity_chunks, dh});
  for (const ModelChunk& c : m.chunks) {
    CAPTURE(c.sequence, c.slot);
    REQUIRE(bank.chunk_sequence(c.slot) == c.sequence);
    REQUIRE(bank.chunk_position(c.slot) == c.sequence * csz);
    for (index_t h = 0; h < H; ++h) {
      for (index_t d = 0; d < dh; ++d) {
        double mean = 0, mag = 0;
        for (index_t j = 0; j < csz; ++j) {
          const std::size_t i = static_cast<std::size_t>((j * H + h) * dh + d);
          mean += c.keys[i];
          mag = std::max(mag, std::abs(c.keys[i]));
          // Stored exactly as the input rounded once to S.
          REQUIRE(stored_value(keys(h, c.slot, j, d)) == expected_stored<S>(c.keys[i]));
          REQUIRE(stored_value(values(h, c.slot, j, d)) == expected_stored<S>(c.values[i]));
        }
        mean /= static_cast<double>(csz);
        // Mean of the input keys (not of the rounded storage), rounded once to float.
        CAPTURE(h, d, mean);
        REQUIRE(std::abs(static_cast<double>(ck(h, c.slot, d)) - mean) <= 1e-6 * std::abs(mean) + 1e-12 * mag);
      }
    }
  }
}

// Segment lengths a stream meets: empty, single tokens, odd lengths, more than the capacity.
index_t random_segment(std::mt19937_64& rng, const MemoryGeometry& g) {
  const index_t cap = g.capacity_tokens();
  const index_t choices[] = {0, 1, 2, 3, 7, g.chunk_size, g.chunk_size + 1, cap - 1, cap, cap + 1, 2 * cap + 3,
                             5 * cap + g.chunk_size - 1};
  std::uniform_int_distribution<std::size_t> pick(0, std::size(choices) - 1);
  return std::max<index_t>(0, choices[pick(rng)]);
}

}  // namespace

TEMPLATE_TEST_CASE("memory bank: random streams match a FIFO model", "[memory_bank]", float, double, half, bfloat16) {
  using S = TestType;
  const int csz = GENERATE(1, 2, 3, 4);
  const index_t capacity = GENERATE(index_t{1}, index_t{5}, index_t{13});
  const int n_head = GENERATE(1, 3);
  const int head_dim = GENERATE(1, 8);
  const std::uint64_t seed = 1000u + static_cast<std::uint64_t>(csz * 7919 + capacity * 131 + n_head * 17 + head_dim);
  CAPTURE(seed, csz, capacity, n_head, head_dim);
  std::mt19937_64 rng(seed);

  const MemoryGeometry g{n_head, head_dim, csz, capacity};
  HostMemoryBank<S> bank(g);
  StreamModel model{g, {}, {}, {}, 0, 0};
  check_against_model(bank, model);
  for (int step = 0; step < 25; ++step) {
    const index_t n = random_segment(rng, g);
    CAPTURE(step, n);
    if (step % 3 == 2) {
      append_both<S, double>(bank, model, rng, n);
    } else {
      append_both<S, float>(bank, model, rng, n);
    }
    check_against_model(bank, model);
  }
}

TEST_CASE("memory bank: pending tokens are kept and completed by the next append", "[memory_bank]") {
  const std::uint64_t seed = 42;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const MemoryGeometry g{2, 4, 4, 3};
  HostMemoryBank<float> bank(g);
  StreamModel model{g, {}, {}, {}, 0, 0};
  append_both<float, float>(bank, model, rng, 3);  // 0 chunks, 3 pending
  REQUIRE(bank.num_chunks() == 0);
  REQUIRE(bank.pending_tokens() == 3);
  REQUIRE(bank.tokens_appended() == 3);
  append_both<float, float>(bank, model, rng, 0);  // a no-op
  REQUIRE(bank.pending_tokens() == 3);
  append_both<float, float>(bank, model, rng, 1);  // completes chunk 0 from two appends
  REQUIRE(bank.num_chunks() == 1);
  REQUIRE(bank.pending_tokens() == 0);
  check_against_model(bank, model);
  append_both<float, float>(bank, model, rng, 2);
  append_both<float, float>(bank, model, rng, 9);  // completes chunk 1, adds 2 more, 3 pending
  REQUIRE(bank.num_chunks() == 3);
  REQUIRE(bank.pending_tokens() == 3);
  check_against_model(bank, model);
}

TEST_CASE("memory bank: one append of more than the capacity keeps the newest chunks", "[memory_bank]") {
  const index_t extra = GENERATE(index_t{0}, index_t{1}, index_t{2}, index_t{3});  // pending before and after
  const std::uint64_t seed = 7 + static_cast<std::uint64_t>(extra);
  CAPTURE(seed, extra);
  std::mt19937_64 rng(seed);
  const MemoryGeometry g{3, 5, 4, 6};
  HostMemoryBank<half> bank(g);
  StreamModel model{g, {}, {}, {}, 0, 0};
  append_both<half, float>(bank, model, rng, 9 + extra);
  append_both<half, float>(bank, model, rng, 40 * g.capacity_tokens() + extra);
  check_against_model(bank, model);
  REQUIRE(bank.num_chunks() == g.capacity_chunks);
  REQUIRE(bank.chunks_appended() == model.completed);
  // The newest chunk holds the last complete tokens of the stream.
  const index_t newest = model.chunks.back().slot;
  REQUIRE(bank.chunk_sequence(newest) == bank.chunks_appended() - 1);
  REQUIRE(bank.chunk_position(newest) == (bank.chunks_appended() - 1) * g.chunk_size);
}

TEST_CASE("memory bank: reset empties the bank and restarts the counters", "[memory_bank]") {
  const std::uint64_t seed = 99;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const MemoryGeometry g{2, 3, 2, 4};
  HostMemoryBank<bfloat16> bank(g);
  StreamModel model{g, {}, {}, {}, 0, 0};
  append_both<bfloat16, float>(bank, model, rng, 21);
  REQUIRE(bank.num_chunks() == 4);
  bank.reset();
  REQUIRE(bank.num_chunks() == 0);
  REQUIRE(bank.pending_tokens() == 0);
  REQUIRE(bank.chunks_appended() == 0);
  REQUIRE(bank.tokens_appended() == 0);
  REQUIRE(bank.bytes_used() == 0);
  REQUIRE(bank.oldest_slot() == 0);
  REQUIRE_THROWS_AS(bank.chunk_sequence(0), ShapeError);
  // A fresh stream after reset: the pending token before reset must not leak into it.
  StreamModel fresh{g, {}, {}, {}, 0, 0};
  append_both<bfloat16, float>(bank, fresh, rng, 7);
  check_against_model(bank, fresh);
}

TEST_CASE("memory bank: two banks fed different streams stay independent", "[memory_bank]") {
  const std::uint64_t seed = 2024;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const MemoryGeometry g{2, 4, 2, 5};
  HostMemoryBank<float> a(g), b(g);
  StreamModel ma{g, {}, {}, {}, 0, 0}, mb{g, {}, {}, {}, 0, 0};
  for (int step = 0; step < 12; ++step) {
    append_both<float, float>(a, ma, rng, random_segment(rng, g));
    append_both<float, float>(b, mb, rng, random_segment(rng, g));
    check_against_model(a, ma);
    check_against_model(b, mb);
  }
}

TEST_CASE("memory bank: chunk_sequence and chunk_position refuse slots that hold no chunk", "[memory_bank]") {
  const MemoryGeometry g{1, 2, 2, 3};
  HostMemoryBank<float> bank(g);
  REQUIRE_THROWS_AS(bank.chunk_sequence(0), ShapeError);
  std::vector<float> x(5 * 2, 1.0f);
  bank.append(TensorView<const float, Host>(x.data(), {5, 1, 2}), TensorView<const float, Host>(x.data(), {5, 1, 2}));
  REQUIRE(bank.num_chunks() == 2);
  REQUIRE(bank.chunk_sequence(1) == 1);
  REQUIRE_THROWS_AS(bank.chunk_sequence(2), ShapeError);  // capacity 3, but slot 2 is empty
  REQUIRE_THROWS_AS(bank.chunk_sequence(-1), ShapeError);
  REQUIRE_THROWS_AS(bank.chunk_position(2), ShapeError);
  REQUIRE_THROWS_WITH(bank.chunk_sequence(5), Catch::Contains("slot 5"));
}

TEST_CASE("memory bank: wrong shapes are refused and leave the bank unchanged", "[memory_bank]") {
  const MemoryGeometry g{2, 3, 2, 4};
  HostMemoryBank<float> bank(g);
  std::vector<float> x(64, 0.5f);
  auto view = [&](Shape s) { return TensorView<const float, Host>(x.data(), s); };
  bank.append(view({3, 2, 3}), view({3, 2, 3}));
  REQUIRE(bank.tokens_appended() == 3);
  REQUIRE_THROWS_AS(bank.append(view({3, 3, 3}), view({3, 3, 3})), ShapeError);  // wrong H
  REQUIRE_THROWS_AS(bank.append(view({3, 2, 4}), view({3, 2, 4})), ShapeError);  // wrong dh
  REQUIRE_THROWS_AS(bank.append(view({6, 3}), view({6, 3})), ShapeError);        // rank 2
  REQUIRE_THROWS_AS(bank.append(view({2, 2, 3}), view({3, 2, 3})), ShapeError);  // values differ
  REQUIRE_THROWS_WITH(bank.append(view({3, 2, 4}), view({3, 2, 4})), Catch::Contains("(3, 2, 4)") && Catch::Contains("keys"));
  REQUIRE_THROWS_WITH(bank.append(view({3, 2, 3}), view({1, 2, 3})), Catch::Contains("values"));
  REQUIRE(bank.tokens_appended() == 3);
  REQUIRE(bank.num_chunks() == 1);
  REQUIRE(bank.pending_tokens() == 1);
}

TEST_CASE("memory bank: non-positive geometry is a ConfigError", "[memory_bank]") {
  REQUIRE_THROWS_AS(HostMemoryBank<float>(MemoryGeometry{0, 4, 2, 8}), ConfigError);
  REQUIRE_THROWS_AS(HostMemoryBank<float>(MemoryGeometry{2, 0, 2, 8}), ConfigError);
  REQUIRE_THROWS_AS(HostMemoryBank<float>(MemoryGeometry{2, 4, 0, 8}), ConfigError);
  REQUIRE_THROWS_AS(HostMemoryBank<float>(MemoryGeometry{2, 4, 2, 0}), ConfigError);
  REQUIRE_THROWS_AS(HostMemoryBank<half>(MemoryGeometry{2, 4, -2, 8}), ConfigError);
  REQUIRE_THROWS_WITH(HostMemoryBank<float>(MemoryGeometry{2, 4, 2, -1}), Catch::Contains("capacity_chunks"));

  MemoryConfig m;
  m.memory_tokens = 96;
  m.chunk_size = 4;
  m.retrieved_tokens = 16;
  HostMemoryBank<float> bank(3, 8, m);
  REQUIRE(bank.geometry() == MemoryGeometry{3, 8, 4, 24});
  REQUIRE(bank.capacity_tokens() == 96);
  m.memory_tokens = 98;  // not a multiple of chunk_size
  REQUIRE_THROWS_AS(HostMemoryBank<float>(3, 8, m), ConfigError);
  m.memory_tokens = 96;
  REQUIRE_THROWS_AS(HostMemoryBank<float>(0, 8, m), ConfigError);
}

TEST_CASE("memory bank: keys and values of every storage type are exposed as views", "[memory_bank]") {
  STATIC_REQUIRE(MemoryBank<HostMemoryBank<float>>);
  STATIC_REQUIRE(MemoryBank<HostMemoryBank<double>>);
  STATIC_REQUIRE(MemoryBank<HostMemoryBank<half>>);
  STATIC_REQUIRE(MemoryBank<HostMemoryBank<bfloat16>>);
  STATIC_REQUIRE(std::is_same_v<decltype(HostMemoryBank<half>(MemoryGeometry{1, 1, 1, 1}).keys()),
                                TensorView<const half, Host>>);
}
