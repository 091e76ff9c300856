// longmem-run: runs a checkpoint over a token file and writes logits (and, on request,
// hidden states) to a safetensors file. With --sidenet it runs the LongMem model
// segment by segment with memory and writes every segment's logits in stream order.
//
//   longmem-run --backbone B.safetensors --tokens ids.txt --out out.safetensors [options]
//
// Token files: text ids (whitespace or one per line) or raw little-endian int32
// (--format int32, the default for *.i32 and *.bin files).
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <longmem/longmem.hpp>

namespace {

constexpr const char* usage = R"(usage: longmem-run --backbone FILE --tokens FILE --out FILE [options]

Runs a GPT-2 / GPT-2* checkpoint (safetensors; hyper-parameters from its metadata or a
config.json beside it) over a token file and writes 'tokens' and 'logits' (N, V) to --out.

options:
  --format text|int32     token file format (default: int32 for *.i32/*.bin, else text)
  --segment-length N      split the tokens into segments of N (default: the whole file
                          for a backbone, n_positions for LongMem)
  --hidden-states         also write 'hidden_states' (L+1, N, d) (backbone only)
  --dtype f32|f64         compute precision (default f32)
  --sidenet FILE          run LongMem: backbone + this SideNet with memory
  --memory-tokens N       memory capacity in tokens per stream (default: the SideNet
                          file's recommendation, else 65536)
  --chunk-size N          tokens per memory chunk (default: file, else 4)
  --retrieved-tokens N    tokens retrieved per query (default: file, else 64)
  --fusion gated|joint    how memory and local attention mix (default gated, the reference)
  --no-memory             LongMem without memory (the baseline)
  --allow-other-backbone  accept a SideNet made for another backbone
  --quiet                 print nothing but errors
)";

struct Options {
  std::string backbone, sidenet, tokens, out, format, dtype = "f32", fusion = "gated";
  int segment_length = 0;
  bool hidden_states = false, no_memory = false, allow_other = false, quiet = false;
  std::optional<int> memory_tokens, chunk_size, retrieved_tokens;
};

[[noreturn]] void usage_error(const std::string& msg) {
  std::cerr << "longmem-run: " << msg << "\n\n" << usage;
  std::exit(64);
}

int parse_int(const std::string& flag, const std::string& v) {
  try {
    std::size_t pos = 0;
    long long x = std::stoll(v, &pos);
    if (pos == v.size() && x > 0 && x <= (1LL << 30)) return static_cast<int>(x);
  } catch (const std::exception&) {
  }
  usage_error(flag + " needs a positive integer, got '" + v + "'");
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage_error(a + " needs a value");
      return argv[++i];
    };
    if (a == "--backbone") o.backbone = value();
    else if (a == "--sidenet") o.sidenet = value();
    else if (a == "--tokens") o.tokens = value();
    else if (a == "--out") o.out = value();
    else if (a == "--format") o.format = value();
    else if (a == "--dtype") o.dtype = value();
    else if (a == "--fusion") o.fusion = value();
    else if (a == "--segment-length") o.segment_length = parse_int(a, value());
    else if (a == "--memory-tokens") o.memory_tokens = parse_int(a, value());
    else if (a == "--chunk-size") o.chunk_size = parse_int(a, value());
    else if (a == "--retrieved-tokens") o.retrieved_tokens = parse_int(a, value());
    else if (a == "--hidden-states") o.hidden_states = true;
    else if (a == "--no-memory") o.no_memory = true;
    else if (a == "--allow-other-backbone") o.allow_other = true;
    else if (a == "--quiet") o.quiet = true;
    else if (a == "-h" || a == "--help") {
      std::cout << usage;
      std::exit(0);
    } else {
      usage_error("unknown argument '" + a + "'");
    }
  }
  if (o.backbone.empty() || o.tokens.empty() || o.out.empty()) usage_error("--backbone, --tokens and --out are required");
  if (o.dtype != "f32" && o.dtype != "f64") usage_error("--dtype must be f32 or f64");
  if (o.fusion != "gated" && o.fusion != "joint") usage_error("--fusion must be gated or joint");
  if (o.sidenet.empty() && (o.no_memory || o.memory_tokens || o.chunk_size || o.retrieved_tokens)) {
    usage_error("memory options need --sidenet");
  }
  if (!o.sidenet.empty() && o.hidden_states) usage_error("--hidden-states is for backbone runs (without --sidenet)");
  if (o.format.empty()) {
    const bool binary = o.tokens.ends_with(".i32") || o.tokens.ends_with(".bin");
    o.format = binary ? "int32" : "text";
  }
  if (o.format != "text" && o.format != "int32") usage_error("--format must be text or int32");
  return o;
}

std::vector<std::int32_t> read_tokens(const std::string& path, const std::string& format) {
  std::ifstream in(path, std::ios::binary);
  if (!in) longmem::detail::fail<longmem::FormatError>(path, ": cannot open the token file (", std::strerror(errno), ")");
  std::vector<std::int32_t> ids;
  if (format == "int32") {
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (bytes.size() % 4 != 0) {
      longmem::detail::fail<longmem::FormatError>(path, ": ", bytes.size(),
                                                  " bytes is not a whole number of int32 token ids");
    }
    ids.resize(bytes.size() / 4);
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const auto* b = reinterpret_cast<const unsigned char*>(bytes.data()) + 4 * i;
      ids[i] = static_cast<std::int32_t>(static_cast<std::uint32_t>(b[0]) | static_cast<std::uint32_t>(b[1]) << 8 |
                                         static_cast<std::uint32_t>(b[2]) << 16 | static_cast<std::uint32_t>(b[3]) << 24);
    }
  } else {
    std::string word;
    std::size_t line = 1;
    char c;
    auto flush = [&] {
      if (word.empty()) return;
      std::size_t pos = 0;
      long long v = 0;
      try {
        v = std::stoll(word, &pos);
      } catch (const std::exception&) {
        pos = 0;
      }
      if (pos != word.size() || v < INT32_MIN || v > INT32_MAX) {
        longmem::detail::fail<longmem::FormatError>(path, ":", line, ": '", word, "' is not a token id");
      }
      ids.push_back(static_cast<std::int32_t>(v));
      word.clear();
    };
    while (in.get(c)) {
      if (std::isspace(static_cast<unsigned char>(c))) {
        flush();
        if (c == '\n') ++line;
      } else {
        word.push_back(c);
      }
    }
    flush();
  }
  if (ids.empty()) longmem::detail::fail<longmem::InputError>(path, ": the token file holds no tokens");
  return ids;
}

template <class T>
void write_f32(longmem::SafetensorsWriter& w, const std::string& name, longmem::TensorView<const T, longmem::Host> t) {
  longmem::Tensor<float, longmem::Host> f(t.shape());
  for (longmem::index_t i = 0; i < t.numel(); ++i) f.data()[i] = static_cast<float>(t.data()[i]);
  w.add<float>(name, f.view());
}

template <class T>
int run_backbone(const Options& o, const std::vector<std::int32_t>& ids) {
  using namespace longmem;
  auto backbone = Gpt2Backbone<T>::load(o.backbone);
  const auto& cfg = backbone.config();
  const index_t N = static_cast<index_t>(ids.size());
  const int seg = o.segment_length ? o.segment_length : static_cast<int>(N);
  if (!o.segment_length && N > cfg.n_positions) {
    detail::fail<InputError>(o.tokens, ": ", N, " tokens exceed the backbone's n_positions (", cfg.n_positions,
                             "); pass --segment-length to run independent segments");
  }
  Tensor<T, Host> logits({N, cfg.vocab_size});
  Tensor<T, Host> hidden;
  if (o.hidden_states) hidden.resize({cfg.n_layer + 1, N, cfg.n_embd});
  BackboneOutput<T> out;
  for (index_t b = 0; b < N; b += seg) {
    const index_t len = std::min<index_t>(seg, N - b);
    backbone.forward(std::span<const std::int32_t>(ids).subspan(static_cast<std::size_t>(b), static_cast<std::size_t>(len)),
                     BackboneRequest{true, o.hidden_states, -1}, out);
    copy(cview(out.logits), logits.view().slice(b, b + len));
    if (o.hidden_states) {
      for (int j = 0; j <= cfg.n_layer; ++j) copy(cview(out.hidden)[j], hidden.view()[j].slice(b, b + len));
    }
  }
  SafetensorsWriter w;
  w.set_metadata({{"generator", "longmem-run"}, {"longmem_version", version_string}, {"segment_length", std::to_string(seg)},
                  {"mode", "backbone"}});
  Tensor<std::int32_t, Host> tok({N});
  std::copy(ids.begin(), ids.end(), tok.begin());
  w.add<std::int32_t>("tokens", tok.view());
  write_f32<T>(w, "logits", logits.view());
  if (o.hidden_states) write_f32<T>(w, "hidden_states", hidden.view());
  w.write(o.out);
  if (!o.quiet) {
    std::cout << "backbone " << cfg.architecture << " (L=" << cfg.n_layer << ", d=" << cfg.n_embd << ", H=" << cfg.n_head
              << ", V=" << cfg.vocab_size << "): " << N << " tokens in segments of " << seg << " -> " << o.out << "\n";
  }
  return 0;
}

template <class T, class Fusion>
int run_longmem(const Options& o, const std::vector<std::int32_t>& ids) {
  using namespace longmem;
  using M = Model<Gpt2Backbone<T>, HostMemoryBank<float>, ExactChunkRetriever, Fusion>;
  auto backbone = Gpt2Backbone<T>::load(o.backbone);
  auto side_net = SideNet<T>::load(o.sidenet);
  MemoryConfig mem = side_net.recommended_memory().value_or(MemoryConfig{});
  if (o.memory_tokens) mem.memory_tokens = *o.memory_tokens;
  if (o.chunk_size) mem.chunk_size = *o.chunk_size;
  if (o.retrieved_tokens) mem.retrieved_tokens = *o.retrieved_tokens;
  mem.enabled = !o.no_memory;
  const int seg = o.segment_length ? o.segment_length : backbone.config().n_positions;
  const index_t V = backbone.config().vocab_size;
  M model(std::move(backbone), std::move(side_net), mem, 1, ExactChunkRetriever{}, o.allow_other);
  const index_t N = static_cast<index_t>(ids.size());
  Tensor<float, Host> logits({N, V});
  double nll = 0;
  std::int64_t counted = 0;
  std::span<const std::int32_t> all(ids);
  for (index_t b = 0; b < N; b += seg) {
    const index_t len = std::min<index_t>(seg, N - b);
    // Targets: the next token of the stream (-1 past its end).
    std::vector<std::int32_t> targets(static_cast<std::size_t>(len));
    for (index_t t = 0; t < len; ++t) targets[static_cast<std::size_t>(t)] = b + t + 1 < N ? ids[static_cast<std::size_t>(b + t + 1)] : -1;
    const auto& out = model.forward(all.subspan(static_cast<std::size_t>(b), static_cast<std::size_t>(len)), targets);
    for (index_t i = 0; i < len * V; ++i) logits.data()[b * V + i] = static_cast<float>(out.logits[0].data()[i]);
    nll += out.loss_sum;
    counted += out.loss_tokens;
  }
  SafetensorsWriter w;
  w.set_metadata({{"generator", "longmem-run"},
                  {"longmem_version", version_string},
                  {"mode", "longmem"},
                  {"segment_length", std::to_string(seg)},
                  {"memory", mem.enabled ? "on" : "off"},
                  {"memory_tokens", std::to_string(mem.memory_tokens)},
                  {"chunk_size", std::to_string(mem.chunk_size)},
                  {"retrieved_tokens", std::to_string(mem.retrieved_tokens)},
                  {"fusion", Fusion::name},
                  {"mean_nll", detail::format_double(counted ? nll / static_cast<double>(counted) : 0.0)}});
  Tensor<std::int32_t, Host> tok({N});
  std::copy(ids.begin(), ids.end(), tok.begin());
  w.add<std::int32_t>("tokens", tok.view());
  w.add<float>("logits", logits.view());
  w.write(o.out);
  if (!o.quiet) {
    const double mean = counted ? nll / static_cast<double>(counted) : 0.0;
    std::cout << "longmem: " << N << " tokens in segments of " << seg << ", memory " << (mem.enabled ? "on" : "off")
              << " (msz " << mem.memory_tokens << ", csz " << mem.chunk_size << ", K " << mem.retrieved_tokens << ", "
              << Fusion::name << "), mean NLL " << mean << " nats, perplexity " << std::exp(mean) << " -> " << o.out << "\n";
  }
  return 0;
}

template <class T>
int run(const Options& o, const std::vector<std::int32_t>& ids) {
  if (o.sidenet.empty()) return run_backbone<T>(o, ids);
  if (o.fusion == "joint") return run_longmem<T, longmem::JointFusion>(o, ids);
  return run_longmem<T, longmem::GatedFusion>(o, ids);
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  try {
    const auto ids = read_tokens(o.tokens, o.format);
    return o.dtype == "f64" ? run<double>(o, ids) : run<float>(o, ids);
  } catch (const longmem::Error& e) {
    std::cerr << "longmem-run: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "longmem-run: unexpected error: " << e.what() << "\n";
    return 1;
  }
}
