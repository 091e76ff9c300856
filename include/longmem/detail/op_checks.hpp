#pragma once
// Argument checks shared by every op backend (host and device): shapes, optional arguments and
// aliasing, read from the views' metadata only (no Eigen, no CUDA), so both backends refuse the
// same inputs with the same messages.
#include <cstdint>

#include "longmem/error.hpp"
#include "longmem/tensor.hpp"

namespace longmem::detail::op_checks {

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

}  // namespace longmem::detail::op_checks
