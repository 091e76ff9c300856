#pragma once
// Host linear layer in PyTorch Linear layout, forward and backward, as GEMMs on row-major buffers.
//   linear           out (N, O) [+]= in (N, I) W (O, I)^T + b (O)
//   linear_gelu      out (N, O) = gelu(in (N, I) W (O, I)^T + b (O))  (bias and GELU in one pass per row)
//   linear_backward  d_in (N, I) [+]= d_out W;  d_W (O, I) += d_out^T in;  d_b (O) += sum_n d_out
// The GEMMs are gemm() (gemm.hpp): oneDNN's sgemm for float when the build found it.
#include "longmem/cpu/ops/common.hpp"
#include "longmem/cpu/ops/elementwise.hpp"
#include "longmem/cpu/ops/gemm.hpp"
#include "longmem/ops.hpp"

namespace longmem::detail::cpu {

using op_checks::check_linear;
using op_checks::check_linear_params;

template <class T>
void linear(TensorView<T, Host> out, TensorView<const T, Host> in, TensorView<const T, Host> weight,
            TensorView<const T, Host> bias, Accumulate acc) {
  const index_t N = check_linear("linear", out, in, weight, bias);
  const index_t O = weight.dim(0), I = weight.dim(1);
  if (N == 0) return;
  // Y (N, O) [+]= X (N, I) W (O, I)^T
  gemm<T>(false, true, N, O, I, in.data(), I, weight.data(), I, acc == Accumulate::Yes ? T(1) : T(0), out.data(), O);
  if (!absent(bias)) {
    // rows in parallel: single-threaded, this pass costs a third of a 16-thread GEMM at (1024, 256 -> 768)
    const Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>> b(bias.data(), O);
    T* y = out.data();
    parallel_for(N, O, [&](index_t n) { Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>(y + n * O, O) += b; });
  }
}

/// out (N, O) = gelu(in W^T + b): the MLP's first layer where its pre-activation is not kept (the
/// forward without a backward). One GEMM, then the bias and the GELU in one pass over each row
/// while it is still in cache, instead of linear's bias pass and gelu's separate pass over (N, O).
template <class T>
void linear_gelu(TensorView<T, Host> out, TensorView<const T, Host> in, TensorView<const T, Host> weight,
                 TensorView<const T, Host> bias, Activation kind) {
  check_activation("linear_gelu", kind);
  const index_t N = check_linear("linear_gelu", out, in, weight, bias);
  const index_t O = weight.dim(0), I = weight.dim(1);
  if (N == 0) return;
  gemm<T>(false, true, N, O, I, in.data(), I, weight.data(), I, T(0), out.data(), O);
  const bool has_bias = !absent(bias);
  T* y = out.data();
  parallel_for(N, 4 * O, [&](index_t n) {
    T* row = y + n * O;
    if (has_bias) Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>(row, O) += Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(bias.data(), O);
    gelu_range<T>(row, row, 0, O, kind);
  });
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
