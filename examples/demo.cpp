// longmem demo: long-term memory at work, on the CPU, with the embedded models.
//
// The embedded models (examples/models/, made by examples/models/train.sh with longmem-train): a
// byte-level GPT-2* backbone trained from scratch with a 256-token window, and its SideNet trained by
// memory-augmented adaptation. The demo reads held-out public-domain books (examples/data/heldout/,
// never seen in training) and shows:
//
//   1. perplexity on a held-out long document: the backbone alone, the SideNet without memory, and
//      LongMem with 4 Ki, 16 Ki and 64 Ki tokens of memory (tokens/s of each);
//   2. a passkey test: a random 5-digit key stated once, N tokens of held-out text, then "What is the
//      pass key?"; accuracy over 50 trials at N = 1 Ki .. 64 Ki, for the backbone and for LongMem;
//   3. loss against position in the document, with and without memory, as a PNG (gnuplot).
//
// The filler's memory entries depend only on its tokens (DESIGN.md section 2), so they are computed
// once and appended to every trial's fresh memory after that trial's key.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

#include <longmem/longmem.hpp>
#include <longmem/train/data.hpp>

#include "cli_support.hpp"

#ifndef LONGMEM_EXAMPLES_DIR
#define LONGMEM_EXAMPLES_DIR "examples"
#endif

namespace {

namespace fs = std::filesystem;
using namespace longmem;
using Clock = std::chrono::steady_clock;
using LongMem = Model<Gpt2Backbone<float>, HostMemoryBank<float>, ExactChunkRetriever>;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

/// One line that rewrites itself on a terminal: "[#####.....] what".
class Progress {
 public:
  explicit Progress(bool quiet) : tty_(!quiet && isatty(fileno(stderr)) != 0), quiet_(quiet) {}
  void show(double fraction, const std::string& what) {
    if (quiet_) return;
    const int width = 24, filled = static_cast<int>(std::clamp(fraction, 0.0, 1.0) * width);
    if (!tty_) return;
    std::cerr << "\r[" << std::string(static_cast<std::size_t>(filled), '#') << std::string(static_cast<std::size_t>(width - filled), '.')
              << "] " << what << "        " << std::flush;
  }
  void done() {
    if (tty_) std::cerr << "\r" << std::string(100, ' ') << "\r" << std::flush;
  }

 private:
  bool tty_, quiet_;
};

struct Options {
  fs::path models = fs::path(LONGMEM_EXAMPLES_DIR) / "models";
  fs::path data = fs::path(LONGMEM_EXAMPLES_DIR) / "data" / "heldout";
  fs::path out = fs::temp_directory_path() / "longmem-demo";
  std::int64_t eval_tokens = 98304;  // of the held-out document
  int trials = 50;
  std::uint64_t seed = 2023;
  bool quiet = false;
  bool diagnose = false;  // passkey: where retrieval and reading fail (adds N = 0, teacher-forced)
};

Options parse(int argc, char** argv) {
  Options o;
  CLI::App app{"The LongMem demo: perplexity with and without memory on a held-out long book, and a passkey test, "
               "with the embedded models.", "longmem_demo"};
  app.add_option("--models", o.models, "folder with backbone.safetensors and sidenet.safetensors")->capture_default_str();
  app.add_option("--data", o.data, "folder with the held-out texts")->capture_default_str();
  app.add_option("--out", o.out, "where the plot and its data go")->capture_default_str();
  app.add_option("--eval-tokens", o.eval_tokens, "tokens of the held-out document to score")
      ->check(CLI::Range(std::int64_t{1024}, std::int64_t{1} << 30))
      ->capture_default_str();
  app.add_option("--trials", o.trials, "passkey trials per distance")->check(CLI::Range(1, 100000))->capture_default_str();
  app.add_option("--seed", o.seed, "seed of the passkeys")->capture_default_str();
  app.add_flag("--quiet", o.quiet, "no progress bar");
  app.add_flag("--diagnose", o.diagnose,
               "passkey diagnosis: per distance (and N = 0), with the right digits fed back, how often each head "
               "retrieves the chunk holding the next digit, and how often the digit is predicted");
  cli::parse(app, "longmem_demo", argc, argv);
  return o;
}

std::vector<std::int32_t> read_text(const fs::path& p) { return read_text_document(p).tokens; }

/// Mean loss per position bucket of `bucket` tokens (NaN where nothing was scored).
std::vector<double> bucket_means(const std::vector<float>& losses, std::size_t bucket) {
  std::vector<double> out;
  for (std::size_t b = 0; b < losses.size(); b += bucket) {
    double s = 0;
    int n = 0;
    for (std::size_t i = b; i < std::min(losses.size(), b + bucket); ++i) {
      if (losses[i] == losses[i]) {
        s += losses[i];
        ++n;
      }
    }
    out.push_back(n ? s / n : NAN);
  }
  return out;
}

struct Scored {
  double nll = 0;
  double tokens_per_second = 0;
  std::vector<float> token_losses;
};

/// The backbone alone, segment by segment (each segment on its own: its window).
Scored score_backbone(const Gpt2Backbone<float>& backbone, std::span<const std::int32_t> tokens, int segment, Progress& bar,
                      const std::string& what) {
  Scored r;
  BackboneOutput<float> out;
  Tensor<float, Host> losses;
  std::vector<std::int32_t> targets;
  double sum = 0;
  std::int64_t count = 0;
  const auto t0 = Clock::now();
  for (std::size_t b = 0; b < tokens.size(); b += static_cast<std::size_t>(segment)) {
    const std::size_t len = std::min<std::size_t>(static_cast<std::size_t>(segment), tokens.size() - b);
    targets.assign(len, -1);
    for (std::size_t i = 0; i < len; ++i) {
      if (b + i + 1 < tokens.size()) targets[i] = tokens[b + i + 1];
    }
    backbone.forward(tokens.subspan(b, len), BackboneRequest{true, false, -1}, out);
    losses.resize({static_cast<index_t>(len)});
    const auto [s, c] = ops::cross_entropy(cview(out.logits), targets, losses.view());
    sum += s;
    count += c;
    for (std::size_t i = 0; i < len; ++i) r.token_losses.push_back(targets[i] == -1 ? NAN : losses.data()[i]);
    bar.show(static_cast<double>(b + len) / static_cast<double>(tokens.size()), what);
  }
  r.nll = sum / static_cast<double>(count);
  r.tokens_per_second = static_cast<double>(tokens.size()) / seconds_since(t0);
  return r;
}

/// LongMem (or the SideNet with memory off) over the document as one stream.
Scored score_longmem(LongMem& model, std::span<const std::int32_t> tokens, int segment, Progress& bar, const std::string& what) {
  Scored r;
  model.reset();
  std::vector<std::int32_t> targets;
  double sum = 0;
  std::int64_t count = 0;
  const auto t0 = Clock::now();
  for (std::size_t b = 0; b < tokens.size(); b += static_cast<std::size_t>(segment)) {
    const std::size_t len = std::min<std::size_t>(static_cast<std::size_t>(segment), tokens.size() - b);
    targets.assign(len, -1);
    for (std::size_t i = 0; i < len; ++i) {
      if (b + i + 1 < tokens.size()) targets[i] = tokens[b + i + 1];
    }
    const auto& out = model.forward(tokens.subspan(b, len), targets);
    Tensor<float, Host> losses({static_cast<index_t>(len)});
    ops::cross_entropy(cview(out.logits[0]), targets, losses.view());
    sum += out.loss_sum;
    count += out.loss_tokens;
    for (std::size_t i = 0; i < len; ++i) r.token_losses.push_back(targets[i] == -1 ? NAN : losses.data()[i]);
    bar.show(static_cast<double>(b + len) / static_cast<double>(tokens.size()), what);
  }
  r.nll = sum / static_cast<double>(count);
  r.tokens_per_second = static_cast<double>(tokens.size()) / seconds_since(t0);
  return r;
}

/// Greedy continuation of `prompt` by `n` tokens: the backbone alone (memory == nullptr) or LongMem
/// with its memory read-only.
std::string continue_greedy(const Gpt2Backbone<float>* backbone, LongMem* model, std::vector<std::int32_t> prompt, int n) {
  std::string out;
  BackboneOutput<float> bo;
  for (int i = 0; i < n; ++i) {
    const TensorView<const float, Host> logits = [&] {
      if (model) return cview(model->forward(prompt).logits[0]);
      backbone->forward(prompt, BackboneRequest{true, false, -1}, bo);
      return cview(bo.logits);
    }();
    const index_t V = logits.dim(1), last = logits.dim(0) - 1;
    const float* row = logits.data() + last * V;
    const auto next = static_cast<std::int32_t>(std::max_element(row, row + V) - row);
    out.push_back(static_cast<char>(next));
    prompt.push_back(next);
  }
  return out;
}

/// Passkey diagnosis, one trial with the key's statement and the filler already in memory: feeds the
/// question and then the right digits (teacher forcing) and, for each of the 5 digit predictions,
/// records per head whether a retrieved chunk holds that digit (either place the statement gives it)
/// and whether the prediction is right. It separates retrieval from reading: a digit whose chunk is
/// retrieved but not predicted is a reading failure.
/// The passkey's statement: the key twice, "The pass key is " first (the key starts at its size).
constexpr std::string_view kPasskeyLead = "The pass key is ";
std::string passkey_statement(const char* key) {
  return std::string(kPasskeyLead) + key + ". Remember it. " + key + " is the pass key.\n";
}

/// Softmax probability of the tokens first .. last (default: `first` alone) in one logits row of V
/// entries (in double).
double token_probability(const float* row, index_t V, std::int32_t first, std::int32_t last = -1) {
  const float top = *std::max_element(row, row + V);
  double z = 0;
  for (index_t v = 0; v < V; ++v) z += std::exp(static_cast<double>(row[v] - top));
  double p = 0;
  for (std::int32_t t = first; t <= std::max(first, last); ++t) p += std::exp(static_cast<double>(row[t] - top));
  return p / z;
}

struct PasskeyDiagnosis {
  std::vector<std::int64_t> head_hits;  // (H) digit predictions whose chunk the head retrieved
  std::int64_t any_head_hits = 0, predictions = 0, right = 0;
  std::int64_t trials = 0, first_right = 0, first_digit = 0;  // the first prediction: the key's first digit, any digit
  std::int64_t first_hits = 0;            // the first prediction: some head retrieved the first digit's chunk
  double p_right = 0;                     // sum over predictions of p(right digit)
  double first_p_right = 0, first_p_digit = 0;  // the first prediction: p(its digit), p(any digit)
};

void diagnose_passkey(LongMem& model, std::vector<std::int32_t> prompt, const std::string& key,
                      const std::vector<std::int64_t>& key_positions, PasskeyDiagnosis& d) {
  const auto& bank = model.bank(0);
  const index_t csz = model.geometry().chunk_size;
  for (std::size_t i = 0; i < key.size(); ++i) {
    const auto& out = model.forward(prompt);
    const TensorView<const float, Host> logits = cview(out.logits[0]);
    const index_t V = logits.dim(1), last = logits.dim(0) - 1;
    const float* row = logits.data() + last * V;
    const auto want = static_cast<std::int32_t>(static_cast<unsigned char>(key[i]));
    const double p_want = token_probability(row, V, want);
    d.p_right += p_want;
    const auto best = static_cast<std::int32_t>(std::max_element(row, row + V) - row);
    d.right += best == want;
    if (i == 0) {
      ++d.trials;
      d.first_p_right += p_want;
      d.first_p_digit += token_probability(row, V, '0', '9');
      d.first_right += best == want;
      d.first_digit += best >= '0' && best <= '9';
    }
    ++d.predictions;
    const auto& r = model.last_retrieval();  // slots (T, H, k')
    const index_t H = r.slots.dim(1), k = r.slots.dim(2);
    if (d.head_hits.empty()) d.head_hits.assign(static_cast<std::size_t>(H), 0);
    bool any = false;
    for (index_t h = 0; h < H; ++h) {
      bool hit = false;
      for (index_t j = 0; j < k && !hit; ++j) {
        const index_t start = bank.chunk_position(r.slots.data()[(last * H + h) * k + j]);
        for (std::int64_t p : key_positions) hit |= p + static_cast<std::int64_t>(i) >= start && p + static_cast<std::int64_t>(i) < start + csz;
      }
      d.head_hits[static_cast<std::size_t>(h)] += hit;
      any |= hit;
    }
    d.any_head_hits += any;
    if (i == 0) d.first_hits += any;
    prompt.push_back(want);
  }
}

void plot(const fs::path& dir, const std::vector<std::pair<std::string, std::vector<double>>>& series, std::size_t bucket,
          const std::string& title, bool quiet) {
  const fs::path dat = dir / "loss_by_position.tsv", png = dir / "loss_by_position.png";
  {
    std::ofstream f(dat);
    f << "position";
    for (const auto& s : series) f << '\t' << s.first;
    f << '\n';
    for (std::size_t i = 0; i < series[0].second.size(); ++i) {
      f << (i + 1) * bucket;
      for (const auto& s : series) f << '\t' << s.second[i];
      f << '\n';
    }
  }
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
    if (!quiet) std::cout << "(gnuplot not found: the plot's data is in " << dat.string() << ")\n";
    return;
  }
  const fs::path gp = dir / "loss_by_position.gp";
  {
    std::ofstream g(gp);
    g << "set terminal pngcairo size 900,540 font ',10'\nset output '" << png.string() << "'\n"
      << "set title '" << title << "'\nset xlabel 'position in the document (bytes)'\n"
      << "set ylabel 'loss (nats per byte), mean over " << bucket << " bytes'\nset grid\nset key top right\n"
      << "set datafile missing 'nan'\nplot ";
    const char* colors[] = {"#7f7f7f", "#1f77b4", "#c0392b"};
    for (std::size_t i = 0; i < series.size(); ++i) {
      g << (i ? ", " : "") << "'" << dat.string() << "' using 1:" << i + 2 << " every ::1 with linespoints lw 2 pt 7 ps 0.6 lc rgb '"
        << colors[i % 3] << "' title '" << series[i].first << "'";
    }
    g << "\n";
  }
  const std::string cmd = "gnuplot '" + gp.string() + "' >/dev/null 2>&1";
  if (std::system(cmd.c_str()) == 0) {
    if (!quiet) std::cout << "plot     " << png.string() << "\n";
  } else if (!quiet) {
    std::cout << "(gnuplot failed; see " << gp.string() << ")\n";
  }
}

int run(const Options& o) {
  const auto t_start = Clock::now();
  const fs::path bb_path = o.models / "backbone.safetensors", sn_path = o.models / "sidenet.safetensors";
  for (const auto& p : {bb_path, sn_path}) {
    if (!fs::exists(p)) {
      detail::fail<FormatError>(p.string(), ": the embedded model is missing (examples/models/train.sh makes it)");
    }
  }
  auto backbone = Gpt2Backbone<float>::load(bb_path);
  auto side_net = SideNet<float>::load(sn_path);
  const auto& bc = backbone.config();
  const auto& sc = side_net.config();
  const int segment = bc.n_positions;
  const MemoryConfig trained = side_net.recommended_memory().value_or(MemoryConfig{});
  std::cout << "longmem " << version_string << " demo: long-term memory on the CPU\n\n"
            << "model    backbone GPT-2* (" << bc.n_layer << " layers, d " << bc.n_embd << ", " << bc.n_head << " heads, ALiBi, bytes), window "
            << segment << " tokens, trained from scratch by longmem-train\n"
            << "         SideNet " << sc.n_layer << " layers, memory in layer " << sc.memory_augmented_layer() << " (backbone layer "
            << sc.memory_layer << "), adapted with " << trained.memory_tokens << " tokens of memory, chunks of " << trained.chunk_size
            << ", " << trained.retrieved_tokens << " retrieved per query\n"
            << "         " << bb_path.string() << ", " << sn_path.string() << "\n";

  // 1. Perplexity on a held-out book.
  const fs::path book = o.data / "kjv-19-jeremiah-lamentations.txt";
  auto doc = read_text(book);
  if (static_cast<std::int64_t>(doc.size()) < 2 * segment) {
    detail::fail<InputError>(book.string(), ": ", doc.size(), " tokens, shorter than two segments of ", segment);
  }
  if (static_cast<std::int64_t>(doc.size()) > o.eval_tokens) doc.resize(static_cast<std::size_t>(o.eval_tokens));
  std::cout << "\nheld-out " << book.filename().string() << " (King James Bible, public domain; never seen in training): first "
            << doc.size() << " bytes, segments of " << segment << "\n\n";
  Progress bar(o.quiet);
  std::vector<std::pair<std::string, Scored>> rows;
  rows.emplace_back("backbone alone (its 256-token window)", score_backbone(backbone, doc, segment, bar, "backbone"));
  const int sizes[] = {4096, 16384, 65536};
  {
    MemoryConfig off = trained;
    off.enabled = false;
    LongMem model(backbone.clone(), side_net.clone(), off, 1);
    rows.emplace_back("SideNet, memory off", score_longmem(model, doc, segment, bar, "SideNet without memory"));
  }
  for (int m : sizes) {
    MemoryConfig mem = trained;
    mem.memory_tokens = m;
    LongMem model(backbone.clone(), side_net.clone(), mem, 1);
    rows.emplace_back("LongMem, " + std::to_string(m / 1024) + " Ki tokens of memory",
                      score_longmem(model, doc, segment, bar, "LongMem " + std::to_string(m / 1024) + " Ki"));
  }
  bar.done();
  std::printf("%-42s %10s %10s %10s\n", "", "loss", "perplexity", "tokens/s");
  for (const auto& [name, r] : rows) {
    std::printf("%-42s %10.4f %10.3f %10.0f\n", name.c_str(), r.nll, std::exp(r.nll), r.tokens_per_second);
  }

  // 3. Loss by position (memory matters more the further into the document).
  const std::size_t bucket = 8192;
  fs::create_directories(o.out);
  plot(o.out,
       {{"backbone alone", bucket_means(rows[0].second.token_losses, bucket)},
        {"SideNet, memory off", bucket_means(rows[1].second.token_losses, bucket)},
        {"LongMem, 64 Ki memory", bucket_means(rows.back().second.token_losses, bucket)}},
       bucket, "Held-out Jeremiah + Lamentations: loss by position, with and without memory", o.quiet);

  // 2. Passkey.
  const fs::path filler_path = o.data / "devils-dictionary.txt";
  const auto filler_all = read_text(filler_path);
  const std::int64_t max_n = 65536;
  if (static_cast<std::int64_t>(filler_all.size()) < max_n) {
    detail::fail<InputError>(filler_path.string(), ": ", filler_all.size(), " tokens, fewer than the ", max_n, " of filler needed");
  }
  const std::vector<std::int32_t> filler(filler_all.begin() + 4096, filler_all.begin() + 4096 + max_n);  // past the title page
  // The filler's memory entries, once: segments of the window, as the model would stream them.
  BackboneOutput<float> bo;
  const BackboneRequest capture{false, false, sc.memory_layer};
  Tensor<float, Host> filler_k({max_n, bc.n_head, bc.head_dim()}), filler_v({max_n, bc.n_head, bc.head_dim()});
  for (std::int64_t b = 0; b < max_n; b += segment) {
    backbone.forward(std::span<const std::int32_t>(filler).subspan(static_cast<std::size_t>(b), static_cast<std::size_t>(segment)),
                     capture, bo);
    copy(cview(bo.mem_keys), filler_k.view().slice(b, b + segment));
    copy(cview(bo.mem_values), filler_v.view().slice(b, b + segment));
    bar.show(static_cast<double>(b + segment) / static_cast<double>(max_n), "passkey filler into memory entries");
  }
  MemoryConfig pk = trained;
  pk.memory_tokens = static_cast<int>(max_n + 2 * segment);  // the key and all the filler fit
  LongMem model(backbone.clone(), side_net.clone(), pk, 1);
  model.set_remember(false);  // the question does not join the memory
  const auto question = ByteTokenizer::encode("\nWhat is the pass key? The pass key is ");
  std::mt19937_64 rng(o.seed);
  std::uniform_int_distribution<int> key_dist(0, 99999);
  const std::int64_t distances[] = {1024, 4096, 16384, 65536};
  std::printf("\npasskey  \"The pass key is NNNNN. Remember it. NNNNN is the pass key.\", then N bytes of held-out text\n"
              "         (The Devil's Dictionary), then \"What is the pass key? The pass key is\"; greedy; a key is right when all\n"
              "         5 digits match (chance 1 in 100000), a digit when it is in its place (chance 1 in 10); %d trials per N\n\n",
              o.trials);
  const int total = o.trials * 4;
  int done = 0;
  if (o.diagnose) {
    // The gates: sigmoid(g_h) is the weight of head h's memory branch.
    const auto& gate = model.side_net().parameters().layers.at(static_cast<std::size_t>(sc.memory_augmented_layer())).gate;
    std::printf("diagnosis: memory weight sigmoid(g) per head:");
    for (index_t h = 0; h < gate.dim(0); ++h) std::printf(" %.3f", 1.0 / (1.0 + std::exp(-static_cast<double>(gate.data()[h]))));
    std::printf("\n");
    // The backbone alone with the key in its window (statement, then the question): whether it copies
    // a number from its context at all. Memory keys and values are its layer-m keys and values; the
    // SideNet's queries are trained to read them (the embedded pair: the backbone almost never begins
    // the number, p = 0.002 for the first digit, while LongMem begins it from memory).
    {
      std::mt19937_64 key_rng(o.seed + 1);
      double p_first = 0, p_rest = 0;
      BackboneOutput<float> out;
      for (int t = 0; t < o.trials; ++t) {
        char key[6];
        std::snprintf(key, sizeof key, "%05d", key_dist(key_rng));
        auto prompt = ByteTokenizer::encode(passkey_statement(key));
        prompt.insert(prompt.end(), question.begin(), question.end());
        const auto answer_at = static_cast<index_t>(prompt.size());  // logits row answer_at - 1 + i predicts digit i
        for (int i = 0; i < 5; ++i) prompt.push_back(static_cast<std::int32_t>(static_cast<unsigned char>(key[i])));
        model.backbone().forward(prompt, BackboneRequest{true, false, -1}, out);
        const TensorView<const float, Host> logits = cview(out.logits);
        const index_t V = logits.dim(1);
        for (int i = 0; i < 5; ++i) {
          const double p = token_probability(logits.data() + (answer_at - 1 + i) * V, V, static_cast<unsigned char>(key[i]));
          (i == 0 ? p_first : p_rest) += p;
        }
      }
      std::printf("backbone alone, the key in its window (digits fed back): mean p(digit) %.3f; first digit %.3f, the others %.3f\n",
                  (p_first + p_rest) / (5.0 * o.trials), p_first / o.trials, p_rest / (4.0 * o.trials));
    }
    std::printf("%-8s %-40s %12s %14s %14s %14s %22s %18s\n", "N", "digit's chunk retrieved, per head (%)", "any head (%)",
                "digit right (%)", "mean p(digit)", "1st: right/digit (%)", "1st: chunk retrieved (%)", "1st: p(it) / p(any)");
    for (std::int64_t n : {std::int64_t{0}, std::int64_t{1024}, std::int64_t{4096}, std::int64_t{16384}, std::int64_t{65536}}) {
      PasskeyDiagnosis d;
      for (int t = 0; t < o.trials; ++t) {
        char key[6];
        std::snprintf(key, sizeof key, "%05d", key_dist(rng));
        const std::string statement = passkey_statement(key);
        const std::vector<std::int64_t> at = {static_cast<std::int64_t>(kPasskeyLead.size()),
                                              static_cast<std::int64_t>(statement.find(key, kPasskeyLead.size() + 5))};
        model.reset();
        model.set_remember(true);
        model.forward(ByteTokenizer::encode(statement));
        if (n > 0) model.bank(0).append(cview(filler_k).slice(0, n), cview(filler_v).slice(0, n));
        model.set_remember(false);
        diagnose_passkey(model, question, key, at, d);
      }
      std::string heads;
      for (auto h : d.head_hits) heads += std::to_string(static_cast<int>(std::lround(100.0 * static_cast<double>(h) / static_cast<double>(d.predictions)))) + " ";
      const auto trials = static_cast<double>(d.trials);
      std::printf("%-8s %-40s %12.0f %14.0f %14.3f %9.0f / %-4.0f %22.0f %11.3f / %.3f\n",
                  (std::to_string(n / 1024) + (n ? " Ki" : "")).c_str(), heads.c_str(),
                  100.0 * static_cast<double>(d.any_head_hits) / static_cast<double>(d.predictions),
                  100.0 * static_cast<double>(d.right) / static_cast<double>(d.predictions), d.p_right / static_cast<double>(d.predictions),
                  100.0 * static_cast<double>(d.first_right) / trials, 100.0 * static_cast<double>(d.first_digit) / trials,
                  100.0 * static_cast<double>(d.first_hits) / trials, d.first_p_right / trials, d.first_p_digit / trials);
    }
    return 0;
  }
  std::printf("%-10s %22s %22s %24s %24s\n", "N", "backbone: keys right", "LongMem: keys right", "backbone: digits right",
              "LongMem: digits right");
  for (std::int64_t n : distances) {
    int right_backbone = 0, right_longmem = 0, digits_backbone = 0, digits_longmem = 0;
    // digits in the right place (chance 1 in 10 each): a finer measure beside the strict 5-digit match
    auto digits_right = [](const std::string& answer, const char* key) {
      int n = 0;
      for (std::size_t i = 0; i < 5 && i < answer.size(); ++i) n += answer[i] == key[i];
      return n;
    };
    for (int t = 0; t < o.trials; ++t) {
      char key[6];
      std::snprintf(key, sizeof key, "%05d", key_dist(rng));
      const std::string statement = passkey_statement(key);
      model.reset();
      model.set_remember(true);
      model.forward(ByteTokenizer::encode(statement));  // the key becomes memory
      model.bank(0).append(cview(filler_k).slice(0, n), cview(filler_v).slice(0, n));
      model.set_remember(false);
      const std::string by_longmem = continue_greedy(nullptr, &model, question, 5);
      const std::string by_backbone = continue_greedy(&backbone, nullptr, question, 5);
      right_longmem += by_longmem == key;
      right_backbone += by_backbone == key;
      digits_longmem += digits_right(by_longmem, key);
      digits_backbone += digits_right(by_backbone, key);
      bar.show(static_cast<double>(++done) / total, "passkey trials");
    }
    bar.done();
    std::printf("%-10s %15d / %-4d %15d / %-4d %16d / %-5d %16d / %-5d\n", (std::to_string(n / 1024) + " Ki").c_str(), right_backbone,
                o.trials, right_longmem, o.trials, digits_backbone, 5 * o.trials, digits_longmem, 5 * o.trials);
  }
  std::printf("\ndone in %.0f s\n", seconds_since(t_start));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  return cli::guarded("longmem_demo", [&] { return run(o); });
}
