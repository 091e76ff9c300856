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
//   retrieval_key_max_kernel + retrieval_select_tc_kernel   (the default where head_dim % 8 == 0, <= 64)
//       The same blocks and lists, the scores first approximated on the tensor cores (TF32) and
//       only the chunks that can still enter a list rescored exactly: see the section below.
//   retrieval_merge_kernel    grid (ceil(T * H / 8), B), 256 threads
//       One warp per (bank, t, h): merges the S lists (each sorted, so a list is read only as far
//       as it still beats the running k'-th), writes slots and scores, and (optionally) gathers
//       the chosen chunks' keys and values as float.
//
// Exactness: scores are fp32 FMA chains over d = 0 .. dh-1 in order, the same for a chunk in
// every tile and split, so duplicated chunk keys give bit-identical scores and the tie rule is
// applied exactly. Tensor-core scores (fp16/bf16/TF32 products) would change which chunks win, so
// they are never the scores: the tensor-core prefilter (retrieval_select_tc_kernel) uses them,
// with an error bound, only to skip chunks, and rescores the rest with this fp32 chain.
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

#include "longmem/cuda/detail/mma.cuh"
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
  void* out_keys = nullptr;           // (T, H, kk * csz, dh) of the merge kernel's O, null: no gather
  void* out_values = nullptr;         // (T, H, kk * csz, dh)
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
  bool seeded = true;                      // the tensor-core select seeds its cuts from sample tiles
  const std::uint32_t* key_max = nullptr;  // (n_banks, H) K of the tensor-core select (its bits), else null
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
/// R registers a lane: kk <= 32 R (R = 1 serves the usual k' <= 32 with a quarter of the shuffles).
template <int R = retrieval_list_regs>
struct RetrievalWarpList {
  static_assert(R >= 1 && R <= retrieval_list_regs);
  std::uint64_t v[R];
  int kk;
  int lane;

  __device__ __forceinline__ void load(const std::uint64_t* list) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int e = lane + 32 * r;
      v[r] = e < kk ? list[e] : 0;
    }
  }
  __device__ __forceinline__ void store(std::uint64_t* list) const {
#pragma unroll
    for (int r = 0; r < R; ++r) {
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
    for (int r = 0; r < R; ++r) {
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
    for (int r = 0; r < R; ++r) {
      const int e = lane + 32 * r;
      pos += __popc(__ballot_sync(0xffffffffu, e < kk && v[r] > key));
    }
    std::uint64_t prev[R];  // entry e - 1
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const std::uint64_t up = __shfl_up_sync(0xffffffffu, v[r], 1);
      std::uint64_t carry = 0;  // entry 32 r - 1 (r is a constant here: no shuffle for r = 0)
      if (r > 0) carry = __shfl_sync(0xffffffffu, v[r > 0 ? r - 1 : 0], 31);
      prev[r] = lane > 0 ? up : carry;
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
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
      RetrievalWarpList<> list{{}, kk, lane};
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
// Tensor-core prefilter (FusedRetrieverTuning::tensor_core_prefilter, the default; head_dim a
// multiple of 8, at most 64).
//
// The same blocks, lists and merge as retrieval_select_kernel (128 queries of one head of one
// bank, the chunk range of one split), but each (128, 64) tile of scores is first computed
// APPROXIMATELY on the tensor cores: mma.sync m16n8k8 TF32, warp w owns query rows 16w .. 16w + 15.
// The query fragments (rounded to TF32 once) stay in registers for the whole scan; the fp32 chunk
// keys come into shared memory by cp.async, the next tile in flight during this one, and go to the
// mma as they are (the tensor cores read the top 19 bits of each: truncation). Within each
// 8-wide slice of dh the mma's k index tig is d = 2 tig and tig + 4 is d = 2 tig + 1 (a dot
// product is order-free), so each B fragment is one 8-byte shared load.
// A (row, chunk) pair is a candidate, rescored exactly (the same fp32 FMA chain over d = 0 .. dh-1
// as retrieval_select_kernel, so bit-identical scores) and offered to its row's list, only when its
// approximate score a satisfies !(a < cut), where
//     cut = thr - (E + 2^-20 (|thr| + E)),   thr: the row's k'-th best exact score so far (-inf
//                                            while the list is not full)
//     E   = 2^-9 (1 + 2^-8) ||q||_1 K + 2^-118,   K = max |chunk key element| of the head,
// which bounds |a - s| for the exact fp32 score s. Derivation (per product, u = 2^-10):
//   query rounded to nearest (<= u/2), key truncated (< u), subnormals flushed (<= 2^-126 each):
//   |q~k~ - qk| <= (1.5 u + u^2/2)|q||k| + 2^-125;
//   tensor-core fp32 accumulation (products exact, sums aligned/truncated, any order): assumed
//   <= 2^-11 sum |q~k~| + dh 2^-125, far above the ~dh 2^-23 of published measurements (Fasi et
//   al. 2021; NVIDIA does not document it);
//   the exact chain: <= gamma_dh sum |qk| + dh 2^-149, gamma_dh <= 2^-17 for dh <= 64;
//   sum |qk| <= ||q||_1 K; the (1 + 2^-8) absorbs the rounding of the norms, 2^-118 the absolute
//   terms (dh <= 64), and 2^-20 (|thr| + E) the rounding of the subtraction.
// K comes from retrieval_key_max_kernel, run just before. A row with ||q||_1 K above 2^100 (or any
// inf/NaN in it) has E = inf, so cut = -inf (or NaN) and the row passes everything: no overflow
// can hide a chunk, and a NaN a passes too. Any chunk whose exact key could enter (key > the
// list's kk-th key) has s >= thr, hence a >= s - E >= cut: the filter only skips chunks that the
// exact merge would reject, and the lists come out bit for bit as retrieval_select_kernel's.
// Per warp and tile in the steady state: 8 * dh / 8 mma, as many 8-byte shared loads, one max
// over each row's 16 scores a lane and a warp vote; the rescoring and merging are rare.
//
// Seeded cuts. A list that starts empty takes every chunk of its first tile (64 exact rescorings
// and warp-sequential inserts per row, in every split) and many of the next: on an H200 that
// warm-up was about 70% of the time at 64 Ki tokens. So before its scan a block first scores a
// few sample tiles of its split (retrieval_seed_tiles, spread over it) approximately, keeps for
// each row the largest score of each of the 64 tile columns, and takes the kk-th largest a of
// those 64 maxima (kk <= 64). They belong to 64 distinct chunks, so at least kk chunks of the
// split have approximate scores >= a, hence exact scores >= a - E, and so does the split's kk-th
// best exact score: every chunk that the split's list keeps has s >= a - E and a' >= s - E. The
// row's cut starts at retrieval_tc_cut(a - E) (less a rounding margin) instead of -inf and never
// falls below it. The split's list comes out the same bits as without the seed: the seed only
// skips chunks that its exact merge would reject.

inline constexpr int retrieval_tc_pitch = 72;   // floats per chunk row in shared memory (conflict-free B loads)
inline constexpr int retrieval_tc_max_dh = 64;  // the query fragments live in registers

/// Whether the tensor-core select kernel takes this head dimension.
inline constexpr bool retrieval_tc_head_dim_ok(int head_dim) {
  return head_dim > 0 && head_dim % 8 == 0 && head_dim <= retrieval_tc_max_dh;
}

/// Shared memory of the tensor-core select kernel, in bytes.
inline std::size_t retrieval_select_tc_smem(int head_dim, int kept) {
  using Tl = RetrievalTile;
  return static_cast<std::size_t>(Tl::queries) * static_cast<std::size_t>(kept) * sizeof(std::uint64_t) +  // lists
         static_cast<std::size_t>(Tl::queries) * 3 * sizeof(float) +                       // cuts, E, seeds
         static_cast<std::size_t>(head_dim) * Tl::queries * sizeof(float) +                // query tile, transposed
         2 * static_cast<std::size_t>(Tl::chunks) * retrieval_tc_pitch * sizeof(float) +  // two chunk-key tiles
         static_cast<std::size_t>(Tl::queries) * Tl::chunks * sizeof(std::uint16_t);      // candidates per warp
}

/// K of every (bank, head): the largest |element| of its valid chunk keys, as the bits of a
/// non-negative float (unsigned order is then float order, and a NaN is above +inf). `key_max`
/// (banks, H) holds zeros on entry. Grid (slices, H, banks); head_dim % 4 == 0.
template <class S>
__global__ void __launch_bounds__(256)
    retrieval_key_max_kernel(const __grid_constant__ RetrievalLaunch<S> L, std::uint32_t* key_max) {
  const int b = static_cast<int>(blockIdx.z), h = static_cast<int>(blockIdx.y);
  const RetrievalBank<S>& bank = L.bank[b];
  if (bank.kept == 0) return;
  const index_t quads = bank.chunks * L.head_dim / 4;
  const auto* src = reinterpret_cast<const float4*>(bank.chunk_keys + static_cast<index_t>(h) * bank.capacity * L.head_dim);
  std::uint32_t m = 0;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < quads;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const float4 x = src[i];
    m = max(m, max(max(__float_as_uint(fabsf(x.x)), __float_as_uint(fabsf(x.y))),
                   max(__float_as_uint(fabsf(x.z)), __float_as_uint(fabsf(x.w)))));
  }
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
  if ((threadIdx.x & 31) == 0 && m != 0) atomicMax(key_max + b * L.n_head + h, m);
}

/// A row's cut (see above) from its threshold and error bound.
__device__ __forceinline__ float retrieval_tc_cut(float thr, float err) {
  return thr - (err + 0x1p-20f * (fabsf(thr) + err));
}

/// acc[nt] (rows g, g + 8; chunks nt * 8 + 2 tig + {0, 1}) = approximate scores of a 16 x 64
/// tile, KS k-steps of 8 (no branch inside: the accumulator chains stay in one basic block).
template <int KS>
__device__ __forceinline__ void retrieval_tc_scores(float (&acc)[8][4], const std::uint32_t (&af)[8][4],
                                                    const float* kt, int g, int tig) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;
  }
#pragma unroll
  for (int j = 0; j < KS; ++j) {
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const float2 bb = *reinterpret_cast<const float2*>(kt + (nt * 8 + g) * retrieval_tc_pitch + 8 * j + 2 * tig);
      cuda::mma_tf32(acc[nt], af[j], __float_as_uint(bb.x), __float_as_uint(bb.y));
    }
  }
}

/// Sample tiles of the seed pass for a split of `n_tiles` chunk tiles: all of a short split, else
/// an eighth, at least 8 and at most 32 (at 64 Ki tokens in 2 splits: 16 of 128 tiles).
__host__ __device__ constexpr int retrieval_seed_tiles(int n_tiles) {
  return n_tiles <= 8 ? n_tiles : (n_tiles / 8 < 8 ? 8 : (n_tiles / 8 > 32 ? 32 : n_tiles / 8));
}

/// The kk-th largest (1 <= kk <= 64) of the 64 values that the four lanes of a quad (lanes 4 g ..
/// 4 g + 3) hold in v, 0 when fewer than kk are non-zero: the largest x with at least kk values >= x,
/// found bit by bit from the top. Called by all 32 lanes.
__device__ __forceinline__ std::uint32_t retrieval_quad_kth_largest(const std::uint32_t (&v)[16], int kk) {
  std::uint32_t x = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const std::uint32_t c = x | (1u << bit);
    int n = 0;
#pragma unroll
    for (int i = 0; i < 16; ++i) n += v[i] >= c;
    n += __shfl_xor_sync(0xffffffffu, n, 1);
    n += __shfl_xor_sync(0xffffffffu, n, 2);
    if (n >= kk) x = c;
  }
  return x;
}

/// R: list registers a lane (1 when every bank's k' <= 32, else retrieval_list_regs).
template <class S, int R>
__global__ void __launch_bounds__(RetrievalTile::threads, 2)
    retrieval_select_tc_kernel(const __grid_constant__ RetrievalLaunch<S> L) {
  using Tl = RetrievalTile;
  constexpr int P = retrieval_tc_pitch;
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
  const float neg_inf = -__int_as_float(0x7f800000), pos_inf = __int_as_float(0x7f800000);

  extern __shared__ __align__(16) unsigned char retrieval_smem[];
  auto* lists = reinterpret_cast<std::uint64_t*>(retrieval_smem);   // (128, kk)
  float* cut_s = reinterpret_cast<float*>(lists + Tl::queries * kk);  // (128): the row's cut (+inf: no such query)
  float* err_s = cut_s + Tl::queries;                                 // (128): the row's E
  float* seed_s = err_s + Tl::queries;                                // (128): the row's seeded cut (-inf: none)
  float* q_s = seed_s + Tl::queries;                                  // (dh, 128): exact queries, transposed
  float* k_s = q_s + dh * Tl::queries;                                // (2, 64, P): chunk-key tiles
  auto* cand_s = reinterpret_cast<std::uint16_t*>(k_s + 2 * Tl::chunks * P);  // (8 warps, 16 * 64)

  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const float* ck = bank.chunk_keys + static_cast<index_t>(h) * C * dh;  // (C, dh) of head h

  // Tile c0 into buffer `buf`: a warp takes two chunk rows at a time in 16-byte pieces; rows at or
  // past c_end are zero-filled (and masked below).
  auto issue = [&](index_t c0, int buf) {
    float* dst = k_s + buf * Tl::chunks * P;
    const int part = lane & 15;
    if (4 * part < dh) {
      for (int c = 2 * warp + (lane >> 4); c < Tl::chunks; c += 2 * Tl::merge_warps) {
        const bool valid = c0 + c < c_end;
        cuda::cp_async16(dst + c * P + 4 * part, valid ? ck + (c0 + c) * dh + 4 * part : ck, valid);
      }
    }
    cuda::cp_async_commit();
  };

  for (int e = tid; e < Tl::queries * kk; e += Tl::threads) lists[e] = 0;
  for (int e = tid; e < Tl::queries * dh; e += Tl::threads) {
    const int qi = e / dh, d = e % dh;
    const int t = q0 + qi;
    q_s[d * Tl::queries + qi] = t < T ? bank.queries[(static_cast<index_t>(t) * H + h) * dh + d] : 0.0f;
  }
  __syncthreads();

  if (tid < Tl::queries) {  // read after the tile loop's first barrier
    float q1 = 0.0f;
    for (int d = 0; d < dh; ++d) q1 += fabsf(q_s[d * Tl::queries + tid]);
    const float bound = q1 * __uint_as_float(L.key_max[b * H + h]);
    err_s[tid] = bound <= 0x1p100f ? 0x1p-9f * (1.0f + 0x1p-8f) * bound + 0x1p-118f : pos_inf;
    cut_s[tid] = q0 + tid < T ? neg_inf : pos_inf;  // the list is empty: thr = -inf
    seed_s[tid] = neg_inf;                         // no seed (yet)
  }
  const int r0 = 16 * warp + g;  // this lane's rows: r0 and r0 + 8
  std::uint32_t af[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int d = 8 * j + 2 * tig;
    const bool in = d < dh;
    af[j][0] = in ? cuda::to_tf32(q_s[d * Tl::queries + r0]) : 0u;
    af[j][1] = in ? cuda::to_tf32(q_s[d * Tl::queries + r0 + 8]) : 0u;
    af[j][2] = in ? cuda::to_tf32(q_s[(d + 1) * Tl::queries + r0]) : 0u;
    af[j][3] = in ? cuda::to_tf32(q_s[(d + 1) * Tl::queries + r0 + 8]) : 0u;
  }

  auto scores = [&](float (&acc)[8][4], const float* kt) {
    switch (dh / 8) {
      case 1: retrieval_tc_scores<1>(acc, af, kt, g, tig); break;
      case 2: retrieval_tc_scores<2>(acc, af, kt, g, tig); break;
      case 3: retrieval_tc_scores<3>(acc, af, kt, g, tig); break;
      case 4: retrieval_tc_scores<4>(acc, af, kt, g, tig); break;
      case 5: retrieval_tc_scores<5>(acc, af, kt, g, tig); break;
      case 6: retrieval_tc_scores<6>(acc, af, kt, g, tig); break;
      case 7: retrieval_tc_scores<7>(acc, af, kt, g, tig); break;
      default: retrieval_tc_scores<8>(acc, af, kt, g, tig); break;
    }
  };

  // Seed (see "Seeded cuts" above): approximate scores of sample tiles of this split, the largest
  // of each of a row's 64 tile columns, and from their kk-th largest a first cut for the row.
  const index_t n_split = c_end - c_begin;
  if (L.seeded && kk <= Tl::chunks && n_split >= Tl::chunks) {  // uniform over the block
    const int n_tiles = static_cast<int>((n_split + Tl::chunks - 1) / Tl::chunks);
    const int samples = retrieval_seed_tiles(n_tiles);
    auto sample_c0 = [&](int i) {  // distinct tiles spread over the split (samples <= n_tiles)
      return c_begin + static_cast<index_t>(static_cast<long long>(i) * n_tiles / samples) * Tl::chunks;
    };
    std::uint32_t best[2][16];  // order keys (0: none) of rows r0 / r0 + 8, column nt * 8 + 2 tig + j at [2 nt + j]
#pragma unroll
    for (int i = 0; i < 16; ++i) best[0][i] = best[1][i] = 0u;
    issue(sample_c0(0), 0);
    for (int i = 0; i < samples; ++i) {
      const index_t s0 = sample_c0(i);
      const int nc = static_cast<int>(min(static_cast<index_t>(Tl::chunks), c_end - s0));
      cuda::cp_async_wait<0>();
      __syncthreads();  // sample i is in; every warp is done with sample i - 1, whose buffer comes next
      if (i + 1 < samples) issue(sample_c0(i + 1), (i + 1) & 1);
      float acc[8][4];
      scores(acc, k_s + (i & 1) * Tl::chunks * P);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          if (nt * 8 + 2 * tig + j < nc) {
            best[0][2 * nt + j] = max(best[0][2 * nt + j], retrieval_order(acc[nt][j]));
            best[1][2 * nt + j] = max(best[1][2 * nt + j], retrieval_order(acc[nt][2 + j]));
          }
        }
      }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const std::uint32_t kth = retrieval_quad_kth_largest(best[half], kk);  // every lane: the shuffles
      const int row = r0 + 8 * half;
      if (tig == 0 && q0 + row < T) {
        const float err = err_s[row];
        if (kth != 0u && err < pos_inf) {
          const float a = retrieval_key_score(static_cast<std::uint64_t>(kth) << 32);
          // kk chunks of the split score >= a approximately, so >= a - E exactly: so does the
          // split's kk-th best (the margin covers the rounding of a - E).
          const float seed = retrieval_tc_cut((a - err) - 0x1p-20f * (fabsf(a) + err), err);
          seed_s[row] = seed;
          cut_s[row] = seed;
        }
      }
    }
    __syncthreads();  // every warp is done with the samples (buffer 0 is refilled next); seeds visible
  }

  if (c_begin < c_end) issue(c_begin, 0);
  int it = 0;
  for (index_t c0 = c_begin; c0 < c_end; c0 += Tl::chunks, ++it) {
    const int nc = static_cast<int>(min(static_cast<index_t>(Tl::chunks), c_end - c0));
    cuda::cp_async_wait<0>();
    __syncthreads();  // tile `it` is in; every warp is done with tile it - 1, whose buffer comes next
    if (c0 + Tl::chunks < c_end) issue(c0 + Tl::chunks, (it + 1) & 1);
    const float* kt = k_s + (it & 1) * Tl::chunks * P;

    float acc[8][4];
    scores(acc, kt);

    // Quick test: the best of each row's 16 scores on this lane against the row's cut.
    const float cut0 = cut_s[r0], cut1 = cut_s[r0 + 8];
    float m0 = neg_inf, m1 = neg_inf;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        m0 = fmaxf(m0, acc[nt][j]);
        m1 = fmaxf(m1, acc[nt][2 + j]);
      }
    }
    // A NaN score only occurs where E = inf, i.e. cut = -inf or NaN, where every row passes anyway.
    if (!__any_sync(0xffffffffu, !(m0 < cut0) || !(m1 < cut1))) continue;

    // This lane's candidates: bit half * 16 + nt * 2 + j for row r0 + 8 half, chunk nt * 8 + 2 tig + j.
    std::uint32_t cand = 0;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float cut = half ? cut1 : cut0;
      const bool live = q0 + r0 + 8 * half < T;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int c = nt * 8 + 2 * tig + j;
          const bool pass = live && c < nc && !(acc[nt][2 * half + j] < cut);
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
        const float* kr = kt + c * P;
        float sc = 0.0f;
        for (int d = 0; d < dh; ++d) sc = fmaf(q_s[d * Tl::queries + qi], kr[d], sc);  // the FMA path's chain
        key = retrieval_key(sc, c0 + c, bank.oldest, C);
      }
      unsigned present = r >= 0 ? 1u << r : 0u;
#pragma unroll
      for (int off = 16; off >= 1; off >>= 1) present |= __shfl_xor_sync(0xffffffffu, present, off);
      for (unsigned m = present; m != 0; m &= m - 1) {
        const int rr = __ffs(static_cast<int>(m)) - 1, qi = 16 * warp + rr;
        RetrievalWarpList<R> list{{}, kk, lane};
        list.load(lists + qi * kk);
        std::uint64_t thr = list.threshold();
        list.offer(r == rr ? key : 0, thr);
        list.store(lists + qi * kk);
        if (lane == 0) {
          cut_s[qi] = fmaxf(seed_s[qi], retrieval_tc_cut(thr == 0 ? neg_inf : retrieval_key_score(thr), err_s[qi]));
        }
        __syncwarp();  // the list's stores before the next pass loads it
      }
    }
  }

  __syncthreads();  // rows are filled by their own warp (16 w ..) and written out by warp qi % 8
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

/// Eight floats to eight O (float: two 16-byte stores; __nv_bfloat16 or __half: one, rounded to
/// nearest even).
template <class O>
__device__ __forceinline__ void retrieval_store8(O* dst, const float (&f)[8]) {
  if constexpr (std::is_same_v<O, float>) {
    reinterpret_cast<float4*>(dst)[0] = make_float4(f[0], f[1], f[2], f[3]);
    reinterpret_cast<float4*>(dst)[1] = make_float4(f[4], f[5], f[6], f[7]);
  } else {
    static_assert(std::is_same_v<O, __nv_bfloat16> || std::is_same_v<O, __half>, "the gather writes float, bf16 or fp16");
    O e[8];
#pragma unroll
    for (int p = 0; p < 8; ++p) e[p] = device_store<O>(f[p]);
    uint4 raw;
    memcpy(&raw, e, 16);
    *reinterpret_cast<uint4*>(dst) = raw;
  }
}

/// n 16-bit elements E -> float (the retriever's queries from a bf16 or fp16 model; exact).
template <class E>
__global__ void retrieval_widen_kernel(const E* __restrict__ in, float* __restrict__ out, index_t n) {
  for (index_t i = blockIdx.x * index_t{blockDim.x} + threadIdx.x; i < n; i += index_t{gridDim.x} * blockDim.x) {
    out[i] = device_load(in[i]);
  }
}

/// O: the gathered keys' and values' element type (float, or __nv_bfloat16 / __half for a 16-bit model).
template <class S, class O = float>
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
  RetrievalWarpList<> list{{}, kk, lane};
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
      O* dk = static_cast<O*>(bank.out_keys) + (o + i) * chunk;
      O* dv = static_cast<O*>(bank.out_values) + (o + i) * chunk;
      for (index_t e = 8 * lane; e < chunk; e += 8 * 32) {
        float fk[8], fv[8];
        retrieval_load8(sk + e, fk);
        retrieval_load8(sv + e, fv);
        retrieval_store8(dk + e, fk);
        retrieval_store8(dv + e, fv);
      }
    }
    return;
  }
  for (int i = 0; i < kk; ++i) {
    const index_t slot = retrieval_key_slot(list.at(i), bank.oldest, C);
    const S* sk = bank.keys + (static_cast<index_t>(h) * C + slot) * chunk;
    const S* sv = bank.values + (static_cast<index_t>(h) * C + slot) * chunk;
    O* dk = static_cast<O*>(bank.out_keys) + (o + i) * chunk;
    O* dv = static_cast<O*>(bank.out_values) + (o + i) * chunk;
    for (index_t e = lane; e < chunk; e += 32) {
      dk[e] = device_store<O>(device_load(sk[e]));
      dv[e] = device_store<O>(device_load(sv[e]));
    }
  }
}

}  // namespace longmem::detail
