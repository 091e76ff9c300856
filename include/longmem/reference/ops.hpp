#pragma once
// Plain float64 versions of the op table, for tests: loops written from the formulas
// in DESIGN.md section 2 and fusion.hpp, no Eigen, no blocking, no threads.
//
// Convention: every function takes const double views and returns a new
// Tensor<double, Host> (or, for cross_entropy, a small result struct); nothing is
// computed in place. Accumulating forms (linear with Accumulate::Yes, add,
// add_difference) take the starting value of the output as an argument.
// Inputs are checked only as far as needed to avoid reading out of bounds
// (ShapeError / InputError); the CPU backend owns the user-facing diagnostics.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "longmem/detail/alibi.hpp"
#include "longmem/error.hpp"
#include "longmem/model_config.hpp"
#include "longmem/tensor.hpp"

namespace longmem::reference {

using View = TensorView<const double, Host>;

namespace detail {
inline bool absent(View v) { return v.data() == nullptr || v.numel() == 0; }

inline void require(bool ok, const char* op, const char* what) {
  if (!ok) longmem::detail::fail<ShapeError>("reference::", op, ": ", what);
}

/// Number of rows when v's trailing extents multiply to `features`.
inline index_t rows(View v, index_t features, const char* op) {
  require(features > 0 && v.numel() % features == 0, op, "input size is not a multiple of the feature count");
  return v.numel() / features;
}
}  // namespace detail

/// out (T, d) = wte[tokens[t]] + wpe[t] (wpe may be empty).
inline Tensor<double, Host> embedding(std::span<const std::int32_t> tokens, View wte /*(V,d)*/, View wpe /*(P,d)*/) {
  detail::require(wte.rank() == 2, "embedding", "wte must be (V, d)");
  const index_t T = static_cast<index_t>(tokens.size()), V = wte.dim(0), d = wte.dim(1);
  const bool positions = !detail::absent(wpe);
  if (positions) detail::require(wpe.rank() == 2 && wpe.dim(1) == d && wpe.dim(0) >= T, "embedding", "wpe must be (P >= T, d)");
  Tensor<double, Host> out(Shape{T, d});
  for (index_t t = 0; t < T; ++t) {
    const index_t id = tokens[static_cast<std::size_t>(t)];
    if (id < 0 || id >= V) longmem::detail::fail<InputError>("reference::embedding: token id ", id, " is outside [0, ", V, ")");
    for (index_t c = 0; c < d; ++c) out(t, c) = wte(id, c) + (positions ? wpe(t, c) : 0.0);
  }
  return out;
}

/// Per row of C = weight.numel() features: (x - mean) / sqrt(var + eps) * weight + bias.
inline Tensor<double, Host> layer_norm(View in, View weight /*(C)*/, View bias /*(C)*/, double eps) {
  const index_t C = weight.numel(), N = detail::rows(in, C, "layer_norm");
  detail::require(bias.numel() == C, "layer_norm", "bias must have C elements");
  Tensor<double, Host> out(in.shape());
  const double* x = in.data();
  double* y = out.data();
  for (index_t n = 0; n < N; ++n) {
    double mean = 0;
    for (index_t c = 0; c < C; ++c) mean += x[n * C + c];
    mean /= static_cast<double>(C);
    double var = 0;
    for (index_t c = 0; c < C; ++c) var += (x[n * C + c] - mean) * (x[n * C + c] - mean);
    var /= static_cast<double>(C);  // biased, as PyTorch
    const double inv = 1.0 / std::sqrt(var + eps);
    for (index_t c = 0; c < C; ++c) y[n * C + c] = (x[n * C + c] - mean) * inv * weight.data()[c] + bias.data()[c];
  }
  return out;
}

/// out (N, O) = start (N, O or empty) + in (N, I) weight (O, I)^T + bias (O or empty).
inline Tensor<double, Host> linear(View in, View weight, View bias, View start = {}) {
  detail::require(weight.rank() == 2, "linear", "weight must be (O, I)");
  const index_t O = weight.dim(0), I = weight.dim(1), N = detail::rows(in, I, "linear");
  const bool has_bias = !detail::absent(bias), has_start = !detail::absent(start);
  if (has_bias) detail::require(bias.numel() == O, "linear", "bias must have O elements");
  if (has_start) detail::require(start.numel() == N * O, "linear", "start must have N * O elements");
  Tensor<double, Host> out(Shape{N, O});
  for (index_t n = 0; n < N; ++n) {
    for (index_t o = 0; o < O; ++o) {
      double acc = 0;
      for (index_t i = 0; i < I; ++i) acc += in.data()[n * I + i] * weight(o, i);
      if (has_bias) acc += bias.data()[o];
      if (has_start) acc += start.data()[n * O + o];
      out(n, o) = acc;
    }
  }
  return out;
}

/// gelu(x) elementwise, tanh or erf form.
inline Tensor<double, Host> gelu(View x, Activation kind) {
  Tensor<double, Host> out(x.shape());
  const double pi = 3.14159265358979323846;
  for (index_t i = 0; i < x.numel(); ++i) {
    const double v = x.data()[i];
    out.data()[i] = kind == Activation::GeluTanh
                        ? 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / pi) * (v + 0.044715 * v * v * v)))
                        : 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
  }
  return out;
}

/// start + in, elementwise.
inline Tensor<double, Host> add(View start, View in) {
  detail::require(start.numel() == in.numel(), "add", "sizes differ");
  Tensor<double, Host> out(start.shape());
  for (index_t i = 0; i < in.numel(); ++i) out.data()[i] = start.data()[i] + in.data()[i];
  return out;
}

/// start + (a - b), elementwise.
inline Tensor<double, Host> add_difference(View start, View a, View b) {
  detail::require(start.numel() == a.numel() && a.numel() == b.numel(), "add_difference", "sizes differ");
  Tensor<double, Host> out(start.shape());
  for (index_t i = 0; i < a.numel(); ++i) out.data()[i] = start.data()[i] + (a.data()[i] - b.data()[i]);
  return out;
}

namespace detail {
inline void check_qkv(View q, View k, View v, const char* op) {
  require(q.rank() == 3 && k.shape() == q.shape() && v.shape() == q.shape(), op, "q, k, v must all be (T, H, dh)");
}
inline void check_memory(View q, View mem_k, View mem_v, const char* op) {
  require(mem_k.rank() == 4 && mem_v.shape() == mem_k.shape() && mem_k.dim(0) == q.dim(0) &&
              mem_k.dim(1) == q.dim(1) && mem_k.dim(3) == q.dim(2),
          op, "mem_k, mem_v must be (T, H, K, dh)");
}
/// sum_c a[c] b[c]
inline double dot(const double* a, const double* b, index_t n) {
  double acc = 0;
  for (index_t c = 0; c < n; ++c) acc += a[c] * b[c];
  return acc;
}

/// y[c] += alpha x[c]
inline void axpy(double alpha, const double* x, double* y, index_t n) {
  for (index_t c = 0; c < n; ++c) y[c] += alpha * x[c];
}

inline double sigmoid(double g) { return 1.0 / (1.0 + std::exp(-g)); }

/// p_j = exp(s_j - mx) / sum_i exp(s_i - mx) over the first n scores; mx is their maximum.
inline std::vector<double> softmax(const std::vector<double>& s, index_t n, double mx) {
  std::vector<double> p(static_cast<std::size_t>(n));
  double z = 0;
  for (index_t j = 0; j < n; ++j) z += std::exp(s[std::size_t(j)] - mx);
  for (index_t j = 0; j < n; ++j) p[std::size_t(j)] = std::exp(s[std::size_t(j)] - mx) / z;
  return p;
}
}  // namespace detail

/// A (T, H, dh): per head h and query t, scores s_j = q_t . k_j / sqrt(dh) - slope_h (t - j)
/// for j <= t (slope 0 with learned positions), p = softmax(s), A_t = sum_j p_j v_j.
inline Tensor<double, Host> causal_attention(View q, View k, View v, PositionScheme positions) {
  detail::check_qkv(q, k, v, "causal_attention");
  const index_t T = q.dim(0), H = q.dim(1), dh = q.dim(2);
  Tensor<double, Host> out(q.shape());
  std::vector<double> s(static_cast<std::size_t>(T));
  for (index_t h = 0; h < H; ++h) {
    const double slope = positions == PositionScheme::Alibi ? longmem::detail::alibi_slope(int(h), int(H)) : 0.0;
    for (index_t t = 0; t < T; ++t) {
      double mx = -INFINITY;
      for (index_t j = 0; j <= t; ++j) {
        s[std::size_t(j)] = detail::dot(&q(t, h, 0), &k(j, h, 0), dh) / std::sqrt(double(dh)) - slope * double(t - j);
        mx = std::max(mx, s[std::size_t(j)]);
      }
      const std::vector<double> p = detail::softmax(s, t + 1, mx);
      double* o = &out(t, h, 0);
      std::fill(o, o + dh, 0.0);
      for (index_t j = 0; j <= t; ++j) detail::axpy(p[std::size_t(j)], &v(j, h, 0), o, dh);
    }
  }
  return out;
}

/// M (T, H, dh): per head h and query t, scores r_j = q_t . Kr[t,h,j] / sqrt(dh) over the
/// K retrieved tokens, no position term, p = softmax(r), M_t = sum_j p_j Vr[t,h,j].
/// With K = 0 there is nothing to attend to: M is zero.
inline Tensor<double, Host> memory_branch(View q, View mem_k /*(T,H,K,dh)*/, View mem_v /*(T,H,K,dh)*/) {
  detail::check_memory(q, mem_k, mem_v, "memory_branch");
  const index_t T = q.dim(0), H = q.dim(1), dh = q.dim(2), K = mem_k.dim(2);
  Tensor<double, Host> out(q.shape());
  std::vector<double> r(static_cast<std::size_t>(K));
  for (index_t t = 0; t < T; ++t) {
    for (index_t h = 0; h < H; ++h) {
      double mx = -INFINITY;
      for (index_t j = 0; j < K; ++j) {
        r[std::size_t(j)] = detail::dot(&q(t, h, 0), &mem_k(t, h, j, 0), dh) / std::sqrt(double(dh));
        mx = std::max(mx, r[std::size_t(j)]);
      }
      const std::vector<double> p = detail::softmax(r, K, mx);
      double* o = &out(t, h, 0);
      std::fill(o, o + dh, 0.0);
      for (index_t j = 0; j < K; ++j) detail::axpy(p[std::size_t(j)], &mem_v(t, h, j, 0), o, dh);
    }
  }
  return out;
}

/// GatedFusion: out_h = (1 - sigmoid(g_h)) A_h + sigmoid(g_h) M_h; with K = 0, out = A.
inline Tensor<double, Host> memory_attention_gated(View q, View k, View v, View mem_k, View mem_v, View gate /*(H)*/,
                                                   PositionScheme positions) {
  detail::check_qkv(q, k, v, "memory_attention_gated");
  detail::check_memory(q, mem_k, mem_v, "memory_attention_gated");
  Tensor<double, Host> A = causal_attention(q, k, v, positions);
  if (mem_k.dim(2) == 0) return A;  // empty memory: ordinary attention, no gate factor
  detail::require(gate.numel() == q.dim(1), "memory_attention_gated", "gate must be (H)");
  Tensor<double, Host> M = memory_branch(q, mem_k, mem_v);
  Tensor<double, Host> out(q.shape());
  for (index_t t = 0; t < q.dim(0); ++t) {
    for (index_t h = 0; h < q.dim(1); ++h) {
      const double g = gate.data()[h];
      // 1 - sigmoid(g) written as sigmoid(-g): exact at both ends for huge |g|.
      const double w_local = detail::sigmoid(-g), w_mem = detail::sigmoid(g);
      for (index_t c = 0; c < q.dim(2); ++c) out(t, h, c) = w_local * A(t, h, c) + w_mem * M(t, h, c);
    }
  }
  return out;
}

/// JointFusion: one softmax over [local causal scores (with ALiBi), memory scores], times [v; Vr].
inline Tensor<double, Host> memory_attention_joint(View q, View k, View v, View mem_k, View mem_v,
                                                   PositionScheme positions) {
  detail::check_qkv(q, k, v, "memory_attention_joint");
  detail::check_memory(q, mem_k, mem_v, "memory_attention_joint");
  const index_t T = q.dim(0), H = q.dim(1), dh = q.dim(2), K = mem_k.dim(2);
  Tensor<double, Host> out(q.shape());
  std::vector<double> s;  // scores: t + 1 local ones, then K memory ones
  for (index_t h = 0; h < H; ++h) {
    const double slope = positions == PositionScheme::Alibi ? longmem::detail::alibi_slope(int(h), int(H)) : 0.0;
    for (index_t t = 0; t < T; ++t) {
      s.assign(std::size_t(t + 1 + K), 0.0);
      for (index_t j = 0; j <= t; ++j) {
        s[std::size_t(j)] = detail::dot(&q(t, h, 0), &k(j, h, 0), dh) / std::sqrt(double(dh)) - slope * double(t - j);
      }
      for (index_t j = 0; j < K; ++j) {
        s[std::size_t(t + 1 + j)] = detail::dot(&q(t, h, 0), &mem_k(t, h, j, 0), dh) / std::sqrt(double(dh));
      }
      double mx = -INFINITY;
      for (double x : s) mx = std::max(mx, x);
      const std::vector<double> p = detail::softmax(s, t + 1 + K, mx);  // one softmax over both
      double* o = &out(t, h, 0);
      std::fill(o, o + dh, 0.0);
      for (index_t j = 0; j <= t; ++j) detail::axpy(p[std::size_t(j)], &v(j, h, 0), o, dh);
      for (index_t j = 0; j < K; ++j) detail::axpy(p[std::size_t(t + 1 + j)], &mem_v(t, h, j, 0), o, dh);
    }
  }
  return out;
}

/// Cross-entropy per token and in total (natural log); target -1 is ignored (loss 0).
struct CrossEntropy {
  double sum = 0;
  std::int64_t count = 0;
  std::vector<double> losses;  // (T)
};

inline CrossEntropy cross_entropy(View logits /*(T,V)*/, std::span<const std::int32_t> targets) {
  detail::require(logits.rank() == 2 && logits.dim(0) == index_t(targets.size()), "cross_entropy",
                  "logits must be (T, V) with T = number of targets");
  const index_t T = logits.dim(0), V = logits.dim(1);
  CrossEntropy r;
  r.losses.assign(std::size_t(T), 0.0);
  for (index_t t = 0; t < T; ++t) {
    const std::int32_t y = targets[std::size_t(t)];
    if (y == -1) continue;
    if (y < 0 || y >= V) longmem::detail::fail<InputError>("reference::cross_entropy: target ", y, " is outside [0, ", V, ")");
    double mx = -INFINITY;
    for (index_t c = 0; c < V; ++c) mx = std::max(mx, logits(t, c));
    double z = 0;
    for (index_t c = 0; c < V; ++c) z += std::exp(logits(t, c) - mx);
    const double loss = -(logits(t, y) - mx - std::log(z));  // -log softmax(logits)[y]
    r.losses[std::size_t(t)] = loss;
    r.sum += loss;
    ++r.count;
  }
  return r;
}

}  // namespace longmem::reference
