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
//
// On the GPU the same policies have device twins, and the model is the same class:
//
//   using DevModel = longmem::Model<longmem::Gpt2Backbone<float, longmem::Device>,
//                                   longmem::DeviceMemoryBank<float>,
//                                   longmem::FusedChunkRetriever>;   // <longmem/cuda/...>, nvcc
//   DevModel model{Gpt2Backbone<float>::load(b).to_device(), SideNet<float>::load(s).to_device(), config};
//
// and in bf16 (weights, activations, logits and memory; fp32 sums inside every op; fp16 likewise with
// half and __half):
//
//   using Bf16Model = longmem::Model<longmem::Gpt2Backbone<longmem::bfloat16, longmem::Device>,
//                                    longmem::DeviceMemoryBank<__nv_bfloat16>,
//                                    longmem::FusedChunkRetriever>;
//   Bf16Model model{Gpt2Backbone<float>::load(b).to<Device, bfloat16>(),
//                   SideNet<float>::load(s).to<Device, bfloat16>(), config};
//
// Two ways to run the streams of one call, with the same results (up to float summation order):
//   per stream  one stream after another: backbone, SideNet, append (the host default)
//   batched     one backbone pass and one SideNet pass over N = sum T_b rows, so every GEMM sees
//               all streams (attention, positions and retrieval stay within each stream's rows),
//               then every stream's keys/values join its bank (the device default)
// Each bank is read only by its own stream and only before that stream's append, so the order
// within a call does not change what is retrieved. set_batched_streams() picks one; the CPU unit
// tests check on the host that both agree, since that is where the batched composition can run
// without a GPU. Device logits stay on the device (SegmentResult<float, Device>); to_host()
// copies a result back.
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

/// A host copy of a result (device logits need <longmem/cuda/storage.hpp>; host ones are cloned).
template <class T, class L>
SegmentResult<T, Host> to_host(const SegmentResult<T, L>& r) {
  SegmentResult<T, Host> h;
  h.logits.reserve(r.logits.size());
  for (const Tensor<T, L>& l : r.logits) h.logits.push_back(to_host(l));
  h.retrieved_chunks = r.retrieved_chunks;
  h.loss_sum = r.loss_sum;
  h.loss_tokens = r.loss_tokens;
  return h;
}

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
  static_assert(requires(R& r, const M& bank, TensorView<const value_type, location> q, int k,
                         Retrieved<value_type, location>& out) { r.retrieve(bank, q, k, out); },
                "longmem::Model: this ChunkRetriever has no retrieve() for queries and results of the model's element "
                "type (FusedChunkRetriever takes float, bfloat16 and half)");
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
    // A device model on a machine without a usable GPU: one clear BackendError before any bank.
    detail::Allocator<location>::require_usable("longmem::Model with device policies (its memory banks)");
    // Host banks are checked against host memory here; device banks check the device's free
    // memory themselves, each before it allocates.
    if constexpr (std::is_same_v<location, Host> && requires { M::bytes_for(geometry_); }) {
      // All banks at once, before the first is built (each bank also claims its own share).
      const auto one = M::bytes_for(geometry_);
      detail::require_host_memory(one ? detail::checked_bytes(*one, {streams}) : std::nullopt,
                                  detail::concat("Model: ", streams, " memory bank", streams > 1 ? "s" : "", " of ",
                                                 memory_.memory_tokens, " tokens (", bc.n_head, " heads of ",
                                                 bc.head_dim(), ")"));
    }
    banks_.reserve(static_cast<std::size_t>(streams));
    for (int s = 0; s < streams; ++s) banks_.emplace_back(geometry_);
    stream_retrieved_.resize(static_cast<std::size_t>(streams));  // batched mode: one retrieval per stream
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
    if (batched_) {
      forward_batched(segments, targets);
    } else {
      // One stream after another.
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
          last_retrieving_stream_ = -1;  // last_retrieval() is retrieved_
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
  /// Batched (one pass over all streams of a call) or per stream; see the header comment. The
  /// default is per stream on the host (the reference order) and batched on the device.
  void set_batched_streams(bool on) { batched_ = on; }
  bool batched_streams() const { return batched_; }

  /// Batched mode on the device retrieves for every stream in one call (when every bank gives the
  /// same k' = min(k, stored chunks), as full banks do) and the memory layer reads that stacked
  /// output in one attention call; off, each stream retrieves and attends on its own (the results
  /// are the same). On by default; the host retriever has no stacked form, so it changes nothing there.
  void set_stacked_retrieval(bool on) { stacked_retrieval_ = on; }
  bool stacked_retrieval() const { return stacked_retrieval_; }
  /// The last batched call's stacked retrieval, when it had one (else empty): rows of stream b are
  /// [stacked_offsets()[b], stacked_offsets()[b + 1]) of slots, scores, keys and values.
  const Retrieved<value_type, location>& stacked_retrieval_result() const { return stacked_; }
  std::span<const index_t> stacked_offsets() const { return stacked_rows_; }

  /// The retrieval of the last stream that retrieved (for inspection).
  const Retrieved<value_type, location>& last_retrieval() const {
    return last_retrieving_stream_ < 0 ? retrieved_ : stream_retrieved_[static_cast<std::size_t>(last_retrieving_stream_)];
  }
  /// Batched mode keeps every stream's retrieval: stream b's of the last batched call in which it
  /// retrieved (empty before). After a stacked retrieval it holds the slots, scores and k' only (its
  /// keys and values have 0 rows): the gathered keys/values are in stacked_retrieval_result().
  const Retrieved<value_type, location>& retrieval(int stream) const {
    return stream_retrieved_.at(static_cast<std::size_t>(stream));
  }

 private:
  // All streams in one backbone pass and one SideNet pass (see the header comment).
  // Workspaces (the backbone's and SideNet's scratch, out_, logits_, every stream's retrieval)
  // are members and only grow. Nothing is copied to the host here except what the ops do
  // themselves: token ids and targets go up, cross_entropy brings back its two sums.
  void forward_batched(std::span<const std::span<const std::int32_t>> segments,
                       std::span<const std::span<const std::int32_t>> targets) {
    const int k_chunks = memory_.retrieved_chunks();
    const index_t V = backbone_.config().vocab_size;
    backbone_.forward(segments, request_, out_);  // hidden (L+1, N, d), mem_keys / mem_values (N, H, dh)
    const std::vector<index_t>& offsets = out_.offsets;  // B+1 row offsets of the streams
    const index_t N = offsets.back();
    logits_.resize({N, V});  // every stream's logits, rows as in out_.hidden
    // Called by the SideNet's memory layer before any bank has been appended to in this call, so
    // bank b holds earlier segments only. First with every stream's queries (N, H, dh) at once:
    // a retriever with retrieve_stacked answers for all streams in one launch, into one output
    // stacked by rows, which the memory layer reads in one attention call. It declines (nullptr)
    // when it cannot (no retrieve_stacked, memory off, an empty bank, or banks holding different
    // numbers of chunks under k), and the SideNet then asks stream by stream.
    struct Retrieve {
      Model& m;
      int k;
      const Retrieved<value_type, location>* operator()(std::size_t b, TensorView<const value_type, location> q) {
        M& bank = m.banks_[b];
        if (!m.memory_.enabled || bank.num_chunks() == 0) return nullptr;
        Retrieved<value_type, location>& r = m.stream_retrieved_[b];  // its own buffers: kernels still read the last one's
        m.retriever_.retrieve(bank, q, k, r);  // keys/values (T_b, H, k' csz, dh), as on the host
        m.result_.retrieved_chunks[b] = r.chunks;
        m.last_retrieving_stream_ = static_cast<int>(b);
        return &r;
      }
      const Retrieved<value_type, location>* operator()(std::span<const index_t> offsets,
                                                        TensorView<const value_type, location> q) {
        if constexpr (requires(std::vector<const M*> banks, Retrieved<value_type, location>& out) {
                        m.retriever_.retrieve_stacked(std::span<const M* const>(banks), q, offsets, k, out);
                      }) {
          if (!m.memory_.enabled || !m.stacked_retrieval_) return nullptr;
          const std::vector<const M*> banks = banks_for_stacked_retrieval(std::span<const M>(m.banks_), k);
          if (banks.empty()) return nullptr;
          m.retriever_.retrieve_stacked(std::span<const M* const>(banks), q, offsets, k, m.stacked_);
          m.stacked_rows_.assign(offsets.begin(), offsets.end());
          // Each stream's slots and scores are also kept on their own (retrieval(b)); the
          // gathered keys/values stay only in the stacked output (stacked_retrieval_result()).
          for (std::size_t b = 0; b < banks.size(); ++b) {
            Retrieved<value_type, location>& r = m.stream_retrieved_[b];
            const index_t o0 = offsets[b], o1 = offsets[b + 1];
            r.chunks = m.stacked_.chunks;
            r.slots.resize({o1 - o0, m.stacked_.slots.dim(1), m.stacked_.slots.dim(2)});
            r.scores.resize(r.slots.shape());
            copy(cview(m.stacked_.slots).slice(o0, o1), r.slots.view());
            copy(cview(m.stacked_.scores).slice(o0, o1), r.scores.view());
            r.keys.resize({0, m.stacked_.keys.dim(1), m.stacked_.keys.dim(2), m.stacked_.keys.dim(3)});
            r.values.resize(r.keys.shape());
            m.result_.retrieved_chunks[b] = r.chunks;
          }
          m.last_retrieving_stream_ = static_cast<int>(banks.size()) - 1;
          return &m.stacked_;
        } else {
          return nullptr;
        }
      }
    };
    stacked_rows_.clear();
    side_net_.template forward<F>(cview(out_.hidden), std::span<const index_t>(offsets), backbone_.token_embedding(),
                                  Retrieve{*this, k_chunks}, logits_.view());
    for (std::size_t b = 0; b < segments.size(); ++b) {
      auto& logits = result_.logits[b];
      logits.resize({offsets[b + 1] - offsets[b], V});  // (T_b, V); reallocates only for a longer segment
      copy(cview(logits_).slice(offsets[b], offsets[b + 1]), logits.view());
    }
    if (!targets.empty()) {
      // One cross_entropy over all N rows: it waits for the device once to return its sums.
      targets_.clear();
      for (const auto& t : targets) targets_.insert(targets_.end(), t.begin(), t.end());
      auto [sum, count] = ops::cross_entropy(cview(logits_), std::span<const std::int32_t>(targets_),
                                             TensorView<float, location>{});
      result_.loss_sum = sum;
      result_.loss_tokens = count;
    }
    if (memory_.enabled && remember_) {
      for (std::size_t b = 0; b < segments.size(); ++b) {
        banks_[b].append(cview(out_.mem_keys).slice(offsets[b], offsets[b + 1]),
                         cview(out_.mem_values).slice(offsets[b], offsets[b + 1]));
      }
    }
  }

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
  bool batched_ = !std::is_same_v<location, Host>;
  // Batched mode.
  std::vector<Retrieved<value_type, location>> stream_retrieved_;  // per stream
  int last_retrieving_stream_ = -1;  // whose retrieval last_retrieval() is (-1: retrieved_)
  bool stacked_retrieval_ = true;
  Retrieved<value_type, location> stacked_;  // every stream's, stacked by rows (retrieve_stacked)
  std::vector<index_t> stacked_rows_;        // its B+1 row offsets; empty when the last call had none
  Tensor<value_type, location> logits_;  // (N, V) all streams' logits of the last call
  std::vector<std::int32_t> targets_;    // (N) all streams' targets of the last call
};

}  // namespace longmem
