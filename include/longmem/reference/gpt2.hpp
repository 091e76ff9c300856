#pragma once
// A plain float64 GPT-2 / GPT-2* forward written from DESIGN.md section 2, for tests.
// It reads its weights by name straight from a safetensors file (its own name handling,
// not the library loader's) and computes with explicit loops: slow, obvious, independent.
#include <cmath>
#include <numbers>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "longmem/detail/alibi.hpp"
#include "longmem/model_config.hpp"
#include "longmem/safetensors.hpp"

namespace longmem::reference {

/// Row-major double matrix.
struct Mat {
  std::int64_t rows = 0, cols = 0;
  std::vector<double> a;
  Mat() = default;
  Mat(std::int64_t r, std::int64_t c) : rows(r), cols(c), a(static_cast<std::size_t>(r * c), 0.0) {}
  double& operator()(std::int64_t r, std::int64_t c) { return a[static_cast<std::size_t>(r * cols + c)]; }
  double operator()(std::int64_t r, std::int64_t c) const { return a[static_cast<std::size_t>(r * cols + c)]; }
};

struct Gpt2Output {
  std::vector<Mat> hidden;  // L+1 of (T, d); the last after ln_f
  Mat logits;               // (T, V)
  Mat mem_keys, mem_values;  // (T, d) = (T, H, dh) of layer m
};

namespace detail_ref {

inline Mat load(const SafetensorsFile& f, const std::string& name) {
  std::string full = name;
  if (!f.contains(full) && f.contains("transformer." + name)) full = "transformer." + name;
  Tensor<double, Host> t = f.read<double>(full);
  Mat m(t.rank() == 1 ? 1 : t.dim(0), t.rank() == 1 ? t.dim(0) : t.dim(1));
  for (std::int64_t i = 0; i < t.numel(); ++i) m.a[static_cast<std::size_t>(i)] = t.data()[i];
  return m;
}

// y (T, O) = x (T, I) W + b with W given as [in, out] (Conv1D) or [out, in] (Linear).
inline Mat affine(const Mat& x, const Mat& w, bool w_is_out_in, const Mat* b) {
  const std::int64_t O = w_is_out_in ? w.rows : w.cols, I = x.cols;
  Mat y(x.rows, O);
  for (std::int64_t t = 0; t < x.rows; ++t)
    for (std::int64_t o = 0; o < O; ++o) {
      double s = b ? b->a[static_cast<std::size_t>(o)] : 0.0;
      for (std::int64_t i = 0; i < I; ++i) s += x(t, i) * (w_is_out_in ? w(o, i) : w(i, o));
      y(t, o) = s;
    }
  return y;
}

inline Mat layer_norm(const Mat& x, const Mat& g, const Mat& b, double eps) {
  Mat y(x.rows, x.cols);
  for (std::int64_t t = 0; t < x.rows; ++t) {
    double mean = 0, var = 0;
    for (std::int64_t c = 0; c < x.cols; ++c) mean += x(t, c);
    mean /= static_cast<double>(x.cols);
    for (std::int64_t c = 0; c < x.cols; ++c) var += (x(t, c) - mean) * (x(t, c) - mean);
    var /= static_cast<double>(x.cols);
    for (std::int64_t c = 0; c < x.cols; ++c) y(t, c) = (x(t, c) - mean) / std::sqrt(var + eps) * g.a[c] + b.a[c];
  }
  return y;
}

inline double gelu(double x, Activation a) {
  if (a == Activation::GeluErf) return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
  const double k = std::sqrt(2.0 / std::numbers::pi);
  return 0.5 * x * (1.0 + std::tanh(k * (x + 0.044715 * x * x * x)));
}

// Causal multi-head attention over (T, d) q, k, v.
inline Mat attention(const Mat& q, const Mat& k, const Mat& v, int H, bool alibi) {
  const std::int64_t T = q.rows, d = q.cols, dh = d / H;
  Mat out(T, d);
  std::vector<double> p(static_cast<std::size_t>(T));
  for (int h = 0; h < H; ++h) {
    const double slope = alibi ? longmem::detail::alibi_slope(h, H) : 0.0;
    for (std::int64_t t = 0; t < T; ++t) {
      double mx = -INFINITY;
      for (std::int64_t s = 0; s <= t; ++s) {
        double dot = 0;
        for (std::int64_t e = 0; e < dh; ++e) dot += q(t, h * dh + e) * k(s, h * dh + e);
        p[static_cast<std::size_t>(s)] = dot / std::sqrt(static_cast<double>(dh)) - slope * static_cast<double>(t - s);
        mx = std::max(mx, p[static_cast<std::size_t>(s)]);
      }
      double z = 0;
      for (std::int64_t s = 0; s <= t; ++s) z += (p[static_cast<std::size_t>(s)] = std::exp(p[static_cast<std::size_t>(s)] - mx));
      for (std::int64_t e = 0; e < dh; ++e) {
        double acc = 0;
        for (std::int64_t s = 0; s <= t; ++s) acc += p[static_cast<std::size_t>(s)] * v(s, h * dh + e);
        out(t, h * dh + e) = acc / z;
      }
    }
  }
  return out;
}

}  // namespace detail_ref

/// Runs the backbone in `file` (hyper-parameters `cfg`) over `tokens`; captures layer
/// `memory_layer`'s keys/values when it is in [0, L).
inline Gpt2Output gpt2_forward(const SafetensorsFile& file, const BackboneConfig& cfg, std::span<const std::int32_t> tokens,
                               int memory_layer = -1) {
  using namespace detail_ref;
  const std::int64_t T = static_cast<std::int64_t>(tokens.size()), d = cfg.n_embd;
  const bool hf = file.contains("h.0.attn.c_attn.weight") || file.contains("transformer.h.0.attn.c_attn.weight");
  const bool alibi = cfg.positions == PositionScheme::Alibi;
  Gpt2Output o;
  Mat wte = load(file, "wte.weight");
  Mat h(T, d);
  Mat wpe;
  if (!alibi) wpe = load(file, "wpe.weight");
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t c = 0; c < d; ++c) h(t, c) = wte(tokens[static_cast<std::size_t>(t)], c) + (alibi ? 0.0 : wpe(t, c));
  o.hidden.push_back(h);
  for (int j = 0; j < cfg.n_layer; ++j) {
    const std::string p = "h." + std::to_string(j) + ".";
    Mat a = layer_norm(h, load(file, p + "ln_1.weight"), load(file, p + "ln_1.bias"), cfg.layer_norm_epsilon);
    Mat q, k, v, attn_out;
    if (hf) {
      Mat qkv = affine(a, load(file, p + "attn.c_attn.weight"), false, nullptr);
      Mat b = load(file, p + "attn.c_attn.bias");
      q = Mat(T, d), k = Mat(T, d), v = Mat(T, d);
      for (std::int64_t t = 0; t < T; ++t)
        for (std::int64_t c = 0; c < d; ++c) {
          q(t, c) = qkv(t, c) + b.a[c];
          k(t, c) = qkv(t, d + c) + b.a[d + c];
          v(t, c) = qkv(t, 2 * d + c) + b.a[2 * d + c];
        }
      Mat ob = load(file, p + "attn.c_proj.bias");
      attn_out = affine(attention(q, k, v, cfg.n_head, alibi), load(file, p + "attn.c_proj.weight"), false, &ob);
    } else {
      Mat qb, kb, vb, ob;
      if (cfg.attn_bias) {
        qb = load(file, p + "attn.q_proj.bias"), kb = load(file, p + "attn.k_proj.bias");
        vb = load(file, p + "attn.v_proj.bias"), ob = load(file, p + "attn.out_proj.bias");
      }
      q = affine(a, load(file, p + "attn.q_proj.weight"), true, cfg.attn_bias ? &qb : nullptr);
      k = affine(a, load(file, p + "attn.k_proj.weight"), true, cfg.attn_bias ? &kb : nullptr);
      v = affine(a, load(file, p + "attn.v_proj.weight"), true, cfg.attn_bias ? &vb : nullptr);
      attn_out = affine(attention(q, k, v, cfg.n_head, alibi), load(file, p + "attn.out_proj.weight"), true,
                        cfg.attn_bias ? &ob : nullptr);
    }
    if (j == memory_layer) {
      o.mem_keys = k;
      o.mem_values = v;
    }
    if (cfg.block_style == BlockStyle::Sequential) {
      for (std::size_t i = 0; i < h.a.size(); ++i) h.a[i] += attn_out.a[i];
      a = layer_norm(h, load(file, p + "ln_2.weight"), load(file, p + "ln_2.bias"), cfg.layer_norm_epsilon);
    }
    Mat f, m;
    if (hf) {
      Mat fb = load(file, p + "mlp.c_fc.bias"), mb = load(file, p + "mlp.c_proj.bias");
      f = affine(a, load(file, p + "mlp.c_fc.weight"), false, &fb);
      for (auto& x : f.a) x = gelu(x, cfg.activation);
      m = affine(f, load(file, p + "mlp.c_proj.weight"), false, &mb);
    } else {
      Mat fb = load(file, p + "mlp.fc_in.bias"), mb = load(file, p + "mlp.fc_out.bias");
      f = affine(a, load(file, p + "mlp.fc_in.weight"), true, &fb);
      for (auto& x : f.a) x = gelu(x, cfg.activation);
      m = affine(f, load(file, p + "mlp.fc_out.weight"), true, &mb);
    }
    for (std::size_t i = 0; i < h.a.size(); ++i) {
      h.a[i] += m.a[i] + (cfg.block_style == BlockStyle::Parallel ? attn_out.a[i] : 0.0);
    }
    o.hidden.push_back(h);
  }
  o.hidden.back() = layer_norm(h, load(file, "ln_f.weight"), load(file, "ln_f.bias"), cfg.layer_norm_epsilon);
  const Mat& last = o.hidden.back();
  o.logits = Mat(T, cfg.vocab_size);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t vv = 0; vv < cfg.vocab_size; ++vv) {
      double s = 0;
      for (std::int64_t c = 0; c < d; ++c) s += last(t, c) * wte(vv, c);
      o.logits(t, vv) = s;
    }
  return o;
}

}  // namespace longmem::reference
