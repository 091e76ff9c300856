#pragma once
// Hyper-parameters of backbones, SideNets and memory, and how they are read from a
// safetensors file's __metadata__ (string values) or a Hugging Face config.json.
//
// Metadata keys (all values are strings in safetensors; numbers in config.json):
//   architecture         "gpt2" | "gpt2-star" | "longmem-sidenet"
//   n_layer n_embd n_head n_inner vocab_size n_positions layer_norm_epsilon
//   activation_function  "gelu_new" (tanh form) | "gelu" (erf form)
//   SideNet only: reduction_factor memory_layer position_embedding ("learned"|"alibi")
//                 attn_bias ("true"|"false") backbone_fingerprint
//                 memory_tokens chunk_size retrieved_tokens (recommended memory settings)
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

#include "longmem/error.hpp"

namespace longmem {

/// Bounds on sizes that no tensor of a file can confirm, checked before anything is sized from
/// them. Everything else a file states (layer counts, widths, vocabularies, MLP widths, heads
/// with a gate) is checked against the tensors it holds.
namespace limits {
/// Longest segment a backbone may declare (n_positions): 2^24 tokens. Positions and ALiBi
/// distances are computed in the compute type, and float holds every integer only up to 2^24;
/// past it neighbouring positions get the same bias. (A learned-position file must also hold
/// that many wpe rows.)
inline constexpr int max_positions = 1 << 24;
/// Largest memory_tokens (and so chunk_size and retrieved_tokens, which may not exceed it): 2^30,
/// the range longmem-run and longmem-train accept on their command lines, so a file cannot
/// recommend what a user could not ask for; it is 16,384 times the paper's 65,536-token memory.
/// Whether the banks fit this machine is checked when they are built.
inline constexpr int max_memory_tokens = 1 << 30;
}  // namespace limits

/// How a block combines attention and MLP.
enum class BlockStyle : std::uint8_t {
  Sequential,  ///< GPT-2: h += attn(ln_1 h); h += mlp(ln_2 h)
  Parallel,    ///< GPT-2* / GPT-J / SideNet: h += attn(ln_1 h) + mlp(ln_1 h)
};

/// How positions enter attention.
enum class PositionScheme : std::uint8_t {
  Learned,  ///< wpe added to the token embedding (GPT-2)
  Alibi,    ///< linear bias -slope_h * (t - s) on causal scores
};

/// GELU variant of the MLP.
enum class Activation : std::uint8_t {
  GeluTanh,  ///< 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), HF "gelu_new"
  GeluErf,   ///< 0.5 x (1 + erf(x / sqrt 2)), HF "gelu"
};

inline const char* to_string(BlockStyle s) { return s == BlockStyle::Sequential ? "sequential" : "parallel"; }
inline const char* to_string(PositionScheme p) { return p == PositionScheme::Learned ? "learned" : "alibi"; }
inline const char* to_string(Activation a) { return a == Activation::GeluTanh ? "gelu_new" : "gelu"; }

/// A frozen GPT-2-family backbone.
struct BackboneConfig {
  std::string architecture = "gpt2";  ///< "gpt2" or "gpt2-star"
  BlockStyle block_style = BlockStyle::Sequential;
  PositionScheme positions = PositionScheme::Learned;
  Activation activation = Activation::GeluTanh;
  int n_layer = 0;
  int n_embd = 0;
  int n_head = 0;
  int n_inner = 0;      ///< MLP width; 4 * n_embd when absent from the file
  int vocab_size = 0;
  int n_positions = 0;  ///< longest segment the model accepts
  double layer_norm_epsilon = 1e-5;
  bool attn_bias = true;  ///< biases on q/k/v/out (GPT-2: yes; GPT-2*: no)
  bool mlp_bias = true;

  int head_dim() const { return n_embd / n_head; }

  /// GPT-2 defaults (sequential, learned positions, eps 1e-5, biases everywhere).
  static BackboneConfig gpt2(int n_layer, int n_embd, int n_head, int vocab_size, int n_positions) {
    BackboneConfig c;
    c.n_layer = n_layer;
    c.n_embd = n_embd;
    c.n_head = n_head;
    c.n_inner = static_cast<int>(std::min<long long>(4LL * n_embd, INT_MAX));  // (a width that large fits no file)
    c.vocab_size = vocab_size;
    c.n_positions = n_positions;
    return c;
  }

  /// LongMem's GPT-2* defaults (parallel, ALiBi, eps 1e-6, bias-free attention).
  static BackboneConfig gpt2_star(int n_layer, int n_embd, int n_head, int vocab_size, int n_positions) {
    BackboneConfig c = gpt2(n_layer, n_embd, n_head, vocab_size, n_positions);
    c.architecture = "gpt2-star";
    c.block_style = BlockStyle::Parallel;
    c.positions = PositionScheme::Alibi;
    c.layer_norm_epsilon = 1e-6;
    c.attn_bias = false;
    return c;
  }

  /// Throws ConfigError naming the first bad field.
  void validate() const {
    auto positive = [](const char* name, long long v) {
      if (v <= 0) detail::fail<ConfigError>("backbone config: ", name, " must be positive, got ", v);
    };
    positive("n_layer", n_layer);
    positive("n_embd", n_embd);
    positive("n_head", n_head);
    positive("n_inner", n_inner);
    positive("vocab_size", vocab_size);
    positive("n_positions", n_positions);
    if (n_positions > limits::max_positions) {
      detail::fail<ConfigError>("backbone config: n_positions = ", n_positions, " exceeds the ", limits::max_positions,
                                " (2^24) positions float computes exactly");
    }
    if (n_embd % n_head != 0) {
      detail::fail<ConfigError>("backbone config: n_embd (", n_embd, ") must be divisible by n_head (", n_head, ")");
    }
    if (!(layer_norm_epsilon > 0) || !std::isfinite(layer_norm_epsilon)) {
      detail::fail<ConfigError>("backbone config: layer_norm_epsilon must be a positive finite number, got ",
                                layer_norm_epsilon);
    }
  }

  friend bool operator==(const BackboneConfig&, const BackboneConfig&) = default;
};

/// Run-time memory settings: how much to remember and how much to retrieve.
struct MemoryConfig {
  bool enabled = true;          ///< false: the baseline without memory (plain SideNet attention)
  int memory_tokens = 65536;    ///< msz: bank capacity in tokens, per stream
  int chunk_size = 4;           ///< csz: tokens per chunk
  int retrieved_tokens = 64;    ///< K: tokens retrieved per query (K / csz chunks)

  int capacity_chunks() const { return memory_tokens / chunk_size; }
  int retrieved_chunks() const { return retrieved_tokens / chunk_size; }

  /// Throws ConfigError for settings that don't divide or are out of range.
  void validate() const {
    if (chunk_size <= 0) detail::fail<ConfigError>("memory config: chunk_size must be positive, got ", chunk_size);
    if (memory_tokens <= 0) detail::fail<ConfigError>("memory config: memory_tokens must be positive, got ", memory_tokens);
    if (retrieved_tokens <= 0) {
      detail::fail<ConfigError>("memory config: retrieved_tokens must be positive, got ", retrieved_tokens);
    }
    if (retrieved_tokens % chunk_size != 0) {
      detail::fail<ConfigError>("memory config: chunk_size (", chunk_size, ") must divide retrieved_tokens (",
                                retrieved_tokens, ")");
    }
    if (memory_tokens % chunk_size != 0) {
      detail::fail<ConfigError>("memory config: memory_tokens (", memory_tokens, ") must be a multiple of chunk_size (",
                                chunk_size, ")");
    }
    if (memory_tokens > limits::max_memory_tokens) {
      detail::fail<ConfigError>("memory config: memory_tokens = ", memory_tokens, " exceeds the limit of ",
                                limits::max_memory_tokens, " (2^30) tokens per stream");
    }
    if (retrieved_tokens > memory_tokens) {
      detail::fail<ConfigError>("memory config: retrieved_tokens (", retrieved_tokens,
                                ") cannot exceed memory_tokens (", memory_tokens, ")");
    }
  }

  friend bool operator==(const MemoryConfig&, const MemoryConfig&) = default;
};

/// The residual SideNet beside a backbone.
struct SideNetConfig {
  int n_layer = 0;  ///< backbone n_layer / reduction_factor
  int n_embd = 0;
  int n_head = 0;
  int n_inner = 0;
  double layer_norm_epsilon = 1e-5;
  bool attn_bias = false;  ///< the reference's SideNet has bias-free q/k/v/out
  Activation activation = Activation::GeluErf;
  PositionScheme positions = PositionScheme::Alibi;  ///< follows the backbone
  int reduction_factor = 2;  ///< r
  int memory_layer = 0;      ///< m: the backbone layer whose keys/values are remembered
  std::string backbone_fingerprint;  ///< identifies the backbone it was made for; empty: unchecked

  int head_dim() const { return n_embd / n_head; }
  /// i* = floor(m / r): the SideNet layer with memory-augmented attention.
  int memory_augmented_layer() const { return memory_layer / reduction_factor; }

  /// The reference SideNet for a backbone: L/r layers of the same width, gates at 0.
  static SideNetConfig for_backbone(const BackboneConfig& b, int memory_layer, int reduction_factor = 2) {
    SideNetConfig c;
    c.reduction_factor = reduction_factor;
    c.n_layer = reduction_factor > 0 ? b.n_layer / reduction_factor : 0;
    c.n_embd = b.n_embd;
    c.n_head = b.n_head;
    c.n_inner = b.n_inner;
    c.positions = b.positions;
    c.memory_layer = memory_layer;
    return c;
  }

  /// Throws ConfigError unless this SideNet fits `b`.
  void validate_against(const BackboneConfig& b) const {
    if (reduction_factor <= 0) detail::fail<ConfigError>("SideNet config: reduction_factor must be positive, got ", reduction_factor);
    if (b.n_layer % reduction_factor != 0) {
      detail::fail<ConfigError>("SideNet config: reduction_factor (", reduction_factor,
                                ") must divide the backbone's n_layer (", b.n_layer, ")");
    }
    if (n_layer != b.n_layer / reduction_factor) {
      detail::fail<ConfigError>("SideNet config: n_layer is ", n_layer, " but a backbone of ", b.n_layer,
                                " layers with reduction factor ", reduction_factor, " needs ", b.n_layer / reduction_factor);
    }
    if (memory_layer < 0 || memory_layer >= b.n_layer) {
      detail::fail<ConfigError>("SideNet config: memory_layer (", memory_layer, ") must lie in [0, ", b.n_layer,
                                ") for a backbone of ", b.n_layer, " layers");
    }
    if (n_embd != b.n_embd) {
      detail::fail<ConfigError>("SideNet width n_embd=", n_embd, " differs from the backbone's n_embd=", b.n_embd);
    }
    if (n_head != b.n_head) {
      detail::fail<ConfigError>("SideNet n_head=", n_head, " differs from the backbone's n_head=", b.n_head,
                                " (memory keys are stored per backbone head)");
    }
    if (n_inner <= 0) detail::fail<ConfigError>("SideNet config: n_inner must be positive, got ", n_inner);
    if (positions != b.positions) {
      detail::fail<ConfigError>("SideNet position scheme '", to_string(positions), "' differs from the backbone's '",
                                to_string(b.positions), "'");
    }
    if (!(layer_norm_epsilon > 0) || !std::isfinite(layer_norm_epsilon)) {
      detail::fail<ConfigError>("SideNet config: layer_norm_epsilon must be a positive finite number");
    }
  }

  friend bool operator==(const SideNetConfig&, const SideNetConfig&) = default;
};

/// Typed reads from a string map (a safetensors __metadata__), with errors that name
/// the file and the key.
class MetadataReader {
 public:
  MetadataReader(const std::map<std::string, std::string>& meta, std::string source)
      : meta_(meta), source_(std::move(source)) {}

  bool has(const std::string& key) const { return meta_.count(key) != 0; }

  std::optional<std::string> get_string(const std::string& key) const {
    auto it = meta_.find(key);
    if (it == meta_.end()) return std::nullopt;
    return it->second;
  }

  std::optional<long long> get_int(const std::string& key) const {
    auto s = get_string(key);
    if (!s) return std::nullopt;
    std::size_t pos = 0;
    long long v = 0;
    try {
      v = std::stoll(*s, &pos);
    } catch (const std::out_of_range&) {
      detail::fail<ConfigError>(source_, ": metadata '", key, "' = ", shown(*s), " does not fit a 64-bit integer");
    } catch (const std::exception&) {
      pos = std::string::npos;
    }
    if (pos != s->size()) {
      detail::fail<ConfigError>(source_, ": metadata '", key, "' must be an integer, got '", shown(*s), "'");
    }
    return v;
  }

  std::optional<double> get_double(const std::string& key) const {
    auto s = get_string(key);
    if (!s) return std::nullopt;
    std::size_t pos = 0;
    double v = 0;
    try {
      v = std::stod(*s, &pos);
    } catch (const std::exception&) {
      pos = std::string::npos;
    }
    if (pos != s->size()) {
      detail::fail<ConfigError>(source_, ": metadata '", key, "' must be a number, got '", shown(*s), "'");
    }
    return v;
  }

  std::optional<bool> get_bool(const std::string& key) const {
    auto s = get_string(key);
    if (!s) return std::nullopt;
    if (*s == "true" || *s == "1") return true;
    if (*s == "false" || *s == "0") return false;
    detail::fail<ConfigError>(source_, ": metadata '", key, "' must be true or false, got '", shown(*s), "'");
  }

  /// An int that must be present and fit in int.
  int require_int(const std::string& key) const {
    auto v = get_int(key);
    if (!v) detail::fail<ConfigError>(source_, ": metadata key '", key, "' is missing");
    return checked_int(key, *v);
  }

  int int_or(const std::string& key, int fallback) const {
    auto v = get_int(key);
    return v ? checked_int(key, *v) : fallback;
  }

  /// n_inner, or 4 * n_embd when absent (computed without overflow; a width that does not fit
  /// an int is refused naming both keys).
  int inner_width(int n_embd) const {
    if (has("n_inner")) return require_int("n_inner");
    const long long f = 4LL * n_embd;
    if (f > INT_MAX) {
      detail::fail<ConfigError>(source_, ": metadata has no 'n_inner' and 4 * n_embd = ", f, " does not fit a 32-bit int");
    }
    return static_cast<int>(f);
  }

  const std::string& source() const { return source_; }

 private:
  /// A metadata value for a message, cut to a readable length.
  static std::string shown(const std::string& v) {
    return v.size() <= 40 ? v : v.substr(0, 40) + "... (" + std::to_string(v.size()) + " bytes)";
  }

  int checked_int(const std::string& key, long long v) const {
    if (v < -2147483647LL || v > 2147483647LL) {
      detail::fail<ConfigError>(source_, ": metadata '", key, "' = ", v, " does not fit a 32-bit int");
    }
    return static_cast<int>(v);
  }

  const std::map<std::string, std::string>& meta_;
  std::string source_;
};

namespace detail {
/// Shortest text that reads back to the same double.
inline std::string format_double(double v) {
  std::ostringstream os;
  os.precision(17);
  os << v;
  return os.str();
}
inline Activation parse_activation(const std::string& s, const std::string& source) {
  if (s == "gelu_new" || s == "gelu_pytorch_tanh" || s == "gelu_tanh") return Activation::GeluTanh;
  if (s == "gelu") return Activation::GeluErf;
  fail<ConfigError>(source, ": activation_function '", s, "' is not supported (use gelu_new or gelu)");
}
inline PositionScheme parse_positions(const std::string& s, const std::string& source) {
  if (s == "learned") return PositionScheme::Learned;
  if (s == "alibi") return PositionScheme::Alibi;
  fail<ConfigError>(source, ": position_embedding '", s, "' is not supported (use learned or alibi)");
}
}  // namespace detail

/// Reads a backbone config from metadata. The architecture key selects the defaults;
/// the size keys n_layer, n_embd, n_head, vocab_size, n_positions are required.
inline BackboneConfig backbone_config_from_metadata(const MetadataReader& md) {
  auto arch = md.get_string("architecture");
  if (!arch) {
    detail::fail<ConfigError>(md.source(), ": metadata key 'architecture' is missing (expected gpt2 or gpt2-star)");
  }
  BackboneConfig c;
  const int L = md.require_int("n_layer"), d = md.require_int("n_embd"), H = md.require_int("n_head");
  const int V = md.require_int("vocab_size"), P = md.require_int("n_positions");
  if (*arch == "gpt2") {
    c = BackboneConfig::gpt2(L, d, H, V, P);
  } else if (*arch == "gpt2-star") {
    c = BackboneConfig::gpt2_star(L, d, H, V, P);
  } else {
    detail::fail<ConfigError>(md.source(), ": architecture '", *arch, "' is not a backbone (expected gpt2 or gpt2-star)");
  }
  c.n_inner = md.inner_width(d);
  if (auto eps = md.get_double("layer_norm_epsilon")) c.layer_norm_epsilon = *eps;
  if (auto act = md.get_string("activation_function")) c.activation = detail::parse_activation(*act, md.source());
  try {
    c.validate();
  } catch (const ConfigError& e) {
    detail::fail<ConfigError>(md.source(), ": ", e.what());
  }
  return c;
}

/// Writes the metadata that backbone_config_from_metadata reads back.
inline void backbone_config_to_metadata(const BackboneConfig& c, std::map<std::string, std::string>& md) {
  md["architecture"] = c.architecture;
  md["n_layer"] = std::to_string(c.n_layer);
  md["n_embd"] = std::to_string(c.n_embd);
  md["n_head"] = std::to_string(c.n_head);
  md["n_inner"] = std::to_string(c.n_inner);
  md["vocab_size"] = std::to_string(c.vocab_size);
  md["n_positions"] = std::to_string(c.n_positions);
  md["layer_norm_epsilon"] = detail::format_double(c.layer_norm_epsilon);
  md["activation_function"] = to_string(c.activation);
}

}  // namespace longmem
