#pragma once
// Host attention: causal and memory-augmented, forward and backward (T tokens, H heads, dh head
// dim, K retrieved tokens; rows of q/k/v/out are (T, H, dh) with stride H*dh).
//
// Forward dispatch (attention<Mode>):
//   causal_attention                        local causal softmax only
//   memory_attention<F> with K = 0          exactly the causal path (no gate factor)
//   memory_attention<GatedFusion>, K > 0    memory pass writes M, local pass mixes in A by the gate
//   memory_attention<JointFusion>, K > 0    memory pass writes e Vr and its softmax statistics,
//                                           local pass merges them into one softmax
//
// Backward (attention_backward<Mode>), with P the local probabilities as they enter the output:
//   1. memory (K > 0): recompute M and the memory log-normaliser
//   2. local, one pass over query blocks per (head, group of blocks), each block's scores once:
//      Z (log-normaliser of P), G (gradient reaching the local output: d_out, or (1 - sigmoid g)
//      d_out when gated) and D = G . (sum_s P_ts v_s) = sum_s P_ts (G . v_s) (joint: d_out . out),
//      taken from the same G v^T as dS so that dS sums to zero over each row in any precision;
//      dS = P (G v^T - D);  d_q = scale dS k;  d_k += scale dS^T q;  d_v += P^T G
//   3. memory branch (K > 0): dr_j = p_j (G_m . Vr_j - D_m);  d_q += scale sum_j dr_j Kr_j
//   4. gate (gated): d_g += sigmoid'(g) sum_t d_out . (M - A)
//   Each output element is written by one job, or (d_k, d_v with more threads than heads) summed
//   from per-group buffers in a fixed order: a run is reproducible for a given thread count.
#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "longmem/cpu/ops/common.hpp"
#include "longmem/cpu/ops/gemm.hpp"
#include "longmem/detail/alibi.hpp"
#include "longmem/fusion.hpp"
#include "longmem/model_config.hpp"

namespace longmem {

/// Tuning of the host attention kernel: queries per block (one GEMM of the block against the
/// keys up to its last query, so the wasted upper triangle is at most block²/2 scores).
struct HostAttentionTuning {
  index_t query_block = 64;
  friend constexpr bool operator==(const HostAttentionTuning&, const HostAttentionTuning&) = default;
};
inline constexpr HostAttentionTuning host_attention_tuning{};

namespace detail::cpu {

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

  MatrixMap<T> Ob(block_out, nb, dh, Eigen::OuterStride<>(dh));

  // S = Q K^T (keys beyond each row's query are masked below); gemm(): oneDNN where built with it.
  gemm<T>(false, true, nb, nk, dh, p.q + t0 * ld + h * dh, ld, p.k + h * dh, ld, T(0), scores, nk);

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

  gemm<T>(false, false, nb, dh, nk, scores, nk, p.v + h * dh, ld, T(0), block_out, dh);  // Ob = S V

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

// ---------------------------------------------------------------------------------------------
// Argument checks and dispatch helpers

/// Validates the attention arguments and gathers them; K = 0 when memory is absent.
template <class T>
AttentionProblem<T> attention_problem(const char* op, TensorView<T, Host> out, TensorView<const T, Host> q,
                                      TensorView<const T, Host> k, TensorView<const T, Host> v,
                                      TensorView<const T, Host> mem_k, TensorView<const T, Host> mem_v,
                                      TensorView<const T, Host> gate, bool gate_needed, const char* out_name = "out") {
  if (q.rank() != 3) fail<ShapeError>(op, ": q: expected shape (T, H, dh), got ", q.shape().str());
  const index_t n_tok = q.dim(0), H = q.dim(1), dh = q.dim(2);
  const std::string like_q = std::string(op) + ": ";
  expect_shape(k, q.shape(), (like_q + "k (T, H, dh), like q").c_str());
  expect_shape(v, q.shape(), (like_q + "v (T, H, dh), like q").c_str());
  if (!(out.shape() == q.shape()) && !(out.shape() == Shape{n_tok, H * dh})) {
    fail<ShapeError>(op, ": ", out_name, ": expected shape ", q.shape().str(), " or ", Shape{n_tok, H * dh}.str(),
                     " like q, got ", out.shape().str());
  }
  index_t K = 0;
  const bool no_memory = (mem_k.rank() == 0 && mem_k.data() == nullptr) && (mem_v.rank() == 0 && mem_v.data() == nullptr);
  if (!no_memory) {
    if (mem_k.rank() != 4 || mem_k.dim(0) != n_tok || mem_k.dim(1) != H || mem_k.dim(3) != dh) {
      fail<ShapeError>(op, ": mem_k: expected shape (", n_tok, ", ", H, ", K, ", dh, ") = (T, H, K, dh) for q of shape ",
                       q.shape().str(), ", got ", mem_k.shape().str());
    }
    K = mem_k.dim(2);
    expect_shape(mem_v, mem_k.shape(), (like_q + "mem_v (T, H, K, dh), like mem_k").c_str());
  }
  if (gate_needed && K > 0) {
    expect_shape(gate, Shape{H}, (like_q + "gate (H), one logit per head").c_str());
  } else if (!absent(gate) && !(gate.shape() == Shape{H})) {
    fail<ShapeError>(op, ": gate: expected shape (", H, ") or an empty view, got ", gate.shape().str());
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

/// The (H, T) ALiBi ramp slope_h * (j - (T-1)) into `storage`, or nothing for learned positions.
template <class T>
const T* alibi_ramp(PositionScheme positions, index_t H, index_t n_tok, Tensor<T, Host>& storage) {
  if (positions != PositionScheme::Alibi) return nullptr;
  storage.resize(Shape{H, n_tok});
  for (index_t h = 0; h < H; ++h) {
    const double slope = alibi_slope(static_cast<int>(h), static_cast<int>(H));
    for (index_t j = 0; j < n_tok; ++j) storage(h, j) = static_cast<T>(slope * static_cast<double>(j - (n_tok - 1)));
  }
  return storage.data();
}

/// (2, H) gate weights: row 0 = 1 - sigmoid(g) (as sigmoid(-g), exact at both ends), row 1 = sigmoid(g).
template <class T>
void gate_weights(TensorView<const T, Host> gate, Tensor<T, Host>& weights) {
  const index_t H = gate.numel();
  weights.resize(Shape{2, H});
  for (index_t h = 0; h < H; ++h) {
    const double g = static_cast<double>(gate.data()[h]);
    weights(0, h) = static_cast<T>(1.0 / (1.0 + std::exp(g)));
    weights(1, h) = static_cast<T>(1.0 / (1.0 + std::exp(-g)));
  }
}

template <AttentionMode Mode, class T>
void run_attention(AttentionProblem<T> p, PositionScheme positions) {
  if (p.n_tok == 0 || p.n_head == 0 || p.head_dim == 0) return;
  Tensor<T, Host> alibi;  // (H, T)
  p.alibi = alibi_ramp(positions, p.n_head, p.n_tok, alibi);
  attention<Mode>(p);
}

/// out (T, H, dh) = causal softmax(q k^T / sqrt(dh) [+ alibi]) v per head.
template <class T>
void causal_attention(TensorView<T, Host> out, TensorView<const T, Host> q, TensorView<const T, Host> k,
                      TensorView<const T, Host> v, PositionScheme positions) {
  auto p = attention_problem<T>("causal_attention", out, q, k, v, {}, {}, {}, false);
  run_attention<AttentionMode::Causal>(p, positions);
}

/// Memory-augmented attention; see fusion.hpp. mem_k/mem_v may be (T, H, 0, dh) or absent (K = 0),
/// then the result is exactly causal_attention. The gate (H) is required for GatedFusion with
/// K > 0 and ignored otherwise.
template <class Fusion, class T>
void memory_attention(TensorView<T, Host> out, TensorView<const T, Host> q, TensorView<const T, Host> k,
                      TensorView<const T, Host> v, TensorView<const T, Host> mem_k, TensorView<const T, Host> mem_v,
                      TensorView<const T, Host> gate, PositionScheme positions) {
  static_assert(longmem::Fusion<Fusion>, "memory_attention: Fusion must be longmem::GatedFusion or longmem::JointFusion");
  constexpr bool gated = std::is_same_v<Fusion, GatedFusion>;
  auto p = attention_problem<T>("memory_attention", out, q, k, v, mem_k, mem_v, gate, gated);
  if (p.n_mem == 0) {
    run_attention<AttentionMode::Causal>(p, positions);
    return;
  }
  if constexpr (gated) {
    Tensor<T, Host> weights;  // (2, H)
    gate_weights(gate, weights);
    p.gate_local = weights.data();
    p.gate_memory = weights.data() + p.n_head;
    run_attention<AttentionMode::Gated>(p, positions);
  } else {
    run_attention<AttentionMode::Joint>(p, positions);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

/// What the backward passes share: the forward problem, the incoming gradient, the outputs and
/// the per-row statistics of step 2 (header comment).
template <class T>
struct AttentionGrad {
  AttentionProblem<T> p;  // p.out is unused
  const T* d_out = nullptr;  // (T, H, dh)
  T* d_q = nullptr;          // (T, H, dh)
  T* d_k = nullptr;          // (T, H, dh)
  T* d_v = nullptr;          // (T, H, dh)
  const T* lse_mem = nullptr;  // (T, H) log sum exp of the memory scores
  const T* mem_out = nullptr;  // (T, H, dh) M
  const T* norm = nullptr;     // (T, H) Z: P_ts = exp(score_ts - Z_t)
  const T* delta = nullptr;    // (T, H) D of the local branch
  const T* delta_mem = nullptr;  // (T, H) D of the memory branch
  const T* local_scale = nullptr;  // (H) G = local_scale_h * d_out (1 when null)
};

/// Step 1, memory: M (T, H, dh) and lse (T, H) of softmax(q Kr^T / sqrt(dh)), threaded over t.
template <class T>
void memory_forward_stats(const AttentionProblem<T>& p, T* mem_out, T* lse) {
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
      ConstMatrixMap<T> Kr(p.mem_k + th * K * dh, K, dh, Eigen::OuterStride<>(dh));  // (K, dh)
      ConstMatrixMap<T> Vr(p.mem_v + th * K * dh, K, dh, Eigen::OuterStride<>(dh));  // (K, dh)
      ConstVectorMap<T> qt(p.q + t * ld + h * dh, dh);
      r.noalias() = (Kr * qt) * scale;
      const T mx = r.maxCoeff();
      r = (r.array() - mx).exp().matrix();
      const T sum = r.sum();
      Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>> m(mem_out + t * ld + h * dh, dh);
      m.noalias() = (r.transpose() * Vr) * (T(1) / sum);
      lse[th] = mx + std::log(sum);
    }
  }
}

/// Step 3, memory branch: d_q (T, H, dh) += scale sum_j dr_j Kr_j, threaded over t.
///   gated: p_j = exp(r_j - lse_mem), G = sigmoid(g) d_out, D = delta_mem
///   joint: p_j = exp(r_j - Z),       G = d_out,            D = delta
template <AttentionMode Mode, class T>
void memory_backward(const AttentionGrad<T>& g) {
  const AttentionProblem<T>& p = g.p;
  const index_t H = p.n_head, dh = p.head_dim, K = p.n_mem, ld = H * dh;
  const T scale = T(1) / std::sqrt(T(dh));
  Tensor<T, Host> scratch(Shape{static_cast<index_t>(max_threads()), 2 * K});  // (threads, 2K): r, dr
  [[maybe_unused]] const bool threaded = p.n_tok > 1 && p.n_tok * H * K * dh >= (index_t{1} << 15);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (threaded)
#endif
  for (index_t t = 0; t < p.n_tok; ++t) {
    Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>> r(scratch.data() + thread_id() * 2 * K, K);
    Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, 1>> dr(scratch.data() + thread_id() * 2 * K + K, K);
    for (index_t h = 0; h < H; ++h) {
      const index_t th = t * H + h;
      ConstMatrixMap<T> Kr(p.mem_k + th * K * dh, K, dh, Eigen::OuterStride<>(dh));  // (K, dh)
      ConstMatrixMap<T> Vr(p.mem_v + th * K * dh, K, dh, Eigen::OuterStride<>(dh));  // (K, dh)
      ConstVectorMap<T> qt(p.q + t * ld + h * dh, dh);
      ConstVectorMap<T> go(g.d_out + t * ld + h * dh, dh);
      T z, D, gs;
      if constexpr (Mode == AttentionMode::Gated) {
        z = g.lse_mem[th];
        D = g.delta_mem[th];
        gs = p.gate_memory[h];
      } else {
        z = g.norm[th];
        D = g.delta[th];
        gs = T(1);
      }
      r.noalias() = (Kr * qt) * scale;
      dr.noalias() = (Vr * go) * gs;                                 // G . Vr_j
      dr = ((r.array() - z).exp() * (dr.array() - D)).matrix();      // p_j (G . Vr_j - D)
      Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>> dq(g.d_q + t * ld + h * dh, dh);
      dq.noalias() += (dr.transpose() * Kr) * scale;
    }
  }
}

/// Scratch elements one job of the fused local pass needs: P and dS (nb, T), and, when it
/// accumulates into its own buffers, partial d_k and d_v (T, dh) each.
inline index_t local_backward_scratch(index_t nb, index_t n_tok, index_t head_dim, bool partial) {
  const index_t n = 2 * nb * n_tok + (partial ? 2 * n_tok * head_dim : 0);
  return (n + 15) / 16 * 16;
}

/// Step 2, the local branch, in one pass over the query blocks [b0, b1) of head h
/// (block size B), each block's scores computed once (FlashAttention-2's order, with whole rows):
///   S = Q K^T over keys [0, t1), Z and P = exp(S' - Z) per row, dP = G V^T,
///   d_out . A = sum_j P dP (A = P V is never formed), D from it (and M), dS = P (dP - D)
///   d_q rows = scale dS K (overwritten; step 3 adds the memory part)
///   d_k[0, t1) += scale dS^T Q,  d_v[0, t1) += P^T G   into (dk, ldk), (dv, ldk)
/// Stores Z (norm), D (delta) and, gated, go.M - go.A (gate_terms) per (t, h) for steps 3 and 4.
template <AttentionMode Mode, class T>
void local_backward_blocks(const AttentionGrad<T>& g, index_t h, index_t b0, index_t b1, index_t B, T* dk, T* dv,
                           index_t ldk, T* norm, T* delta, T* gate_terms, T* scratch) {
  const AttentionProblem<T>& p = g.p;
  const index_t H = p.n_head, dh = p.head_dim, ld = H * dh, n_tok = p.n_tok;
  const T scale = T(1) / std::sqrt(T(dh));
  for (index_t block = b0; block < b1; ++block) {
    const index_t t0 = block * B, t1 = std::min(n_tok, t0 + B), nb = t1 - t0, nk = t1;
    T* prob = scratch;             // (nb, nk) P as it enters the output (zero above the diagonal)
    T* dprob = prob + nb * nk;     // (nb, nk) dP, then dS
    const T *q = p.q + t0 * ld + h * dh, *go_rows = g.d_out + t0 * ld + h * dh;  // (nb, dh), row stride ld
    const T *kh = p.k + h * dh, *vh = p.v + h * dh;                             // (nk, dh), row stride ld
    gemm<T>(false, true, nb, nk, dh, q, ld, kh, ld, T(0), prob, nk);  // P = Q K^T, then the softmax
    for (index_t i = 0; i < nb; ++i) {
      const index_t t = t0 + i, n = t + 1;
      RowArrayMap<T> row(prob + i * nk, n);
      if (p.alibi) {
        row = row * scale + Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>>(p.alibi + h * n_tok + (n_tok - 1 - t), n);
      } else {
        row *= scale;
      }
      const T mx = row.maxCoeff();
      row = (row - mx).exp();
      const T sum = row.sum();
      row *= T(1) / sum;  // the local softmax
      std::fill(prob + i * nk + n, prob + (i + 1) * nk, T(0));
      norm[t * H + h] = mx + std::log(sum);  // local log-normaliser for now
    }
    gemm<T>(false, true, nb, nk, dh, go_rows, ld, vh, ld, T(0), dprob, nk);    // dP = G V^T
    for (index_t i = 0; i < nb; ++i) {
      const index_t t = t0 + i, th = t * H + h, n = t + 1;
      // d_out . A = sum_j P_j dP_j, from the same dP as dS below: dS sums to zero over the row even
      // in float (go . (P V) rounds differently from P . (G V^T) when the GEMMs differ).
      const T go_a = (RowArrayMap<T>(prob + i * nk, n) * RowArrayMap<T>(dprob + i * nk, n)).sum();
      T gs = T(1), D;  // G = gs d_out reaches the local probabilities P (as they enter the output)
      if constexpr (Mode == AttentionMode::Causal) {
        D = go_a;
      } else {
        ConstVectorMap<T> go(g.d_out + t * ld + h * dh, dh), m(g.mem_out + t * ld + h * dh, dh);
        const T go_m = go.dot(m);
        if constexpr (Mode == AttentionMode::Gated) {
          gs = p.gate_local[h];
          D = gs * go_a;
          gate_terms[th] = go_m - go_a;
        } else {
          // One softmax over local and memory scores: P_joint = exp(ll - z) P_local.
          const T ll = norm[th], lm = g.lse_mem[th];
          const T z = std::max(ll, lm) + std::log1p(std::exp(-std::abs(ll - lm)));  // logaddexp
          const T wl = std::exp(ll - z);
          norm[th] = z;
          D = wl * go_a + std::exp(lm - z) * go_m;  // d_out . out
          RowArrayMap<T>(prob + i * nk, n) *= wl;
        }
      }
      delta[th] = D;
      RowArrayMap<T> prow(prob + i * nk, n), drow(dprob + i * nk, n);
      drow = prow * (drow * gs - D);  // dS
      std::fill(dprob + i * nk + n, dprob + (i + 1) * nk, T(0));
      if (gs != T(1)) prow *= gs;  // P^T G then gives d_v directly
    }
    gemm<T>(false, false, nb, dh, nk, dprob, nk, kh, ld, T(0), g.d_q + t0 * ld + h * dh, ld, scale);  // d_q = scale dS K
    gemm<T>(true, false, nk, dh, nb, dprob, nk, q, ld, T(1), dk, ldk, scale);                       // d_k += scale dS^T Q
    gemm<T>(true, false, nk, dh, nb, prob, nk, go_rows, ld, T(1), dv, ldk);                         // d_v += P^T G
  }
}

/// Steps 1-4 (header comment). d_gate (H) is accumulated when not null (gated only).
/// The local pass runs as H x G jobs: head h's query blocks split into G contiguous groups of
/// about equal cost; with G = 1 a job accumulates d_k, d_v of its head in place, otherwise into its
/// own buffers, summed in group order afterwards (G depends only on the thread count and shape,
/// so a run is reproducible for a given thread count).
template <AttentionMode Mode, class T>
void attention_backward(AttentionGrad<T> g, T* d_gate) {
  const AttentionProblem<T>& p = g.p;
  const index_t n_tok = p.n_tok, H = p.n_head, dh = p.head_dim, ld = H * dh;
  Tensor<T, Host> norm(Shape{n_tok, H}), delta(Shape{n_tok, H});
  Tensor<T, Host> lse_mem, mem_out, delta_mem, gate_terms;
  constexpr bool memory = Mode != AttentionMode::Causal;
  if constexpr (memory) {
    lse_mem.resize(Shape{n_tok, H});
    mem_out.resize(Shape{n_tok, H, dh});
    memory_forward_stats(p, mem_out.data(), lse_mem.data());
    gate_terms.resize(Shape{n_tok, H});
    g.lse_mem = lse_mem.data();
    g.mem_out = mem_out.data();
  }
  if constexpr (Mode == AttentionMode::Gated) g.local_scale = p.gate_local;
  // Step 2, the local pass.
  const index_t B = std::min<index_t>(64, std::max<index_t>(1, host_attention_tuning.query_block));
  const index_t n_blocks = (n_tok + B - 1) / B;
  [[maybe_unused]] const bool threaded = n_tok * n_tok * H * dh >= (index_t{1} << 16);
  const index_t threads = threaded ? static_cast<index_t>(max_threads()) : 1;
  const index_t groups = std::clamp<index_t>((threads + H - 1) / H, 1, n_blocks), jobs = H * groups;
  // Group boundaries: block b costs about b + 1 (its keys), so group j ends where the running cost
  // passes j / groups of the total.
  std::vector<index_t> first_block(static_cast<std::size_t>(groups + 1), n_blocks);
  first_block[0] = 0;
  for (index_t b = 0, j = 1, cost = 0; b < n_blocks && j < groups; ++b) {
    cost += b + 1;
    while (j < groups && cost * groups >= j * n_blocks * (n_blocks + 1) / 2) first_block[static_cast<std::size_t>(j++)] = b + 1;
  }
  const bool partial = groups > 1;
  const index_t nb_max = std::min(B, n_tok);
  const index_t per_thread = local_backward_scratch(nb_max, n_tok, dh, partial), part_offset = 2 * nb_max * n_tok;
  // One buffer per job when partial, else one per thread: any of the team's threads may take a job
  // (dynamic schedule), so thread_id() can exceed jobs - 1 when there are fewer jobs than threads.
  Tensor<T, Host> scratch(Shape{partial ? jobs : threads, per_thread});
  if (!partial) {
    std::fill(g.d_k, g.d_k + n_tok * ld, T(0));
    std::fill(g.d_v, g.d_v + n_tok * ld, T(0));
  }
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) if (threaded && jobs > 1)
#endif
  for (index_t job = 0; job < jobs; ++job) {
    const index_t h = job % H, grp = groups - 1 - job / H;  // the costliest groups (last blocks) first
    const index_t b0 = first_block[static_cast<std::size_t>(grp)], b1 = first_block[static_cast<std::size_t>(grp + 1)];
    T* work = scratch.data() + (partial ? job : thread_id()) * per_thread;
    T *dk = g.d_k + h * dh, *dv = g.d_v + h * dh;
    index_t ldk = ld;
    if (partial) {
      dk = work + part_offset;  // (T, dh), rows [0, t_end) used
      dv = dk + n_tok * dh;
      ldk = dh;
      std::fill(dk, dk + 2 * n_tok * dh, T(0));
    }
    if (b1 > b0) {
      local_backward_blocks<Mode>(g, h, b0, b1, B, dk, dv, ldk, norm.data(), delta.data(),
                                  memory ? gate_terms.data() : nullptr, work);
    }
  }
  if (partial) {
    parallel_for(n_tok, 2 * groups * ld, [&](index_t t) {
      for (index_t h = 0; h < H; ++h) {
        for (index_t e = 0; e < dh; ++e) {
          T sk = T(0), sv = T(0);
          for (index_t grp = 0; grp < groups; ++grp) {  // fixed order: the jobs of head h, group 0 first
            const T* part = scratch.data() + ((groups - 1 - grp) * H + h) * per_thread + part_offset;
            sk += part[t * dh + e];
            sv += part[n_tok * dh + t * dh + e];
          }
          g.d_k[t * ld + h * dh + e] = sk;
          g.d_v[t * ld + h * dh + e] = sv;
        }
      }
    });
  }
  g.norm = norm.data();
  g.delta = delta.data();
  // Step 3: the memory branch adds to d_q.
  if constexpr (memory) {
    if constexpr (Mode == AttentionMode::Gated) {
      delta_mem.resize(Shape{n_tok, H});
      parallel_for(n_tok, 2 * ld, [&](index_t t) {
        for (index_t h = 0; h < H; ++h) {
          ConstVectorMap<T> go(g.d_out + t * ld + h * dh, dh), m(mem_out.data() + t * ld + h * dh, dh);
          delta_mem.data()[t * H + h] = p.gate_memory[h] * go.dot(m);
        }
      });
      g.delta_mem = delta_mem.data();
    }
    memory_backward<Mode>(g);
  }
  // Step 4: the gate.
  if constexpr (Mode == AttentionMode::Gated) {
    if (d_gate) {
      for (index_t h = 0; h < H; ++h) {
        double s = 0;
        for (index_t t = 0; t < n_tok; ++t) s += static_cast<double>(gate_terms.data()[t * H + h]);
        const double gm = static_cast<double>(p.gate_memory[h]), gl = static_cast<double>(p.gate_local[h]);
        d_gate[h] += static_cast<T>(gm * gl * s);  // sigmoid'(g) = sigmoid(g) (1 - sigmoid(g))
      }
    }
  }
}

/// Validates the backward arguments (d_q, d_k, d_v, d_out like q) and gathers them.
template <class T>
AttentionGrad<T> attention_grad(const char* op, TensorView<T, Host> d_q, TensorView<T, Host> d_k,
                                TensorView<T, Host> d_v, TensorView<const T, Host> d_out, TensorView<const T, Host> q,
                                TensorView<const T, Host> k, TensorView<const T, Host> v,
                                TensorView<const T, Host> mem_k, TensorView<const T, Host> mem_v,
                                TensorView<const T, Host> gate, bool gate_needed) {
  AttentionGrad<T> g{attention_problem<T>(op, d_q, q, k, v, mem_k, mem_v, gate, gate_needed, "d_q")};
  const std::string pre = std::string(op) + ": ";
  for (auto [x, name] : {std::pair{TensorView<const T, Host>(d_k), "d_k"}, std::pair{TensorView<const T, Host>(d_v), "d_v"},
                         std::pair{d_out, "d_out"}}) {
    if (!(x.shape() == q.shape()) && !(x.shape() == Shape{q.dim(0), q.dim(1) * q.dim(2)})) {
      fail<ShapeError>(op, ": ", name, ": expected shape ", q.shape().str(), " like q, got ", x.shape().str());
    }
  }
  for (auto [out, oname] : {std::pair{TensorView<const T, Host>(d_q), "d_q"}, std::pair{TensorView<const T, Host>(d_k), "d_k"},
                            std::pair{TensorView<const T, Host>(d_v), "d_v"}}) {
    for (auto [in, name] : {std::pair{q, "q"}, std::pair{k, "k"}, std::pair{v, "v"}, std::pair{d_out, "d_out"},
                            std::pair{mem_k, "mem_k"}, std::pair{mem_v, "mem_v"}}) {
      if (overlaps(out, in)) fail<InputError>(op, ": ", oname, " overlaps ", name, "; gradients need separate buffers");
    }
  }
  if (overlaps(d_q, d_k) || overlaps(d_q, d_v) || overlaps(d_k, d_v)) {
    fail<InputError>(op, ": d_q, d_k and d_v must be separate buffers");
  }
  g.d_out = d_out.data();
  g.d_q = d_q.data();
  g.d_k = d_k.data();
  g.d_v = d_v.data();
  return g;
}

template <AttentionMode Mode, class T>
void run_attention_backward(AttentionGrad<T> g, PositionScheme positions, T* d_gate) {
  if (g.p.n_tok == 0 || g.p.n_head == 0 || g.p.head_dim == 0) return;
  Tensor<T, Host> alibi;  // (H, T)
  g.p.alibi = alibi_ramp(positions, g.p.n_head, g.p.n_tok, alibi);
  attention_backward<Mode>(g, d_gate);
}

template <class T>
void causal_attention_backward(TensorView<T, Host> d_q, TensorView<T, Host> d_k, TensorView<T, Host> d_v,
                               TensorView<const T, Host> d_out, TensorView<const T, Host> q,
                               TensorView<const T, Host> k, TensorView<const T, Host> v, PositionScheme positions) {
  auto g = attention_grad<T>("causal_attention_backward", d_q, d_k, d_v, d_out, q, k, v, {}, {}, {}, false);
  run_attention_backward<AttentionMode::Causal>(g, positions, static_cast<T*>(nullptr));
}

template <class Fusion, class T>
void memory_attention_backward(TensorView<T, Host> d_q, TensorView<T, Host> d_k, TensorView<T, Host> d_v,
                               TensorView<T, Host> d_gate, TensorView<const T, Host> d_out,
                               TensorView<const T, Host> q, TensorView<const T, Host> k, TensorView<const T, Host> v,
                               TensorView<const T, Host> mem_k, TensorView<const T, Host> mem_v,
                               TensorView<const T, Host> gate, PositionScheme positions) {
  static_assert(longmem::Fusion<Fusion>,
                "memory_attention_backward: Fusion must be longmem::GatedFusion or longmem::JointFusion");
  constexpr bool gated = std::is_same_v<Fusion, GatedFusion>;
  const char* op = "memory_attention_backward";
  auto g = attention_grad<T>(op, d_q, d_k, d_v, d_out, q, k, v, mem_k, mem_v, gate, gated);
  const index_t H = g.p.n_head;
  if (!absent(d_gate)) {
    expect_shape(d_gate, Shape{H}, "memory_attention_backward: d_gate (H), like gate");
    if (overlaps(d_gate, gate)) fail<InputError>(op, ": d_gate overlaps gate");
  }
  if (g.p.n_mem == 0) {
    run_attention_backward<AttentionMode::Causal>(g, positions, static_cast<T*>(nullptr));
    return;
  }
  if constexpr (gated) {
    Tensor<T, Host> weights;  // (2, H)
    gate_weights(gate, weights);
    g.p.gate_local = weights.data();
    g.p.gate_memory = weights.data() + H;
    run_attention_backward<AttentionMode::Gated>(g, positions, absent(d_gate) ? static_cast<T*>(nullptr) : d_gate.data());
  } else {
    run_attention_backward<AttentionMode::Joint>(g, positions, static_cast<T*>(nullptr));
  }
}

}  // namespace detail::cpu
}  // namespace longmem
