#pragma once
// Host next-token cross-entropy, forward and backward, per row in double.
//   cross_entropy           loss_t = logsumexp(logits_t) - logits_t[y_t]   (targets of -1 ignored)
//   cross_entropy_backward  d_logits_t = scale * (softmax(logits_t) - onehot(y_t)), 0 where y_t = -1
#include <cmath>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "longmem/cpu/ops/common.hpp"

namespace longmem::detail::cpu {

/// Validates logits (T, V) against T targets in [0, V) or -1; returns V.
template <class V>
index_t check_cross_entropy(const char* op, const V& logits, std::span<const std::int32_t> targets) {
  const index_t n_tok = static_cast<index_t>(targets.size());
  if (logits.rank() != 2 || logits.dim(0) != n_tok || logits.dim(1) == 0) {
    fail<ShapeError>(op, ": logits: expected shape (", n_tok, ", V) for ", n_tok, " targets with V > 0, got ",
                     logits.shape().str());
  }
  const index_t Vn = logits.dim(1);
  for (index_t t = 0; t < n_tok; ++t) {
    const std::int32_t y = targets[static_cast<std::size_t>(t)];
    if (y != -1 && (y < 0 || y >= Vn)) {
      fail<InputError>(op, ": target ", y, " at position ", t, " is outside the vocabulary [0, ", Vn,
                       "); use -1 to ignore a position");
    }
  }
  return Vn;
}

/// Sum and count of -log softmax(logits)[target] over targets != -1, computed in double per row.
template <class T>
std::pair<double, std::int64_t> cross_entropy(TensorView<const T, Host> logits, std::span<const std::int32_t> targets,
                                              TensorView<float, Host> losses) {
  const index_t Vn = check_cross_entropy("cross_entropy", logits, targets);
  const index_t n_tok = static_cast<index_t>(targets.size());
  const bool write_losses = !absent(losses);
  if (write_losses) expect_shape(losses, Shape{n_tok}, "cross_entropy: losses (one per target)");
  std::vector<double> row_loss(static_cast<std::size_t>(n_tok), 0.0);
  parallel_for(n_tok, 4 * Vn, [&](index_t t) {
    const std::int32_t y = targets[static_cast<std::size_t>(t)];
    if (y == -1) return;
    const auto x = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(logits.data() + t * Vn, Vn).template cast<double>();
    const double mx = x.maxCoeff();
    const double log_z = std::log((x - mx).exp().sum());
    row_loss[static_cast<std::size_t>(t)] = log_z - (static_cast<double>(logits.data()[t * Vn + y]) - mx);
  });
  double sum = 0;
  std::int64_t count = 0;
  for (index_t t = 0; t < n_tok; ++t) {
    if (targets[static_cast<std::size_t>(t)] == -1) continue;
    sum += row_loss[static_cast<std::size_t>(t)];
    ++count;
  }
  if (write_losses) {
    for (index_t t = 0; t < n_tok; ++t) losses.data()[t] = static_cast<float>(row_loss[static_cast<std::size_t>(t)]);
  }
  return {sum, count};
}

template <class T>
void cross_entropy_backward(TensorView<T, Host> d_logits, TensorView<const T, Host> logits,
                            std::span<const std::int32_t> targets, double scale) {
  const index_t Vn = check_cross_entropy("cross_entropy_backward", logits, targets);
  op_checks::check_cross_entropy_backward(d_logits, logits, scale);
  const index_t n_tok = static_cast<index_t>(targets.size());
  parallel_for(n_tok, 6 * Vn, [&](index_t t) {
    const std::int32_t y = targets[static_cast<std::size_t>(t)];
    T* g = d_logits.data() + t * Vn;
    if (y == -1) {
      std::fill(g, g + Vn, T(0));
      return;
    }
    const T* x = logits.data() + t * Vn;
    double mx = static_cast<double>(x[0]);
    for (index_t j = 1; j < Vn; ++j) mx = std::max(mx, static_cast<double>(x[j]));
    double z = 0;
    for (index_t j = 0; j < Vn; ++j) z += std::exp(static_cast<double>(x[j]) - mx);
    const double s = scale / z;
    for (index_t j = 0; j < Vn; ++j) g[j] = static_cast<T>(s * std::exp(static_cast<double>(x[j]) - mx));
    g[y] = static_cast<T>(static_cast<double>(g[y]) - scale);
  });
}

}  // namespace longmem::detail::cpu
