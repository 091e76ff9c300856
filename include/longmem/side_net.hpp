#pragma once
// The residual SideNet (DESIGN.md section 2): L/r parallel blocks beside a frozen
// backbone, fed the backbone's hidden-state differences, one layer memory-augmented.
//
//   x = B[0]
//   layer i:  h = ln_i(x);  x = x + (B[r(i+1)] - B[r i]) + Wo attn_i(h) + fc2(gelu(fc1(h)))
//             attn of layer i* = floor(m / r) is memory-augmented (see fusion.hpp)
//   logits = ln_f(x) @ wte^T              (head tied to the backbone's embedding)
//
// Files use the reference implementation's names: layers.N.ln_1, layers.N.self_attn.
// {q,k,v,out}_proj, layers.N.self_attn.memory_bias (the gate, only on layer i*),
// layers.N.fc1, layers.N.fc2, layer_norm; hyper-parameters in __metadata__.
#include <climits>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <type_traits>
#include <vector>

#include "longmem/chunk_retriever.hpp"
#include "longmem/fusion.hpp"
#include "longmem/gpt2_backbone.hpp"
#include "longmem/model_config.hpp"
#include "longmem/ops.hpp"
#include "longmem/safetensors.hpp"
#include "longmem/tensor.hpp"
#include "longmem/weight_reader.hpp"

namespace longmem {

/// Weights of one SideNet layer, Linear layout [out, in].
template <class T, class L = Host>
struct SideNetLayerWeights {
  Tensor<T, L> ln_weight, ln_bias;                        // (d)
  Tensor<T, L> q_weight, k_weight, v_weight, out_weight;  // (d, d)
  Tensor<T, L> q_bias, k_bias, v_bias, out_bias;          // (d) or empty
  Tensor<T, L> gate;                                      // (H) on layer i*, else empty
  Tensor<T, L> fc1_weight;                                // (n_inner, d)
  Tensor<T, L> fc1_bias;                                  // (n_inner)
  Tensor<T, L> fc2_weight;                                // (d, n_inner)
  Tensor<T, L> fc2_bias;                                  // (d)
};

/// Every tensor of a SideNet: its layers and the final LayerNorm. The same structure holds
/// weights, their gradients and optimizer moments (llm.c's ParameterTensors).
template <class T, class L = Host>
struct SideNetParameters {
  std::vector<SideNetLayerWeights<T, L>> layers;  // n_layer
  Tensor<T, L> ln_f_weight, ln_f_bias;            // (d)
};

/// Calls fn(name, tensor, shape) for every tensor a SideNet of `cfg` has, in file order, under
/// the reference implementation's names (layers.N.ln_1.weight, layers.N.self_attn.q_proj.weight,
/// ..., layers.i*.self_attn.memory_bias, layer_norm.weight). `shape` is what `cfg` requires;
/// absent tensors (attention biases without attn_bias, gates off layer i*) are not visited.
/// `params.layers` must already hold cfg.n_layer entries.
template <class P, class Fn>
void visit_side_net_tensors(const SideNetConfig& cfg, P& params, Fn&& fn) {
  const index_t d = cfg.n_embd, F = cfg.n_inner, H = cfg.n_head;
  const int i_star = cfg.memory_augmented_layer();
  if (params.layers.size() != static_cast<std::size_t>(cfg.n_layer)) {
    detail::fail<ShapeError>("SideNet: ", params.layers.size(), " layers given for n_layer = ", cfg.n_layer);
  }
  for (int i = 0; i < cfg.n_layer; ++i) {
    auto& w = params.layers[static_cast<std::size_t>(i)];
    const std::string p = "layers." + std::to_string(i) + ".";
    fn(p + "ln_1.weight", w.ln_weight, Shape{d});
    fn(p + "ln_1.bias", w.ln_bias, Shape{d});
    fn(p + "self_attn.q_proj.weight", w.q_weight, Shape{d, d});
    fn(p + "self_attn.k_proj.weight", w.k_weight, Shape{d, d});
    fn(p + "self_attn.v_proj.weight", w.v_weight, Shape{d, d});
    fn(p + "self_attn.out_proj.weight", w.out_weight, Shape{d, d});
    if (cfg.attn_bias) {
      fn(p + "self_attn.q_proj.bias", w.q_bias, Shape{d});
      fn(p + "self_attn.k_proj.bias", w.k_bias, Shape{d});
      fn(p + "self_attn.v_proj.bias", w.v_bias, Shape{d});
      fn(p + "self_attn.out_proj.bias", w.out_bias, Shape{d});
    }
    if (i == i_star) fn(p + "self_attn.memory_bias", w.gate, Shape{H});
    fn(p + "fc1.weight", w.fc1_weight, Shape{F, d});
    fn(p + "fc1.bias", w.fc1_bias, Shape{F});
    fn(p + "fc2.weight", w.fc2_weight, Shape{d, F});
    fn(p + "fc2.bias", w.fc2_bias, Shape{d});
  }
  fn(std::string("layer_norm.weight"), params.ln_f_weight, Shape{d});
  fn(std::string("layer_norm.bias"), params.ln_f_bias, Shape{d});
}

/// Zero-filled tensors at L of every shape a SideNet of `cfg` has (gradients, optimizer moments).
template <class T, class L = Host>
SideNetParameters<T, L> zero_side_net_parameters(const SideNetConfig& cfg) {
  SideNetParameters<T, L> p;
  p.layers.resize(static_cast<std::size_t>(std::max(cfg.n_layer, 0)));
  visit_side_net_tensors(cfg, p, [](const std::string&, Tensor<T, L>& t, const Shape& s) {
    t.resize(s);
    fill(t.view(), T(0));
  });
  return p;
}

/// What one SideNet layer computes over N rows, kept for its backward (training) or reused as scratch.
template <class T, class L = Host>
struct SideNetLayerActivations {
  Tensor<T, L> x;        // (N, d) the layer's input (residual stream), kept for training only
  Tensor<T, L> ln;       // (N, d) ln_1(x)
  Tensor<T, L> q, k, v;  // (N, d) = (N, H, dh)
  Tensor<T, L> att;      // (N, d) attention output before out_proj
  Tensor<T, L> fc;       // (N, n_inner) fc1 output, before GELU
  Tensor<T, L> act;      // (N, n_inner) gelu(fc)

  /// for_backward = false: a forward's scratch, without x and fc (the forward then writes act by
  /// linear_gelu and keeps no pre-activation).
  void resize(const SideNetConfig& c, index_t N, bool for_backward = true) {
    const index_t d = c.n_embd;
    if (for_backward) x.resize({N, d});
    for (Tensor<T, L>* t : {&ln, &q, &k, &v, &att}) t->resize({N, d});
    if (for_backward) fc.resize({N, c.n_inner});
    act.resize({N, c.n_inner});
  }
};

/// Everything a SideNet backward needs besides the weights and the backbone's hidden states.
/// `memory[b]` points at what stream b's memory layer attended (owned by the caller, which must
/// keep it until the backward ran); null where the stream had no memory.
template <class T, class L = Host>
struct SideNetActivations {
  std::vector<SideNetLayerActivations<T, L>> layers;  // n_layer
  Tensor<T, L> final_stream;                          // (N, d) x after the last layer
  Tensor<T, L> ln_f;                                  // (N, d) the final LayerNorm's output
  std::vector<const Retrieved<T, L>*> memory;         // per stream
  const Retrieved<T, L>* stacked_memory = nullptr;    // or every stream's rows in one (N, H, K, dh)

  void resize(const SideNetConfig& c, index_t N) {
    layers.resize(static_cast<std::size_t>(c.n_layer));
    for (auto& l : layers) l.resize(c, N);
    final_stream.resize({N, c.n_embd});
    ln_f.resize({N, c.n_embd});
  }
};

/// Reads a SideNet's hyper-parameters from its file's metadata.
inline SideNetConfig side_net_config_from_metadata(const MetadataReader& md) {
  auto arch = md.get_string("architecture");
  if (!arch || *arch != "longmem-sidenet") {
    detail::fail<ConfigError>(md.source(), ": metadata 'architecture' is '", arch.value_or("<missing>"),
                              "', expected 'longmem-sidenet' (is this a backbone file?)");
  }
  SideNetConfig c;
  c.n_layer = md.require_int("n_layer");
  c.n_embd = md.require_int("n_embd");
  c.n_head = md.require_int("n_head");
  c.n_inner = md.inner_width(c.n_embd);
  c.reduction_factor = md.require_int("reduction_factor");
  c.memory_layer = md.require_int("memory_layer");
  if (auto eps = md.get_double("layer_norm_epsilon")) c.layer_norm_epsilon = *eps;
  if (auto act = md.get_string("activation_function")) c.activation = detail::parse_activation(*act, md.source());
  if (auto pos = md.get_string("position_embedding")) c.positions = detail::parse_positions(*pos, md.source());
  if (auto b = md.get_bool("attn_bias")) c.attn_bias = *b;
  if (auto f = md.get_string("backbone_fingerprint")) c.backbone_fingerprint = *f;
  if (c.n_layer <= 0 || c.n_embd <= 0 || c.n_head <= 0 || c.n_embd % c.n_head != 0) {
    detail::fail<ConfigError>(md.source(), ": SideNet sizes n_layer=", c.n_layer, " n_embd=", c.n_embd, " n_head=", c.n_head,
                              " are invalid (all positive, n_embd divisible by n_head)");
  }
  if (c.n_inner <= 0) detail::fail<ConfigError>(md.source(), ": metadata 'n_inner' must be positive, got ", c.n_inner);
  // The backbone it belongs to has n_layer * reduction_factor layers (an int), and the memory
  // layer is one of them; i* = memory_layer / reduction_factor is then a SideNet layer.
  if (c.reduction_factor <= 0) {
    detail::fail<ConfigError>(md.source(), ": metadata 'reduction_factor' must be positive, got ", c.reduction_factor);
  }
  const long long backbone_layers = static_cast<long long>(c.n_layer) * c.reduction_factor;
  if (backbone_layers > INT_MAX) {
    detail::fail<ConfigError>(md.source(), ": metadata 'reduction_factor' = ", c.reduction_factor, " with n_layer = ",
                              c.n_layer, " describes a backbone of ", backbone_layers, " layers, more than an int counts");
  }
  if (c.memory_layer < 0 || c.memory_layer >= backbone_layers) {
    detail::fail<ConfigError>(md.source(), ": metadata 'memory_layer' = ", c.memory_layer, " is not a layer of the ",
                              backbone_layers, "-layer backbone that n_layer = ", c.n_layer, " and reduction_factor = ",
                              c.reduction_factor, " describe");
  }
  if (!(c.layer_norm_epsilon > 0) || !std::isfinite(c.layer_norm_epsilon)) {
    detail::fail<ConfigError>(md.source(), ": metadata 'layer_norm_epsilon' must be a positive finite number, got ",
                              c.layer_norm_epsilon);
  }
  return c;
}

/// The recommended memory settings a SideNet file may carry (memory_tokens, chunk_size,
/// retrieved_tokens), or nothing when absent.
inline std::optional<MemoryConfig> memory_config_from_metadata(const MetadataReader& md) {
  if (!md.has("memory_tokens") && !md.has("chunk_size") && !md.has("retrieved_tokens")) return std::nullopt;
  MemoryConfig m;
  m.memory_tokens = md.require_int("memory_tokens");
  m.chunk_size = md.require_int("chunk_size");
  m.retrieved_tokens = md.require_int("retrieved_tokens");
  // Positive, dividing, and memory_tokens <= limits::max_memory_tokens (2^30; see there).
  try {
    m.validate();
  } catch (const ConfigError& e) {
    detail::fail<ConfigError>(md.source(), ": the recommended memory settings in its metadata (memory_tokens = ",
                              m.memory_tokens, ", chunk_size = ", m.chunk_size, ", retrieved_tokens = ", m.retrieved_tokens,
                              ") are refused: ", e.what());
  }
  return m;
}

/// The SideNet computing in T on location L (float or double; bfloat16 or half on the device, from
/// a float host SideNet by `to<Device, bfloat16>()` or `to<Device, half>()`). forward() reuses scratch buffers: one
/// instance serves one thread at a time.
template <class T, class L = Host>
  requires ModelValueType<T, L>
class SideNet {
 public:
  using value_type = T;
  using location = L;

  SideNet(SideNetConfig config, SideNetParameters<T, L> params, std::optional<MemoryConfig> recommended = std::nullopt)
      : config_(std::move(config)), params_(std::move(params)), recommended_(recommended) {
    check_shapes();
  }

  SideNet(SideNetConfig config, std::vector<SideNetLayerWeights<T, L>> layers, Tensor<T, L> ln_f_weight,
          Tensor<T, L> ln_f_bias, std::optional<MemoryConfig> recommended = std::nullopt)
      : SideNet(std::move(config), SideNetParameters<T, L>{std::move(layers), std::move(ln_f_weight), std::move(ln_f_bias)},
                recommended) {}

  /// Loads a SideNet file (reference names, hyper-parameters in __metadata__).
  static SideNet load(const std::filesystem::path& path) {
    static_assert(std::is_same_v<L, Host>, "load a host SideNet first, then copy it to the device");
    SafetensorsFile file = SafetensorsFile::open(path);
    return from_file(file);
  }

  static SideNet from_file(const SafetensorsFile& file) {
    MetadataReader md(file.metadata(), file.name());
    // The layer count first: every other check below may use it.
    if (md.get_string("architecture") == "longmem-sidenet" && md.has("n_layer")) {
      detail::check_layer_count(file, "n_layer", *md.get_int("n_layer"), "layers.", ".ln_1.weight");
    }
    SideNetConfig cfg = side_net_config_from_metadata(md);
    auto recommended = memory_config_from_metadata(md);
    const int i_star = cfg.memory_augmented_layer();
    if (i_star >= cfg.n_layer) {
      detail::fail<ConfigError>(file.name(), ": memory_layer ", cfg.memory_layer, " with reduction_factor ",
                                cfg.reduction_factor, " puts the memory in SideNet layer ", i_star, " but it has only ",
                                cfg.n_layer, " layers");
    }
    // Every size is checked against the tensors the file holds before anything is sized from it.
    const std::vector<std::string> prefixes{""};
    detail::check_extent(file, prefixes, "metadata", "n_embd", cfg.n_embd, "layer_norm.weight", 0, "elements");
    detail::check_extent(file, prefixes, "metadata", "n_embd", cfg.n_embd, "layers.0.ln_1.weight", 0, "elements");
    detail::check_extent(file, prefixes, "metadata", "n_inner", cfg.n_inner, "layers.0.fc1.weight", 0, "rows");
    detail::check_extent(file, prefixes, "metadata", "n_head", cfg.n_head,
                         "layers." + std::to_string(i_star) + ".self_attn.memory_bias", 0, "gates, one per head");
    WeightReader r(file);
    SideNetParameters<T, Host> params;
    params.layers.resize(static_cast<std::size_t>(cfg.n_layer));
    visit_side_net_tensors(cfg, params, [&](const std::string& name, Tensor<T, Host>& t, const Shape& shape) {
      t = r.read<T>(name, shape);
    });
    r.expect_all_used("SideNet");
    return SideNet(cfg, to_location_parameters(std::move(params)), recommended);
  }

  /// The reference initialisation for memory-augmented adaptation: layer i copies
  /// backbone block r*i+1 (block i when r = 1): ln_1, attention and MLP weights; the
  /// final LayerNorm copies ln_f; gates are 0. Position scheme and attention biases
  /// follow the backbone.
  static SideNet from_backbone(const Gpt2Backbone<T, L>& backbone, int memory_layer, int reduction_factor = 2) {
    static_assert(std::is_same_v<L, Host>, "initialise a host SideNet, then copy it to the device");
    const BackboneConfig& b = backbone.config();
    SideNetConfig cfg = SideNetConfig::for_backbone(b, memory_layer, reduction_factor);
    cfg.attn_bias = b.attn_bias;
    cfg.backbone_fingerprint = backbone.fingerprint();
    cfg.validate_against(b);
    auto clone = [](const Tensor<T, Host>& t) {
      Tensor<T, Host> c(t.shape());
      if (!t.empty()) copy(t.view(), c.view());
      return c;
    };
    std::vector<SideNetLayerWeights<T, L>> layers;
    for (int i = 0; i < cfg.n_layer; ++i) {
      const int src = reduction_factor > 1 ? reduction_factor * i + 1 : i;
      const auto& bw = backbone.block(src);
      SideNetLayerWeights<T, Host> w;
      w.ln_weight = clone(bw.ln_1_weight);
      w.ln_bias = clone(bw.ln_1_bias);
      w.q_weight = clone(bw.q_weight);
      w.k_weight = clone(bw.k_weight);
      w.v_weight = clone(bw.v_weight);
      w.out_weight = clone(bw.out_weight);
      if (cfg.attn_bias) {
        w.q_bias = clone(bw.q_bias);
        w.k_bias = clone(bw.k_bias);
        w.v_bias = clone(bw.v_bias);
        w.out_bias = clone(bw.out_bias);
      }
      if (i == cfg.memory_augmented_layer()) {
        w.gate = Tensor<T, Host>({cfg.n_head});
        fill(w.gate.view(), T(0));
      }
      w.fc1_weight = clone(bw.fc_in_weight);
      w.fc1_bias = clone(bw.fc_in_bias);
      w.fc2_weight = clone(bw.fc_out_weight);
      w.fc2_bias = clone(bw.fc_out_bias);
      layers.push_back(std::move(w));
    }
    Tensor<T, Host> ln_w({b.n_embd}), ln_b({b.n_embd});
    copy(backbone.ln_f_weight(), ln_w.view());
    copy(backbone.ln_f_bias(), ln_b.view());
    return SideNet(cfg, std::move(layers), std::move(ln_w), std::move(ln_b));
  }

  /// Writes the SideNet under the reference names; `recommended` memory settings, if
  /// given (or carried from the loaded file), go into the metadata.
  void save(const std::filesystem::path& path, std::optional<MemoryConfig> recommended = std::nullopt) const {
    static_assert(std::is_same_v<L, Host>, "save a host SideNet");
    SafetensorsWriter w;
    w.set_metadata(metadata(recommended));
    visit_side_net_tensors(config_, params_, [&](const std::string& name, const Tensor<T, L>& t, const Shape&) {
      w.add<T>(name, t.view());
    });
    w.write(path);
  }

  /// The __metadata__ a SideNet file carries: sizes, position scheme, fingerprint of its
  /// backbone, and the recommended memory settings (`recommended`, else those it was loaded with).
  std::map<std::string, std::string> metadata(std::optional<MemoryConfig> recommended = std::nullopt) const {
    if (!recommended) recommended = recommended_;
    std::map<std::string, std::string> md{
        {"architecture", "longmem-sidenet"},
        {"n_layer", std::to_string(config_.n_layer)},
        {"n_embd", std::to_string(config_.n_embd)},
        {"n_head", std::to_string(config_.n_head)},
        {"n_inner", std::to_string(config_.n_inner)},
        {"layer_norm_epsilon", detail::format_double(config_.layer_norm_epsilon)},
        {"activation_function", to_string(config_.activation)},
        {"position_embedding", to_string(config_.positions)},
        {"attn_bias", config_.attn_bias ? "true" : "false"},
        {"reduction_factor", std::to_string(config_.reduction_factor)},
        {"memory_layer", std::to_string(config_.memory_layer)},
    };
    if (!config_.backbone_fingerprint.empty()) md["backbone_fingerprint"] = config_.backbone_fingerprint;
    if (recommended) {
      md["memory_tokens"] = std::to_string(recommended->memory_tokens);
      md["chunk_size"] = std::to_string(recommended->chunk_size);
      md["retrieved_tokens"] = std::to_string(recommended->retrieved_tokens);
    }
    return md;
  }

  /// Sets the memory settings save() records when given none.
  void set_recommended_memory(std::optional<MemoryConfig> m) { recommended_ = m; }

  const SideNetConfig& config() const { return config_; }
  const std::optional<MemoryConfig>& recommended_memory() const { return recommended_; }
  const SideNetLayerWeights<T, L>& layer(int i) const { return params_.layers.at(static_cast<std::size_t>(i)); }
  SideNetLayerWeights<T, L>& layer(int i) { return params_.layers.at(static_cast<std::size_t>(i)); }
  /// The same SideNet with every weight copied to location L2 (and converted to T2): load a host
  /// SideNet, then `to<Device>()` (or to_device()) for the GPU, or `to<Device, bfloat16>()` /
  /// `to<Device, half>()` for a bf16 / fp16 one (rounded to nearest even once, on the host). Throws BackendError when L2 is Device
  /// and the CUDA runtime sees no usable device.
  template <class L2, class T2 = T>
    requires ModelValueType<T2, L2>
  SideNet<T2, L2> to() const {
    static_assert(std::is_same_v<T2, T> || std::is_same_v<L, Host>, "convert a host SideNet (to<L2, T2>() on the host)");
    detail::Allocator<L2>::require_usable("SideNet::to_device (copying the SideNet's weights to the GPU)");
    SideNetParameters<T2, L2> p;
    p.layers.resize(params_.layers.size());
    std::vector<Tensor<T2, L2>*> dst;
    visit_side_net_tensors(config_, p, [&](const std::string&, Tensor<T2, L2>& t, const Shape&) { dst.push_back(&t); });
    std::size_t i = 0;
    visit_side_net_tensors(config_, params_, [&](const std::string&, const Tensor<T, L>& t, const Shape&) {
      assign_converted(cview(t), *dst[i++]);
    });
    return SideNet<T2, L2>(config_, std::move(p), recommended_);
  }
  SideNet<T, Device> to_device() const { return to<Device>(); }

  /// An independent copy (a SideNet is move-only because its tensors are).
  SideNet clone() const {
    SideNetParameters<T, L> p;
    p.layers.resize(params_.layers.size());
    std::vector<Tensor<T, L>*> dst;
    visit_side_net_tensors(config_, p, [&](const std::string&, Tensor<T, L>& t, const Shape&) { dst.push_back(&t); });
    std::size_t i = 0;
    visit_side_net_tensors(config_, params_, [&](const std::string&, const Tensor<T, L>& t, const Shape&) {
      dst[i]->resize(t.shape());
      copy(cview(t), dst[i++]->view());
    });
    return SideNet(config_, std::move(p), recommended_);
  }

  /// Every weight (training updates them in place; shapes must not change).
  const SideNetParameters<T, L>& parameters() const { return params_; }
  SideNetParameters<T, L>& parameters() { return params_; }

  /// One segment.
  ///   hidden  (L+1, T, d)  the backbone's hidden states B[0..L]
  ///   wte     (V, d)       the backbone's token embedding (tied head)
  ///   retrieve             callable (TensorView<const T, L> queries (T, H, dh)) ->
  ///                        const Retrieved<T, L>*; nullptr (or 0 chunks) means no memory
  ///   logits  (T, V)       output
  template <Fusion F, class RetrieveFn>
  void forward(TensorView<const T, L> hidden, TensorView<const T, L> wte, RetrieveFn&& retrieve,
               TensorView<T, L> logits) const {
    if (hidden.rank() != 3) {
      detail::fail<ShapeError>("SideNet forward: hidden states must be (L+1, T, d), got ", hidden.shape().str());
    }
    const index_t offsets[2] = {0, hidden.dim(1)};
    forward<F>(hidden, std::span<const index_t>(offsets), wte,
               [&](std::size_t, TensorView<const T, L> q) { return retrieve(q); }, logits);
  }

  /// A batch of segments, one per stream, rows one after another (`offsets`, B+1 entries, as
  /// BackboneOutput::offsets): every GEMM sees all N rows, attention and retrieval stay within a
  /// segment.
  ///   hidden  (L+1, N, d)  the backbone's hidden states of every segment
  ///   retrieve             callable (std::size_t stream, TensorView<const T, L> queries (T_b, H, dh))
  ///                        -> const Retrieved<T, L>*; nullptr (or 0 chunks) means no memory.
  ///                        Optionally also (std::span<const index_t> offsets, queries (N, H, dh))
  ///                        -> every stream's retrieval stacked by rows (keys (N, H, K, dh)), tried
  ///                        first: one memory_attention over all streams; nullptr falls back to
  ///                        one call per stream
  ///   logits  (N, V)       output
  /// With `acts`, every layer's intermediates (and the retrievals, which must outlive them) are
  /// kept there for the backward pass; the results are the same bits either way.
  template <Fusion F, class RetrieveFn>
  void forward(TensorView<const T, L> hidden, std::span<const index_t> offsets, TensorView<const T, L> wte,
               RetrieveFn&& retrieve, TensorView<T, L> logits, SideNetActivations<T, L>* acts = nullptr) const {
    const index_t d = config_.n_embd, H = config_.n_head, dh = config_.head_dim();
    const int r = config_.reduction_factor;
    if (hidden.rank() != 3 || hidden.dim(0) != static_cast<index_t>(config_.n_layer) * r + 1 || hidden.dim(2) != d) {
      detail::fail<ShapeError>("SideNet forward: hidden states must be (", config_.n_layer * r + 1, ", T, ", d,
                               ") (all backbone hidden states), got ", hidden.shape().str());
    }
    const index_t N = hidden.dim(1);
    if (offsets.size() < 2 || offsets.front() != 0 || offsets.back() != N ||
        !std::is_sorted(offsets.begin(), offsets.end())) {
      detail::fail<ShapeError>("SideNet forward: segment offsets must rise from 0 to the ", N,
                               " rows of the hidden states");
    }
    expect_shape(logits, {N, wte.dim(0)}, "SideNet forward: logits");
    const std::size_t streams = offsets.size() - 1;
    stream_.resize({N, d});
    scratch_.resize(config_, N, /*for_backward=*/false);
    if (acts) {
      acts->resize(config_, N);
      acts->memory.assign(streams, nullptr);
      acts->stacked_memory = nullptr;
    }
    TensorView<T, L> x = stream_.view();  // residual stream (N, d)
    copy(hidden[0], x);
    for (int i = 0; i < config_.n_layer; ++i) {
      const auto& w = params_.layers[static_cast<std::size_t>(i)];
      SideNetLayerActivations<T, L>& a = acts ? acts->layers[static_cast<std::size_t>(i)] : scratch_;
      if (acts) copy(cview(stream_), a.x.view());
      ops::layer_norm(a.ln.view(), x, w.ln_weight, w.ln_bias, config_.layer_norm_epsilon);
      ops::add_difference(x, hidden[static_cast<index_t>(r) * (i + 1)], hidden[static_cast<index_t>(r) * i]);
      ops::linear(a.q.view(), a.ln, w.q_weight, w.q_bias);
      ops::linear(a.k.view(), a.ln, w.k_weight, w.k_bias);
      ops::linear(a.v.view(), a.ln, w.v_weight, w.v_bias);
      if (i != config_.memory_augmented_layer()) {  // every stream in one call (one launch on the GPU)
        const Shape rows_heads{N, H, dh};
        ops::causal_attention(a.att.view().reshape(rows_heads), cview(a.q).reshape(rows_heads),
                              cview(a.k).reshape(rows_heads), cview(a.v).reshape(rows_heads), config_.positions,
                              offsets);
      } else {  // the memory layer: each stream retrieves from its own bank
        const Shape rows_heads{N, H, dh};
        const Retrieved<T, L>* all = nullptr;
        if constexpr (std::is_invocable_v<RetrieveFn&, std::span<const index_t>, TensorView<const T, L>>) {
          all = retrieve(offsets, cview(a.q).reshape(rows_heads));
        }
        const bool stacked = all && all->chunks > 0;
        if (stacked) {  // every stream's memory stacked by rows: one call
          ops::memory_attention<F>(a.att.view().reshape(rows_heads), cview(a.q).reshape(rows_heads),
                                   cview(a.k).reshape(rows_heads), cview(a.v).reshape(rows_heads), cview(all->keys),
                                   cview(all->values), w.gate, config_.positions, offsets);
          if (acts) acts->stacked_memory = all;
        }
        for (std::size_t b = 0; !stacked && b < streams; ++b) {
          const index_t o0 = offsets[b], o1 = offsets[b + 1];
          const Shape heads{o1 - o0, H, dh};
          auto q = cview(a.q).slice(o0, o1).reshape(heads);
          auto k = cview(a.k).slice(o0, o1).reshape(heads);
          auto v = cview(a.v).slice(o0, o1).reshape(heads);
          auto att = a.att.view().slice(o0, o1).reshape(heads);
          const Retrieved<T, L>* mem = retrieve(b, q);
          if (mem && mem->chunks > 0) {
            ops::memory_attention<F>(att, q, k, v, mem->keys, mem->values, w.gate, config_.positions);
            if (acts) acts->memory[b] = mem;
          } else {
            ops::causal_attention(att, q, k, v, config_.positions);
          }
        }
      }
      ops::linear(x, a.att, w.out_weight, w.out_bias, Accumulate::Yes);
      if (acts) {  // the backward needs the pre-activation
        ops::linear(a.fc.view(), a.ln, w.fc1_weight, w.fc1_bias);
        ops::gelu(a.act.view(), cview(a.fc), config_.activation);
      } else {
        ops::linear_gelu(a.act.view(), a.ln, w.fc1_weight, w.fc1_bias, config_.activation);
      }
      ops::linear(x, a.act, w.fc2_weight, w.fc2_bias, Accumulate::Yes);
    }
    TensorView<T, L> ln_f = acts ? acts->ln_f.view() : scratch_.ln.view();
    if (acts) copy(cview(stream_), acts->final_stream.view());
    ops::layer_norm(ln_f, x, params_.ln_f_weight, params_.ln_f_bias, config_.layer_norm_epsilon);
    ops::linear(logits, cview(ln_f), wte, TensorView<const T, L>{});
  }

 private:
  static SideNetParameters<T, L> to_location_parameters(SideNetParameters<T, Host>&& p) {
    if constexpr (std::is_same_v<L, Host>) {
      return std::move(p);
    } else {
      SideNetParameters<T, L> o;
      o.layers.resize(p.layers.size());
      auto mv = [](Tensor<T, Host>& src) { return detail::to_location<T, L>(std::move(src)); };
      for (std::size_t i = 0; i < p.layers.size(); ++i) {
        auto& w = p.layers[i];
        auto& d = o.layers[i];
        d.ln_weight = mv(w.ln_weight); d.ln_bias = mv(w.ln_bias);
        d.q_weight = mv(w.q_weight); d.k_weight = mv(w.k_weight); d.v_weight = mv(w.v_weight); d.out_weight = mv(w.out_weight);
        d.q_bias = mv(w.q_bias); d.k_bias = mv(w.k_bias); d.v_bias = mv(w.v_bias); d.out_bias = mv(w.out_bias);
        d.gate = mv(w.gate);
        d.fc1_weight = mv(w.fc1_weight); d.fc1_bias = mv(w.fc1_bias);
        d.fc2_weight = mv(w.fc2_weight); d.fc2_bias = mv(w.fc2_bias);
      }
      o.ln_f_weight = mv(p.ln_f_weight);
      o.ln_f_bias = mv(p.ln_f_bias);
      return o;
    }
  }

  void check_shapes() const {
    if (config_.n_layer <= 0 || config_.n_embd <= 0 || config_.n_head <= 0 || config_.n_embd % config_.n_head != 0 ||
        config_.n_inner <= 0) {
      detail::fail<ConfigError>("SideNet: sizes n_layer=", config_.n_layer, " n_embd=", config_.n_embd,
                                " n_head=", config_.n_head, " n_inner=", config_.n_inner, " are invalid");
    }
    visit_side_net_tensors(config_, params_, [](const std::string& name, const Tensor<T, L>& t, const Shape& shape) {
      expect_shape(t, shape, ("SideNet " + name).c_str());
    });
  }

  SideNetConfig config_;
  SideNetParameters<T, L> params_;
  std::optional<MemoryConfig> recommended_;
  // Scratch reused across forwards (one layer's intermediates, shared by all layers).
  mutable Tensor<T, L> stream_;
  mutable SideNetLayerActivations<T, L> scratch_;
};

}  // namespace longmem
