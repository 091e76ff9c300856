#pragma once
// Memory-augmented adaptation (the paper's training mode) as a training task: a frozen backbone,
// one memory bank per stream, a retriever, and the SideNet whose every tensor trains.
//
// forward_backward(batch), one segment per stream (rows one after another, N in all):
//   1. a stream whose segment starts a document forgets its memory
//   2. backbone (batched, no activations): hidden states (L+1, N, d), layer-m keys/values (N, H, dh)
//   3. SideNet forward with activations; layer i* retrieves from each stream's own bank (earlier
//      segments only)
//   4. summed next-token cross-entropy; its gradient flows back through the SideNet into the
//      gradient buffers (accumulated: call it for several micro-batches, then step)
//   5. each stream appends its segment's keys/values to its bank (memory on)
// Frozen: the backbone and the tied embedding/head. Trained: every SideNet tensor (the reference
// tries to freeze the first half of its SideNet with `Module.requires_grad = False`, which only
// sets an attribute; all its SideNet layers train, and so do ours).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <filesystem>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "longmem/chunk_retriever.hpp"
#include "longmem/fusion.hpp"
#include "longmem/gpt2_backbone.hpp"
#include "longmem/memory_bank.hpp"
#include "longmem/model_config.hpp"
#include "longmem/ops.hpp"
#include "longmem/safetensors.hpp"
#include "longmem/side_net.hpp"
#include "longmem/train/data.hpp"
#include "longmem/train/optimizer.hpp"
#include "longmem/train/side_net_backward.hpp"

namespace longmem {

/// A summed loss, the number of targets in it, and how many of them the model ranked first.
struct LossSum {
  double sum = 0;
  std::int64_t count = 0;
  std::int64_t correct = 0;  // targets that are the argmax of their logits (evaluation only)

  double mean() const { return count ? sum / static_cast<double>(count) : 0.0; }
  double accuracy() const { return count ? static_cast<double>(correct) / static_cast<double>(count) : 0.0; }
  LossSum& operator+=(const LossSum& o) {
    sum += o.sum;
    count += o.count;
    correct += o.correct;
    return *this;
  }
};

/// A bank a training checkpoint can hold (HostMemoryBank has these).
template <class M>
concept PersistentBank = MemoryBank<M> && requires(const M& cm, M& m, SafetensorsWriter& w, const SafetensorsFile& f,
                                                   const std::string& prefix) {
  cm.save_state(w, prefix);
  m.load_state(f, prefix);
};

namespace detail {
/// The segments and the concatenated targets (N) of a batch.
inline void split_batch(std::span<const StreamSegment> batch, std::vector<std::span<const std::int32_t>>& segments,
                        std::vector<std::int32_t>& targets) {
  segments.clear();
  targets.clear();
  for (const auto& s : batch) {
    if (s.targets.size() != s.tokens.size()) {
      fail<InputError>("training batch: a segment has ", s.tokens.size(), " tokens but ", s.targets.size(), " targets");
    }
    segments.push_back(s.tokens);
    targets.insert(targets.end(), s.targets.begin(), s.targets.end());
  }
}

/// Targets of tokens[begin, begin + len): the next token, -1 past the end or where `scored` is 0.
inline void next_token_targets(std::span<const std::int32_t> tokens, std::span<const std::uint8_t> scored,
                               std::size_t begin, std::size_t len, std::vector<std::int32_t>& targets) {
  if (!scored.empty() && scored.size() != tokens.size()) {
    fail<InputError>("evaluate: ", tokens.size(), " tokens but a mask of ", scored.size());
  }
  targets.assign(len, -1);
  for (std::size_t i = 0; i < len; ++i) {
    const std::size_t j = begin + i + 1;
    if (j < tokens.size() && (scored.empty() || scored[j] != 0)) targets[i] = tokens[j];
  }
}

/// Cross-entropy of (T, V) logits, with the count of targets that are their row's argmax and
/// per-token losses appended to `out` (NaN where the target is -1).
template <class T>
LossSum loss_with_tokens(TensorView<const T, Host> logits, std::span<const std::int32_t> targets,
                         Tensor<float, Host>& losses, std::vector<float>* out) {
  const auto [sum, count] = ops::cross_entropy(logits, targets, losses.view());
  LossSum r{sum, count, 0};
  const index_t V = logits.dim(1);
  for (std::size_t i = 0; i < targets.size(); ++i) {
    if (targets[i] == -1) continue;
    const T* row = logits.data() + static_cast<index_t>(i) * V;
    r.correct += std::max_element(row, row + V) - row == targets[i];
  }
  if (out) {
    for (std::size_t i = 0; i < targets.size(); ++i) {
      out->push_back(targets[i] == -1 ? std::numeric_limits<float>::quiet_NaN() : losses.data()[i]);
    }
  }
  return r;
}

/// loss_with_tokens for logits at L: device logits are copied to `staging` on the host first.
template <class T, class L>
LossSum loss_with_tokens(TensorView<const T, L> logits, std::span<const std::int32_t> targets, Tensor<float, Host>& losses,
                         std::vector<float>* out, Tensor<T, Host>& staging) {
  if constexpr (std::is_same_v<L, Host>) {
    return loss_with_tokens(logits, targets, losses, out);
  } else {
    staging.resize(logits.shape());
    copy(logits, staging.view());
    return loss_with_tokens(cview(staging), targets, losses, out);
  }
}

/// A host model (Gpt2Backbone<T>, SideNet<T>) at location L: moved for the host, copied to the device.
template <class L, class M>
auto placed(M&& host) {
  if constexpr (std::is_same_v<L, Host>) {
    return std::move(host);
  } else {
    return host.template to<L>();
  }
}
}  // namespace detail

/// The adaptation task on the bank's location L
/// The adaptation task on the bank's location L: HostMemoryBank + ExactChunkRetriever train on the
/// CPU; DeviceMemoryBank<float> + FusedChunkRetriever (<longmem/cuda/...>, T = float) keep the
/// backbone, the SideNet, its gradients, activations and the banks on the GPU, and the Trainer's
/// AdamW<T, Device> keeps the moments there: an update crosses PCIe only for the token ids and
/// targets, the loss and the gradient norm.
template <PersistentBank Bank, ChunkRetriever Retriever, Fusion F = GatedFusion, ComputeType T = float>
class SideNetAdaptation {
 public:
  using location = typename Bank::location;

 private:
  using L = location;
  static constexpr bool on_host = std::is_same_v<L, Host>;
  static_assert(std::is_same_v<typename Retriever::location, L>,
                "SideNetAdaptation: the retriever must search banks where they live (ExactChunkRetriever with "
                "HostMemoryBank, FusedChunkRetriever with DeviceMemoryBank)");
  static_assert(on_host || std::is_same_v<T, float>, "SideNetAdaptation on the GPU computes in float");
  static_assert(ChunkRetrieverFor<Retriever, Bank>, "SideNetAdaptation: this ChunkRetriever cannot search this MemoryBank");

 public:
  using value_type = T;
  using fusion_type = F;
  static constexpr const char* task_name = "adaptation";

  /// Checks, as Model does, that the SideNet fits the backbone and the memory settings divide;
  /// then places both at L (a copy to the GPU for the device task).
  SideNetAdaptation(Gpt2Backbone<T> backbone, SideNet<T> side_net, MemoryConfig memory, int streams,
                    Retriever retriever = Retriever{}, bool allow_other_backbone = false)
      : backbone_(detail::placed<L>(checked(backbone, side_net, memory, streams, allow_other_backbone))),
        side_net_(detail::placed<L>(std::move(side_net))),
        memory_(memory),
        retriever_(std::move(retriever)) {
    const BackboneConfig& bc = backbone_.config();
    geometry_ = MemoryGeometry{bc.n_head, bc.head_dim(), memory_.chunk_size, memory_.capacity_chunks()};
    for (int s = 0; s < streams; ++s) banks_.emplace_back(geometry_);
    retrieved_.resize(static_cast<std::size_t>(streams));
    grads_ = zero_side_net_parameters<T, L>(side_net_.config());
    request_.logits = false;
    request_.hidden_states = true;
    request_.memory_layer = side_net_.config().memory_layer;
  }

  /// The frozen backbone and the SideNet as AdamW last left it, at location L (to<Host>() copies out).
  const Gpt2Backbone<T, L>& backbone() const { return backbone_; }
  const SideNet<T, L>& side_net() const { return side_net_; }
  SideNet<T, L>& side_net() { return side_net_; }
  const MemoryConfig& memory_config() const { return memory_; }
  int streams() const { return static_cast<int>(banks_.size()); }
  const Bank& bank(int stream) const { return banks_.at(static_cast<std::size_t>(stream)); }
  int vocab_size() const { return backbone_.config().vocab_size; }

  /// Memory off trains (and evaluates) the same SideNet without memory: the baseline.
  void set_memory_enabled(bool on) { memory_.enabled = on; }

  std::vector<NamedTensor<T, L>> parameters() {
    return named_tensors<T, L>([&](auto&& fn) { visit_side_net_tensors(side_net_.config(), side_net_.parameters(), fn); });
  }
  std::vector<NamedTensor<T, L>> gradients() {
    return named_tensors<T, L>([&](auto&& fn) { visit_side_net_tensors(side_net_.config(), grads_, fn); });
  }
  void zero_gradients() {
    for (auto& g : gradients()) fill(g.tensor->view(), T(0));
  }
  /// Called after every optimizer step (nothing to refresh: the backbone is frozen).
  void parameters_changed() {}

  /// Forgets every stream's memory.
  void reset_memory() {
    for (auto& b : banks_) b.reset();
  }

  /// One micro-batch (one segment per stream): adds the gradient of the summed loss to the
  /// gradient buffers and returns that loss. See the header comment for the steps.
  LossSum forward_backward(std::span<const StreamSegment> batch) {
    if (batch.size() != banks_.size()) {
      detail::fail<InputError>("SideNetAdaptation: got ", batch.size(), " segments for ", banks_.size(), " streams");
    }
    detail::split_batch(batch, segments_, targets_);
    for (std::size_t b = 0; b < batch.size(); ++b) {
      if (batch[b].starts_document) banks_[b].reset();
    }
    backbone_.forward(std::span<const std::span<const std::int32_t>>(segments_), request_, bout_);
    const auto& offsets = bout_.offsets;
    const index_t N = offsets.back();
    logits_.resize({N, backbone_.config().vocab_size});
    const int k = memory_.retrieved_chunks();
    // One stream at a time, or (a retriever with retrieve_stacked, every bank giving the same k')
    // every stream in one retrieval whose rows stack like the segments': the SideNet then reads
    // all streams' memory in one attention call.
    struct Retrieve {
      SideNetAdaptation& task;
      int k;
      const Retrieved<T, L>* operator()(std::size_t b, TensorView<const T, L> q) {
        if (!task.memory_.enabled || task.banks_[b].num_chunks() == 0) return nullptr;
        task.retriever_.retrieve(task.banks_[b], q, k, task.retrieved_[b]);
        return &task.retrieved_[b];
      }
      const Retrieved<T, L>* operator()(std::span<const index_t> offsets, TensorView<const T, L> q) {
        if constexpr (requires(std::vector<const Bank*> banks, Retrieved<T, L>& out) {
                        task.retriever_.retrieve_stacked(std::span<const Bank* const>(banks), q, offsets, k, out);
                      }) {
          if (!task.memory_.enabled) return nullptr;
          const std::vector<const Bank*> banks = banks_for_stacked_retrieval(std::span<const Bank>(task.banks_), k);
          if (banks.empty()) return nullptr;
          task.retriever_.retrieve_stacked(std::span<const Bank* const>(banks), q, offsets, k, task.stacked_);
          return &task.stacked_;
        } else {
          return nullptr;
        }
      }
    };
    side_net_.template forward<F>(cview(bout_.hidden), offsets, backbone_.token_embedding(), Retrieve{*this, k},
                                  logits_.view(), &acts_);
    const auto [sum, count] = ops::cross_entropy(cview(logits_), targets_, TensorView<float, L>{});
    ops::cross_entropy_backward(logits_.view(), cview(logits_), targets_, 1.0);  // d(sum)/d logits, in place
    side_net_backward<F>(side_net_, acts_, offsets, backbone_.token_embedding(), cview(logits_), grads_, scratch_);
    if (memory_.enabled) {
      for (std::size_t b = 0; b < batch.size(); ++b) {
        banks_[b].append(cview(bout_.mem_keys).slice(offsets[b], offsets[b + 1]),
                         cview(bout_.mem_values).slice(offsets[b], offsets[b + 1]));
      }
    }
    return {sum, count};
  }

  /// Appends each stream's segment to its memory without training (the backbone only): fills
  /// the banks before timing a steady state, or stores a prefix the model should remember.
  void memorize(std::span<const StreamSegment> batch) {
    if (batch.size() != banks_.size()) {
      detail::fail<InputError>("SideNetAdaptation: got ", batch.size(), " segments for ", banks_.size(), " streams");
    }
    detail::split_batch(batch, segments_, targets_);
    BackboneRequest req = request_;
    req.hidden_states = false;
    backbone_.forward(std::span<const std::span<const std::int32_t>>(segments_), req, bout_);
    const auto& offsets = bout_.offsets;
    for (std::size_t b = 0; b < batch.size(); ++b) {
      if (batch[b].starts_document) banks_[b].reset();
      banks_[b].append(cview(bout_.mem_keys).slice(offsets[b], offsets[b + 1]),
                       cview(bout_.mem_values).slice(offsets[b], offsets[b + 1]));
    }
  }

  /// Loss of one document read as one stream from a fresh memory (or none), segment by
  /// segment; per-token losses (in document order, one per input token, NaN where there is
  /// no target) are appended to `token_losses` when given.
  LossSum evaluate(std::span<const std::int32_t> tokens, int segment_length, std::span<const std::uint8_t> scored = {},
                   std::vector<float>* token_losses = nullptr) {
    if (segment_length <= 0) detail::fail<ConfigError>("evaluate: the segment length must be positive");
    if (!eval_bank_) eval_bank_.emplace(geometry_);
    eval_bank_->reset();
    LossSum total;
    const int k = memory_.retrieved_chunks();
    BackboneRequest req = request_;
    for (std::size_t begin = 0; begin < tokens.size(); begin += static_cast<std::size_t>(segment_length)) {
      const std::size_t len = std::min<std::size_t>(static_cast<std::size_t>(segment_length), tokens.size() - begin);
      const auto seg = tokens.subspan(begin, len);
      detail::next_token_targets(tokens, scored, begin, len, targets_);
      backbone_.forward(seg, req, bout_);
      logits_.resize({static_cast<index_t>(len), backbone_.config().vocab_size});
      auto retrieve = [&](TensorView<const T, L> q) -> const Retrieved<T, L>* {
        if (!memory_.enabled || eval_bank_->num_chunks() == 0) return nullptr;
        retriever_.retrieve(*eval_bank_, q, k, eval_retrieved_);
        return &eval_retrieved_;
      };
      side_net_.template forward<F>(cview(bout_.hidden), backbone_.token_embedding(), retrieve, logits_.view());
      losses_.resize({static_cast<index_t>(len)});
      total += detail::loss_with_tokens(cview(logits_), targets_, losses_, token_losses, staged_logits_);
      if (memory_.enabled) eval_bank_->append(cview(bout_.mem_keys), cview(bout_.mem_values));
    }
    return total;
  }

  /// Writes the SideNet (recommending the training memory settings) as a model file.
  void save_model(const std::filesystem::path& path) const {
    if constexpr (on_host) {
      side_net_.save(path, memory_);
    } else {
      side_net_.template to<Host>().save(path, memory_);
    }
  }

  /// Writes the gradient buffers, times `scale`, under the SideNet file's names and layout.
  void save_gradients(const std::filesystem::path& path, double scale) const {
    SafetensorsWriter w;
    auto md = side_net_.metadata(memory_);
    md["content"] = "gradients";
    w.set_metadata(md);
    const auto& cfg = side_net_.config();
    visit_side_net_tensors(cfg, grads_, [&](const std::string& name, const Tensor<T, L>& g, const Shape&) {
      Tensor<T, Host> s(g.shape());
      copy(cview(g), s.view());
      for (T& x : s) x = static_cast<T>(x * scale);
      w.add<T>(name, s.view());
    });
    w.write(path);
  }

  /// What a checkpoint must match to resume this task.
  std::map<std::string, std::string> model_metadata() const {
    auto md = side_net_.metadata(memory_);
    md["backbone_fingerprint"] = backbone_.fingerprint();
    md["fusion"] = F::name;
    md["memory_enabled"] = memory_.enabled ? "true" : "false";
    return md;
  }

  /// Every stream's memory, for checkpoints.
  void save_state(SafetensorsWriter& w) const {
    for (std::size_t b = 0; b < banks_.size(); ++b) banks_[b].save_state(w, "memory." + std::to_string(b) + ".");
  }
  /// Restores every stream's memory; all or nothing.
  void load_state(const SafetensorsFile& f) {
    std::vector<Bank> banks;
    for (std::size_t b = 0; b < banks_.size(); ++b) {
      banks.emplace_back(geometry_);
      banks.back().load_state(f, "memory." + std::to_string(b) + ".");
    }
    banks_ = std::move(banks);
  }

 private:
  /// The constructor's checks, before anything is placed (the backbone is handed on).
  static Gpt2Backbone<T>&& checked(Gpt2Backbone<T>& backbone, const SideNet<T>& side_net, const MemoryConfig& memory,
                                   int streams, bool allow_other_backbone) {
    side_net.config().validate_against(backbone.config());
    const std::string& want = side_net.config().backbone_fingerprint;
    if (!allow_other_backbone && !want.empty() && want != backbone.fingerprint()) {
      detail::fail<ConfigError>("the SideNet was made for the backbone with fingerprint ", want,
                                " but this backbone's is ", backbone.fingerprint(),
                                " (pass allow_other_backbone to train it anyway)");
    }
    memory.validate();
    if (streams <= 0) detail::fail<ConfigError>("SideNetAdaptation: streams must be positive, got ", streams);
    return std::move(backbone);
  }
  Gpt2Backbone<T, L> backbone_;
  SideNet<T, L> side_net_;
  MemoryConfig memory_;
  Retriever retriever_;
  MemoryGeometry geometry_;
  std::vector<Bank> banks_;
  std::vector<Retrieved<T, L>> retrieved_;  // per stream, alive until the backward ran
  Retrieved<T, L> stacked_;                // every stream's, stacked by rows (retrieve_stacked)
  SideNetParameters<T, L> grads_;
  BackboneRequest request_;
  BackboneOutput<T, L> bout_;
  SideNetActivations<T, L> acts_;
  SideNetGradScratch<T, L> scratch_;
  Tensor<T, L> logits_;  // (N, V), then d logits in place
  Tensor<float, Host> losses_;
  Tensor<T, Host> staged_logits_;  // evaluation logits copied off the device
  std::vector<std::span<const std::int32_t>> segments_;
  std::vector<std::int32_t> targets_;
  std::optional<Bank> eval_bank_;
  Retrieved<T, L> eval_retrieved_;
};


}  // namespace longmem
