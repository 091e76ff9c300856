#pragma once
// One host GEMM for every op: C (M, N) = op(A) op(B) + beta C on row-major buffers.
// Float GEMMs go to oneDNN's sgemm when the build found it (LONGMEM_HAVE_DNNL, CMake option
// LONGMEM_DNNL): at the backbone's shapes it is 2-3x Eigen's on 16 cores and level or better on
// 2, and in the attention blocks it avoids Eigen's per-call packing (bench/RESULTS.md). Double
// GEMMs, and every GEMM without oneDNN, are Eigen's. Safe inside an OpenMP parallel region:
// oneDNN then runs the call on the calling thread, as Eigen does.
#include <type_traits>

#include "longmem/cpu/ops/common.hpp"

#if defined(LONGMEM_HAVE_DNNL)
#include <dnnl.h>
#endif

namespace longmem::detail::cpu {

/// C (M, N) = alpha op(A) op(B) + beta C, row-major; op(A) is (M, K), op(B) is (K, N); A^T when ta
/// (A stored (K, M)), B^T when tb (B stored (N, K)); lda, ldb, ldc are the stored row lengths;
/// beta is 0 or 1.
template <class T>
void gemm(bool ta, bool tb, index_t M, index_t N, index_t K, const T* A, index_t lda, const T* B, index_t ldb, T beta,
          T* C, index_t ldc, T alpha = T(1)) {
#if defined(LONGMEM_HAVE_DNNL)
  if constexpr (std::is_same_v<T, float>) {
    const dnnl_status_t st = dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    if (st != dnnl_success) {
      fail<BackendError>("oneDNN sgemm failed (status ", static_cast<int>(st), ") for ", M, " x ", N, " x ", K);
    }
    return;
  }
#endif
  using Stride = Eigen::OuterStride<>;
  MatrixMap<T> Cm(C, M, N, Stride(ldc));
  auto product = [&](const auto& a) {
    auto run = [&](const auto& b) {
      if (beta == T(0)) {
        Cm.noalias() = alpha * a * b;
      } else {
        Cm.noalias() += alpha * a * b;  // beta is 0 or 1 here
      }
    };
    if (tb) {
      run(ConstMatrixMap<T>(B, N, K, Stride(ldb)).transpose());
    } else {
      run(ConstMatrixMap<T>(B, K, N, Stride(ldb)));
    }
  };
  if (ta) {
    product(ConstMatrixMap<T>(A, K, M, Stride(lda)).transpose());
  } else {
    product(ConstMatrixMap<T>(A, M, K, Stride(lda)));
  }
}

}  // namespace longmem::detail::cpu
