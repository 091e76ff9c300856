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
//   The arithmetic is the op table's (ops::adamw_update, ops::sum_of_squares, ops::scale), so it
//   runs where the tensors are: host tensors on the CPU, device tensors on the GPU.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "longmem/error.hpp"
#include "longmem/ops.hpp"
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
/// The tensors of a list as views V (TensorView<T, L> or TensorView<const T, L>), for the op table.
template <class V, class T, class L>
std::vector<V> views_of(const std::vector<NamedTensor<T, L>>& xs) {
  std::vector<V> out;
  out.reserve(xs.size());
  for (const auto& x : xs) out.push_back(x.tensor->view());
  return out;
}
}  // namespace detail

/// L2 norm of all gradients together (ops::sum_of_squares: double, fixed blocks summed in a fixed
/// order, so the result does not depend on the thread count). On the device: one copy to the host.
template <class T, class L>
double global_norm(const std::vector<NamedTensor<T, L>>& grads) {
  const auto views = detail::views_of<TensorView<const T, L>>(grads);
  return std::sqrt(ops::sum_of_squares(std::span<const TensorView<const T, L>>(views)));
}

/// Multiplies every gradient by `factor` (elementwise: threads cannot change the result).
template <class T, class L>
void scale_gradients(const std::vector<NamedTensor<T, L>>& grads, double factor) {
  const auto views = detail::views_of<TensorView<T, L>>(grads);
  ops::scale(std::span<const TensorView<T, L>>(views), factor);
}

/// AdamW with its first and second moments (T, same shapes, at the parameters' location L:
/// ops::adamw_update runs where the weights are).
template <class T, class L = Host>
class AdamW {
 public:
  AdamW() = default;
  AdamW(AdamWConfig config, const std::vector<NamedTensor<T, L>>& params) : config_(config) {
    config_.validate();
    for (const auto& p : params) {
      Tensor<T, L> m(p.tensor->shape()), v(p.tensor->shape());
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
  Tensor<T, L>& first_moment(std::size_t i) { return m_.at(i); }
  Tensor<T, L>& second_moment(std::size_t i) { return v_.at(i); }
  const Tensor<T, L>& first_moment(std::size_t i) const { return m_.at(i); }
  const Tensor<T, L>& second_moment(std::size_t i) const { return v_.at(i); }
  /// Restores the step counter (checkpoints).
  void set_steps(std::int64_t s) { step_ = s; }

  /// One update of every parameter with learning rate `lr`; params and grads in the order
  /// (and shapes) the optimizer was made with.
  void step(const std::vector<NamedTensor<T, L>>& params, const std::vector<NamedTensor<T, L>>& grads, double lr) {
    if (params.size() != m_.size() || grads.size() != m_.size()) {
      detail::fail<ShapeError>("AdamW: made for ", m_.size(), " tensors, stepped with ", params.size(), " parameters and ",
                               grads.size(), " gradients");
    }
    for (std::size_t i = 0; i < params.size(); ++i) {
      const Tensor<T, L>& p = *params[i].tensor;
      const Tensor<T, L>& g = *grads[i].tensor;
      if (!(p.shape() == m_[i].shape()) || !(g.shape() == p.shape())) {
        detail::fail<ShapeError>("AdamW: tensor ", names_[i], " has shape ", p.shape().str(), " (gradient ",
                                 g.shape().str(), "), the optimizer state ", m_[i].shape().str());
      }
    }
    ++step_;
    ops::AdamWStep s;
    s.lr = lr;
    s.beta1 = config_.beta1;
    s.beta2 = config_.beta2;
    s.eps = config_.eps;
    s.bias1 = 1.0 - std::pow(config_.beta1, static_cast<double>(step_));
    s.bias2 = 1.0 - std::pow(config_.beta2, static_cast<double>(step_));
    for (std::size_t i = 0; i < params.size(); ++i) {
      Tensor<T, L>& p = *params[i].tensor;
      s.weight_decay = (config_.decay_vectors || p.rank() > 1) ? config_.weight_decay : 0.0;
      ops::adamw_update(p.view(), cview(*grads[i].tensor), m_[i].view(), v_[i].view(), s);
    }
  }

 private:
  AdamWConfig config_;
  std::vector<std::string> names_;
  std::vector<Tensor<T, L>> m_, v_;
  std::int64_t step_ = 0;
};

}  // namespace longmem
