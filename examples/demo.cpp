// longmem demo: LongMem on the CPU with the embedded default model and data.
//
// 1. Builds the default model: a byte-level GPT-2* backbone (4 layers, d 128, 4 heads,
//    ALiBi) and a SideNet initialised from it as the paper does (layer i <- block 2i+1,
//    gates 0), writes both as safetensors checkpoints and loads them back.
// 2. Streams SST-2 demonstrations ("Review: ... Sentiment: positive") through the model
//    segment by segment: each segment retrieves from the memory of earlier ones, then
//    joins the memory (FIFO over chunks once full).
// 3. Asks held-out reviews with the demonstrations in memory (read-only), with and
//    without memory, and shows what the memory returned for one query.
//
// The default model's weights are random (training comes later), so its predictions are
// chance: this demo shows the mechanics (storage, retrieval, fusion, eviction, speed),
// not accuracy.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <longmem/longmem.hpp>

#ifndef LONGMEM_EXAMPLES_DATA_DIR
#define LONGMEM_EXAMPLES_DATA_DIR "examples/data"
#endif

namespace {

using Clock = std::chrono::steady_clock;
using DemoModel = longmem::Model<longmem::Gpt2Backbone<float>, longmem::HostMemoryBank<float>, longmem::ExactChunkRetriever>;

struct Example {
  std::string sentence;
  int label = 0;
};

// SST-2 TSV: header "sentence<TAB>label", then one example per line.
std::vector<Example> read_sst2(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) longmem::detail::fail<longmem::FormatError>(path.string(), ": cannot open the demo data");
  std::vector<Example> out;
  std::string line;
  std::getline(in, line);  // header
  while (std::getline(in, line)) {
    const auto tab = line.rfind('\t');
    if (tab == std::string::npos) continue;
    out.push_back({line.substr(0, tab), line[tab + 1] == '1' ? 1 : 0});
  }
  if (out.empty()) longmem::detail::fail<longmem::FormatError>(path.string(), ": no examples");
  return out;
}

std::string printable(const std::vector<std::int32_t>& ids, longmem::index_t begin, longmem::index_t end) {
  std::string s;
  for (auto i = std::max<longmem::index_t>(begin, 0); i < std::min<longmem::index_t>(end, static_cast<longmem::index_t>(ids.size())); ++i) {
    const char c = static_cast<char>(ids[static_cast<std::size_t>(i)]);
    s += c == '\n' ? std::string("\\n") : std::string(1, c);
  }
  return s;
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

}  // namespace

int main(int argc, char** argv) {
  using namespace longmem;
  std::filesystem::path data_dir = LONGMEM_EXAMPLES_DATA_DIR;
  std::filesystem::path model_dir = std::filesystem::temp_directory_path() / "longmem-demo-model";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--data" && i + 1 < argc) data_dir = argv[++i];
    else if (a == "--model-dir" && i + 1 < argc) model_dir = argv[++i];
    else {
      std::cerr << "usage: longmem_demo [--data DIR] [--model-dir DIR]\n";
      return 64;
    }
  }
  try {
    std::cout << "longmem " << version_string << " demo: LongMem on the CPU\n\n";

    // 1. The default model, through its checkpoint files.
    const auto bcfg = BackboneConfig::gpt2_star(/*n_layer=*/4, /*n_embd=*/128, /*n_head=*/4,
                                                /*vocab_size=*/ByteTokenizer::vocab_size, /*n_positions=*/512);
    std::filesystem::create_directories(model_dir);
    const auto backbone_path = model_dir / "backbone.safetensors", side_net_path = model_dir / "sidenet.safetensors";
    MemoryConfig memory;
    memory.memory_tokens = 16384;  // per stream
    memory.chunk_size = 2;         // the paper's in-context-learning setting
    memory.retrieved_tokens = 32;  // 16 chunks per query and head
    {
      auto backbone = Gpt2Backbone<float>::random(bcfg, /*seed=*/2023);
      SideNet<float>::from_backbone(backbone, /*memory_layer=*/2).save(side_net_path, memory);
      backbone.save(backbone_path);
    }
    DemoModel model(Gpt2Backbone<float>::load(backbone_path), SideNet<float>::load(side_net_path),
                    *SideNet<float>::load(side_net_path).recommended_memory());
    const auto& sn = model.side_net().config();
    std::cout << "model    GPT-2* backbone: " << bcfg.n_layer << " layers, d " << bcfg.n_embd << ", " << bcfg.n_head
              << " heads, ALiBi, byte vocabulary; SideNet: " << sn.n_layer << " layers, memory at layer "
              << sn.memory_augmented_layer() << " (backbone layer m = " << sn.memory_layer << ")\n"
              << "         checkpoints: " << backbone_path.string() << ", " << side_net_path.string() << "\n"
              << "         weights are random (untrained): predictions are chance; the mechanics are real\n"
              << "memory   " << memory.memory_tokens << " tokens per stream, chunks of " << memory.chunk_size << ", "
              << memory.retrieved_tokens << " tokens (" << memory.retrieved_chunks() << " chunks) retrieved per query and head\n\n";

    // 2. Demonstrations into memory.
    const auto train = read_sst2(data_dir / "sst2_sample.tsv");
    const auto dev = read_sst2(data_dir / "sst2_dev_sample.tsv");
    std::string demos;
    for (const auto& e : train) demos += "Review: " + e.sentence + "\nSentiment: " + (e.label ? "positive" : "negative") + "\n\n";
    const auto stream = ByteTokenizer::encode(demos);
    const int segment = 256;
    auto t0 = Clock::now();
    double nll = 0;
    std::int64_t counted = 0;
    for (std::size_t b = 0; b + 1 < stream.size(); b += segment) {
      const std::size_t len = std::min<std::size_t>(segment, stream.size() - 1 - b);
      const auto& out = model.forward(std::span(stream).subspan(b, len), std::span(stream).subspan(b + 1, len));
      nll += out.loss_sum;
      counted += out.loss_tokens;
    }
    const double secs = seconds_since(t0);
    const auto& bank = model.bank(0);
    std::printf("stream   %zu SST-2 demonstrations, %zu bytes, segments of %d: %.0f tokens/s, perplexity %.2f\n",
                train.size(), stream.size(), segment, static_cast<double>(stream.size()) / secs,
                std::exp(nll / static_cast<double>(counted)));
    std::printf("bank     %lld chunks of %d tokens (%lld tokens, %.1f MiB), %lld chunks evicted, %lld tokens pending\n\n",
                static_cast<long long>(bank.num_chunks()), memory.chunk_size, static_cast<long long>(bank.size_tokens()),
                static_cast<double>(bank.bytes_used()) / (1 << 20),
                static_cast<long long>(bank.chunks_appended() - bank.num_chunks()), static_cast<long long>(bank.pending_tokens()));

    // 3. Held-out reviews, demonstrations in memory (read-only), with and without memory.
    model.set_remember(false);
    int correct_mem = 0, correct_plain = 0, changed = 0;
    double margin_shift = 0;  // mean |change of the logit margin 'p' - 'n'| due to memory
    const int p_id = 'p', n_id = 'n';
    for (const auto& e : dev) {
      const auto prompt = ByteTokenizer::encode("Review: " + e.sentence + "\nSentiment: ");
      int pred[2];
      double margin[2];
      for (int use_memory = 1; use_memory >= 0; --use_memory) {
        model.set_memory_enabled(use_memory != 0);
        const auto& out = model.forward(prompt);
        const auto last = static_cast<index_t>(prompt.size()) - 1;
        margin[use_memory] = static_cast<double>(out.logits[0](last, p_id)) - out.logits[0](last, n_id);
        pred[use_memory] = margin[use_memory] > 0 ? 1 : 0;
      }
      correct_mem += pred[1] == e.label;
      correct_plain += pred[0] == e.label;
      changed += pred[0] != pred[1];
      margin_shift += std::abs(margin[1] - margin[0]) / static_cast<double>(dev.size());
    }
    model.set_memory_enabled(true);
    std::printf("queries  %zu held-out reviews: accuracy %.1f%% with memory, %.1f%% without (chance: random weights);\n"
                "         memory moved the positive-vs-negative logit margin by %.4f on average and changed %d answers\n\n",
                dev.size(), 100.0 * correct_mem / static_cast<double>(dev.size()),
                100.0 * correct_plain / static_cast<double>(dev.size()), margin_shift, changed);

    // What the memory returned for the last token of one query (head 0, best first).
    const auto prompt = ByteTokenizer::encode("Review: " + dev[0].sentence + "\nSentiment: ");
    model.forward(prompt);
    const auto& r = model.last_retrieval();
    const auto last = static_cast<index_t>(prompt.size()) - 1;
    std::cout << "retrieval for the last token of \"" << printable(prompt, 0, static_cast<index_t>(prompt.size()))
              << "\" (head 0):\n";
    for (int c = 0; c < std::min(r.chunks, 5); ++c) {
      const index_t slot = r.slots(last, 0, c);
      const index_t pos = bank.chunk_position(slot);
      std::printf("  score %7.3f  chunk at byte %6lld: \"%s\" in \"...%s...\"\n", static_cast<double>(r.scores(last, 0, c)),
                  static_cast<long long>(pos), printable(stream, pos, pos + memory.chunk_size).c_str(),
                  printable(stream, pos - 12, pos + memory.chunk_size + 12).c_str());
    }
    const auto cli = std::filesystem::path(argv[0]).parent_path() / "longmem-run";
    std::cout << "\nNext: run these checkpoints (or any other) over a token file with the command-line tool:\n  "
              << cli.string() << " --backbone " << backbone_path.string() << " --sidenet " << side_net_path.string()
              << " --tokens ids.txt --out out.safetensors\n";
    return 0;
  } catch (const longmem::Error& e) {
    std::cerr << "longmem_demo: " << e.what() << "\n";
    return 2;
  }
}
