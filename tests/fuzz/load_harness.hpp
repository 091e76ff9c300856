#pragma once
// The whole load path as one function, shared by the libFuzzer target (fuzz_load.cpp), its seed
// maker (make_load_seeds.cpp) and the deterministic ctest companion
// (tests/unit/test_load_mutation.cpp).
//
// An input is one byte saying what follows (kind = byte % 5), then a file:
//   0 backbone (safetensors)      Gpt2Backbone::from_file; one segment forward (logits, hidden
//                                 states, layer-m keys); then LongMem with SideNet::from_backbone
//                                 over two segments (the second retrieves from memory)
//   1 SideNet (safetensors)       SideNet::from_file; Model with the harness backbone of its
//                                 position scheme, its recommended memory; two segments
//   2 adaptation checkpoint       Trainer::resume on the harness's adaptation task; one update
//   3 pretraining checkpoint      Trainer::resume on the harness's pretraining task; one update
//   4 config.json                 backbone_config_from_json; Gpt2Backbone::from_file of the harness's
//                                 GPT-2 file without metadata under that config; one segment
// Every input must be refused with a longmem::Error or run; anything else escapes exercise().
//
// The harness runs what fits a fuzzing process: memory settings whose banks or one segment's
// retrieval would need more than 16 MiB are replaced by small ones (16 tokens, chunks of 2, 4
// retrieved). Refusals of configurations larger than the machine are tested in
// tests/unit/test_load_mutation.cpp.
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <cmath>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "longmem/train.hpp"

namespace longmem::fuzz {

enum Kind : std::uint8_t { backbone_file = 0, side_net_file = 1, adaptation_checkpoint = 2, pretraining_checkpoint = 3,
                           config_json = 4 };
inline constexpr int kinds = 5;

using Bytes = std::vector<std::byte>;
using Adaptation = SideNetAdaptation<HostMemoryBank<float>, ExactChunkRetriever, GatedFusion, float>;

// The tiny architectures every seed is made of (and every training task is built from).
inline BackboneConfig gpt2_config() { return BackboneConfig::gpt2(2, 4, 2, 8, 8); }
inline BackboneConfig gpt2_star_config() { return BackboneConfig::gpt2_star(2, 4, 2, 8, 8); }
inline MemoryConfig small_memory() {
  MemoryConfig m;
  m.memory_tokens = 16;
  m.chunk_size = 2;
  m.retrieved_tokens = 4;
  return m;
}
inline constexpr int segment_length = 6;
inline constexpr int streams = 2;

/// The harness's backbones (built once; callers clone them).
inline const Gpt2Backbone<float>& gpt2_backbone() {
  static const auto b = Gpt2Backbone<float>::random(gpt2_config(), 101, 0.3);
  return b;
}
inline const Gpt2Backbone<float>& gpt2_star_backbone() {
  static const auto b = Gpt2Backbone<float>::random(gpt2_star_config(), 102, 0.3);
  return b;
}

/// Two documents of 40 tokens (vocabulary 8), the same on every run and machine.
inline const std::vector<Document>& documents() {
  static const std::vector<Document> docs = [] {
    std::vector<Document> d;
    std::uint32_t x = 12345;
    for (int i = 0; i < 2; ++i) {
      Document doc{"doc " + std::to_string(i), {}, {}};
      for (int t = 0; t < 40; ++t) {
        x = x * 1664525u + 1013904223u;
        doc.tokens.push_back(static_cast<std::int32_t>((x >> 16) % 8));
      }
      d.push_back(std::move(doc));
    }
    return d;
  }();
  return docs;
}

inline TrainConfig train_config() {
  TrainConfig c;
  c.segment_length = segment_length;
  c.steps = 8;
  c.optimizer.lr = 1e-2;
  c.schedule.warmup = 2;
  c.seed = 7;
  return c;
}

inline Adaptation adaptation_task() {
  return Adaptation(gpt2_star_backbone().clone(), SideNet<float>::from_backbone(gpt2_star_backbone(), 1), small_memory(),
                    streams);
}
inline BackbonePretraining<float> pretraining_task() { return BackbonePretraining<float>(gpt2_backbone().clone(), streams); }

/// `n` token ids below `vocab`.
inline std::vector<std::int32_t> tokens(int n, int vocab, int salt = 0) {
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) t[static_cast<std::size_t>(i)] = static_cast<std::int32_t>((5 * i + 3 + salt) % vocab);
  return t;
}

/// A per-process scratch folder for the inputs that must be files (checkpoints, config.json),
/// removed at exit.
inline const std::filesystem::path& scratch() {
  struct Dir {
    std::filesystem::path path;
    Dir() : path(std::filesystem::temp_directory_path() / ("longmem-fuzz-load-" + std::to_string(::getpid()))) {
      std::filesystem::create_directories(path);
    }
    ~Dir() {
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  };
  static const Dir dir;
  return dir.path;
}

inline std::filesystem::path write_file(const std::string& name, std::span<const std::byte> bytes) {
  const auto p = scratch() / name;
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  return p;
}

/// The harness's GPT-2 file without __metadata__ (Hugging Face names), for config.json inputs.
inline const SafetensorsFile& metadata_free_gpt2() {
  static const SafetensorsFile f = [] {
    const auto p = scratch() / "gpt2_nometa.safetensors";
    gpt2_backbone().save(p);
    const SafetensorsFile with = SafetensorsFile::open(p);
    SafetensorsWriter w;
    for (const auto& n : with.names()) w.add_raw(n, with.info(n).dtype, with.info(n).shape, with.raw(n));
    std::filesystem::remove(p);
    return SafetensorsFile::from_bytes(w.to_bytes(), "gpt2_nometa.safetensors");
  }();
  return f;
}

/// Whether the harness runs these memory settings (see the header comment).
inline bool fits_harness(const MemoryConfig& m, const BackboneConfig& b) {
  const std::uint64_t limit = std::uint64_t{16} << 20;
  const auto bank = HostMemoryBank<float>::bytes_for(MemoryGeometry{b.n_head, b.head_dim(), m.chunk_size, m.capacity_chunks()});
  const auto retrieval = detail::checked_bytes(2 * sizeof(float), {segment_length, m.retrieved_tokens, b.n_embd});
  return bank && *bank <= limit && retrieval && *retrieval <= limit;
}

/// Two segments through a Model (the second retrieves what the first stored).
template <class Fusion>
void run_model(Gpt2Backbone<float> backbone, SideNet<float> side_net, MemoryConfig mem) {
  const BackboneConfig& bc = backbone.config();
  const int T = std::min(segment_length, bc.n_positions);
  const int V = bc.vocab_size;
  Model<Gpt2Backbone<float>, HostMemoryBank<float>, ExactChunkRetriever, Fusion> model(
      std::move(backbone), std::move(side_net), mem, 1, ExactChunkRetriever{}, /*allow_other_backbone=*/true);
  for (int s = 0; s < 2; ++s) {
    const auto in = tokens(T, V, s);
    auto targets = tokens(T, V, s + 1);
    targets.back() = -1;
    (void)model.forward(in, targets);
  }
}

inline void exercise_backbone(const SafetensorsFile& f, std::optional<BackboneConfig> json = std::nullopt,
                              bool longmem = true) {
  auto backbone = Gpt2Backbone<float>::from_file(f, json);
  const BackboneConfig& c = backbone.config();
  const auto in = tokens(std::min(segment_length, c.n_positions), c.vocab_size);
  BackboneOutput<float> out;
  backbone.forward(in, BackboneRequest{true, true, c.n_layer / 2}, out);
  if (!longmem) return;
  const int r = c.n_layer % 2 == 0 ? 2 : 1;
  auto side_net = SideNet<float>::from_backbone(backbone, c.n_layer / 2, r);
  MemoryConfig mem = small_memory();
  if (!fits_harness(mem, c)) return;
  run_model<GatedFusion>(std::move(backbone), std::move(side_net), mem);
}

inline void exercise_side_net(const SafetensorsFile& f, bool joint) {
  auto side_net = SideNet<float>::from_file(f);
  const auto& backbone = side_net.config().positions == PositionScheme::Learned ? gpt2_backbone() : gpt2_star_backbone();
  MemoryConfig mem = side_net.recommended_memory().value_or(small_memory());
  if (!fits_harness(mem, backbone.config())) mem = small_memory();
  if (joint) {
    run_model<JointFusion>(backbone.clone(), std::move(side_net), mem);
  } else {
    run_model<GatedFusion>(backbone.clone(), std::move(side_net), mem);
  }
}

template <class Task>
void exercise_checkpoint(Task task, std::span<const std::byte> file) {
  const auto path = write_file("checkpoint.safetensors", file);
  Trainer<Task> trainer(task, documents(), documents(), train_config());
  trainer.resume(path);
  (void)trainer.step();
}

/// One input (see the header comment); only longmem::Error may escape, and exercise() lets it.
inline void exercise_unchecked(std::span<const std::byte> input) {
  if (input.empty()) return;
  const auto tag = static_cast<std::uint8_t>(input[0]);
  const auto file = input.subspan(1);
  switch (tag % kinds) {
    case backbone_file:
      exercise_backbone(SafetensorsFile::from_bytes(Bytes(file.begin(), file.end()), "backbone.safetensors"));
      break;
    case side_net_file:
      exercise_side_net(SafetensorsFile::from_bytes(Bytes(file.begin(), file.end()), "sidenet.safetensors"),
                        (tag / kinds) % 2 == 1);
      break;
    case adaptation_checkpoint: exercise_checkpoint(adaptation_task(), file); break;
    case pretraining_checkpoint: exercise_checkpoint(pretraining_task(), file); break;
    case config_json: {
      const auto path = write_file("config.json", file);
      exercise_backbone(metadata_free_gpt2(), detail::backbone_config_from_json(path), false);
      break;
    }
  }
}

/// Runs one input; true when it ran, false when the library refused it. Anything but a
/// longmem::Error propagates (a crash for the fuzzer, a failure for the test).
inline bool exercise(std::span<const std::byte> input) {
  try {
    exercise_unchecked(input);
    return true;
  } catch (const Error&) {
    return false;
  }
}

/// A seed: the kind byte, then the file.
inline Bytes tagged(Kind kind, std::span<const std::byte> file) {
  Bytes b(1 + file.size());  // (sized once: GCC 12 -O3 misreads insert() into a 1-element vector)
  b[0] = static_cast<std::byte>(kind);
  if (!file.empty()) std::memcpy(b.data() + 1, file.data(), file.size());
  return b;
}

inline Bytes file_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Bytes b(s.size());
  std::memcpy(b.data(), s.data(), s.size());
  return b;
}

/// The same tensors under `rename(name)` (or dropped when it returns ""), stored as `dtype`
/// (nullopt: as they are), with `metadata`.
template <class Rename>
Bytes rewrite(const SafetensorsFile& f, const std::map<std::string, std::string>& metadata, Rename&& rename,
              std::optional<DType> dtype = std::nullopt) {
  SafetensorsWriter w;
  w.set_metadata(metadata);
  for (const auto& n : f.names()) {
    const std::string to = rename(n);
    if (to.empty()) continue;
    if (dtype) {
      const auto t = f.read<float>(n);
      w.add_as(to, *dtype, t.view());
    } else {
      w.add_raw(to, f.info(n).dtype, f.info(n).shape, f.raw(n));
    }
  }
  return w.to_bytes();
}

/// A structure-aware mutation of a safetensors input (kinds 0-3), keeping the file well formed
/// so that the loaders behind the reader are reached: a metadata value replaced (a boundary
/// number, a random integer, a neighbour of the current value, a word, a number inside a JSON
/// value), a metadata key dropped, a tensor dropped, renamed to another layer, reshaped (same
/// elements in another shape, or a prefix of them) or given a hostile element (NaN, inf, -1,
/// 1e30, 2^62). nullopt when the input does not open as a safetensors file.
template <class Rng>
std::optional<Bytes> structured_mutant(std::span<const std::byte> input, Rng& rng) {
  if (input.size() < 2 || std::to_integer<int>(input[0]) % kinds == config_json) return std::nullopt;
  std::optional<SafetensorsFile> opened;
  try {
    opened.emplace(SafetensorsFile::from_bytes(Bytes(input.begin() + 1, input.end()), "mutant"));
  } catch (const Error&) {
    return std::nullopt;
  }
  const SafetensorsFile& f = *opened;
  auto pick = [&](std::size_t n) { return n ? static_cast<std::size_t>(rng() % n) : 0; };
  static const char* const words[] = {"0", "1", "2", "3", "-1", "2147483647", "2147483648", "-2147483648",
                                      "4294967296", "9223372036854775807", "99999999999999999999", "16777217",
                                      "1073741825", "9007199254740993", "1e3", "0.5", "nan", "inf", "", "true",
                                      "gpt2", "gpt2-star", "longmem-sidenet", "alibi", "learned", "gelu"};
  auto number = [&]() -> std::string {
    switch (pick(3)) {
      case 0: return words[pick(17)];
      case 1: return std::to_string(static_cast<std::int64_t>(rng()) >> pick(64));
      default: {
        const int k = static_cast<int>(pick(63));
        return std::to_string((std::int64_t{1} << k) + static_cast<std::int64_t>(pick(3)) - 1);
      }
    }
  };
  auto md = f.metadata();
  const auto names = f.names();
  std::map<std::string, std::string> rename;  // old -> new ("" drops)
  struct Edit {
    std::string tensor;
    Shape shape;
    std::size_t keep_bytes = 0;
    index_t element = -1;
    double value = 0;
  };
  std::optional<Edit> edit;
  switch (pick(8)) {
    case 0:
    case 1:
    case 2: {  // a metadata value
      if (md.empty()) return std::nullopt;
      auto it = md.begin();
      std::advance(it, static_cast<long>(pick(md.size())));
      std::string& v = it->second;
      const auto digits = v.find_first_of("0123456789");
      if (v.size() > 24 && digits != std::string::npos) {  // a JSON value: one of its numbers
        std::size_t at = digits;
        for (std::size_t tries = pick(64); tries > 0; --tries) {
          const auto next = v.find_first_of("0123456789", v.find_first_not_of("0123456789", at));
          if (next == std::string::npos) break;
          at = next;
        }
        const auto end = v.find_first_not_of("0123456789.e+-", at);
        v.replace(at, (end == std::string::npos ? v.size() : end) - at, number());
      } else if (pick(3) == 0) {
        v = words[pick(std::size(words))];
      } else if (pick(2) == 0 && !v.empty() && digits == 0) {
        try {
          const long long x = std::stoll(v), step = static_cast<long long>(pick(5)) - 2;
          const bool overflows = (step > 0 && x > std::numeric_limits<long long>::max() - step) ||
                                 (step < 0 && x < std::numeric_limits<long long>::min() - step);
          v = overflows ? number() : std::to_string(x + step);
        } catch (const std::exception&) {
          v = number();
        }
      } else {
        v = number();
      }
      break;
    }
    case 3: {  // a metadata key dropped
      if (md.empty()) return std::nullopt;
      auto it = md.begin();
      std::advance(it, static_cast<long>(pick(md.size())));
      md.erase(it);
      break;
    }
    case 4: {  // a tensor dropped or renamed to another layer
      if (names.empty()) return std::nullopt;
      const std::string& n = names[pick(names.size())];
      const auto d = n.find_first_of("0123456789");
      std::string to;
      if (d != std::string::npos && pick(4) != 0) {
        static const char* const layers[] = {"0", "1", "2", "3", "4", "999999", "2147483647", "01"};
        const auto e = n.find_first_not_of("0123456789", d);
        to = n.substr(0, d) + layers[pick(std::size(layers))] + (e == std::string::npos ? std::string() : n.substr(e));
        if (f.contains(to)) to.clear();
      }
      rename[n] = to;
      break;
    }
    case 5: {  // a tensor reshaped
      if (names.empty()) return std::nullopt;
      Edit e;
      e.tensor = names[pick(names.size())];
      const TensorInfo& ti = f.info(e.tensor);
      const index_t n = ti.shape.numel();
      switch (pick(3)) {
        case 0: e.shape = Shape{n}; break;
        case 1: e.shape = ti.shape.rank() >= 2 ? Shape{ti.shape[1], ti.shape[0]} : Shape{1, n}; break;
        default: {
          const index_t k = n > 0 ? static_cast<index_t>(pick(static_cast<std::size_t>(n))) : 0;
          e.shape = Shape{k};
        }
      }
      e.keep_bytes = static_cast<std::size_t>(e.shape.numel()) * dtype_size(ti.dtype);
      if (e.keep_bytes > ti.bytes()) return std::nullopt;
      edit = e;
      break;
    }
    default: {  // a hostile element
      if (names.empty()) return std::nullopt;
      Edit e;
      e.tensor = names[pick(names.size())];
      const TensorInfo& ti = f.info(e.tensor);
      if (ti.shape.numel() == 0) return std::nullopt;
      e.shape = ti.shape;
      e.keep_bytes = ti.bytes();
      e.element = static_cast<index_t>(pick(static_cast<std::size_t>(ti.shape.numel())));
      static const double values[] = {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                                      -1, 1e30, 0x1p62, -0x1p62, 3, 0};
      e.value = values[pick(std::size(values))];
      edit = e;
    }
  }
  SafetensorsWriter w;
  w.set_metadata(md);
  for (const auto& n : names) {
    std::string to = n;
    if (auto it = rename.find(n); it != rename.end()) to = it->second;
    if (to.empty()) continue;
    const TensorInfo& ti = f.info(n);
    if (edit && edit->tensor == n && edit->element >= 0) {
      const double v = edit->value;
      if (ti.dtype == DType::I64) {
        auto t = f.read<std::int64_t>(n);
        t.data()[edit->element] = std::abs(v) < 0x1p63 ? static_cast<std::int64_t>(v) : -7;  // (NaN: -7)
        w.add<std::int64_t>(to, t.view());
      } else if (ti.dtype == DType::I32) {
        auto t = f.read<std::int32_t>(n);
        t.data()[edit->element] = std::abs(v) < 2e9 ? static_cast<std::int32_t>(v) : -7;
        w.add<std::int32_t>(to, t.view());
      } else if (ti.dtype == DType::F64) {
        auto t = f.read<double>(n);
        t.data()[edit->element] = v;
        w.add<double>(to, t.view());
      } else if (ti.dtype == DType::F16 || ti.dtype == DType::BF16 || ti.dtype == DType::F32) {
        auto t = f.read<float>(n);
        t.data()[edit->element] = static_cast<float>(v);
        w.add_as(to, ti.dtype, t.view());
      } else {
        w.add_raw(to, ti.dtype, ti.shape, f.raw(n));
      }
    } else if (edit && edit->tensor == n) {
      w.add_raw(to, ti.dtype, edit->shape, f.raw(n).first(edit->keep_bytes));
    } else {
      w.add_raw(to, ti.dtype, ti.shape, f.raw(n));
    }
  }
  const Bytes file = w.to_bytes();
  Bytes out(1 + file.size());
  out[0] = input[0];
  std::memcpy(out.data() + 1, file.data(), file.size());
  return out;
}

/// Every seed of the corpus, by file name: small valid inputs of every kind and architecture.
inline std::vector<std::pair<std::string, Bytes>> seeds() {
  std::vector<std::pair<std::string, Bytes>> out;
  const auto dir = scratch();
  auto saved_backbone = [&](const Gpt2Backbone<float>& b) {
    b.save(dir / "seed.safetensors");
    return file_bytes(dir / "seed.safetensors");
  };
  const Bytes hf = saved_backbone(gpt2_backbone());
  const Bytes star = saved_backbone(gpt2_star_backbone());
  out.emplace_back("gpt2_hf_names", tagged(backbone_file, hf));
  {  // Hugging Face names under "transformer.", causal-mask buffers and a tied lm_head
    const auto f = SafetensorsFile::from_bytes(hf, "hf");
    SafetensorsWriter w;
    w.set_metadata(f.metadata());
    for (const auto& n : f.names()) w.add_raw("transformer." + n, f.info(n).dtype, f.info(n).shape, f.raw(n));
    for (int j = 0; j < gpt2_config().n_layer; ++j) {
      Tensor<float, Host> mask({1, 1, 2, 2});
      fill(mask.view(), 1.0f);
      w.add<float>("transformer.h." + std::to_string(j) + ".attn.bias", mask.view());
    }
    w.add_raw("lm_head.weight", f.info("wte.weight").dtype, f.info("wte.weight").shape, f.raw("wte.weight"));
    out.emplace_back("gpt2_hf_prefixed_masks_lm_head", tagged(backbone_file, w.to_bytes()));
  }
  {  // GPT-2 under the reference implementation's names (Linear layout)
    SafetensorsWriter w;
    std::map<std::string, std::string> md;
    backbone_config_to_metadata(gpt2_config(), md);
    w.set_metadata(md);
    visit_gpt2_tensors(gpt2_config(), gpt2_backbone().parameters(),
                       [&](const std::string& n, const Tensor<float, Host>& t, const Shape&) { w.add<float>(n, t.view()); });
    out.emplace_back("gpt2_reference_names", tagged(backbone_file, w.to_bytes()));
  }
  out.emplace_back("gpt2_star", tagged(backbone_file, star));
  {
    const auto f = SafetensorsFile::from_bytes(star, "star");
    out.emplace_back("gpt2_star_bf16", tagged(backbone_file, rewrite(f, f.metadata(), [](const std::string& n) { return n; },
                                                                     DType::BF16)));
  }
  auto saved_side_net = [&](const SideNet<float>& s, std::optional<MemoryConfig> mem) {
    s.save(dir / "seed.safetensors", mem);
    return file_bytes(dir / "seed.safetensors");
  };
  out.emplace_back("sidenet_gpt2_attn_bias",
                   tagged(side_net_file, saved_side_net(SideNet<float>::from_backbone(gpt2_backbone(), 1), small_memory())));
  out.emplace_back("sidenet_gpt2_star_no_attn_bias",
                   tagged(side_net_file, saved_side_net(SideNet<float>::from_backbone(gpt2_star_backbone(), 1), small_memory())));
  {
    Bytes b = tagged(side_net_file, saved_side_net(SideNet<float>::from_backbone(gpt2_star_backbone(), 1, 1), std::nullopt));
    b[0] = static_cast<std::byte>(side_net_file + kinds);  // joint fusion
    out.emplace_back("sidenet_gpt2_star_r1_joint", std::move(b));
  }
  auto checkpoint = [&](auto task) {
    Trainer<decltype(task)> trainer(task, documents(), documents(), train_config());
    for (int s = 0; s < 2; ++s) (void)trainer.step();
    trainer.save_checkpoint(dir / "seed.safetensors");
    return file_bytes(dir / "seed.safetensors");
  };
  out.emplace_back("checkpoint_adaptation", tagged(adaptation_checkpoint, checkpoint(adaptation_task())));
  out.emplace_back("checkpoint_pretraining", tagged(pretraining_checkpoint, checkpoint(pretraining_task())));
  const std::string json = R"({"model_type": "gpt2", "n_layer": 2, "n_embd": 4, "n_head": 2, "vocab_size": 8,)"
                           R"( "n_positions": 8, "layer_norm_epsilon": 1e-05, "activation_function": "gelu_new"})";
  out.emplace_back("config_json_gpt2", tagged(config_json, std::as_bytes(std::span(json.data(), json.size()))));
  std::filesystem::remove(dir / "seed.safetensors");
  return out;
}

}  // namespace longmem::fuzz
