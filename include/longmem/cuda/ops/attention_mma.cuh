#pragma once
// Tensor-core attention for head dims up to 64 (fp32 or bf16 in and out, fp32-accurate maths):
// flash-style, the local causal branch on mma.sync tensor cores, the memory branch and the
// gate/joint fusion as in the FMA kernel (attention.cuh). sm_80 and later.
//
// Block: 4 warps, each owning 16 query rows (Br = 64); k and v tiles of Bc = 64 keys in shared
// memory; the T x T scores never exist. Per warp and tile:
//   S (16 x 64) = Q (16 x dh) K^T      mma.m16n8k8 tf32, Q fragments held in registers
//   online softmax on S's accumulator fragments (rows g and g + 8 of each thread, quads reduce)
//   O (16 x dh) += P (16 x 64) V       P's accumulator fragments are reused as A fragments without
//                                      a shuffle: within each 8-key slice the mma's k index tig maps
//                                      to key 2 tig and tig + 4 to key 2 tig + 1, and V's B fragments
//                                      are read in that order (the sum over keys is order-free)
// Precision (Split = true, DeviceMath::fp32): every product runs as 3xTF32 (x = big + small with
// big = tf32(x), small = tf32(x - big); a b ~ big_a big_b + big_a small_b + small_a big_b, the dropped
// small_a small_b is <= 2^-22 |a b|), so scores and outputs keep float accuracy (the op tests' rtol
// 1e-4 of the FMA kernel holds), at 3 tensor-core instructions per product instead of 1.
// Split = false (DeviceMath::tf32 and bf16): one mma on the inputs rounded to TF32 (10 mantissa bits).
// (bf16 and fp16 buffers take attention_mma16.cuh's kernel; this one is instantiated for float only.)
// Fragment layouts: cuda/detail/mma.cuh.
// Shared rows have a pitch of DhMax + 4 floats: both fragment reads (k: row g, column tig; v: rows
// 2 tig and 2 tig + 1, column g) then fall in 32 distinct banks.
// No branch sits inside the mma loops (a branch per slice would split the accumulator chains into
// basic blocks and serialise the tensor-core latency): columns past dh are zeros up to DhMax, and
// 8-key slices past the diagonal are computed and masked.
// Blocks start with the last query block (the longest rows) so the causal triangle's tail is short.
#include <cstdint>

#include "longmem/cuda/detail/mma.cuh"
#include "longmem/cuda/ops/attention_parts.cuh"
#include "longmem/detail/alibi.hpp"

namespace longmem::detail::cuda {

inline constexpr int mma_br = device_attention_tuning.mma_query_block;
inline constexpr int mma_bc = device_attention_tuning.mma_key_block;
inline constexpr int mma_threads = 128;
static_assert(mma_br == 16 * (mma_threads / 32), "each warp owns 16 query rows");
static_assert(mma_bc % 8 == 0, "keys go in 8-key slices");

/// Shared-memory floats of one block: the k and v tiles, and (memory modes) the memory branch's
/// output rows and (max, sum) per query row.
inline std::size_t attention_mma_smem_floats(int dh_max, bool memory) {
  const std::size_t pitch = static_cast<std::size_t>(dh_max + 4);
  std::size_t n = 2 * mma_bc * pitch;
  if (memory) n += mma_br * pitch + 2 * mma_br;
  return n;
}

#if defined(__CUDACC__)
/// x = big + small, both tf32 (small carries the 13 bits big drops, rounded once more).
__device__ inline void split_tf32(float x, std::uint32_t& big, std::uint32_t& small) {
  big = to_tf32(x);
  small = to_tf32(x - __uint_as_float(big));
}
/// x as tf32 (and, when Split, the rest x - big as a second tf32).
template <bool Split>
__device__ inline void to_tf32_parts(float x, std::uint32_t& big, std::uint32_t& small) {
  if constexpr (Split) {
    split_tf32(x, big, small);
  } else {
    big = to_tf32(x);
    small = 0;
  }
}
/// d += a b in about float precision: the two small cross terms first, then big x big.
__device__ inline void mma_3xtf32(float (&d)[4], const std::uint32_t (&a_big)[4], const std::uint32_t (&a_small)[4],
                                  float b0, float b1) {
  std::uint32_t bb0, bs0, bb1, bs1;
  split_tf32(b0, bb0, bs0);
  split_tf32(b1, bb1, bs1);
  mma_tf32(d, a_small, bb0, bb1);
  mma_tf32(d, a_big, bs0, bs1);
  mma_tf32(d, a_big, bb0, bb1);
}
/// d += a b: 3xTF32 when Split, else one mma on tf32-rounded inputs (a_small unused).
template <bool Split>
__device__ inline void mma_f32(float (&d)[4], const std::uint32_t (&a_big)[4], const std::uint32_t (&a_small)[4],
                               float b0, float b1) {
  if constexpr (Split) {
    mma_3xtf32(d, a_big, a_small, b0, b1);
  } else {
    mma_tf32(d, a_big, to_tf32(b0), to_tf32(b1));
  }
}

/// Four consecutive elements of a row as float (one 16-byte load for float, 8 bytes for bf16).
__device__ inline float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ inline float4 load4(const __nv_bfloat16* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
  const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
  return make_float4(lo.x, lo.y, hi.x, hi.y);
}

/// The block's sequence (rows row0 .. row0 + T - 1 of the batch) and its first query q0: with
/// a.n_seg sequences, block x = r n_seg + s is the r-th query block from the end of sequence s;
/// otherwise one sequence, the longest rows first. False: the block has no rows (a shorter
/// sequence), and leaves before any barrier.
template <class E>
__device__ inline bool mma_block_rows(const AttentionArgsT<E>& a, index_t& row0, index_t& T, index_t& q0) {
  row0 = 0, T = a.n_tok, q0 = 0;
  if (a.n_seg > 0) {
    const int s = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.n_seg));
    const index_t r = blockIdx.x / static_cast<unsigned>(a.n_seg);
    row0 = a.seg[s];
    T = a.seg[s + 1] - row0;
    const index_t blocks = (T + mma_br - 1) / mma_br;
    if (r >= blocks) return false;
    q0 = (blocks - 1 - r) * mma_br;
  } else {
    q0 = index_t(gridDim.x - 1 - blockIdx.x) * mma_br;
  }
  return true;
}

/// Joint fusion: the memory branch's (max, sum, e Vr) of this thread's two rows open the local
/// online softmax (the sum counted once per quad). mem_o rows have `pitch` floats.
template <int NTile>
__device__ inline void mma_joint_open(float (&o)[NTile][4], float (&m)[2], float (&l)[2], const index_t (&row)[2],
                                      index_t T, int warp, int g, int tig, int dh, const float* mem_o,
                                      const float* mem_ml, int pitch) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (row[j] >= T) continue;
    const int r = 16 * warp + g + 8 * j;
    m[j] = mem_ml[2 * r];
    l[j] = tig == 0 ? mem_ml[2 * r + 1] : 0.0f;
#pragma unroll
    for (int s = 0; s < NTile; ++s) {
      const int c = 8 * s + 2 * tig;
      if (c < dh) o[s][2 * j] = mem_o[r * pitch + c];
      if (c + 1 < dh) o[s][2 * j + 1] = mem_o[r * pitch + c + 1];
    }
  }
}

/// The second half of a key tile's online-softmax step, shared by the TF32 and 16-bit kernels: given
/// the scored and masked tile sc and this thread's row maxima mx over it (m included), the maxima
/// over the quad, alpha = exp(m - m_new), sc := exp(sc - m_new) summed into l, m := m_new. FastExp:
/// the 16-bit kernel's exp, ex2.approx.ftz of x log2(e) (about 2 ulp; results below 2^-126, far under
/// a 16-bit probability's rounding next to the row's 1, flush to 0), instead of expf.
template <bool FastExp, int NSlice>
__device__ inline void mma_softmax_rescale(float (&sc)[NSlice][4], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                           float (&mx)[2]) {
  constexpr float neg_inf = -INFINITY;
  const auto ex = [](float x) {
    if constexpr (FastExp) {
      float y;
      asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
      return y;
    } else {
      return expf(x);
    }
  };
  float shift[2];  // what the scores are shifted by: the row's max, 0 while it has no key
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    alpha[r] = mx[r] == neg_inf ? 1.0f : ex(m[r] - mx[r]);  // no key yet (rows past T): stay at zero
    // A row with no key yet has only -inf scores, and exp(-inf - 0) = 0 (expf and ex2.approx alike):
    // no select per score.
    shift[r] = mx[r] == neg_inf ? 0.0f : mx[r];
  }
  l[0] *= alpha[0];
  l[1] *= alpha[1];
#pragma unroll
  for (int j = 0; j < NSlice; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = e / 2;
      sc[j][e] = ex(sc[j][e] - shift[r]);
      l[r] += sc[j][e];
    }
  }
  m[0] = mx[0];
  m[1] = mx[1];
}

/// Whether key tile [k0, k0 + Bc) needs the causal and length mask for a warp's rows [w0, w_last]
/// of a T-row sequence: it crosses the diagonal or the rows pass T. Otherwise every key <= every
/// row < T, and the softmax step is compiled without the mask.
__device__ inline bool mma_tile_masked(index_t k0, index_t w0, index_t w_last, index_t T) {
  return k0 + mma_bc - 1 > w0 || w_last >= T;
}

/// One key tile's online-softmax step on S's accumulator fragments sc (rows row[0], row[1]; keys
/// k0 + 8 j + 2 tig (+1)): scale, ALiBi (as the host's ramp: slope * (key - t) in double, rounded
/// once), the causal and length mask when Masked (a tile that crosses the diagonal or T; the others
/// need none, so they are compiled without it), the running maxima m (quads share rows), sc :=
/// exp(sc - m_new), the partial row sums l; returns the factors alpha the output rows must be rescaled by.
template <bool Masked, int NSlice, class E>
__device__ inline void mma_softmax_tile(float (&sc)[NSlice][4], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                        const index_t (&row)[2], index_t k0, index_t T, int tig,
                                        const AttentionArgsT<E>& a, double slope) {
  constexpr float neg_inf = -INFINITY;
  float mx[2] = {m[0], m[1]};
#pragma unroll
  for (int j = 0; j < NSlice; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const index_t t = row[e / 2], key = k0 + 8 * j + 2 * tig + (e % 2);
      float val = sc[j][e] * a.scale;
      if (a.alibi) val += static_cast<float>(slope * static_cast<double>(key - t));
      if constexpr (Masked) val = t < T && key <= t ? val : neg_inf;
      sc[j][e] = val;
      mx[e / 2] = fmaxf(mx[e / 2], sc[j][e]);
    }
  }
  mma_softmax_rescale<false>(sc, m, l, alpha, mx);
}

/// The end of a tile loop: the row sums' four parts added over the quad, then each of this
/// thread's rows normalised, fused with the memory branch (gated: mem_o rows of `pitch` floats)
/// and written to a.out.
template <AttentionMode Mode, int NTile, class E>
__device__ inline void mma_write_rows(const AttentionArgsT<E>& a, float (&o)[NTile][4], float (&l)[2],
                                      const index_t (&row)[2], index_t row0, index_t T, index_t q0, int h, int tig,
                                      const float* mem_o, int pitch) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  const int dh = a.head_dim;
  const index_t ld = index_t(a.n_head) * dh;
  float w_local = 1.0f, w_mem = 0.0f;
  if constexpr (Mode == AttentionMode::Gated) gate_weights(device_load(a.gate[h]), w_local, w_mem);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const index_t t = row[r];
    if (t >= T) continue;
    const float inv = 1.0f / l[r];
    E* out = a.out + (row0 + t) * ld + index_t(h) * dh;
    const float* mo = mem_o + (t - q0) * pitch;
#pragma unroll
    for (int s = 0; s < NTile; ++s) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = 8 * s + 2 * tig + e;
        if (c >= dh) continue;
        if constexpr (Mode == AttentionMode::Gated) {
          out[c] = device_store<E>((w_local * inv) * o[s][2 * r + e] + w_mem * mo[c]);
        } else {
          out[c] = device_store<E>(o[s][2 * r + e] * inv);
        }
      }
    }
  }
}

template <AttentionMode Mode, int DhMax, bool Split, class E>
__global__ void __launch_bounds__(mma_threads) attention_mma_kernel(AttentionArgsT<E> a) {
  static_assert(DhMax % 8 == 0 && DhMax <= 64, "the tensor-core kernel holds dh <= 64 in registers");
  constexpr int n_slice = DhMax / 8;  // 8-wide slices of dh: S's reduction steps and O's column tiles
  constexpr int n_kslice = mma_bc / 8;  // 8-key slices of a tile
  constexpr float neg_inf = -INFINITY;

  extern __shared__ float smem[];
  const int dh = a.head_dim, H = a.n_head, h = blockIdx.y;
  constexpr int pitch = DhMax + 4;
  const index_t ld = index_t(H) * dh;
  index_t row0, T, q0;  // the block's sequence: rows row0 .. row0 + T - 1; its first query
  if (!mma_block_rows(a, row0, T, q0)) return;
  float* ks = smem;                       // (Bc, pitch) keys of the tile
  float* vs = ks + mma_bc * pitch;        // (Bc, pitch) values of the tile
  float* mem_o = vs + mma_bc * pitch;     // (Br, pitch) memory modes: M (gated) or e Vr (joint)
  float* mem_ml = mem_o + mma_br * pitch; // (Br, 2) memory modes: max score, sum of exps
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  const index_t w0 = q0 + 16 * warp, w_last = w0 + 15;  // the warp's rows
  const index_t row[2] = {w0 + g, w0 + g + 8};          // this thread's rows (fragment rows g, g + 8)
  const E* qh = a.q + row0 * ld + index_t(h) * dh;
  const E* kh = a.k + row0 * ld + index_t(h) * dh;
  const E* vh = a.v + row0 * ld + index_t(h) * dh;
  // Vector staging needs rows of whole groups of 4 elements at 4-element-aligned addresses
  const bool vec4 = dh % 4 == 0 &&
                    ((reinterpret_cast<std::uintptr_t>(kh) | reinterpret_cast<std::uintptr_t>(vh)) % (4 * sizeof(E))) == 0;

  // Q fragments for every dh slice, split once.
  std::uint32_t q_big[n_slice][4], q_small[n_slice][4];
#pragma unroll
  for (int s = 0; s < n_slice; ++s) {
    const int c[4] = {8 * s + tig, 8 * s + tig, 8 * s + tig + 4, 8 * s + tig + 4};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const index_t r = row[e % 2];
      const float x = r < T && c[e] < dh ? device_load(qh[r * ld + c[e]]) : 0.0f;
      to_tf32_parts<Split>(x, q_big[s][e], q_small[s][e]);
    }
  }

  float o[n_slice][4];  // O fragments: rows g / g + 8, columns 8 s + 2 tig (+1)
  float m[2] = {neg_inf, neg_inf};
  float l[2] = {0.0f, 0.0f};  // this thread's part of the row sums (the quad adds them at the end)
#pragma unroll
  for (int s = 0; s < n_slice; ++s) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[s][e] = 0.0f;
  }

  if constexpr (Mode != AttentionMode::Causal) {
    for (int i = 0; i < 16; ++i) {  // the warp's own rows: no block barrier needed
      const index_t t = w0 + i;
      // the retrieved memory (N, H, K, dh) is indexed by the row over all sequences
      if (t < T) memory_branch_row<Mode, DhMax>(a, row0 + t, h, qh + t * ld, mem_o + (16 * warp + i) * pitch, mem_ml + 2 * (16 * warp + i));
    }
    __syncwarp();
    if constexpr (Mode == AttentionMode::Joint) {  // the memory scores open the local online softmax
      mma_joint_open(o, m, l, row, T, warp, g, tig, dh, mem_o, mem_ml, pitch);
    }
  }

  const double slope = a.alibi ? alibi_slope(h, H) : 0.0;
  const index_t k_end = T < q0 + mma_br ? T : q0 + mma_br;  // keys up to the block's last query
  for (index_t k0 = 0; k0 < k_end; k0 += mma_bc) {
    __syncthreads();  // the previous tile is no longer read
    // Stage keys k0 .. k0 + Bc - 1 (zeros past T and past dh), 16 bytes per load where rows allow.
    if (vec4) {
      constexpr int per_row = DhMax / 4;
#pragma unroll
      for (int e = tid; e < mma_bc * per_row; e += mma_threads) {
        const int r = e / per_row, c = 4 * (e % per_row);
        const index_t key = k0 + r;
        float4 kx = make_float4(0.0f, 0.0f, 0.0f, 0.0f), vx = kx;
        if (key < T && c < dh) {
          kx = load4(kh + key * ld + c);
          vx = load4(vh + key * ld + c);
        }
        *reinterpret_cast<float4*>(ks + r * pitch + c) = kx;
        *reinterpret_cast<float4*>(vs + r * pitch + c) = vx;
      }
    } else {
#pragma unroll 4
      for (int e = tid; e < mma_bc * DhMax; e += mma_threads) {
        const int r = e / DhMax, c = e % DhMax;
        const index_t key = k0 + r;
        const bool ok = key < T && c < dh;
        ks[r * pitch + c] = ok ? device_load(kh[key * ld + c]) : 0.0f;
        vs[r * pitch + c] = ok ? device_load(vh[key * ld + c]) : 0.0f;
      }
    }
    __syncthreads();
    if (k0 > w_last || w0 >= T) continue;  // every key of the tile is after all of this warp's rows
    float sc[n_kslice][4];  // S fragments: rows g / g + 8, keys 8 j + 2 tig (+1)
#pragma unroll
    for (int j = 0; j < n_kslice; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[j][e] = 0.0f;
      const float* krow = ks + (8 * j + g) * pitch + tig;
#pragma unroll
      for (int s = 0; s < n_slice; ++s) mma_f32<Split>(sc[j], q_big[s], q_small[s], krow[8 * s], krow[8 * s + 4]);
    }

    // Scale, ALiBi, causal mask; running maxima per row (quads share rows); probabilities.
    float alpha[2];
    if (mma_tile_masked(k0, w0, w_last, T)) {
      mma_softmax_tile<true>(sc, m, l, alpha, row, k0, T, tig, a, slope);
    } else {  // every key <= every row < T
      mma_softmax_tile<false>(sc, m, l, alpha, row, k0, T, tig, a, slope);
    }
#pragma unroll
    for (int s = 0; s < n_slice; ++s) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[s][e] *= alpha[e / 2];
    }
    // O += P V, slice by slice of 8 keys.
#pragma unroll
    for (int j = 0; j < n_kslice; ++j) {
      std::uint32_t p_big[4], p_small[4];  // A fragment: k index tig = key 2 tig, tig + 4 = key 2 tig + 1
      to_tf32_parts<Split>(sc[j][0], p_big[0], p_small[0]);
      to_tf32_parts<Split>(sc[j][2], p_big[1], p_small[1]);
      to_tf32_parts<Split>(sc[j][1], p_big[2], p_small[2]);
      to_tf32_parts<Split>(sc[j][3], p_big[3], p_small[3]);
      const float* v0 = vs + (8 * j + 2 * tig) * pitch + g;  // B fragment rows: keys 2 tig and 2 tig + 1
#pragma unroll
      for (int s = 0; s < n_slice; ++s) mma_f32<Split>(o[s], p_big, p_small, v0[8 * s], v0[pitch + 8 * s]);
    }
  }

  // The row sums' four parts; then normalise, fuse, write.
  mma_write_rows<Mode>(a, o, l, row, row0, T, q0, h, tig, mem_o, pitch);
}
#endif

}  // namespace longmem::detail::cuda
