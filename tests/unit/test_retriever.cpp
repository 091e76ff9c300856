// ExactChunkRetriever against the float64 brute force of reference/retrieval.hpp,
// compared order-free and tie-aware: a chosen slot may differ from the reference only
// where the reference scores are within the float tolerance of each other.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <set>
#include <span>
#include <type_traits>
#include <vector>

#include "longmem/cpu/exact_chunk_retriever.hpp"
#include "longmem/cpu/host_memory_bank.hpp"
#include "longmem/reference/retrieval.hpp"

using namespace longmem;
using Catch::Generators::values;

namespace {

template <class T>
Tensor<T, Host> random_tensor(std::mt19937_64& rng, Shape s) {
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  Tensor<T, Host> x(s);
  for (T& v : x) v = static_cast<T>(u(rng));
  return x;
}

// A bank holding `chunks` completed chunks (appended in random segment lengths) and
// `pending` extra tokens.
template <class S>
HostMemoryBank<S> make_bank(std::mt19937_64& rng, MemoryGeometry g, index_t chunks, index_t pending) {
  HostMemoryBank<S> bank(g);
  index_t left = chunks * g.chunk_size + pending;
  std::uniform_int_distribution<index_t> seg(0, 3 * g.chunk_size + 5);
  while (left > 0) {
    const index_t n = std::min(left, seg(rng));
    Tensor<float, Host> k = random_tensor<float>(rng, {n, g.n_head, g.head_dim});
    Tensor<float, Host> v = random_tensor<float>(rng, {n, g.n_head, g.head_dim});
    bank.append(k, v);
    left -= n;
  }
  return bank;
}

// Fills outputs with garbage of the expected shapes so an unwritten element fails.
template <class T>
void poison(Retrieved<T, Host>& out, index_t Tq, index_t H, index_t kk, index_t csz, index_t dh) {
  out.slots.resize({Tq, H, kk});
  out.scores.resize({Tq, H, kk});
  out.keys.resize({Tq, H, kk * csz, dh});
  out.values.resize({Tq, H, kk * csz, dh});
  fill(out.slots.view(), std::int32_t{-7});
  fill(out.scores.view(), std::numeric_limits<float>::quiet_NaN());
  fill(out.keys.view(), std::numeric_limits<T>::quiet_NaN());
  fill(out.values.view(), std::numeric_limits<T>::quiet_NaN());
  out.chunks = -1;
}

template <class S>
double widen(S x) {
  return reference::widen(x);
}

// Checks one retrieval against the float64 reference (tie-aware) and the bank's storage (exact).
template <class S, class T>
void check_retrieval(const HostMemoryBank<S>& bank, TensorView<const T, Host> queries, int k,
                     const Retrieved<T, Host>& out) {
  const MemoryGeometry g = bank.geometry();
  const index_t Tq = queries.dim(0), H = g.n_head, csz = g.chunk_size, dh = g.head_dim;
  const index_t n = bank.num_chunks();
  const index_t kk = std::min<index_t>(k, n);
  REQUIRE(out.chunks == kk);
  REQUIRE(out.slots.shape() == Shape{Tq, H, kk});
  REQUIRE(out.scores.shape() == Shape{Tq, H, kk});
  REQUIRE(out.keys.shape() == Shape{Tq, H, kk * csz, dh});
  REQUIRE(out.values.shape() == Shape{Tq, H, kk * csz, dh});
  if (kk == 0) return;
  const auto bk = bank.keys(), bv = bank.values();  // (H, C, csz, dh)
  for (index_t t = 0; t < Tq; ++t) {
    for (index_t h = 0; h < H; ++h) {
      CAPTURE(t, h);
      const std::vector<reference::ScoredChunk> ranked = reference::rank_chunks(bank, queries, t, static_cast<int>(h));
      REQUIRE(static_cast<index_t>(ranked.size()) == n);
      std::vector<double> ref_score(static_cast<std::size_t>(n));  // by slot
      double max_abs = 0;
      for (const auto& c : ranked) {
        ref_score[static_cast<std::size_t>(c.slot)] = c.score;
        if (std::isfinite(c.score)) max_abs = std::max(max_abs, std::abs(c.score));
      }
      // float GEMM over dh terms of float-rounded inputs: relative to the largest score.
      const double tol = 1e-5 * max_abs + 1e-6;
      std::set<std::int32_t> seen;
      for (index_t i = 0; i < kk; ++i) {
        const std::int32_t slot = out.slots(t, h, i);
        CAPTURE(i, slot);
        REQUIRE(slot >= 0);
        REQUIRE(slot < n);
        REQUIRE(seen.insert(slot).second);  // no slot twice
        const double ours = out.scores(t, h, i);
        const double ref = ref_score[static_cast<std::size_t>(slot)];
        // The score reported is the score of that slot.
        if (std::isinf(ref)) {
          REQUIRE(ours == ref);
        } else {
          REQUIRE(std::abs(ours - ref) <= tol);
        }
        // Position i holds the reference's i-th best, up to a near-tie.
        const double ref_i = ranked[static_cast<std::size_t>(i)].score;
        if (std::isinf(ref_i)) {
          REQUIRE(ref == ref_i);
        } else {
          REQUIRE(std::abs(ref - ref_i) <= 2 * tol);
        }
        // Best first, and equal scores older first.
        if (i > 0) {
          const float prev = out.scores(t, h, i - 1);
          REQUIRE(prev >= out.scores(t, h, i));
          if (prev == out.scores(t, h, i)) {
            REQUIRE(bank.chunk_sequence(out.slots(t, h, i - 1)) < bank.chunk_sequence(slot));
          }
        }
        // Gathered tokens are the bank's stored ones, exactly (NaN poison never compares equal).
        const T* ok = &out.keys(t, h, i * csz, 0);
        const T* ov = &out.values(t, h, i * csz, 0);
        const S* sk = &bk(h, slot, 0, 0);
        const S* sv = &bv(h, slot, 0, 0);
        index_t wrong = 0;
        for (index_t e = 0; e < csz * dh; ++e) {
          wrong += static_cast<double>(ok[e]) != widen(sk[e]);
          wrong += static_cast<double>(ov[e]) != widen(sv[e]);
        }
        REQUIRE(wrong == 0);
      }
      // Order-free: everything clearly better than the k'-th reference score was chosen.
      const double kth = ranked[static_cast<std::size_t>(kk - 1)].score;
      for (const auto& c : ranked) {
        if (std::isfinite(kth) && c.score > kth + tol) REQUIRE(seen.count(c.slot) == 1);
      }
    }
  }
}

}  // namespace

TEST_CASE("retriever: matches the float64 reference", "[retriever]") {
  const int csz = GENERATE(1, 2, 4);
  const int n_head = GENERATE(1, 4);
  const int head_dim = GENERATE(1, 16, 64);
  const index_t Tq = GENERATE(index_t{1}, index_t{7}, index_t{33});
  const ExactRetrieverTuning tuning = GENERATE(values({default_exact_retriever_tuning, ExactRetrieverTuning{5, 3}}));
  const index_t capacity = 23;
  // partially filled (with pending tokens), exactly full, wrapped many times
  const index_t stored = GENERATE(index_t{10}, index_t{23}, index_t{23 * 6 + 9});
  const std::uint64_t seed = static_cast<std::uint64_t>(csz * 1000003 + n_head * 10007 + head_dim * 101 + Tq * 13 + stored);
  CAPTURE(seed, csz, n_head, head_dim, Tq, tuning, stored);
  std::mt19937_64 rng(seed);

  const MemoryGeometry g{n_head, head_dim, csz, capacity};
  const HostMemoryBank<float> bank = make_bank<float>(rng, g, stored, csz > 1 ? csz - 1 : 0);
  const Tensor<float, Host> queries = random_tensor<float>(rng, {Tq, n_head, head_dim});
  ExactChunkRetriever retriever(tuning);
  Retrieved<float, Host> out;
  for (int k : {1, 3, 16, 40}) {  // 40 is more than the bank ever stores
    CAPTURE(k);
    poison(out, Tq, n_head, std::min<index_t>(k, bank.num_chunks()), csz, head_dim);
    retriever.retrieve(bank, cview(queries), k, out);
    check_retrieval(bank, cview(queries), k, out);
  }
}

TEMPLATE_TEST_CASE("retriever: 16-bit and double storage, double queries", "[retriever]", half, bfloat16, double) {
  using S = TestType;
  const int csz = GENERATE(2, 4);
  const index_t Tq = GENERATE(index_t{1}, index_t{9});
  const std::uint64_t seed = 77 + static_cast<std::uint64_t>(csz * 31 + Tq);
  CAPTURE(seed, csz, Tq);
  std::mt19937_64 rng(seed);
  const MemoryGeometry g{3, 16, csz, 31};
  const HostMemoryBank<S> bank = make_bank<S>(rng, g, 31 * 3 + 4, 1);
  const Tensor<double, Host> qd = random_tensor<double>(rng, {Tq, 3, 16});
  const Tensor<float, Host> qf = random_tensor<float>(rng, {Tq, 3, 16});
  ExactChunkRetriever retriever(ExactRetrieverTuning{7, 4});
  Retrieved<double, Host> outd;
  Retrieved<float, Host> outf;
  for (int k : {1, 5, 16}) {
    CAPTURE(k);
    poison(outd, Tq, 3, k, csz, 16);
    retriever.retrieve(bank, cview(qd), k, outd);
    check_retrieval(bank, cview(qd), k, outd);
    poison(outf, Tq, 3, k, csz, 16);
    retriever.retrieve(bank, cview(qf), k, outf);
    check_retrieval(bank, cview(qf), k, outf);
  }
}

TEST_CASE("retriever: many chunk tiles, a wrapped ring and the default tuning", "[retriever]") {
  const ExactRetrieverTuning tuning =
      GENERATE(values({default_exact_retriever_tuning, ExactRetrieverTuning{100, 5}, ExactRetrieverTuning{1, 1}}));
  const std::uint64_t seed = 31337;
  CAPTURE(seed, tuning);
  std::mt19937_64 rng(seed);
  const MemoryGeometry g{2, 64, 4, 1500};
  const HostMemoryBank<float> bank = make_bank<float>(rng, g, 1500 + 733, 3);  // the ring wraps mid-tile
  const Tensor<float, Host> queries = random_tensor<float>(rng, {17, 2, 64});
  ExactChunkRetriever retriever(tuning);
  Retrieved<float, Host> out;
  for (int k : {16, 64}) {
    CAPTURE(k);
    poison(out, 17, 2, k, 4, 64);
    retriever.retrieve(bank, cview(queries), k, out);
    check_retrieval(bank, cview(queries), k, out);
  }
}

TEST_CASE("retriever: exact ties go to the older chunk", "[retriever]") {
  // Small integers keep every product and sum exact in float, so duplicates tie exactly.
  const int csz = GENERATE(1, 2, 4);
  const ExactRetrieverTuning tuning = GENERATE(values({default_exact_retriever_tuning, ExactRetrieverTuning{3, 2}}));
  const std::uint64_t seed = 5150 + static_cast<std::uint64_t>(csz);
  CAPTURE(seed, csz, tuning);
  std::mt19937_64 rng(seed);
  const int H = 2, dh = 8;
  const index_t C = 19;
  const MemoryGeometry g{H, dh, csz, C};
  HostMemoryBank<float> bank(g);
  std::uniform_int_distribution<int> small(-3, 3);
  std::uniform_int_distribution<int> pattern(0, 3);  // only four distinct chunk keys per head
  std::vector<std::vector<float>> patterns(4, std::vector<float>(static_cast<std::size_t>(H * dh)));
  for (auto& p : patterns) {
    for (float& x : p) x = static_cast<float>(small(rng));
  }
  const index_t chunks = 3 * C + 5;  // wrapped, so slot order is not age order
  for (index_t c = 0; c < chunks; ++c) {
    const std::vector<float>& p = patterns[static_cast<std::size_t>(pattern(rng))];
    Tensor<float, Host> k({csz, H, dh});
    for (index_t j = 0; j < csz; ++j) std::copy(p.begin(), p.end(), k.data() + j * H * dh);
    bank.append(k, k);
  }
  Tensor<float, Host> queries({5, H, dh});
  for (float& x : queries) x = static_cast<float>(small(rng));
  ExactChunkRetriever retriever(tuning);
  Retrieved<float, Host> out;
  for (int k : {1, 4, 7, 19}) {
    CAPTURE(k);
    poison(out, 5, H, k, csz, dh);
    retriever.retrieve(bank, cview(queries), k, out);
    const reference::RetrievedF64 ref = reference::retrieve(bank, cview(queries), k);
    REQUIRE(out.chunks == ref.chunks);
    for (std::size_t i = 0; i < ref.slots.size(); ++i) {
      CAPTURE(i);
      REQUIRE(out.slots.data()[i] == ref.slots[i]);  // the exact order, ties included
      REQUIRE(static_cast<double>(out.scores.data()[i]) == ref.scores[i]);
    }
    for (std::size_t i = 0; i < ref.keys.size(); ++i) REQUIRE(static_cast<double>(out.keys.data()[i]) == ref.keys[i]);
    for (std::size_t i = 0; i < ref.values.size(); ++i) {
      REQUIRE(static_cast<double>(out.values.data()[i]) == ref.values[i]);
    }
  }
}

TEST_CASE("retriever: pending tokens are never retrieved", "[retriever]") {
  const index_t stored = GENERATE(index_t{0}, index_t{2}, index_t{6}, index_t{15});  // capacity 6
  const std::uint64_t seed = 8080 + static_cast<std::uint64_t>(stored);
  CAPTURE(seed, stored);
  std::mt19937_64 rng(seed);
  const MemoryGeometry g{2, 4, 4, 6};
  HostMemoryBank<float> bank = make_bank<float>(rng, g, stored, 0);
  // Three pending tokens whose keys would beat every stored chunk by far.
  Tensor<float, Host> big({3, 2, 4});
  fill(big.view(), 1000.0f);
  bank.append(big, big);
  REQUIRE(bank.pending_tokens() == 3);
  Tensor<float, Host> queries({4, 2, 4});
  fill(queries.view(), 1.0f);
  ExactChunkRetriever retriever;
  Retrieved<float, Host> out;
  poison(out, 4, 2, std::min<index_t>(3, bank.num_chunks()), 4, 4);
  retriever.retrieve(bank, cview(queries), 3, out);
  check_retrieval(bank, cview(queries), 3, out);
  REQUIRE(out.chunks == std::min<index_t>(3, stored));
  for (float x : out.keys) REQUIRE(x != 1000.0f);
  for (float s : out.scores) REQUIRE(s < 100.0f);
}

TEST_CASE("retriever: an empty bank gives k' = 0", "[retriever]") {
  const MemoryGeometry g{3, 8, 2, 10};
  HostMemoryBank<half> bank(g);
  Tensor<float, Host> one({1, 3, 8});
  fill(one.view(), 0.25f);
  bank.append(one, one);  // one pending token, still no chunk
  Tensor<float, Host> queries({5, 3, 8});
  fill(queries.view(), 1.0f);
  ExactChunkRetriever retriever;
  Retrieved<float, Host> out;
  poison(out, 5, 3, 4, 2, 8);
  retriever.retrieve(bank, cview(queries), 4, out);
  REQUIRE(out.chunks == 0);
  REQUIRE(out.slots.shape() == Shape{5, 3, 0});
  REQUIRE(out.scores.shape() == Shape{5, 3, 0});
  REQUIRE(out.keys.shape() == Shape{5, 3, 0, 8});
  REQUIRE(out.values.shape() == Shape{5, 3, 0, 8});
  // And no queries at all.
  HostMemoryBank<float> full = [&] {
    std::mt19937_64 rng(3);
    return make_bank<float>(rng, g, 4, 0);
  }();
  Tensor<float, Host> none({0, 3, 8});
  retriever.retrieve(full, none, 2, out);  // an owning tensor: the convenience overload
  REQUIRE(out.chunks == 2);
  REQUIRE(out.slots.shape() == Shape{0, 3, 2});
  REQUIRE(out.keys.shape() == Shape{0, 3, 4, 8});
}

TEST_CASE("retriever: NaN scores rank last, as -infinity", "[retriever]") {
  const std::uint64_t seed = 404;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const MemoryGeometry g{1, 4, 2, 9};
  const HostMemoryBank<float> bank = make_bank<float>(rng, g, 9 + 4, 0);
  Tensor<float, Host> queries = random_tensor<float>(rng, {2, 1, 4});
  queries(1, 0, 2) = std::numeric_limits<float>::quiet_NaN();  // every score of query 1 is NaN
  ExactChunkRetriever retriever(ExactRetrieverTuning{4, 1});
  Retrieved<float, Host> out;
  poison(out, 2, 1, 5, 2, 4);
  retriever.retrieve(bank, cview(queries), 5, out);
  check_retrieval(bank, cview(queries), 5, out);
  for (int i = 0; i < 5; ++i) {
    REQUIRE(out.scores(1, 0, i) == -std::numeric_limits<float>::infinity());
    REQUIRE(bank.chunk_sequence(out.slots(1, 0, i)) == bank.chunks_appended() - 9 + i);  // the oldest five
  }
}

TEST_CASE("retriever: scratch reuse across calls of different sizes gives identical results", "[retriever]") {
  const std::uint64_t seed = 12345;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const MemoryGeometry g{4, 16, 2, 200};
  const HostMemoryBank<float> big = make_bank<float>(rng, g, 450, 1);
  const HostMemoryBank<float> small = make_bank<float>(rng, g, 7, 0);
  const Tensor<float, Host> q_big = random_tensor<float>(rng, {40, 4, 16});
  const Tensor<float, Host> q_small = random_tensor<float>(rng, {3, 4, 16});
  ExactChunkRetriever reused;
  Retrieved<float, Host> a, b;
  reused.retrieve(big, cview(q_big), 16, a);
  reused.retrieve(small, cview(q_small), 5, a);
  poison(a, 40, 4, 3, 2, 16);
  reused.retrieve(big, cview(q_big), 3, a);
  ExactChunkRetriever fresh;
  fresh.retrieve(big, cview(q_big), 3, b);
  REQUIRE(a.chunks == b.chunks);
  REQUIRE(std::equal(a.slots.begin(), a.slots.end(), b.slots.begin(), b.slots.end()));
  REQUIRE(std::equal(a.scores.begin(), a.scores.end(), b.scores.begin(), b.scores.end()));
  REQUIRE(std::equal(a.keys.begin(), a.keys.end(), b.keys.begin(), b.keys.end()));
  check_retrieval(big, cview(q_big), 3, a);

  // select() gives the same slots and scores without the gather.
  Tensor<std::int32_t, Host> slots;
  Tensor<float, Host> scores;
  REQUIRE(reused.select(big, cview(q_big), 3, slots, scores) == 3);
  REQUIRE(std::equal(slots.begin(), slots.end(), b.slots.begin(), b.slots.end()));
  REQUIRE(std::equal(scores.begin(), scores.end(), b.scores.begin(), b.scores.end()));
}

TEST_CASE("retriever: bad arguments are refused", "[retriever]") {
  const MemoryGeometry g{2, 4, 2, 5};
  std::mt19937_64 rng(1);
  const HostMemoryBank<float> bank = make_bank<float>(rng, g, 3, 0);
  ExactChunkRetriever retriever;
  Retrieved<float, Host> out;
  Tensor<float, Host> q({3, 2, 4});
  fill(q.view(), 1.0f);
  REQUIRE_THROWS_AS(retriever.retrieve(bank, cview(q), 0, out), ConfigError);
  REQUIRE_THROWS_AS(retriever.retrieve(bank, cview(q), -2, out), ConfigError);
  Tensor<float, Host> wrong_h({3, 3, 4}), wrong_dh({3, 2, 5}), rank2({3, 8});
  REQUIRE_THROWS_AS(retriever.retrieve(bank, cview(wrong_h), 2, out), ShapeError);
  REQUIRE_THROWS_AS(retriever.retrieve(bank, cview(wrong_dh), 2, out), ShapeError);
  REQUIRE_THROWS_AS(retriever.retrieve(bank, cview(rank2), 2, out), ShapeError);
  REQUIRE_THROWS_WITH(retriever.retrieve(bank, cview(wrong_dh), 2, out),
                      Catch::Contains("queries") && Catch::Contains("(3, 2, 5)"));
  REQUIRE_THROWS_AS(ExactChunkRetriever(ExactRetrieverTuning{0, 4}), ConfigError);
  REQUIRE_THROWS_AS(ExactChunkRetriever(ExactRetrieverTuning{4, -1}), ConfigError);
  STATIC_REQUIRE(ChunkRetrieverFor<ExactChunkRetriever, HostMemoryBank<float>>);
  STATIC_REQUIRE(ChunkRetrieverFor<ExactChunkRetriever, HostMemoryBank<bfloat16>>);
}

TEST_CASE("retriever: results do not depend on the thread count", "[retriever]") {
  const std::uint64_t seed = 777;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const MemoryGeometry g{3, 32, 2, 900};
  const HostMemoryBank<half> bank = make_bank<half>(rng, g, 900 + 401, 1);  // 3*30*900*32 MACs: runs in parallel
  const Tensor<float, Host> queries = random_tensor<float>(rng, {30, 3, 32});
  ExactChunkRetriever retriever(ExactRetrieverTuning{64, 4});
  Retrieved<float, Host> one, many;
#if defined(_OPENMP)
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  retriever.retrieve(bank, cview(queries), 16, one);
  omp_set_num_threads(3);
  poison(many, 30, 3, 16, 2, 32);
  retriever.retrieve(bank, cview(queries), 16, many);
  omp_set_num_threads(saved);
#else
  retriever.retrieve(bank, cview(queries), 16, one);
  poison(many, 30, 3, 16, 2, 32);
  retriever.retrieve(bank, cview(queries), 16, many);
#endif
  REQUIRE(std::equal(one.slots.begin(), one.slots.end(), many.slots.begin(), many.slots.end()));
  REQUIRE(std::equal(one.scores.begin(), one.scores.end(), many.scores.begin(), many.scores.end()));
  REQUIRE(std::equal(one.keys.begin(), one.keys.end(), many.keys.begin(), many.keys.end()));
  REQUIRE(std::equal(one.values.begin(), one.values.end(), many.values.begin(), many.values.end()));
  check_retrieval(bank, cview(queries), 16, many);
}

TEST_CASE("retriever: banks_for_stacked_retrieval takes all banks only when they give one k'", "[retriever]") {
  std::mt19937_64 rng(4242);
  const MemoryGeometry g{2, 4, 4, 8};  // capacity 8 chunks
  const auto banks_of = [&](std::initializer_list<index_t> chunks) {
    std::vector<HostMemoryBank<float>> banks;
    for (index_t c : chunks) banks.push_back(make_bank<float>(rng, g, c, 1));
    return banks;
  };
  const auto served = [](const std::vector<HostMemoryBank<float>>& banks, int k) {
    const auto picked = banks_for_stacked_retrieval(std::span<const HostMemoryBank<float>>(banks), k);
    if (picked.empty()) return false;
    REQUIRE(picked.size() == banks.size());
    for (std::size_t b = 0; b < banks.size(); ++b) REQUIRE(picked[b] == &banks[b]);
    return true;
  };
  CHECK(served(banks_of({3, 3, 3}), 4));      // k' = 3 for all
  CHECK(served(banks_of({5, 7, 8}), 4));      // different counts, all at least k: k' = 4 for all
  CHECK(served(banks_of({20, 2}), 2));        // a wrapped ring (8 held) and 2 chunks: k' = 2
  CHECK(served(banks_of({6}), 64));           // one bank: k' = 6
  CHECK_FALSE(served(banks_of({3, 4}), 4));   // k' 3 and 4
  CHECK_FALSE(served(banks_of({0, 0}), 4));   // empty banks: nothing to retrieve
  CHECK_FALSE(served(banks_of({5, 0, 5}), 4));  // one empty bank
  CHECK_FALSE(served({}, 4));                 // no banks
}
