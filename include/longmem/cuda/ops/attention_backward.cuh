#pragma once
// Device attention backward, for training on the GPU.
//   causal_attention_backward      d_q, d_k, d_v (T, H, dh) from d_out (T, H, dh)
//   causal_attention_backward_segments, memory_attention_backward_segments<F>
//                                  the same over sequences stacked along the rows (offsets)
//   memory_attention_backward<F>   the same through the memory-augmented layer (fusion.hpp), plus
//                                  d_gate (H) for GatedFusion; retrieved keys/values are constants
// Nothing is kept from the forward: probabilities are recomputed from q, k (and mem_k).
//
// Per head h of each sequence (cuBLASLt strided-batched GEMMs over the H heads; a head's rows are
// H dh apart), with P the local probabilities as they enter the output and G the gradient reaching
// them:
//   0. memory (K > 0), one warp per (t, h): M = softmax(q Kr^T scale) Vr, its log-normaliser lm,
//      and d_out . M
//   1. S  = q k^T (T, T);  P = softmax_s(scale S + alibi(s - t)), keys s <= t (0 above the diagonal)
//      joint: one softmax over local and memory scores, so P *= exp(ll - z), z = logaddexp(ll, lm)
//   2. dP = d_out v^T (T, T);  a = sum_s P dP (= G . A up to the gate factor), then per row
//        causal  D = a                       dS = scale P (dP - D)
//        gated   D = (1 - s) a, s = sigmoid(g)   dS = scale P ((1 - s) dP - D);  P *= (1 - s)
//        joint   D = a + exp(lm - z) d_out . M   dS = scale P (dP - D)
//   3. d_v = P^T d_out,  d_q = dS k,  d_k = dS^T q
//   4. memory (K > 0), one warp per (t, h): p_j = exp(r_j - z_m), dr_j = p_j (G_m . Vr_j - D_m),
//      d_q += scale sum_j dr_j Kr_j   (gated: z_m = lm, G_m = s d_out, D_m = s d_out . M; joint:
//      z_m = z, G_m = d_out, D_m = D)
//   5. gated: d_gate_h += s (1 - s) sum_t (d_out . M - a), one block per head, summed in double
//      in a fixed order
// Scratch: two (H, T, T) float matrices (8 H T^2 bytes: 2 MiB at T 256, H 8), and with memory
// M (T, H, dh) and four (T, H) rows of statistics.
// Several sequences of one length (causal_attention_backward_segments: the streams of a training
// batch) run as one batch of S H heads: q, k, v, d_out are first copied head-major (S, H, T, dh)
// so that one stride steps through every (sequence, head) matrix, and d_q, d_k, d_v are copied
// back; S is capped so that the (S H, T, T) matrices stay within attention_backward_budget. The GEMMs are whole T x T products; the masked
// half costs flops but no extra passes. The products follow the device math mode
// (cuda/math_mode.hpp) like linear; softmaxes and statistics are in float, as on the host.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <utility>

#include "longmem/cuda/ops/attention.cuh"
#include "longmem/cuda/ops/common.cuh"
#include "longmem/cuda/ops/linear.cuh"
#include "longmem/detail/alibi.hpp"
#include "longmem/fusion.hpp"

namespace longmem::detail::cuda {

inline constexpr unsigned attention_backward_block = 256;
/// The most scratch that one batched backward launch of several sequences takes for its two
/// (S H, T, T) matrices; longer runs of sequences are split.
inline constexpr std::size_t attention_backward_budget = std::size_t{256} << 20;

/// dst (S, B, A, C) = src (S, A, B, C): the middle two axes swapped (heads to the front of a
/// sequence's rows and back). E: float, or float4 with C counted in float4s; I: the index type
/// (32 bits when every index fits: the divisions are the kernel's cost).
template <class E, class I>
__global__ void __launch_bounds__(attention_backward_block)
    swap_middle_axes_kernel(E* __restrict__ dst, const E* __restrict__ src, I S, I A, I B, I C) {
  const I n = S * A * B * C;
  for (I i = blockIdx.x * I(blockDim.x) + threadIdx.x; i < n; i += I(gridDim.x) * blockDim.x) {
    const I c = i % C, r = i / C, a = r % A, r2 = r / A, b = r2 % B, s = r2 / B;  // i runs over dst (s, b, a, c)
    dst[i] = src[((s * A + a) * B + b) * C + c];
  }
}

/// Launches swap_middle_axes_kernel with the widest element and narrowest index that fit.
inline void swap_middle_axes(const char* op, float* dst, const float* src, index_t S, index_t A, index_t B, index_t C) {
  const bool vec4 = C % 4 == 0 && (reinterpret_cast<std::uintptr_t>(dst) | reinterpret_cast<std::uintptr_t>(src)) % 16 == 0;
  const index_t width = vec4 ? 4 : 1, n = S * A * B * C / width;
  const dim3 block(attention_backward_block), grid(grid_for(n, attention_backward_block));
  const bool narrow = n < (index_t{1} << 31);
  if (vec4 && narrow) {
    swap_middle_axes_kernel<float4, std::uint32_t><<<grid, block, 0, stream()>>>(
        reinterpret_cast<float4*>(dst), reinterpret_cast<const float4*>(src), static_cast<std::uint32_t>(S),
        static_cast<std::uint32_t>(A), static_cast<std::uint32_t>(B), static_cast<std::uint32_t>(C / 4));
  } else if (vec4) {
    swap_middle_axes_kernel<float4, index_t><<<grid, block, 0, stream()>>>(
        reinterpret_cast<float4*>(dst), reinterpret_cast<const float4*>(src), S, A, B, C / 4);
  } else if (narrow) {
    swap_middle_axes_kernel<float, std::uint32_t><<<grid, block, 0, stream()>>>(
        dst, src, static_cast<std::uint32_t>(S), static_cast<std::uint32_t>(A), static_cast<std::uint32_t>(B),
        static_cast<std::uint32_t>(C));
  } else {
    swap_middle_axes_kernel<float, index_t><<<grid, block, 0, stream()>>>(dst, src, S, A, B, C);
  }
  check_launch(op, "the head-major copy of ", S, " sequences (", launch_str(grid, block), ")");
}

/// The memory-augmented modes' per-row statistics (T, H), row th = t H + h; all null for Causal.
struct MemoryRowStats {
  const float* gate = nullptr;  // (H) gate logits (gated)
  float* mem_lse = nullptr;     // lm: log-normaliser of the memory scores
  float* go_m = nullptr;        // d_out . M
  float* norm = nullptr;        // joint: z, the log-normaliser of the one softmax
  float* delta = nullptr;       // joint: D
  float* gate_terms = nullptr;  // gated: d_out . M - a
};

/// Step 0, one warp per row (t, h): M (T, H, dh), lm and d_out . M (memory_branch_row's gated form,
/// which normalises M).
template <int DhMax>
__global__ void memory_stats_kernel(AttentionArgs a, const float* __restrict__ d_out, MemoryRowStats st) {
  const index_t warps = blockDim.x / 32, rows = a.n_tok * a.n_head;
  const int lane = threadIdx.x % 32, dh = a.head_dim;
  for (index_t th = blockIdx.x * warps + threadIdx.x / 32; th < rows; th += gridDim.x * warps) {
    const index_t t = th / a.n_head;
    const int h = static_cast<int>(th % a.n_head);
    const index_t at = th * dh;  // (t, h) in (T, H, dh)
    float ml[2];
    memory_branch_row<AttentionMode::Gated, DhMax>(a, t, h, a.q + at, a.out + at, ml);
    float dot = 0.0f;
    for (int c = lane; c < dh; c += 32) dot += d_out[at + c] * a.out[at + c];  // the lane's own M entries
    dot = warp_sum(dot);
    if (lane == 0) {
      st.mem_lse[th] = ml[0] + logf(ml[1]);
      st.go_m[th] = dot;
    }
  }
}

/// Step 1, row (s, h, t) of S (n_seq H, T, T), one warp per row: P = causal softmax(scale S +
/// alibi) in place; joint (stats given) rescales it into the one softmax over local
/// and memory scores and stores z. Each lane reads back only what it wrote.
template <AttentionMode Mode>
__global__ void __launch_bounds__(attention_backward_block)
    causal_softmax_rows_kernel(float* __restrict__ S, index_t n_seq, index_t n_tok, int H, float scale, bool alibi,
                               MemoryRowStats st) {
  const index_t warps = blockDim.x / 32;
  const int lane = threadIdx.x % 32;
  for (index_t row = blockIdx.x * warps + threadIdx.x / 32; row < n_seq * H * n_tok; row += gridDim.x * warps) {
    const int h = static_cast<int>((row / n_tok) % H);
    const index_t t = row % n_tok;
    float* s = S + row * n_tok;
    const double slope = alibi ? alibi_slope(h, H) : 0.0;
    float mx = -INFINITY;
    for (index_t j = lane; j <= t; j += 32) {
      float val = scale * s[j];
      if (alibi) val += static_cast<float>(slope * static_cast<double>(j - t));
      s[j] = val;
      mx = fmaxf(mx, val);
    }
    mx = warp_max_lane0(mx);
    float z = 0;
    for (index_t j = lane; j <= t; j += 32) {
      const float e = expf(s[j] - mx);
      s[j] = e;
      z += e;
    }
    z = warp_sum_lane0(z);
    float inv = 1.0f / z;
    if constexpr (Mode == AttentionMode::Joint) {
      const index_t th = ((row / (n_tok * H)) * n_tok + t) * H + h;  // (s T + t, h) in the (S T, H) statistics
      const float ll = mx + logf(z), lm = st.mem_lse[th];
      const float zj = fmaxf(ll, lm) + log1pf(expf(-fabsf(ll - lm)));  // logaddexp
      inv *= expf(ll - zj);
      if (lane == 0) st.norm[th] = zj;
    }
    for (index_t j = lane; j < n_tok; j += 32) s[j] = j <= t ? s[j] * inv : 0.0f;
  }
}

/// Step 2, row (s, h, t), one warp per row: dP (n_seq H, T, T) becomes dS in place (header
/// comment); gated scales P by the local gate weight so that step 3's P^T d_out is d_v, and stores
/// the gate term; joint stores D.
template <AttentionMode Mode>
__global__ void __launch_bounds__(attention_backward_block)
    softmax_backward_rows_kernel(float* __restrict__ dP, float* __restrict__ P, index_t n_seq, index_t n_tok, int H,
                                 float scale, MemoryRowStats st) {
  const index_t warps = blockDim.x / 32;
  const int lane = threadIdx.x % 32;
  for (index_t row = blockIdx.x * warps + threadIdx.x / 32; row < n_seq * H * n_tok; row += gridDim.x * warps) {
    const int h = static_cast<int>((row / n_tok) % H);
    const index_t t = row % n_tok, th = ((row / (n_tok * H)) * n_tok + t) * H + h;  // (s T + t, h) in the statistics
    float* p = P + row * n_tok;
    float* g = dP + row * n_tok;
    float dot = 0;
    for (index_t j = lane; j <= t; j += 32) dot += p[j] * g[j];
    dot = warp_sum_lane0(dot);
    float gs = 1.0f, D = dot;  // dS = scale P (gs dP - D)
    if constexpr (Mode == AttentionMode::Gated) {
      float w_mem;
      gate_weights(st.gate[h], gs, w_mem);
      D = gs * dot;
      if (lane == 0) st.gate_terms[th] = st.go_m[th] - dot;
    } else if constexpr (Mode == AttentionMode::Joint) {
      D = dot + expf(st.mem_lse[th] - st.norm[th]) * st.go_m[th];
      if (lane == 0) st.delta[th] = D;
    }
    for (index_t j = lane; j < n_tok; j += 32) {
      g[j] = j <= t ? scale * p[j] * (gs * g[j] - D) : 0.0f;
      if constexpr (Mode == AttentionMode::Gated) p[j] *= gs;
    }
  }
}

/// Step 4, one warp per row (t, h): d_q (t, h) += scale sum_j p_j (G_m . Vr_j - D_m) Kr_j.
template <AttentionMode Mode, int DhMax>
__global__ void memory_backward_kernel(AttentionArgs a, const float* __restrict__ d_out, float* __restrict__ d_q,
                                       MemoryRowStats st) {
  constexpr int per_lane = DhMax < 32 ? 1 : DhMax / 32;  // features c = lane + 32 x
  const index_t warps = blockDim.x / 32, rows = a.n_tok * a.n_head, K = a.n_mem;
  const int lane = threadIdx.x % 32, dh = a.head_dim;
  for (index_t th = blockIdx.x * warps + threadIdx.x / 32; th < rows; th += gridDim.x * warps) {
    const int h = static_cast<int>(th % a.n_head);
    const index_t at = th * dh;
    float gm = 1.0f, z, D;
    if constexpr (Mode == AttentionMode::Gated) {
      float gl;
      gate_weights(a.gate[h], gl, gm);
      z = st.mem_lse[th];
      D = gm * st.go_m[th];
    } else {
      z = st.norm[th];
      D = st.delta[th];
    }
    float qr[per_lane], go[per_lane], dq[per_lane];
#pragma unroll
    for (int x = 0; x < per_lane; ++x) {
      const int c = lane + 32 * x;
      qr[x] = c < dh ? a.q[at + c] : 0.0f;
      go[x] = c < dh ? gm * d_out[at + c] : 0.0f;
      dq[x] = 0.0f;
    }
    const float* kr = a.mem_k + th * K * dh;  // (K, dh)
    const float* vr = a.mem_v + th * K * dh;  // (K, dh)
    for (index_t j = 0; j < K; ++j) {
      float kv[per_lane], rs = 0.0f, gv = 0.0f;
#pragma unroll
      for (int x = 0; x < per_lane; ++x) {
        const int c = lane + 32 * x;
        kv[x] = c < dh ? kr[j * dh + c] : 0.0f;
        rs += qr[x] * kv[x];
        gv += c < dh ? go[x] * vr[j * dh + c] : 0.0f;
      }
      rs = warp_sum(rs) * a.scale;
      gv = warp_sum(gv);
      const float dr = expf(rs - z) * (gv - D);
#pragma unroll
      for (int x = 0; x < per_lane; ++x) dq[x] += dr * kv[x];
    }
#pragma unroll
    for (int x = 0; x < per_lane; ++x) {
      const int c = lane + 32 * x;
      if (c < dh) d_q[at + c] += a.scale * dq[x];
    }
  }
}

/// Step 5, block h: d_gate[h] += s (1 - s) sum_t gate_terms (t, h), in double, in a fixed order.
/// (A template, as every kernel in a header: nvcc ignores inline on __global__.)
template <class T>
__global__ void __launch_bounds__(attention_backward_block)
    gate_backward_kernel(T* __restrict__ d_gate, const T* __restrict__ gate, const T* __restrict__ terms, index_t n_tok,
                         int H) {
  __shared__ double partial[32];
  const int h = static_cast<int>(blockIdx.x);
  double s = 0;
  for (index_t t = threadIdx.x; t < n_tok; t += blockDim.x) s += static_cast<double>(terms[t * H + h]);
  s = block_sum(s, partial);
  if (threadIdx.x == 0) {
    float gl, gm;
    gate_weights(gate[h], gl, gm);
    d_gate[h] += static_cast<float>(static_cast<double>(gm) * static_cast<double>(gl) * s);
  }
}

/// Checks as the host backend (d_q, d_k, d_v and d_out like q; no gradient overlapping an input
/// or another gradient); returns the gathered forward arguments (n_tok, heads, head dim, scale,
/// memory).
inline AttentionArgs attention_backward_args(const char* op, TensorView<float, Device> d_q, TensorView<float, Device> d_k,
                                             TensorView<float, Device> d_v, TensorView<const float, Device> d_out,
                                             TensorView<const float, Device> q, TensorView<const float, Device> k,
                                             TensorView<const float, Device> v, TensorView<const float, Device> mem_k = {},
                                             TensorView<const float, Device> mem_v = {},
                                             TensorView<const float, Device> gate = {}, bool gate_needed = false) {
  const AttentionArgs a = attention_args(op, d_q, q, k, v, mem_k, mem_v, gate, gate_needed);
  for (auto [x, name] : {std::pair{TensorView<const float, Device>(d_k), "d_k"},
                         std::pair{TensorView<const float, Device>(d_v), "d_v"}, std::pair{d_out, "d_out"}}) {
    if (!(x.shape() == q.shape()) && !(x.shape() == Shape{q.dim(0), q.dim(1) * q.dim(2)})) {
      fail<ShapeError>(op, ": ", name, ": expected shape ", q.shape().str(), " like q, got ", x.shape().str());
    }
  }
  for (auto [out, oname] : {std::pair{TensorView<const float, Device>(d_q), "d_q"},
                            std::pair{TensorView<const float, Device>(d_k), "d_k"},
                            std::pair{TensorView<const float, Device>(d_v), "d_v"}}) {
    for (auto [in, name] : {std::pair{q, "q"}, std::pair{k, "k"}, std::pair{v, "v"}, std::pair{d_out, "d_out"},
                            std::pair{mem_k, "mem_k"}, std::pair{mem_v, "mem_v"}}) {
      if (overlaps(out, in)) fail<InputError>(op, ": ", oname, " overlaps ", name, "; gradients need separate buffers");
    }
  }
  if (overlaps(d_q, d_k) || overlaps(d_q, d_v) || overlaps(d_k, d_v)) {
    fail<InputError>(op, ": d_q, d_k and d_v must be separate buffers");
  }
  return a;
}

/// Calls f.template operator()<DhMax>() with the head-dim bucket (32, 64, 128, 256) holding dh:
/// the per-row warp kernels keep DhMax / 32 features per lane in registers.
template <class F>
void with_head_dim_bucket(index_t dh, F&& f) {
  if (dh <= 32) {
    f.template operator()<32>();
  } else if (dh <= 64) {
    f.template operator()<64>();
  } else if (dh <= 128) {
    f.template operator()<128>();
  } else {
    f.template operator()<256>();
  }
}

/// Steps 0-5 of the header comment for n_seq sequences of a.n_tok rows each, stacked along the
/// rows (memory (S T, H, K, dh) row by row); d_gate may be null (frozen, or not gated).
template <AttentionMode Mode>
void attention_backward(const char* op, AttentionArgs a, float* d_q, float* d_k, float* d_v, const float* d_out,
                        float* d_gate, PositionScheme positions, index_t n_seq = 1) {
  constexpr bool memory = Mode != AttentionMode::Causal;
  const index_t Tn = a.n_tok, H = a.n_head, dh = a.head_dim, ld = H * dh, rows = n_seq * Tn * H;  // (row, head) pairs
  if (Tn == 0 || H == 0 || dh == 0 || n_seq == 0) return;
  const bool packed = n_seq > 1;
  const std::size_t square = static_cast<std::size_t>(n_seq * H * Tn * Tn);
  const std::size_t stats = memory ? static_cast<std::size_t>(rows) : 0;
  const std::size_t mem_out = memory ? static_cast<std::size_t>(rows * dh) : 0;
  const std::size_t seq_values = static_cast<std::size_t>(rows * dh);  // one (S, T, H, dh) tensor
  Scratch scratch((2 * square + mem_out + 4 * stats + (packed ? 7 * seq_values : 0)) * sizeof(float), op);
  float* P = scratch.as<float>();
  float* dS = P + square;
  MemoryRowStats st;
  // the per-row warp kernels (steps 0 and 4): one warp per (t, h) over all S T rows
  AttentionArgs rows_args = a;
  rows_args.n_tok = n_seq * Tn;
  const dim3 wblock(attention_backward_block), wgrid(grid_for(rows, attention_backward_block / 32));
  if constexpr (memory) {
    float* rest = dS + square;
    rows_args.out = rest;  // M (S T, H, dh)
    st.gate = a.gate;
    st.mem_lse = rest + mem_out;
    st.go_m = st.mem_lse + stats;
    st.norm = st.go_m + stats;
    st.delta = st.norm + stats;
    st.gate_terms = st.delta;  // gated stores gate terms where joint stores D
    auto stats_kernel = [&]<int DhMax>() {
      memory_stats_kernel<DhMax><<<wgrid, wblock, 0, stream()>>>(rows_args, d_out, st);
    };
    with_head_dim_bucket(dh, stats_kernel);
    check_launch(op, "the memory statistics kernel for ", rows, " rows, K = ", a.n_mem, " (", launch_str(wgrid, wblock), ")");
  }
  // The (sequence, head) matrices: in place (rows H dh apart, heads dh apart) for one sequence;
  // otherwise head-major copies (rows dh apart, matrices T dh apart).
  const float *q = a.q, *k = a.k, *v = a.v, *go = d_out;
  float *gq = d_q, *gk = d_k, *gv = d_v;
  index_t row_ld = ld, matrix_stride = dh;
  if (packed) {
    float* buf = dS + square + mem_out + 4 * stats;
    float* heads_major[7];
    for (int i = 0; i < 7; ++i) heads_major[i] = buf + i * seq_values;
    const float* from[4] = {a.q, a.k, a.v, d_out};
    for (int i = 0; i < 4; ++i) swap_middle_axes(op, heads_major[i], from[i], n_seq, Tn, H, dh);
    q = heads_major[0], k = heads_major[1], v = heads_major[2], go = heads_major[3];
    gq = heads_major[4], gk = heads_major[5], gv = heads_major[6];
    row_ld = dh, matrix_stride = Tn * dh;
  }
  const DeviceMath math = device_math();
  const int batch = static_cast<int>(n_seq * H);
  const index_t sq = Tn * Tn;
  auto heads = [&](const float* x, bool transposed) { return GemmOperand{x, row_ld, matrix_stride, transposed}; };
  auto squares = [&](const float* x, bool transposed) { return GemmOperand{x, Tn, sq, transposed}; };
  // S = q k^T, then P in place
  gemm(op, Tn, Tn, dh, heads(q, false), heads(k, true), 0.0f, P, Tn, sq, batch, math);
  const dim3 block(attention_backward_block), grid(grid_for(rows, attention_backward_block / 32));
  causal_softmax_rows_kernel<Mode><<<grid, block, 0, stream()>>>(P, n_seq, Tn, static_cast<int>(H), a.scale,
                                                                 positions == PositionScheme::Alibi, st);
  check_launch(op, "the softmax kernel for ", n_seq * H, " heads of ", Tn, " rows (", launch_str(grid, block), ")");
  // dP = d_out v^T, then dS in place
  gemm(op, Tn, Tn, dh, heads(go, false), heads(v, true), 0.0f, dS, Tn, sq, batch, math);
  softmax_backward_rows_kernel<Mode><<<grid, block, 0, stream()>>>(dS, P, n_seq, Tn, static_cast<int>(H), a.scale, st);
  check_launch(op, "the softmax backward kernel for ", n_seq * H, " heads of ", Tn, " rows (", launch_str(grid, block), ")");
  // d_v = P^T d_out;  d_q = dS k;  d_k = dS^T q
  gemm(op, Tn, dh, Tn, squares(P, true), heads(go, false), 0.0f, gv, row_ld, matrix_stride, batch, math);
  gemm(op, Tn, dh, Tn, squares(dS, false), heads(k, false), 0.0f, gq, row_ld, matrix_stride, batch, math);
  gemm(op, Tn, dh, Tn, squares(dS, true), heads(q, false), 0.0f, gk, row_ld, matrix_stride, batch, math);
  if (packed) {
    const std::pair<float*, const float*> back[3] = {{d_q, gq}, {d_k, gk}, {d_v, gv}};
    for (auto [to, from] : back) swap_middle_axes(op, to, from, n_seq, H, Tn, dh);
  }
  if constexpr (memory) {
    auto backward_kernel = [&]<int DhMax>() {
      memory_backward_kernel<Mode, DhMax><<<wgrid, wblock, 0, stream()>>>(rows_args, d_out, d_q, st);
    };
    with_head_dim_bucket(dh, backward_kernel);
    check_launch(op, "the memory backward kernel for ", rows, " rows, K = ", a.n_mem, " (", launch_str(wgrid, wblock), ")");
    if (Mode == AttentionMode::Gated && d_gate != nullptr) {
      gate_backward_kernel<float><<<static_cast<unsigned>(H), block, 0, stream()>>>(d_gate, a.gate, st.gate_terms,
                                                                              n_seq * Tn, static_cast<int>(H));
      check_launch(op, "the gate gradient kernel for ", H, " heads");
    }
  }
}


/// Runs attention_backward<Mode> over each run of consecutive sequences of one length (split where
/// the scratch budget would be exceeded); empty sequences are skipped. `all` holds the whole
/// tensors; each run gets its rows' pointers (and its rows' retrieved memory).
template <AttentionMode Mode>
void attention_backward_runs(const char* op, const AttentionArgs& all, float* d_q, float* d_k, float* d_v,
                             const float* d_out, float* d_gate, PositionScheme positions,
                             std::span<const index_t> offsets) {
  const index_t ld = index_t{all.n_head} * all.head_dim, mem_row = ld * all.n_mem;
  for (std::size_t b = 0; b + 1 < offsets.size();) {
    const index_t len = offsets[b + 1] - offsets[b];
    if (len == 0) {
      ++b;
      continue;
    }
    const std::size_t per_seq = 2 * sizeof(float) * static_cast<std::size_t>(all.n_head * len * len);
    const std::size_t cap = std::max<std::size_t>(1, attention_backward_budget / std::max<std::size_t>(per_seq, 1));
    std::size_t e = b + 1;
    while (e + 1 < offsets.size() && offsets[e + 1] - offsets[e] == len && e - b < cap) ++e;
    AttentionArgs a = all;
    const index_t first = offsets[b] * ld;
    a.n_tok = len;
    a.q += first, a.k += first, a.v += first;
    if (a.mem_k) a.mem_k += offsets[b] * mem_row, a.mem_v += offsets[b] * mem_row;
    attention_backward<Mode>(op, a, d_q + first, d_k + first, d_v + first, d_out + first, d_gate, positions,
                             static_cast<index_t>(e - b));
    b = e;
  }
}

/// See ops::causal_attention_backward with offsets: each run of consecutive sequences of one length
/// is one batched backward.
template <class T>
void causal_attention_backward_segments(TensorView<T, Device> d_q, TensorView<T, Device> d_k, TensorView<T, Device> d_v,
                                        TensorView<const T, Device> d_out, TensorView<const T, Device> q,
                                        TensorView<const T, Device> k, TensorView<const T, Device> v,
                                        PositionScheme positions, std::span<const index_t> offsets) {
  require_float<T>();
  const char* op = "causal_attention_backward";
  const AttentionArgs all = attention_backward_args(op, d_q, d_k, d_v, d_out, q, k, v);
  attention_backward_runs<AttentionMode::Causal>(op, all, d_q.data(), d_k.data(), d_v.data(), d_out.data(), nullptr,
                                                 positions, offsets);
}

/// See ops::memory_attention_backward with offsets (memory (N, H, K, dh): each row its own).
template <class Fusion, class T>
void memory_attention_backward_segments(TensorView<T, Device> d_q, TensorView<T, Device> d_k, TensorView<T, Device> d_v,
                                        TensorView<T, Device> d_gate, TensorView<const T, Device> d_out,
                                        TensorView<const T, Device> q, TensorView<const T, Device> k,
                                        TensorView<const T, Device> v, TensorView<const T, Device> mem_k,
                                        TensorView<const T, Device> mem_v, TensorView<const T, Device> gate,
                                        PositionScheme positions, std::span<const index_t> offsets) {
  static_assert(longmem::Fusion<Fusion>,
                "memory_attention_backward: Fusion must be longmem::GatedFusion or longmem::JointFusion");
  require_float<T>();
  constexpr bool gated = std::is_same_v<Fusion, GatedFusion>;
  const char* op = "memory_attention_backward";
  const AttentionArgs all = attention_backward_args(op, d_q, d_k, d_v, d_out, q, k, v, mem_k, mem_v, gate, gated);
  if (!absent(d_gate)) {
    expect_shape(d_gate, Shape{q.dim(1)}, "memory_attention_backward: d_gate (H), like gate");
    if (overlaps(d_gate, gate)) fail<InputError>(op, ": d_gate overlaps gate");
  }
  float* dg = absent(d_gate) ? nullptr : d_gate.data();
  if (all.n_mem == 0) {
    attention_backward_runs<AttentionMode::Causal>(op, all, d_q.data(), d_k.data(), d_v.data(), d_out.data(), nullptr,
                                                   positions, offsets);
  } else if constexpr (gated) {
    attention_backward_runs<AttentionMode::Gated>(op, all, d_q.data(), d_k.data(), d_v.data(), d_out.data(), dg,
                                                  positions, offsets);
  } else {
    attention_backward_runs<AttentionMode::Joint>(op, all, d_q.data(), d_k.data(), d_v.data(), d_out.data(), nullptr,
                                                  positions, offsets);
  }
}

/// See ops::causal_attention_backward: one sequence of all the rows.
template <class T>
void causal_attention_backward(TensorView<T, Device> d_q, TensorView<T, Device> d_k, TensorView<T, Device> d_v,
                               TensorView<const T, Device> d_out, TensorView<const T, Device> q,
                               TensorView<const T, Device> k, TensorView<const T, Device> v, PositionScheme positions) {
  const index_t rows[2] = {0, q.rank() > 0 ? q.dim(0) : 0};
  causal_attention_backward_segments(d_q, d_k, d_v, d_out, q, k, v, positions, std::span<const index_t>(rows));
}

/// See ops::memory_attention_backward (one sequence of all the rows). K = 0 is exactly
/// causal_attention_backward.
template <class Fusion, class T>
void memory_attention_backward(TensorView<T, Device> d_q, TensorView<T, Device> d_k, TensorView<T, Device> d_v,
                               TensorView<T, Device> d_gate, TensorView<const T, Device> d_out,
                               TensorView<const T, Device> q, TensorView<const T, Device> k, TensorView<const T, Device> v,
                               TensorView<const T, Device> mem_k, TensorView<const T, Device> mem_v,
                               TensorView<const T, Device> gate, PositionScheme positions) {
  const index_t rows[2] = {0, q.rank() > 0 ? q.dim(0) : 0};
  memory_attention_backward_segments<Fusion>(d_q, d_k, d_v, d_gate, d_out, q, k, v, mem_k, mem_v, gate, positions,
                                             std::span<const index_t>(rows));
}

}  // namespace longmem::detail::cuda
