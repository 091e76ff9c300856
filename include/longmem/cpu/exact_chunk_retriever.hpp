#pragma once
// ExactChunkRetriever: exact top-k chunk search over a host MemoryBank on the CPU.
//
//   retrieve(bank, queries (T, H, dh), k, out)   scores, top-k and gather (chunk_retriever.hpp)
//   select(bank, queries, k, slots, scores)      scores and top-k only, no gather
//
// Per head h and tile of query_tile queries, the chunk keys are walked in tiles of
// chunk_tile chunks: one Eigen GEMM gives the (query_tile, chunk_tile) score tile, which
// stays in cache, and each query keeps a running top-k list (best first). A block of 16
// scores is tested with one vector compare against the current k-th score, so the list
// is touched only for the rare candidates. The full (T, n) score
// matrix never exists. Tasks (head, query tile) run in parallel with OpenMP; each
// writes only its own outputs, so the result does not depend on the thread count.
//
// Scores are float (double queries are rounded to float first). Ordering is total:
// higher score first, equal scores older chunk (smaller chunk_sequence) first; a NaN
// score counts as -infinity and is reported as -infinity.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <ostream>
#include <type_traits>
#include <vector>

#include "longmem/detail/eigen.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__F16C__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include "longmem/chunk_retriever.hpp"
#include "longmem/cpu/host_memory_bank.hpp"
#include "longmem/dtype.hpp"
#include "longmem/error.hpp"
#include "longmem/memory_bank.hpp"
#include "longmem/tensor.hpp"

namespace longmem {

/// Tile sizes of the exact CPU retriever.
struct ExactRetrieverTuning {
  index_t chunk_tile = 0;  ///< chunks scored per GEMM
  index_t query_tile = 0;  ///< queries per task (and per GEMM)

  friend bool operator==(const ExactRetrieverTuning&, const ExactRetrieverTuning&) = default;
  friend std::ostream& operator<<(std::ostream& os, const ExactRetrieverTuning& t) {
    return os << "ExactRetrieverTuning{chunk_tile=" << t.chunk_tile << ", query_tile=" << t.query_tile << "}";
  }
};

/// Chosen by the SelectTuning sweep of bench/bench_retrieval.cpp (2-core AMD EPYC, Zen 4; 16 heads,
/// dh 64, 1,024 queries, 64 Ki tokens, csz 4): query tiles of 512+ amortise Eigen's packing of
/// each chunk-key tile; chunk tiles of 256..1024 were within noise. The (512, 512) score tile is 1 MiB.
inline constexpr ExactRetrieverTuning default_exact_retriever_tuning{512, 512};

namespace detail {

inline int omp_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int omp_thread() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

/// dst[0, n) = src[0, n) converted from storage type S to compute type T (exact for
/// half/bfloat16 -> float).
template <class S, class T>
void convert_n(const S* src, index_t n, T* dst) {
  if constexpr (std::is_same_v<S, T>) {
    std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(T));
  } else if constexpr (std::is_same_v<S, float> || std::is_same_v<S, double>) {
    for (index_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  } else {
    index_t i = 0;
#if defined(__F16C__)
    if constexpr (std::is_same_v<S, half> && std::is_same_v<T, float>) {
      for (; i + 8 <= n; i += 8) {
        __m128i h8;
        std::memcpy(&h8, src + i, sizeof h8);
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h8));
      }
    }
#endif
    for (; i < n; ++i) dst[i] = static_cast<T>(to_float(src[i]));
  }
}

/// Like convert_n, for output that is written once and read later: with AVX-512 a
/// half or float source goes out with streaming stores, which skip reading the
/// destination lines first (the gathered keys/values are hundreds of MB).
template <class S, class T>
void convert_out_n(const S* src, index_t n, T* dst) {
#if defined(__AVX512F__)
  constexpr bool streamable = std::is_same_v<T, float> && (std::is_same_v<S, float> || std::is_same_v<S, half>);
  if constexpr (streamable) {
    if (reinterpret_cast<std::uintptr_t>(dst) % 64 == 0 && n % 16 == 0) {
      for (index_t i = 0; i < n; i += 16) {
        __m512 v;
        if constexpr (std::is_same_v<S, half>) {
          __m256i h16;
          std::memcpy(&h16, src + i, sizeof h16);
          v = _mm512_cvtph_ps(h16);
        } else {
          v = _mm512_loadu_ps(src + i);
        }
        _mm512_stream_ps(dst + i, v);
      }
      return;
    }
  }
#endif
  convert_n(src, n, dst);
}

/// Bit u set when p[u] >= thr, for the 16 floats at p (NaN compares false).
inline std::uint32_t lanes_at_least(const float* p, float thr) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(p), _mm512_set1_ps(thr), _CMP_GE_OQ);
#elif defined(__AVX__)
  const __m256 t = _mm256_set1_ps(thr);
  const auto lo = static_cast<std::uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p), t, _CMP_GE_OQ)));
  const auto hi = static_cast<std::uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + 8), t, _CMP_GE_OQ)));
  return lo | (hi << 8);
#else
  std::uint32_t m = 0;
  for (int u = 0; u < 16; ++u) m |= static_cast<std::uint32_t>(p[u] >= thr) << u;
  return m;
#endif
}

}  // namespace detail

/// Exact top-k chunk retrieval over host banks. It keeps its scratch buffers between calls,
/// so one retriever serves one caller at a time (one per stream or thread).
struct ExactChunkRetriever {
  using location = Host;

  ExactChunkRetriever() = default;
  explicit ExactChunkRetriever(ExactRetrieverTuning t) : tuning_(t) {
    if (t.chunk_tile <= 0 || t.query_tile <= 0) {
      detail::fail<ConfigError>("ExactChunkRetriever: chunk_tile and query_tile must be positive, got ", t);
    }
  }

  const ExactRetrieverTuning& tuning() const { return tuning_; }

  /// out.slots, out.scores (T, H, k'), out.keys, out.values (T, H, k' * csz, dh) with
  /// k' = min(k, bank.num_chunks()); queries (T, H, dh) unscaled; k >= 1.
  template <MemoryBank M, ComputeType T>
  void retrieve(const M& bank, TensorView<const T, Host> queries, int k, Retrieved<T, Host>& out) {
    static_assert(std::is_same_v<typename M::location, Host>,
                  "ExactChunkRetriever searches host banks: use a device retriever for a device bank, or a HostMemoryBank");
    const index_t kk = prepare(bank, queries, k);
    const MemoryGeometry g = bank.geometry();
    const index_t Tq = queries.dim(0), H = g.n_head, csz = g.chunk_size, dh = g.head_dim;
    out.chunks = static_cast<int>(kk);
    out.slots.resize({Tq, H, kk});
    out.scores.resize({Tq, H, kk});
    out.keys.resize({Tq, H, kk * csz, dh});
    out.values.resize({Tq, H, kk * csz, dh});
    run<true>(bank, queries, kk, out.slots.data(), out.scores.data(), out.keys.data(), out.values.data());
  }

  /// Only the top-k slots and scores (T, H, k'), no gather; returns k'.
  template <MemoryBank M, ComputeType T>
  int select(const M& bank, TensorView<const T, Host> queries, int k, Tensor<std::int32_t, Host>& slots,
             Tensor<float, Host>& scores) {
    static_assert(std::is_same_v<typename M::location, Host>,
                  "ExactChunkRetriever searches host banks: use a device retriever for a device bank, or a HostMemoryBank");
    const index_t kk = prepare(bank, queries, k);
    const index_t Tq = queries.dim(0), H = bank.geometry().n_head;
    slots.resize({Tq, H, kk});
    scores.resize({Tq, H, kk});
    run<false>(bank, queries, kk, slots.data(), scores.data(), static_cast<T*>(nullptr), static_cast<T*>(nullptr));
    return static_cast<int>(kk);
  }

  /// Convenience: queries from an owning tensor or a mutable view.
  template <MemoryBank M, class Q, ComputeType T>
    requires requires(const Q& q) { cview(q); }
  void retrieve(const M& bank, const Q& queries, int k, Retrieved<T, Host>& out) {
    retrieve(bank, cview(queries), k, out);
  }

 private:
  // Per-thread scratch, grown on demand and kept.
  struct Scratch {
    Tensor<float, Host> tile;             // (query_tile, chunk_tile) scores
    Tensor<float, Host> best_score;       // (query_tile, k') best first
    Tensor<std::int32_t, Host> best_slot;  // (query_tile, k')
    Tensor<index_t, Host> count;          // (query_tile) entries filled so far
  };

  /// Validates arguments, converts double queries, sizes scratch; returns k'.
  template <class M, class T>
  index_t prepare(const M& bank, TensorView<const T, Host> queries, int k) {
    const MemoryGeometry g = bank.geometry();
    if (k < 1) detail::fail<ConfigError>("ExactChunkRetriever::retrieve: k must be >= 1, got ", k);
    if (queries.rank() != 3 || queries.dim(1) != g.n_head || queries.dim(2) != g.head_dim) {
      detail::fail<ShapeError>("ExactChunkRetriever::retrieve: queries must be (T, H, dh) = (T, ", g.n_head, ", ",
                               g.head_dim, ") to match the bank, got ", queries.shape().str());
    }
    const index_t n = bank.num_chunks();
    const index_t kk = std::min<index_t>(k, n);
    const index_t Tq = queries.dim(0);
    if constexpr (std::is_same_v<T, double>) {
      queries_f_.resize(queries.shape());
      detail::convert_n(queries.data(), queries.numel(), queries_f_.data());
    }
    if (kk == 0 || Tq == 0) return kk;
    const index_t qt = std::min(tuning_.query_tile, Tq), ct = std::min(tuning_.chunk_tile, n);
    const auto threads = static_cast<std::size_t>(std::max(1, detail::omp_threads()));
    if (scratch_.size() < threads) scratch_.resize(threads);
    for (Scratch& s : scratch_) {
      s.tile.resize({qt, ct});
      s.best_score.resize({qt, kk});
      s.best_slot.resize({qt, kk});
      s.count.resize({qt});
    }
    return kk;
  }

  template <bool Gather, class M, class T>
  void run(const M& bank, TensorView<const T, Host> queries, index_t kk, std::int32_t* slots, float* scores, T* keys,
           T* values) {
    const index_t Tq = queries.dim(0);
    if (kk == 0 || Tq == 0) return;
    const index_t H = bank.geometry().n_head;
    const float* q = nullptr;
    if constexpr (std::is_same_v<T, double>) {
      q = queries_f_.data();
    } else {
      q = queries.data();
    }
    const index_t qt = std::min(tuning_.query_tile, Tq);
    const index_t n_qtiles = (Tq + qt - 1) / qt;
    const index_t tasks = H * n_qtiles;
    // Small searches stay on the calling thread: a parallel region costs more than they do.
    const bool parallel = tasks > 1 && Tq * H * bank.num_chunks() * bank.geometry().head_dim >= parallel_min_work;
    // Consecutive tasks share a head, so both threads stream the same chunk keys.
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
#endif
    for (index_t task = 0; task < tasks; ++task) {
      const index_t h = task / n_qtiles;
      const index_t q0 = (task % n_qtiles) * qt;
      const index_t q1 = std::min(q0 + qt, Tq);
      Scratch& s = scratch_[static_cast<std::size_t>(detail::omp_thread())];
      search_tile(bank, q, h, q0, q1, kk, s, slots, scores);
      if constexpr (Gather) gather(bank, h, q0, q1, kk, slots, keys, values);
    }
    (void)parallel;  // unused without OpenMP
  }

  /// Top-k of queries [q0, q1) of head h against every stored chunk.
  template <class M>
  void search_tile(const M& bank, const float* q /*(T, H, dh)*/, index_t h, index_t q0, index_t q1, index_t kk,
                   Scratch& s, std::int32_t* slots /*(T, H, k')*/, float* scores /*(T, H, k')*/) const {
    using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const MemoryGeometry g = bank.geometry();
    const index_t H = g.n_head, dh = g.head_dim, C = g.capacity_chunks;
    const index_t n = bank.num_chunks(), nq = q1 - q0;
    const index_t ct = std::min(tuning_.chunk_tile, n);
    const float* ck = bank.chunk_keys().data();  // (H, C, dh)

    Eigen::Map<const RowMajor, Eigen::Unaligned, Eigen::OuterStride<>> Q(q + (q0 * H + h) * dh, nq, dh,
                                                                         Eigen::OuterStride<>(H * dh));
    std::fill_n(s.count.data(), nq, index_t{0});
    for (index_t c0 = 0; c0 < n; c0 += ct) {
      const index_t nc = std::min(ct, n - c0);
      Eigen::Map<const RowMajor> K(ck + (h * C + c0) * dh, nc, dh);
      Eigen::Map<RowMajor> S(s.tile.data(), nq, nc);  // (nq, nc)
      S.noalias() = Q * K.transpose();
      for (index_t r = 0; r < nq; ++r) {
        TopK<M> top{bank, s.best_score.data() + r * kk, s.best_slot.data() + r * kk, s.count.data()[r]};
        scan_row(top, s.tile.data() + r * nc, c0, nc, kk);
      }
    }
    for (index_t r = 0; r < nq; ++r) {
      const index_t o = ((q0 + r) * H + h) * kk;
      std::copy_n(s.best_score.data() + r * kk, kk, scores + o);
      std::copy_n(s.best_slot.data() + r * kk, kk, slots + o);
    }
  }

  /// One query's running top-k, kept sorted best first. Insertions are rare after the
  /// first chunks (about k ln(n / k) of n), and a short linear shift with one mispredicted
  /// exit measured faster than a heap or a binary search for k <= 64. Chunk ages are
  /// looked up only for exact ties.
  template <class M>
  struct TopK {
    const M& bank;
    float* bs;            // (k') keys, best first
    std::int32_t* bslot;  // (k') slots
    index_t& count;       // entries filled so far

    // (a, a_slot) ranks before (b, b_slot): higher key, or equal key and older chunk.
    bool before(float a, index_t a_slot, float b, index_t b_slot) const {
      return a > b || (a == b && bank.chunk_sequence(a_slot) < bank.chunk_sequence(b_slot));
    }

    // Inserts into the sorted entries [0, last), dropping the entry at `last` (if any).
    void insert(float key, index_t slot, index_t last) {
      index_t i = last;
      for (; i > 0 && before(key, slot, bs[i - 1], bslot[i - 1]); --i) {
        bs[i] = bs[i - 1];
        bslot[i] = bslot[i - 1];
      }
      bs[i] = key;
      bslot[i] = static_cast<std::int32_t>(slot);
    }
  };

  /// Merges scores of chunks [c0, c0 + nc) into one query's top-k.
  template <class M>
  static void scan_row(TopK<M>& top, const float* row, index_t c0, index_t nc, index_t kk) {
    constexpr float lowest = -std::numeric_limits<float>::infinity();
    index_t j = 0;
    // Fill: the first k' chunks enter unconditionally.
    for (; j < nc && top.count < kk; ++j) top.insert(std::isnan(row[j]) ? lowest : row[j], c0 + j, top.count++);
    if (top.count < kk) return;
    float thr = top.bs[kk - 1];  // the current k'-th key
    auto consider = [&](index_t jj) {
      const float x = row[jj];
      if (x < thr) return;
      const float key = std::isnan(x) ? lowest : x;
      if (!top.before(key, c0 + jj, top.bs[kk - 1], top.bslot[kk - 1])) return;
      top.insert(key, c0 + jj, kk - 1);
      thr = top.bs[kk - 1];
    };
    // While the k'-th key is -inf a NaN (= -inf) can still enter; the vector test below
    // drops NaN, so test such (rare) rows one score at a time until the threshold rises.
    for (; j < nc && thr == lowest; ++j) consider(j);
    // Blocks of 16: one compare gives the lanes >= thr; only those reach the exact test.
    constexpr index_t block = 16;
    for (; j + block <= nc; j += block) {
      for (std::uint32_t m = detail::lanes_at_least(row + j, thr); m != 0; m &= m - 1) {
        consider(j + std::countr_zero(m));
      }
    }
    for (; j < nc; ++j) consider(j);
  }

  /// keys/values (T, H, k' * csz, dh) of queries [q0, q1), head h, from the chosen slots.
  template <class M, class T>
  static void gather(const M& bank, index_t h, index_t q0, index_t q1, index_t kk, const std::int32_t* slots, T* keys,
                     T* values) {
    const MemoryGeometry g = bank.geometry();
    const index_t H = g.n_head, dh = g.head_dim, C = g.capacity_chunks, csz = g.chunk_size;
    const auto* bk = bank.keys().data();    // (H, C, csz, dh)
    const auto* bv = bank.values().data();  // (H, C, csz, dh)
    const index_t chunk = csz * dh;
    for (index_t t = q0; t < q1; ++t) {
      const index_t o = (t * H + h) * kk;
      for (index_t i = 0; i < kk; ++i) {
        const index_t src = (h * C + slots[o + i]) * chunk;
        detail::convert_out_n(bk + src, chunk, keys + (o + i) * chunk);
        detail::convert_out_n(bv + src, chunk, values + (o + i) * chunk);
      }
    }
#if defined(__AVX512F__)
    _mm_sfence();  // order the streaming stores before the results are read
#endif
  }

  static constexpr index_t parallel_min_work = index_t{1} << 20;  // multiply-adds of the score GEMM

  ExactRetrieverTuning tuning_ = default_exact_retriever_tuning;
  std::vector<Scratch> scratch_;
  Tensor<float, Host> queries_f_;  // (T, H, dh) float copy of double queries
};

static_assert(ChunkRetrieverFor<ExactChunkRetriever, HostMemoryBank<float>>);
static_assert(ChunkRetrieverFor<ExactChunkRetriever, HostMemoryBank<half>>);

}  // namespace longmem
