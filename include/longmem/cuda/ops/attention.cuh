#pragma once
// Device attention: causal and memory-augmented, forward (float or bfloat16 buffers; T tokens, H heads, dh head dim, K
// retrieved tokens; rows of q/k/v/out are (T, H, dh) with stride H*dh, memory (T, H, K, dh)).
//
// Two flash-style kernels, the same modes and results up to float rounding; no T x T matrix exists
// anywhere and ALiBi slopes come from detail::alibi_slope inside the kernel:
//   dh <= 64     attention_mma_kernel (attention_mma.cuh): the local branch on tensor cores
//                (mma.sync; 3xTF32, float accuracy, under DeviceMath::fp32; 1xTF32 under tf32
//                and bf16: cuda/math_mode.hpp), 64 queries per block; on bf16 or fp16 buffers
//                attention_mma16_kernel (attention_mma16.cuh): bf16 or fp16 m16n8k16 mma
//   dh <= 256    attention_kernel (below): FMAs from shared memory, 32 queries per block
// Modes (AttentionMode):
//   causal_attention                        Causal: the local softmax only
//   memory_attention<F> with K = 0          exactly the Causal kernel (no gate factor)
//   memory_attention<GatedFusion>, K > 0    Gated: the memory branch (memory_branch_row, one warp per
//                                           query row) gives M = softmax(q Kr^T/sqrt dh) Vr, the local
//                                           phase gives A, out = (1-s(g)) A + s(g) M
//   memory_attention<JointFusion>, K > 0    Joint: the memory branch's (max, sum, e Vr) seed the local
//                                           online softmax, so both score sets share one softmax
// The memory branch has no position term, as in the host backend and the reference.
//
// FMA kernel threads (128 per block): in the memory phase a warp takes one query row at a time; in
// the local phase four consecutive lanes own one query row (8 of a tile's 32 keys each for the
// scores; every 4th feature of the output). DhMax (32, 64, 128, 256) is the register budget for dh;
// dh > 256 is refused.
#include <algorithm>
#include <cmath>
#include <span>
#include <string>
#include <type_traits>

#include "longmem/cuda/math_mode.hpp"
#include "longmem/cuda/ops/attention_mma.cuh"
#include "longmem/cuda/ops/attention_mma16.cuh"
#include "longmem/cuda/ops/attention_parts.cuh"
#include "longmem/cuda/ops/common.cuh"
#include "longmem/detail/alibi.hpp"
#include "longmem/fusion.hpp"
#include "longmem/model_config.hpp"

namespace longmem {

namespace detail::cuda {

inline constexpr int attn_br = device_attention_tuning.query_block;
inline constexpr int attn_bc = device_attention_tuning.key_block;
inline constexpr int attn_threads = device_attention_tuning.threads;
static_assert(attn_threads == 4 * attn_br, "four lanes per query row");
static_assert(attn_bc % 4 == 0 && attn_threads % 32 == 0, "tile sizes");

/// Shared-memory floats of one block: q tile, k tile, v tile, probabilities, and (memory modes)
/// the memory branch's output and softmax statistics per query.
inline std::size_t attention_smem_floats(int dh, bool memory) {
  const std::size_t qk = static_cast<std::size_t>(dh + 1);  // +1: rows start in different banks
  std::size_t n = attn_br * qk + attn_bc * qk + static_cast<std::size_t>(attn_bc) * dh + attn_br * (attn_bc + 1);
  if (memory) n += static_cast<std::size_t>(attn_br) * dh + 2 * attn_br;
  return n;
}

template <AttentionMode Mode, int DhMax, class E>
__global__ void __launch_bounds__(attn_threads) attention_kernel(AttentionArgsT<E> a) {
  constexpr float neg_inf = -INFINITY;
  constexpr int per_lane = DhMax / 4;     // local phase: features c = sub + 4 * x
  constexpr int keys_per_lane = attn_bc / 4;

  extern __shared__ float smem[];
  const int dh = a.head_dim, H = a.n_head, h = blockIdx.y;
  const index_t T = a.n_tok, ld = index_t(H) * dh, q0 = index_t(blockIdx.x) * attn_br;
  const int qp = dh + 1, kp = dh + 1, sp = attn_bc + 1;
  float* qs = smem;                 // (Br, dh+1)
  float* ks = qs + attn_br * qp;    // (Bc, dh+1)
  float* vs = ks + attn_bc * kp;    // (Bc, dh)
  float* ps = vs + attn_bc * dh;    // (Br, Bc+1) probabilities of the current tile
  float* mem_o = ps + attn_br * sp; // (Br, dh) memory modes: M (gated) or e Vr (joint)
  float* mem_ml = mem_o + attn_br * dh;  // (Br, 2) max memory score, sum of exp(score - max)
  const int tid = threadIdx.x;

  for (int e = tid; e < attn_br * dh; e += attn_threads) {
    const int r = e / dh, c = e % dh;
    const index_t t = q0 + r;
    qs[r * qp + c] = t < T ? device_load(a.q[t * ld + index_t(h) * dh + c]) : 0.0f;
  }
  __syncthreads();

  if constexpr (Mode != AttentionMode::Causal) {
    // Memory phase: warp w takes rows w, w + 4, ...; the branch on t is uniform over the warp.
    const int warp = tid / 32;
    for (int r = warp; r < attn_br; r += attn_threads / 32) {
      const index_t t = q0 + r;
      if (t < T) memory_branch_row<Mode, DhMax>(a, t, h, qs + r * qp, mem_o + r * dh, mem_ml + 2 * r);
    }
    __syncthreads();
  }

  // Local phase: row i of the tile, lanes sub = 0..3 of its group.
  const int i = tid / 4, sub = tid % 4;
  const index_t t = q0 + i;
  const bool row_valid = t < T;
  float acc[per_lane];
  float m = neg_inf, l = 0.0f;
#pragma unroll
  for (int x = 0; x < per_lane; ++x) acc[x] = 0.0f;
  if constexpr (Mode == AttentionMode::Joint) {
    if (row_valid) {
      m = mem_ml[2 * i];
      l = mem_ml[2 * i + 1];
#pragma unroll
      for (int x = 0; x < per_lane; ++x) {
        const int c = sub + 4 * x;
        if (c < dh) acc[x] = mem_o[i * dh + c];
      }
    }
  }
  const double slope = a.alibi ? alibi_slope(h, H) : 0.0;
  const index_t k_end = T < q0 + attn_br ? T : q0 + attn_br;  // keys up to the block's last query

  for (index_t k0 = 0; k0 < k_end; k0 += attn_bc) {
    __syncthreads();  // the previous tile's ks, vs, ps are no longer read
    for (int e = tid; e < attn_bc * dh; e += attn_threads) {
      const int r = e / dh, c = e % dh;
      const index_t s = k0 + r;
      const bool ok = s < T;
      ks[r * kp + c] = ok ? device_load(a.k[s * ld + index_t(h) * dh + c]) : 0.0f;
      vs[r * dh + c] = ok ? device_load(a.v[s * ld + index_t(h) * dh + c]) : 0.0f;
    }
    __syncthreads();

    float s[keys_per_lane];  // keys sub + 4u of the tile
#pragma unroll
    for (int u = 0; u < keys_per_lane; ++u) s[u] = 0.0f;
    for (int c = 0; c < dh; ++c) {
      const float qc = qs[i * qp + c];
#pragma unroll
      for (int u = 0; u < keys_per_lane; ++u) s[u] += qc * ks[(sub + 4 * u) * kp + c];
    }
    float tile_max = neg_inf;
#pragma unroll
    for (int u = 0; u < keys_per_lane; ++u) {
      const index_t key = k0 + sub + 4 * u;
      float val = s[u] * a.scale;
      // As the host's ramp: slope * (key - t) in double, rounded once.
      if (a.alibi) val += static_cast<float>(slope * static_cast<double>(key - t));
      s[u] = row_valid && key <= t ? val : neg_inf;
      tile_max = fmaxf(tile_max, s[u]);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float m_new = fmaxf(m, tile_max);
    float alpha = 1.0f, psum = 0.0f;
    if (m_new == neg_inf) {  // no key yet for this row (only rows past T): keep everything at zero
#pragma unroll
      for (int u = 0; u < keys_per_lane; ++u) s[u] = 0.0f;
    } else {
      alpha = expf(m - m_new);
#pragma unroll
      for (int u = 0; u < keys_per_lane; ++u) {
        s[u] = expf(s[u] - m_new);
        psum += s[u];
      }
    }
    psum += __shfl_xor_sync(0xffffffffu, psum, 1);
    psum += __shfl_xor_sync(0xffffffffu, psum, 2);
    l = l * alpha + psum;
    m = m_new;
#pragma unroll
    for (int u = 0; u < keys_per_lane; ++u) ps[i * sp + sub + 4 * u] = s[u];
    __syncwarp();  // the four lanes of row i are in one warp; they read each other's probabilities
#pragma unroll
    for (int x = 0; x < per_lane; ++x) acc[x] *= alpha;
    for (int j = 0; j < attn_bc; ++j) {
      const float p = ps[i * sp + j];
#pragma unroll
      for (int x = 0; x < per_lane; ++x) {
        const int c = sub + 4 * x;
        if (c < dh) acc[x] += p * vs[j * dh + c];
      }
    }
  }

  if (!row_valid) return;  // after the last barrier
  const float inv = 1.0f / l;
  E* o = a.out + t * ld + index_t(h) * dh;
  float w_local = 1.0f, w_mem = 0.0f;
  if constexpr (Mode == AttentionMode::Gated) {
    gate_weights(device_load(a.gate[h]), w_local, w_mem);
  }
#pragma unroll
  for (int x = 0; x < per_lane; ++x) {
    const int c = sub + 4 * x;
    if (c >= dh) continue;
    if constexpr (Mode == AttentionMode::Gated) {
      o[c] = device_store<E>((w_local * inv) * acc[x] + w_mem * mem_o[i * dh + c]);
    } else {
      o[c] = device_store<E>(acc[x] * inv);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Argument checks (the host backend's, cpu/ops/attention.hpp) and launch

/// Validates the attention arguments and gathers them; K = 0 when memory is absent.
template <class T>
AttentionArgsT<device_element_t<T>> attention_args(const char* op, TensorView<T, Device> out, TensorView<const T, Device> q,
                                                   TensorView<const T, Device> k, TensorView<const T, Device> v,
                                                   TensorView<const T, Device> mem_k, TensorView<const T, Device> mem_v,
                                                   TensorView<const T, Device> gate, bool gate_needed) {
  if (q.rank() != 3) fail<ShapeError>(op, ": q: expected shape (T, H, dh), got ", q.shape().str());
  const index_t n_tok = q.dim(0), H = q.dim(1), dh = q.dim(2);
  const std::string like_q = std::string(op) + ": ";
  expect_shape(k, q.shape(), (like_q + "k (T, H, dh), like q").c_str());
  expect_shape(v, q.shape(), (like_q + "v (T, H, dh), like q").c_str());
  if (!(out.shape() == q.shape()) && !(out.shape() == Shape{n_tok, H * dh})) {
    fail<ShapeError>(op, ": out: expected shape ", q.shape().str(), " or ", Shape{n_tok, H * dh}.str(), " like q, got ",
                     out.shape().str());
  }
  index_t K = 0;
  const bool no_memory = (mem_k.rank() == 0 && mem_k.data() == nullptr) && (mem_v.rank() == 0 && mem_v.data() == nullptr);
  if (!no_memory) {
    if (mem_k.rank() != 4 || mem_k.dim(0) != n_tok || mem_k.dim(1) != H || mem_k.dim(3) != dh) {
      fail<ShapeError>(op, ": mem_k: expected shape (", n_tok, ", ", H, ", K, ", dh, ") = (T, H, K, dh) for q of shape ",
                       q.shape().str(), ", got ", mem_k.shape().str());
    }
    K = mem_k.dim(2);
    expect_shape(mem_v, mem_k.shape(), (like_q + "mem_v (T, H, K, dh), like mem_k").c_str());
  }
  if (gate_needed && K > 0) {
    expect_shape(gate, Shape{H}, (like_q + "gate (H), one logit per head").c_str());
  } else if (!absent(gate) && !(gate.shape() == Shape{H})) {
    fail<ShapeError>(op, ": gate: expected shape (", H, ") or an empty view, got ", gate.shape().str());
  }
  for (auto [in, name] : {std::pair{q, "q"}, std::pair{k, "k"}, std::pair{v, "v"}, std::pair{mem_k, "mem_k"},
                          std::pair{mem_v, "mem_v"}, std::pair{gate, "gate"}}) {
    expect_separate(out, in, op, name);
  }
  if (dh > device_attention_tuning.max_head_dim) {
    fail<ShapeError>(op, ": head dim ", dh, " (q of shape ", q.shape().str(),
                     ") is larger than the CUDA attention kernel's maximum of ", device_attention_tuning.max_head_dim,
                     "; use the host backend for wider heads");
  }
  if (H > 65535) fail<ShapeError>(op, ": ", H, " heads is more than the CUDA attention kernel's 65535");
  AttentionArgsT<device_element_t<T>> args;
  args.q = device_ptr(q.data());
  args.k = device_ptr(k.data());
  args.v = device_ptr(v.data());
  args.out = device_ptr(out.data());
  args.mem_k = device_ptr(mem_k.data());
  args.mem_v = device_ptr(mem_v.data());
  args.gate = absent(gate) ? nullptr : device_ptr(gate.data());
  args.n_tok = n_tok;
  args.n_mem = K;
  args.n_head = static_cast<int>(H);
  args.head_dim = static_cast<int>(dh);
  args.scale = 1.0f / std::sqrt(static_cast<float>(dh));  // as the host: T(1) / sqrt(T(dh))
  return args;
}

template <class Kernel, class Args>
void launch_attention_kernel(const char* op, Kernel kernel, const Args& a, dim3 grid, dim3 block, std::size_t smem) {
  if (smem > 48 * 1024) {  // beyond the default limit a kernel must opt in
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)), op,
          "raising the attention kernel's shared memory to ", smem, " bytes (head dim ", a.head_dim, ")");
  }
  kernel<<<grid, block, smem, stream()>>>(a);
  check_launch(op, "the attention kernel for T = ", a.n_tok, ", H = ", a.n_head, ", dh = ", a.head_dim, ", K = ", a.n_mem,
               " (", launch_str(grid, block, smem), ")");
}

/// The FMA kernel (any dh up to 256).
template <AttentionMode Mode, int DhMax, class E>
void launch_attention(const char* op, const AttentionArgsT<E>& a) {
  const std::size_t smem = attention_smem_floats(a.head_dim, Mode != AttentionMode::Causal) * sizeof(float);
  const dim3 grid(static_cast<unsigned>((a.n_tok + attn_br - 1) / attn_br), static_cast<unsigned>(a.n_head));
  launch_attention_kernel(op, attention_kernel<Mode, DhMax, E>, a, grid, dim3(attn_threads), smem);
}

/// The tensor-core kernel (dh up to 64): on float buffers 3xTF32 under DeviceMath::fp32, 1xTF32
/// otherwise; on bf16 / fp16 buffers bf16 / fp16 mma.m16n8k16 (attention_mma16.cuh). With a.n_seg sequences,
/// one block per (query block of the longest sequence, sequence) and head.
template <AttentionMode Mode, int DhMax, class E>
void launch_attention_mma(const char* op, const AttentionArgsT<E>& a) {
  constexpr bool half_width = std::is_same_v<E, __nv_bfloat16> || std::is_same_v<E, __half>;
  const std::size_t smem = half_width ? attention_mma16_smem_bytes(DhMax, Mode != AttentionMode::Causal)
                                : attention_mma_smem_floats(DhMax, Mode != AttentionMode::Causal) * sizeof(float);
  index_t longest = a.n_tok, blocks = (a.n_tok + mma_br - 1) / mma_br;
  if (a.n_seg > 0) {
    longest = 0;
    for (int s = 0; s < a.n_seg; ++s) longest = std::max(longest, a.seg[s + 1] - a.seg[s]);
    blocks = (longest + mma_br - 1) / mma_br * a.n_seg;
  }
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(a.n_head));
  if constexpr (half_width) {
    if (longest > (index_t{1} << 24)) {  // the kernel's ALiBi distances key - t are exact floats below 2^24
      fail<InputError>(op, ": a sequence of ", longest, " rows; the 16-bit attention kernel takes at most 2^24");
    }
    launch_attention_kernel(op, attention_mma16_kernel<Mode, DhMax, E>, a, grid, dim3(mma_threads), smem);
  } else if (device_math() == DeviceMath::fp32) {
    launch_attention_kernel(op, attention_mma_kernel<Mode, DhMax, true, E>, a, grid, dim3(mma_threads), smem);
  } else {
    launch_attention_kernel(op, attention_mma_kernel<Mode, DhMax, false, E>, a, grid, dim3(mma_threads), smem);
  }
}

template <AttentionMode Mode, class E>
void run_attention(const char* op, AttentionArgsT<E> a, PositionScheme positions) {
  static_assert(device_attention_tuning.mma_max_head_dim == 64, "the dispatch below covers dh <= 64 on tensor cores");
  if (a.n_tok == 0 || a.n_head == 0 || a.head_dim == 0) return;
  a.alibi = positions == PositionScheme::Alibi;
  if (a.head_dim <= 32) {
    launch_attention_mma<Mode, 32, E>(op, a);
  } else if (a.head_dim <= 64) {
    launch_attention_mma<Mode, 64, E>(op, a);
  } else if (a.head_dim <= 128) {
    launch_attention<Mode, 128, E>(op, a);
  } else {
    launch_attention<Mode, 256, E>(op, a);
  }
}

/// out (T, H, dh) = causal softmax(q k^T / sqrt(dh) [+ alibi]) v per head.
template <class T>
void causal_attention(TensorView<T, Device> out, TensorView<const T, Device> q, TensorView<const T, Device> k,
                      TensorView<const T, Device> v, PositionScheme positions) {
  require_forward_element<T>();
  const char* op = "causal_attention";
  const auto a = attention_args(op, out, q, k, v, {}, {}, {}, false);
  run_attention<AttentionMode::Causal>(op, a, positions);
}

/// The tensor-core kernel (dh <= 64) over the sequences of `offsets`, up to
/// AttentionArgs::max_segments per launch; launches holding only empty sequences are skipped.
template <AttentionMode Mode, class E>
void launch_attention_mma_segments(const char* op, AttentionArgsT<E> a, std::span<const index_t> offsets) {
  const std::size_t n_seq = offsets.size() - 1;
  for (std::size_t first = 0; first < n_seq; first += AttentionArgs::max_segments) {
    const std::size_t n = std::min<std::size_t>(AttentionArgs::max_segments, n_seq - first);
    std::copy(offsets.begin() + static_cast<std::ptrdiff_t>(first),
              offsets.begin() + static_cast<std::ptrdiff_t>(first + n + 1), a.seg);
    if (a.seg[n] == a.seg[0]) continue;  // only empty sequences
    a.n_seg = static_cast<int>(n);
    if (a.head_dim <= 32) {
      launch_attention_mma<Mode, 32, E>(op, a);
    } else {
      launch_attention_mma<Mode, 64, E>(op, a);
    }
  }
}

/// causal_attention over the sequences [offsets[b], offsets[b+1]) of q, k, v (N, H, dh) (offsets
/// checked by ops::causal_attention): for dh <= 64 up to AttentionArgs::max_segments sequences per
/// launch of the tensor-core kernel, so a batch of streams fills the GPU as one long grid (one
/// stream's 1024 rows and 16 heads are only 256 blocks); wider heads take one FMA-kernel launch per
/// sequence.
template <class T>
void causal_attention_segments(TensorView<T, Device> out, TensorView<const T, Device> q, TensorView<const T, Device> k,
                               TensorView<const T, Device> v, PositionScheme positions,
                               std::span<const index_t> offsets) {
  require_forward_element<T>();
  const char* op = "causal_attention";
  auto a = attention_args(op, out, q, k, v, {}, {}, {}, false);
  if (a.n_tok == 0 || a.n_head == 0 || a.head_dim == 0) return;
  a.alibi = positions == PositionScheme::Alibi;
  const std::size_t n_seq = offsets.size() - 1;
  if (a.head_dim > device_attention_tuning.mma_max_head_dim) {
    for (std::size_t b = 0; b < n_seq; ++b) {
      if (offsets[b] == offsets[b + 1]) continue;
      causal_attention(out.slice(offsets[b], offsets[b + 1]), q.slice(offsets[b], offsets[b + 1]),
                       k.slice(offsets[b], offsets[b + 1]), v.slice(offsets[b], offsets[b + 1]), positions);
    }
    return;
  }
  launch_attention_mma_segments<AttentionMode::Causal, device_element_t<T>>(op, a, offsets);
}

/// Memory-augmented attention; see fusion.hpp. mem_k/mem_v may be (T, H, 0, dh) or absent (K = 0),
/// then the result is exactly causal_attention. The gate (H) is required for GatedFusion with
/// K > 0 and ignored otherwise.
template <class Fusion, class T>
void memory_attention(TensorView<T, Device> out, TensorView<const T, Device> q, TensorView<const T, Device> k,
                      TensorView<const T, Device> v, TensorView<const T, Device> mem_k, TensorView<const T, Device> mem_v,
                      TensorView<const T, Device> gate, PositionScheme positions) {
  static_assert(longmem::Fusion<Fusion>, "memory_attention: Fusion must be longmem::GatedFusion or longmem::JointFusion");
  require_forward_element<T>();
  constexpr bool gated = std::is_same_v<Fusion, GatedFusion>;
  const char* op = "memory_attention";
  const auto a = attention_args(op, out, q, k, v, mem_k, mem_v, gate, gated);
  if (a.n_mem == 0) {
    run_attention<AttentionMode::Causal>(op, a, positions);
  } else if constexpr (gated) {
    run_attention<AttentionMode::Gated>(op, a, positions);
  } else {
    run_attention<AttentionMode::Joint>(op, a, positions);
  }
}

/// memory_attention over the sequences [offsets[b], offsets[b+1]) of q, k, v (N, H, dh), each
/// row with its own retrieved mem_k, mem_v (N, H, K, dh) (offsets checked by
/// ops::memory_attention): as causal_attention_segments, up to AttentionArgs::max_segments
/// sequences per tensor-core launch (dh <= 64); wider heads take one launch per sequence.
template <class Fusion, class T>
void memory_attention_segments(TensorView<T, Device> out, TensorView<const T, Device> q, TensorView<const T, Device> k,
                               TensorView<const T, Device> v, TensorView<const T, Device> mem_k,
                               TensorView<const T, Device> mem_v, TensorView<const T, Device> gate,
                               PositionScheme positions, std::span<const index_t> offsets) {
  static_assert(longmem::Fusion<Fusion>, "memory_attention: Fusion must be longmem::GatedFusion or longmem::JointFusion");
  require_forward_element<T>();
  constexpr bool gated = std::is_same_v<Fusion, GatedFusion>;
  const char* op = "memory_attention";
  auto a = attention_args(op, out, q, k, v, mem_k, mem_v, gate, gated);
  if (a.n_mem == 0) {
    causal_attention_segments(out, q, k, v, positions, offsets);
    return;
  }
  if (a.n_tok == 0 || a.n_head == 0 || a.head_dim == 0) return;
  const std::size_t n_seq = offsets.size() - 1;
  if (a.head_dim > device_attention_tuning.mma_max_head_dim) {
    for (std::size_t b = 0; b < n_seq; ++b) {
      const index_t o0 = offsets[b], o1 = offsets[b + 1];
      if (o0 == o1) continue;
      memory_attention<Fusion>(out.slice(o0, o1), q.slice(o0, o1), k.slice(o0, o1), v.slice(o0, o1),
                               mem_k.slice(o0, o1), mem_v.slice(o0, o1), gate, positions);
    }
    return;
  }
  a.alibi = positions == PositionScheme::Alibi;
  launch_attention_mma_segments<gated ? AttentionMode::Gated : AttentionMode::Joint, device_element_t<T>>(op, a, offsets);
}

}  // namespace detail::cuda
}  // namespace longmem
