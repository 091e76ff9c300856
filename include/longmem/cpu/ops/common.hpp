#pragma once
// Helpers shared by the host op families (cpu/ops/*.hpp): row-major Eigen maps over views,
// OpenMP thread queries, argument checks that name the op, and a thresholded parallel loop.
#include <cstdint>
#include <string>

#include "longmem/detail/eigen.hpp"

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

/// An optional argument (bias, wpe, losses, memory) is absent when it has no elements or no data.
template <class V>
bool absent(const V& v) {
  return v.data() == nullptr || v.numel() == 0;
}

/// Number of rows N when the trailing extents of v multiply to `features`; ShapeError otherwise.
template <class V>
index_t rows_of(const V& v, index_t features, const char* op, const char* what) {
  index_t suffix = 1;
  for (int i = v.rank() - 1; i >= 0; --i) {
    suffix *= v.dim(i);
    if (suffix == features) {
      index_t n = 1;
      for (int j = 0; j < i; ++j) n *= v.dim(j);
      return n;
    }
  }
  fail<ShapeError>(op, ": ", what, " has shape ", v.shape().str(), ", expected trailing extents that multiply to ",
                   features, " (an (N, ", features, ") tensor)");
}

/// Whether two views share any byte.
template <class A, class B>
bool overlaps(const A& a, const B& b) {
  if (absent(a) || absent(b)) return false;
  const auto a0 = reinterpret_cast<std::uintptr_t>(a.data()), a1 = a0 + a.bytes();
  const auto b0 = reinterpret_cast<std::uintptr_t>(b.data()), b1 = b0 + b.bytes();
  return a0 < b1 && b0 < a1;
}

template <class A, class B>
void expect_separate(const A& out, const B& in, const char* op, const char* what) {
  if (overlaps(out, in)) {
    fail<InputError>(op, ": out overlaps ", what, "; this op needs a separate output buffer");
  }
}

/// Elementwise ops accept equal shapes, or equal first extent and element count
/// ((T, d) against (T, H, dh)).
template <class A, class B>
void expect_same_elements(const A& out, const B& in, const char* op, const char* what) {
  const bool same = out.shape() == in.shape() ||
                    (out.rank() >= 1 && in.rank() >= 1 && out.dim(0) == in.dim(0) && out.numel() == in.numel());
  if (!same) {
    fail<ShapeError>(op, ": ", what, " has shape ", in.shape().str(), ", expected the shape of out ", out.shape().str());
  }
}

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
