#pragma once
// Argument checks shared by every op backend (host and device): shapes, optional arguments and
// aliasing, read from the views' metadata only (no Eigen, no CUDA), so both backends refuse the
// same inputs with the same messages.
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

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

/// Validates weight (O, I) and the optional bias (O).
template <class W, class B>
void check_linear_params(const char* op, const W& weight, const B& bias, const char* bias_name) {
  if (weight.rank() != 2 || weight.dim(0) == 0 || weight.dim(1) == 0) {
    fail<ShapeError>(op, ": weight: expected a non-empty (O, I) matrix in PyTorch layout, got shape ",
                     weight.shape().str());
  }
  if (!absent(bias)) expect_shape(bias, Shape{weight.dim(0)}, (std::string(op) + ": " + bias_name + " (O, the rows of weight)").c_str());
}

/// The checks of linear and linear_gelu: weight (O, I), bias (O) or absent, in (N, I), out (N, O),
/// out separate from the others. Returns N.
template <class O, class C>
index_t check_linear(const char* op, const O& out, const C& in, const C& weight, const C& bias) {
  check_linear_params(op, weight, bias, "bias");
  const index_t n_out = weight.dim(0), n_in = weight.dim(1);
  const index_t N = rows_of(in, n_in, op, "in");
  if (rows_of(out, n_out, op, "out") != N) {
    fail<ShapeError>(op, ": out has shape ", out.shape().str(), ", expected ", Shape{N, n_out}.str(), " for ", N,
                     " input rows and ", n_out, " output features");
  }
  expect_separate(out, in, op, "in");
  expect_separate(out, weight, op, "weight");
  if (!absent(bias)) expect_separate(out, bias, op, "bias");
  return N;
}

/// linear_backward's checks (weight already checked as (O, I)): d_in (N, I), d_weight (O, I),
/// d_bias (O), in (N, I) when d_weight is wanted, no gradient overlapping an input. Returns N.
template <class G, class C>
index_t check_linear_backward(const char* op, const G& d_in, const G& d_weight, const G& d_bias, const C& d_out,
                              const C& in, const C& weight) {
  const index_t O = weight.dim(0), I = weight.dim(1);
  const index_t N = rows_of(d_out, O, op, "d_out");
  if (!absent(d_in) && rows_of(d_in, I, op, "d_in") != N) {
    fail<ShapeError>(op, ": d_in has shape ", d_in.shape().str(), ", expected ", Shape{N, I}.str());
  }
  if (!absent(d_weight)) {
    expect_shape(d_weight, weight.shape(), "linear_backward: d_weight (O, I), like weight");
    if (rows_of(in, I, op, "in") != N) {
      fail<ShapeError>(op, ": in has shape ", in.shape().str(), ", expected ", Shape{N, I}.str(), " like d_out's rows");
    }
  }
  if (!absent(d_bias)) expect_shape(d_bias, Shape{O}, "linear_backward: d_bias (O)");
  for (auto [g, name] : {std::pair{C(d_in), "d_in"}, std::pair{C(d_weight), "d_weight"}, std::pair{C(d_bias), "d_bias"}}) {
    if (absent(g)) continue;
    expect_separate(g, d_out, op, (std::string("d_out (as ") + name + ")").c_str());
    expect_separate(g, weight, op, (std::string("weight (as ") + name + ")").c_str());
    if (!absent(in)) expect_separate(g, in, op, (std::string("in (as ") + name + ")").c_str());
  }
  return N;
}

/// layer_norm_backward's checks (weight already checked as (C)): in and d_out (N, C), d_in (N, C),
/// d_weight and d_bias (C), d_in separate from d_out and in. Returns N.
template <class G, class V>
index_t check_layer_norm_backward(const char* op, const G& d_in, const G& d_weight, const G& d_bias, const V& d_out,
                                  const V& in, index_t C) {
  const index_t N = rows_of(in, C, op, "in");
  if (rows_of(d_out, C, op, "d_out") != N) {
    fail<ShapeError>(op, ": d_out has shape ", d_out.shape().str(), ", expected ", N, " rows of ", C, " like in");
  }
  if (!absent(d_in) && rows_of(d_in, C, op, "d_in") != N) {
    fail<ShapeError>(op, ": d_in has shape ", d_in.shape().str(), ", expected ", N, " rows of ", C);
  }
  if (!absent(d_weight)) expect_shape(d_weight, Shape{C}, "layer_norm_backward: d_weight (C)");
  if (!absent(d_bias)) expect_shape(d_bias, Shape{C}, "layer_norm_backward: d_bias (C)");
  if (!absent(d_in)) {
    expect_separate(d_in, d_out, op, "d_out (as d_in)");
    expect_separate(d_in, in, op, "in (as d_in)");
  }
  return N;
}

/// cross_entropy_backward's checks besides the logits/targets ones: d_logits like logits, exactly
/// in place or separate; a finite scale.
template <class G, class V>
void check_cross_entropy_backward(const G& d_logits, const V& logits, double scale) {
  expect_shape(d_logits, logits.shape(), "cross_entropy_backward: d_logits (T, V), like logits");
  if (!std::isfinite(scale)) fail<InputError>("cross_entropy_backward: scale must be finite, got ", scale);
  if (d_logits.data() != logits.data()) {
    expect_separate(d_logits, logits, "cross_entropy_backward", "logits (only exact in-place use is allowed)");
  }
}

/// embedding_backward with d_wte absent: d_wpe (P, d) and one d_out row per token (ids are not
/// checked: the vocabulary is unknown). Returns d.
template <class G, class V>
index_t check_position_embedding_backward(const G& d_wpe, const V& d_out, std::size_t n_tok) {
  if (d_wpe.rank() != 2) fail<ShapeError>("embedding_backward: d_wpe: expected (P, d), got ", d_wpe.shape().str());
  if (static_cast<index_t>(n_tok) > d_wpe.dim(0)) {
    fail<InputError>("embedding_backward: ", n_tok, " tokens but only ", d_wpe.dim(0), " positions");
  }
  if (rows_of(d_out, d_wpe.dim(1), "embedding_backward", "d_out") != static_cast<index_t>(n_tok)) {
    fail<ShapeError>("embedding_backward: d_out has shape ", d_out.shape().str(), ", expected one row per token");
  }
  return d_wpe.dim(1);
}

/// adamw_update's checks: grad, m and v have param's shape; m and v are separate from each other,
/// from param and from grad (param and grad may not alias either).
template <class P, class G>
void check_adamw_update(const P& param, const G& grad, const P& m, const P& v) {
  const char* op = "adamw_update";
  for (auto [x, name] : {std::pair{grad.shape(), "grad"}, std::pair{m.shape(), "m"}, std::pair{v.shape(), "v"}}) {
    if (!(x == param.shape())) {
      fail<ShapeError>(op, ": ", name, " has shape ", x.str(), ", expected the parameter's shape ", param.shape().str());
    }
  }
  if (overlaps(param, grad) || overlaps(param, m) || overlaps(param, v) || overlaps(grad, m) || overlaps(grad, v) ||
      overlaps(m, v)) {
    fail<InputError>(op, ": the parameter, its gradient and the two moments must be separate buffers");
  }
}

/// Number of fixed summation blocks (32 Ki elements) sum_of_squares cuts n elements into.
inline constexpr index_t square_sum_block = index_t{1} << 15;
inline index_t square_sum_blocks(index_t n) { return (n + square_sum_block - 1) / square_sum_block; }

}  // namespace longmem::detail::op_checks
