#pragma once
// Tensor-core and asynchronous-copy primitives shared by the attention and retrieval kernels (sm_80
// and later).
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
/// 16 bytes global -> shared without registers (cp.async, sm_80 on); `valid` false writes zeros and
/// reads nothing. Groups: cp_async_commit() closes the copies issued so far into one group;
/// cp_async_wait<N>() waits until at most N groups are still in flight.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__)
  const auto s = static_cast<std::uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 16 : 0));
#else
  (void)dst, (void)src, (void)valid;
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
#endif

}  // namespace longmem::detail::cuda
