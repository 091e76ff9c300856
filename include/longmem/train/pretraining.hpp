#pragma once
// Training a GPT-2 / GPT-2* backbone from scratch as a language model (the "full" mode; the
// flagship demo makes its own small backbone this way). Every backbone tensor trains; the tied
// embedding wte gets the gradient of the input embedding and of the output head.
//
// forward_backward(batch), one segment per stream: backbone forward over all N rows with
// activations, logits = ln_f(h_L) wte^T, summed next-token cross-entropy, gradient back through
// every block into the gradient buffers (accumulated). No memory: segments are independent.
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "longmem/gpt2_backbone.hpp"
#include "longmem/ops.hpp"
#include "longmem/safetensors.hpp"
#include "longmem/train/adaptation.hpp"
#include "longmem/train/data.hpp"
#include "longmem/train/gpt2_backward.hpp"
#include "longmem/train/optimizer.hpp"

namespace longmem {

/// GPT-2's initialisation for training from scratch: matrices and embeddings ~ N(0, 0.02), the
/// two projections that write into the residual stream (out_proj, fc_out) ~ N(0, 0.02 / sqrt(2 L)),
/// biases 0, LayerNorm weights 1 and biases 0. Same seed, same weights.
template <ComputeType T>
Gpt2Backbone<T> initial_backbone(const BackboneConfig& cfg, std::uint64_t seed) {
  cfg.validate();
  Gpt2Parameters<T, Host> p;
  p.blocks.resize(static_cast<std::size_t>(cfg.n_layer));
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  const double std_dev = 0.02, residual_std = 0.02 / std::sqrt(2.0 * cfg.n_layer);
  visit_gpt2_tensors(cfg, p, [&](const std::string& name, Tensor<T, Host>& t, const Shape& s) {
    t.resize(s);
    const bool vector = s.rank() == 1;
    const bool is_norm = name.find("ln_") != std::string::npos;
    if (vector) {
      fill(t.view(), is_norm && name.ends_with(".weight") ? T(1) : T(0));
      return;
    }
    const bool residual = name.ends_with("attn.out_proj.weight") || name.ends_with("mlp.fc_out.weight");
    const double sd = residual ? residual_std : std_dev;
    for (T& x : t) x = static_cast<T>(sd * normal(rng));
  });
  return Gpt2Backbone<T>(cfg, std::move(p));
}

/// The from-scratch task. L = Host trains on the CPU; L = Device keeps the weights, gradients and
/// (through the Trainer's AdamW<T, Device>) the optimizer state on the GPU
/// (<longmem/cuda/ops.cuh>, float): an update crosses PCIe only for the token ids, the loss and the
/// gradient norm; checkpoints and save_model() copy the weights out. The same Trainer drives both.
template <ComputeType T = float, class L = Host>
class BackbonePretraining {
  static constexpr bool on_host = std::is_same_v<L, Host>;

 public:
  using value_type = T;
  using location = L;
  static constexpr const char* task_name = "pretraining";

  BackbonePretraining(Gpt2Backbone<T> backbone, int streams) : model_(detail::placed<L>(std::move(backbone))), streams_(streams) {
    if (streams <= 0) detail::fail<ConfigError>("BackbonePretraining: streams must be positive, got ", streams);
    grads_.blocks.resize(model_.parameters().blocks.size());
    visit_gpt2_tensors(model_.config(), grads_, [](const std::string&, Tensor<T, L>& t, const Shape& sh) {
      t.resize(sh);
      fill(t.view(), T(0));
    });
    request_.logits = true;
    request_.hidden_states = true;
    request_.memory_layer = -1;
  }
  BackbonePretraining(BackbonePretraining&&) = default;
  BackbonePretraining& operator=(BackbonePretraining&&) = delete;

  /// The weights as AdamW last left them, at location L (Gpt2Backbone::to<Host>() copies them out).
  const Gpt2Backbone<T, L>& backbone() const { return model_; }
  int streams() const { return streams_; }
  int vocab_size() const { return model_.config().vocab_size; }

  std::vector<NamedTensor<T, L>> parameters() {
    return named_tensors<T, L>([&](auto&& fn) { visit_gpt2_tensors(model_.config(), model_.parameters(), fn); });
  }
  std::vector<NamedTensor<T, L>> gradients() {
    return named_tensors<T, L>([&](auto&& fn) { visit_gpt2_tensors(model_.config(), grads_, fn); });
  }
  void zero_gradients() {
    visit_gpt2_tensors(model_.config(), grads_, [](const std::string&, Tensor<T, L>& t, const Shape&) { fill(t.view(), T(0)); });
  }
  /// The weights changed (an update, a resume): the fingerprint that SideNets record must be
  /// recomputed (wte changed); it is, lazily, when asked for.
  void parameters_changed() { model_.refresh_fingerprint(); }
  void reset_memory() {}

  LossSum forward_backward(std::span<const StreamSegment> batch) {
    if (batch.size() != static_cast<std::size_t>(streams_)) {
      detail::fail<InputError>("BackbonePretraining: got ", batch.size(), " segments for ", streams_, " streams");
    }
    detail::split_batch(batch, segments_, targets_);
    const std::span<const std::span<const std::int32_t>> segs(segments_);
    model_.forward(segs, request_, out_, &acts_);
    const auto [sum, count] = ops::cross_entropy(cview(out_.logits), targets_, TensorView<float, L>{});
    ops::cross_entropy_backward(out_.logits.view(), cview(out_.logits), targets_, 1.0);  // in place
    gpt2_backward(model_, segs, out_, acts_, cview(out_.logits), grads_, scratch_);
    return {sum, count};
  }

  /// Loss of one document, segment by segment (segments are independent: no memory).
  LossSum evaluate(std::span<const std::int32_t> tokens, int segment_length, std::span<const std::uint8_t> scored = {},
                   std::vector<float>* token_losses = nullptr) {
    if (segment_length <= 0) detail::fail<ConfigError>("evaluate: the segment length must be positive");
    LossSum total;
    BackboneRequest req = request_;
    for (std::size_t begin = 0; begin < tokens.size(); begin += static_cast<std::size_t>(segment_length)) {
      const std::size_t len = std::min<std::size_t>(static_cast<std::size_t>(segment_length), tokens.size() - begin);
      detail::next_token_targets(tokens, scored, begin, len, targets_);
      model_.forward(tokens.subspan(begin, len), req, out_);
      losses_.resize({static_cast<index_t>(len)});
      total += detail::loss_with_tokens(cview(out_.logits), targets_, losses_, token_losses, staged_logits_);
    }
    return total;
  }

  void save_model(const std::filesystem::path& path) const {
    if constexpr (on_host) {
      model_.save(path);
    } else {
      model_.template to<Host>().save(path);
    }
  }

  /// The gradient buffers, times `scale`, under the backbone file's names and layout (Hugging
  /// Face Conv1D layout for GPT-2, as save() writes weights).
  void save_gradients(const std::filesystem::path& path, double scale) const {
    Gpt2Parameters<T, Host> scaled;
    scaled.blocks.resize(model_.parameters().blocks.size());
    auto dst = named_tensors<T, Host>([&](auto&& fn) { visit_gpt2_tensors(model_.config(), scaled, fn); });
    std::size_t i = 0;
    visit_gpt2_tensors(model_.config(), grads_, [&](const std::string&, const Tensor<T, L>& g, const Shape&) {
      Tensor<T, Host>& s = *dst[i++].tensor;
      s.resize(g.shape());
      copy(cview(g), s.view());
      for (index_t j = 0; j < s.numel(); ++j) s.data()[j] = static_cast<T>(s.data()[j] * scale);
    });
    Gpt2Backbone<T>(model_.config(), std::move(scaled)).save(path);
  }

  std::map<std::string, std::string> model_metadata() const {
    std::map<std::string, std::string> md;
    backbone_config_to_metadata(model_.config(), md);
    return md;
  }
  void save_state(SafetensorsWriter&) const {}
  void load_state(const SafetensorsFile&) {}

 private:
  Gpt2Backbone<T, L> model_;  // the weights AdamW updates and save_model writes
  int streams_;
  Gpt2Parameters<T, L> grads_;  // where the backward accumulates
  BackboneRequest request_;
  BackboneOutput<T, L> out_;
  Gpt2Activations<T, L> acts_;
  Gpt2GradScratch<T, L> scratch_;
  Tensor<float, Host> losses_;
  Tensor<T, Host> staged_logits_;
  std::vector<std::span<const std::int32_t>> segments_;
  std::vector<std::int32_t> targets_;
};

}  // namespace longmem
