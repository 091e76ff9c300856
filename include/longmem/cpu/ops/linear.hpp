#pragma once
// Host linear layer in PyTorch Linear layout, forward and backward, as GEMMs on row-major buffers.
//   linear           out (N, O) [+]= in (N, I) W (O, I)^T + b (O)
//   linear_backward  d_in (N, I) [+]= d_out W;  d_W (O, I) += d_out^T in;  d_b (O) += sum_n d_out
// The GEMMs are gemm() (gemm.hpp): oneDNN's sgemm for float when the build found it.
#include "longmem/cpu/ops/common.hpp"
#include "longmem/cpu/ops/gemm.hpp"
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
  // Y (N, O) [+]= X (N, I) W (O, I)^T
  gemm<T>(false, true, N, O, I, in.data(), I, weight.data(), I, acc == Accumulate::Yes ? T(1) : T(0), out.data(), O);
  if (has_bias) {
    // rows in parallel: single-threaded, this pass costs a third of a 16-thread GEMM at (1024, 256 -> 768)
    const Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>> b(bias.data(), O);
    T* y = out.data();
    parallel_for(N, O, [&](index_t n) { Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>(y + n * O, O) += b; });
  }
}

template <class T>
void linear_backward(TensorView<T, Host> d_in, TensorView<T, Host> d_weight, TensorView<T, Host> d_bias,
                     TensorView<const T, Host> d_out, TensorView<const T, Host> in, TensorView<const T, Host> weight,
                     Accumulate acc) {
  const char* op = "linear_backward";
  check_linear_params(op, weight, TensorView<const T, Host>{}, "bias");
  const index_t O = weight.dim(0), I = weight.dim(1);
  const index_t N = op_checks::check_linear_backward(op, d_in, d_weight, d_bias, d_out, in, weight);
  const bool want_in = !absent(d_in), want_w = !absent(d_weight), want_b = !absent(d_bias);
  if (N == 0) return;
  ConstMatrixMap<T> G(d_out.data(), N, O, Eigen::OuterStride<>(O));  // (N, O)
  // d_in (N, I) [+]= G (N, O) W (O, I)
  if (want_in) gemm<T>(false, false, N, I, O, d_out.data(), O, weight.data(), I, acc == Accumulate::Yes ? T(1) : T(0), d_in.data(), I);
  // d_W (O, I) += G^T (O, N) X (N, I)
  if (want_w) gemm<T>(true, false, O, I, N, d_out.data(), O, in.data(), I, T(1), d_weight.data(), I);
  if (want_b) {
    // Rows added one after another (vectorised across the O columns): independent of threads.
    Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>> db(d_bias.data(), O);
    for (index_t n = 0; n < N; ++n) db += G.row(n);
  }
}

}  // namespace longmem::detail::cpu
