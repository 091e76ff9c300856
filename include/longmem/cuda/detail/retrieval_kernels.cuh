#pragma once
// Kernels of FusedChunkRetriever (cuda/chunk_retriever.cuh); users never name these.
//
// Legend: B banks in one launch, H heads, T queries of a bank, C slots, n valid chunks,
// dh head dim, csz chunk size, kk = k' chunks kept, S chunk-range splits.
//
//   retrieval_select_kernel   grid (S, ceil(T / 128), H * B), 256 threads
//       One block: 128 queries of one head of one bank against the chunks of its split
//       [c_begin, c_end). The query tile (dh, 128) stays in shared memory; chunk keys come in
//       tiles of 64 (the next tile's loads in flight, in registers, during this tile's FMAs): each
//       thread computes an 8 x 4 register tile of scores with fp32 FMA. With the threshold filter
//       (the default) each thread then compares its scores with its rows' running thresholds (the
//       k'-th best score so far, shared memory); only when some row of the block has a score at or
//       above its threshold does the (128, 64) tile go to shared memory (over the chunk keys it was
//       computed from), and then only the flagged rows are merged, each by a warp, into their
//       running top-kk lists (shared memory, best first). Without the filter every row of every
//       tile is merged. Only the S per-split lists of kk entries per query reach global memory;
//       the score matrix never does.
//   retrieval_merge_kernel    grid (ceil(T * H / 8), B), 256 threads
//       One warp per (bank, t, h): merges the S lists (each sorted, so a list is read only as far
//       as it still beats the running k'-th), writes slots and scores, and (optionally) gathers
//       the chosen chunks' keys and values as float.
//
// Exactness: scores are fp32 FMA chains over d = 0 .. dh-1 in order, the same for a chunk in
// every tile and split, so duplicated chunk keys give bit-identical scores and the tie rule is
// applied exactly. Tensor-core scores (fp16/bf16/TF32 products) would change which chunks win, so
// they are never the scores: the optional tensor-core prefilter (retrieval_select_tc_kernel) uses
// them, with an error bound, only to skip chunks, and rescores the rest with this fp32 chain.
//
// Ordering key: one uint64 per (chunk, score): the score mapped to an order-preserving uint32
// (NaN as -inf, -0 as +0) in the high half, and 0xffffffff - age in the low half, where age is
// the chunk's rank from the oldest stored chunk. Larger key = better: higher score, then older
// chunk, which is the library's tie rule even on a wrapped ring. Keys of distinct chunks never
// compare equal; 0 is below every real key and marks an empty list entry.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "longmem/cuda/detail/retrieval_storage.cuh"
#include "longmem/tensor.hpp"

namespace longmem::detail {

/// Shape of the select kernel's tiles (compile-time: they set the register tile).
struct RetrievalTile {
  static constexpr int queries = 128;        // query rows per block
  static constexpr int chunks = 64;          // chunk keys per tile
  static constexpr int threads = 256;        // 16 x 16 threads
  static constexpr int rows_per_thread = 8;  // queries of a thread's register tile (contiguous)
  static constexpr int cols_per_thread = 4;  // chunks of a thread's register tile (stride 16)
  static constexpr int max_kept = 128;       // kk <= 4 list entries per lane of a warp
  static constexpr int merge_warps = threads / 32;
};
static_assert(RetrievalTile::queries == 16 * RetrievalTile::rows_per_thread);
static_assert(RetrievalTile::chunks == 16 * RetrievalTile::cols_per_thread);

inline constexpr int retrieval_max_banks = 32;  // banks per launch (the descriptors travel as a kernel parameter)
inline constexpr int retrieval_list_regs = RetrievalTile::max_kept / 32;

/// One bank's part of a launch.
template <class S>
struct RetrievalBank {
  const float* chunk_keys = nullptr;  // (H, C, dh)
  const S* keys = nullptr;            // (H, C, csz, dh)
  const S* values = nullptr;          // (H, C, csz, dh)
  const float* queries = nullptr;     // (T, H, dh)
  std::uint64_t* partial = nullptr;   // (H, T, splits, kk) workspace
  std::int32_t* slots = nullptr;      // (T, H, kk)
  float* scores = nullptr;            // (T, H, kk)
  float* out_keys = nullptr;          // (T, H, kk * csz, dh), null: no gather
  float* out_values = nullptr;        // (T, H, kk * csz, dh)
  index_t capacity = 0;               // C
  index_t chunks = 0;                 // n valid chunks
  index_t oldest = 0;                 // slot of the oldest chunk
  int n_queries = 0;                  // T
  int kept = 0;                       // kk
};

template <class S>
struct RetrievalLaunch {
  RetrievalBank<S> bank[retrieval_max_banks];
  int n_banks = 0;
  int n_head = 0, head_dim = 0, chunk_size = 0;
  int splits = 1;
};

/// The score as an order-preserving uint32 (NaN as -inf, -0 as +0): the high half of a key.
__device__ __forceinline__ std::uint32_t retrieval_order(float score) {
  if (score != score) score = -__int_as_float(0x7f800000);  // NaN ranks as -inf
  if (score == 0.0f) score = 0.0f;                          // -0 ties with +0, as float == says
  const std::uint32_t u = __float_as_uint(score);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/// Key of a chunk in `slot` (0 <= slot, oldest < capacity): no division, the age is one conditional add.
__device__ __forceinline__ std::uint64_t retrieval_key(float score, index_t slot, index_t oldest, index_t capacity) {
  index_t a = slot - oldest;
  if (a < 0) a += capacity;
  const auto age = static_cast<std::uint32_t>(a);
  return (static_cast<std::uint64_t>(retrieval_order(score)) << 32) | static_cast<std::uint64_t>(0xffffffffu - age);
}

__device__ inline float retrieval_key_score(std::uint64_t key) {
  std::uint32_t u = static_cast<std::uint32_t>(key >> 32);
  u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
  return __uint_as_float(u);
}

__device__ inline index_t retrieval_key_slot(std::uint64_t key, index_t oldest, index_t capacity) {
  const index_t age = static_cast<index_t>(0xffffffffu - static_cast<std::uint32_t>(key));
  return (oldest + age) % capacity;  // once per output entry
}

/// A warp's top-kk list, best first: entry e (< kk) is v[e / 32] on lane e % 32. Entries beyond
/// kk are ignored. Every function here is called by all 32 lanes with warp-uniform arguments.
struct RetrievalWarpList {
  std::uint64_t v[retrieval_list_regs];
  int kk;
  int lane;

  __device__ __forceinline__ void load(const std::uint64_t* list) {
#pragma unroll
    for (int r = 0; r < retrieval_list_regs; ++r) {
      const int e = lane + 32 * r;
      v[r] = e < kk ? list[e] : 0;
    }
  }
  __device__ __forceinline__ void store(std::uint64_t* list) const {
#pragma unroll
    for (int r = 0; r < retrieval_list_regs; ++r) {
      const int e = lane + 32 * r;
      if (e < kk) list[e] = v[r];
    }
  }
  /// Entry i, on every lane.
  __device__ __forceinline__ std::uint64_t at(int i) const {
    // One shuffle per register, then a select: picking the register first would let the
    // compiler turn it into a run-time indexed array, which lives in local memory.
    std::uint64_t x = 0;
#pragma unroll
    for (int r = 0; r < retrieval_list_regs; ++r) {
      const std::uint64_t y = __shfl_sync(0xffffffffu, v[r], i & 31);
      x = r == (i >> 5) ? y : x;
    }
    return x;
  }
  /// The kk-th best key (0 while the list is not full): a candidate must beat it.
  __device__ __forceinline__ std::uint64_t threshold() const { return at(kk - 1); }

  /// Inserts `key` (known to beat threshold()) in order; the last entry drops out.
  __device__ __forceinline__ void insert(std::uint64_t key) {
    int pos = 0;  // entries better than key
#pragma unroll
    for (int r = 0; r < retrieval_list_regs; ++r) {
      const int e = lane + 32 * r;
      pos += __popc(__ballot_sync(0xffffffffu, e < kk && v[r] > key));
    }
    std::uint64_t prev[retrieval_list_regs];  // entry e - 1
#pragma unroll
    for (int r = 0; r < retrieval_list_regs; ++r) {
      const std::uint64_t up = __shfl_up_sync(0xffffffffu, v[r], 1);
      const std::uint64_t carry = __shfl_sync(0xffffffffu, v[r > 0 ? r - 1 : 0], 31);
      prev[r] = lane > 0 ? up : (r > 0 ? carry : 0);
    }
#pragma unroll
    for (int r = 0; r < retrieval_list_regs; ++r) {
      const int e = lane + 32 * r;
      v[r] = e < pos ? v[r] : (e == pos ? key : prev[r]);
    }
  }

  /// Offers one key per lane (0 = nothing); the better ones enter.
  __device__ __forceinline__ void offer(std::uint64_t key, std::uint64_t& thr) {
    for (unsigned m = __ballot_sync(0xffffffffu, key > thr); m != 0; m &= m - 1) {
      const std::uint64_t cand = __shfl_sync(0xffffffffu, key, __ffs(static_cast<int>(m)) - 1);
      if (cand > thr) {  // the threshold may have risen since the ballot
        insert(cand);
        thr = threshold();
      }
    }
  }
};

/// Dynamic shared memory of the select kernel, in bytes: the lists, the per-row thresholds and
/// flags, the query tile, and one buffer that holds the chunk-key tile during the FMAs and the
/// score tile during the merge.
inline std::size_t retrieval_select_smem(int head_dim, int kept) {
  using Tl = RetrievalTile;
  const std::size_t k_stride = static_cast<std::size_t>(head_dim | 1);  // odd: conflict-free column reads
  const std::size_t key_tile = static_cast<std::size_t>(Tl::chunks) * k_stride * sizeof(float);
  const std::size_t score_tile = static_cast<std::size_t>(Tl::queries) * (Tl::chunks + 1) * sizeof(float);
  return static_cast<std::size_t>(Tl::queries) * static_cast<std::size_t>(kept) * sizeof(std::uint64_t) +  // lists
         static_cast<std::size_t>(Tl::queries) * (sizeof(std::uint32_t) + 1) +                            // thresholds, flags
         static_cast<std::size_t>(head_dim) * Tl::queries * sizeof(float) +                                // query tile
         (key_tile > score_tile ? key_tile : score_tile);
}

/// Chunk-key elements per thread that the select kernel fetches into registers one tile ahead
/// (all of a tile up to head_dim 64; the rest of a wider tile is read when it is stored).
inline constexpr int retrieval_prefetch = RetrievalTile::chunks * 64 / RetrievalTile::threads;

/// The select kernel. Filter = true (the default path): each query row keeps the high half of its
/// k'-th key (the order-mapped score, retrieval_order) in shared memory; after the FMAs every
/// thread compares its scores with its rows' thresholds, flags the rows that have a score >= the
/// threshold (equal scores must still be compared by the full key: an older chunk beats a newer
/// one), and the tile is written to shared memory and merged only when some row of the block is
/// flagged (__syncthreads_or), and then only the flagged rows. The merge itself is unchanged
/// (it compares full keys), so the filter only skips candidates that could not enter a list:
/// a candidate with retrieval_order(score) < threshold's high half has key < threshold.
/// Filter = false: every tile is merged for every row (the previous path, kept for comparison).
template <class S, bool Filter>
__global__ void __launch_bounds__(RetrievalTile::threads)
    retrieval_select_kernel(const __grid_constant__ RetrievalLaunch<S> L) {
  using Tl = RetrievalTile;
  constexpr int PF = retrieval_prefetch;
  const int H = L.n_head, dh = L.head_dim, splits = L.splits;
  const int split = static_cast<int>(blockIdx.x);
  const int q0 = static_cast<int>(blockIdx.y) * Tl::queries;
  const int b = static_cast<int>(blockIdx.z) / H, h = static_cast<int>(blockIdx.z) % H;
  const RetrievalBank<S>& bank = L.bank[b];
  const int T = bank.n_queries, kk = bank.kept;
  if (q0 >= T || kk == 0) return;  // uniform over the block, before any barrier

  const index_t n = bank.chunks, C = bank.capacity;
  const index_t per_split = (n + splits - 1) / splits;
  const index_t c_begin = min(n, split * per_split), c_end = min(n, c_begin + per_split);
  const int k_stride = dh | 1;
  const int k_pad = k_stride - dh;  // element e = c * dh + d of a tile goes to c * k_stride + d = e + k_pad * c
  const float inv_dh = 1.0f / static_cast<float>(dh);
  const int tile_elems = Tl::chunks * dh;

  extern __shared__ __align__(16) unsigned char retrieval_smem[];
  auto* lists = reinterpret_cast<std::uint64_t*>(retrieval_smem);            // (128, kk)
  auto* thr_s = reinterpret_cast<std::uint32_t*>(lists + Tl::queries * kk);  // (128): high half of the kk-th key
  auto* flag_s = reinterpret_cast<unsigned char*>(thr_s + Tl::queries);     // (128): row has a candidate
  float* q_s = reinterpret_cast<float*>(flag_s + Tl::queries);              // (dh, 128): query tile, transposed
  float* k_s = q_s + dh * Tl::queries;                                      // (64, k_stride): chunk keys, then
  float* s_s = k_s;                                                         // (128, 65): scores, in the same bytes

  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int tx = tid & 15, ty = tid >> 4;

  for (int e = tid; e < Tl::queries * kk; e += Tl::threads) lists[e] = 0;
  for (int e = tid; e < Tl::queries; e += Tl::threads) {
    thr_s[e] = 0;  // an empty list takes anything
    flag_s[e] = 0;
  }
  for (int e = tid; e < Tl::queries * dh; e += Tl::threads) {
    const int qi = e / dh, d = e % dh;
    const int t = q0 + qi;
    q_s[d * Tl::queries + qi] = t < T ? bank.queries[(static_cast<index_t>(t) * H + h) * dh + d] : 0.0f;
  }

  const float* ck = bank.chunk_keys + static_cast<index_t>(h) * C * dh;  // (C, dh) of head h
  // Tile c0's first PF * 256 elements in registers (slots c0 .. c0 + nc - 1 are contiguous).
  float pf[PF];
  auto fetch = [&](index_t c0) {
    const int valid = static_cast<int>(min(static_cast<index_t>(Tl::chunks), c_end - c0)) * dh;
    const float* src = ck + c0 * dh;
#pragma unroll
    for (int r = 0; r < PF; ++r) {
      const int e = tid + Tl::threads * r;
      pf[r] = e < valid ? src[e] : 0.0f;
    }
  };
  if (c_begin < c_end) fetch(c_begin);
  __syncthreads();  // lists, thresholds and flags initialised (the query tile is covered by the next barrier)

  for (index_t c0 = c_begin; c0 < c_end; c0 += Tl::chunks) {
    const int nc = static_cast<int>(min(static_cast<index_t>(Tl::chunks), c_end - c0));
    {  // Store the fetched tile (and, past head_dim 64, read the rest of it).
      const int valid = nc * dh;
      const float* src = ck + c0 * dh;
#pragma unroll
      for (int r = 0; r < PF; ++r) {
        const int e = tid + Tl::threads * r;
        // c = e / dh exactly: (e + 0.5) / dh is at least 0.5 / dh away from an integer, far more
        // than the float rounding of (e + 0.5) * inv_dh (e < 64 * dh).
        const int c = static_cast<int>((static_cast<float>(e) + 0.5f) * inv_dh);
        if (e < tile_elems) k_s[e + k_pad * c] = pf[r];
      }
      for (int e = tid + Tl::threads * PF; e < tile_elems; e += Tl::threads) {
        const int c = static_cast<int>((static_cast<float>(e) + 0.5f) * inv_dh);
        k_s[e + k_pad * c] = e < valid ? src[e] : 0.0f;
      }
    }
    __syncthreads();
    // The next tile's loads are in flight during this tile's FMAs.
    if (c0 + Tl::chunks < c_end) fetch(c0 + Tl::chunks);

    float acc[Tl::rows_per_thread][Tl::cols_per_thread];
#pragma unroll
    for (int i = 0; i < Tl::rows_per_thread; ++i) {
#pragma unroll
      for (int j = 0; j < Tl::cols_per_thread; ++j) acc[i][j] = 0.0f;
    }
    const float* qrow = q_s + ty * Tl::rows_per_thread;
#pragma unroll 4
    for (int d = 0; d < dh; ++d) {
      const float4 qa = *reinterpret_cast<const float4*>(qrow + d * Tl::queries);
      const float4 qb = *reinterpret_cast<const float4*>(qrow + d * Tl::queries + 4);
      const float qv[Tl::rows_per_thread] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
      float kv[Tl::cols_per_thread];
#pragma unroll
      for (int j = 0; j < Tl::cols_per_thread; ++j) kv[j] = k_s[(tx + 16 * j) * k_stride + d];
#pragma unroll
      for (int i = 0; i < Tl::rows_per_thread; ++i) {
#pragma unroll
        for (int j = 0; j < Tl::cols_per_thread; ++j) acc[i][j] = fmaf(qv[i], kv[j], acc[i][j]);
      }
    }

    bool merge = true;
    if constexpr (Filter) {
      // Flag the rows with a score that might enter their list (order >= the threshold's high half).
      int any = 0;
#pragma unroll
      for (int i = 0; i < Tl::rows_per_thread; ++i) {
        const int qi = ty * Tl::rows_per_thread + i;
        const std::uint32_t thr = thr_s[qi];
        bool pass = false;
#pragma unroll
        for (int j = 0; j < Tl::cols_per_thread; ++j) {
          pass |= (tx + 16 * j < nc) && retrieval_order(acc[i][j]) >= thr;
        }
        if (pass && q0 + qi < T) {
          flag_s[qi] = 1;
          any = 1;
        }
      }
      // Every warp is done with the chunk keys (the scores may overwrite them), and the flags are visible.
      merge = __syncthreads_or(any) != 0;
    } else {
      __syncthreads();  // every warp is done with the chunk keys: the scores overwrite them
    }
    if (!merge) continue;  // uniform: no row of the block has a candidate in this tile

#pragma unroll
    for (int i = 0; i < Tl::rows_per_thread; ++i) {
#pragma unroll
      for (int j = 0; j < Tl::cols_per_thread; ++j) {
        s_s[(ty * Tl::rows_per_thread + i) * (Tl::chunks + 1) + tx + 16 * j] = acc[i][j];
      }
    }
    __syncthreads();

    // Merge: warp w takes query rows w, w + 8, ... (the conditions are uniform per warp).
    for (int qi = warp; qi < Tl::queries; qi += Tl::merge_warps) {
      if (q0 + qi >= T) break;
      if constexpr (Filter) {
        const bool flagged = flag_s[qi] != 0;
        __syncwarp();  // every lane has read the flag before lane 0 clears it
        if (!flagged) continue;
        if (lane == 0) flag_s[qi] = 0;
      }
      RetrievalWarpList list{{}, kk, lane};
      list.load(lists + qi * kk);
      std::uint64_t thr = list.threshold();
      const float* row = s_s + qi * (Tl::chunks + 1);
#pragma unroll
      for (int half = 0; half < Tl::chunks / 32; ++half) {
        const int c = lane + 32 * half;
        const std::uint64_t key = c < nc ? retrieval_key(row[c], c0 + c, bank.oldest, C) : 0;
        list.offer(key, thr);
      }
      list.store(lists + qi * kk);
      if constexpr (Filter) {
        if (lane == 0) thr_s[qi] = static_cast<std::uint32_t>(thr >> 32);  // thr is the list's kk-th key
      }
    }
    __syncthreads();  // the next tile's chunk keys overwrite the scores; thresholds and flags visible
  }

  // This split's lists (all zeros when the split is empty) to the workspace.
  for (int qi = warp; qi < Tl::queries; qi += Tl::merge_warps) {
    const int t = q0 + qi;
    if (t >= T) break;
    std::uint64_t* dst = bank.partial + ((static_cast<index_t>(h) * T + t) * splits + split) * kk;
    for (int e = lane; e < kk; e += 32) dst[e] = lists[qi * kk + e];
  }
}

// ------------------------------------------------------------------------------------------------
// Tensor-core prefilter (FusedRetrieverTuning::tensor_core_prefilter; head_dim a multiple of 16).
//
// The same blocks, tiles, lists and merge as retrieval_select_kernel, but the (128, 64) tile of
// scores is first computed APPROXIMATELY on the tensor cores (mma.sync m16n8k16, bf16 inputs
// rounded to nearest, fp32 accumulation; warp w owns query rows 16w .. 16w + 15 of all 64 chunks).
// A (row, chunk) pair is a candidate, rescored exactly (the same fp32 FMA chain over d = 0 .. dh-1
// as retrieval_select_kernel, so bit-identical scores; one candidate a lane, 32 at a time) and
// offered to its row's list, only when its approximate score a satisfies
//     a + E >= thr   (thr: the row's k'-th best exact score so far, -inf while the list is not full)
// where E bounds |a - s| for the exact fp32 score s:
//     E = (2^-7 + 2^-11) (1 + 2^-8) ||q||_1 ||k||_inf + 2^-124 (||q||_1 + ||k||_1 + dh).
// Derivation (u = 2^-8, bf16 round to nearest; subnormal inputs rounded or flushed: +2^-126 each):
//   |q~k~ - qk| <= (2u + u^2)|q||k| + 2^-125 (|q| + |k| + 2^-126) per product;
//   tensor-core fp32 accumulation (products exact, sums aligned/truncated, any order): assumed
//   <= 2^-12 sum |q~k~| + dh 2^-125, far above the ~dh 2^-23 of the published measurements (Fasi
//   et al. 2021; NVIDIA does not document it);
//   the exact chain: <= gamma_dh sum |qk| + dh 2^-149, gamma_dh <= 2^-14 for dh <= 1024;
//   sum |qk| <= ||q||_1 ||k||_inf; the (1 + 2^-8) absorbs the rounding of the norms and of E.
// A pair with ||q||_1 ||k||_inf above 2^100 (or inf/NaN) always passes (no overflow anywhere
// below), as does a NaN a. Any chunk whose exact key could enter (key > the list's kk-th key)
// has s >= thr, hence a + E >= thr: the filter only skips chunks the exact merge would reject,
// and the lists come out bit for bit as retrieval_select_kernel's.

/// Shared memory of the tensor-core select kernel, in bytes (head_dim % 16 == 0).
inline std::size_t retrieval_select_tc_smem(int head_dim, int kept) {
  using Tl = RetrievalTile;
  const std::size_t dh = static_cast<std::size_t>(head_dim), ldb = dh + 8;
  const std::size_t k_stride = static_cast<std::size_t>(head_dim | 1);
  return static_cast<std::size_t>(Tl::queries) * static_cast<std::size_t>(kept) * sizeof(std::uint64_t) +  // lists
         static_cast<std::size_t>(Tl::queries) * 2 * sizeof(float) +    // thresholds, ||q||_1
         static_cast<std::size_t>(Tl::chunks) * 2 * sizeof(float) +     // ||k||_1, ||k||_inf
         dh * Tl::queries * sizeof(float) +                             // query tile, fp32, transposed
         static_cast<std::size_t>(Tl::chunks) * k_stride * sizeof(float) +  // chunk keys, fp32
         static_cast<std::size_t>(Tl::queries) * ldb * 2 +              // query tile, bf16, row-major
         static_cast<std::size_t>(Tl::chunks) * ldb * 2 +               // chunk keys, bf16
         static_cast<std::size_t>(Tl::queries) * Tl::chunks * 2;        // candidates, (row << 6 | chunk) per warp
}

/// D += A B on the tensor cores: m16n8k16, A row-major bf16 (a0..a3), B col-major bf16 (b0, b1), fp32.
__device__ __forceinline__ void retrieval_mma_bf16(float (&d)[4], std::uint32_t a0, std::uint32_t a1, std::uint32_t a2,
                                                   std::uint32_t a3, std::uint32_t b0, std::uint32_t b1) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#elif defined(LONGMEM_SIMT_MMA_BF16)
  LONGMEM_SIMT_MMA_BF16(d, a0, a1, a2, a3, b0, b1);  // a host simulator's stand-in
#else
  (void)d, (void)a0, (void)a1, (void)a2, (void)a3, (void)b0, (void)b1;
#endif
}

__device__ __forceinline__ std::uint32_t retrieval_ld_pair(const __nv_bfloat16* p) {
  return *reinterpret_cast<const std::uint32_t*>(p);
}

template <class S>
__global__ void __launch_bounds__(RetrievalTile::threads)
    retrieval_select_tc_kernel(const __grid_constant__ RetrievalLaunch<S> L) {
  using Tl = RetrievalTile;
  constexpr int PF = retrieval_prefetch;
  const int H = L.n_head, dh = L.head_dim, splits = L.splits;
  const int split = static_cast<int>(blockIdx.x);
  const int q0 = static_cast<int>(blockIdx.y) * Tl::queries;
  const int b = static_cast<int>(blockIdx.z) / H, h = static_cast<int>(blockIdx.z) % H;
  const RetrievalBank<S>& bank = L.bank[b];
  const int T = bank.n_queries, kk = bank.kept;
  if (q0 >= T || kk == 0) return;  // uniform over the block, before any barrier

  const index_t n = bank.chunks, C = bank.capacity;
  const index_t per_split = (n + splits - 1) / splits;
  const index_t c_begin = min(n, split * per_split), c_end = min(n, c_begin + per_split);
  const int k_stride = dh | 1;
  const int k_pad = k_stride - dh;
  const int ldb = dh + 8;  // bf16 rows padded by 16 bytes: conflict-free fragment loads
  const float inv_dh = 1.0f / static_cast<float>(dh);
  const int tile_elems = Tl::chunks * dh;
  const float neg_inf = -__int_as_float(0x7f800000);

  extern __shared__ __align__(16) unsigned char retrieval_smem[];
  auto* lists = reinterpret_cast<std::uint64_t*>(retrieval_smem);  // (128, kk)
  float* thr_s = reinterpret_cast<float*>(lists + Tl::queries * kk);  // (128): k'-th best exact score, -inf: not full
  float* q1_s = thr_s + Tl::queries;                                  // (128): ||q||_1
  float* k1_s = q1_s + Tl::queries;                                   // (64): ||k||_1
  float* kinf_s = k1_s + Tl::chunks;                                  // (64): ||k||_inf
  float* q_s = kinf_s + Tl::chunks;                                   // (dh, 128)
  float* k_s = q_s + dh * Tl::queries;                                // (64, k_stride)
  auto* qb_s = reinterpret_cast<__nv_bfloat16*>(k_s + Tl::chunks * k_stride);  // (128, ldb)
  __nv_bfloat16* kb_s = qb_s + Tl::queries * ldb;                               // (64, ldb)
  auto* cand_s = reinterpret_cast<std::uint16_t*>(kb_s + Tl::chunks * ldb);      // (8 warps, 16 * 64)

  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tig = lane & 3;

  for (int e = tid; e < Tl::queries * kk; e += Tl::threads) lists[e] = 0;
  for (int e = tid; e < Tl::queries; e += Tl::threads) thr_s[e] = neg_inf;
  for (int e = tid; e < Tl::queries * dh; e += Tl::threads) {
    const int qi = e / dh, d = e % dh;
    const int t = q0 + qi;
    const float x = t < T ? bank.queries[(static_cast<index_t>(t) * H + h) * dh + d] : 0.0f;
    q_s[d * Tl::queries + qi] = x;
    qb_s[qi * ldb + d] = __float2bfloat16_rn(x);
  }

  const float* ck = bank.chunk_keys + static_cast<index_t>(h) * C * dh;
  float pf[PF];
  auto fetch = [&](index_t c0) {
    const int valid = static_cast<int>(min(static_cast<index_t>(Tl::chunks), c_end - c0)) * dh;
    const float* src = ck + c0 * dh;
#pragma unroll
    for (int r = 0; r < PF; ++r) {
      const int e = tid + Tl::threads * r;
      pf[r] = e < valid ? src[e] : 0.0f;
    }
  };
  if (c_begin < c_end) fetch(c_begin);
  __syncthreads();
  if (tid < Tl::queries) {
    float s1 = 0.0f;
    for (int d = 0; d < dh; ++d) s1 += fabsf(q_s[d * Tl::queries + tid]);
    q1_s[tid] = s1;  // read after the tile loop's first barrier
  }

  constexpr float coef = (0x1p-7f + 0x1p-11f) * (1.0f + 0x1p-8f);
  for (index_t c0 = c_begin; c0 < c_end; c0 += Tl::chunks) {
    const int nc = static_cast<int>(min(static_cast<index_t>(Tl::chunks), c_end - c0));
    {
      const int valid = nc * dh;
      const float* src = ck + c0 * dh;
#pragma unroll
      for (int r = 0; r < PF; ++r) {
        const int e = tid + Tl::threads * r;
        const int c = static_cast<int>((static_cast<float>(e) + 0.5f) * inv_dh);  // e / dh, exactly
        if (e < tile_elems) {
          k_s[e + k_pad * c] = pf[r];
          kb_s[c * ldb + (e - c * dh)] = __float2bfloat16_rn(pf[r]);
        }
      }
      for (int e = tid + Tl::threads * PF; e < tile_elems; e += Tl::threads) {
        const int c = static_cast<int>((static_cast<float>(e) + 0.5f) * inv_dh);
        const float x = e < valid ? src[e] : 0.0f;
        k_s[e + k_pad * c] = x;
        kb_s[c * ldb + (e - c * dh)] = __float2bfloat16_rn(x);
      }
    }
    __syncthreads();
    if (c0 + Tl::chunks < c_end) fetch(c0 + Tl::chunks);

    {  // ||k||_1 and ||k||_inf of each chunk: four threads a chunk
      const int c = tid >> 2, part = tid & 3;
      float s1 = 0.0f, si = 0.0f;
      for (int d = part; d < dh; d += 4) {
        const float x = fabsf(k_s[c * k_stride + d]);
        s1 += x;
        si = x > si || x != x ? x : si;  // a NaN stays (fmaxf would drop it)
      }
#pragma unroll
      for (int m = 1; m <= 2; m <<= 1) {
        s1 += __shfl_xor_sync(0xffffffffu, s1, m);
        const float o = __shfl_xor_sync(0xffffffffu, si, m);
        si = o > si || o != o ? o : si;
      }
      if (part == 0) {
        k1_s[c] = s1;
        kinf_s[c] = si;
      }
    }

    // Approximate scores: warp w, rows 16w + g and 16w + g + 8, chunks nt * 8 + 2 tig + {0, 1}.
    float acc[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;
    }
    {
      const __nv_bfloat16* qa = qb_s + (16 * warp + g) * ldb + 2 * tig;
      const __nv_bfloat16* kbp = kb_s + g * ldb + 2 * tig;
      for (int k0 = 0; k0 < dh; k0 += 16) {
        const std::uint32_t a0 = retrieval_ld_pair(qa + k0), a1 = retrieval_ld_pair(qa + 8 * ldb + k0);
        const std::uint32_t a2 = retrieval_ld_pair(qa + k0 + 8), a3 = retrieval_ld_pair(qa + 8 * ldb + k0 + 8);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const __nv_bfloat16* p = kbp + nt * 8 * ldb + k0;
          retrieval_mma_bf16(acc[nt], a0, a1, a2, a3, retrieval_ld_pair(p), retrieval_ld_pair(p + 8));
        }
      }
    }
    __syncthreads();  // the chunk norms are visible

    // This lane's candidates: bit half * 16 + nt * 2 + j for row 16w + g + 8 half, chunk nt * 8 + 2 tig + j.
    std::uint32_t cand = 0;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int qi = 16 * warp + g + 8 * half;
      const float thr = thr_s[qi], qn = q1_s[qi];
      const bool live = q0 + qi < T;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int c = nt * 8 + 2 * tig + j;
          const float a = acc[nt][2 * half + j];
          const float bound = qn * kinf_s[c];
          const float err = coef * bound + 0x1p-124f * (qn + k1_s[c] + static_cast<float>(dh));
          const bool pass = live && c < nc && (!(bound <= 0x1p100f) || !(a + err < thr));
          cand |= static_cast<std::uint32_t>(pass) << (half * 16 + nt * 2 + j);
        }
      }
    }
    // Compact the warp's candidates into its slice of cand_s, as (row - 16w) << 6 | chunk.
    const int mine = __popc(cand);
    int upto = mine;  // inclusive prefix sum over the lanes
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int o = __shfl_up_sync(0xffffffffu, upto, off);
      if (lane >= off) upto += o;
    }
    const int total = __shfl_sync(0xffffffffu, upto, 31);
    std::uint16_t* cw = cand_s + warp * (16 * Tl::chunks);
    {
      int slot = upto - mine;
      for (std::uint32_t m = cand; m != 0; m &= m - 1) {
        const int bit = __ffs(static_cast<int>(m)) - 1;
        const int r = g + 8 * (bit >> 4), c = ((bit >> 1) & 7) * 8 + 2 * tig + (bit & 1);
        cw[slot++] = static_cast<std::uint16_t>((r << 6) | c);
      }
    }
    __syncwarp();
    // Exact rescoring, 32 candidates at a time (one per lane), then each row's keys into its list.
    for (int p0 = 0; p0 < total; p0 += 32) {
      const int idx = p0 + lane;
      int r = -1;
      std::uint64_t key = 0;
      if (idx < total) {
        const int e = cw[idx];
        r = e >> 6;
        const int c = e & 63, qi = 16 * warp + r;
        const float* kr = k_s + c * k_stride;
        float sc = 0.0f;
        for (int d = 0; d < dh; ++d) sc = fmaf(q_s[d * Tl::queries + qi], kr[d], sc);  // the FMA path's chain
        key = retrieval_key(sc, c0 + c, bank.oldest, C);
      }
      unsigned present = r >= 0 ? 1u << r : 0u;
#pragma unroll
      for (int off = 16; off >= 1; off >>= 1) present |= __shfl_xor_sync(0xffffffffu, present, off);
      for (unsigned m = present; m != 0; m &= m - 1) {
        const int rr = __ffs(static_cast<int>(m)) - 1, qi = 16 * warp + rr;
        RetrievalWarpList list{{}, kk, lane};
        list.load(lists + qi * kk);
        std::uint64_t thr = list.threshold();
        list.offer(r == rr ? key : 0, thr);
        list.store(lists + qi * kk);
        if (lane == 0) thr_s[qi] = thr == 0 ? neg_inf : retrieval_key_score(thr);
        __syncwarp();  // the list's stores before the next pass loads it
      }
    }
    __syncthreads();  // the next tile overwrites the chunk keys
  }

  for (int qi = warp; qi < Tl::queries; qi += Tl::merge_warps) {
    const int t = q0 + qi;
    if (t >= T) break;
    std::uint64_t* dst = bank.partial + ((static_cast<index_t>(h) * T + t) * splits + split) * kk;
    for (int e = lane; e < kk; e += 32) dst[e] = lists[qi * kk + e];
  }
}

/// Eight consecutive elements from 16-byte aligned `src` (32-byte for float), as float.
template <class S>
__device__ __forceinline__ void retrieval_load8(const S* src, float (&dst)[8]) {
  if constexpr (std::is_same_v<S, float>) {
    const float4 a = reinterpret_cast<const float4*>(src)[0];
    const float4 b = reinterpret_cast<const float4*>(src)[1];
    dst[0] = a.x, dst[1] = a.y, dst[2] = a.z, dst[3] = a.w;
    dst[4] = b.x, dst[5] = b.y, dst[6] = b.z, dst[7] = b.w;
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const std::uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      S lo, hi;
      const std::uint16_t lo_bits = static_cast<std::uint16_t>(w[p] & 0xffffu);
      const std::uint16_t hi_bits = static_cast<std::uint16_t>(w[p] >> 16);
      memcpy(&lo, &lo_bits, 2);
      memcpy(&hi, &hi_bits, 2);
      dst[2 * p] = device_load(lo);
      dst[2 * p + 1] = device_load(hi);
    }
  }
}

template <class S>
__global__ void __launch_bounds__(256) retrieval_merge_kernel(const __grid_constant__ RetrievalLaunch<S> L) {
  const int H = L.n_head, dh = L.head_dim, csz = L.chunk_size, splits = L.splits;
  const int b = static_cast<int>(blockIdx.y);
  const RetrievalBank<S>& bank = L.bank[b];
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const index_t w = static_cast<index_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int T = bank.n_queries, kk = bank.kept;
  if (kk == 0 || w >= static_cast<index_t>(T) * H) return;  // uniform per warp; no block barriers below
  const int t = static_cast<int>(w / H), h = static_cast<int>(w % H);
  const index_t C = bank.capacity;

  const std::uint64_t* part = bank.partial + (static_cast<index_t>(h) * T + t) * splits * kk;  // (splits, kk)
  RetrievalWarpList list{{}, kk, lane};
  list.load(part);
  std::uint64_t thr = list.threshold();
  for (int sp = 1; sp < splits; ++sp) {
    const std::uint64_t* other = part + static_cast<index_t>(sp) * kk;
    for (int e0 = 0; e0 < kk; e0 += 32) {
      const int e = e0 + lane;
      const std::uint64_t key = e < kk ? other[e] : 0;
      // Lists are sorted: once none of these 32 beats the threshold, the rest cannot either.
      if (__ballot_sync(0xffffffffu, key > thr) == 0) break;
      list.offer(key, thr);
    }
  }

  const index_t o = (static_cast<index_t>(t) * H + h) * kk;  // (t, h, 0) of (T, H, kk)
#pragma unroll
  for (int r = 0; r < retrieval_list_regs; ++r) {
    const int e = lane + 32 * r;
    if (e < kk) {
      bank.slots[o + e] = static_cast<std::int32_t>(retrieval_key_slot(list.v[r], bank.oldest, C));
      bank.scores[o + e] = retrieval_key_score(list.v[r]);
    }
  }
  if (bank.out_keys == nullptr) return;
  const index_t chunk = static_cast<index_t>(csz) * dh;
  const auto addr_bits = reinterpret_cast<std::uintptr_t>(bank.keys) | reinterpret_cast<std::uintptr_t>(bank.values) |
                         reinterpret_cast<std::uintptr_t>(bank.out_keys) |
                         reinterpret_cast<std::uintptr_t>(bank.out_values);
  if (chunk % 8 == 0 && addr_bits % 16 == 0) {
    // 8 elements a lane at a time: 16-byte loads (two for float) and two 16-byte stores; every
    // chunk starts at a multiple of 8 elements, so every access is aligned.
#pragma unroll 2
    for (int i = 0; i < kk; ++i) {
      const index_t slot = retrieval_key_slot(list.at(i), bank.oldest, C);
      const S* sk = bank.keys + (static_cast<index_t>(h) * C + slot) * chunk;
      const S* sv = bank.values + (static_cast<index_t>(h) * C + slot) * chunk;
      float* dk = bank.out_keys + (o + i) * chunk;
      float* dv = bank.out_values + (o + i) * chunk;
      for (index_t e = 8 * lane; e < chunk; e += 8 * 32) {
        float fk[8], fv[8];
        retrieval_load8(sk + e, fk);
        retrieval_load8(sv + e, fv);
        reinterpret_cast<float4*>(dk + e)[0] = make_float4(fk[0], fk[1], fk[2], fk[3]);
        reinterpret_cast<float4*>(dk + e)[1] = make_float4(fk[4], fk[5], fk[6], fk[7]);
        reinterpret_cast<float4*>(dv + e)[0] = make_float4(fv[0], fv[1], fv[2], fv[3]);
        reinterpret_cast<float4*>(dv + e)[1] = make_float4(fv[4], fv[5], fv[6], fv[7]);
      }
    }
    return;
  }
  for (int i = 0; i < kk; ++i) {
    const index_t slot = retrieval_key_slot(list.at(i), bank.oldest, C);
    const S* sk = bank.keys + (static_cast<index_t>(h) * C + slot) * chunk;
    const S* sv = bank.values + (static_cast<index_t>(h) * C + slot) * chunk;
    float* dk = bank.out_keys + (o + i) * chunk;
    float* dv = bank.out_values + (o + i) * chunk;
    for (index_t e = lane; e < chunk; e += 32) {
      dk[e] = device_load(sk[e]);
      dv[e] = device_load(sv[e]);
    }
  }
}

}  // namespace longmem::detail
