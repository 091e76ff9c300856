// Hostile files beyond the safetensors layer, deterministically (the libFuzzer target
// tests/fuzz/fuzz_load.cpp explores the same load path at random, see tests/fuzz/README.md):
//   - the inputs of issue 10 (n_layer = 2147483647 in a GPT-2* backbone's metadata) and their kind:
//     every count or size key of a backbone or SideNet set to a huge, negative or zero value is
//     refused with a message naming the key, before anything is sized from it;
//   - training checkpoints with a hostile step, data position, memory counters or moments are
//     refused as files (FormatError / ConfigError: exit 2 in the CLIs), never as a TrainingError;
//   - banks, models and tensors larger than the machine are refused up front with the bytes
//     they need and what the machine has;
//   - mutants of the fuzz seeds (bit flips, interesting bytes, truncations, and the fuzz target's
//     structure-aware mutations: metadata values, dropped, renamed, reshaped or poisoned tensors)
//     through the fuzz harness: refused with a longmem::Error or run.
#include <catch2/catch.hpp>

#include <cstdint>
#include <iterator>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "../fuzz/load_harness.hpp"

using namespace longmem;
using fuzz::Bytes;

namespace {

const std::vector<std::pair<std::string, Bytes>>& all_seeds() {
  static const auto s = fuzz::seeds();
  return s;
}

const Bytes& seed(const std::string& name) {
  for (const auto& [n, b] : all_seeds()) {
    if (n == name) return b;
  }
  FAIL("no seed " << name);
  static const Bytes none;
  return none;
}

/// The file inside a seed (after its kind byte), opened.
SafetensorsFile open_seed(const Bytes& s, const std::string& name = "mutant.safetensors") {
  return SafetensorsFile::from_bytes(Bytes(s.begin() + 1, s.end()), name);
}

/// `file` behind the kind byte of `like`.
Bytes retag(const Bytes& like, const Bytes& file) {
  Bytes b = fuzz::tagged(fuzz::backbone_file, file);
  b[0] = like[0];
  return b;
}

/// The seed with metadata `key` = `value`.
Bytes with_metadata(const Bytes& s, const std::string& key, const std::string& value) {
  const auto f = open_seed(s);
  auto md = f.metadata();
  md[key] = value;
  return retag(s, fuzz::rewrite(f, md, [](const std::string& n) { return n; }));
}

/// The seed with element `i` of tensor `name` set to `value`.
Bytes with_element(const Bytes& s, const std::string& name, index_t i, double value) {
  const auto f = open_seed(s);
  SafetensorsWriter w;
  w.set_metadata(f.metadata());
  for (const auto& n : f.names()) {
    if (n != name) {
      w.add_raw(n, f.info(n).dtype, f.info(n).shape, f.raw(n));
    } else if (f.info(n).dtype == DType::I64) {
      auto t = f.read<std::int64_t>(n);
      t.data()[i] = static_cast<std::int64_t>(value);
      w.add<std::int64_t>(n, t.view());
    } else {
      auto t = f.read<float>(n);
      t.data()[i] = static_cast<float>(value);
      w.add<float>(n, t.view());
    }
  }
  return retag(s, w.to_bytes());
}

/// The message of the longmem::Error that running `input` throws ("" if it runs); anything
/// else escapes and fails the test.
std::string refusal(const Bytes& input) {
  try {
    fuzz::exercise_unchecked(input);
  } catch (const TrainingError& e) {
    FAIL("a hostile file must not be a TrainingError (exit 3, 'training stopped'): " << e.what());
  } catch (const Error& e) {
    return e.what();
  }
  return {};
}

const char* const hostile_values[] = {"2147483647", "2147483648", "2147483646",  "9223372036854775807",
                                      "99999999999999999999", "-1", "-2147483648", "0"};

}  // namespace

TEST_CASE("load: the inputs of issue 10 (n_layer = 2147483647) are refused before anything is sized", "[load][errors]") {
  for (const char* name : {"gpt2_star", "gpt2_hf_names", "sidenet_gpt2_star_no_attn_bias"}) {
    CAPTURE(name);
    const std::string what = refusal(with_metadata(seed(name), "n_layer", "2147483647"));
    CHECK_THAT(what, Catch::Contains(".safetensors: metadata 'n_layer' = 2147483647 but the file holds") &&
                         Catch::Contains(" layers ("));
  }
  // A lone far layer index cannot stand for the layers before it.
  const auto f = open_seed(seed("gpt2_star"));
  auto md = f.metadata();
  md["n_layer"] = "999999999";
  const Bytes far = retag(seed("gpt2_star"), fuzz::rewrite(f, md, [](const std::string& n) {
    return n.starts_with("h.1.") ? "h.999999998." + n.substr(4) : n;
  }));
  CHECK_THAT(refusal(far), Catch::Contains("numbered up to 999999998") && Catch::Contains("without h.1.ln_1.weight"));
}

TEST_CASE("load: every count or size key set to a huge, negative or zero value is refused naming the key", "[load][errors]") {
  const std::map<std::string, std::vector<std::string>> keys{
      {"gpt2_hf_names", {"n_layer", "n_embd", "n_head", "n_inner", "vocab_size", "n_positions"}},
      {"gpt2_reference_names", {"n_layer", "n_embd", "n_head", "n_inner", "vocab_size", "n_positions"}},
      {"gpt2_star", {"n_layer", "n_embd", "n_head", "n_inner", "vocab_size", "n_positions"}},
      {"sidenet_gpt2_attn_bias",
       {"n_layer", "n_embd", "n_head", "n_inner", "reduction_factor", "memory_layer", "memory_tokens", "chunk_size",
        "retrieved_tokens"}},
      {"sidenet_gpt2_star_r1_joint", {"n_layer", "n_embd", "n_head", "n_inner", "reduction_factor", "memory_layer"}},
  };
  int refused = 0;
  for (const auto& [name, list] : keys) {
    for (const auto& key : list) {
      for (const char* value : hostile_values) {
        // memory_layer 0 is a real layer (the memory then sits in SideNet layer 0, as with 1 at r = 2)
        if (key == "memory_layer" && std::string(value) == "0") continue;
        CAPTURE(name, key, value);
        const std::string what = refusal(with_metadata(seed(name), key, value));
        CHECK_THAT(what, Catch::Contains(key));
        refused += !what.empty();
      }
    }
  }
  CHECK(refused == 6 * 8 * 3 + 9 * 8 - 1 + 6 * 8 - 1);
  // A key missing is refused naming it; an absent n_inner defaults to 4 n_embd (computed
  // without overflow).
  {
    const auto f = open_seed(seed("gpt2_star"));
    auto md = f.metadata();
    md.erase("n_inner");
    md["n_embd"] = "1073741824";
    CHECK_THAT(refusal(retag(seed("gpt2_star"), fuzz::rewrite(f, md, [](const std::string& n) { return n; }))),
               Catch::Contains("n_inner") && Catch::Contains("4294967296"));
  }
  // The bounds no tensor can confirm: ALiBi positions and memory settings.
  CHECK_THAT(refusal(with_metadata(seed("gpt2_star"), "n_positions", "16777217")),
             Catch::Contains("n_positions") && Catch::Contains("16777216"));
  CHECK(refusal(with_metadata(seed("gpt2_star"), "n_positions", "16777216")).empty());
  CHECK_THAT(refusal(with_metadata(seed("sidenet_gpt2_attn_bias"), "memory_tokens", "1073741826")),
             Catch::Contains("memory_tokens") && Catch::Contains("1073741824"));
  // Widths that disagree with the tensors name the key, the value and the tensor's shape.
  CHECK_THAT(refusal(with_metadata(seed("gpt2_hf_names"), "vocab_size", "9")),
             Catch::Contains("'vocab_size' = 9 but wte.weight has shape (8, 4) (8 rows)"));
  CHECK_THAT(refusal(with_metadata(seed("sidenet_gpt2_attn_bias"), "n_head", "4")),
             Catch::Contains("'n_head' = 4 but layers.0.self_attn.memory_bias has shape (2)"));
}

TEST_CASE("load: config.json with hostile values is refused naming the key", "[load][errors]") {
  auto json = [](const std::string& body) {
    const std::string text = "{\"model_type\": \"gpt2\", " + body + "}";
    return fuzz::tagged(fuzz::config_json, std::as_bytes(std::span(text.data(), text.size())));
  };
  const std::string sizes = R"("n_embd": 4, "n_head": 2, "vocab_size": 8, "n_positions": 8)";
  CHECK(refusal(json(R"("n_layer": 2, )" + sizes)).empty());
  CHECK_THAT(refusal(json(R"("n_layer": 2147483647, )" + sizes)), Catch::Contains("'n_layer' = 2147483647"));
  CHECK_THAT(refusal(json(R"("n_layer": 18446744073709551615, )" + sizes)), Catch::Contains("n_layer"));
  CHECK_THAT(refusal(json(R"("n_layer": 2, "n_inner": -5, )" + sizes)), Catch::Contains("n_inner"));
  CHECK_THAT(refusal(json(R"("n_layer": 2, "n_embd": 5, "n_head": 1, "vocab_size": 8, "n_positions": 8)")),
             Catch::Contains("config.json 'n_embd' = 5"));
  const std::string not_string = R"({"model_type": 7, "n_layer": 2, )" + sizes + "}";
  CHECK_THAT(refusal(fuzz::tagged(fuzz::config_json, std::as_bytes(std::span(not_string.data(), not_string.size())))),
             Catch::Contains("model_type 7"));
}

TEST_CASE("load: hostile training checkpoints are refused as files, naming what is wrong", "[load][errors][train]") {
  const Bytes& adapt = seed("checkpoint_adaptation");
  const Bytes& pre = seed("checkpoint_pretraining");
  CHECK(refusal(adapt).empty());
  CHECK(refusal(pre).empty());
  for (const char* step : {"-1", "9223372036854775807", "99999999999999999999", "9007199254740993", "12abc", "", "1e3"}) {
    CAPTURE(step);
    CHECK_THAT(refusal(with_metadata(pre, "step", step)), Catch::Contains("step"));
  }
  for (const char* data : {R"({"next_document": 0, "epoch": 9223372036854775807, "streams": [[0, 6], [1, 6]]})",
                           R"({"next_document": 0, "epoch": -4, "streams": [[0, 6], [1, 6]]})",
                           R"({"next_document": 0, "epoch": 0, "streams": [[1e300, 6], [1, 6]]})",
                           R"({"next_document": 0, "epoch": 0, "streams": [[0, 6], [1, 18446744073709551615]]})",
                           R"({"next_document": 0.5, "epoch": 0, "streams": [[0, 6], [1, 6]]})",
                           R"({"next_document": 0, "epoch": 0, "streams": [[0], [1, 6]]})", R"([1, 2, 3])",
                           R"({"next_document": 0, "epoch": 0, "streams": [[0, 6000], [1, 6]]})"}) {
    CAPTURE(data);
    CHECK_THAT(refusal(with_metadata(adapt, "data", data)), Catch::Contains("data position"));
  }
  CHECK_THAT(refusal(with_metadata(adapt, "format", "something else")), Catch::Contains("not a training checkpoint"));
  CHECK_THAT(refusal(with_metadata(adapt, "task", "pretraining")), Catch::Contains("adaptation"));
  CHECK_THAT(refusal(with_metadata(adapt, "model", "[1")), Catch::Contains("'model' metadata"));
  CHECK_THAT(refusal(with_metadata(adapt, "rng", "7 7 7")), Catch::Contains("RNG"));

  // Tensors: memory counters beyond any stream, negative second moments, non-finite weights.
  CHECK_THAT(refusal(with_element(adapt, "memory.1.counters", 0, 0x1p62)),
             Catch::Contains("memory.1.counters") && Catch::Contains("2^53"));
  CHECK_THAT(refusal(with_element(adapt, "memory.0.counters", 1, 2)), Catch::Contains("memory.0.counters"));
  CHECK_THAT(refusal(with_element(adapt, "adam_v.layers.0.fc1.weight", 3, -1)),
             Catch::Contains("adam_v.layers.0.fc1.weight holds -1 at element 3"));
  CHECK_THAT(refusal(with_element(pre, "param.wte.weight", 0, std::numeric_limits<double>::quiet_NaN())),
             Catch::Contains("param.wte.weight"));
}

TEST_CASE("memory: banks, models and tensors larger than the machine are refused up front with the bytes", "[load][memory]") {
  const std::uint64_t have = detail::physical_memory_bytes();
  REQUIRE(have > 0);
  // One bank: one head of one dimension, chunks of one token; 12 bytes a chunk.
  const auto chunks = static_cast<index_t>(have / 8 + 1);
  try {
    HostMemoryBank<float> bank(MemoryGeometry{1, 1, 1, chunks});
    FAIL("a bank larger than the machine was built");
  } catch (const ConfigError& e) {
    CHECK_THAT(e.what(), Catch::Contains("HostMemoryBank") && Catch::Contains(std::to_string(chunks) + " chunks") &&
                             Catch::Contains("this machine has " + detail::describe_bytes(have)));
  }
  // Sizes that overflow: refused, not wrapped.
  CHECK_THROWS_WITH(HostMemoryBank<half>(MemoryGeometry{1 << 30, 1 << 30, 1 << 20, index_t{1} << 32}), Catch::Contains("2^"));
  CHECK_THROWS_WITH(HostMemoryBank<float>(MemoryGeometry{1 << 30, 1 << 30, 1, 1 << 30}), Catch::Contains("2^64"));

  // Banks together: a Model's streams are counted before the first bank is built...
  MemoryConfig m;
  m.memory_tokens = 1 << 20;
  m.chunk_size = 4;
  m.retrieved_tokens = 64;
  const auto one = HostMemoryBank<float>::bytes_for(MemoryGeometry{2, 2, 4, m.capacity_chunks()});
  REQUIRE(one);
  const int streams = static_cast<int>(have / *one + 1);
  using M = Model<Gpt2Backbone<float>, HostMemoryBank<float>, ExactChunkRetriever>;
  CHECK_THROWS_WITH(M(fuzz::gpt2_star_backbone().clone(), SideNet<float>::from_backbone(fuzz::gpt2_star_backbone(), 1), m,
                      streams),
                    Catch::Contains(std::to_string(streams) + " memory banks") && Catch::Contains("this machine has"));
  // ... and every bank claims its share of the machine while it lives.
  {
    detail::HostMemoryClaim first(have / 5 * 3, "a first claim");
    CHECK_THROWS_WITH(detail::HostMemoryClaim(have / 5 * 3, "a second claim"),
                      Catch::Contains("a second claim needs") && Catch::Contains("already built in this process hold"));
  }
  CHECK_NOTHROW(detail::HostMemoryClaim(have / 5 * 3, "a claim after the first was released"));

  // Any host tensor.
  CHECK_THROWS_WITH((Tensor<float, Host>(Shape{static_cast<index_t>(have / 4 + 1)})),
                    Catch::Contains("needs") && Catch::Contains("this machine has"));
}

TEST_CASE("load: mutants of every seed are refused with a longmem::Error or run", "[load][fuzz]") {
  std::mt19937_64 rng(20261201);
  auto pick = [&](std::size_t n) { return static_cast<std::size_t>(rng() % n); };
  int ran = 0, refused = 0;
  for (const auto& [name, base] : all_seeds()) {
    for (int i = 0; i < 240; ++i) {
      Bytes b = base;
      switch (i % 6) {
        case 0:  // a flipped bit
          for (int k = 0; k < 1 + i % 3; ++k) {
            const std::size_t at = 1 + pick(b.size() - 1);
            b[at] ^= static_cast<std::byte>(1u << pick(8));
          }
          break;
        case 1: {  // an interesting byte
          const unsigned char bytes[] = {0, 0xff, '9', '-', '"', '0', 0x7f, 0x80};
          b[1 + pick(b.size() - 1)] = static_cast<std::byte>(bytes[pick(sizeof bytes)]);
          break;
        }
        case 2: b.resize(1 + pick(b.size() - 1)); break;  // truncated
        case 3:
        case 4: {  // structure-aware: metadata values, tensors dropped, renamed, reshaped or poisoned
          if (auto m = fuzz::structured_mutant(b, rng)) {
            b = std::move(*m);
          } else {
            b[1 + pick(b.size() - 1)] = static_cast<std::byte>('9');
          }
          break;
        }
        case 5: b[0] = static_cast<std::byte>(pick(256)); break;  // read as another kind
      }
      CAPTURE(name, i);
      bool ok = false;
      REQUIRE_NOTHROW(ok = fuzz::exercise(b));
      (ok ? ran : refused) += 1;
    }
  }
  CAPTURE(ran, refused);
  CHECK(ran > 300);  // 763 of 2,640 at the time of writing
  CHECK(refused > 1000);
}
