#pragma once
// Tensor-core attention on bf16 buffers (a bf16 model's forward), head dims up to 64: the tile loop
// of attention_mma.cuh with bf16 operands, one mma.m16n8k16 per 16 x 8 x 16 block (fp32
// accumulation), so the tensor cores do half the steps of the TF32 path and the k/v tiles take half
// the shared memory. The memory branch, the gate/joint fusion, ALiBi, the masks and the block and
// sequence layout are the TF32 kernel's.
//
// Block: 4 warps x 16 query rows (Br = 64); key tiles of Bc = 64. Per warp and tile:
//   S (16 x 64) = Q (16 x dh) K^T      Q's A fragments held in registers (bf16 pairs), K's B
//                                      fragments read as 32-bit pairs from the (key, feature) tile
//   online softmax on S's fp32 accumulators (rows g and g + 8 of each thread, quads reduce)
//   O (16 x dh) += P (16 x 64) V       P's accumulators packed to bf16 pairs as A fragments (the
//                                      accumulator of 8-key slice 2j is A's columns 0-7 of 16-key
//                                      step j, slice 2j + 1 its columns 8-15); V's B fragments read
//                                      as pairs from a transposed (feature, key) tile
// Precision: q, k, v are bf16 already; the products are exact in fp32 and sums are fp32. The
// probabilities are rounded to bf16 (relative 2^-9) before P V, as flash attention does in bf16;
// the row sums use the unrounded fp32 probabilities.
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16): lane = 4 g + tig;
//   A (16 x 16): a0 (g, 2 tig..+1) a1 (g + 8, 2 tig..+1) a2 (g, 2 tig + 8..+9) a3 (g + 8, 2 tig + 8..+9)
//   B (16 x 8):  b0 (k 2 tig..+1, n g) b1 (k 2 tig + 8..+9, n g)
//   C (16 x 8):  c0 (g, 2 tig) c1 (g, 2 tig + 1) c2 (g + 8, 2 tig) c3 (g + 8, 2 tig + 1)
// Shared pitches (in bf16): k tile DhMax + 8, transposed v tile Bc + 8, so that a quad's 32-bit
// fragment reads fall in 32 distinct banks.
#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>

#include "longmem/cuda/ops/attention_mma.cuh"
#include "longmem/cuda/ops/attention_parts.cuh"
#include "longmem/detail/alibi.hpp"

namespace longmem::detail::cuda {

inline constexpr int mma16_k_pitch_extra = 8;  // bf16 elements added to a k-tile row
inline constexpr int mma16_v_pitch = mma_bc + 8;  // bf16 elements of a transposed v-tile row

/// Shared-memory bytes of one block: the k tile (Bc, DhMax + 8) and the transposed v tile
/// (DhMax, Bc + 8) in bf16, and (memory modes) the memory branch's output rows (Br, DhMax + 4) and
/// (max, sum) per query row in float.
inline std::size_t attention_mma_bf16_smem_bytes(int dh_max, bool memory) {
  std::size_t n = static_cast<std::size_t>(mma_bc) * (dh_max + mma16_k_pitch_extra) * 2 +
                  static_cast<std::size_t>(dh_max) * mma16_v_pitch * 2;
  n = (n + 15) / 16 * 16;
  if (memory) n += (static_cast<std::size_t>(mma_br) * (dh_max + 4) + 2 * mma_br) * sizeof(float);
  return n;
}

#if defined(__CUDACC__)
/// d += a b: A (16 x 16) bf16 row-major, B (16 x 8) bf16 column-major, fp32 accumulation.
__device__ inline void mma_bf16(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/// Two bf16 as one 32-bit register, `lo` in the low half (the lower column of a fragment pair).
__device__ inline std::uint32_t pack_bf16(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  std::uint16_t l, h;
  memcpy(&l, &lo, 2);
  memcpy(&h, &hi, 2);
  return static_cast<std::uint32_t>(l) | (static_cast<std::uint32_t>(h) << 16);
}
__device__ inline std::uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
  std::uint32_t r;
  memcpy(&r, &p, 4);
  return r;
}

template <AttentionMode Mode, int DhMax>
__global__ void __launch_bounds__(mma_threads) attention_mma_bf16_kernel(AttentionArgsT<__nv_bfloat16> a) {
  static_assert(DhMax % 16 == 0 && DhMax <= 64, "the bf16 tensor-core kernel holds dh <= 64 in 16-wide steps");
  using bf16 = __nv_bfloat16;
  constexpr int n_kstep = DhMax / 16;   // 16-wide steps of dh: S's reduction steps
  constexpr int n_otile = DhMax / 8;    // 8-wide column tiles of O
  constexpr int n_kslice = mma_bc / 8;  // 8-key slices of a tile (S's column tiles)
  constexpr int kp = DhMax + mma16_k_pitch_extra, vp = mma16_v_pitch;
  constexpr int fpitch = DhMax + 4;     // float rows of the memory branch's output
  constexpr float neg_inf = -INFINITY;

  extern __shared__ __align__(16) unsigned char smem_bytes[];
  const int dh = a.head_dim, H = a.n_head, h = blockIdx.y;
  const index_t ld = index_t(H) * dh;
  index_t row0, T, q0;  // as attention_mma_kernel
  if (!mma_block_rows(a, row0, T, q0)) return;
  bf16* ks = reinterpret_cast<bf16*>(smem_bytes);  // (Bc, kp) keys of the tile
  bf16* vt = ks + mma_bc * kp;                     // (DhMax, vp) values of the tile, transposed
  const std::size_t tiles_bytes =
      (static_cast<std::size_t>(mma_bc) * kp * 2 + static_cast<std::size_t>(DhMax) * vp * 2 + 15) / 16 * 16;
  float* mem_o = reinterpret_cast<float*>(smem_bytes + tiles_bytes);  // (Br, fpitch) memory modes
  float* mem_ml = mem_o + mma_br * fpitch;                            // (Br, 2) memory modes
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  const index_t w0 = q0 + 16 * warp, w_last = w0 + 15;
  const index_t row[2] = {w0 + g, w0 + g + 8};
  const bf16* qh = a.q + row0 * ld + index_t(h) * dh;
  const bf16* kh = a.k + row0 * ld + index_t(h) * dh;
  const bf16* vh = a.v + row0 * ld + index_t(h) * dh;
  const bf16 zero = __float2bfloat16_rn(0.0f);
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
      const bf16 x0 = r < T && c < dh ? qh[r * ld + c] : zero;
      const bf16 x1 = r < T && c + 1 < dh ? qh[r * ld + c + 1] : zero;
      qa[s][e] = pack_bf16(x0, x1);
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

  const double slope = a.alibi ? alibi_slope(h, H) : 0.0;
  const index_t k_end = T < q0 + mma_br ? T : q0 + mma_br;
  for (index_t k0 = 0; k0 < k_end; k0 += mma_bc) {
    __syncthreads();  // the previous tile is no longer read
    // Keys as they are (zeros past T and past dh); values transposed.
    if (vec8) {
      constexpr int per_row = DhMax / 8;
      for (int e = tid; e < mma_bc * per_row; e += mma_threads) {
        const int r = e / per_row, c = 8 * (e % per_row);
        const index_t key = k0 + r;
        uint4 kx = make_uint4(0, 0, 0, 0), vx = kx;
        if (key < T && c < dh) {
          kx = *reinterpret_cast<const uint4*>(kh + key * ld + c);
          vx = *reinterpret_cast<const uint4*>(vh + key * ld + c);
        }
        *reinterpret_cast<uint4*>(ks + r * kp + c) = kx;
        bf16 vv[8];
        memcpy(vv, &vx, 16);
#pragma unroll
        for (int u = 0; u < 8; ++u) vt[(c + u) * vp + r] = vv[u];
      }
    } else {
      for (int e = tid; e < mma_bc * DhMax; e += mma_threads) {
        const int r = e / DhMax, c = e % DhMax;
        const index_t key = k0 + r;
        const bool ok = key < T && c < dh;
        ks[r * kp + c] = ok ? kh[key * ld + c] : zero;
        vt[c * vp + r] = ok ? vh[key * ld + c] : zero;
      }
    }
    __syncthreads();
    if (k0 > w_last || w0 >= T) continue;
    float sc[n_kslice][4];
#pragma unroll
    for (int j = 0; j < n_kslice; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[j][e] = 0.0f;
      const bf16* krow = ks + (8 * j + g) * kp + 2 * tig;  // key 8 j + g, features 16 s + 2 tig (+8)
#pragma unroll
      for (int s = 0; s < n_kstep; ++s) {
        const std::uint32_t b0 = *reinterpret_cast<const std::uint32_t*>(krow + 16 * s);
        const std::uint32_t b1 = *reinterpret_cast<const std::uint32_t*>(krow + 16 * s + 8);
        mma_bf16(sc[j], qa[s], b0, b1);
      }
    }

    float alpha[2];
    mma_softmax_tile(sc, m, l, alpha, row, k0, T, tig, a, slope);
#pragma unroll
    for (int s = 0; s < n_otile; ++s) {
#pragma unroll
      for (int e = 0; e < 4; ++e) o[s][e] *= alpha[e / 2];
    }
    // O += P V, 16 keys at a time.
#pragma unroll
    for (int j = 0; j < n_kslice / 2; ++j) {
      const std::uint32_t pa[4] = {pack_bf16(sc[2 * j][0], sc[2 * j][1]), pack_bf16(sc[2 * j][2], sc[2 * j][3]),
                                   pack_bf16(sc[2 * j + 1][0], sc[2 * j + 1][1]),
                                   pack_bf16(sc[2 * j + 1][2], sc[2 * j + 1][3])};
#pragma unroll
      for (int s = 0; s < n_otile; ++s) {
        const bf16* vrow = vt + (8 * s + g) * vp + 16 * j + 2 * tig;  // feature 8 s + g, keys 16 j + 2 tig (+8)
        const std::uint32_t b0 = *reinterpret_cast<const std::uint32_t*>(vrow);
        const std::uint32_t b1 = *reinterpret_cast<const std::uint32_t*>(vrow + 8);
        mma_bf16(o[s], pa, b0, b1);
      }
    }
  }

  mma_write_rows<Mode>(a, o, l, row, row0, T, q0, h, tig, mem_o, fpitch);
}
#endif

}  // namespace longmem::detail::cuda
