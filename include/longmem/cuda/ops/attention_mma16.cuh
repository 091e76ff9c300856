#pragma once
// Tensor-core attention on 16-bit buffers (the forward of a bf16 or fp16 model), head dims up to 64:
// the tile loop of attention_mma.cuh with E = __nv_bfloat16 or __half operands, one mma.m16n8k16 per
// 16 x 8 x 16 block (fp32 accumulation), so the tensor cores do half the steps of the TF32 path and
// the k/v tiles take half the shared memory. The memory branch, the gate/joint fusion, ALiBi, the
// masks and the block and sequence layout are the TF32 kernel's.
//
// Block: 4 warps x 16 query rows (Br = 64); key tiles of Bc = 64 in two stages of shared memory: the
// next tile's keys and values come by cp.async while this one is computed. Per warp and tile:
//   S (16 x 64) = Q (16 x dh) K^T      Q's A fragments held in registers (E pairs), K's B
//                                      fragments by ldmatrix (two 16-wide steps of dh per
//                                      instruction) from the (key, feature) tile
//   online softmax on S's fp32 accumulators (rows g and g + 8 of each thread, quads reduce), in
//                                      float throughout (softmax_tile_16 below)
//   O (16 x dh) += P (16 x 64) V       P's accumulators packed to E pairs as A fragments (the
//                                      accumulator of 8-key slice 2j is A's columns 0-7 of 16-key
//                                      step j, slice 2j + 1 its columns 8-15); V's B fragments by
//                                      ldmatrix.trans from the (key, feature) tile as it was loaded
// Precision: q, k, v are E already; the products are exact in fp32 and sums are fp32. The
// probabilities are rounded to E (relative 2^-9 in bf16, 2^-12 in fp16) before P V, as flash
// attention does; the row sums use the unrounded fp32 probabilities. Against the TF32 kernel's
// softmax step (exact to a float rounding, for the fp32 fixtures) this one takes the ALiBi term as a
// float product and exp as ex2.approx.ftz of x log2(e) (what __expf compiles to; results below
// 2^-126 flush to 0): each changes a probability by far less than its rounding to E (an ALiBi term
// of 700 is off by at most 6e-5; the exp by about 1e-5 relative over the range a softmax uses). The
// TF32 step's double ALiBi products from 64-bit indices were the likely cost of this kernel's 58
// TFLOP/s on an H100 (2026-12-08 profile, bench/RESULTS.md); the float step is not yet timed.
// Instructions per warp and unmasked key tile (bf16, dh 64, SASS counted with cuobjdump): 1,086
// with the mask predicated into every tile, 32-bit K fragment loads and a select per score; 466
// with the masked step compiled apart (only tiles crossing the diagonal or T run it), K's
// fragments by ldmatrix.x4 and the exp's shift instead of the select.
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16 and .f16): lane = 4 g + tig;
//   A (16 x 16): a0 (g, 2 tig..+1) a1 (g + 8, 2 tig..+1) a2 (g, 2 tig + 8..+9) a3 (g + 8, 2 tig + 8..+9)
//   B (16 x 8):  b0 (k 2 tig..+1, n g) b1 (k 2 tig + 8..+9, n g)
//   C (16 x 8):  c0 (g, 2 tig) c1 (g, 2 tig + 1) c2 (g + 8, 2 tig) c3 (g + 8, 2 tig + 1)
// Shared pitch (in elements) of both tiles: DhMax + 8, so that a quad's 32-bit fragment reads and
// the eight row addresses of an ldmatrix fall in distinct banks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "longmem/cuda/ops/attention_mma.cuh"
#include "longmem/cuda/ops/attention_parts.cuh"
#include "longmem/detail/alibi.hpp"

namespace longmem::detail::cuda {

inline constexpr int mma16_pitch_extra = 8;  // elements added to a k- or v-tile row

/// Shared-memory bytes of one block: two stages of the k and v tiles (Bc, DhMax + 8) in 16 bits, and
/// (memory modes) the memory branch's output rows (Br, DhMax + 4) and (max, sum) per query row in float.
inline std::size_t attention_mma16_smem_bytes(int dh_max, bool memory) {
  std::size_t n = 4 * static_cast<std::size_t>(mma_bc) * (dh_max + mma16_pitch_extra) * 2;
  n = (n + 15) / 16 * 16;
  if (memory) n += (static_cast<std::size_t>(mma_br) * (dh_max + 4) + 2 * mma_br) * sizeof(float);
  return n;
}

#if defined(__CUDACC__)
/// d += a b: A (16 x 16) row-major, B (16 x 8) column-major, both E (__nv_bfloat16 or __half), fp32
/// accumulation.
template <class E>
__device__ inline void mma16(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  if constexpr (std::is_same_v<E, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<E, __half>, "the 16-bit attention kernel takes __nv_bfloat16 or __half");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

/// Two 16-bit values as one 32-bit register, `lo` in the low half (the lower column of a fragment pair).
template <class E>
__device__ inline std::uint32_t pack16(E lo, E hi) {
  std::uint16_t l, h;
  memcpy(&l, &lo, 2);
  memcpy(&h, &hi, 2);
  return static_cast<std::uint32_t>(l) | (static_cast<std::uint32_t>(h) << 16);
}
/// Two floats rounded to E (to nearest even) as one 32-bit register.
template <class E>
__device__ inline std::uint32_t pack16(float lo, float hi) {
  return pack16(device_store<E>(lo), device_store<E>(hi));
}

/// B fragments of two 8-feature column tiles for a 16-key step, from a (key, feature) tile in shared
/// memory: `row` is this lane's row address, key (lane % 8) + 8 ((lane / 8) % 2) of the step,
/// features 8 (lane / 16) on from the first tile's. b[0], b[1] feed the first tile, b[2], b[3] the
/// second (.trans hands lane (g, tig) keys 2 tig, 2 tig + 1 of feature g: the B layout).
__device__ inline void ldmatrix_x4_trans(std::uint32_t (&b)[4], const void* row) {
  const auto addr = static_cast<std::uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
               : "r"(addr));
}

/// K's B fragments for S = Q K^T, two 16-wide steps of dh (s, s + 1) of one 8-key slice at once,
/// from the (key, feature) tile: ldmatrix.x4 (no .trans) hands lane (g, tig) the features 2 tig,
/// 2 tig + 1 of row g of four 8 x 8 blocks, which are b0, b1 of step s and b0, b1 of step s + 1 when
/// lane l points at key (l % 8) of the slice, features 16 s + 8 (l / 8). One instruction for what
/// took four 32-bit shared loads.
__device__ inline void ldmatrix_x4(std::uint32_t (&b)[4], const void* row) {
  const auto addr = static_cast<std::uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
               : "r"(addr));
}
/// The same for one step (an odd last step): lanes 0-15 give the addresses, b0 and b1 come back.
__device__ inline void ldmatrix_x2(std::uint32_t (&b)[2], const void* row) {
  const auto addr = static_cast<std::uint32_t>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(b[0]), "=r"(b[1]) : "r"(addr));
}

/// The online-softmax step of one key tile for the 16-bit kernel (see the header for how it differs
/// from mma_softmax_tile): scores scaled, ALiBi added as slope x (key - t) in float from exact
/// float distances, the causal and length mask only when Masked (a tile that crosses the diagonal
/// or T: a compile-time branch, so the other tiles carry no mask code at all; positions are below
/// 2^24, checked on the host, so they are compared as int); then mma_softmax_rescale's fast exp.
template <bool Masked, int NSlice>
__device__ inline void softmax_tile_16(float (&sc)[NSlice][4], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                       const index_t (&row)[2], index_t k0, index_t T, int tig, float scale,
                                       bool alibi, float slope) {
  constexpr float neg_inf = -INFINITY;
  float dist[4];  // key - t of slice 0, exact in float (|key - t| < T <= 2^24 is checked on the host)
#pragma unroll
  for (int e = 0; e < 4; ++e) dist[e] = static_cast<float>(k0 + 2 * tig + (e % 2) - row[e / 2]);
  const int t_row[2] = {static_cast<int>(row[0]), static_cast<int>(row[1])};
  const int key0 = static_cast<int>(k0) + 2 * tig, t_end = static_cast<int>(T);
  float mx[2] = {m[0], m[1]};
#pragma unroll
  for (int j = 0; j < NSlice; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float val = sc[j][e] * scale;
      if (alibi) val = fmaf(slope, dist[e] + 8.0f * j, val);
      if constexpr (Masked) {
        const int t = t_row[e / 2], key = key0 + 8 * j + (e % 2);
        val = t < t_end && key <= t ? val : neg_inf;
      }
      sc[j][e] = val;
      mx[e / 2] = fmaxf(mx[e / 2], val);
    }
  }
  mma_softmax_rescale<true>(sc, m, l, alpha, mx);
}

template <AttentionMode Mode, int DhMax, class E>
__global__ void __launch_bounds__(mma_threads) attention_mma16_kernel(AttentionArgsT<E> a) {
  static_assert(DhMax % 16 == 0 && DhMax <= 64, "the 16-bit tensor-core kernel holds dh <= 64 in 16-wide steps");
  constexpr int n_kstep = DhMax / 16;   // 16-wide steps of dh: S's reduction steps
  constexpr int n_otile = DhMax / 8;    // 8-wide column tiles of O
  constexpr int n_kslice = mma_bc / 8;  // 8-key slices of a tile (S's column tiles)
  constexpr int kp = DhMax + mma16_pitch_extra;  // both tiles' row pitch
  constexpr int fpitch = DhMax + 4;     // float rows of the memory branch's output
  constexpr float neg_inf = -INFINITY;

  extern __shared__ __align__(16) unsigned char smem_bytes[];
  const int dh = a.head_dim, H = a.n_head, h = blockIdx.y;
  const index_t ld = index_t(H) * dh;
  index_t row0, T, q0;  // as attention_mma_kernel
  if (!mma_block_rows(a, row0, T, q0)) return;
  // Stage s: keys (Bc, kp) at tiles + 2 s Bc kp, then values (Bc, kp).
  E* tiles = reinterpret_cast<E*>(smem_bytes);
  const std::size_t tiles_bytes = (4 * static_cast<std::size_t>(mma_bc) * kp * 2 + 15) / 16 * 16;
  float* mem_o = reinterpret_cast<float*>(smem_bytes + tiles_bytes);  // (Br, fpitch) memory modes
  float* mem_ml = mem_o + mma_br * fpitch;                            // (Br, 2) memory modes
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  const index_t w0 = q0 + 16 * warp, w_last = w0 + 15;
  const index_t row[2] = {w0 + g, w0 + g + 8};
  const E* qh = a.q + row0 * ld + index_t(h) * dh;
  const E* kh = a.k + row0 * ld + index_t(h) * dh;
  const E* vh = a.v + row0 * ld + index_t(h) * dh;
  const E zero = device_store<E>(0.0f);
  // 16-byte staging needs rows of whole groups of 8 at 16-byte addresses, in k and in v
  const bool vec8 =
      dh % 8 == 0 && ((reinterpret_cast<std::uintptr_t>(kh) | reinterpret_cast<std::uintptr_t>(vh)) % 16) == 0;

  // Q's A fragments for every 16-wide step of dh.
  std::uint32_t qa[n_kstep][4];
#pragma unroll
  for (int s = 0; s < n_kstep; ++s) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const index_t r = row[e % 2];
      const int c = 16 * s + 2 * tig + (e / 2) * 8;
      const E x0 = r < T && c < dh ? qh[r * ld + c] : zero;
      const E x1 = r < T && c + 1 < dh ? qh[r * ld + c + 1] : zero;
      qa[s][e] = pack16(x0, x1);
    }
  }

  float o[n_otile][4];
  float m[2] = {neg_inf, neg_inf};
  float l[2] = {0.0f, 0.0f};
#pragma unroll
  for (int s = 0; s < n_otile; ++s) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[s][e] = 0.0f;
  }

  if constexpr (Mode != AttentionMode::Causal) {
    for (int i = 0; i < 16; ++i) {  // the warp's own rows
      const index_t t = w0 + i;
      if (t < T) {
        memory_branch_row<Mode, DhMax>(a, row0 + t, h, qh + t * ld, mem_o + (16 * warp + i) * fpitch,
                                       mem_ml + 2 * (16 * warp + i));
      }
    }
    __syncwarp();
    if constexpr (Mode == AttentionMode::Joint) {  // the memory scores open the local online softmax
      mma_joint_open(o, m, l, row, T, warp, g, tig, dh, mem_o, mem_ml, fpitch);
    }
  }

  const float slope = a.alibi ? static_cast<float>(alibi_slope(h, H)) : 0.0f;
  const index_t k_end = T < q0 + mma_br ? T : q0 + mma_br;
  const index_t n_tiles = (k_end + mma_bc - 1) / mma_bc;
  // A tile's keys and values as they are (zeros past T and past dh) into stage s: 16-byte cp.async
  // when vec8 (the copy runs on while the previous tile is computed), else element by element.
  auto stage_tile = [&](index_t k0, int s) {
    E* ks = tiles + 2 * s * mma_bc * kp;
    E* vs = ks + mma_bc * kp;
    if (vec8) {
      constexpr int per_row = DhMax / 8;
      for (int e = tid; e < mma_bc * per_row; e += mma_threads) {
        const int r = e / per_row, c = 8 * (e % per_row);
        const index_t key = k0 + r;
        const bool ok = key < T && c < dh;
        const index_t at = ok ? key * ld + c : 0;
        cp_async16(ks + r * kp + c, kh + at, ok);
        cp_async16(vs + r * kp + c, vh + at, ok);
      }
    } else {
      for (int e = tid; e < mma_bc * DhMax; e += mma_threads) {
        const int r = e / DhMax, c = e % DhMax;
        const index_t key = k0 + r;
        const bool ok = key < T && c < dh;
        ks[r * kp + c] = ok ? kh[key * ld + c] : zero;
        vs[r * kp + c] = ok ? vh[key * ld + c] : zero;
      }
    }
    cp_async_commit();
  };
  if (n_tiles > 0) stage_tile(0, 0);
  for (index_t i = 0; i < n_tiles; ++i) {
    const index_t k0 = i * mma_bc;
    __syncthreads();  // tile i - 1 is no longer read: its stage may be refilled
    if (i + 1 < n_tiles) {
      stage_tile(k0 + mma_bc, static_cast<int>((i + 1) % 2));
      cp_async_wait<1>();  // tile i has landed (for this thread's copies)
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // ... and every thread's
    if (k0 > w_last || w0 >= T) continue;
    const E* ks = tiles + 2 * static_cast<int>(i % 2) * mma_bc * kp;
    const E* vs = ks + mma_bc * kp;
    float sc[n_kslice][4];
    // Lane l's ldmatrix row: key l % 8 of a slice, features 8 (l / 8) of a pair of 16-wide steps.
    const E* kbase = ks + (lane % 8) * kp + 8 * (lane / 8);
#pragma unroll
    for (int j = 0; j < n_kslice; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[j][e] = 0.0f;
      const E* krow = kbase + 8 * j * kp;
#pragma unroll
      for (int s = 0; s + 1 < n_kstep; s += 2) {
        std::uint32_t b[4];
        ldmatrix_x4(b, krow + 16 * s);
        mma16<E>(sc[j], qa[s], b[0], b[1]);
        mma16<E>(sc[j], qa[s + 1], b[2], b[3]);
      }
      if constexpr (n_kstep % 2 == 1) {
        std::uint32_t b[2];
        ldmatrix_x2(b, krow + 16 * (n_kstep - 1));
        mma16<E>(sc[j], qa[n_kstep - 1], b[0], b[1]);
      }
    }

    float alpha[2];
    if (mma_tile_masked(k0, w0, w_last, T)) {
      softmax_tile_16<true>(sc, m, l, alpha, row, k0, T, tig, a.scale, a.alibi, slope);
    } else {  // every key <= every row < T
      softmax_tile_16<false>(sc, m, l, alpha, row, k0, T, tig, a.scale, a.alibi, slope);
    }
#pragma unroll
    for (int s = 0; s < n_otile; ++s) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[s][e] *= alpha[e / 2];
    }
    // O += P V, 16 keys at a time.
#pragma unroll
    for (int j = 0; j < n_kslice / 2; ++j) {
      const std::uint32_t pa[4] = {pack16<E>(sc[2 * j][0], sc[2 * j][1]), pack16<E>(sc[2 * j][2], sc[2 * j][3]),
                                   pack16<E>(sc[2 * j + 1][0], sc[2 * j + 1][1]),
                                   pack16<E>(sc[2 * j + 1][2], sc[2 * j + 1][3])};
      const E* vrow = vs + (16 * j + lane % 8 + 8 * ((lane / 8) % 2)) * kp + 8 * (lane / 16);
#pragma unroll
      for (int s = 0; s < n_otile; s += 2) {  // feature tiles s and s + 1
        std::uint32_t b[4];
        ldmatrix_x4_trans(b, vrow + 8 * s);
        mma16<E>(o[s], pa, b[0], b[1]);
        mma16<E>(o[s + 1], pa, b[2], b[3]);
      }
    }
  }

  mma_write_rows<Mode>(a, o, l, row, row0, T, q0, h, tig, mem_o, fpitch);
}
#endif

}  // namespace longmem::detail::cuda
