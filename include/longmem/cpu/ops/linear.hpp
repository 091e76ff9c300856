#pragma once
// Host linear layer in PyTorch Linear layout, forward and backward, as Eigen GEMMs on row-major maps.
//   linear           out (N, O) [+]= in (N, I) W (O, I)^T + b (O)
//   linear_backward  d_in (N, I) [+]= d_out W;  d_W (O, I) += d_out^T in;  d_b (O) += sum_n d_out
#include "longmem/cpu/ops/common.hpp"
#include "longmem/ops.hpp"

namespace longmem::detail::cpu {

/// Validates weight (O, I) and the optional bias (O).
template <class W, class B>
void check_linear_params(const char* op, const W& weight, const B& bias, const char* bias_name) {
  if (weight.rank() != 2 || weight.dim(0) == 0 || weight.dim(1) == 0) {
    fail<ShapeError>(op, ": weight: expected a non-empty (O, I) matrix in PyTorch layout, got shape ",
                     weight.shape().str());
  }
  if (!absent(bias)) expect_shape(bias, Shape{weight.dim(0)}, (std::string(op) + ": " + bias_name + " (O, the rows of weight)").c_str());
}

template <class T>
void linear(TensorView<T, Host> out, TensorView<const T, Host> in, TensorView<const T, Host> weight,
            TensorView<const T, Host> bias, Accumulate acc) {
  check_linear_params("linear", weight, bias, "bias");
  const index_t O = weight.dim(0), I = weight.dim(1);
  const bool has_bias = !absent(bias);
  const index_t N = rows_of(in, I, "linear", "in");
  if (rows_of(out, O, "linear", "out") != N) {
    fail<ShapeError>("linear: out has shape ", out.shape().str(), ", expected ", Shape{N, O}.str(), " for ", N,
                     " input rows and ", O, " output features");
  }
  expect_separate(out, in, "linear", "in");
  expect_separate(out, weight, "linear", "weight");
  if (has_bias) expect_separate(out, bias, "linear", "bias");
  if (N == 0) return;
  ConstMatrixMap<T> X(in.data(), N, I, Eigen::OuterStride<>(I));      // (N, I)
  ConstMatrixMap<T> W(weight.data(), O, I, Eigen::OuterStride<>(I));  // (O, I)
  MatrixMap<T> Y(out.data(), N, O, Eigen::OuterStride<>(O));          // (N, O)
  if (acc == Accumulate::Yes) {
    Y.noalias() += X * W.transpose();
  } else {
    Y.noalias() = X * W.transpose();
  }
  if (has_bias) Y.rowwise() += Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(bias.data(), O);
}

template <class T>
void linear_backward(TensorView<T, Host> d_in, TensorView<T, Host> d_weight, TensorView<T, Host> d_bias,
                     TensorView<const T, Host> d_out, TensorView<const T, Host> in, TensorView<const T, Host> weight,
                     Accumulate acc) {
  const char* op = "linear_backward";
  check_linear_params(op, weight, TensorView<const T, Host>{}, "bias");
  const index_t O = weight.dim(0), I = weight.dim(1);
  const index_t N = rows_of(d_out, O, op, "d_out");
  const bool want_in = !absent(d_in), want_w = !absent(d_weight), want_b = !absent(d_bias);
  if (want_in && rows_of(d_in, I, op, "d_in") != N) {
    fail<ShapeError>(op, ": d_in has shape ", d_in.shape().str(), ", expected ", Shape{N, I}.str());
  }
  if (want_w) {
    expect_shape(d_weight, weight.shape(), "linear_backward: d_weight (O, I), like weight");
    if (rows_of(in, I, op, "in") != N) fail<ShapeError>(op, ": in has shape ", in.shape().str(), ", expected ", Shape{N, I}.str(), " like d_out's rows");
  }
  if (want_b) expect_shape(d_bias, Shape{O}, "linear_backward: d_bias (O)");
  for (auto [g, name] : {std::pair{TensorView<const T, Host>(d_in), "d_in"}, std::pair{TensorView<const T, Host>(d_weight), "d_weight"},
                         std::pair{TensorView<const T, Host>(d_bias), "d_bias"}}) {
    if (absent(g)) continue;
    expect_separate(g, d_out, op, (std::string("d_out (as ") + name + ")").c_str());
    expect_separate(g, weight, op, (std::string("weight (as ") + name + ")").c_str());
    if (!absent(in)) expect_separate(g, in, op, (std::string("in (as ") + name + ")").c_str());
  }
  if (N == 0) return;
  ConstMatrixMap<T> G(d_out.data(), N, O, Eigen::OuterStride<>(O));   // (N, O)
  ConstMatrixMap<T> W(weight.data(), O, I, Eigen::OuterStride<>(I));  // (O, I)
  if (want_in) {
    MatrixMap<T> DX(d_in.data(), N, I, Eigen::OuterStride<>(I));  // (N, I)
    if (acc == Accumulate::Yes) {
      DX.noalias() += G * W;
    } else {
      DX.noalias() = G * W;
    }
  }
  if (want_w) {
    ConstMatrixMap<T> X(in.data(), N, I, Eigen::OuterStride<>(I));          // (N, I)
    MatrixMap<T> DW(d_weight.data(), O, I, Eigen::OuterStride<>(I));        // (O, I)
    DW.noalias() += G.transpose() * X;
  }
  if (want_b) {
    // Rows added one after another (vectorised across the O columns): independent of threads.
    Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>> db(d_bias.data(), O);
    for (index_t n = 0; n < N; ++n) db += G.row(n);
  }
}

}  // namespace longmem::detail::cpu
