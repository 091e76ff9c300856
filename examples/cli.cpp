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

#include "cli_support.hpp"

namespace {

using longmem::cli::read_tokens;

struct Options {
  std::string backbone, sidenet, tokens, out, format, dtype = "f32", fusion = "gated";
  int segment_length = 0;
  bool hidden_states = false, no_memory = false, allow_other = false, quiet = false;
  std::optional<int> memory_tokens, chunk_size, retrieved_tokens;
};

Options parse(int argc, char** argv) {
  Options o;
  CLI::App app{"Runs a GPT-2 / GPT-2* checkpoint (safetensors; hyper-parameters from its metadata or a\n"
               "config.json beside it) over a token file and writes 'tokens' and 'logits' (N, V) to --out.\n"
               "With --sidenet it runs LongMem segment by segment with memory.",
               "longmem-run"};
  app.add_option("--backbone", o.backbone, "backbone checkpoint (safetensors)")->required();
  app.add_option("--tokens", o.tokens, "token file: text ids or raw int32")->required();
  app.add_option("--out", o.out, "output safetensors file")->required();
  app.add_option("--format", o.format, "token file format (default: int32 for *.i32/*.bin, else text)")
      ->check(CLI::IsMember({"text", "int32"}));
  app.add_option("--segment-length", o.segment_length,
                 "split the tokens into segments of N (default: the whole file for a backbone, n_positions for LongMem)")
      ->check(CLI::Range(1, 1 << 30));
  app.add_flag("--hidden-states", o.hidden_states, "also write 'hidden_states' (L+1, N, d) (backbone only)");
  app.add_option("--dtype", o.dtype, "compute precision")->check(CLI::IsMember({"f32", "f64"}))->capture_default_str();
  app.add_option("--sidenet", o.sidenet, "run LongMem: backbone + this SideNet with memory");
  app.add_option("--memory-tokens", o.memory_tokens, "memory capacity in tokens per stream (default: the SideNet file's, else 65536)")
      ->check(CLI::Range(1, 1 << 30));
  app.add_option("--chunk-size", o.chunk_size, "tokens per memory chunk (default: file, else 4)")->check(CLI::Range(1, 1 << 30));
  app.add_option("--retrieved-tokens", o.retrieved_tokens, "tokens retrieved per query (default: file, else 64)")
      ->check(CLI::Range(1, 1 << 30));
  app.add_option("--fusion", o.fusion, "how memory and local attention mix (gated: the reference)")
      ->check(CLI::IsMember({"gated", "joint"}))
      ->capture_default_str();
  app.add_flag("--no-memory", o.no_memory, "LongMem without memory (the baseline)");
  app.add_flag("--allow-other-backbone", o.allow_other, "accept a SideNet made for another backbone");
  app.add_flag("--quiet", o.quiet, "print nothing but errors");
  longmem::cli::parse(app, "longmem-run", argc, argv);
  if (o.sidenet.empty() && (o.no_memory || o.memory_tokens || o.chunk_size || o.retrieved_tokens)) {
    longmem::cli::usage_error(app, "longmem-run", "memory options need --sidenet");
  }
  if (!o.sidenet.empty() && o.hidden_states) {
    longmem::cli::usage_error(app, "longmem-run", "--hidden-states is for backbone runs (without --sidenet)");
  }
  if (o.format.empty()) o.format = longmem::cli::token_format_for(o.tokens);
  return o;
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
  return longmem::cli::guarded("longmem-run", [&] {
    const auto ids = read_tokens(o.tokens, o.format);
    return o.dtype == "f64" ? run<double>(o, ids) : run<float>(o, ids);
  });
}
