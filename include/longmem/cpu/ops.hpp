#pragma once
// OpsBackend<Host>: the op table (longmem/ops.hpp) for buffers in host memory, T = float or
// double. Matrix products go through Eigen GEMMs on row-major Eigen::Map views; the rest
// are plain loops. Threads come from OpenMP when the translation unit is compiled with
// -fopenmp (and Eigen then threads its GEMMs too); without it everything runs on one core.
//
// Views whose last extents multiply to the feature count are accepted as (N, features):
// linear reads a (T, H, dh) input as (T, H*dh), layer_norm reads any (..., C).
//
// Dispatch cases of the attention kernel (detail::cpu::attention):
//   causal_attention                        local causal softmax only
//   memory_attention<F> with K = 0          exactly the causal path (no gate factor)
//   memory_attention<GatedFusion>, K > 0    memory pass writes M, local pass mixes in A by the gate
//   memory_attention<JointFusion>, K > 0    memory pass writes e Vr and its softmax statistics,
//                                           local pass merges them into one softmax
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "longmem/detail/eigen.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "longmem/detail/alibi.hpp"
#include "longmem/dtype.hpp"
#include "longmem/error.hpp"
#include "longmem/fusion.hpp"
#include "longmem/model_config.hpp"
#include "longmem/ops.hpp"
#include "longmem/tensor.hpp"

namespace longmem {

/// Tuning of the host attention kernel: queries per block (one GEMM of the block against the
/// keys up to its last query, so the wasted upper triangle is at most block²/2 scores).
struct HostAttentionTuning {
  index_t query_block = 64;
  friend constexpr bool operator==(const HostAttentionTuning&, const HostAttentionTuning&) = default;
};
inline constexpr HostAttentionTuning host_attention_tuning{};

namespace detail::cpu {

template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using MatrixMap = Eigen::Map<RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using ConstMatrixMap = Eigen::Map<const RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using RowArrayMap = Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>>;
template <class T>
using ConstVectorMap = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>>;

inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

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

/// Runs body(i) for i in [0, n), threaded when the total work (n * cost_per_item) is worth it.
template <class F>
void parallel_for(index_t n, index_t cost_per_item, F&& body) {
  [[maybe_unused]] const bool threaded = n > 1 && n * cost_per_item >= (index_t{1} << 15);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (threaded)
#endif
  for (index_t i = 0; i < n; ++i) body(i);
}

enum class AttentionMode { Causal, Gated, Joint };

/// Everything the attention kernel reads; pointers are to (T, H, dh) rows of stride H*dh and,
/// for memory, (T, H, K, dh) blocks.
template <class T>
struct AttentionProblem {
  const T* q;
  const T* k;
  const T* v;
  T* out;
  const T* mem_k = nullptr;
  const T* mem_v = nullptr;
  index_t n_tok = 0, n_head = 0, head_dim = 0, n_mem = 0;
  const T* alibi = nullptr;        // (H, T): slope_h * (j - (T-1)), or null for learned positions
  const T* gate_local = nullptr;   // (H): 1 - sigmoid(g_h)
  const T* gate_memory = nullptr;  // (H): sigmoid(g_h)
  T* mem_stats = nullptr;          // (T, H, 2) joint: max and sum of exp(score - max) of the memory scores
};

/// Pass 1 (K > 0), over (t, h) in memory order so mem_k and mem_v stream contiguously:
///   r = q_t Kr^T / sqrt(dh), e = exp(r - max r), writes into out (t, h):
///     Gated  M = e Vr / sum(e)                       (the finished memory branch)
///     Joint  e Vr, and (max r, sum e) to mem_stats   (merged with the local softmax in pass 2)
template <AttentionMode Mode, class T>
void memory_pass(const AttentionProblem<T>& p) {
  const index_t H = p.n_head, dh = p.head_dim, K = p.n_mem, ld = H * dh;
  const T scale = T(1) / std::sqrt(T(dh));
  Tensor<T, Host> scratch(Shape{static_cast<index_t>(max_threads()), K});  // (threads, K) scores
  [[maybe_unused]] const bool threaded = p.n_tok > 1 && p.n_tok * H * K * dh >= (index_t{1} << 15);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (threaded)
#endif
  for (index_t t = 0; t < p.n_tok; ++t) {
    Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>> r(scratch.data() + thread_id() * K, K);
    for (index_t h = 0; h < H; ++h) {
      const index_t th = t * H + h;
      const T* kr = p.mem_k + th * K * dh;  // (K, dh)
      const T* vr = p.mem_v + th * K * dh;  // (K, dh)
      ConstVectorMap<T> qt(p.q + t * ld + h * dh, dh);
      Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>> o(p.out + t * ld + h * dh, dh);
      // Row dots and row updates: for K x dh this small, half the cost of Eigen's GEMV calls.
      for (index_t j = 0; j < K; ++j) r[j] = ConstVectorMap<T>(kr + j * dh, dh).dot(qt);
      r *= scale;
      const T mx = r.maxCoeff();
      r = (r.array() - mx).exp().matrix();
      const T sum = r.sum();
      o.setZero();
      for (index_t j = 0; j < K; ++j) o += r[j] * Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(vr + j * dh, dh);
      if constexpr (Mode == AttentionMode::Gated) {
        o *= T(1) / sum;
      } else {
        p.mem_stats[2 * th] = mx;
        p.mem_stats[2 * th + 1] = sum;
      }
    }
  }
}

/// Scratch elements one thread needs for a query block of `nb` rows.
inline index_t attention_scratch(index_t nb, index_t n_tok, index_t head_dim) {
  const index_t n = nb * n_tok + nb * head_dim + 2 * nb;
  return (n + 15) / 16 * 16;  // keep each thread's slice on its own cache lines
}

/// Pass 2, one head h and queries [t0, t1): the local causal softmax as two GEMMs over the keys
/// up to t1 - 1, then out rows t0..t1-1 of head h:
///   Causal  A
///   Gated   (1 - sigmoid(g_h)) A + sigmoid(g_h) M                 (M from pass 1 in out)
///   Joint   (sum_j e_j v_j + exp(mm - mx) e Vr) / (sum_j e_j + exp(mm - mx) sum e)
///           with mx the maximum over local and memory scores       (e Vr, mm, sum e from pass 1)
template <AttentionMode Mode, class T>
void attention_block(const AttentionProblem<T>& p, index_t h, index_t t0, index_t t1, T* scratch) {
  const index_t ld = p.n_head * p.head_dim, dh = p.head_dim, nb = t1 - t0, nk = t1;
  const T scale = T(1) / std::sqrt(T(dh));
  T* scores = scratch;               // (nb, nk)
  T* block_out = scores + nb * nk;   // (nb, dh) unnormalised local output
  T* inv_sum = block_out + nb * dh;  // (nb)
  T* mem_weight = inv_sum + nb;      // (nb) joint: exp(mm - mx) / sum

  ConstMatrixMap<T> Q(p.q + t0 * ld + h * dh, nb, dh, Eigen::OuterStride<>(ld));
  ConstMatrixMap<T> Kh(p.k + h * dh, nk, dh, Eigen::OuterStride<>(ld));
  ConstMatrixMap<T> Vh(p.v + h * dh, nk, dh, Eigen::OuterStride<>(ld));
  MatrixMap<T> S(scores, nb, nk, Eigen::OuterStride<>(nk));
  MatrixMap<T> Ob(block_out, nb, dh, Eigen::OuterStride<>(dh));

  S.noalias() = Q * Kh.transpose();  // keys beyond each row's query are masked below

  for (index_t i = 0; i < nb; ++i) {
    const index_t t = t0 + i, n = t + 1;
    RowArrayMap<T> row(scores + i * nk, n);
    if (p.alibi) {
      // -slope*(t - j) for j in [0, t]: a slice of the per-head ramp, exact integer distances.
      row = row * scale + Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>>(p.alibi + h * p.n_tok + (p.n_tok - 1 - t), n);
    } else {
      row *= scale;
    }
    T mx = row.maxCoeff();
    T mem_max = 0;
    if constexpr (Mode == AttentionMode::Joint) {
      mem_max = p.mem_stats[2 * (t * p.n_head + h)];
      mx = std::max(mx, mem_max);
    }
    row = (row - mx).exp();
    T sum = row.sum();
    if constexpr (Mode == AttentionMode::Joint) {
      const T alpha = std::exp(mem_max - mx);  // rescales the memory part to the joint maximum
      sum += alpha * p.mem_stats[2 * (t * p.n_head + h) + 1];
      mem_weight[i] = alpha / sum;
    }
    std::fill(scores + i * nk + n, scores + (i + 1) * nk, T(0));
    inv_sum[i] = T(1) / sum;
  }

  Ob.noalias() = S * Vh;

  for (index_t i = 0; i < nb; ++i) {
    Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>> o(p.out + (t0 + i) * ld + h * dh, dh);
    if constexpr (Mode == AttentionMode::Causal) {
      o = Ob.row(i) * inv_sum[i];
    } else if constexpr (Mode == AttentionMode::Gated) {
      o = (p.gate_local[h] * inv_sum[i]) * Ob.row(i) + p.gate_memory[h] * o;
    } else {
      o = inv_sum[i] * Ob.row(i) + mem_weight[i] * o;
    }
  }
}

/// All heads and query blocks: the memory pass when K > 0, then the local pass threaded over
/// (head, block) pairs, largest blocks first.
template <AttentionMode Mode, class T>
void attention(AttentionProblem<T> p) {
  Tensor<T, Host> mem_stats;  // (T, H, 2)
  if constexpr (Mode != AttentionMode::Causal) {
    if constexpr (Mode == AttentionMode::Joint) {
      mem_stats.resize(Shape{p.n_tok, p.n_head, 2});
      p.mem_stats = mem_stats.data();
    }
    memory_pass<Mode>(p);
  }
  const index_t B = std::max<index_t>(1, host_attention_tuning.query_block);
  const index_t n_blocks = (p.n_tok + B - 1) / B, jobs = n_blocks * p.n_head;
  const index_t per_thread = attention_scratch(std::min(B, p.n_tok), p.n_tok, p.head_dim);
  // Allocated before the parallel region so no exception can start inside it.
  Tensor<T, Host> scratch(Shape{static_cast<index_t>(max_threads()), per_thread});
  [[maybe_unused]] const bool threaded = jobs > 1 && p.n_tok * p.n_tok * p.n_head * p.head_dim >= (index_t{1} << 16);
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) if (threaded)
#endif
  for (index_t job = 0; job < jobs; ++job) {
    const index_t block = n_blocks - 1 - job / p.n_head, h = job % p.n_head;
    const index_t t0 = block * B, t1 = std::min(p.n_tok, t0 + B);
    attention_block<Mode>(p, h, t0, t1, scratch.data() + thread_id() * per_thread);
  }
}

}  // namespace detail::cpu

template <>
struct OpsBackend<Host> {
  /// out (T, d) = wte[tokens] (+ wpe[0..T)). All ids are checked before anything is written.
  template <class T>
  static void embedding(TensorView<T, Host> out, std::span<const std::int32_t> tokens, TensorView<const T, Host> wte,
                        TensorView<const T, Host> wpe) {
    using namespace detail::cpu;
    const index_t n_tok = static_cast<index_t>(tokens.size());
    if (n_tok == 0) detail::fail<InputError>("embedding: the segment is empty; pass at least one token");
    if (wte.rank() != 2 || wte.dim(0) == 0 || wte.dim(1) == 0) {
      detail::fail<ShapeError>("embedding: wte: expected a non-empty (V, d) tensor, got shape ", wte.shape().str());
    }
    const index_t V = wte.dim(0), d = wte.dim(1);
    const bool positions = !absent(wpe);
    if (positions) {
      if (wpe.rank() != 2 || wpe.dim(1) != d) {
        detail::fail<ShapeError>("embedding: wpe: expected shape (P, ", d, ") to match wte's width, got ", wpe.shape().str());
      }
      if (n_tok > wpe.dim(0)) {
        detail::fail<InputError>("embedding: the segment has ", n_tok, " tokens but the model has only ", wpe.dim(0),
                                 " positions (wpe rows); split the input into segments of at most ", wpe.dim(0),
                                 " tokens");
      }
    }
    if (rows_of(out, d, "embedding", "out") != n_tok) {
      detail::fail<ShapeError>("embedding: out: expected shape ", Shape{n_tok, d}.str(), " for ", n_tok,
                               " tokens, got ", out.shape().str());
    }
    for (index_t t = 0; t < n_tok; ++t) {
      const std::int32_t id = tokens[static_cast<std::size_t>(t)];
      if (id < 0 || id >= V) {
        detail::fail<InputError>("embedding: token id ", id, " at position ", t, " is outside the vocabulary [0, ", V,
                                 ")");
      }
    }
    for (index_t t = 0; t < n_tok; ++t) {
      const T* e = wte.data() + static_cast<index_t>(tokens[static_cast<std::size_t>(t)]) * d;
      T* y = out.data() + t * d;
      if (positions) {
        const T* pe = wpe.data() + t * d;
        for (index_t c = 0; c < d; ++c) y[c] = e[c] + pe[c];
      } else {
        std::copy(e, e + d, y);
      }
    }
  }

  /// Per row of C = weight.numel() features, statistics in double (two passes).
  /// An absent bias means zero bias. out may be in (in place).
  template <class T>
  static void layer_norm(TensorView<T, Host> out, TensorView<const T, Host> in, TensorView<const T, Host> weight,
                         TensorView<const T, Host> bias, double eps) {
    using namespace detail::cpu;
    if (weight.rank() != 1 || weight.dim(0) == 0) {
      detail::fail<ShapeError>("layer_norm: weight: expected a non-empty (C) vector, got shape ", weight.shape().str());
    }
    const index_t C = weight.dim(0);
    const bool has_bias = !absent(bias);
    if (has_bias) expect_shape(bias, Shape{C}, "layer_norm: bias (C, like weight)");
    if (!(eps >= 0) || !std::isfinite(eps)) {
      detail::fail<InputError>("layer_norm: eps must be a finite number >= 0, got ", eps);
    }
    const index_t N = rows_of(in, C, "layer_norm", "in");
    if (rows_of(out, C, "layer_norm", "out") != N) {
      detail::fail<ShapeError>("layer_norm: out has shape ", out.shape().str(), ", expected ", N, " rows of ", C,
                               " like in ", in.shape().str());
    }
    if (in.data() != out.data()) expect_separate(out, in, "layer_norm", "in (only exact in-place use is allowed)");
    parallel_for(N, 4 * C, [&](index_t n) {
      const T* x = in.data() + n * C;
      T* y = out.data() + n * C;
      double mean = 0;
      for (index_t c = 0; c < C; ++c) mean += static_cast<double>(x[c]);
      mean /= static_cast<double>(C);
      double var = 0;
      for (index_t c = 0; c < C; ++c) {
        const double dx = static_cast<double>(x[c]) - mean;
        var += dx * dx;
      }
      const double inv = 1.0 / std::sqrt(var / static_cast<double>(C) + eps);
      for (index_t c = 0; c < C; ++c) {
        const double b = has_bias ? static_cast<double>(bias.data()[c]) : 0.0;
        y[c] = static_cast<T>((static_cast<double>(x[c]) - mean) * inv * static_cast<double>(weight.data()[c]) + b);
      }
    });
  }

  /// out (N, O) [+]= in (N, I) weight (O, I)^T + bias (O); one Eigen GEMM.
  template <class T>
  static void linear(TensorView<T, Host> out, TensorView<const T, Host> in, TensorView<const T, Host> weight,
                     TensorView<const T, Host> bias, Accumulate acc) {
    using namespace detail::cpu;
    if (weight.rank() != 2 || weight.dim(0) == 0 || weight.dim(1) == 0) {
      detail::fail<ShapeError>("linear: weight: expected a non-empty (O, I) matrix in PyTorch layout, got shape ",
                               weight.shape().str());
    }
    const index_t O = weight.dim(0), I = weight.dim(1);
    const bool has_bias = !absent(bias);
    if (has_bias) expect_shape(bias, Shape{O}, "linear: bias (O, the rows of weight)");
    const index_t N = rows_of(in, I, "linear", "in");
    if (rows_of(out, O, "linear", "out") != N) {
      detail::fail<ShapeError>("linear: out has shape ", out.shape().str(), ", expected ", Shape{N, O}.str(), " for ",
                               N, " input rows and ", O, " output features");
    }
    expect_separate(out, in, "linear", "in");
    expect_separate(out, weight, "linear", "weight");
    if (has_bias) expect_separate(out, bias, "linear", "bias");
    if (N == 0) return;
    ConstMatrixMap<T> X(in.data(), N, I, Eigen::OuterStride<>(I));       // (N, I)
    ConstMatrixMap<T> W(weight.data(), O, I, Eigen::OuterStride<>(I));   // (O, I)
    MatrixMap<T> Y(out.data(), N, O, Eigen::OuterStride<>(O));           // (N, O)
    if (acc == Accumulate::Yes) {
      Y.noalias() += X * W.transpose();
    } else {
      Y.noalias() = X * W.transpose();
    }
    if (has_bias) Y.rowwise() += Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(bias.data(), O);
  }

  /// x = gelu(x) in place.
  template <class T>
  static void gelu(TensorView<T, Host> x, Activation kind) {
    using namespace detail::cpu;
    if (kind != Activation::GeluTanh && kind != Activation::GeluErf) {
      detail::fail<InputError>("gelu: unknown activation kind ", static_cast<int>(kind));
    }
    const index_t n = x.numel();
    if (absent(x)) return;
    constexpr index_t grain = 4096;
    parallel_for((n + grain - 1) / grain, grain * 16, [&](index_t b) {
      T* p = x.data();
      const index_t end = std::min(n, (b + 1) * grain);
      if (kind == Activation::GeluTanh) {
        const T c = static_cast<T>(0.79788456080286535588);  // sqrt(2/pi)
        for (index_t i = b * grain; i < end; ++i) {
          const T v = p[i];
          p[i] = T(0.5) * v * (T(1) + std::tanh(c * (v + T(0.044715) * v * v * v)));
        }
      } else {
        const T r = static_cast<T>(0.70710678118654752440);  // 1/sqrt(2)
        for (index_t i = b * grain; i < end; ++i) {
          const T v = p[i];
          p[i] = T(0.5) * v * (T(1) + std::erf(v * r));
        }
      }
    });
  }

  /// out += in.
  template <class T>
  static void add(TensorView<T, Host> out, TensorView<const T, Host> in) {
    detail::cpu::expect_same_elements(out, in, "add", "in");
    if (detail::cpu::absent(out)) return;
    T* y = out.data();
    const T* x = in.data();
    for (index_t i = 0; i < out.numel(); ++i) y[i] += x[i];
  }

  /// out += a - b.
  template <class T>
  static void add_difference(TensorView<T, Host> out, TensorView<const T, Host> a, TensorView<const T, Host> b) {
    detail::cpu::expect_same_elements(out, a, "add_difference", "a");
    detail::cpu::expect_same_elements(out, b, "add_difference", "b");
    if (detail::cpu::absent(out)) return;
    T* y = out.data();
    const T* pa = a.data();
    const T* pb = b.data();
    for (index_t i = 0; i < out.numel(); ++i) y[i] += pa[i] - pb[i];
  }

  /// out (T, H, dh) = causal softmax(q k^T / sqrt(dh) [+ alibi]) v per head.
  template <class T>
  static void causal_attention(TensorView<T, Host> out, TensorView<const T, Host> q, TensorView<const T, Host> k,
                               TensorView<const T, Host> v, PositionScheme positions) {
    auto p = attention_problem<T>("causal_attention", out, q, k, v, {}, {}, {}, false);
    run_attention<detail::cpu::AttentionMode::Causal>(p, positions);
  }

  /// Memory-augmented attention; see fusion.hpp. mem_k/mem_v may be (T, H, 0, dh) or absent (K = 0),
  /// then the result is exactly causal_attention. The gate (H) is required for GatedFusion with
  /// K > 0 and ignored otherwise.
  template <class Fusion, class T>
  static void memory_attention(TensorView<T, Host> out, TensorView<const T, Host> q, TensorView<const T, Host> k,
                               TensorView<const T, Host> v, TensorView<const T, Host> mem_k,
                               TensorView<const T, Host> mem_v, TensorView<const T, Host> gate,
                               PositionScheme positions) {
    static_assert(longmem::Fusion<Fusion>, "memory_attention: Fusion must be longmem::GatedFusion or longmem::JointFusion");
    constexpr bool gated = std::is_same_v<Fusion, GatedFusion>;
    auto p = attention_problem<T>("memory_attention", out, q, k, v, mem_k, mem_v, gate, gated);
    using detail::cpu::AttentionMode;
    if (p.n_mem == 0) {
      run_attention<AttentionMode::Causal>(p, positions);
      return;
    }
    if constexpr (gated) {
      const index_t H = p.n_head;
      Tensor<T, Host> weights(Shape{2, H});  // (2, H): 1 - sigmoid(g), sigmoid(g)
      for (index_t h = 0; h < H; ++h) {
        const double g = static_cast<double>(gate.data()[h]);
        weights(0, h) = static_cast<T>(1.0 / (1.0 + std::exp(g)));   // sigmoid(-g): exact at both ends
        weights(1, h) = static_cast<T>(1.0 / (1.0 + std::exp(-g)));  // sigmoid(g)
      }
      p.gate_local = weights.data();
      p.gate_memory = weights.data() + H;
      run_attention<AttentionMode::Gated>(p, positions);
    } else {
      run_attention<AttentionMode::Joint>(p, positions);
    }
  }

  /// Sum and count of -log softmax(logits)[target] over targets != -1, computed in double per row.
  template <class T>
  static std::pair<double, std::int64_t> cross_entropy(TensorView<const T, Host> logits,
                                                       std::span<const std::int32_t> targets,
                                                       TensorView<float, Host> losses) {
    using namespace detail::cpu;
    const index_t n_tok = static_cast<index_t>(targets.size());
    if (logits.rank() != 2 || logits.dim(0) != n_tok || logits.dim(1) == 0) {
      detail::fail<ShapeError>("cross_entropy: logits: expected shape (", n_tok, ", V) for ", n_tok,
                               " targets with V > 0, got ", logits.shape().str());
    }
    const index_t V = logits.dim(1);
    const bool write_losses = !absent(losses);
    if (write_losses) expect_shape(losses, Shape{n_tok}, "cross_entropy: losses (one per target)");
    for (index_t t = 0; t < n_tok; ++t) {
      const std::int32_t y = targets[static_cast<std::size_t>(t)];
      if (y != -1 && (y < 0 || y >= V)) {
        detail::fail<InputError>("cross_entropy: target ", y, " at position ", t, " is outside the vocabulary [0, ", V,
                                 "); use -1 to ignore a position");
      }
    }
    std::vector<double> row_loss(static_cast<std::size_t>(n_tok), 0.0);
    parallel_for(n_tok, 4 * V, [&](index_t t) {
      const std::int32_t y = targets[static_cast<std::size_t>(t)];
      if (y == -1) return;
      const auto x = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(logits.data() + t * V, V).template cast<double>();
      const double mx = x.maxCoeff();
      const double log_z = std::log((x - mx).exp().sum());
      row_loss[static_cast<std::size_t>(t)] = log_z - (static_cast<double>(logits.data()[t * V + y]) - mx);
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

 private:
  /// Validates the attention arguments and gathers them; K = 0 when memory is absent.
  template <class T>
  static detail::cpu::AttentionProblem<T> attention_problem(const char* op, TensorView<T, Host> out,
                                                            TensorView<const T, Host> q, TensorView<const T, Host> k,
                                                            TensorView<const T, Host> v, TensorView<const T, Host> mem_k,
                                                            TensorView<const T, Host> mem_v,
                                                            TensorView<const T, Host> gate, bool gate_needed) {
    using namespace detail::cpu;
    if (q.rank() != 3) detail::fail<ShapeError>(op, ": q: expected shape (T, H, dh), got ", q.shape().str());
    const index_t n_tok = q.dim(0), H = q.dim(1), dh = q.dim(2);
    const std::string like_q = std::string(op) + ": ";
    expect_shape(k, q.shape(), (like_q + "k (T, H, dh), like q").c_str());
    expect_shape(v, q.shape(), (like_q + "v (T, H, dh), like q").c_str());
    if (!(out.shape() == q.shape()) && !(out.shape() == Shape{n_tok, H * dh})) {
      detail::fail<ShapeError>(op, ": out: expected shape ", q.shape().str(), " or ", Shape{n_tok, H * dh}.str(),
                               " like q, got ", out.shape().str());
    }
    index_t K = 0;
    const bool no_memory = (mem_k.rank() == 0 && mem_k.data() == nullptr) && (mem_v.rank() == 0 && mem_v.data() == nullptr);
    if (!no_memory) {
      if (mem_k.rank() != 4 || mem_k.dim(0) != n_tok || mem_k.dim(1) != H || mem_k.dim(3) != dh) {
        detail::fail<ShapeError>(op, ": mem_k: expected shape (", n_tok, ", ", H, ", K, ", dh,
                                 ") = (T, H, K, dh) for q of shape ", q.shape().str(), ", got ", mem_k.shape().str());
      }
      K = mem_k.dim(2);
      expect_shape(mem_v, mem_k.shape(), (like_q + "mem_v (T, H, K, dh), like mem_k").c_str());
    }
    if (gate_needed && K > 0) {
      expect_shape(gate, Shape{H}, (like_q + "gate (H), one logit per head").c_str());
    } else if (!absent(gate) && !(gate.shape() == Shape{H})) {
      detail::fail<ShapeError>(op, ": gate: expected shape (", H, ") or an empty view, got ", gate.shape().str());
    }
    for (auto [in, name] : {std::pair{q, "q"}, std::pair{k, "k"}, std::pair{v, "v"}, std::pair{mem_k, "mem_k"},
                            std::pair{mem_v, "mem_v"}, std::pair{gate, "gate"}}) {
      expect_separate(out, in, op, name);
    }
    AttentionProblem<T> p{q.data(), k.data(), v.data(), out.data()};
    p.mem_k = mem_k.data();
    p.mem_v = mem_v.data();
    p.n_tok = n_tok;
    p.n_head = H;
    p.head_dim = dh;
    p.n_mem = K;
    return p;
  }

  template <detail::cpu::AttentionMode Mode, class T>
  static void run_attention(detail::cpu::AttentionProblem<T> p, PositionScheme positions) {
    if (p.n_tok == 0 || p.n_head == 0 || p.head_dim == 0) return;
    Tensor<T, Host> alibi;  // (H, T)
    if (positions == PositionScheme::Alibi) {
      alibi.resize(Shape{p.n_head, p.n_tok});
      for (index_t h = 0; h < p.n_head; ++h) {
        const double slope = detail::alibi_slope(static_cast<int>(h), static_cast<int>(p.n_head));
        for (index_t j = 0; j < p.n_tok; ++j) alibi(h, j) = static_cast<T>(slope * static_cast<double>(j - (p.n_tok - 1)));
      }
      p.alibi = alibi.data();
    }
    detail::cpu::attention<Mode>(p);
  }
};

}  // namespace longmem
