#pragma once
// Host elementwise ops: GELU (tanh and erf forms) with its derivative, residual sums.
//   gelu           tanh: 0.5 x (1 + tanh(c (x + a x^3)))        c = sqrt(2/pi), a = 0.044715
//                  erf:  0.5 x (1 + erf(x / sqrt 2))
//   gelu_backward  tanh: 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2),  t = tanh(c (x + a x^3))
//                  erf:  0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi)
//   add, add_difference   out += in;  out += a - b
#include <algorithm>
#include <cmath>

#include "longmem/cpu/ops/common.hpp"
#include "longmem/model_config.hpp"

namespace longmem::detail::cpu {

inline void check_activation(const char* op, Activation kind) {
  if (kind != Activation::GeluTanh && kind != Activation::GeluErf) {
    fail<InputError>(op, ": unknown activation kind ", static_cast<int>(kind));
  }
}

/// Runs body(i) over [0, n) in blocks of `grain`, threaded when n is large.
template <class F>
void elementwise(index_t n, F&& body) {
  constexpr index_t grain = 4096;
  parallel_for((n + grain - 1) / grain, grain * 16, [&](index_t b) {
    const index_t end = std::min(n, (b + 1) * grain);
    for (index_t i = b * grain; i < end; ++i) body(i);
  });
}

template <class T>
T gelu_value(T v, Activation kind) {
  if (kind == Activation::GeluTanh) {
    const T c = static_cast<T>(0.79788456080286535588);  // sqrt(2/pi)
    return T(0.5) * v * (T(1) + std::tanh(c * (v + T(0.044715) * v * v * v)));
  }
  const T r = static_cast<T>(0.70710678118654752440);  // 1/sqrt(2)
  return T(0.5) * v * (T(1) + std::erf(v * r));
}

template <class T>
T gelu_derivative(T v, Activation kind) {
  if (kind == Activation::GeluTanh) {
    const T c = static_cast<T>(0.79788456080286535588), a = static_cast<T>(0.044715);
    const T t = std::tanh(c * (v + a * v * v * v));
    return T(0.5) * (T(1) + t) + T(0.5) * v * (T(1) - t * t) * c * (T(1) + T(3) * a * v * v);
  }
  const T r = static_cast<T>(0.70710678118654752440);        // 1/sqrt(2)
  const T inv_sqrt_2pi = static_cast<T>(0.39894228040143267794);
  return T(0.5) * (T(1) + std::erf(v * r)) + v * std::exp(T(-0.5) * v * v) * inv_sqrt_2pi;
}

/// x = gelu(x) in place.
template <class T>
void gelu(TensorView<T, Host> x, Activation kind) {
  check_activation("gelu", kind);
  if (absent(x)) return;
  T* p = x.data();
  if (kind == Activation::GeluTanh) {
    elementwise(x.numel(), [&](index_t i) { p[i] = gelu_value(p[i], Activation::GeluTanh); });
  } else {
    elementwise(x.numel(), [&](index_t i) { p[i] = gelu_value(p[i], Activation::GeluErf); });
  }
}

/// out = gelu(in); out may be in.
template <class T>
void gelu(TensorView<T, Host> out, TensorView<const T, Host> in, Activation kind) {
  check_activation("gelu", kind);
  expect_same_elements(out, in, "gelu", "in");
  if (out.data() != in.data()) expect_separate(out, in, "gelu", "in (only exact in-place use is allowed)");
  if (absent(out)) return;
  T* y = out.data();
  const T* x = in.data();
  if (kind == Activation::GeluTanh) {
    elementwise(out.numel(), [&](index_t i) { y[i] = gelu_value(x[i], Activation::GeluTanh); });
  } else {
    elementwise(out.numel(), [&](index_t i) { y[i] = gelu_value(x[i], Activation::GeluErf); });
  }
}

/// d_in = d_out * gelu'(in); d_in may be d_out.
template <class T>
void gelu_backward(TensorView<T, Host> d_in, TensorView<const T, Host> d_out, TensorView<const T, Host> in,
                   Activation kind) {
  check_activation("gelu_backward", kind);
  expect_same_elements(d_in, d_out, "gelu_backward", "d_out");
  expect_same_elements(d_in, in, "gelu_backward", "in");
  if (d_in.data() != d_out.data()) expect_separate(d_in, d_out, "gelu_backward", "d_out (only exact in-place use is allowed)");
  expect_separate(d_in, in, "gelu_backward", "in");
  if (absent(d_in)) return;
  T* dx = d_in.data();
  const T* g = d_out.data();
  const T* x = in.data();
  if (kind == Activation::GeluTanh) {
    elementwise(d_in.numel(), [&](index_t i) { dx[i] = g[i] * gelu_derivative(x[i], Activation::GeluTanh); });
  } else {
    elementwise(d_in.numel(), [&](index_t i) { dx[i] = g[i] * gelu_derivative(x[i], Activation::GeluErf); });
  }
}

/// out += in.
template <class T>
void add(TensorView<T, Host> out, TensorView<const T, Host> in) {
  expect_same_elements(out, in, "add", "in");
  if (absent(out)) return;
  T* y = out.data();
  const T* x = in.data();
  for (index_t i = 0; i < out.numel(); ++i) y[i] += x[i];
}

/// out += a - b.
template <class T>
void add_difference(TensorView<T, Host> out, TensorView<const T, Host> a, TensorView<const T, Host> b) {
  expect_same_elements(out, a, "add_difference", "a");
  expect_same_elements(out, b, "add_difference", "b");
  if (absent(out)) return;
  T* y = out.data();
  const T* pa = a.data();
  const T* pb = b.data();
  for (index_t i = 0; i < out.numel(); ++i) y[i] += pa[i] - pb[i];
}

}  // namespace longmem::detail::cpu
