#pragma once
// Helpers shared by the host op families (cpu/ops/*.hpp): row-major Eigen maps over views,
// OpenMP thread queries, argument checks that name the op, and a thresholded parallel loop.
#include <cstdint>
#include <string>

#include "longmem/detail/eigen.hpp"
#include "longmem/detail/op_checks.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "longmem/error.hpp"
#include "longmem/tensor.hpp"

namespace longmem::detail::cpu {

template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using MatrixMap = Eigen::Map<RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using ConstMatrixMap = Eigen::Map<const RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using RowArrayMap = Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>>;
template <class T>
using ConstVectorMap = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>>;

inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Argument checks (absent, rows_of, overlaps, expect_separate, expect_same_elements): one copy for
// both backends, so host and device ops refuse the same inputs with the same messages.
using op_checks::absent;
using op_checks::expect_same_elements;
using op_checks::expect_separate;
using op_checks::overlaps;
using op_checks::rows_of;

/// Runs body(i) for i in [0, n), threaded when the total work (n * cost_per_item) is worth it.
template <class F>
void parallel_for(index_t n, index_t cost_per_item, F&& body) {
  [[maybe_unused]] const bool threaded = n > 1 && n * cost_per_item >= (index_t{1} << 15);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (threaded)
#endif
  for (index_t i = 0; i < n; ++i) body(i);
}

}  // namespace longmem::detail::cpu
