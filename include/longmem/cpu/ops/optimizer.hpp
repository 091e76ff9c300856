#pragma once
// Host optimizer ops: the Trainer's gradient scaling, global gradient norm and AdamW update
// (ops.hpp states the formulas). Every result is independent of the thread count:
//   sum_of_squares   the tensors cut into fixed blocks of 32 Ki elements, each block summed in
//                    element order (double), the block sums added in list order; blocks in parallel
//   scale, adamw_update   element by element, in double, rounded to T
#include <algorithm>
#include <array>
#include <cmath>
#include <span>
#include <vector>

#include "longmem/cpu/ops/common.hpp"
#include "longmem/ops.hpp"

namespace longmem::detail::cpu {

/// The fixed blocks of a list of tensors: (tensor, first element, end), in list order.
template <class V>
std::vector<std::array<index_t, 3>> tensor_blocks(std::span<const V> xs) {
  constexpr index_t block = op_checks::square_sum_block;
  std::vector<std::array<index_t, 3>> blocks;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    const index_t n = xs[i].numel();
    for (index_t b = 0; b < n; b += block) blocks.push_back({static_cast<index_t>(i), b, std::min(n, b + block)});
  }
  return blocks;
}

/// f(j, data, begin, end) for every block j of tensor_blocks(xs), blocks in parallel.
template <class V, class F>
void for_each_block(std::span<const V> xs, const std::vector<std::array<index_t, 3>>& blocks, F&& f) {
  const index_t nb = static_cast<index_t>(blocks.size());
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (nb > 4)
#endif
  for (index_t j = 0; j < nb; ++j) {
    const auto [i, b, e] = blocks[static_cast<std::size_t>(j)];
    f(j, xs[static_cast<std::size_t>(i)].data(), b, e);
  }
}

template <class T>
double sum_of_squares(std::span<const TensorView<const T, Host>> xs) {
  const auto blocks = tensor_blocks(xs);
  std::vector<double> partial(blocks.size());
  for_each_block(xs, blocks, [&](index_t j, const T* x, index_t b, index_t e) {
    double s = 0;
    for (index_t k = b; k < e; ++k) s += static_cast<double>(x[k]) * static_cast<double>(x[k]);
    partial[static_cast<std::size_t>(j)] = s;
  });
  double s = 0;
  for (double p : partial) s += p;
  return s;
}

template <class T>
void scale(std::span<const TensorView<T, Host>> xs, double factor) {
  for_each_block(xs, tensor_blocks(xs), [&](index_t, T* x, index_t b, index_t e) {
    for (index_t k = b; k < e; ++k) x[k] = static_cast<T>(static_cast<double>(x[k]) * factor);
  });
}

template <class T>
void adamw_update(TensorView<T, Host> param, TensorView<const T, Host> grad, TensorView<T, Host> m_view,
                  TensorView<T, Host> v_view, const ops::AdamWStep& s) {
  op_checks::check_adamw_update(param, grad, m_view, v_view);
  T* p = param.data();
  const T* g = grad.data();
  T* m = m_view.data();
  T* v = v_view.data();
  const index_t n = param.numel();
  const double b1 = s.beta1, b2 = s.beta2;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (n >= (index_t{1} << 15))
#endif
  for (index_t j = 0; j < n; ++j) {
    const double gj = static_cast<double>(g[j]);
    const double mj = b1 * static_cast<double>(m[j]) + (1.0 - b1) * gj;
    const double vj = b2 * static_cast<double>(v[j]) + (1.0 - b2) * gj * gj;
    m[j] = static_cast<T>(mj);
    v[j] = static_cast<T>(vj);
    double x = static_cast<double>(p[j]);
    x -= s.lr * s.weight_decay * x;
    x -= s.lr * (mj / s.bias1) / (std::sqrt(vj / s.bias2) + s.eps);
    p[j] = static_cast<T>(x);
  }
}

}  // namespace longmem::detail::cpu
