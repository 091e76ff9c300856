#pragma once
// Host LayerNorm over the last C features of each row, forward and backward, vectorised in T.
// Statistics per row in two passes (mean, then squared deviations); the backward recomputes them.
//   layer_norm           y = (x - mean) / sqrt(var + eps) * w + b          (biased variance)
//   layer_norm_backward  xhat = (x - mean) r,  g = d_y * w,
//                        d_x = r (g - mean(g) - xhat mean(g xhat)),  d_w += sum d_y xhat,  d_b += sum d_y
#include <algorithm>
#include <cmath>
#include <vector>

#include "longmem/cpu/ops/common.hpp"
#include "longmem/ops.hpp"

namespace longmem::detail::cpu {

/// Validates weight (C), the optional bias (C) and eps; returns C.
template <class W, class B>
index_t check_layer_norm_params(const char* op, const W& weight, const B& bias, double eps, const char* bias_name) {
  if (weight.rank() != 1 || weight.dim(0) == 0) {
    fail<ShapeError>(op, ": weight: expected a non-empty (C) vector, got shape ", weight.shape().str());
  }
  const index_t C = weight.dim(0);
  if (!absent(bias)) expect_shape(bias, Shape{C}, (std::string(op) + ": " + bias_name + " (C, like weight)").c_str());
  if (!(eps >= 0) || !std::isfinite(eps)) fail<InputError>(op, ": eps must be a finite number >= 0, got ", eps);
  return C;
}

/// Mean and 1/sqrt(var + eps) of one row of C values: two passes (mean, then squared deviations),
/// summed in T by Eigen's vectorised reduction (a tree of packets: error about log2(C) ulp of T,
/// the same order as PyTorch's float LayerNorm), returned in double.
template <class T>
std::pair<double, double> row_statistics(const T* x, index_t C, double eps) {
  const auto xr = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(x, C);
  const T mean = xr.sum() / static_cast<T>(C);
  const T var = (xr - mean).square().sum() / static_cast<T>(C);
  return {static_cast<double>(mean), 1.0 / std::sqrt(static_cast<double>(var) + eps)};
}

/// Per row of C = weight.numel() features. An absent bias means zero bias. out may be in (in place).
template <class T>
void layer_norm(TensorView<T, Host> out, TensorView<const T, Host> in, TensorView<const T, Host> weight,
                TensorView<const T, Host> bias, double eps) {
  const index_t C = check_layer_norm_params("layer_norm", weight, bias, eps, "bias");
  const bool has_bias = !absent(bias);
  const index_t N = rows_of(in, C, "layer_norm", "in");
  if (rows_of(out, C, "layer_norm", "out") != N) {
    fail<ShapeError>("layer_norm: out has shape ", out.shape().str(), ", expected ", N, " rows of ", C, " like in ",
                     in.shape().str());
  }
  if (in.data() != out.data()) expect_separate(out, in, "layer_norm", "in (only exact in-place use is allowed)");
  parallel_for(N, 4 * C, [&](index_t n) {
    const T* x = in.data() + n * C;
    T* y = out.data() + n * C;
    const auto [mean, inv] = row_statistics(x, C, eps);
    using Row = Eigen::Array<T, Eigen::Dynamic, 1>;
    const auto xr = Eigen::Map<const Row>(x, C);
    const auto wr = Eigen::Map<const Row>(weight.data(), C);
    const T m = static_cast<T>(mean), r = static_cast<T>(inv);
    Eigen::Map<Row> yr(y, C);  // may alias x exactly: element c reads x[c] before writing y[c]
    if (has_bias) {
      yr = (xr - m) * r * wr + Eigen::Map<const Row>(bias.data(), C);
    } else {
      yr = (xr - m) * r * wr;
    }
  });
}

/// d_in [+]= d x over rows (threaded over rows); d_weight, d_bias += column sums over rows
/// (threaded over columns, each summed in row order, so the result does not depend on threads).
template <class T>
void layer_norm_backward(TensorView<T, Host> d_in, TensorView<T, Host> d_weight, TensorView<T, Host> d_bias,
                         TensorView<const T, Host> d_out, TensorView<const T, Host> in,
                         TensorView<const T, Host> weight, double eps, Accumulate acc) {
  const char* op = "layer_norm_backward";
  const index_t C = check_layer_norm_params(op, weight, TensorView<const T, Host>{}, eps, "bias");
  const index_t N = op_checks::check_layer_norm_backward(op, d_in, d_weight, d_bias, d_out, in, C);
  const bool want_in = !absent(d_in), want_w = !absent(d_weight), want_b = !absent(d_bias);
  if (N == 0) return;
  std::vector<double> mean(static_cast<std::size_t>(N)), inv(static_cast<std::size_t>(N));
  parallel_for(N, 8 * C, [&](index_t n) {
    const T* x = in.data() + n * C;
    const auto [m, r] = row_statistics(x, C, eps);
    mean[static_cast<std::size_t>(n)] = m;
    inv[static_cast<std::size_t>(n)] = r;
    if (!want_in) return;
    using Row = Eigen::Array<T, Eigen::Dynamic, 1>;
    const T mt = static_cast<T>(m), rt = static_cast<T>(r);
    const auto xhat = (Eigen::Map<const Row>(x, C) - mt) * rt;
    const auto gw = Eigen::Map<const Row>(d_out.data() + n * C, C) * Eigen::Map<const Row>(weight.data(), C);  // g = d_out w
    const T mg = gw.sum() / static_cast<T>(C), mgx = (gw * xhat).sum() / static_cast<T>(C);
    Eigen::Map<Row> dx(d_in.data() + n * C, C);
    if (acc == Accumulate::Yes) {
      dx += rt * (gw - mg - xhat * mgx);
    } else {
      dx = rt * (gw - mg - xhat * mgx);
    }
  });
  if (!want_w && !want_b) return;
  // Rows added one after another, vectorised across a block of columns; blocks threaded,
  // so each column's sum has the same order for any thread count.
  constexpr index_t block = 64;
  parallel_for((C + block - 1) / block, 4 * N * block, [&](index_t j) {
    const index_t c0 = j * block, nc = std::min(block, C - c0);
    using Row = Eigen::Array<T, Eigen::Dynamic, 1>;
    Row sw = Row::Zero(nc), sb = sw;  // sums over rows in T, as PyTorch's
    for (index_t n = 0; n < N; ++n) {
      const auto g = Eigen::Map<const Row>(d_out.data() + n * C + c0, nc);
      const auto x = Eigen::Map<const Row>(in.data() + n * C + c0, nc);
      const T m = static_cast<T>(mean[static_cast<std::size_t>(n)]), r = static_cast<T>(inv[static_cast<std::size_t>(n)]);
      sw += g * ((x - m) * r);
      sb += g;
    }
    for (index_t c = 0; c < nc; ++c) {
      if (want_w) d_weight.data()[c0 + c] += static_cast<T>(sw[c]);
      if (want_b) d_bias.data()[c0 + c] += static_cast<T>(sb[c]);
    }
  });
}

}  // namespace longmem::detail::cpu
