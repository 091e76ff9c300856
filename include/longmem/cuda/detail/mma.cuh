#pragma once
// TF32 tensor-core primitives shared by the attention and retrieval kernels (sm_80 and later).
// Fragment layouts (PTX ISA, mma.m16n8k8 .tf32): lane = 4 g + tig;
//   A (16 x 8): a0 (g, tig) a1 (g + 8, tig) a2 (g, tig + 4) a3 (g + 8, tig + 4)
//   B (8 x 8):  b0 (k tig, n g) b1 (k tig + 4, n g)
//   C (16 x 8): c0 (g, 2 tig) c1 (g, 2 tig + 1) c2 (g + 8, 2 tig) c3 (g + 8, 2 tig + 1)
#include <cstdint>

namespace longmem::detail::cuda {

#if defined(__CUDACC__)
/// x rounded to TF32 (10 mantissa bits, to nearest, ties away), in a 32-bit register.
__device__ inline std::uint32_t to_tf32(float x) {
  std::uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}
/// d += a b on the tensor cores: A (16 x 8) row-major, B (8 x 8) column-major, fp32 accumulation.
__device__ inline void mma_tf32(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

}  // namespace longmem::detail::cuda
