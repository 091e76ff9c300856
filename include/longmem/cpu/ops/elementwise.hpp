#pragma once
// Host elementwise ops: GELU (tanh and erf forms) with its derivative, residual sums.
// float runs through Eigen's vectorised tanh/exp (and a vectorised erf, |error| <= 1.5e-7), double
// through the standard library's functions.
//   gelu           tanh: 0.5 x (1 + tanh(c (x + a x^3)))        c = sqrt(2/pi), a = 0.044715
//                  erf:  0.5 x (1 + erf(x / sqrt 2))
//   gelu_backward  tanh: 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2),  t = tanh(c (x + a x^3))
//                  erf:  0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi)
//   add, add_difference   out += in;  out += a - b
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "longmem/cpu/ops/common.hpp"
#include "longmem/model_config.hpp"

namespace longmem::detail::cpu {

inline void check_activation(const char* op, Activation kind) {
  if (kind != Activation::GeluTanh && kind != Activation::GeluErf) {
    fail<InputError>(op, ": unknown activation kind ", static_cast<int>(kind));
  }
}

/// Runs body(begin, end) over [0, n) in blocks of `grain` elements, threaded when n is large.
template <class F>
void elementwise_blocks(index_t n, F&& body) {
  constexpr index_t grain = 4096;
  parallel_for((n + grain - 1) / grain, grain * 16, [&](index_t b) { body(b * grain, std::min(n, (b + 1) * grain)); });
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
  const T r = static_cast<T>(0.70710678118654752440);  // 1/sqrt(2)
  const T inv_sqrt_2pi = static_cast<T>(0.39894228040143267794);
  return T(0.5) * (T(1) + std::erf(v * r)) + v * std::exp(T(-0.5) * v * v) * inv_sqrt_2pi;
}

template <class T>
using ArrayMap = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
template <class T>
using ConstArrayMap = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;

/// erf for float arrays, vectorised: Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, about one
/// float ulp of erf's range) with Eigen's vectorised exp. Double keeps std::erf.
template <class X>
Eigen::ArrayXf erf_float(const X& x) {
  const Eigen::ArrayXf a = x.abs();
  const Eigen::ArrayXf t = 1.0f / (1.0f + 0.3275911f * a);
  const Eigen::ArrayXf poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
  const Eigen::ArrayXf y = 1.0f - poly * (-a * a).exp();
  return (x < 0.0f).select(-y, y);
}

/// y = gelu(x) over [begin, end): float through Eigen's vectorised tanh / exp, double with the
/// standard library's functions.
template <class T>
void gelu_range(const T* x, T* y, index_t begin, index_t end, Activation kind) {
  const index_t n = end - begin;
  if constexpr (std::is_same_v<T, float>) {
    ConstArrayMap<float> v(x + begin, n);
    ArrayMap<float> out(y + begin, n);
    if (kind == Activation::GeluTanh) {
      out = 0.5f * v * (1.0f + (0.7978845608f * (v + 0.044715f * v * v * v)).tanh());
    } else {
      out = 0.5f * v * (1.0f + erf_float(v * 0.7071067812f));
    }
  } else {
    for (index_t i = begin; i < end; ++i) y[i] = gelu_value(x[i], kind);
  }
}

/// dx = g * gelu'(x) over [begin, end); dx may be g.
template <class T>
void gelu_derivative_range(const T* g, const T* x, T* dx, index_t begin, index_t end, Activation kind) {
  const index_t n = end - begin;
  if constexpr (std::is_same_v<T, float>) {
    ConstArrayMap<float> v(x + begin, n), gv(g + begin, n);
    ArrayMap<float> out(dx + begin, n);
    if (kind == Activation::GeluTanh) {
      const float c = 0.7978845608f, a = 0.044715f;
      const Eigen::ArrayXf t = (c * (v + a * v * v * v)).tanh();
      out = gv * (0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * c * (1.0f + 3.0f * a * v * v));
    } else {
      out = gv * (0.5f * (1.0f + erf_float(v * 0.7071067812f)) + v * (-0.5f * v * v).exp() * 0.3989422804f);
    }
  } else {
    for (index_t i = begin; i < end; ++i) dx[i] = g[i] * gelu_derivative(x[i], kind);
  }
}

/// x = gelu(x) in place.
template <class T>
void gelu(TensorView<T, Host> x, Activation kind) {
  check_activation("gelu", kind);
  if (absent(x)) return;
  T* p = x.data();
  elementwise_blocks(x.numel(), [&](index_t b, index_t e) { gelu_range<T>(p, p, b, e, kind); });
}

/// out = gelu(in); out may be in.
template <class T>
void gelu(TensorView<T, Host> out, TensorView<const T, Host> in, Activation kind) {
  check_activation("gelu", kind);
  expect_same_elements(out, in, "gelu", "in");
  if (out.data() != in.data()) expect_separate(out, in, "gelu", "in (only exact in-place use is allowed)");
  if (absent(out)) return;
  elementwise_blocks(out.numel(), [&](index_t b, index_t e) { gelu_range<T>(in.data(), out.data(), b, e, kind); });
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
  elementwise_blocks(d_in.numel(), [&](index_t b, index_t e) {
    gelu_derivative_range<T>(d_out.data(), in.data(), d_in.data(), b, e, kind);
  });
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
