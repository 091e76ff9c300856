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

template <ComputeType T = float>
class BackbonePretraining {
 public:
  using value_type = T;
  static constexpr const char* task_name = "pretraining";

  BackbonePretraining(Gpt2Backbone<T> backbone, int streams) : backbone_(std::move(backbone)), streams_(streams) {
    if (streams <= 0) detail::fail<ConfigError>("BackbonePretraining: streams must be positive, got ", streams);
    grads_ = zero_gpt2_parameters<T>(backbone_.config());
    request_.logits = true;
    request_.hidden_states = true;
    request_.memory_layer = -1;
  }

  const Gpt2Backbone<T>& backbone() const { return backbone_; }
  int streams() const { return streams_; }
  int vocab_size() const { return backbone_.config().vocab_size; }

  std::vector<NamedTensor<T, Host>> parameters() {
    return named_tensors<T, Host>([&](auto&& fn) { visit_gpt2_tensors(backbone_.config(), backbone_.parameters(), fn); });
  }
  std::vector<NamedTensor<T, Host>> gradients() {
    return named_tensors<T, Host>([&](auto&& fn) { visit_gpt2_tensors(backbone_.config(), grads_, fn); });
  }
  void zero_gradients() {
    for (auto& g : gradients()) fill(g.tensor->view(), T(0));
  }
  /// wte changed: the fingerprint that SideNets record must be recomputed.
  void parameters_changed() { backbone_.refresh_fingerprint(); }
  void reset_memory() {}

  LossSum forward_backward(std::span<const StreamSegment> batch) {
    if (batch.size() != static_cast<std::size_t>(streams_)) {
      detail::fail<InputError>("BackbonePretraining: got ", batch.size(), " segments for ", streams_, " streams");
    }
    detail::split_batch(batch, segments_, targets_);
    const std::span<const std::span<const std::int32_t>> segs(segments_);
    backbone_.forward(segs, request_, out_, &acts_);
    const auto [sum, count] = ops::cross_entropy(cview(out_.logits), targets_, TensorView<float, Host>{});
    ops::cross_entropy_backward(out_.logits.view(), cview(out_.logits), targets_, 1.0);  // in place
    gpt2_backward(backbone_, segs, out_, acts_, cview(out_.logits), grads_, scratch_);
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
      backbone_.forward(tokens.subspan(begin, len), req, out_);
      losses_.resize({static_cast<index_t>(len)});
      total += detail::loss_with_tokens(cview(out_.logits), targets_, losses_, token_losses);
    }
    return total;
  }

  void save_model(const std::filesystem::path& path) const { backbone_.save(path); }

  /// The gradient buffers, times `scale`, under the backbone file's names and layout (Hugging
  /// Face Conv1D layout for GPT-2, as save() writes weights).
  void save_gradients(const std::filesystem::path& path, double scale) const {
    Gpt2Parameters<T, Host> scaled;
    scaled.blocks.resize(grads_.blocks.size());
    auto dst = named_tensors<T, Host>([&](auto&& fn) { visit_gpt2_tensors(backbone_.config(), scaled, fn); });
    std::size_t i = 0;
    visit_gpt2_tensors(backbone_.config(), grads_, [&](const std::string&, const Tensor<T, Host>& g, const Shape&) {
      Tensor<T, Host>& s = *dst[i++].tensor;
      s.resize(g.shape());
      for (index_t j = 0; j < g.numel(); ++j) s.data()[j] = static_cast<T>(g.data()[j] * scale);
    });
    Gpt2Backbone<T>(backbone_.config(), std::move(scaled)).save(path);
  }

  std::map<std::string, std::string> model_metadata() const {
    std::map<std::string, std::string> md;
    backbone_config_to_metadata(backbone_.config(), md);
    return md;
  }
  void save_state(SafetensorsWriter&) const {}
  void load_state(const SafetensorsFile&) {}

 private:
  Gpt2Backbone<T> backbone_;
  int streams_;
  Gpt2Parameters<T, Host> grads_;
  BackboneRequest request_;
  BackboneOutput<T, Host> out_;
  Gpt2Activations<T, Host> acts_;
  Gpt2GradScratch<T, Host> scratch_;
  Tensor<float, Host> losses_;
  std::vector<std::span<const std::int32_t>> segments_;
  std::vector<std::int32_t> targets_;
};

}  // namespace longmem
