#pragma once
// AdamW, the learning-rate schedule and global gradient-norm clipping, over a flat list of
// named parameter tensors (the visitors of side_net.hpp and gpt2_backbone.hpp give the names).
//
//   AdamW (decoupled weight decay, as PyTorch's torch.optim.AdamW and fairseq's Adam, which the
//   reference recipe uses), step t = 1, 2, ...:
//     m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
//     p -= lr wd p;            p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
//   Defaults are the reference recipe's: lr 2e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.01,
//   applied to every tensor (fairseq decays all parameters; `decay_vectors = false` exempts
//   biases, LayerNorms and gates).
//   Schedule: linear warm-up from 0 over `warmup` steps, then constant, linear/polynomial
//   decay to `end_lr` at `total` steps (fairseq's polynomial_decay), or cosine decay.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "longmem/error.hpp"
#include "longmem/tensor.hpp"

namespace longmem {

/// One trainable tensor and its checkpoint name.
template <class T, class L = Host>
struct NamedTensor {
  std::string name;
  Tensor<T, L>* tensor = nullptr;
};

/// The tensors of a parameter structure in visitor order, as (name, pointer) pairs.
template <class T, class L, class Visit>
std::vector<NamedTensor<T, L>> named_tensors(Visit&& visit) {
  std::vector<NamedTensor<T, L>> out;
  visit([&](const std::string& name, Tensor<T, L>& t, const Shape&) { out.push_back({name, &t}); });
  return out;
}

struct AdamWConfig {
  double lr = 2e-4;
  double beta1 = 0.9;
  double beta2 = 0.98;
  double eps = 1e-6;
  double weight_decay = 0.01;
  bool decay_vectors = true;  ///< also decay 1-D tensors (biases, LayerNorms, gates), as fairseq does

  void validate() const {
    auto bad = [](const char* what, double v, const char* range) {
      detail::fail<ConfigError>("optimizer: ", what, " must be ", range, ", got ", v);
    };
    if (!(lr > 0) || !std::isfinite(lr)) bad("the learning rate", lr, "a positive finite number");
    if (!(beta1 >= 0 && beta1 < 1)) bad("beta1", beta1, "in [0, 1)");
    if (!(beta2 >= 0 && beta2 < 1)) bad("beta2", beta2, "in [0, 1)");
    if (!(eps > 0) || !std::isfinite(eps)) bad("eps", eps, "a positive finite number");
    if (!(weight_decay >= 0) || !std::isfinite(weight_decay)) bad("weight_decay", weight_decay, "a finite number >= 0");
  }
};

enum class Decay { Constant, Polynomial, Cosine };

inline const char* to_string(Decay d) {
  return d == Decay::Constant ? "constant" : d == Decay::Polynomial ? "polynomial" : "cosine";
}

struct ScheduleConfig {
  Decay decay = Decay::Polynomial;
  std::int64_t warmup = 0;  ///< steps of linear warm-up from 0
  std::int64_t total = 0;   ///< the step at which the decay reaches end_lr
  double end_lr = 0;
  double power = 1;         ///< polynomial decay exponent (1 = linear)

  void validate() const {
    if (warmup < 0) detail::fail<ConfigError>("schedule: warm-up steps must be >= 0, got ", warmup);
    if (total <= 0) detail::fail<ConfigError>("schedule: the total number of steps must be positive, got ", total);
    if (warmup > total) {
      detail::fail<ConfigError>("schedule: ", warmup, " warm-up steps exceed the ", total, " steps of the run");
    }
    if (!(end_lr >= 0) || !std::isfinite(end_lr)) detail::fail<ConfigError>("schedule: end_lr must be >= 0, got ", end_lr);
    if (!(power > 0) || !std::isfinite(power)) detail::fail<ConfigError>("schedule: power must be positive, got ", power);
  }

  /// The learning rate of update `step` (1-based) for peak rate `lr`: lr * step / warmup during
  /// the warm-up, then the decay from lr (the first update after warm-up) towards end_lr.
  double rate(std::int64_t step, double lr) const {
    if (warmup > 0 && step <= warmup) return lr * static_cast<double>(step) / static_cast<double>(warmup);
    if (decay == Decay::Constant) return lr;
    const double span = static_cast<double>(total - warmup);
    const double progress = span > 0 ? std::clamp(static_cast<double>(step - warmup - 1) / span, 0.0, 1.0) : 1.0;
    if (decay == Decay::Polynomial) return end_lr + (lr - end_lr) * std::pow(1.0 - progress, power);
    return end_lr + (lr - end_lr) * 0.5 * (1.0 + std::cos(3.14159265358979323846 * progress));
  }
};

namespace detail {
/// Fixed blocks of every gradient tensor: (tensor, first element, end). Reductions sum each block
/// in element order and the blocks in list order, so results do not depend on the thread count.
template <class T>
std::vector<std::array<index_t, 3>> gradient_blocks(const std::vector<NamedTensor<T, Host>>& grads) {
  constexpr index_t block = index_t{1} << 15;
  std::vector<std::array<index_t, 3>> blocks;
  for (std::size_t i = 0; i < grads.size(); ++i) {
    const index_t n = grads[i].tensor->numel();
    for (index_t b = 0; b < n; b += block) blocks.push_back({static_cast<index_t>(i), b, std::min(n, b + block)});
  }
  return blocks;
}

/// f(j, data, begin, end) for every block j of gradient_blocks(grads), blocks in parallel.
template <class T, class F>
void for_each_gradient_block(const std::vector<NamedTensor<T, Host>>& grads,
                             const std::vector<std::array<index_t, 3>>& blocks, F&& f) {
  const index_t nb = static_cast<index_t>(blocks.size());
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (nb > 4)
#endif
  for (index_t j = 0; j < nb; ++j) {
    const auto [i, b, e] = blocks[static_cast<std::size_t>(j)];
    f(j, grads[static_cast<std::size_t>(i)].tensor->data(), b, e);
  }
}
}  // namespace detail

/// L2 norm of all gradients together, accumulated in double in a fixed order (blocks of 32 Ki
/// elements in parallel, their sums added in order).
template <class T>
double global_norm(const std::vector<NamedTensor<T, Host>>& grads) {
  const auto blocks = detail::gradient_blocks(grads);
  std::vector<double> partial(blocks.size());
  detail::for_each_gradient_block(grads, blocks, [&](index_t j, const T* x, index_t b, index_t e) {
    double s = 0;
    for (index_t k = b; k < e; ++k) s += static_cast<double>(x[k]) * static_cast<double>(x[k]);
    partial[static_cast<std::size_t>(j)] = s;
  });
  double s = 0;
  for (double p : partial) s += p;
  return std::sqrt(s);
}

/// Multiplies every gradient by `factor` (elementwise: threads cannot change the result).
template <class T>
void scale_gradients(const std::vector<NamedTensor<T, Host>>& grads, double factor) {
  detail::for_each_gradient_block(grads, detail::gradient_blocks(grads), [&](index_t, T* x, index_t b, index_t e) {
    for (index_t k = b; k < e; ++k) x[k] = static_cast<T>(static_cast<double>(x[k]) * factor);
  });
}

/// AdamW with its first and second moments (float for float parameters; same shapes).
template <class T>
class AdamW {
 public:
  AdamW() = default;
  AdamW(AdamWConfig config, const std::vector<NamedTensor<T, Host>>& params) : config_(config) {
    config_.validate();
    for (const auto& p : params) {
      Tensor<T, Host> m(p.tensor->shape()), v(p.tensor->shape());
      fill(m.view(), T(0));
      fill(v.view(), T(0));
      names_.push_back(p.name);
      m_.push_back(std::move(m));
      v_.push_back(std::move(v));
    }
  }

  const AdamWConfig& config() const { return config_; }
  std::int64_t steps() const { return step_; }
  const std::vector<std::string>& names() const { return names_; }
  Tensor<T, Host>& first_moment(std::size_t i) { return m_.at(i); }
  Tensor<T, Host>& second_moment(std::size_t i) { return v_.at(i); }
  const Tensor<T, Host>& first_moment(std::size_t i) const { return m_.at(i); }
  const Tensor<T, Host>& second_moment(std::size_t i) const { return v_.at(i); }
  /// Restores the step counter (checkpoints).
  void set_steps(std::int64_t s) { step_ = s; }

  /// One update of every parameter with learning rate `lr`; params and grads in the order
  /// (and shapes) the optimizer was made with.
  void step(const std::vector<NamedTensor<T, Host>>& params, const std::vector<NamedTensor<T, Host>>& grads, double lr) {
    if (params.size() != m_.size() || grads.size() != m_.size()) {
      detail::fail<ShapeError>("AdamW: made for ", m_.size(), " tensors, stepped with ", params.size(), " parameters and ",
                               grads.size(), " gradients");
    }
    ++step_;
    const double b1 = config_.beta1, b2 = config_.beta2;
    const double c1 = 1.0 - std::pow(b1, static_cast<double>(step_)), c2 = 1.0 - std::pow(b2, static_cast<double>(step_));
    for (std::size_t i = 0; i < params.size(); ++i) {
      Tensor<T, Host>& p = *params[i].tensor;
      const Tensor<T, Host>& g = *grads[i].tensor;
      if (!(p.shape() == m_[i].shape()) || !(g.shape() == p.shape())) {
        detail::fail<ShapeError>("AdamW: tensor ", names_[i], " has shape ", p.shape().str(), " (gradient ",
                                 g.shape().str(), "), the optimizer state ", m_[i].shape().str());
      }
      const double wd = (config_.decay_vectors || p.rank() > 1) ? config_.weight_decay : 0.0;
      T* pw = p.data();
      const T* gw = g.data();
      T* m = m_[i].data();
      T* v = v_[i].data();
      const index_t n = p.numel();
      // Element by element: threads cannot change the result.
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (n >= (index_t{1} << 15))
#endif
      for (index_t j = 0; j < n; ++j) {
        const double gj = static_cast<double>(gw[j]);
        const double mj = b1 * static_cast<double>(m[j]) + (1.0 - b1) * gj;
        const double vj = b2 * static_cast<double>(v[j]) + (1.0 - b2) * gj * gj;
        m[j] = static_cast<T>(mj);
        v[j] = static_cast<T>(vj);
        double x = static_cast<double>(pw[j]);
        x -= lr * wd * x;
        x -= lr * (mj / c1) / (std::sqrt(vj / c2) + config_.eps);
        pw[j] = static_cast<T>(x);
      }
    }
  }

 private:
  AdamWConfig config_;
  std::vector<std::string> names_;
  std::vector<Tensor<T, Host>> m_, v_;
  std::int64_t step_ = 0;
};

}  // namespace longmem
