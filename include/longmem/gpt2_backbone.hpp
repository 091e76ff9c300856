#pragma once
// The GPT-2 family of frozen backbones (DESIGN.md section 2):
//   gpt2       sequential blocks, learned positions, biases everywhere, eps 1e-5
//   gpt2-star  LongMem's parallel blocks, ALiBi, bias-free q/k/v/out, eps 1e-6
// Weights load from safetensors with Hugging Face GPT-2 names (Conv1D [in, out], with or
// without a "transformer." prefix) or the reference implementation's names (Linear
// [out, in]); hyper-parameters come from __metadata__ or a config.json beside the file.
//
// Forward over one segment (T tokens), per block j (h is the residual stream (T, d)):
//   sequential: h += Wo attn(ln_1 h); h += mlp(ln_2 h)
//   parallel:   a = ln_1 h; h += Wo attn(a) + mlp(a)
// B[0] = embedding, B[j+1] = h after block j, B[L] = ln_f(h_L).
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "longmem/backbone.hpp"
#include "longmem/dtype.hpp"
#include "longmem/error.hpp"
#include "longmem/model_config.hpp"
#include "longmem/ops.hpp"
#include "longmem/safetensors.hpp"
#include "longmem/tensor.hpp"
#include "longmem/weight_reader.hpp"

namespace longmem {

/// Weights of one transformer block, Linear layout [out, in]. Empty tensors are absent
/// parameters (no attention bias in GPT-2*, no ln_2 in parallel blocks).
template <class T, class L = Host>
struct BlockWeights {
  Tensor<T, L> ln_1_weight, ln_1_bias;  // (d)
  Tensor<T, L> ln_2_weight, ln_2_bias;  // (d), sequential blocks only
  Tensor<T, L> q_weight, k_weight, v_weight, out_weight;  // (d, d)
  Tensor<T, L> q_bias, k_bias, v_bias, out_bias;          // (d) or empty
  Tensor<T, L> fc_in_weight;   // (n_inner, d)
  Tensor<T, L> fc_in_bias;     // (n_inner) or empty
  Tensor<T, L> fc_out_weight;  // (d, n_inner)
  Tensor<T, L> fc_out_bias;    // (d) or empty
};

/// Every tensor of a GPT-2 / GPT-2* backbone. The same structure holds weights, their gradients
/// and optimizer moments (llm.c's ParameterTensors).
template <class T, class L = Host>
struct Gpt2Parameters {
  Tensor<T, L> wte;                      // (V, d) token embedding, also the tied output head
  Tensor<T, L> wpe;                      // (P, d) learned positions, empty for ALiBi
  std::vector<BlockWeights<T, L>> blocks;  // n_layer
  Tensor<T, L> ln_f_weight, ln_f_bias;   // (d)
};

/// Calls fn(name, tensor, shape) for every tensor a backbone of `cfg` has, under the reference
/// implementation's names in Linear layout (wte.weight, wpe.weight, h.N.ln_1.weight,
/// h.N.attn.q_proj.weight, ..., h.N.mlp.fc_in.weight, ..., ln_f.weight), whatever the
/// architecture; Hugging Face checkpoints are converted to and from these by load() and save().
/// `params.blocks` must already hold cfg.n_layer entries.
template <class P, class Fn>
void visit_gpt2_tensors(const BackboneConfig& cfg, P& params, Fn&& fn) {
  const index_t d = cfg.n_embd, F = cfg.n_inner;
  if (params.blocks.size() != static_cast<std::size_t>(cfg.n_layer)) {
    detail::fail<ShapeError>("backbone: ", params.blocks.size(), " blocks given for n_layer = ", cfg.n_layer);
  }
  fn(std::string("wte.weight"), params.wte, Shape{cfg.vocab_size, d});
  if (cfg.positions == PositionScheme::Learned) fn(std::string("wpe.weight"), params.wpe, Shape{cfg.n_positions, d});
  for (int j = 0; j < cfg.n_layer; ++j) {
    auto& b = params.blocks[static_cast<std::size_t>(j)];
    const std::string p = "h." + std::to_string(j) + ".";
    fn(p + "ln_1.weight", b.ln_1_weight, Shape{d});
    fn(p + "ln_1.bias", b.ln_1_bias, Shape{d});
    if (cfg.block_style == BlockStyle::Sequential) {
      fn(p + "ln_2.weight", b.ln_2_weight, Shape{d});
      fn(p + "ln_2.bias", b.ln_2_bias, Shape{d});
    }
    fn(p + "attn.q_proj.weight", b.q_weight, Shape{d, d});
    fn(p + "attn.k_proj.weight", b.k_weight, Shape{d, d});
    fn(p + "attn.v_proj.weight", b.v_weight, Shape{d, d});
    fn(p + "attn.out_proj.weight", b.out_weight, Shape{d, d});
    if (cfg.attn_bias) {
      fn(p + "attn.q_proj.bias", b.q_bias, Shape{d});
      fn(p + "attn.k_proj.bias", b.k_bias, Shape{d});
      fn(p + "attn.v_proj.bias", b.v_bias, Shape{d});
      fn(p + "attn.out_proj.bias", b.out_bias, Shape{d});
    }
    fn(p + "mlp.fc_in.weight", b.fc_in_weight, Shape{F, d});
    fn(p + "mlp.fc_in.bias", b.fc_in_bias, Shape{F});
    fn(p + "mlp.fc_out.weight", b.fc_out_weight, Shape{d, F});
    fn(p + "mlp.fc_out.bias", b.fc_out_bias, Shape{d});
  }
  fn(std::string("ln_f.weight"), params.ln_f_weight, Shape{d});
  fn(std::string("ln_f.bias"), params.ln_f_bias, Shape{d});
}

/// Zero-filled host tensors of every shape a backbone of `cfg` has (gradients, optimizer moments).
template <class T>
Gpt2Parameters<T, Host> zero_gpt2_parameters(const BackboneConfig& cfg) {
  Gpt2Parameters<T, Host> p;
  p.blocks.resize(static_cast<std::size_t>(std::max(cfg.n_layer, 0)));
  visit_gpt2_tensors(cfg, p, [](const std::string&, Tensor<T, Host>& t, const Shape& s) {
    t.resize(s);
    fill(t.view(), T(0));
  });
  return p;
}

/// What one block computes over N rows, kept for its backward (training) or reused as scratch.
template <class T, class L = Host>
struct Gpt2BlockActivations {
  Tensor<T, L> ln_1;          // (N, d) ln_1(h)
  Tensor<T, L> q, k, v;       // (N, d) = (N, H, dh)
  Tensor<T, L> att;           // (N, d) attention output before the out projection
  Tensor<T, L> mid;           // (N, d) sequential blocks: h after attention (kept for training only)
  Tensor<T, L> ln_2;          // (N, d) sequential blocks: ln_2(mid)
  Tensor<T, L> fc;            // (N, n_inner) fc_in output, before GELU
  Tensor<T, L> act;           // (N, n_inner) gelu(fc)

  /// for_backward = false: a forward's scratch, without mid and fc (the forward then writes act
  /// by linear_gelu and keeps no pre-activation).
  void resize(const BackboneConfig& c, index_t N, bool for_backward = true) {
    const index_t d = c.n_embd;
    for (Tensor<T, L>* t : {&ln_1, &q, &k, &v, &att}) t->resize({N, d});
    if (c.block_style == BlockStyle::Sequential) {
      if (for_backward) mid.resize({N, d});
      ln_2.resize({N, d});
    }
    if (for_backward) fc.resize({N, c.n_inner});
    act.resize({N, c.n_inner});
  }
};

/// Everything a backbone backward needs besides the weights and the forward's hidden states
/// (block j's input is hidden[j]).
template <class T, class L = Host>
struct Gpt2Activations {
  std::vector<Gpt2BlockActivations<T, L>> blocks;  // n_layer
  Tensor<T, L> final_stream;                       // (N, d) h_L, the input of ln_f

  void resize(const BackboneConfig& c, index_t N) {
    blocks.resize(static_cast<std::size_t>(c.n_layer));
    for (auto& b : blocks) b.resize(c, N);
    final_stream.resize({N, c.n_embd});
  }
};

namespace detail {

/// Reads hyper-parameters from a Hugging Face (or our own) config.json.
inline BackboneConfig backbone_config_from_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) fail<FormatError>(path.string(), ": cannot open the config file");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail<FormatError>(path.string(), ": not valid JSON (", e.what(), ")");
  }
  if (!j.is_object()) fail<FormatError>(path.string(), ": expected a JSON object");
  // Re-express as string metadata so one parser handles both sources.
  std::map<std::string, std::string> md;
  auto num = [&](const char* key) {
    if (!j.contains(key) || j[key].is_null()) return;
    const auto& v = j[key];
    if (v.is_number_unsigned()) {
      md[key] = std::to_string(v.get<unsigned long long>());
    } else if (v.is_number_integer()) {
      md[key] = std::to_string(v.get<long long>());
    } else if (v.is_number()) {
      md[key] = format_double(v.get<double>());
    } else {
      fail<ConfigError>(path.string(), ": '", key, "' must be a number");
    }
  };
  for (const char* k : {"n_layer", "n_embd", "n_head", "n_inner", "vocab_size", "n_positions", "layer_norm_epsilon"}) {
    num(k);
  }
  if (j.contains("activation_function") && j["activation_function"].is_string()) {
    md["activation_function"] = j["activation_function"].get<std::string>();
  }
  if (j.contains("architecture") && j["architecture"].is_string()) {
    md["architecture"] = j["architecture"].get<std::string>();
  } else if (j.contains("model_type") && j["model_type"].is_string() && j["model_type"].get<std::string>() == "gpt2") {
    md["architecture"] = "gpt2";
  } else {
    fail<ConfigError>(path.string(), ": model_type ", j.contains("model_type") ? describe(j["model_type"]) : "<missing>",
                      " is not supported (expected the string 'gpt2')");
  }
  auto refuse = [&](const char* key, bool bad_value, const char* why) {
    if (j.contains(key) && !j[key].is_null() && j[key].is_boolean() && j[key].get<bool>() == bad_value) {
      fail<ConfigError>(path.string(), ": '", key, "' = ", bad_value ? "true" : "false", " is not supported (", why, ")");
    }
  };
  refuse("scale_attn_weights", false, "attention is always scaled by 1/sqrt(head_dim)");
  refuse("scale_attn_by_inverse_layer_idx", true, "per-layer attention scaling is not implemented");
  refuse("add_cross_attention", true, "backbones are decoder-only");
  return backbone_config_from_metadata(MetadataReader(md, path.string()));
}

/// Copies a host tensor to location L (identity for Host).
template <class T, class L>
Tensor<T, L> to_location(Tensor<T, Host>&& t) {
  if constexpr (std::is_same_v<L, Host>) {
    return std::move(t);
  } else {
    Tensor<T, L> d(t.shape());
    copy(cview(t), d.view());
    return d;
  }
}

/// Transposes a host matrix (R, C) -> (C, R); HF Conv1D stores [in, out].
template <class T>
Tensor<T, Host> transpose(TensorView<const T, Host> m) {
  const index_t R = m.dim(0), C = m.dim(1);
  Tensor<T, Host> t({C, R});
  for (index_t r = 0; r < R; ++r)
    for (index_t c = 0; c < C; ++c) t(c, r) = m(r, c);
  return t;
}

/// Columns [c0, c0 + n) of a host matrix (R, C) -> (R, n).
template <class T>
Tensor<T, Host> columns(TensorView<const T, Host> m, index_t c0, index_t n) {
  const index_t R = m.dim(0);
  Tensor<T, Host> t({R, n});
  for (index_t r = 0; r < R; ++r)
    for (index_t c = 0; c < n; ++c) t(r, c) = m(r, c0 + c);
  return t;
}

/// Elements [b, b + n) of a vector.
template <class T>
Tensor<T, Host> segment(TensorView<const T, Host> v, index_t b, index_t n) {
  Tensor<T, Host> t({n});
  for (index_t i = 0; i < n; ++i) t(i) = v(b + i);
  return t;
}

}  // namespace detail

/// A frozen GPT-2 / GPT-2* backbone computing in T on location L (float or double; bfloat16 or half
/// on the device: make a float host backbone, then `to<Device, bfloat16>()` or `to<Device, half>()`).
/// forward() reuses internal scratch buffers: one instance serves one thread at a time.
template <class T, class L = Host>
  requires ModelValueType<T, L>
class Gpt2Backbone {
 public:
  using value_type = T;
  using location = L;

  Gpt2Backbone(BackboneConfig config, Gpt2Parameters<T, L> params) : config_(std::move(config)), params_(std::move(params)) {
    config_.validate();
    check_shapes();
  }

  Gpt2Backbone(BackboneConfig config, Tensor<T, L> wte, Tensor<T, L> wpe, std::vector<BlockWeights<T, L>> blocks,
               Tensor<T, L> ln_f_weight, Tensor<T, L> ln_f_bias)
      : Gpt2Backbone(std::move(config), Gpt2Parameters<T, L>{std::move(wte), std::move(wpe), std::move(blocks),
                                                             std::move(ln_f_weight), std::move(ln_f_bias)}) {}

  /// Loads a safetensors checkpoint. Hyper-parameters come from its __metadata__ or from
  /// `config.json` in the same folder; when both exist they must agree.
  static Gpt2Backbone load(const std::filesystem::path& path) {
    static_assert(std::is_same_v<L, Host>, "load a host backbone first, then copy it to the device");
    SafetensorsFile file = SafetensorsFile::open(path);
    const auto json_path = path.parent_path() / "config.json";
    std::optional<BackboneConfig> from_json;
    if (std::filesystem::exists(json_path)) from_json = detail::backbone_config_from_json(json_path);
    return from_file(file, from_json);
  }

  /// Builds from an open file; `json_config` (from config.json) is used when the file's
  /// metadata has no architecture key, and must agree with it otherwise.
  static Gpt2Backbone from_file(const SafetensorsFile& file, std::optional<BackboneConfig> json_config = std::nullopt) {
    MetadataReader md(file.metadata(), file.name());
    BackboneConfig cfg;
    if (md.has("architecture")) {
      cfg = backbone_config_from_metadata(md);
      if (json_config && !(*json_config == cfg)) {
        detail::fail<ConfigError>(file.name(), ": the hyper-parameters in __metadata__ and in config.json disagree (",
                                  describe(cfg), " vs ", describe(*json_config), ")");
      }
    } else if (json_config) {
      cfg = *json_config;
    } else {
      detail::fail<ConfigError>(file.name(), ": no hyper-parameters: the file's __metadata__ has no 'architecture' and there is "
                                "no config.json beside it");
    }
    // Every size is checked against the tensors the file holds before anything is sized from it.
    const char* src = md.has("architecture") ? "metadata" : "config.json";
    detail::check_layer_count(file, "n_layer", cfg.n_layer, "h.", ".ln_1.weight", src);
    const std::vector<std::string> prefixes{"", "transformer."};
    WeightReader r(file, prefixes);
    const bool hf_names = r.has("h.0.attn.c_attn.weight");
    {
      auto extent = [&](const char* key, long long v, const char* tensor, int axis, const char* what) {
        detail::check_extent(file, prefixes, src, key, v, tensor, axis, what);
      };
      extent("vocab_size", cfg.vocab_size, "wte.weight", 0, "rows");
      extent("n_embd", cfg.n_embd, "wte.weight", 1, "columns");
      if (cfg.positions == PositionScheme::Learned) extent("n_positions", cfg.n_positions, "wpe.weight", 0, "rows");
      if (hf_names) {
        extent("n_inner", cfg.n_inner, "h.0.mlp.c_fc.weight", 1, "columns");  // Conv1D [in, out]
      } else {
        extent("n_inner", cfg.n_inner, "h.0.mlp.fc_in.weight", 0, "rows");
      }
    }
    const index_t d = cfg.n_embd, V = cfg.vocab_size, F = cfg.n_inner;
    auto wte = r.read<T>("wte.weight", {V, d});
    Tensor<T, Host> wpe;
    if (cfg.positions == PositionScheme::Learned) wpe = r.read<T>("wpe.weight", {cfg.n_positions, d});
    std::vector<BlockWeights<T, L>> blocks;
    blocks.reserve(static_cast<std::size_t>(cfg.n_layer));
    for (int j = 0; j < cfg.n_layer; ++j) {
      const std::string p = "h." + std::to_string(j) + ".";
      BlockWeights<T, Host> b;
      b.ln_1_weight = r.read<T>(p + "ln_1.weight", {d});
      b.ln_1_bias = r.read<T>(p + "ln_1.bias", {d});
      if (cfg.block_style == BlockStyle::Sequential) {
        b.ln_2_weight = r.read<T>(p + "ln_2.weight", {d});
        b.ln_2_bias = r.read<T>(p + "ln_2.bias", {d});
      }
      if (hf_names) {
        // Conv1D layout [in, out]; c_attn packs q | k | v along out.
        auto c_attn = r.read<T>(p + "attn.c_attn.weight", {d, 3 * d});
        b.q_weight = detail::transpose<T>(detail::columns<T>(cview(c_attn), 0, d));
        b.k_weight = detail::transpose<T>(detail::columns<T>(cview(c_attn), d, d));
        b.v_weight = detail::transpose<T>(detail::columns<T>(cview(c_attn), 2 * d, d));
        b.out_weight = detail::transpose<T>(cview(r.read<T>(p + "attn.c_proj.weight", {d, d})));
        if (cfg.attn_bias) {
          auto c_attn_b = r.read<T>(p + "attn.c_attn.bias", {3 * d});
          b.q_bias = detail::segment<T>(cview(c_attn_b), 0, d);
          b.k_bias = detail::segment<T>(cview(c_attn_b), d, d);
          b.v_bias = detail::segment<T>(cview(c_attn_b), 2 * d, d);
          b.out_bias = r.read<T>(p + "attn.c_proj.bias", {d});
        }
        b.fc_in_weight = detail::transpose<T>(cview(r.read<T>(p + "mlp.c_fc.weight", {d, F})));
        b.fc_in_bias = r.read<T>(p + "mlp.c_fc.bias", {F});
        b.fc_out_weight = detail::transpose<T>(cview(r.read<T>(p + "mlp.c_proj.weight", {F, d})));
        b.fc_out_bias = r.read<T>(p + "mlp.c_proj.bias", {d});
        r.ignore(p + "attn.bias");  // causal-mask buffers of old HF checkpoints, not weights
        r.ignore(p + "attn.masked_bias");
      } else {
        b.q_weight = r.read<T>(p + "attn.q_proj.weight", {d, d});
        b.k_weight = r.read<T>(p + "attn.k_proj.weight", {d, d});
        b.v_weight = r.read<T>(p + "attn.v_proj.weight", {d, d});
        b.out_weight = r.read<T>(p + "attn.out_proj.weight", {d, d});
        if (cfg.attn_bias) {
          b.q_bias = r.read<T>(p + "attn.q_proj.bias", {d});
          b.k_bias = r.read<T>(p + "attn.k_proj.bias", {d});
          b.v_bias = r.read<T>(p + "attn.v_proj.bias", {d});
          b.out_bias = r.read<T>(p + "attn.out_proj.bias", {d});
        }
        b.fc_in_weight = r.read<T>(p + "mlp.fc_in.weight", {F, d});
        b.fc_in_bias = r.read<T>(p + "mlp.fc_in.bias", {F});
        b.fc_out_weight = r.read<T>(p + "mlp.fc_out.weight", {d, F});
        b.fc_out_bias = r.read<T>(p + "mlp.fc_out.bias", {d});
      }
      blocks.push_back(to_location_block(std::move(b)));
    }
    auto ln_f_w = r.read<T>("ln_f.weight", {d});
    auto ln_f_b = r.read<T>("ln_f.bias", {d});
    check_tied_head(r, cview(wte));
    r.expect_all_used("GPT-2 backbone");
    return Gpt2Backbone(cfg, detail::to_location<T, L>(std::move(wte)), detail::to_location<T, L>(std::move(wpe)),
                        std::move(blocks), detail::to_location<T, L>(std::move(ln_f_w)),
                        detail::to_location<T, L>(std::move(ln_f_b)));
  }

  /// Random weights (a test and demo model): N(0, std) matrices, LayerNorm N(1, 0.1).
  static Gpt2Backbone random(const BackboneConfig& cfg, std::uint64_t seed, double std_dev = 0.02) {
    static_assert(std::is_same_v<L, Host>, "random backbones are made on the host");
    cfg.validate();
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    auto make = [&](Shape s, double mean, double sd) {
      Tensor<T, Host> t(s);
      for (auto& x : t) x = static_cast<T>(mean + sd * normal(rng));
      return t;
    };
    const index_t d = cfg.n_embd, F = cfg.n_inner;
    auto wte = make({cfg.vocab_size, d}, 0, std_dev);
    Tensor<T, Host> wpe;
    if (cfg.positions == PositionScheme::Learned) wpe = make({cfg.n_positions, d}, 0, std_dev);
    std::vector<BlockWeights<T, L>> blocks;
    for (int j = 0; j < cfg.n_layer; ++j) {
      BlockWeights<T, Host> b;
      b.ln_1_weight = make({d}, 1, 0.1);
      b.ln_1_bias = make({d}, 0, 0.1);
      if (cfg.block_style == BlockStyle::Sequential) {
        b.ln_2_weight = make({d}, 1, 0.1);
        b.ln_2_bias = make({d}, 0, 0.1);
      }
      b.q_weight = make({d, d}, 0, std_dev);
      b.k_weight = make({d, d}, 0, std_dev);
      b.v_weight = make({d, d}, 0, std_dev);
      b.out_weight = make({d, d}, 0, std_dev);
      if (cfg.attn_bias) {
        b.q_bias = make({d}, 0, std_dev);
        b.k_bias = make({d}, 0, std_dev);
        b.v_bias = make({d}, 0, std_dev);
        b.out_bias = make({d}, 0, std_dev);
      }
      b.fc_in_weight = make({F, d}, 0, std_dev);
      b.fc_in_bias = make({F}, 0, std_dev);
      b.fc_out_weight = make({d, F}, 0, std_dev);
      b.fc_out_bias = make({d}, 0, std_dev);
      blocks.push_back(to_location_block(std::move(b)));
    }
    auto ln_f_w = make({d}, 1, 0.1);
    auto ln_f_b = make({d}, 0, 0.1);
    return Gpt2Backbone(cfg, std::move(wte), std::move(wpe), std::move(blocks), std::move(ln_f_w), std::move(ln_f_b));
  }

  /// Writes a checkpoint: GPT-2 under Hugging Face names, GPT-2* under the reference
  /// implementation's names, hyper-parameters in __metadata__ (host backbones).
  void save(const std::filesystem::path& path) const {
    static_assert(std::is_same_v<L, Host>, "save a host backbone");
    SafetensorsWriter w;
    std::map<std::string, std::string> md;
    backbone_config_to_metadata(config_, md);
    w.set_metadata(md);
    const index_t d = config_.n_embd;
    w.add<T>("wte.weight", params_.wte.view());
    if (!params_.wpe.empty()) w.add<T>("wpe.weight", params_.wpe.view());
    const bool hf_names = config_.architecture == "gpt2";
    for (int j = 0; j < config_.n_layer; ++j) {
      const auto& b = params_.blocks[static_cast<std::size_t>(j)];
      const std::string p = "h." + std::to_string(j) + ".";
      w.add<T>(p + "ln_1.weight", b.ln_1_weight.view());
      w.add<T>(p + "ln_1.bias", b.ln_1_bias.view());
      if (!b.ln_2_weight.empty()) {
        w.add<T>(p + "ln_2.weight", b.ln_2_weight.view());
        w.add<T>(p + "ln_2.bias", b.ln_2_bias.view());
      }
      if (hf_names) {
        Tensor<T, Host> c_attn({d, 3 * d});
        for (index_t i = 0; i < d; ++i)
          for (index_t o = 0; o < d; ++o) {
            c_attn(i, o) = b.q_weight(o, i);
            c_attn(i, d + o) = b.k_weight(o, i);
            c_attn(i, 2 * d + o) = b.v_weight(o, i);
          }
        w.add<T>(p + "attn.c_attn.weight", c_attn.view());
        w.add<T>(p + "attn.c_proj.weight", detail::transpose<T>(b.out_weight.view()).view());
        if (config_.attn_bias) {
          Tensor<T, Host> c_attn_b({3 * d});
          for (index_t o = 0; o < d; ++o) {
            c_attn_b(o) = b.q_bias(o);
            c_attn_b(d + o) = b.k_bias(o);
            c_attn_b(2 * d + o) = b.v_bias(o);
          }
          w.add<T>(p + "attn.c_attn.bias", c_attn_b.view());
          w.add<T>(p + "attn.c_proj.bias", b.out_bias.view());
        }
        w.add<T>(p + "mlp.c_fc.weight", detail::transpose<T>(b.fc_in_weight.view()).view());
        w.add<T>(p + "mlp.c_fc.bias", b.fc_in_bias.view());
        w.add<T>(p + "mlp.c_proj.weight", detail::transpose<T>(b.fc_out_weight.view()).view());
        w.add<T>(p + "mlp.c_proj.bias", b.fc_out_bias.view());
      } else {
        w.add<T>(p + "attn.q_proj.weight", b.q_weight.view());
        w.add<T>(p + "attn.k_proj.weight", b.k_weight.view());
        w.add<T>(p + "attn.v_proj.weight", b.v_weight.view());
        w.add<T>(p + "attn.out_proj.weight", b.out_weight.view());
        if (config_.attn_bias) {
          w.add<T>(p + "attn.q_proj.bias", b.q_bias.view());
          w.add<T>(p + "attn.k_proj.bias", b.k_bias.view());
          w.add<T>(p + "attn.v_proj.bias", b.v_bias.view());
          w.add<T>(p + "attn.out_proj.bias", b.out_bias.view());
        }
        w.add<T>(p + "mlp.fc_in.weight", b.fc_in_weight.view());
        w.add<T>(p + "mlp.fc_in.bias", b.fc_in_bias.view());
        w.add<T>(p + "mlp.fc_out.weight", b.fc_out_weight.view());
        w.add<T>(p + "mlp.fc_out.bias", b.fc_out_bias.view());
      }
    }
    w.add<T>("ln_f.weight", params_.ln_f_weight.view());
    w.add<T>("ln_f.bias", params_.ln_f_bias.view());
    w.write(path);
  }

  const BackboneConfig& config() const { return config_; }
  TensorView<const T, L> token_embedding() const { return params_.wte.view(); }
  TensorView<const T, L> position_embedding() const { return params_.wpe.view(); }
  const BlockWeights<T, L>& block(int j) const { return params_.blocks.at(static_cast<std::size_t>(j)); }
  TensorView<const T, L> ln_f_weight() const { return params_.ln_f_weight.view(); }
  TensorView<const T, L> ln_f_bias() const { return params_.ln_f_bias.view(); }
  /// The same backbone with every weight copied to location L2 (and converted to T2): load (or
  /// make) a host backbone, then `to<Device>()` (or to_device()) for the GPU, or
  /// `to<Device, bfloat16>()` / `to<Device, half>()` for a bf16 / fp16 one (weights rounded to nearest
  /// even once, on the host; a weight beyond fp16's range is an InputError).
  /// The fingerprint is carried over (a converted backbone keeps its source's), so a device model
  /// checks its SideNet without reading wte back. Throws BackendError when L2 is Device and the
  /// CUDA runtime sees no usable device.
  template <class L2, class T2 = T>
    requires ModelValueType<T2, L2>
  Gpt2Backbone<T2, L2> to() const {
    static_assert(std::is_same_v<T2, T> || std::is_same_v<L, Host>, "convert a host backbone (to<L2, T2>() on the host)");
    detail::Allocator<L2>::require_usable("Gpt2Backbone::to_device (copying the backbone's weights to the GPU)");
    Gpt2Parameters<T2, L2> p;
    p.blocks.resize(params_.blocks.size());
    std::vector<Tensor<T2, L2>*> dst;
    visit_gpt2_tensors(config_, p, [&](const std::string&, Tensor<T2, L2>& t, const Shape&) { dst.push_back(&t); });
    std::size_t i = 0;
    visit_gpt2_tensors(config_, params_, [&](const std::string&, const Tensor<T, L>& t, const Shape&) {
      assign_converted(cview(t), *dst[i++]);
    });
    Gpt2Backbone<T2, L2> moved(config_, std::move(p));
    moved.fingerprint_ = fingerprint();
    return moved;
  }
  Gpt2Backbone<T, Device> to_device() const { return to<Device>(); }

  /// An independent copy (a backbone is move-only because its tensors are).
  Gpt2Backbone clone() const {
    Gpt2Parameters<T, L> p;
    p.blocks.resize(params_.blocks.size());
    auto dst = [&] {
      std::vector<Tensor<T, L>*> v;
      visit_gpt2_tensors(config_, p, [&](const std::string&, Tensor<T, L>& t, const Shape&) { v.push_back(&t); });
      return v;
    }();
    std::size_t i = 0;
    visit_gpt2_tensors(config_, params_, [&](const std::string&, const Tensor<T, L>& t, const Shape&) {
      dst[i]->resize(t.shape());
      copy(cview(t), dst[i++]->view());
    });
    return Gpt2Backbone(config_, std::move(p));
  }

  /// Every weight (training updates them in place; shapes must not change). A change to wte
  /// changes the fingerprint: call refresh_fingerprint() after updating it.
  const Gpt2Parameters<T, L>& parameters() const { return params_; }
  Gpt2Parameters<T, L>& parameters() { return params_; }
  void refresh_fingerprint() { fingerprint_.clear(); }

  /// "fnv1a64:..." of the token embedding; SideNet files record it to name their backbone.
  std::string fingerprint() const {
    if (fingerprint_.empty()) {
      if constexpr (std::is_same_v<L, Host>) {
        fingerprint_ = detail::embedding_fingerprint<T>(params_.wte.view());
      } else {
        Tensor<T, Host> h(params_.wte.shape());
        copy(params_.wte.view(), h.view());
        fingerprint_ = detail::embedding_fingerprint<T>(h.view());
      }
    }
    return fingerprint_;
  }

  /// One segment. Throws InputError for an empty segment, token ids outside the
  /// vocabulary or a segment longer than n_positions; ConfigError for a memory layer
  /// outside [0, n_layer).
  void forward(std::span<const std::int32_t> tokens, const BackboneRequest& req, BackboneOutput<T, L>& out) const {
    const std::span<const std::int32_t> one[1] = {tokens};
    forward(std::span<const std::span<const std::int32_t>>(one), req, out);
  }

  /// A batch of independent segments (one per stream, lengths may differ) as one pass: rows of
  /// every (N, .) buffer are the segments one after another (out.offsets, N = the total), so
  /// each GEMM sees all N rows; attention and positions stay within each segment.
  ///   out.hidden (L+1, N, d), out.mem_keys / mem_values (N, H, dh), out.logits (N, V)
  /// With `acts`, every block's intermediates are kept there for a backward pass (training);
  /// the results are the same bits either way.
  void forward(std::span<const std::span<const std::int32_t>> segments, const BackboneRequest& req,
               BackboneOutput<T, L>& out, Gpt2Activations<T, L>* acts = nullptr) const {
    const index_t d = config_.n_embd, H = config_.n_head, dh = config_.head_dim();
    const int nL = config_.n_layer;
    if (segments.empty()) detail::fail<InputError>("backbone forward: no segments given");
    out.offsets.assign(1, 0);
    for (std::size_t b = 0; b < segments.size(); ++b) {
      const index_t Tn = static_cast<index_t>(segments[b].size());
      const std::string which = segments.size() > 1 ? detail::concat(" of stream ", b) : std::string();
      if (Tn == 0) detail::fail<InputError>("backbone forward: the segment", which, " is empty");
      if (Tn > config_.n_positions) {
        detail::fail<InputError>("backbone forward: the segment", which, " has ", Tn,
                                 " tokens but the model accepts at most ", config_.n_positions,
                                 " (n_positions); split the input into shorter segments");
      }
      out.offsets.push_back(out.offsets.back() + Tn);
    }
    if (req.memory_layer < -1 || req.memory_layer >= nL) {
      detail::fail<ConfigError>("backbone forward: memory_layer ", req.memory_layer, " is outside [0, ", nL, ")");
    }
    if (acts && !req.hidden_states) {
      detail::fail<InputError>("backbone forward: keeping activations for a backward needs hidden_states (block inputs)");
    }
    const index_t N = out.offsets.back();
    const auto& offsets = out.offsets;
    out.hidden.resize(req.hidden_states ? Shape{nL + 1, N, d} : Shape{1, N, d});
    stream_.resize({N, d});
    if (acts) acts->resize(config_, N);
    scratch_.resize(config_, N, /*for_backward=*/false);

    TensorView<T, L> h = stream_.view();  // residual stream h_j (N, d)
    for (std::size_t b = 0; b < segments.size(); ++b) {
      ops::embedding(h.slice(offsets[b], offsets[b + 1]), segments[b], params_.wte, params_.wpe);
    }
    if (req.hidden_states) copy(cview(stream_), out.hidden[0]);

    const Shape heads{N, H, dh};
    for (int j = 0; j < nL; ++j) {
      const auto& w = params_.blocks[static_cast<std::size_t>(j)];
      Gpt2BlockActivations<T, L>& a = acts ? acts->blocks[static_cast<std::size_t>(j)] : scratch_;
      // attention: h += Wo attn(ln_1 h)
      ops::layer_norm(a.ln_1.view(), h, w.ln_1_weight, w.ln_1_bias, config_.layer_norm_epsilon);
      ops::linear(a.q.view(), a.ln_1, w.q_weight, w.q_bias);
      ops::linear(a.k.view(), a.ln_1, w.k_weight, w.k_bias);
      ops::linear(a.v.view(), a.ln_1, w.v_weight, w.v_bias);
      // Each segment attends within itself; every segment in one call (one launch on the GPU).
      ops::causal_attention(a.att.view().reshape(heads), cview(a.q).reshape(heads), cview(a.k).reshape(heads),
                            cview(a.v).reshape(heads), config_.positions, std::span<const index_t>(offsets));
      ops::linear(h, a.att, w.out_weight, w.out_bias, Accumulate::Yes);
      if (j == req.memory_layer) {
        out.mem_keys.resize(heads);
        out.mem_values.resize(heads);
        copy(cview(a.k), out.mem_keys.view().reshape({N, d}));
        copy(cview(a.v), out.mem_values.view().reshape({N, d}));
      }
      // MLP: h += fc_out(gelu(fc_in(x))), x = ln_2 h (sequential) or ln_1's output (parallel)
      TensorView<const T, L> mlp_in = a.ln_1.view();
      if (config_.block_style == BlockStyle::Sequential) {
        if (acts) copy(cview(stream_), a.mid.view());
        ops::layer_norm(a.ln_2.view(), h, w.ln_2_weight, w.ln_2_bias, config_.layer_norm_epsilon);
        mlp_in = a.ln_2.view();
      }
      if (acts) {  // the backward needs the pre-activation
        ops::linear(a.fc.view(), mlp_in, w.fc_in_weight, w.fc_in_bias);
        ops::gelu(a.act.view(), cview(a.fc), config_.activation);
      } else {
        ops::linear_gelu(a.act.view(), mlp_in, w.fc_in_weight, w.fc_in_bias, config_.activation);
      }
      ops::linear(h, a.act, w.fc_out_weight, w.fc_out_bias, Accumulate::Yes);
      if (req.hidden_states && j + 1 < nL) copy(cview(stream_), out.hidden[j + 1]);
    }
    if (acts) copy(cview(stream_), acts->final_stream.view());
    // B[L] = ln_f(h_L)
    TensorView<T, L> last = out.hidden[out.hidden.dim(0) - 1];
    ops::layer_norm(last, h, params_.ln_f_weight, params_.ln_f_bias, config_.layer_norm_epsilon);
    if (req.memory_layer < 0) {
      out.mem_keys.resize({0, H, dh});
      out.mem_values.resize({0, H, dh});
    }
    if (req.logits) {
      out.logits.resize({N, config_.vocab_size});
      ops::linear(out.logits.view(), cview(last), params_.wte, TensorView<const T, L>{});
    } else {
      out.logits.resize({0, config_.vocab_size});
    }
  }

 private:
  static BlockWeights<T, L> to_location_block(BlockWeights<T, Host>&& b) {
    if constexpr (std::is_same_v<L, Host>) {
      return std::move(b);
    } else {
      BlockWeights<T, L> o;
      auto mv = [](Tensor<T, Host>& src) { return detail::to_location<T, L>(std::move(src)); };
      o.ln_1_weight = mv(b.ln_1_weight); o.ln_1_bias = mv(b.ln_1_bias);
      o.ln_2_weight = mv(b.ln_2_weight); o.ln_2_bias = mv(b.ln_2_bias);
      o.q_weight = mv(b.q_weight); o.k_weight = mv(b.k_weight); o.v_weight = mv(b.v_weight); o.out_weight = mv(b.out_weight);
      o.q_bias = mv(b.q_bias); o.k_bias = mv(b.k_bias); o.v_bias = mv(b.v_bias); o.out_bias = mv(b.out_bias);
      o.fc_in_weight = mv(b.fc_in_weight); o.fc_in_bias = mv(b.fc_in_bias);
      o.fc_out_weight = mv(b.fc_out_weight); o.fc_out_bias = mv(b.fc_out_bias);
      return o;
    }
  }

  // An untied lm_head would silently change the model: accept only a copy of wte.
  static void check_tied_head(WeightReader& r, TensorView<const T, Host> wte) {
    if (!r.has("lm_head.weight")) return;
    auto head = r.read<T>("lm_head.weight", wte.shape());
    for (index_t i = 0; i < wte.numel(); ++i) {
      if (head.data()[i] != wte.data()[i]) {
        detail::fail<FormatError>(r.file().name(), ": lm_head.weight differs from wte.weight; untied output heads are not supported");
      }
    }
  }

  static std::string describe(const BackboneConfig& c) {
    return detail::concat(c.architecture, " L=", c.n_layer, " d=", c.n_embd, " H=", c.n_head, " n_inner=", c.n_inner,
                          " V=", c.vocab_size, " P=", c.n_positions, " eps=", c.layer_norm_epsilon, " act=",
                          to_string(c.activation));
  }

  void check_shapes() const {
    if (config_.positions == PositionScheme::Alibi && !params_.wpe.empty()) {
      detail::fail<ShapeError>("backbone: an ALiBi backbone has no position embedding, but wpe has shape ",
                               params_.wpe.shape().str());
    }
    visit_gpt2_tensors(config_, params_, [](const std::string& name, const Tensor<T, L>& t, const Shape& shape) {
      expect_shape(t, shape, name.c_str());
    });
  }

  template <class T2, class L2>
    requires ModelValueType<T2, L2>
  friend class Gpt2Backbone;  // to<L2>() hands its fingerprint over

  BackboneConfig config_;
  Gpt2Parameters<T, L> params_;
  mutable std::string fingerprint_;
  // Scratch reused across forwards (one block's intermediates, shared by all blocks).
  mutable Tensor<T, L> stream_;
  mutable Gpt2BlockActivations<T, L> scratch_;
};

static_assert(Backbone<Gpt2Backbone<float>>);
static_assert(Backbone<Gpt2Backbone<double>>);

}  // namespace longmem
