#pragma once
// What the device attention kernels share (cuda/ops/attention.cuh dispatches between them):
// the tuning, the modes, the argument block and the memory branch of one query row.
//
// Rows of q/k/v/out are (T, H, dh) with stride H*dh; the retrieved memory is (T, H, K, dh): every
// query has its own K keys and values (the tokens its chunks hold), so the memory branch is a
// per-row gather-attention with no reuse across queries (bandwidth-bound, FMAs are enough), while
// the local causal branch is a GEMM-shaped tile loop (tensor cores, attention_mma.cuh).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "longmem/cuda/ops/common.cuh"

namespace longmem {

/// Tiling of the device attention kernels (fixed at compile time; printed by benchmarks).
struct DeviceAttentionTuning {
  // Tensor-core kernel (attention_mma.cuh): 4 warps x 16 query rows, 64-key tiles, 3xTF32 mma.sync.
  int mma_query_block = 64;
  int mma_key_block = 64;
  int mma_max_head_dim = 64;  // wider heads (up to max_head_dim) take the FMA kernel
  // FMA kernel (attention.cuh): 32 queries per block, 32-key tiles, 4 lanes per query row.
  int query_block = 32;
  int key_block = 32;
  int threads = 128;
  int max_head_dim = 256;
  friend constexpr bool operator==(const DeviceAttentionTuning&, const DeviceAttentionTuning&) = default;
};
inline constexpr DeviceAttentionTuning device_attention_tuning{};

namespace detail::cuda {

enum class AttentionMode { Causal, Gated, Joint };

/// What the kernels read and write (device pointers), elements E: float, or __nv_bfloat16 for the
/// forward of a bf16 model (read as float, every sum in float, the output rounded once).
template <class E = float>
struct AttentionArgsT {
  using element = E;
  const E* q = nullptr;      // (T, H, dh)
  const E* k = nullptr;      // (T, H, dh)
  const E* v = nullptr;      // (T, H, dh)
  E* out = nullptr;          // (T, H, dh)
  const E* mem_k = nullptr;  // (T, H, K, dh)
  const E* mem_v = nullptr;  // (T, H, K, dh)
  const E* gate = nullptr;   // (H) logits, Gated only
  index_t n_tok = 0, n_mem = 0;
  int n_head = 0, head_dim = 0;
  float scale = 1;  // 1 / sqrt(dh), rounded as the host backend rounds it
  bool alibi = false;
  // Causal mode over up to max_segments independent sequences in one launch (the tensor-core
  // kernel): rows [seg[s], seg[s+1]) attend within their sequence; block x = r n_seg + s is the
  // r-th query block from the end of sequence s (the longest rows first). n_seg = 0: one sequence
  // of n_tok rows, block x the (gridDim.x - 1 - x)-th.
  static constexpr int max_segments = 64;
  int n_seg = 0;
  index_t seg[max_segments + 1] = {};
};
using AttentionArgs = AttentionArgsT<float>;  // the backward's (float only)

#if defined(__CUDACC__)
/// The vector form of memory_branch_row (same arguments, same results up to the order of float sums),
/// taken when each retrieved key row is whole 16-byte units: V = 16 / sizeof(E) features per load,
/// LPK = dh / V lanes hold one key row (a power of two up to 32) and the warp reads 32 / LPK keys per
/// load (dh 64: 4 keys in bf16, 2 in float), U loads of keys and of values in flight per lane. Lane
/// (kq, f) = (lane / LPK, lane % LPK) holds features [f V, f V + V) of its keys kq, kq + 32 / LPK, ...:
/// a score is a sum over the LPK lanes of a key; the running max, sum and output are per lane group
/// and the groups are combined (one max per step, the output at the end).
template <AttentionMode Mode, class E, class QE>
__device__ inline void memory_branch_row_vec(const AttentionArgsT<E>& a, index_t t, int h, const QE* q_row, float* o_row,
                                             float* ml) {
  constexpr int V = 16 / static_cast<int>(sizeof(E));
  constexpr int U = sizeof(E) == 2 ? 8 : 4;
  const int lane = threadIdx.x % 32, dh = a.head_dim, lpk = dh / V, kpw = 32 / lpk;
  const int kq = lane / lpk, f = lane % lpk;
  const index_t K = a.n_mem;
  float qr[V], o[V];
#pragma unroll
  for (int x = 0; x < V; ++x) {
    qr[x] = device_load(q_row[f * V + x]);
    o[x] = 0.0f;
  }
  const E* kr = a.mem_k + (t * a.n_head + h) * K * dh + f * V;  // (K, dh), this lane's features
  const E* vr = a.mem_v + (t * a.n_head + h) * K * dh + f * V;
  float m = -INFINITY, l = 0.0f;
  for (index_t j0 = 0; j0 < K; j0 += index_t{kpw} * U) {
    uint4 kx[U], vx[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const index_t j = j0 + kq + index_t{kpw} * u;
      kx[u] = j < K ? *reinterpret_cast<const uint4*>(kr + j * dh) : make_uint4(0, 0, 0, 0);
      vx[u] = j < K ? *reinterpret_cast<const uint4*>(vr + j * dh) : make_uint4(0, 0, 0, 0);
    }
    float s[U];
    float tile_max = -INFINITY;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      E kv[V];
      memcpy(kv, &kx[u], 16);
      float part = 0.0f;
#pragma unroll
      for (int x = 0; x < V; ++x) part += qr[x] * device_load(kv[x]);
      for (int off = lpk / 2; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
      s[u] = j0 + kq + index_t{kpw} * u < K ? part * a.scale : -INFINITY;
      tile_max = fmaxf(tile_max, s[u]);
    }
    for (int off = lpk; off < 32; off <<= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, off));
    const float m_new = fmaxf(m, tile_max);  // finite: key j0 exists
    const float alpha = expf(m - m_new);     // 0 on the first step
    float psum = 0.0f;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      s[u] = expf(s[u] - m_new);  // 0 for a key past K
      psum += s[u];
    }
    for (int off = lpk; off < 32; off <<= 1) psum += __shfl_xor_sync(0xffffffffu, psum, off);
    l = l * alpha + psum;
#pragma unroll
    for (int x = 0; x < V; ++x) o[x] *= alpha;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      E vv[V];
      memcpy(vv, &vx[u], 16);
#pragma unroll
      for (int x = 0; x < V; ++x) o[x] += s[u] * device_load(vv[x]);
    }
    m = m_new;
  }
#pragma unroll
  for (int x = 0; x < V; ++x) {
    for (int off = lpk; off < 32; off <<= 1) o[x] += __shfl_xor_sync(0xffffffffu, o[x], off);
  }
  if (kq == 0) {
#pragma unroll
    for (int x = 0; x < V; ++x) o_row[f * V + x] = Mode == AttentionMode::Gated ? o[x] / l : o[x];
  }
  if (lane == 0) {
    ml[0] = m;
    ml[1] = l;
  }
  __syncwarp();  // callers read o_row back lane by lane
}

/// True when memory_branch_row can take the vector form: key rows of whole 16-byte units at 16-byte
/// addresses, dh / V lanes per key a power of two up to 32.
template <class E>
__device__ inline bool memory_rows_vectorisable(const AttentionArgsT<E>& a) {
  constexpr int V = 16 / static_cast<int>(sizeof(E));
  const int dh = a.head_dim, lpk = dh / V;
  return dh % V == 0 && lpk >= 1 && lpk <= 32 && (lpk & (lpk - 1)) == 0 &&
         ((reinterpret_cast<std::uintptr_t>(a.mem_k) | reinterpret_cast<std::uintptr_t>(a.mem_v)) % 16) == 0;
}

/// The memory branch of query row t, head h, computed by one warp (lanes over dh): a softmax over
/// the row's K retrieved keys, no position term (as on the host and in the reference). Writes
/// o_row[0, dh): Gated the branch's output M = softmax(q Kr^T / sqrt dh) Vr, Joint the unnormalised
/// e Vr; lane 0 writes ml[0] = max score and ml[1] = sum of exp(score - max) (Joint seeds the local
/// softmax with them). Keys go G at a time with all their loads issued first, so that enough bytes
/// are in flight for HBM. Requires K > 0.
template <AttentionMode Mode, int DhMax, class E, class QE>
__device__ inline void memory_branch_row(const AttentionArgsT<E>& a, index_t t, int h, const QE* q_row, float* o_row,
                                         float* ml) {
  constexpr int per_lane = DhMax < 32 ? 1 : DhMax / 32;  // features c = lane + 32 x
  constexpr int G = DhMax <= 64 ? 8 : 4;
  if (memory_rows_vectorisable(a)) {
    memory_branch_row_vec<Mode>(a, t, h, q_row, o_row, ml);
    return;
  }
  const int lane = threadIdx.x % 32, dh = a.head_dim;
  const index_t K = a.n_mem;
  float qr[per_lane], o[per_lane];
#pragma unroll
  for (int x = 0; x < per_lane; ++x) {
    const int c = lane + 32 * x;
    qr[x] = c < dh ? device_load(q_row[c]) : 0.0f;
    o[x] = 0.0f;
  }
  const E* kr = a.mem_k + (t * a.n_head + h) * K * dh;  // (K, dh)
  const E* vr = a.mem_v + (t * a.n_head + h) * K * dh;  // (K, dh)
  float m = -INFINITY, l = 0.0f;
  for (index_t j0 = 0; j0 < K; j0 += G) {
    float kv[G][per_lane], vv[G][per_lane];
#pragma unroll
    for (int u = 0; u < G; ++u) {
#pragma unroll
      for (int x = 0; x < per_lane; ++x) {
        const int c = lane + 32 * x;
        const bool ok = j0 + u < K && c < dh;
        kv[u][x] = ok ? device_load(kr[(j0 + u) * dh + c]) : 0.0f;
        vv[u][x] = ok ? device_load(vr[(j0 + u) * dh + c]) : 0.0f;
      }
    }
    float s[G];
#pragma unroll
    for (int u = 0; u < G; ++u) {
      float part = 0.0f;
#pragma unroll
      for (int x = 0; x < per_lane; ++x) part += qr[x] * kv[u][x];
      s[u] = part;
    }
    float tile_max = -INFINITY;
#pragma unroll
    for (int u = 0; u < G; ++u) {
      s[u] = j0 + u < K ? warp_sum(s[u]) * a.scale : -INFINITY;
      tile_max = fmaxf(tile_max, s[u]);
    }
    const float m_new = fmaxf(m, tile_max);  // finite: key j0 exists
    const float alpha = expf(m - m_new);     // 0 on the first step
    float psum = 0.0f;
#pragma unroll
    for (int u = 0; u < G; ++u) {
      s[u] = expf(s[u] - m_new);
      psum += s[u];
    }
    l = l * alpha + psum;
#pragma unroll
    for (int x = 0; x < per_lane; ++x) {
      float acc = o[x] * alpha;
#pragma unroll
      for (int u = 0; u < G; ++u) acc += s[u] * vv[u][x];
      o[x] = acc;
    }
    m = m_new;
  }
#pragma unroll
  for (int x = 0; x < per_lane; ++x) {
    const int c = lane + 32 * x;
    if (c < dh) o_row[c] = Mode == AttentionMode::Gated ? o[x] / l : o[x];
  }
  if (lane == 0) {
    ml[0] = m;
    ml[1] = l;
  }
}

/// The gate's two weights, 1 - sigmoid(g) as sigmoid(-g), in double as on the host: exact at both ends.
__device__ inline void gate_weights(float gate_logit, float& w_local, float& w_mem) {
  const double g = static_cast<double>(gate_logit);
  w_local = static_cast<float>(1.0 / (1.0 + exp(g)));
  w_mem = static_cast<float>(1.0 / (1.0 + exp(-g)));
}
#endif

}  // namespace detail::cuda
}  // namespace longmem
