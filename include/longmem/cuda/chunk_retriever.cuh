#pragma once
// FusedChunkRetriever: exact top-k chunk search over DeviceMemoryBanks on the GPU.
//
//   retrieve(bank, queries (T, H, dh), k, out)           scores, top-k and gather (chunk_retriever.hpp)
//   select(bank, queries, k, slots, scores)              scores and top-k only, no gather
//   retrieve_batched(banks, queries, k, outs[, stream])  several streams' banks in one launch
//   retrieve_stacked(banks, queries, offsets, k, out)     the same into one output stacked by rows
//
// Two kernels (three on the tensor-core path) on the bank's CUDA stream (detail/retrieval_kernels.cuh):
//   0. (tensor-core path) key max: the largest |chunk key element| per (bank, head), for the bound.
//   1. select: one pass over the chunk keys; per block a (128 queries, 64 chunks) score tile in
//      registers, compared with each query's running k'-th best score; rows with a score that can
//      still enter (at or above it: equal scores are decided by age) are merged at once into
//      their running top-k' lists (after the first tiles almost none; on the tensor-core path each
//      query's bound starts from sample tiles of its split, not from -inf). The chunk
//      range is split S ways so that small T still fills the GPU; each split leaves k' candidates
//      per (query, head) in a workspace, (H, T, S, k') 64-bit keys. The (T, n) score matrix is
//      never written anywhere.
//   2. merge: one warp per (query, head) merges the S candidate lists, writes slots and scores,
//      and gathers the chosen chunks' token keys and values (converted to float; to bf16 for a bf16
//      model, whose queries are widened to float first, exactly).
// Every head of every bank (and every query) is in the same two launches.
//
// Scores are fp32 FMA (tensor cores only as a bounded prefilter that decides which chunks to
// score, FusedRetrieverTuning::tensor_core_prefilter; see the kernels' header), so the selection is
// exact: it is the brute-force top-k of the fp32 scores. Ordering is the library's: higher score
// first, equal scores older chunk (smaller chunk_sequence) first, also on a wrapped ring; a NaN
// score counts as -infinity and is reported as -infinity.
//
// Limits, refused with ConfigError: k' <= 128 chunks, and the tiles must fit the device's shared
// memory (on an H100/H200, 227 KiB a block: k' = 128 up to head_dim 128; k' = 16 up to head_dim 280).
// The retriever keeps its workspace (and a bf16 model's widened queries) between calls: one
// retriever serves one caller at a time, and calls for banks on different streams must be ordered
// by the caller.
// Outputs are resized (cudaMalloc when they grow, which synchronises); kernels are queued and the
// call returns without waiting for them.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <ostream>
#include <span>
#include <type_traits>
#include <vector>

#include "longmem/chunk_retriever.hpp"
#include "longmem/cuda/detail/retrieval_kernels.cuh"
#include "longmem/cuda/device_memory_bank.cuh"
#include "longmem/cuda/storage.hpp"
#include "longmem/error.hpp"
#include "longmem/memory_bank.hpp"
#include "longmem/tensor.hpp"

namespace longmem {
namespace detail {
template <class M>
inline constexpr bool is_device_memory_bank_v = false;
template <class S>
inline constexpr bool is_device_memory_bank_v<DeviceMemoryBank<S>> = true;
}  // namespace detail

/// Knobs of the fused retriever.
struct FusedRetrieverTuning {
  int splits = 0;  ///< chunk-range splits per (query tile, head); 0: chosen from the device's SM count
  /// true: a score tile is merged only for rows with a score that can still enter their top-k'
  /// list (per-row running threshold; the default). false: every tile is merged for every row
  /// (the earlier path, kept so that benchmarks and tests can compare the two; same results).
  bool threshold_filter = true;
  /// true (the default): approximate scores on the tensor cores (TF32, fp32 accumulation) decide
  /// which chunks of a tile are rescored exactly (the fp32 FMA chain of the path without it) and
  /// merged, with an error bound from the inputs' norms (see retrieval_select_tc_kernel), so the
  /// results are the same bits. Needs head_dim % 8 == 0, head_dim <= 64 and its tiles to fit
  /// shared memory; otherwise the fp32 FMA kernel runs.
  bool tensor_core_prefilter = true;
  /// With the tensor-core prefilter: true (the default) starts each query's cut from a bound taken
  /// from sample tiles of its split (so the first tiles are not merged wholesale); false starts it
  /// at -inf (the earlier path, kept for comparison; same results).
  bool seeded_cuts = true;

  friend bool operator==(const FusedRetrieverTuning&, const FusedRetrieverTuning&) = default;
  friend std::ostream& operator<<(std::ostream& os, const FusedRetrieverTuning& t) {
    return os << "FusedRetrieverTuning{splits=" << t.splits << ", threshold_filter=" << t.threshold_filter
              << ", tensor_core_prefilter=" << t.tensor_core_prefilter << ", seeded_cuts=" << t.seeded_cuts << "}";
  }
};

/// Exact top-k chunk retrieval over device banks (see the header comment).
class FusedChunkRetriever {
 public:
  using location = Device;
  static constexpr int max_chunks = detail::RetrievalTile::max_kept;  ///< the largest k' served
  static constexpr int max_banks_per_launch = detail::retrieval_max_banks;

  FusedChunkRetriever() = default;
  explicit FusedChunkRetriever(FusedRetrieverTuning t) : tuning_(t) {
    if (t.splits < 0 || t.splits > max_splits) {
      detail::fail<ConfigError>("FusedChunkRetriever: splits must be in [0, ", max_splits, "] (0 = automatic), got ",
                                t.splits);
    }
  }

  const FusedRetrieverTuning& tuning() const { return tuning_; }

  /// out.slots, out.scores (T, H, k'), out.keys, out.values (T, H, k' * csz, dh), k' = min(k, n).
  /// E = bfloat16 or half (a 16-bit model's queries): widened to float on the device, exactly, so
  /// the selection is the float path's; the chosen chunks' keys and values are gathered as E.
  template <DeviceStorageType S, class E>
    requires(std::is_same_v<E, float> || HalfWidthType<E>)
  void retrieve(const DeviceMemoryBank<S>& bank, TensorView<const E, Device> queries, int k, Retrieved<E, Device>& out) {
    const DeviceMemoryBank<S>* banks[1] = {&bank};
    const TensorView<const float, Device> qs[1] = {as_float(queries, bank.stream())};
    Retrieved<E, Device>* outs[1] = {&out};
    run<true>(std::span<const DeviceMemoryBank<S>* const>(banks), std::span<const TensorView<const float, Device>>(qs),
              k, std::span<Retrieved<E, Device>* const>(outs), bank.stream(), "FusedChunkRetriever::retrieve");
  }

  /// Convenience: float queries from an owning device tensor or a mutable view.
  template <DeviceStorageType S, class Q>
    requires(!std::is_same_v<Q, TensorView<const float, Device>>) && requires(const Q& q) {
      { cview(q) } -> std::convertible_to<TensorView<const float, Device>>;
    }
  void retrieve(const DeviceMemoryBank<S>& bank, const Q& queries, int k, Retrieved<float, Device>& out) {
    retrieve(bank, cview(queries), k, out);
  }

  /// Any other bank: a compile error that says what to use instead.
  template <class M, class Q>
    requires(!detail::is_device_memory_bank_v<M>)
  void retrieve(const M&, const Q&, int, Retrieved<float, Device>&) {
    static_assert(detail::is_device_memory_bank_v<M>,
                  "FusedChunkRetriever searches DeviceMemoryBank<S> banks: use ExactChunkRetriever for a HostMemoryBank");
  }

  /// Only the top-k slots and scores (T, H, k'), no gather; returns k'.
  template <DeviceStorageType S>
  int select(const DeviceMemoryBank<S>& bank, TensorView<const float, Device> queries, int k,
             Tensor<std::int32_t, Device>& slots, Tensor<float, Device>& scores) {
    Retrieved<float, Device> r;
    r.slots = std::move(slots);
    r.scores = std::move(scores);
    const DeviceMemoryBank<S>* banks[1] = {&bank};
    const TensorView<const float, Device> qs[1] = {queries};
    Retrieved<float, Device>* outs[1] = {&r};
    try {
      run<false>(std::span<const DeviceMemoryBank<S>* const>(banks), std::span<const TensorView<const float, Device>>(qs),
                 k, std::span<Retrieved<float, Device>* const>(outs), bank.stream(), "FusedChunkRetriever::select");
    } catch (...) {
      slots = std::move(r.slots);
      scores = std::move(r.scores);
      throw;
    }
    slots = std::move(r.slots);
    scores = std::move(r.scores);
    return r.chunks;
  }

  /// One retrieval per bank (each with its own queries (T_b, H, dh) and k'_b = min(k, n_b)), all
  /// in the same launches on `stream`. Banks must share H, dh and csz; up to 32 banks go in one
  /// launch (more take several). The caller orders every bank's appends before `stream`.
  template <DeviceStorageType S>
  void retrieve_batched(std::span<const DeviceMemoryBank<S>* const> banks,
                        std::span<const TensorView<const float, Device>> queries, int k,
                        std::span<Retrieved<float, Device>* const> outs, cudaStream_t stream) {
    run<true>(banks, queries, k, outs, stream, "FusedChunkRetriever::retrieve_batched");
  }
  /// The same on the first bank's stream.
  template <DeviceStorageType S>
  void retrieve_batched(std::span<const DeviceMemoryBank<S>* const> banks,
                        std::span<const TensorView<const float, Device>> queries, int k,
                        std::span<Retrieved<float, Device>* const> outs) {
    run<true>(banks, queries, k, outs, banks.empty() ? cudaStream_t{} : banks.front()->stream(),
              "FusedChunkRetriever::retrieve_batched");
  }

  /// One retrieval per bank as retrieve_batched, for queries stacked along the rows: bank b's
  /// queries are rows [offsets[b], offsets[b+1]) of `queries` (N, H, dh), and its results land in
  /// the same rows of one output: out.slots, out.scores (N, H, k'), out.keys, out.values
  /// (N, H, k' csz, dh) (what memory_attention with offsets reads). Every bank must give the same
  /// k' = min(k, stored chunks) (full banks do): a ConfigError says which does not.
  /// bfloat16 or half queries (a 16-bit model's) are widened to float on the device first
  /// (exactly), and the keys and values are gathered as the queries' type.
  template <DeviceStorageType S, class E>
    requires(std::is_same_v<E, float> || HalfWidthType<E>)
  void retrieve_stacked(std::span<const DeviceMemoryBank<S>* const> banks, TensorView<const E, Device> queries_in,
                        std::span<const index_t> offsets, int k, Retrieved<E, Device>& out) {
    const char* who = "FusedChunkRetriever::retrieve_stacked";
    const TensorView<const float, Device> queries =
        as_float(queries_in, banks.empty() ? cudaStream_t{} : banks.front()->stream());
    const index_t N = queries.rank() > 0 ? queries.dim(0) : 0;
    if (offsets.size() != banks.size() + 1 || offsets.front() != 0 || offsets.back() != N ||
        !std::is_sorted(offsets.begin(), offsets.end())) {
      detail::fail<ShapeError>(who, ": ", banks.size(), " banks need ", banks.size() + 1,
                               " rising row offsets from 0 to the ", N, " query rows, got ", offsets.size());
    }
    std::vector<TensorView<const float, Device>> qs;
    for (std::size_t b = 0; b < banks.size(); ++b) qs.push_back(queries.slice(offsets[b], offsets[b + 1]));
    check(banks, std::span<const TensorView<const float, Device>>(qs), k, who);
    if (banks.empty()) return;
    const index_t kk = std::min<index_t>(k, banks[0]->num_chunks());
    for (std::size_t b = 1; b < banks.size(); ++b) {
      if (std::min<index_t>(k, banks[b]->num_chunks()) != kk) {
        detail::fail<ConfigError>(who, ": bank ", b, " holds ", banks[b]->num_chunks(), " chunks and bank 0 ",
                                  banks[0]->num_chunks(), ", so they would retrieve different numbers of chunks (k = ",
                                  k, "); stacked retrieval needs one k' for all (retrieve_batched takes any)");
      }
    }
    const MemoryGeometry g0 = banks[0]->geometry();
    const index_t H = g0.n_head, dh = g0.head_dim, csz = g0.chunk_size;
    out.chunks = static_cast<int>(kk);
    out.slots.resize({N, H, kk});
    out.scores.resize({N, H, kk});
    out.keys.resize({N, H, kk * csz, dh});
    out.values.resize({N, H, kk * csz, dh});
    std::vector<OutputRows> dst(banks.size());
    for (std::size_t b = 0; b < banks.size(); ++b) {
      const index_t o = offsets[b];
      dst[b] = {out.slots.data() + o * H * kk, out.scores.data() + o * H * kk, out.keys.data() + o * H * kk * csz * dh,
                out.values.data() + o * H * kk * csz * dh};
    }
    launches<true, detail::device_element_t<E>>(banks, std::span<const TensorView<const float, Device>>(qs), k,
                                                std::span<const OutputRows>(dst), banks.front()->stream(), who);
  }

  /// The splits the next call would use for `pairs` (query tile, head) blocks and at most
  /// `max_chunks_of_a_bank` chunks (for benchmarks and tests). Automatic: as many splits as keep
  /// the whole grid within one wave of resident blocks (SMs x blocks per SM, the latter measured
  /// at the last launch, 2 before any), since every split restarts its lists (its first tiles
  /// merge nearly everything) and adds a list to the final merge; and each split keeps at least
  /// eight chunk tiles. (At 64 Ki tokens, 1,024 queries, 16 heads on an H200, the old choice of
  /// about 4 blocks per SM took 3 splits where 2 was measured best.)
  int splits_for(index_t pairs, index_t max_chunks_of_a_bank) {
    if (tuning_.splits > 0) return tuning_.splits;
    const index_t resident =
        static_cast<index_t>(multiprocessors()) * static_cast<index_t>(blocks_per_sm_ > 0 ? blocks_per_sm_ : 2);
    index_t s = std::max<index_t>(1, resident / std::max<index_t>(pairs, 1));
    s = std::min(s, std::max<index_t>(1, max_chunks_of_a_bank / (8 * detail::RetrievalTile::chunks)));
    return static_cast<int>(std::clamp<index_t>(s, 1, max_splits));
  }

 private:
  static constexpr int max_splits = 64;

  int multiprocessors() {
    if (sm_count_ == 0) {
      int dev = 0;
      detail::cuda_check(cudaGetDevice(&dev), "cudaGetDevice (FusedChunkRetriever)", 0);
      detail::cuda_check(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, dev),
                         "cudaDeviceGetAttribute (multiprocessors)", 0);
      detail::cuda_check(cudaDeviceGetAttribute(&smem_optin_, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                         "cudaDeviceGetAttribute (shared memory per block)", 0);
    }
    return sm_count_;
  }

  /// Where one bank's results go: slots, scores (T_b, H, k'), keys, values (T_b, H, k' csz, dh) of
  /// the merge kernel's element type.
  struct OutputRows {
    std::int32_t* slots = nullptr;
    float* scores = nullptr;
    void* keys = nullptr;
    void* values = nullptr;
  };

  /// The queries as float: float ones as they are; 16-bit ones (T, H, dh) copied into the
  /// retriever's own buffer, on `stream`, exactly.
  template <class E>
  TensorView<const float, Device> as_float(TensorView<const E, Device> q, cudaStream_t stream) {
    if constexpr (std::is_same_v<E, float>) {
      return q;
    } else {
      return widened(q, stream);
    }
  }
  template <class E>
  TensorView<const float, Device> widened(TensorView<const E, Device> q, cudaStream_t stream) {
    widened_.resize(q.shape());
    const index_t n = q.numel();
    if (n > 0 && q.data() != nullptr) {
      const unsigned blocks = static_cast<unsigned>(std::clamp<index_t>((n + 255) / 256, 1, 65535 * 8));
      detail::retrieval_widen_kernel<<<blocks, 256, 0, stream>>>(detail::device_ptr(q.data()), widened_.data(), n);
      check_launch("FusedChunkRetriever", "query widening");
    }
    return widened_.view();
  }

  template <bool Gather, class S, class E>
  void run(std::span<const DeviceMemoryBank<S>* const> banks, std::span<const TensorView<const float, Device>> queries,
           int k, std::span<Retrieved<E, Device>* const> outs, cudaStream_t stream, const char* who) {
    // Every argument is checked before anything is resized or launched.
    if (outs.size() != banks.size()) {
      detail::fail<ShapeError>(who, ": ", banks.size(), " banks need as many outputs, got ", outs.size());
    }
    for (std::size_t b = 0; b < outs.size(); ++b) {
      if (outs[b] == nullptr) detail::fail<ShapeError>(who, ": output ", b, " is null");
    }
    check(banks, queries, k, who);
    if (banks.empty()) return;
    const MemoryGeometry g0 = banks[0]->geometry();
    const index_t H = g0.n_head, dh = g0.head_dim, csz = g0.chunk_size;
    std::vector<OutputRows> dst(banks.size());
    for (std::size_t b = 0; b < banks.size(); ++b) {
      const index_t Tq = queries[b].dim(0), kk = std::min<index_t>(k, banks[b]->num_chunks());
      Retrieved<E, Device>& out = *outs[b];
      out.chunks = static_cast<int>(kk);
      out.slots.resize({Tq, H, kk});
      out.scores.resize({Tq, H, kk});
      if constexpr (Gather) {
        out.keys.resize({Tq, H, kk * csz, dh});
        out.values.resize({Tq, H, kk * csz, dh});
      }
      dst[b] = {out.slots.data(), out.scores.data(), Gather ? out.keys.data() : nullptr,
                Gather ? out.values.data() : nullptr};
    }
    launches<Gather, detail::device_element_t<E>>(banks, queries, k, dst, stream, who);
  }

  /// O: the gathered keys' and values' element type (float, __nv_bfloat16 or __half).
  template <bool Gather, class O, class S>
  void launches(std::span<const DeviceMemoryBank<S>* const> banks, std::span<const TensorView<const float, Device>> queries,
                int k, std::span<const OutputRows> dst, cudaStream_t stream, const char* who) {
    for (std::size_t first = 0; first < banks.size(); first += max_banks_per_launch) {
      const std::size_t count = std::min<std::size_t>(max_banks_per_launch, banks.size() - first);
      launch<Gather, O>(banks.subspan(first, count), queries.subspan(first, count), k, dst.subspan(first, count), stream,
                        who);
    }
  }

  /// The checks of every retrieval: k, the banks' shared geometry, each bank's queries, k'.
  template <class S>
  void check(std::span<const DeviceMemoryBank<S>* const> banks, std::span<const TensorView<const float, Device>> queries,
             int k, const char* who) const {
    if (k < 1) detail::fail<ConfigError>(who, ": k must be >= 1, got ", k);
    if (queries.size() != banks.size()) {
      detail::fail<ShapeError>(who, ": ", banks.size(), " banks need as many query tensors, got ", queries.size());
    }
    if (banks.empty()) return;
    const MemoryGeometry g0 = banks[0]->geometry();
    for (std::size_t b = 0; b < banks.size(); ++b) {
      const MemoryGeometry g = banks[b]->geometry();
      if (g.n_head != g0.n_head || g.head_dim != g0.head_dim || g.chunk_size != g0.chunk_size) {
        detail::fail<ShapeError>(who, ": bank ", b, " has ", g.n_head, " heads of ", g.head_dim, " in chunks of ",
                                 g.chunk_size, ", bank 0 has ", g0.n_head, " of ", g0.head_dim, " in chunks of ",
                                 g0.chunk_size, "; banks retrieved together must share them");
      }
      const TensorView<const float, Device>& q = queries[b];
      if (q.rank() != 3 || q.dim(1) != g.n_head || q.dim(2) != g.head_dim) {
        detail::fail<ShapeError>(who, ": queries", banks.size() > 1 ? detail::concat(" of bank ", b) : std::string(),
                                 " must be (T, H, dh) = (T, ", g.n_head, ", ", g.head_dim, ") to match the bank, got ",
                                 q.shape().str());
      }
      if (q.dim(0) > max_queries) {
        detail::fail<ShapeError>(who, ": ", q.dim(0), " queries exceed the ", max_queries, " one call takes");
      }
      if (q.dim(0) > 0 && q.data() == nullptr) detail::fail<ShapeError>(who, ": queries have no data");
      const index_t kk = std::min<index_t>(k, banks[b]->num_chunks());
      if (kk > max_chunks) {
        detail::fail<ConfigError>(who, ": k' = min(k, stored chunks) = ", kk, " exceeds the ", max_chunks,
                                  " chunks FusedChunkRetriever selects per query; retrieve fewer chunks");
      }
    }

  }

  template <bool Gather, class O, class S>
  void launch(std::span<const DeviceMemoryBank<S>* const> banks, std::span<const TensorView<const float, Device>> queries,
              int k, std::span<const OutputRows> dst, cudaStream_t stream, const char* who) {
    using Tl = detail::RetrievalTile;
    const MemoryGeometry g0 = banks[0]->geometry();
    const int H = g0.n_head, dh = g0.head_dim;
    index_t pairs = 0, max_T = 0, max_n = 0;
    int max_kk = 0;
    for (std::size_t b = 0; b < banks.size(); ++b) {
      const index_t Tq = queries[b].dim(0), kk = std::min<index_t>(k, banks[b]->num_chunks());
      if (Tq == 0 || kk == 0) continue;
      pairs += H * ((Tq + Tl::queries - 1) / Tl::queries);
      max_T = std::max(max_T, Tq);
      max_n = std::max(max_n, banks[b]->num_chunks());
      max_kk = std::max(max_kk, static_cast<int>(kk));
    }
    if (pairs == 0) return;  // nothing stored or no queries: k' = 0 or T = 0 everywhere

    multiprocessors();
    const std::size_t fma_smem = detail::retrieval_select_smem(dh, max_kk);
    if (fma_smem > static_cast<std::size_t>(smem_optin_)) {
      detail::fail<ConfigError>(who, ": head_dim ", dh, " with k' = ", max_kk, " needs ", fma_smem,
                                " bytes of shared memory per block, the device allows ", smem_optin_,
                                "; use fewer retrieved chunks or a smaller head dimension");
    }
    const std::size_t tc_smem = detail::retrieval_tc_head_dim_ok(dh) ? detail::retrieval_select_tc_smem(dh, max_kk) : 0;
    const bool tensor_cores = tuning_.tensor_core_prefilter && detail::retrieval_tc_head_dim_ok(dh) &&
                              tc_smem <= static_cast<std::size_t>(smem_optin_);
    const std::size_t smem = tensor_cores ? tc_smem : fma_smem;
    auto select = tensor_cores ? (max_kk <= 32 ? detail::retrieval_select_tc_kernel<S, 1>
                                               : detail::retrieval_select_tc_kernel<S, detail::retrieval_list_regs>)
                  : tuning_.threshold_filter ? detail::retrieval_select_kernel<S, true>
                                             : detail::retrieval_select_kernel<S, false>;
    // Beyond 48 KiB a kernel needs a raised limit (per kernel instantiation and device; a cheap host call).
    if (smem > 48 * 1024) {
      detail::cuda_check(cudaFuncSetAttribute(select, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
                         "cudaFuncSetAttribute (retrieval shared memory)", smem);
    }
    detail::cuda_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm_, select, Tl::threads, smem),
                       "cudaOccupancyMaxActiveBlocksPerMultiprocessor (retrieval select)", smem);
    const int splits = splits_for(pairs, max_n);

    detail::RetrievalLaunch<S> L;
    L.n_banks = static_cast<int>(banks.size());
    L.n_head = H;
    L.head_dim = dh;
    L.chunk_size = g0.chunk_size;
    L.splits = splits;
    L.seeded = tuning_.seeded_cuts;
    index_t workspace = 0;
    for (std::size_t b = 0; b < banks.size(); ++b) {
      workspace += H * queries[b].dim(0) * splits * std::min<index_t>(k, banks[b]->num_chunks());
    }
    partial_.resize({workspace});
    index_t offset = 0;
    for (std::size_t b = 0; b < banks.size(); ++b) {
      const DeviceMemoryBank<S>& bank = *banks[b];
      const index_t Tq = queries[b].dim(0), kk = std::min<index_t>(k, bank.num_chunks());
      detail::RetrievalBank<S>& d = L.bank[b];
      d.chunk_keys = bank.chunk_keys().data();
      d.keys = bank.keys().data();
      d.values = bank.values().data();
      d.queries = queries[b].data();
      d.partial = partial_.data() + offset;
      d.slots = dst[b].slots;
      d.scores = dst[b].scores;
      d.out_keys = Gather ? dst[b].keys : nullptr;
      d.out_values = Gather ? dst[b].values : nullptr;
      d.capacity = bank.geometry().capacity_chunks;
      d.chunks = bank.num_chunks();
      d.oldest = bank.oldest_slot();
      d.n_queries = static_cast<int>(Tq);
      d.kept = Tq == 0 ? 0 : static_cast<int>(kk);  // 0: the bank takes no part in this launch
      offset += H * Tq * splits * kk;
    }

    if (tensor_cores) {  // K per (bank, head) for the prefilter's error bound
      key_max_.resize({static_cast<index_t>(L.n_banks) * H});
      detail::cuda_check(cudaMemsetAsync(key_max_.data(), 0, key_max_.bytes(), stream), "cudaMemsetAsync (retrieval key max)",
                         key_max_.bytes());
      const int slices = static_cast<int>(std::clamp<index_t>(4 * sm_count_ / (static_cast<index_t>(H) * L.n_banks), 1, 64));
      detail::retrieval_key_max_kernel<S>
          <<<dim3(static_cast<unsigned>(slices), static_cast<unsigned>(H), static_cast<unsigned>(L.n_banks)), 256, 0, stream>>>(
              L, key_max_.data());
      check_launch(who, "key max");
      L.key_max = key_max_.data();
    }
    const dim3 select_grid(static_cast<unsigned>(splits), static_cast<unsigned>((max_T + Tl::queries - 1) / Tl::queries),
                           static_cast<unsigned>(H * L.n_banks));
    select<<<select_grid, Tl::threads, smem, stream>>>(L);
    check_launch(who, "select");
    constexpr int merge_threads = 256;
    const index_t warps = max_T * H;
    const dim3 merge_grid(static_cast<unsigned>((warps + merge_threads / 32 - 1) / (merge_threads / 32)),
                          static_cast<unsigned>(L.n_banks));
    detail::retrieval_merge_kernel<S, O><<<merge_grid, merge_threads, 0, stream>>>(L);
    check_launch(who, "merge");
  }

  static void check_launch(const char* who, const char* kernel) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
      detail::fail<BackendError>(who, ": the ", kernel, " kernel failed to launch: ", cudaGetErrorString(err), " (",
                                 cudaGetErrorName(err), ")");
    }
  }

  // Grid y counts query tiles (at most 65535).
  static constexpr index_t max_queries = index_t{65535} * detail::RetrievalTile::queries;

  FusedRetrieverTuning tuning_{};
  int sm_count_ = 0;
  int smem_optin_ = 0;
  int blocks_per_sm_ = 0;  // select blocks resident per SM at the last launch (0: none yet)
  Tensor<std::uint64_t, Device> partial_;  // (sum over banks of H * T * splits * k') candidate keys
  Tensor<std::uint32_t, Device> key_max_;  // (banks of a launch, H) the tensor-core path's K, as float bits
  Tensor<float, Device> widened_;          // (N, H, dh) bf16 queries as float
};

static_assert(ChunkRetrieverFor<FusedChunkRetriever, DeviceMemoryBank<float>>);
static_assert(ChunkRetrieverFor<FusedChunkRetriever, DeviceMemoryBank<__half>>);
static_assert(ChunkRetrieverFor<FusedChunkRetriever, DeviceMemoryBank<__nv_bfloat16>>);

}  // namespace longmem
