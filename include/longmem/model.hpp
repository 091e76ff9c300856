#pragma once
// The composed LongMem model: a frozen Backbone, one MemoryBank per stream, a
// ChunkRetriever and a residual SideNet, fixed at compile time:
//
//   using Model = longmem::Model<longmem::Gpt2Backbone<float>,
//                                longmem::HostMemoryBank<float>,
//                                longmem::ExactChunkRetriever>;        // + Fusion, default GatedFusion
//
// Stream order per call, for each stream b (DESIGN.md section 2):
//   backbone(segment_b) -> hidden states, layer-m keys/values
//   SideNet(hidden)      -> logits, retrieving only from bank_b (earlier segments)
//   bank_b.append(keys, values)                       this segment becomes memory
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "longmem/backbone.hpp"
#include "longmem/chunk_retriever.hpp"
#include "longmem/detail/host_memory.hpp"
#include "longmem/fusion.hpp"
#include "longmem/memory_bank.hpp"
#include "longmem/model_config.hpp"
#include "longmem/ops.hpp"
#include "longmem/side_net.hpp"
#include "longmem/tensor.hpp"

namespace longmem {

/// What one call of Model::forward returns.
template <class T, class L = Host>
struct SegmentResult {
  std::vector<Tensor<T, L>> logits;       // per stream: (T_b, V)
  std::vector<int> retrieved_chunks;      // per stream: chunks retrieved per query (0 = memory empty or off)
  double loss_sum = 0;                    // summed next-token cross-entropy (nats), when targets were given
  std::int64_t loss_tokens = 0;           // targets counted in loss_sum

  double mean_loss() const { return loss_tokens ? loss_sum / static_cast<double>(loss_tokens) : 0.0; }
};

template <Backbone B, MemoryBank M, ChunkRetriever R, Fusion F = GatedFusion>
class Model {
 public:
  using value_type = typename B::value_type;
  using location = typename B::location;
  using backbone_type = B;
  using bank_type = M;
  using retriever_type = R;
  using fusion_type = F;
  using side_net_type = SideNet<value_type, location>;

  static_assert(std::is_same_v<typename M::location, location>,
                "longmem::Model: the MemoryBank and the Backbone live in different places; use a bank of the "
                "backbone's location (HostMemoryBank with a host backbone, a device bank with a device backbone)");
  static_assert(std::is_same_v<typename R::location, location>,
                "longmem::Model: the ChunkRetriever searches banks in another place than the Backbone's; use "
                "ExactChunkRetriever with host banks, a device retriever with device banks");
  static_assert(ChunkRetrieverFor<R, M>,
                "longmem::Model: this ChunkRetriever has no retrieve() for this MemoryBank type");
  static_assert(std::is_constructible_v<M, MemoryGeometry>,
                "longmem::Model: the MemoryBank must be constructible from a longmem::MemoryGeometry");

  /// Checks that the SideNet fits the backbone (sizes, memory layer, fingerprint) and
  /// that the memory settings divide; throws ConfigError naming the mismatch otherwise.
  /// `allow_other_backbone` accepts a SideNet whose recorded backbone fingerprint differs.
  Model(B backbone, side_net_type side_net, MemoryConfig memory, int streams = 1, R retriever = R{},
        bool allow_other_backbone = false)
      : backbone_(std::move(backbone)),
        side_net_(std::move(side_net)),
        memory_(memory),
        retriever_(std::move(retriever)) {
    const BackboneConfig& bc = backbone_.config();
    side_net_.config().validate_against(bc);
    const std::string& want = side_net_.config().backbone_fingerprint;
    if (!allow_other_backbone && !want.empty()) {
      if constexpr (requires { backbone_.fingerprint(); }) {
        const std::string have = backbone_.fingerprint();
        if (have != want) {
          detail::fail<ConfigError>("the SideNet was made for the backbone with fingerprint ", want,
                                    " but this backbone's is ", have,
                                    " (pass allow_other_backbone=true to use it anyway)");
        }
      }
    }
    memory_.validate();
    if (streams <= 0) detail::fail<ConfigError>("Model: streams must be positive, got ", streams);
    geometry_ = MemoryGeometry{bc.n_head, bc.head_dim(), memory_.chunk_size, memory_.capacity_chunks()};
    if constexpr (requires { M::bytes_for(geometry_); }) {
      // All banks at once, before the first is built (each bank also claims its own share).
      const auto one = M::bytes_for(geometry_);
      detail::require_host_memory(one ? detail::checked_bytes(*one, {streams}) : std::nullopt,
                                  detail::concat("Model: ", streams, " memory bank", streams > 1 ? "s" : "", " of ",
                                                 memory_.memory_tokens, " tokens (", bc.n_head, " heads of ",
                                                 bc.head_dim(), ")"));
    }
    banks_.reserve(static_cast<std::size_t>(streams));
    for (int s = 0; s < streams; ++s) banks_.emplace_back(geometry_);
    request_.logits = false;
    request_.hidden_states = true;
    request_.memory_layer = side_net_.config().memory_layer;
  }

  /// The next segment of every stream (segments.size() == streams()). `targets`, when
  /// not empty, holds one target span per stream of the same length as its segment
  /// (-1 = ignore); the loss is then summed into the result. Retrieval sees only
  /// earlier segments; afterwards each segment's keys/values join its stream's bank.
  const SegmentResult<value_type, location>& forward(std::span<const std::span<const std::int32_t>> segments,
                                                     std::span<const std::span<const std::int32_t>> targets = {}) {
    if (segments.size() != banks_.size()) {
      detail::fail<InputError>("Model forward: got ", segments.size(), " segments for ", banks_.size(),
                               " streams (pass one segment per stream)");
    }
    if (!targets.empty() && targets.size() != segments.size()) {
      detail::fail<InputError>("Model forward: got ", targets.size(), " target spans for ", segments.size(), " segments");
    }
    for (std::size_t b = 0; b < segments.size(); ++b) {
      // Validate everything before any stream runs, so a refused call changes no bank.
      if (segments[b].empty()) detail::fail<InputError>("Model forward: the segment of stream ", b, " is empty");
      const BackboneConfig& bc = backbone_.config();
      if (static_cast<index_t>(segments[b].size()) > bc.n_positions) {
        detail::fail<InputError>("Model forward: the segment of stream ", b, " has ", segments[b].size(),
                                 " tokens but the backbone accepts at most ", bc.n_positions, " (n_positions)");
      }
      for (std::size_t t = 0; t < segments[b].size(); ++t) {
        const std::int32_t id = segments[b][t];
        if (id < 0 || id >= bc.vocab_size) {
          detail::fail<InputError>("Model forward: token id ", id, " at position ", t, " of stream ", b,
                                   " is outside the vocabulary [0, ", bc.vocab_size, ")");
        }
      }
      if (!targets.empty() && targets[b].size() != segments[b].size()) {
        detail::fail<InputError>("Model forward: stream ", b, " has ", segments[b].size(), " tokens but ",
                                 targets[b].size(), " targets");
      }
    }
    result_.logits.resize(segments.size());
    result_.retrieved_chunks.assign(segments.size(), 0);
    result_.loss_sum = 0;
    result_.loss_tokens = 0;
    const int k_chunks = memory_.retrieved_chunks();
    for (std::size_t b = 0; b < segments.size(); ++b) {
      M& bank = banks_[b];
      backbone_.forward(segments[b], request_, out_);
      auto& logits = result_.logits[b];
      logits.resize({static_cast<index_t>(segments[b].size()), backbone_.config().vocab_size});
      auto retrieve = [&](TensorView<const value_type, location> q) -> const Retrieved<value_type, location>* {
        if (!memory_.enabled || bank.num_chunks() == 0) return nullptr;
        retriever_.retrieve(bank, q, k_chunks, retrieved_);
        result_.retrieved_chunks[b] = retrieved_.chunks;
        return &retrieved_;
      };
      side_net_.template forward<F>(cview(out_.hidden), backbone_.token_embedding(), retrieve, logits.view());
      if (!targets.empty()) {
        auto [sum, count] = ops::cross_entropy(cview(logits), targets[b], TensorView<float, location>{});
        result_.loss_sum += sum;
        result_.loss_tokens += count;
      }
      if (memory_.enabled && remember_) bank.append(cview(out_.mem_keys), cview(out_.mem_values));
    }
    return result_;
  }

  /// Single-stream convenience.
  const SegmentResult<value_type, location>& forward(std::span<const std::int32_t> segment,
                                                     std::span<const std::int32_t> targets = {}) {
    const std::span<const std::int32_t> seg[1] = {segment};
    const std::span<const std::int32_t> tgt[1] = {targets};
    return forward(std::span<const std::span<const std::int32_t>>(seg),
                   targets.empty() ? std::span<const std::span<const std::int32_t>>{}
                                   : std::span<const std::span<const std::int32_t>>(tgt));
  }

  /// Memory off: every SideNet layer uses plain attention and nothing is remembered
  /// (the baseline). Turning it back on resumes from the banks as they were.
  void set_memory_enabled(bool on) { memory_.enabled = on; }
  bool memory_enabled() const { return memory_.enabled; }

  /// Read-only memory: segments still retrieve from the banks but are not appended
  /// (e.g. evaluation prompts after demonstrations were stored). On by default.
  void set_remember(bool on) { remember_ = on; }
  bool remembers() const { return remember_; }

  /// Forgets every stream's memory.
  void reset() {
    for (auto& b : banks_) b.reset();
  }
  /// Forgets one stream's memory.
  void reset(int stream) { bank(stream).reset(); }

  int streams() const { return static_cast<int>(banks_.size()); }
  M& bank(int stream) { return banks_.at(static_cast<std::size_t>(stream)); }
  const M& bank(int stream) const { return banks_.at(static_cast<std::size_t>(stream)); }
  const B& backbone() const { return backbone_; }
  const side_net_type& side_net() const { return side_net_; }
  side_net_type& side_net() { return side_net_; }
  const R& retriever() const { return retriever_; }
  R& retriever() { return retriever_; }
  const MemoryConfig& memory_config() const { return memory_; }
  const MemoryGeometry& geometry() const { return geometry_; }
  /// The retrieval of the last stream processed by the last forward (for inspection).
  const Retrieved<value_type, location>& last_retrieval() const { return retrieved_; }

 private:
  B backbone_;
  side_net_type side_net_;
  MemoryConfig memory_;
  bool remember_ = true;
  R retriever_;
  MemoryGeometry geometry_;
  std::vector<M> banks_;
  BackboneRequest request_;
  BackboneOutput<value_type, location> out_;
  Retrieved<value_type, location> retrieved_;
  SegmentResult<value_type, location> result_;
};

}  // namespace longmem
