// Tests of <longmem/cuda/device_memory_bank.cuh> and <longmem/cuda/chunk_retriever.cuh>.
//   Always: refused geometries (ConfigError before any CUDA call).
//   Without a device: a valid bank must be refused with a BackendError; then exit 77 (skipped).
//   With a device:
//     1. DeviceMemoryBank<S> against HostMemoryBank after random append sequences (empty, single,
//        odd and longer-than-capacity segments; partial chunks; full and wrapped rings; reset):
//        counters, chunk_sequence/position of every slot, chunk keys bit for bit, stored keys and
//        values bit for bit for float and within one unit of rounding for __half / __nv_bfloat16.
//     2. FusedChunkRetriever against the float64 brute force (reference/retrieval.hpp) and the CPU
//        ExactChunkRetriever on a HostMemoryBank fed the same data: order-free and tie-aware at
//        odd sizes (1 chunk, fewer chunks than k, memories not a multiple of the 64-chunk tile,
//        full and wrapped rings, k = 1, T beyond the 128-query tile), forced chunk splits, outputs
//        NaN-poisoned before each run.
//     3. Exact ties (small integer keys, duplicated chunk keys, wrapped rings, ties across splits):
//        slots and scores must equal the reference's exactly, tie rule included.
//     3b. The running-threshold filter on adversarial scores (all equal, rising, falling, two
//        levels, plateaus; wrapped rings): exact against the float64 reference with the filter on
//        and off; and the two paths bit for bit on random data.
//     4. The batched entry point equals one retrieval per bank, bit for bit.
//     4b. bf16 and fp16 queries (16-bit models'): the slots and scores of the same values as float
//        queries, bit for bit, and the float gather's keys/values rounded to the queries' type
//        (retrieve and retrieve_stacked).
//     5. NaN queries, an empty bank, no queries, a bank on its own non-blocking stream.
//     6. Bad inputs give the library's exceptions.
// LONGMEM_TEST_ONLY=name,name runs only those parts (banks, random, ties, threshold, paths, batched, bf16, fp16,
// stacked, edges, refusals): compute-sanitizer's racecheck is too slow for the whole file.
//
// Tolerances. Scores: the GPU sums dh fp32 FMAs in order, the CPU in Eigen's order; both are within
// gamma_dh * sum_d |q_d ck_d| (gamma_dh = dh u / (1 - dh u), u = 2^-24) of the float64 score, so a
// chosen chunk may differ from the reference's only where their float64 scores are within twice
// that of each other. Storage: float and chunk keys bit for bit; __half within 2^-10 relative
// (+2^-24 absolute) of the host's half, __nv_bfloat16 within 2^-7 relative: one unit in the last
// place (both round to nearest even, so we expect and report zero differing bits).
// The CPU retriever's Eigen is host code here: without this, nvcc compiles Eigen's device paths
// and warns about them.
#define EIGEN_NO_CUDA 1
#include <longmem/cpu/exact_chunk_retriever.hpp>
#include <longmem/cpu/host_memory_bank.hpp>
#include <longmem/cuda/chunk_retriever.cuh>
#include <longmem/cuda/device_memory_bank.cuh>
#include <longmem/cuda/storage.hpp>
#include <longmem/reference/retrieval.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using namespace longmem;

int failures = 0;
int checks = 0;

#define CHECK(cond, ...)                                             \
  do {                                                               \
    ++checks;                                                        \
    if (!(cond)) {                                                   \
      ++failures;                                                    \
      if (failures <= 200) {                                         \
        std::printf("FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                                    \
        std::printf("\n");                                           \
      }                                                              \
    }                                                                \
  } while (0)

template <class E, class F>
bool throws_with(F&& f, const std::string& needle, std::string* message = nullptr) {
  try {
    f();
  } catch (const E& e) {
    if (message) *message = e.what();
    return std::string(e.what()).find(needle) != std::string::npos;
  } catch (const std::exception& e) {
    if (message) *message = std::string("wrong exception type: ") + e.what();
    return false;
  }
  if (message) *message = "nothing thrown";
  return false;
}

// Waits for the device and reports an asynchronous kernel error (bad access, ...) with context.
bool device_ok(const std::string& what) {
  const cudaError_t err = cudaDeviceSynchronize();
  CHECK(err == cudaSuccess, "%s: %s (%s)", what.c_str(), cudaGetErrorString(err), cudaGetErrorName(err));
  return err == cudaSuccess;
}

template <class S>
struct HostTwin;
template <> struct HostTwin<float> { using type = float; static constexpr const char* name = "float"; };
template <> struct HostTwin<__half> { using type = longmem::half; static constexpr const char* name = "__half"; };
template <> struct HostTwin<__nv_bfloat16> { using type = longmem::bfloat16; static constexpr const char* name = "__nv_bfloat16"; };

// A device element (copied to the host as raw bytes) read as float, without CUDA's host conversions.
template <class S>
float device_value(const S& x) {
  if constexpr (std::is_same_v<S, float>) {
    return x;
  } else {
    std::uint16_t bits;
    std::memcpy(&bits, &x, 2);
    if constexpr (std::is_same_v<S, __half>) return to_float(longmem::half{bits});
    else return to_float(longmem::bfloat16{bits});
  }
}

template <class T>
Tensor<T, Host> to_host(TensorView<const T, Device> d) {
  Tensor<T, Host> h(d.shape());
  copy(d, h.view());
  return h;
}

Tensor<float, Device> to_device(const Tensor<float, Host>& h) {
  Tensor<float, Device> d(h.shape());
  copy(cview(h), d.view());
  return d;
}

Tensor<float, Host> random_tensor(std::mt19937_64& rng, Shape s) {
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  Tensor<float, Host> x(s);
  for (float& v : x) v = static_cast<float>(u(rng));
  return x;
}

// Same tokens into both banks.
template <class S>
void append_both(DeviceMemoryBank<S>& dev, HostMemoryBank<typename HostTwin<S>::type>& host, const Tensor<float, Host>& k,
                 const Tensor<float, Host>& v) {
  host.append(k, v);
  const Tensor<float, Device> kd = to_device(k), vd = to_device(v);
  dev.append(kd, vd);
}

// ---------------------------------------------------------------- 1. the bank

std::string geometry_str(const MemoryGeometry& g) {
  return detail::concat("H=", g.n_head, " dh=", g.head_dim, " csz=", g.chunk_size, " C=", g.capacity_chunks);
}

template <class S>
void compare_banks(const DeviceMemoryBank<S>& dev, const HostMemoryBank<typename HostTwin<S>::type>& host,
                   const std::string& ctx, std::int64_t& differing_bits) {
  const char* c = ctx.c_str();
  CHECK(dev.num_chunks() == host.num_chunks(), "%s: num_chunks %lld vs host %lld", c, (long long)dev.num_chunks(),
        (long long)host.num_chunks());
  CHECK(dev.size_tokens() == host.size_tokens(), "%s: size_tokens", c);
  CHECK(dev.pending_tokens() == host.pending_tokens(), "%s: pending_tokens %lld vs host %lld", c,
        (long long)dev.pending_tokens(), (long long)host.pending_tokens());
  CHECK(dev.capacity_tokens() == host.capacity_tokens(), "%s: capacity_tokens", c);
  CHECK(dev.chunks_appended() == host.chunks_appended(), "%s: chunks_appended %lld vs host %lld", c,
        (long long)dev.chunks_appended(), (long long)host.chunks_appended());
  CHECK(dev.tokens_appended() == host.tokens_appended(), "%s: tokens_appended", c);
  CHECK(dev.bytes_used() == host.bytes_used(), "%s: bytes_used %zu vs host %zu", c, dev.bytes_used(), host.bytes_used());
  CHECK(dev.oldest_slot() == host.oldest_slot(), "%s: oldest_slot", c);
  const index_t n = host.num_chunks();
  if (dev.num_chunks() != n) return;
  for (index_t s = 0; s < n; ++s) {
    CHECK(dev.chunk_sequence(s) == host.chunk_sequence(s), "%s: chunk_sequence(%lld)", c, (long long)s);
    CHECK(dev.chunk_position(s) == host.chunk_position(s), "%s: chunk_position(%lld)", c, (long long)s);
  }
  if (!device_ok(ctx + ": append kernels")) return;
  const MemoryGeometry g = host.geometry();
  const index_t H = g.n_head, C = g.capacity_chunks, csz = g.chunk_size, dh = g.head_dim;
  const Tensor<float, Host> ck = to_host(dev.chunk_keys());
  const Tensor<S, Host> keys = to_host(dev.keys()), values = to_host(dev.values());
  const auto hck = host.chunk_keys();
  const auto hk = host.keys(), hv = host.values();
  std::int64_t bad_ck = 0, bad_kv = 0;
  for (index_t h = 0; h < H; ++h) {
    for (index_t s = 0; s < n; ++s) {
      for (index_t d = 0; d < dh; ++d) {
        const float a = ck.data()[(h * C + s) * dh + d], b = hck(h, s, d);
        bad_ck += std::memcmp(&a, &b, sizeof a) != 0;
      }
      for (index_t e = 0; e < csz * dh; ++e) {
        const index_t i = (h * C + s) * csz * dh + e;
        for (int which = 0; which < 2; ++which) {
          const S& dv = which ? values.data()[i] : keys.data()[i];
          const auto& hv_ = which ? hv.data()[i] : hk.data()[i];
          const float x = device_value(dv);
          const float y = static_cast<float>(reference::widen(hv_));
          if constexpr (std::is_same_v<S, float>) {
            bad_kv += std::memcmp(&x, &y, sizeof x) != 0;
          } else {
            std::uint16_t db, hb;
            std::memcpy(&db, &dv, 2);
            std::memcpy(&hb, &hv_, 2);
            differing_bits += db != hb;
            const double rel = std::is_same_v<S, __half> ? 0x1p-10 : 0x1p-7;
            const double tol = rel * std::abs(static_cast<double>(y)) + (std::is_same_v<S, __half> ? 0x1p-24 : 0.0);
            bad_kv += !(std::abs(static_cast<double>(x) - static_cast<double>(y)) <= tol);
          }
        }
      }
    }
  }
  CHECK(bad_ck == 0, "%s: %lld chunk-key elements differ from the host bank's (bit for bit expected)", c, (long long)bad_ck);
  CHECK(bad_kv == 0, "%s: %lld stored key/value elements differ from the host bank's beyond the %s tolerance", c,
        (long long)bad_kv, HostTwin<S>::name);
}

index_t random_segment(std::mt19937_64& rng, const MemoryGeometry& g) {
  const index_t cap = g.capacity_tokens();
  const index_t choices[] = {0, 1, 2, 3, 7, g.chunk_size, g.chunk_size + 1, cap - 1, cap, cap + 1, 2 * cap + 3,
                             5 * cap + g.chunk_size - 1};
  std::uniform_int_distribution<std::size_t> pick(0, std::size(choices) - 1);
  return std::max<index_t>(0, choices[pick(rng)]);
}

template <class S>
void test_bank_streams() {
  std::int64_t differing_bits = 0;
  int cases = 0;
  for (int csz : {1, 2, 3, 4}) {
    for (index_t capacity : {index_t{1}, index_t{5}, index_t{13}}) {
      for (int n_head : {1, 3}) {
        for (int head_dim : {1, 8, 33}) {
          const MemoryGeometry g{n_head, head_dim, csz, capacity};
          const std::uint64_t seed = 1000u + static_cast<std::uint64_t>(csz * 7919 + capacity * 131 + n_head * 17 + head_dim);
          std::mt19937_64 rng(seed);
          DeviceMemoryBank<S> dev(g);
          HostMemoryBank<typename HostTwin<S>::type> host(g);
          compare_banks(dev, host, detail::concat(HostTwin<S>::name, " ", geometry_str(g), " seed ", seed, " fresh"),
                        differing_bits);
          for (int step = 0; step < 20; ++step) {
            const index_t T = random_segment(rng, g);
            const std::string ctx =
                detail::concat(HostTwin<S>::name, " ", geometry_str(g), " seed ", seed, " step ", step, " T=", T);
            if (step == 13) {  // a reset mid-stream, possibly with a pending chunk
              dev.reset();
              host.reset();
              compare_banks(dev, host, ctx + " after reset", differing_bits);
            }
            const Tensor<float, Host> k = random_tensor(rng, {T, n_head, head_dim});
            const Tensor<float, Host> v = random_tensor(rng, {T, n_head, head_dim});
            append_both(dev, host, k, v);
            compare_banks(dev, host, ctx, differing_bits);
          }
          ++cases;
        }
      }
    }
  }
  std::printf("bank %s: %d geometries x 20 random appends compared with HostMemoryBank; %lld 16-bit elements with "
              "differing bits (expected 0)\n",
              HostTwin<S>::name, cases, static_cast<long long>(differing_bits));
}

// ---------------------------------------------------------------- 2. the retriever

template <class S>
struct Banks {
  std::unique_ptr<DeviceMemoryBank<S>> dev;
  std::unique_ptr<HostMemoryBank<typename HostTwin<S>::type>> host;
};

// Both banks with `chunks` completed chunks (random segment lengths) and `pending` extra tokens.
template <class S>
Banks<S> make_banks(std::mt19937_64& rng, MemoryGeometry g, index_t chunks, index_t pending, cudaStream_t stream = nullptr) {
  Banks<S> b{std::make_unique<DeviceMemoryBank<S>>(g, stream),
             std::make_unique<HostMemoryBank<typename HostTwin<S>::type>>(g)};
  index_t left = chunks * g.chunk_size + pending;
  std::uniform_int_distribution<index_t> seg(0, 3 * g.chunk_size + 70);
  while (left > 0) {
    const index_t n = std::min(left, seg(rng));
    append_both(*b.dev, *b.host, random_tensor(rng, {n, g.n_head, g.head_dim}), random_tensor(rng, {n, g.n_head, g.head_dim}));
    left -= n;
  }
  return b;
}

void poison(Retrieved<float, Device>& out, index_t Tq, index_t H, index_t kk, index_t csz, index_t dh) {
  out.slots.resize({Tq, H, kk});
  out.scores.resize({Tq, H, kk});
  out.keys.resize({Tq, H, kk * csz, dh});
  out.values.resize({Tq, H, kk * csz, dh});
  fill(out.slots.view(), std::int32_t{-7});
  fill(out.scores.view(), std::numeric_limits<float>::quiet_NaN());
  fill(out.keys.view(), std::numeric_limits<float>::quiet_NaN());
  fill(out.values.view(), std::numeric_limits<float>::quiet_NaN());
  out.chunks = -1;
}

struct HostResult {
  int chunks = 0;
  Tensor<std::int32_t, Host> slots;
  Tensor<float, Host> scores, keys, values;
};

HostResult fetch(const Retrieved<float, Device>& out) {
  HostResult r;
  r.chunks = out.chunks;
  r.slots = to_host(cview(out.slots));
  r.scores = to_host(cview(out.scores));
  r.keys = to_host(cview(out.keys));
  r.values = to_host(cview(out.values));
  return r;
}

// Retrieval of `queries` from the device bank against the float64 brute force over the host bank
// (whose chunk keys are bit for bit the device's, checked in part 1) and against the CPU retriever.
template <class S>
void check_retrieval(const DeviceMemoryBank<S>& dev, const HostMemoryBank<typename HostTwin<S>::type>& host,
                     const Tensor<float, Host>& queries, int k, const HostResult& out, const std::string& ctx,
                     std::int64_t& cpu_position_diffs) {
  const char* c = ctx.c_str();
  const MemoryGeometry g = host.geometry();
  const index_t Tq = queries.dim(0), H = g.n_head, csz = g.chunk_size, dh = g.head_dim;
  const index_t n = host.num_chunks(), kk = std::min<index_t>(k, n);
  CHECK(out.chunks == kk, "%s: chunks %d, expected k' = %lld", c, out.chunks, (long long)kk);
  CHECK(out.slots.shape() == (Shape{Tq, H, kk}), "%s: slots shape %s", c, out.slots.shape().str().c_str());
  CHECK(out.scores.shape() == (Shape{Tq, H, kk}), "%s: scores shape %s", c, out.scores.shape().str().c_str());
  CHECK(out.keys.shape() == (Shape{Tq, H, kk * csz, dh}), "%s: keys shape %s", c, out.keys.shape().str().c_str());
  CHECK(out.values.shape() == (Shape{Tq, H, kk * csz, dh}), "%s: values shape %s", c, out.values.shape().str().c_str());
  if (out.chunks != kk || kk == 0 || Tq == 0) return;

  ExactChunkRetriever cpu;
  Retrieved<float, Host> cpu_out;
  cpu.retrieve(host, cview(queries), k, cpu_out);

  const Tensor<S, Host> bk = to_host(dev.keys()), bv = to_host(dev.values());  // (H, C, csz, dh)
  const auto ck = host.chunk_keys();                                                  // (H, C, dh)
  const double gamma = dh * 0x1p-24 / (1.0 - dh * 0x1p-24);
  int reported = 0;
  for (index_t t = 0; t < Tq; ++t) {
    for (index_t h = 0; h < H; ++h) {
      const std::vector<reference::ScoredChunk> ranked = reference::rank_chunks(host, cview(queries), t, static_cast<int>(h));
      std::vector<double> ref_score(static_cast<std::size_t>(n));
      double tol = 1e-30;
      for (const auto& r : ranked) {
        ref_score[static_cast<std::size_t>(r.slot)] = r.score;
        double mag = 0;
        for (index_t d = 0; d < dh; ++d) mag += std::abs(static_cast<double>(queries(t, h, d)) * ck(h, r.slot, d));
        if (std::isfinite(mag)) tol = std::max(tol, 1.01 * gamma * mag);
      }
      std::set<std::int32_t> seen;
      bool ok = true;
      for (index_t i = 0; i < kk && ok; ++i) {
        const std::int32_t slot = out.slots(t, h, i);
        const float score = out.scores(t, h, i);
        auto fail_here = [&](const char* why) {
          ok = false;
          if (reported++ < 5) {
            std::printf("  %s: t=%lld h=%lld position %lld: slot %d score %.9g: %s (reference #%lld: slot %d score %.9g, "
                        "tol %.3g)\n",
                        c, (long long)t, (long long)h, (long long)i, slot, score, why, (long long)i,
                        ranked[static_cast<std::size_t>(i)].slot, ranked[static_cast<std::size_t>(i)].score, tol);
          }
        };
        if (slot < 0 || slot >= n) { fail_here("not a stored slot"); break; }
        if (!seen.insert(slot).second) { fail_here("slot chosen twice"); break; }
        const double ref = ref_score[static_cast<std::size_t>(slot)];
        const double ref_i = ranked[static_cast<std::size_t>(i)].score;
        if (std::isinf(ref) ? !(static_cast<double>(score) == ref) : !(std::abs(score - ref) <= tol)) {
          fail_here("reported score is not that slot's score");
        }
        if (std::isinf(ref_i) ? !(ref == ref_i) : !(std::abs(ref - ref_i) <= 2 * tol)) {
          fail_here("not the reference's i-th best, even allowing near-ties");
        }
        if (i > 0) {
          const float prev = out.scores(t, h, i - 1);
          if (!(prev >= score)) fail_here("scores not best first");
          if (prev == score && !(host.chunk_sequence(out.slots(t, h, i - 1)) < host.chunk_sequence(slot))) {
            fail_here("equal scores not older chunk first");
          }
        }
        // Against the CPU retriever: the same slot at each position unless the two are a near-tie.
        if (cpu_out.slots(t, h, i) != slot) {
          ++cpu_position_diffs;
          if (!(std::abs(static_cast<double>(cpu_out.scores(t, h, i)) - score) <= 2 * tol)) {
            fail_here("differs from ExactChunkRetriever beyond a near-tie");
          }
        }
        // Gathered tokens: exactly the bank's stored ones as float (NaN poison never compares equal).
        const index_t C = g.capacity_chunks;
        index_t wrong = 0;
        for (index_t e = 0; e < csz * dh; ++e) {
          const index_t src = (h * C + slot) * csz * dh + e;
          const index_t dst = ((t * H + h) * kk + i) * csz * dh + e;
          wrong += !(out.keys.data()[dst] == device_value(bk.data()[src]));
          wrong += !(out.values.data()[dst] == device_value(bv.data()[src]));
        }
        if (wrong) fail_here("gathered keys/values differ from the bank's");
      }
      // Order-free: everything clearly better than the k'-th reference score was chosen.
      if (ok) {
        const double kth = ranked[static_cast<std::size_t>(kk - 1)].score;
        for (const auto& r : ranked) {
          if (std::isfinite(kth) && r.score > kth + 2 * tol && !seen.count(r.slot)) {
            ok = false;
            if (reported++ < 5) {
              std::printf("  %s: t=%lld h=%lld: slot %d (score %.9g) beats the k'-th (%.9g) but was not chosen\n", c,
                          (long long)t, (long long)h, r.slot, r.score, kth);
            }
            break;
          }
        }
      }
      CHECK(ok, "%s: query %lld head %lld (details above)", c, (long long)t, (long long)h);
    }
  }
}

struct RetrievalCase {
  int n_head, head_dim, chunk_size;
  index_t capacity, stored, pending;
};

template <class S>
void test_retriever_random() {
  const RetrievalCase cases[] = {
      {1, 1, 1, 1, 1, 0},                 // one chunk, dh 1
      {2, 8, 2, 10, 3, 1},                // fewer chunks than most k
      {3, 16, 4, 23, 10, 3},              // partial ring
      {4, 64, 4, 200, 200, 0},            // exactly full, not a multiple of the 64-chunk tile
      {2, 64, 4, 1500, 1500 + 733, 3},    // wrapped mid-tile
      {1, 7, 3, 65, 65 * 3 + 2, 2},       // odd dh, 65 chunks (one past a tile), wrapped
      {2, 96, 2, 129, 129, 0},            // dh 96
      {16, 64, 4, 4096, 2 * 4096 + 17, 1},  // the paper's heads, wrapped
  };
  std::int64_t cpu_diffs = 0;
  int runs = 0;
  for (const RetrievalCase& rc : cases) {
    const MemoryGeometry g{rc.n_head, rc.head_dim, rc.chunk_size, rc.capacity};
    const std::uint64_t seed = 777u + static_cast<std::uint64_t>(rc.capacity * 31 + rc.head_dim * 7 + rc.stored);
    std::mt19937_64 rng(seed);
    const Banks<S> b = make_banks<S>(rng, g, rc.stored, rc.pending);
    for (index_t Tq : {index_t{1}, index_t{33}, index_t{129}}) {
      if (rc.n_head == 16 && Tq == 129) continue;  // keeps the float64 reference quick
      const Tensor<float, Host> q = random_tensor(rng, {Tq, rc.n_head, rc.head_dim});
      const Tensor<float, Device> qd = to_device(q);
      for (int splits : {0, 1, 3, 7}) {
        FusedChunkRetriever retriever(FusedRetrieverTuning{splits});
        for (int k : {1, 3, 16, 40, 128}) {
          const std::string ctx = detail::concat(HostTwin<S>::name, " ", geometry_str(g), " stored ", rc.stored, " seed ",
                                                 seed, " T=", Tq, " k=", k, " splits=", splits);
          Retrieved<float, Device> out;
          const index_t kk = std::min<index_t>(k, b.dev->num_chunks());
          poison(out, Tq, rc.n_head, kk, rc.chunk_size, rc.head_dim);
          try {
            retriever.retrieve(*b.dev, qd, k, out);
          } catch (const std::exception& e) {
            CHECK(false, "%s: threw %s", ctx.c_str(), e.what());
            continue;
          }
          if (!device_ok(ctx + ": retrieval kernels")) continue;
          check_retrieval(*b.dev, *b.host, q, k, fetch(out), ctx, cpu_diffs);
          ++runs;
        }
      }
    }
  }
  std::printf("retriever %s: %d random retrievals checked against float64 brute force and ExactChunkRetriever "
              "(%lld positions differ from the CPU's, all near-ties)\n",
              HostTwin<S>::name, runs, static_cast<long long>(cpu_diffs));
}

// ---------------------------------------------------------------- 3. exact ties

void test_exact_ties() {
  int runs = 0;
  for (int csz : {1, 2, 4}) {
    for (index_t C : {index_t{19}, index_t{300}}) {
      for (int dh : {8, 64}) {
        const std::uint64_t seed = 5150u + static_cast<std::uint64_t>(csz * 100 + C + dh);
        std::mt19937_64 rng(seed);
        const int H = 2;
        const MemoryGeometry g{H, dh, csz, C};
        DeviceMemoryBank<float> dev(g);
        HostMemoryBank<float> host(g);
        std::uniform_int_distribution<int> small(-3, 3);
        std::uniform_int_distribution<int> pattern(0, 3);  // four distinct chunk keys per head
        std::vector<std::vector<float>> patterns(4, std::vector<float>(static_cast<std::size_t>(H * dh)));
        for (auto& p : patterns) {
          for (float& x : p) x = static_cast<float>(small(rng));
        }
        const index_t chunks = 3 * C + 5;  // wrapped: slot order is not age order
        Tensor<float, Host> k({chunks * csz, H, dh});
        for (index_t cidx = 0; cidx < chunks; ++cidx) {
          const std::vector<float>& p = patterns[static_cast<std::size_t>(pattern(rng))];
          for (index_t j = 0; j < csz; ++j) std::copy(p.begin(), p.end(), k.data() + (cidx * csz + j) * H * dh);
        }
        // In uneven pieces, so the pending path is part of it.
        for (index_t t0 = 0; t0 < chunks * csz;) {
          const index_t len = std::min<index_t>(chunks * csz - t0, 1 + (t0 * 7) % 97);
          Tensor<float, Host> piece({len, H, dh});
          std::copy_n(k.data() + t0 * H * dh, len * H * dh, piece.data());
          append_both(dev, host, piece, piece);
          t0 += len;
        }
        Tensor<float, Host> queries({5, H, dh});
        for (float& x : queries) x = static_cast<float>(small(rng));
        const Tensor<float, Device> qd = to_device(queries);
        for (int splits : {1, 3, 7}) {
          FusedChunkRetriever retriever(FusedRetrieverTuning{splits});
          for (int kq : {1, 4, 7, 19}) {
            const std::string ctx =
                detail::concat("ties ", geometry_str(g), " seed ", seed, " k=", kq, " splits=", splits);
            Retrieved<float, Device> out;
            poison(out, 5, H, std::min<index_t>(kq, dev.num_chunks()), csz, dh);
            retriever.retrieve(dev, qd, kq, out);
            if (!device_ok(ctx)) continue;
            const HostResult r = fetch(out);
            const reference::RetrievedF64 ref = reference::retrieve(host, cview(queries), kq);
            ExactChunkRetriever cpu;
            Retrieved<float, Host> cpu_out;
            cpu.retrieve(host, cview(queries), kq, cpu_out);
            CHECK(r.chunks == ref.chunks, "%s: chunks %d vs %d", ctx.c_str(), r.chunks, ref.chunks);
            if (r.chunks != ref.chunks) continue;
            std::size_t bad_slots = 0, bad_scores = 0, bad_cpu = 0, bad_kv = 0, first_bad = ref.slots.size();
            for (std::size_t i = 0; i < ref.slots.size(); ++i) {
              const bool slot_bad = r.slots.data()[i] != ref.slots[i];
              bad_slots += slot_bad;
              if (slot_bad && first_bad == ref.slots.size()) first_bad = i;
              bad_scores += static_cast<double>(r.scores.data()[i]) != ref.scores[i];
              bad_cpu += r.slots.data()[i] != cpu_out.slots.data()[i];
            }
            for (std::size_t i = 0; i < ref.keys.size(); ++i) {
              bad_kv += static_cast<double>(r.keys.data()[i]) != ref.keys[i];
              bad_kv += static_cast<double>(r.values.data()[i]) != ref.values[i];
            }
            CHECK(bad_slots == 0, "%s: %zu slots differ from the exact reference (first at flat index %zu: %d, expected %d)",
                  ctx.c_str(), bad_slots, first_bad, first_bad < ref.slots.size() ? r.slots.data()[first_bad] : 0,
                  first_bad < ref.slots.size() ? ref.slots[first_bad] : 0);
            CHECK(bad_scores == 0, "%s: %zu scores differ from the exact reference", ctx.c_str(), bad_scores);
            CHECK(bad_cpu == 0, "%s: %zu slots differ from ExactChunkRetriever", ctx.c_str(), bad_cpu);
            CHECK(bad_kv == 0, "%s: %zu gathered elements differ", ctx.c_str(), bad_kv);
            ++runs;
          }
        }
      }
    }
  }
  std::printf("exact ties: %d retrievals equal the float64 reference and ExactChunkRetriever exactly\n", runs);
}

// ------------------------------------------- 3b. the running-threshold filter on adversarial scores
// Chunk keys chosen so that the per-row threshold sits on ties: every score equal, scores rising
// or falling with age (every tile improves on the last, or none does), two score levels with the
// k'-th and (k'+1)-th equal, and ties across tile and split borders on a wrapped ring. Small
// integers, so fp32 scores are exact and must equal the float64 reference bit for bit (slots by
// the tie rule). Both select paths (threshold_filter on and off) and several splits.
void test_threshold_filter() {
  int runs = 0;
  const char* names[] = {"all equal", "rising", "falling", "two levels", "plateaus"};
  for (int pattern = 0; pattern < 5; ++pattern) {
    for (int csz : {1, 4}) {
      for (int dh : {8, 64}) {
        const int H = 2;
        const index_t C = pattern == 0 ? 300 : 1000;
        const MemoryGeometry g{H, dh, csz, C};
        DeviceMemoryBank<float> dev(g);
        HostMemoryBank<float> host(g);
        // Wrapped with the oldest slot two thirds in: the scan (slot order) meets the newest chunks
        // first, so equal-scored older chunks arrive later and must still displace them.
        const index_t chunks = 2 * C + (2 * C) / 3 + 1;
        Tensor<float, Host> k({chunks * csz, H, dh});
        for (index_t seq = 0; seq < chunks; ++seq) {
          for (index_t j = 0; j < csz; ++j) {
            for (int h = 0; h < H; ++h) {
              for (int d = 0; d < dh; ++d) {
                float x = 0.0f;
                if (d == 0) {
                  switch (pattern) {
                    case 0: x = 1.0f; break;
                    case 1: x = static_cast<float>(seq % 251); break;
                    case 2: x = -static_cast<float>(seq % 251); break;
                    case 3: x = (seq % 97 == 5) ? 1.0f : 0.0f; break;
                    default: x = static_cast<float>((seq / 64) % 5); break;  // runs of 64 equal scores
                  }
                } else if (d == 1) {
                  x = static_cast<float>(h);  // head 1 adds a constant: same order, other values
                }
                k.data()[((seq * csz + j) * H + h) * dh + d] = x;
              }
            }
          }
        }
        for (index_t t0 = 0; t0 < chunks * csz;) {
          const index_t len = std::min<index_t>(chunks * csz - t0, 1 + (t0 * 13) % 301);
          Tensor<float, Host> piece({len, H, dh});
          std::copy_n(k.data() + t0 * H * dh, len * H * dh, piece.data());
          append_both(dev, host, piece, piece);
          t0 += len;
        }
        const index_t Tq = csz == 1 && dh == 8 ? 130 : 3;  // one case past the 128-query tile
        Tensor<float, Host> queries({Tq, H, dh});
        for (index_t t = 0; t < Tq; ++t) {
          for (int h = 0; h < H; ++h) {
            for (int d = 0; d < dh; ++d) {
              // Query 1 of every three is all zeros: every score is 0 (pure tie rule).
              queries.data()[(t * H + h) * dh + d] = t % 3 == 1 ? 0.0f : (d == 0 ? 1.0f + static_cast<float>(t % 2) : (d == 1 ? 1.0f : 0.0f));
            }
          }
        }
        const Tensor<float, Device> qd = to_device(queries);
        // 0: threshold filter, 1: none, 2: tensor-core prefilter (seeded cuts), 3: the same, cuts from -inf
        for (int mode = 0; mode < 4; ++mode) {
          const bool filter = mode != 1;
          for (int splits : {0, 1, 2, 5}) {
            FusedChunkRetriever retriever(FusedRetrieverTuning{splits, filter, mode >= 2, mode != 3});
            for (int kq : {1, 16, 17, 128}) {
              const std::string ctx = detail::concat("threshold ", names[pattern], " ", geometry_str(g), " T=", Tq,
                                                     " k=", kq, " splits=", splits, " mode=", mode);
              Retrieved<float, Device> out;
              poison(out, Tq, H, std::min<index_t>(kq, dev.num_chunks()), csz, dh);
              retriever.retrieve(dev, qd, kq, out);
              if (!device_ok(ctx)) continue;
              const HostResult r = fetch(out);
              const reference::RetrievedF64 ref = reference::retrieve(host, cview(queries), kq);
              CHECK(r.chunks == ref.chunks, "%s: chunks %d vs %d", ctx.c_str(), r.chunks, ref.chunks);
              if (r.chunks != ref.chunks) continue;
              std::size_t bad_slots = 0, bad_scores = 0, bad_kv = 0, first_bad = ref.slots.size();
              for (std::size_t i = 0; i < ref.slots.size(); ++i) {
                const bool slot_bad = r.slots.data()[i] != ref.slots[i];
                bad_slots += slot_bad;
                if (slot_bad && first_bad == ref.slots.size()) first_bad = i;
                bad_scores += static_cast<double>(r.scores.data()[i]) != ref.scores[i];
              }
              for (std::size_t i = 0; i < ref.keys.size(); ++i) {
                bad_kv += static_cast<double>(r.keys.data()[i]) != ref.keys[i];
                bad_kv += static_cast<double>(r.values.data()[i]) != ref.values[i];
              }
              CHECK(bad_slots == 0, "%s: %zu slots differ from the exact reference (first at flat index %zu: %d, expected %d)",
                    ctx.c_str(), bad_slots, first_bad, first_bad < ref.slots.size() ? r.slots.data()[first_bad] : 0,
                    first_bad < ref.slots.size() ? ref.slots[first_bad] : 0);
              CHECK(bad_scores == 0, "%s: %zu scores differ from the exact reference", ctx.c_str(), bad_scores);
              CHECK(bad_kv == 0, "%s: %zu gathered elements differ", ctx.c_str(), bad_kv);
              ++runs;
            }
          }
        }
      }
    }
  }
  std::printf("threshold filter: %d adversarial retrievals (ties at the threshold, monotone scores) equal the "
              "float64 reference exactly (threshold filter, none, tensor-core prefilter with and without seeded cuts)\n",
              runs);
}

// The three select paths (threshold filter, no filter, tensor-core prefilter) on random data: the
// same bits. Also data over a wide range of magnitudes (2^-40 .. 2^40 per element, exact zeros,
// subnormals), where the tensor-core error bound is the least comfortable.
void test_filter_paths_agree() {
  int runs = 0;
  const MemoryGeometry geometries[] = {{16, 64, 4, 4096}, {3, 33, 2, 777}, {2, 96, 1, 1000}, {2, 64, 2, 900}};
  for (std::size_t gi = 0; gi < std::size(geometries); ++gi) {
    const MemoryGeometry& g = geometries[gi];
    const bool wide = gi == 3;
    const std::uint64_t seed = 8080u + static_cast<std::uint64_t>(g.capacity_chunks + g.head_dim);
    std::mt19937_64 rng(seed);
    auto widen = [&](Tensor<float, Host> t) {
      std::uniform_int_distribution<int> ex(-40, 40), kind(0, 19);
      for (float& x : t) {
        const int k = kind(rng);
        x = k == 0 ? 0.0f : k == 1 ? x * 1e-39f : std::ldexp(x, ex(rng));
      }
      return t;
    };
    Banks<__half> b;
    if (wide) {
      b = Banks<__half>{std::make_unique<DeviceMemoryBank<__half>>(g), std::make_unique<HostMemoryBank<HostTwin<__half>::type>>(g)};
      for (int piece = 0; piece < 5; ++piece) {
        const index_t len = g.capacity_chunks * g.chunk_size / 2 + 3;
        append_both(*b.dev, *b.host, widen(random_tensor(rng, {len, g.n_head, g.head_dim})),
                    random_tensor(rng, {len, g.n_head, g.head_dim}));
      }
    } else {
      b = make_banks<__half>(rng, g, 2 * g.capacity_chunks + 5, 1);
    }
    for (index_t Tq : {index_t{1}, index_t{200}}) {
      Tensor<float, Host> q = random_tensor(rng, {Tq, g.n_head, g.head_dim});
      if (wide) q = widen(std::move(q));
      const Tensor<float, Device> qd = to_device(q);
      for (int kq : {1, 16, 100}) {
        FusedChunkRetriever on(FusedRetrieverTuning{0, true, false}), off(FusedRetrieverTuning{1, false, false}),
            tc(FusedRetrieverTuning{0, true, true}), tc_unseeded(FusedRetrieverTuning{0, true, true, false});
        Retrieved<float, Device> a, c, t, u;
        on.retrieve(*b.dev, qd, kq, a);
        off.retrieve(*b.dev, qd, kq, c);
        tc.retrieve(*b.dev, qd, kq, t);
        tc_unseeded.retrieve(*b.dev, qd, kq, u);
        const std::string ctx = detail::concat("select paths ", wide ? "(wide range) " : "", geometry_str(g), " T=", Tq,
                                               " k=", kq);
        if (!device_ok(ctx)) continue;
        const HostResult ra = fetch(a), rc = fetch(c), rt = fetch(t), ru = fetch(u);
        auto same = [](const HostResult& x, const HostResult& y) {
          return x.chunks == y.chunks && x.slots.numel() == y.slots.numel() &&
                 std::memcmp(x.slots.data(), y.slots.data(), x.slots.bytes()) == 0 &&
                 std::memcmp(x.scores.data(), y.scores.data(), x.scores.bytes()) == 0 &&
                 std::memcmp(x.keys.data(), y.keys.data(), x.keys.bytes()) == 0 &&
                 std::memcmp(x.values.data(), y.values.data(), x.values.bytes()) == 0;
        };
        CHECK(same(ra, rc), "%s: the filtered and unfiltered paths differ", ctx.c_str());
        CHECK(same(rt, rc), "%s: the tensor-core prefilter path differs from the unfiltered one", ctx.c_str());
        CHECK(same(ru, rc), "%s: the tensor-core prefilter without seeded cuts differs from the unfiltered one", ctx.c_str());
        ++runs;
      }
    }
  }
  std::printf("select paths: %d random retrievals identical with the threshold filter, without it and with the "
              "tensor-core prefilter\n",
              runs);
}

// ---------------------------------------------------------------- 4. batched

void test_batched() {
  const std::uint64_t seed = 4242;
  std::mt19937_64 rng(seed);
  const MemoryGeometry g{4, 32, 2, 300};
  // Different fills: empty, a few chunks, a full ring, a wrapped ring, pending only.
  const index_t fills[] = {0, 5, 300, 300 * 2 + 77, 0};
  const index_t pendings[] = {0, 1, 0, 1, 1};
  const index_t Ts[] = {9, 130, 1, 64, 3};
  std::vector<Banks<__half>> banks;
  std::vector<Tensor<float, Host>> q_host;
  std::vector<Tensor<float, Device>> q_dev;
  for (std::size_t b = 0; b < std::size(fills); ++b) {
    banks.push_back(make_banks<__half>(rng, g, fills[b], pendings[b]));
    q_host.push_back(random_tensor(rng, {Ts[b], g.n_head, g.head_dim}));
    q_dev.push_back(to_device(q_host.back()));
  }
  // Banks appear twice (the same bank retrieved with other queries is legal).
  const std::size_t order[] = {0, 1, 2, 3, 4, 3, 1};
  std::vector<const DeviceMemoryBank<__half>*> bank_ptrs;
  std::vector<TensorView<const float, Device>> qs;
  std::vector<Retrieved<float, Device>> outs(std::size(order));
  std::vector<Retrieved<float, Device>*> out_ptrs;
  for (std::size_t i = 0; i < std::size(order); ++i) {
    bank_ptrs.push_back(banks[order[i]].dev.get());
    qs.push_back(cview(q_dev[order[i]]));
    out_ptrs.push_back(&outs[i]);
  }
  FusedChunkRetriever retriever;
  for (int k : {1, 16, 64}) {
    for (std::size_t i = 0; i < std::size(order); ++i) {
      poison(outs[i], Ts[order[i]], g.n_head, std::min<index_t>(k, banks[order[i]].dev->num_chunks()), g.chunk_size,
             g.head_dim);
    }
    retriever.retrieve_batched(std::span<const DeviceMemoryBank<__half>* const>(bank_ptrs),
                               std::span<const TensorView<const float, Device>>(qs), k,
                               std::span<Retrieved<float, Device>* const>(out_ptrs));
    if (!device_ok(detail::concat("batched k=", k))) continue;
    std::int64_t cpu_diffs = 0;
    for (std::size_t i = 0; i < std::size(order); ++i) {
      const std::string ctx = detail::concat("batched seed ", seed, " k=", k, " entry ", i, " (bank ", order[i], ")");
      const HostResult batched = fetch(outs[i]);
      check_retrieval(*banks[order[i]].dev, *banks[order[i]].host, q_host[order[i]], k, batched, ctx, cpu_diffs);
      // The single-bank call (other splits: the selection is exact, so the bits must not change).
      Retrieved<float, Device> single;
      retriever.retrieve(*banks[order[i]].dev, qs[i], k, single);
      if (!device_ok(ctx + " single")) continue;
      const HostResult s = fetch(single);
      CHECK(s.chunks == batched.chunks, "%s: chunks differ from the single call", ctx.c_str());
      if (s.chunks != batched.chunks || s.slots.numel() != batched.slots.numel() || s.slots.numel() == 0) continue;
      CHECK(std::memcmp(s.slots.data(), batched.slots.data(), s.slots.bytes()) == 0, "%s: slots differ from the single call",
            ctx.c_str());
      CHECK(std::memcmp(s.scores.data(), batched.scores.data(), s.scores.bytes()) == 0,
            "%s: scores differ from the single call", ctx.c_str());
      CHECK(s.keys.numel() == batched.keys.numel() &&
                std::memcmp(s.keys.data(), batched.keys.data(), s.keys.bytes()) == 0 &&
                std::memcmp(s.values.data(), batched.values.data(), s.values.bytes()) == 0,
            "%s: gathered keys/values differ from the single call", ctx.c_str());
    }
  }
  std::printf("batched: %zu bank entries in one launch equal the single-bank calls\n", std::size(order));
}

/// retrieve_stacked: banks with the same k' and their queries stacked by rows (one of them with no
/// queries) give, row for row, the bits of one retrieve_batched per bank; banks whose k' differ
/// are refused before anything is written.
void test_stacked() {
  const std::uint64_t seed = 4343;
  std::mt19937_64 rng(seed);
  const MemoryGeometry g{4, 32, 2, 300};
  const index_t fills[] = {300, 300 * 2 + 77, 40, 300};  // k' = min(k, chunks): equal for k <= 40
  const index_t pendings[] = {0, 1, 1, 0};
  const index_t Ts[] = {9, 130, 0, 64};
  std::vector<Banks<float>> banks;
  std::vector<index_t> offsets{0};
  for (std::size_t b = 0; b < std::size(fills); ++b) {
    banks.push_back(make_banks<float>(rng, g, fills[b], pendings[b]));
    offsets.push_back(offsets.back() + Ts[b]);
  }
  const index_t N = offsets.back();
  const Tensor<float, Device> q = to_device(random_tensor(rng, {N, g.n_head, g.head_dim}));
  std::vector<const DeviceMemoryBank<float>*> ptrs;
  for (auto& b : banks) ptrs.push_back(b.dev.get());
  const std::span<const DeviceMemoryBank<float>* const> bank_span(ptrs);
  FusedChunkRetriever retriever;
  for (int k : {1, 16, 40}) {
    Retrieved<float, Device> stacked;
    poison(stacked, N, g.n_head, k, g.chunk_size, g.head_dim);
    retriever.retrieve_stacked(bank_span, cview(q), std::span<const index_t>(offsets), k, stacked);
    if (!device_ok(detail::concat("stacked k=", k))) continue;
    CHECK(stacked.chunks == k, "stacked k=%d: %d chunks", k, stacked.chunks);
    const HostResult all = fetch(stacked);
    for (std::size_t b = 0; b < banks.size(); ++b) {
      if (Ts[b] == 0) continue;
      Retrieved<float, Device> one;
      retriever.retrieve(*banks[b].dev, cview(q).slice(offsets[b], offsets[b + 1]), k, one);
      if (!device_ok(detail::concat("stacked k=", k, " bank ", b))) continue;
      const HostResult r = fetch(one);
      const index_t o = offsets[b], H = g.n_head, kk = k, tok = kk * g.chunk_size * g.head_dim;
      CHECK(std::memcmp(all.slots.data() + o * H * kk, r.slots.data(), r.slots.bytes()) == 0 &&
                std::memcmp(all.scores.data() + o * H * kk, r.scores.data(), r.scores.bytes()) == 0 &&
                std::memcmp(all.keys.data() + o * H * tok, r.keys.data(), r.keys.bytes()) == 0 &&
                std::memcmp(all.values.data() + o * H * tok, r.values.data(), r.values.bytes()) == 0,
            "stacked seed %llu k=%d bank %zu: rows differ from the bank's own retrieval",
            static_cast<unsigned long long>(seed), k, b);
    }
  }
  // k = 64: bank 2 holds 40 chunks, the others 64 or more: refused, the output untouched
  Retrieved<float, Device> untouched;
  untouched.chunks = -7;
  std::string msg;
  CHECK(throws_with<ConfigError>(
            [&] { retriever.retrieve_stacked(bank_span, cview(q), std::span<const index_t>(offsets), 64, untouched); },
            "bank 2 holds 40 chunks", &msg),
        "stacked with unequal k': '%s'", msg.c_str());
  CHECK(untouched.chunks == -7 && untouched.keys.numel() == 0, "a refused stacked retrieval wrote its output");
  const std::vector<index_t> short_offsets{0, 9, N};
  CHECK(throws_with<ShapeError>(
            [&] { retriever.retrieve_stacked(bank_span, cview(q), std::span<const index_t>(short_offsets), 8, untouched); },
            "rising row offsets", &msg),
        "stacked with 3 offsets for 4 banks: '%s'", msg.c_str());
  std::printf("stacked: %zu banks, queries stacked by rows, equal the single-bank retrievals bit for bit\n",
              banks.size());
}

// ---------------------------------------------------------------- 5. edge cases

/// A 16-bit model's retrieval (Q = bfloat16 or half queries and results, FusedChunkRetriever's
/// 16-bit overloads) on banks of storage S: the same queries as float (Q values, so widening is
/// exact) must give the same slots and scores bit for bit, and the gathered keys/values must be the
/// float gather's values rounded to Q (exactly the stored ones when S is Q's twin), for retrieve and
/// retrieve_stacked.
template <class Q, class S>
void test_half_width_queries() {
  const char* qname = std::is_same_v<Q, bfloat16> ? "bf16" : "fp16";
  const std::uint64_t seed = 5151;
  std::mt19937_64 rng(seed);
  const MemoryGeometry g{3, 64, 4, 200};
  std::vector<Banks<S>> banks;
  const index_t fills[] = {200 + 33, 200};
  const index_t Ts[] = {67, 130};
  std::vector<index_t> offsets{0};
  for (std::size_t b = 0; b < std::size(fills); ++b) {
    banks.push_back(make_banks<S>(rng, g, fills[b], 1));
    offsets.push_back(offsets.back() + Ts[b]);
  }
  const index_t N = offsets.back();
  Tensor<float, Host> qf = random_tensor(rng, {N, g.n_head, g.head_dim});
  Tensor<Q, Host> qh(qf.shape());
  for (index_t i = 0; i < qf.numel(); ++i) {
    qh.data()[i] = from_float<Q>(qf.data()[i]);
    qf.data()[i] = to_float(qh.data()[i]);
  }
  const Tensor<float, Device> qf_dev = to_device(qf);
  Tensor<Q, Device> qh_dev(qh.shape());
  copy(cview(qh), qh_dev.view());
  auto same = [&](const Retrieved<float, Device>& f, const Retrieved<Q, Device>& r16, const std::string& ctx) {
    CHECK(f.chunks == r16.chunks, "%s: %d chunks with float queries, %d with %s", ctx.c_str(), f.chunks, r16.chunks, qname);
    if (!(f.slots.shape() == r16.slots.shape()) || !(f.keys.shape() == r16.keys.shape())) {
      CHECK(false, "%s: shapes differ", ctx.c_str());
      return;
    }
    const Tensor<std::int32_t, Host> fs = to_host(cview(f.slots)), bs = to_host(cview(r16.slots));
    const Tensor<float, Host> fsc = to_host(cview(f.scores)), bsc = to_host(cview(r16.scores));
    CHECK(std::memcmp(fs.data(), bs.data(), fs.bytes()) == 0 && std::memcmp(fsc.data(), bsc.data(), fsc.bytes()) == 0,
          "%s: slots or scores differ between float and %s queries", ctx.c_str(), qname);
    const Tensor<float, Host> fk = to_host(cview(f.keys)), fv = to_host(cview(f.values));
    const Tensor<Q, Host> bk = to_host(cview(r16.keys)), bv = to_host(cview(r16.values));
    index_t bad = 0;
    for (index_t i = 0; i < fk.numel(); ++i) {
      bad += from_float<Q>(fk.data()[i]).bits != bk.data()[i].bits;
      bad += from_float<Q>(fv.data()[i]).bits != bv.data()[i].bits;
    }
    CHECK(bad == 0, "%s: %lld gathered %s elements are not the float gather's rounded to %s", ctx.c_str(),
          static_cast<long long>(bad), qname, qname);
  };
  FusedChunkRetriever retriever;
  for (int k : {1, 16}) {
    for (std::size_t b = 0; b < banks.size(); ++b) {
      const std::string ctx = detail::concat(qname, " queries (", HostTwin<S>::name, " bank ", b, ", k=", k, ")");
      Retrieved<float, Device> f;
      Retrieved<Q, Device> r16;
      retriever.retrieve(*banks[b].dev, cview(qf_dev).slice(offsets[b], offsets[b + 1]), k, f);
      retriever.retrieve(*banks[b].dev, cview(qh_dev).slice(offsets[b], offsets[b + 1]), k, r16);
      if (!device_ok(ctx)) continue;
      same(f, r16, ctx);
    }
    std::vector<const DeviceMemoryBank<S>*> ptrs;
    for (auto& b : banks) ptrs.push_back(b.dev.get());
    const std::span<const DeviceMemoryBank<S>* const> bank_span(ptrs);
    const std::string ctx = detail::concat(qname, " queries stacked (", HostTwin<S>::name, ", k=", k, ")");
    Retrieved<float, Device> f;
    Retrieved<Q, Device> r16;
    retriever.retrieve_stacked(bank_span, cview(qf_dev), std::span<const index_t>(offsets), k, f);
    retriever.retrieve_stacked(bank_span, cview(qh_dev), std::span<const index_t>(offsets), k, r16);
    if (!device_ok(ctx)) continue;
    same(f, r16, ctx);
  }
  std::printf("%s queries (%s banks): the float queries' slots, scores and gathered values\n", qname, HostTwin<S>::name);
}

void test_edges() {
  // NaN queries: every score is NaN = -inf, so the oldest chunks come first, in age order.
  {
    const std::uint64_t seed = 404;
    std::mt19937_64 rng(seed);
    const MemoryGeometry g{2, 16, 2, 70};
    const Banks<float> b = make_banks<float>(rng, g, 70 + 33, 0);  // wrapped
    Tensor<float, Host> q = random_tensor(rng, {3, 2, 16});
    q(1, 0, 5) = std::numeric_limits<float>::quiet_NaN();
    const Tensor<float, Device> qd = to_device(q);
    for (int splits : {1, 4}) {
      FusedChunkRetriever retriever(FusedRetrieverTuning{splits});
      Retrieved<float, Device> out;
      poison(out, 3, 2, 9, 2, 16);
      retriever.retrieve(*b.dev, qd, 9, out);
      if (!device_ok("NaN queries")) continue;
      const HostResult r = fetch(out);
      std::int64_t diffs = 0;
      check_retrieval(*b.dev, *b.host, q, 9, r, detail::concat("NaN queries splits=", splits), diffs);
      bool ok = true;
      for (int i = 0; i < 9; ++i) {
        ok &= r.scores(1, 0, i) == -std::numeric_limits<float>::infinity();
        ok &= b.host->chunk_sequence(r.slots(1, 0, i)) == b.host->chunks_appended() - 70 + i;
      }
      CHECK(ok, "NaN queries (splits=%d): expected -inf scores and the nine oldest chunks in age order", splits);
    }
  }
  // An empty bank (one pending token only): k' = 0 and empty tensors; no queries at all.
  {
    const MemoryGeometry g{3, 8, 2, 10};
    DeviceMemoryBank<__nv_bfloat16> bank(g);
    Tensor<float, Host> one({1, 3, 8});
    fill(one.view(), 0.25f);
    bank.append(to_device(one), to_device(one));
    Tensor<float, Host> qh({5, 3, 8});
    fill(qh.view(), 1.0f);
    FusedChunkRetriever retriever;
    Retrieved<float, Device> out;
    retriever.retrieve(bank, to_device(qh), 4, out);
    CHECK(out.chunks == 0 && out.slots.shape() == (Shape{5, 3, 0}) && out.keys.shape() == (Shape{5, 3, 0, 8}),
          "empty bank: chunks %d, slots %s, keys %s", out.chunks, out.slots.shape().str().c_str(),
          out.keys.shape().str().c_str());
    std::mt19937_64 rng(3);
    const Banks<float> full = make_banks<float>(rng, g, 4, 0);
    Tensor<float, Device> none({0, 3, 8});
    retriever.retrieve(*full.dev, none, 2, out);
    CHECK(out.chunks == 2 && out.slots.shape() == (Shape{0, 3, 2}) && out.keys.shape() == (Shape{0, 3, 4, 8}),
          "no queries: chunks %d, slots %s", out.chunks, out.slots.shape().str().c_str());
    device_ok("empty bank / no queries");
  }
  // select(): the same slots and scores as retrieve(), no gather.
  {
    std::mt19937_64 rng(99);
    const MemoryGeometry g{2, 64, 4, 500};
    const Banks<__half> b = make_banks<__half>(rng, g, 777, 2);
    const Tensor<float, Host> q = random_tensor(rng, {40, 2, 64});
    const Tensor<float, Device> qd = to_device(q);
    FusedChunkRetriever retriever;
    Retrieved<float, Device> out;
    retriever.retrieve(*b.dev, qd, 16, out);
    Tensor<std::int32_t, Device> slots;
    Tensor<float, Device> scores;
    const int kk = retriever.select(*b.dev, cview(qd), 16, slots, scores);
    if (device_ok("select")) {
      const HostResult r = fetch(out);
      const Tensor<std::int32_t, Host> s = to_host(cview(slots));
      const Tensor<float, Host> sc = to_host(cview(scores));
      CHECK(kk == 16 && s.shape() == r.slots.shape() && std::memcmp(s.data(), r.slots.data(), s.bytes()) == 0 &&
                std::memcmp(sc.data(), r.scores.data(), sc.bytes()) == 0,
            "select() differs from retrieve() (k' %d)", kk);
    }
  }
  // A bank on its own non-blocking stream: appends and retrieval queue there.
  {
    cudaStream_t stream = nullptr;
    detail::cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags", 0);
    {
      std::mt19937_64 rng(1234);
      const MemoryGeometry g{4, 64, 4, 1000};
      DeviceMemoryBank<float> dev(g, stream);
      HostMemoryBank<float> host(g);
      const Tensor<float, Host> k = random_tensor(rng, {5000, 4, 64}), v = random_tensor(rng, {5000, 4, 64});
      Tensor<float, Device> kd({5000, 4, 64}), vd({5000, 4, 64});
      copy(cview(k), kd.view());
      copy(cview(v), vd.view());
      dev.append(kd, vd);
      host.append(k, v);
      const Tensor<float, Host> q = random_tensor(rng, {50, 4, 64});
      Tensor<float, Device> qd({50, 4, 64});
      copy(cview(q), qd.view());
      FusedChunkRetriever retriever;
      Retrieved<float, Device> out;
      poison(out, 50, 4, 16, 4, 64);
      // The poison (cudaMemset on the legacy stream) must land first: a non-blocking stream does not wait for it.
      detail::cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize", 0);
      retriever.retrieve(dev, qd, 16, out);
      detail::cuda_check(cudaStreamSynchronize(stream), "cudaStreamSynchronize", 0);
      if (device_ok("own stream")) {
        std::int64_t diffs = 0;
        check_retrieval(dev, host, q, 16, fetch(out), "own non-blocking stream", diffs);
      }
    }
    detail::cuda_check(cudaStreamDestroy(stream), "cudaStreamDestroy", 0);
  }
  std::printf("edge cases: NaN queries, empty bank, no queries, select(), own stream\n");
}

// ---------------------------------------------------------------- 6. bad inputs

void test_refusals_without_device() {
  std::string msg;
  CHECK(throws_with<ConfigError>([] { DeviceMemoryBank<float> b(MemoryGeometry{0, 4, 2, 8}); }, "n_head", &msg),
        "H = 0: %s", msg.c_str());
  CHECK(throws_with<ConfigError>([] { DeviceMemoryBank<__half> b(MemoryGeometry{2, 4, 0, 8}); }, "positive", &msg),
        "csz = 0: %s", msg.c_str());
  CHECK(throws_with<ConfigError>([] { DeviceMemoryBank<float> b(MemoryGeometry{2, 4, 2, -1}); }, "capacity_chunks", &msg),
        "C = -1: %s", msg.c_str());
  CHECK(throws_with<ConfigError>([] { DeviceMemoryBank<float> b(MemoryGeometry{1, 1, 1, index_t{1} << 31}); }, "int32",
                                 &msg),
        "C = 2^31: %s", msg.c_str());
  CHECK(throws_with<ConfigError>([] { FusedChunkRetriever r(FusedRetrieverTuning{-1}); }, "splits", &msg),
        "splits -1: %s", msg.c_str());
}

void test_refusals_with_device() {
  std::string msg;
  // More than the device has: refused before allocating, with the bytes.
  CHECK(throws_with<BackendError>([] { DeviceMemoryBank<float> b(MemoryGeometry{64, 256, 8, (index_t{1} << 31) - 1}); },
                                  "bytes) of device memory", &msg),
        "a bank larger than the device: %s", msg.c_str());
  const MemoryGeometry g{2, 8, 2, 50};
  std::mt19937_64 rng(5);
  const Banks<float> b = make_banks<float>(rng, g, 200, 1);
  FusedChunkRetriever r;
  Retrieved<float, Device> out;
  Tensor<float, Device> q({4, 2, 8}), q_heads({4, 3, 8}), q_dim({4, 2, 9}), q_rank({8, 8});
  CHECK(throws_with<ShapeError>([&] { r.retrieve(*b.dev, q_heads, 4, out); }, "(4, 3, 8)", &msg), "head mismatch: %s",
        msg.c_str());
  CHECK(throws_with<ShapeError>([&] { r.retrieve(*b.dev, q_dim, 4, out); }, "(T, H, dh) = (T, 2, 8)", &msg),
        "dh mismatch: %s", msg.c_str());
  CHECK(throws_with<ShapeError>([&] { r.retrieve(*b.dev, q_rank, 4, out); }, "queries", &msg), "rank 2: %s", msg.c_str());
  CHECK(throws_with<ConfigError>([&] { r.retrieve(*b.dev, q, 0, out); }, "k must be >= 1", &msg), "k = 0: %s", msg.c_str());
  CHECK(throws_with<ConfigError>([&] { r.retrieve(*b.dev, q, -3, out); }, "k must be >= 1", &msg), "k < 0: %s", msg.c_str());
  const Banks<float> big = make_banks<float>(rng, MemoryGeometry{1, 4, 1, 300}, 300, 0);
  Tensor<float, Device> q1({2, 1, 4});
  CHECK(throws_with<ConfigError>([&] { r.retrieve(*big.dev, q1, 129, out); }, "128", &msg), "k' = 129: %s", msg.c_str());
  // Batched: banks of other geometry, and mismatched span lengths.
  const Banks<float> other = make_banks<float>(rng, MemoryGeometry{3, 8, 2, 50}, 10, 0);
  const DeviceMemoryBank<float>* two[2] = {b.dev.get(), other.dev.get()};
  const TensorView<const float, Device> qs[2] = {cview(q), cview(q)};
  Retrieved<float, Device> o1, o2;
  Retrieved<float, Device>* outs[2] = {&o1, &o2};
  CHECK(throws_with<ShapeError>(
            [&] {
              r.retrieve_batched(std::span<const DeviceMemoryBank<float>* const>(two),
                                 std::span<const TensorView<const float, Device>>(qs), 4,
                                 std::span<Retrieved<float, Device>* const>(outs));
            },
            "must share", &msg),
        "batched geometry mismatch: %s", msg.c_str());
  CHECK(throws_with<ShapeError>(
            [&] {
              r.retrieve_batched(std::span<const DeviceMemoryBank<float>* const>(two, 1),
                                 std::span<const TensorView<const float, Device>>(qs), 4,
                                 std::span<Retrieved<float, Device>* const>(outs, 1));
            },
            "as many", &msg),
        "batched span lengths: %s", msg.c_str());
  // Bank appends of the wrong shape are refused and leave the bank unchanged.
  DeviceMemoryBank<float> bank(g);
  Tensor<float, Device> x({3, 2, 8}), wrong_h({3, 3, 8}), wrong_d({3, 2, 9}), other_t({2, 2, 8});
  fill(x.view(), 0.5f);
  bank.append(x, x);
  CHECK(throws_with<ShapeError>([&] { bank.append(wrong_h, wrong_h); }, "keys must be (T, H, dh)", &msg),
        "append wrong H: %s", msg.c_str());
  CHECK(throws_with<ShapeError>([&] { bank.append(wrong_d, wrong_d); }, "(3, 2, 9)", &msg), "append wrong dh: %s",
        msg.c_str());
  CHECK(throws_with<ShapeError>([&] { bank.append(x, other_t); }, "values", &msg), "append values differ: %s", msg.c_str());
  CHECK(bank.tokens_appended() == 3 && bank.num_chunks() == 1 && bank.pending_tokens() == 1,
        "a refused append changed the bank");
  CHECK(throws_with<ShapeError>([&] { (void)bank.chunk_sequence(1); }, "slot 1", &msg), "chunk_sequence(1): %s",
        msg.c_str());
  device_ok("refusals");
  std::printf("refusals: bad geometries, shapes, k and batches give the library's exceptions\n");
}

}  // namespace

int main() {
  test_refusals_without_device();
  if (!cuda_device_available()) {
    std::string msg;
    CHECK(throws_with<BackendError>([] { DeviceMemoryBank<float> b(MemoryGeometry{2, 4, 2, 8}); }, "cudaMemGetInfo", &msg),
          "a bank without a device: '%s'", msg.c_str());
    if (failures) return 1;
    std::printf("no CUDA device: checked the refused geometries only; skipping the device tests\n");
    return 77;
  }
  cudaDeviceProp prop{};
  detail::cuda_check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties", 0);
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  try {
    const char* only_env = std::getenv("LONGMEM_TEST_ONLY");
    const std::string only = only_env ? only_env : "";
    std::string known = ",";  // the part names seen so far, comma-separated
    const auto part = [&](const char* name, auto&& run) {
      known += std::string(name) + ",";
      if (only.empty() || ("," + only + ",").find(std::string(",") + name + ",") != std::string::npos) {
        run();
      } else {
        std::printf("(skipped part %s: LONGMEM_TEST_ONLY=%s)\n", name, only.c_str());
      }
    };
    part("banks", [] {
      test_bank_streams<float>();
      test_bank_streams<__half>();
      test_bank_streams<__nv_bfloat16>();
    });
    part("random", [] {
      test_retriever_random<float>();
      test_retriever_random<__half>();
      test_retriever_random<__nv_bfloat16>();
    });
    part("ties", [] { test_exact_ties(); });
    part("threshold", [] { test_threshold_filter(); });
    part("paths", [] { test_filter_paths_agree(); });
    part("batched", [] { test_batched(); });
    part("stacked", [] { test_stacked(); });
    part("bf16", [] {
      test_half_width_queries<bfloat16, __nv_bfloat16>();
      test_half_width_queries<bfloat16, float>();
    });
    part("fp16", [] {
      test_half_width_queries<longmem::half, __half>();
      test_half_width_queries<longmem::half, float>();
    });
    part("edges", [] { test_edges(); });
    part("refusals", [] { test_refusals_with_device(); });
    // A misspelt part name would otherwise run nothing and pass.
    for (std::size_t at = 0; !only.empty() && at <= only.size();) {
      const std::size_t end = std::min(only.find(',', at), only.size());
      const std::string name = only.substr(at, end - at);
      CHECK(known.find("," + name + ",") != std::string::npos, "LONGMEM_TEST_ONLY names '%s', which is no part (known: %s)",
            name.c_str(), known.c_str());
      at = end + 1;
    }
  } catch (const std::exception& e) {
    ++failures;
    std::printf("FAILED: uncaught exception: %s\n", e.what());
  }
  if (failures) {
    std::printf("%d of %d check(s) failed\n", failures, checks);
    return 1;
  }
  std::printf("all %d retrieval checks passed\n", checks);
  return 0;
}
