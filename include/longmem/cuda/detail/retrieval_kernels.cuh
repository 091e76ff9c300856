#pragma once
// Kernels of FusedChunkRetriever (cuda/chunk_retriever.cuh); users never name these.
//
// Legend: B banks in one launch, H heads, T queries of a bank, C slots, n valid chunks,
// dh head dim, csz chunk size, kk = k' chunks kept, S chunk-range splits.
//
//   retrieval_select_kernel   grid (S, ceil(T / 128), H * B), 256 threads
//       One block: 128 queries of one head of one bank against the chunks of its split
//       [c_begin, c_end). The query tile (dh, 128) stays in shared memory; chunk keys come in
//       tiles of 64: each thread computes an 8 x 4 register tile of scores with fp32 FMA, the
//       (128, 64) tile goes to shared memory (over the chunk keys it was computed from), and each
//       warp merges 16 query rows into their running top-kk lists (shared memory, best first). Only the S per-split lists of kk
//       entries per query reach global memory; the score matrix never does.
//   retrieval_merge_kernel    grid (ceil(T * H / 8), B), 256 threads
//       One warp per (bank, t, h): merges the S lists (each sorted, so a list is read only as far
//       as it still beats the running k'-th), writes slots and scores, and (optionally) gathers
//       the chosen chunks' keys and values as float.
//
// Exactness: scores are fp32 FMA chains over d = 0 .. dh-1 in order, the same for a chunk in
// every tile and split, so duplicated chunk keys give bit-identical scores and the tie rule is
// applied exactly. No tensor cores: fp16/bf16/TF32 products would change which chunks win.
//
// Ordering key: one uint64 per (chunk, score): the score mapped to an order-preserving uint32
// (NaN as -inf, -0 as +0) in the high half, and 0xffffffff - age in the low half, where age is
// the chunk's rank from the oldest stored chunk. Larger key = better: higher score, then older
// chunk, which is the library's tie rule even on a wrapped ring. Keys of distinct chunks never
// compare equal; 0 is below every real key and marks an empty list entry.
#include <cuda_runtime.h>

#include <cstdint>

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

__device__ inline std::uint64_t retrieval_key(float score, index_t slot, index_t oldest, index_t capacity) {
  if (score != score) score = -__int_as_float(0x7f800000);  // NaN ranks as -inf
  if (score == 0.0f) score = 0.0f;                          // -0 ties with +0, as float == says
  std::uint32_t u = __float_as_uint(score);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  const auto age = static_cast<std::uint32_t>((slot - oldest + capacity) % capacity);
  return (static_cast<std::uint64_t>(u) << 32) | static_cast<std::uint64_t>(0xffffffffu - age);
}

__device__ inline float retrieval_key_score(std::uint64_t key) {
  std::uint32_t u = static_cast<std::uint32_t>(key >> 32);
  u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
  return __uint_as_float(u);
}

__device__ inline index_t retrieval_key_slot(std::uint64_t key, index_t oldest, index_t capacity) {
  const index_t age = static_cast<index_t>(0xffffffffu - static_cast<std::uint32_t>(key));
  return (oldest + age) % capacity;
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

/// Dynamic shared memory of the select kernel, in bytes: the lists, the query tile, and one buffer
/// that holds the chunk-key tile during the FMAs and the score tile during the merge.
inline std::size_t retrieval_select_smem(int head_dim, int kept) {
  using Tl = RetrievalTile;
  const std::size_t k_stride = static_cast<std::size_t>(head_dim | 1);  // odd: conflict-free column reads
  const std::size_t key_tile = static_cast<std::size_t>(Tl::chunks) * k_stride * sizeof(float);
  const std::size_t score_tile = static_cast<std::size_t>(Tl::queries) * (Tl::chunks + 1) * sizeof(float);
  return static_cast<std::size_t>(Tl::queries) * static_cast<std::size_t>(kept) * sizeof(std::uint64_t) +  // lists
         static_cast<std::size_t>(head_dim) * Tl::queries * sizeof(float) +                                // query tile
         (key_tile > score_tile ? key_tile : score_tile);
}

template <class S>
__global__ void __launch_bounds__(RetrievalTile::threads)
    retrieval_select_kernel(const __grid_constant__ RetrievalLaunch<S> L) {
  using Tl = RetrievalTile;
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

  extern __shared__ __align__(16) unsigned char retrieval_smem[];
  auto* lists = reinterpret_cast<std::uint64_t*>(retrieval_smem);  // (128, kk)
  float* q_s = reinterpret_cast<float*>(lists + Tl::queries * kk);  // (dh, 128): query tile, transposed
  float* k_s = q_s + dh * Tl::queries;                              // (64, k_stride): chunk keys, then
  float* s_s = k_s;                                                 // (128, 65): scores, in the same bytes

  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int tx = tid & 15, ty = tid >> 4;

  for (int e = tid; e < Tl::queries * kk; e += Tl::threads) lists[e] = 0;
  for (int e = tid; e < Tl::queries * dh; e += Tl::threads) {
    const int qi = e / dh, d = e % dh;
    const int t = q0 + qi;
    q_s[d * Tl::queries + qi] = t < T ? bank.queries[(static_cast<index_t>(t) * H + h) * dh + d] : 0.0f;
  }
  __syncthreads();

  const float* ck = bank.chunk_keys + static_cast<index_t>(h) * C * dh;  // (C, dh) of head h
  for (index_t c0 = c_begin; c0 < c_end; c0 += Tl::chunks) {
    const int nc = static_cast<int>(min(static_cast<index_t>(Tl::chunks), c_end - c0));
    // Tile of chunk keys: contiguous in global memory (slots c0 .. c0 + nc - 1).
    const float* src = ck + c0 * dh;
    for (int e = tid; e < Tl::chunks * dh; e += Tl::threads) {
      const int c = e / dh, d = e % dh;
      k_s[c * k_stride + d] = c < nc ? src[e] : 0.0f;
    }
    __syncthreads();

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
    __syncthreads();  // every warp is done with the chunk keys: the scores overwrite them
#pragma unroll
    for (int i = 0; i < Tl::rows_per_thread; ++i) {
#pragma unroll
      for (int j = 0; j < Tl::cols_per_thread; ++j) {
        s_s[(ty * Tl::rows_per_thread + i) * (Tl::chunks + 1) + tx + 16 * j] = acc[i][j];
      }
    }
    __syncthreads();

    // Merge: warp w takes query rows w, w + 8, ... (the condition is uniform per warp).
    for (int qi = warp; qi < Tl::queries; qi += Tl::merge_warps) {
      if (q0 + qi >= T) break;
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
    }
    __syncthreads();  // the next tile's chunk keys overwrite the scores
  }

  // This split's lists (all zeros when the split is empty) to the workspace.
  for (int qi = warp; qi < Tl::queries; qi += Tl::merge_warps) {
    const int t = q0 + qi;
    if (t >= T) break;
    std::uint64_t* dst = bank.partial + ((static_cast<index_t>(h) * T + t) * splits + split) * kk;
    for (int e = lane; e < kk; e += 32) dst[e] = lists[qi * kk + e];
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
