// longmem-train: trains LongMem in C++, no Python in the loop.
//
//   adapt     memory-augmented adaptation (the paper's mode): a frozen backbone, the SideNet
//             trains (initialised from the backbone as the paper does, or from --sidenet)
//   pretrain  a GPT-2 / GPT-2* backbone from scratch (or from --backbone) as a language model
//
// Data: text files (bytes are tokens), raw int32 token files (*.i32, *.bin) or a corpus folder
// written by examples/corpus/prepare.sh (its manifest's train / valid splits); B streams each read
// their document's consecutive segments, memory carried from segment to segment.
//
// Output folder (--out): checkpoint.safetensors (weights, AdamW moments, step, RNG, data position,
// memory), sidenet.safetensors or backbone.safetensors (the model), log.csv, loss.png (gnuplot).
// Ctrl-C stops after the current update and saves a checkpoint; --resume continues bit for bit.
//
// --save-gradients FILE runs the given token stream once (segments in order, memory on) and writes
// the gradient of the mean next-token loss for every trainable tensor under its checkpoint name.
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include <longmem/train.hpp>

#include "cli_support.hpp"

namespace {

namespace fs = std::filesystem;
using namespace longmem;

constexpr const char* tool = "longmem-train";

std::atomic<bool> interrupted{false};
extern "C" void on_sigint(int) { interrupted = true; }

struct Options {
  std::string mode;
  // model
  std::string backbone, sidenet, arch = "gpt2-star", dtype = "f32", fusion = "gated";
  int layers = 4, width = 256, heads = 8, context = 256, vocab = ByteTokenizer::vocab_size, inner = 0;
  std::optional<int> memory_layer;
  int reduction = 2;
  // memory
  int memory_tokens = 16384, chunk_size = 4, retrieved_tokens = 64;
  bool no_memory = false, allow_other = false;
  // data
  std::vector<std::string> train, valid;
  std::string corpus;
  int batch = 8;
  int recall_practice = 0;
  bool recall_only = false;
  RecallPractice practice;
  std::string recall_wording = "fixed", recall_targets = "all";
  // run
  TrainConfig run;
  std::string decay = "polynomial";
  std::int64_t eval_every = 0, checkpoint_every = 0, log_every = 10, stop_after = 0;
  std::string out, resume;
  std::string save_gradients, tokens;
  bool quiet = false, no_plot = false;
};

Options parse(int argc, char** argv) {
  Options o;
  o.run.steps = 1000;
  CLI::App app{"Trains LongMem in C++: memory-augmented adaptation of a SideNet (adapt) or a backbone from\n"
               "scratch (pretrain). Writes checkpoint.safetensors, the model, log.csv and loss.png to --out.",
               tool};
  app.add_option("mode", o.mode, "adapt | pretrain")->required()->check(CLI::IsMember({"adapt", "pretrain"}));

  auto* model = app.add_option_group("model");
  model->add_option("--backbone", o.backbone, "backbone checkpoint (adapt: required; pretrain: start from it)");
  model->add_option("--sidenet", o.sidenet, "adapt: start from this SideNet (default: initialised from the backbone)");
  model->add_option("--memory-layer", o.memory_layer, "adapt: backbone layer m whose keys/values are remembered (default L/2)");
  model->add_option("--reduction-factor", o.reduction, "adapt: backbone layers per SideNet layer")->capture_default_str();
  model->add_option("--arch", o.arch, "pretrain from scratch: gpt2 | gpt2-star")
      ->check(CLI::IsMember({"gpt2", "gpt2-star"}))
      ->capture_default_str();
  model->add_option("--layers", o.layers, "pretrain from scratch: layers")->check(CLI::Range(1, 4096))->capture_default_str();
  model->add_option("--width", o.width, "pretrain from scratch: n_embd")->check(CLI::Range(1, 1 << 16))->capture_default_str();
  model->add_option("--heads", o.heads, "pretrain from scratch: heads")->check(CLI::Range(1, 4096))->capture_default_str();
  model->add_option("--inner", o.inner, "pretrain from scratch: MLP width (default 4 x width)")->check(CLI::Range(0, 1 << 20));
  model->add_option("--context", o.context, "pretrain from scratch: n_positions")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  model->add_option("--vocab", o.vocab, "pretrain from scratch: vocabulary (256 = bytes)")->check(CLI::Range(1, 1 << 24))->capture_default_str();
  model->add_option("--dtype", o.dtype, "compute precision")->check(CLI::IsMember({"f32", "f64"}))->capture_default_str();

  auto* memory = app.add_option_group("memory (adapt)");
  memory->add_option("--memory-tokens", o.memory_tokens, "memory per stream in tokens")->check(CLI::Range(1, 1 << 30))->capture_default_str();
  memory->add_option("--chunk-size", o.chunk_size, "tokens per chunk")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  memory->add_option("--retrieved-tokens", o.retrieved_tokens, "tokens retrieved per query")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  memory->add_option("--fusion", o.fusion, "gated (the reference) | joint")->check(CLI::IsMember({"gated", "joint"}))->capture_default_str();
  memory->add_flag("--no-memory", o.no_memory, "train the SideNet without memory (the baseline)");
  memory->add_flag("--allow-other-backbone", o.allow_other, "accept a SideNet made for another backbone");

  auto* data = app.add_option_group("data");
  data->add_option("--train", o.train, "training documents: text files, *.i32 token files");
  data->add_option("--valid", o.valid, "validation documents (held out)");
  data->add_option("--corpus", o.corpus, "a corpus folder from examples/corpus/prepare.sh (train and valid splits)");
  data->add_option("--recall-practice", o.recall_practice,
                   "add N recall-practice documents (facts stated, real training text, then asked) to the training data")
      ->check(CLI::Range(0, 1 << 24));
  data->add_option("--recall-facts", o.practice.facts, "facts per recall-practice document (at most, with --recall-min-facts)")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  data->add_option("--recall-min-facts", o.practice.min_facts, "at least this many facts per document (uniform count; 0: exactly --recall-facts)")
      ->check(CLI::Range(0, 64))
      ->capture_default_str();
  data->add_flag("--recall-only", o.recall_only,
                 "train on the recall-practice documents alone (their text still comes from the training split)");
  data->add_option("--recall-wording", o.recall_wording,
                   "fixed: one sentence (\"Remember: the number for NAME is N.\"); varied: many phrasings and lead-ins, 4-6 digits")
      ->check(CLI::IsMember({"fixed", "varied"}))
      ->capture_default_str();
  data->add_option("--recall-targets", o.recall_targets,
                   "all: every token of a recall-practice document is scored; answers: only the recalled digits; "
                   "first-digits: only the first digit of each recalled number")
      ->check(CLI::IsMember({"all", "answers", "first-digits"}))
      ->capture_default_str();
  data->add_option("--recall-text-targets", o.practice.text_targets,
                   "with --recall-targets answers or first-digits: also score this random fraction of the other tokens (keeps the text modelled)")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  data->add_option("--recall-min-gap", o.practice.min_gap, "bytes of text between facts and questions, at least")->capture_default_str();
  data->add_option("--recall-max-gap", o.practice.max_gap, "and at most")->capture_default_str();
  data->add_option("--batch", o.batch, "streams (B)")->check(CLI::Range(1, 1 << 16))->capture_default_str();
  data->add_option("--segment-length", o.run.segment_length, "tokens per segment (T)")->check(CLI::Range(1, 1 << 20))->capture_default_str();

  auto* opt = app.add_option_group("optimisation");
  opt->add_option("--steps", o.run.steps, "updates")->check(CLI::Range(std::int64_t{1}, std::int64_t{1} << 40))->capture_default_str();
  opt->add_option("--accumulation", o.run.accumulation, "micro-batches per update")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  opt->add_option("--lr", o.run.optimizer.lr, "peak learning rate")->capture_default_str();
  opt->add_option("--warmup", o.run.schedule.warmup, "linear warm-up updates")->capture_default_str();
  opt->add_option("--decay", o.decay, "polynomial | cosine | constant")
      ->check(CLI::IsMember({"polynomial", "cosine", "constant"}))
      ->capture_default_str();
  opt->add_option("--end-lr", o.run.schedule.end_lr, "learning rate at the last update")->capture_default_str();
  opt->add_option("--power", o.run.schedule.power, "polynomial decay exponent")->capture_default_str();
  opt->add_option("--weight-decay", o.run.optimizer.weight_decay, "AdamW weight decay")->capture_default_str();
  opt->add_option("--beta1", o.run.optimizer.beta1, "AdamW beta1")->capture_default_str();
  opt->add_option("--beta2", o.run.optimizer.beta2, "AdamW beta2")->capture_default_str();
  opt->add_option("--eps", o.run.optimizer.eps, "AdamW eps")->capture_default_str();
  opt->add_option("--clip-norm", o.run.clip_norm, "global gradient-norm clip (0: off)")->capture_default_str();
  bool no_decay_vectors = false;
  opt->add_flag("--no-decay-vectors", no_decay_vectors, "do not decay biases, LayerNorms and gates");
  opt->add_option("--seed", o.run.seed, "seed of the initialisation and the RNG")->capture_default_str();

  auto* runopts = app.add_option_group("run");
  runopts->add_option("--out", o.out, "output folder")->required();
  runopts->add_option("--resume", o.resume, "continue from this checkpoint ('auto': OUT/checkpoint.safetensors if it exists)");
  runopts->add_option("--eval-every", o.eval_every, "validate every N updates (0: only at the end)")->capture_default_str();
  runopts->add_option("--eval-tokens", o.run.eval_tokens, "tokens per validation document (0: all)")->capture_default_str();
  runopts->add_option("--stop-after", o.stop_after,
                      "stop (with a checkpoint) after N updates of this invocation; --resume auto continues")
      ->check(CLI::Range(std::int64_t{0}, std::int64_t{1} << 40));
  runopts->add_option("--checkpoint-every", o.checkpoint_every, "checkpoint every N updates (0: only at the end)")->capture_default_str();
  runopts->add_option("--log-every", o.log_every, "progress line every N updates when not on a terminal")->capture_default_str();
  runopts->add_option("--save-gradients", o.save_gradients, "write the gradients of one pass over --tokens to FILE and stop");
  runopts->add_option("--tokens", o.tokens, "the stream for --save-gradients");
  runopts->add_flag("--no-plot", o.no_plot, "do not draw loss.png");
  runopts->add_flag("--quiet", o.quiet, "print nothing but errors");
  cli::parse(app, tool, argc, argv);
  o.run.optimizer.decay_vectors = !no_decay_vectors;
  o.run.schedule.decay = o.decay == "cosine" ? Decay::Cosine : o.decay == "constant" ? Decay::Constant : Decay::Polynomial;
  auto usage = [&](const std::string& m) { cli::usage_error(app, tool, m); };
  if (o.mode == "adapt" && o.backbone.empty()) usage("adapt needs --backbone");
  if (o.save_gradients.empty()) {
    if (o.corpus.empty() && o.train.empty()) usage("give training data: --train FILES or --corpus DIR");
    if (!o.corpus.empty() && !o.train.empty()) usage("--corpus and --train exclude each other");
  } else if (o.tokens.empty()) {
    usage("--save-gradients needs --tokens (the stream to differentiate)");
  }
  if (o.mode == "pretrain" && (!o.sidenet.empty() || o.no_memory)) usage("--sidenet and --no-memory are for adapt");
  if (o.recall_only && o.recall_practice == 0) usage("--recall-only needs --recall-practice N (N > 0)");
  if (o.practice.min_facts > o.practice.facts) usage("--recall-min-facts must not exceed --recall-facts");
  o.practice.varied_wording = o.recall_wording == "varied";
  o.practice.score_answers_only = o.recall_targets == "answers" || o.recall_targets == "first-digits";
  o.practice.first_digit_only = o.recall_targets == "first-digits";
  if (o.practice.text_targets > 0 && !o.practice.score_answers_only) {
    usage("--recall-text-targets needs --recall-targets answers or first-digits");
  }
  return o;
}

std::vector<Document> read_documents(const std::vector<std::string>& paths) {
  std::vector<Document> docs;
  for (const auto& p : paths) {
    if (fs::is_directory(p)) {
      auto more = read_manifest(p, "train");
      docs.insert(docs.end(), std::make_move_iterator(more.begin()), std::make_move_iterator(more.end()));
    } else if (cli::token_format_for(p) == "int32") {
      docs.push_back(read_int32_document(p));
    } else {
      docs.push_back(read_text_document(p));
    }
  }
  return docs;
}

std::string duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const long long t = static_cast<long long>(s + 0.5);
  std::ostringstream os;
  if (t >= 3600) os << t / 3600 << "h";
  if (t >= 60) os << std::setw(t >= 3600 ? 2 : 1) << std::setfill('0') << (t / 60) % 60 << "m";
  os << std::setw(t >= 60 ? 2 : 1) << std::setfill('0') << t % 60 << "s";
  return os.str();
}

/// loss.png from log.csv with gnuplot (Debian's gnuplot-nox); a missing gnuplot is reported, not fatal.
void plot(const fs::path& csv, const fs::path& png, const std::string& title, bool quiet) {
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
    if (!quiet) std::cerr << tool << ": gnuplot not found (apt-get install gnuplot-nox): no " << png.string() << "\n";
    return;
  }
  const fs::path script = png.string() + ".gp";
  {
    std::ofstream g(script);
    g << "set terminal pngcairo size 900,540 font ',10'\n"
      << "set output '" << png.string() << "'\n"
      << "set datafile separator ','\nset key top right\nset grid\n"
      << "set title '" << title << "'\nset xlabel 'update'\nset ylabel 'loss (nats per token)'\n"
      << "plot '" << csv.string() << "' using 1:3 every ::1 with lines lw 1 lc rgb '#7f9fcf' title 'training', "
      << "'' using 1:($7 == $7 ? $7 : 1/0) every ::1 with linespoints lw 2 pt 7 lc rgb '#c0392b' title 'validation'\n";
  }
  const std::string cmd = "gnuplot '" + script.string() + "' 2>&1";
  if (std::system(cmd.c_str()) != 0 && !quiet) std::cerr << tool << ": gnuplot failed; see " << script.string() << "\n";
  std::error_code ec;
  fs::remove(script, ec);
}

template <class Task>
int train(const Options& o, Task& task, const std::string& model_file, const std::string& what) {
  std::vector<Document> train_docs, valid_docs;
  if (!o.corpus.empty()) {
    train_docs = read_manifest(o.corpus, "train");
    valid_docs = read_manifest(o.corpus, "valid");
  } else {
    train_docs = read_documents(o.train);
  }
  if (!o.valid.empty()) valid_docs = read_documents(o.valid);
  if (o.recall_practice > 0) {
    auto practice = recall_practice_documents(train_docs, o.recall_practice, o.practice, o.run.seed);
    train_docs = o.recall_only ? std::move(practice) : interleave(std::move(train_docs), std::move(practice));
  }
  Trainer<Task> trainer(task, train_docs, valid_docs, o.run);
  fs::create_directories(o.out);
  const fs::path ckpt = fs::path(o.out) / "checkpoint.safetensors", model = fs::path(o.out) / model_file;
  const fs::path csv = fs::path(o.out) / "log.csv", png = fs::path(o.out) / "loss.png";
  if (!o.resume.empty()) {
    const fs::path from = o.resume == "auto" ? ckpt : fs::path(o.resume);
    if (o.resume != "auto" || fs::exists(from)) {
      const std::string before = trainer.config().to_json().dump();
      trainer.resume(from);
      if (!o.quiet) std::cout << "resumed from " << from.string() << " at update " << trainer.step_count() << "\n";
      const SafetensorsFile file = SafetensorsFile::open(from);
      const auto& saved = file.metadata();
      if (auto it = saved.find("config"); it != saved.end() && it->second != before && !o.quiet) {
        std::cout << "note     the run's settings differ from the checkpoint's; it continues with the new ones\n"
                  << "         checkpoint: " << it->second << "\n         this run:   " << before << "\n";
      }
    }
  }
  const bool append = trainer.step_count() > 0 && fs::exists(csv);
  std::ofstream log(csv, append ? std::ios::app : std::ios::trunc);
  if (!log) detail::fail<FormatError>(csv.string(), ": cannot write the training log");
  if (!append) log << "step,lr,loss,grad_norm,tokens,seconds,valid_loss\n";
  if (!o.quiet) {
    std::cout << what << "\n"
              << "data     " << train_docs.size() << " training documents (" << trainer.data().total_tokens() << " tokens), "
              << valid_docs.size() << " validation documents; " << task.streams() << " streams x " << o.run.segment_length
              << " tokens x " << o.run.accumulation << " per update\n"
              << "run      " << o.run.steps << " updates, lr " << o.run.optimizer.lr << " (" << o.decay << ", " << o.run.schedule.warmup
              << " warm-up), out " << o.out << "\n";
  }
  std::signal(SIGINT, on_sigint);
  const bool tty = isatty(fileno(stderr)) != 0;
  const auto t0 = std::chrono::steady_clock::now();
  const std::int64_t first = trainer.step_count();
  double tokens = 0, last_valid = NAN;
  auto validate = [&]() -> double {
    if (valid_docs.empty()) return NAN;
    last_valid = trainer.validate().mean();
    return last_valid;
  };
  auto save = [&] {
    trainer.save_checkpoint(ckpt);
    task.save_model(model);
  };
  while (trainer.step_count() < o.run.steps) {
    StepStats st;
    try {
      st = trainer.step();
    } catch (const TrainingError&) {
      log.flush();
      std::cerr << "\n" << tool << ": stopped at update " << trainer.step_count() + 1 << "; the last good checkpoint is "
                << (fs::exists(ckpt) ? ckpt.string() : std::string("(none yet)")) << "\n";
      throw;
    }
    tokens += static_cast<double>(st.tokens);
    const bool eval_now = (o.eval_every > 0 && st.step % o.eval_every == 0) || st.step == o.run.steps;
    const double v = eval_now ? validate() : NAN;
    log << st.step << ',' << st.lr << ',' << st.loss << ',' << st.grad_norm << ',' << st.tokens << ',' << st.seconds << ',';
    if (eval_now && std::isfinite(v)) log << v;
    log << '\n';
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double per_step = elapsed / static_cast<double>(st.step - first);
    if (!o.quiet && (tty || st.step % o.log_every == 0 || st.step == o.run.steps)) {
      const int width = 24, filled = static_cast<int>(width * st.step / o.run.steps);
      std::ostringstream line;
      line << '[' << std::string(static_cast<std::size_t>(filled), '#') << std::string(static_cast<std::size_t>(width - filled), '.')
           << "] " << st.step << '/' << o.run.steps << "  loss " << std::fixed << std::setprecision(4) << st.loss;
      if (std::isfinite(last_valid)) line << "  valid " << last_valid;
      line << std::setprecision(0) << "  " << tokens / elapsed << " tok/s  ETA "
           << duration(per_step * static_cast<double>(o.run.steps - st.step));
      std::cerr << (tty ? "\r" : "") << line.str() << (tty ? "   " : "\n") << std::flush;
    }
    if (o.checkpoint_every > 0 && st.step % o.checkpoint_every == 0) save();
    if (o.stop_after > 0 && st.step - first >= o.stop_after && st.step < o.run.steps) {
      log.flush();
      save();
      if (tty && !o.quiet) std::cerr << "\n";
      if (!o.quiet) std::cout << "stopped  after " << o.stop_after << " updates of this run (update " << st.step << " of "
                              << o.run.steps << "); continue with --resume auto\n";
      return 0;
    }
    if (interrupted) {
      log.flush();
      save();
      std::cerr << "\n" << tool << ": interrupted at update " << st.step << "; saved " << ckpt.string()
                << " (continue with --resume auto)\n";
      return cli::exit_interrupted;
    }
  }
  if (tty && !o.quiet) std::cerr << "\n";
  save();
  log.close();
  if (!o.no_plot) plot(csv, png, what, o.quiet);
  if (!o.quiet) {
    std::cout << "done     " << trainer.step_count() << " updates";
    if (std::isfinite(last_valid)) std::cout << ", validation loss " << last_valid << " nats/token";
    std::cout << "\nwrote    " << model.string() << ", " << ckpt.string() << ", " << csv.string()
              << (o.no_plot ? "" : ", " + png.string()) << "\n";
  }
  return 0;
}

/// One pass over the stream (one document, one stream, segments in order, memory on) and the
/// gradient of its mean loss.
template <class Task>
int gradients(const Options& o, Task& task) {
  const auto ids = cli::read_tokens(o.tokens, cli::token_format_for(o.tokens));
  std::vector<Document> docs{{o.tokens, ids, {}}};
  check_vocabulary(docs, task.vocab_size());
  DocumentStreams data(docs, 1, o.run.segment_length);
  task.zero_gradients();
  LossSum loss;
  for (std::size_t b = 0; b < ids.size(); b += static_cast<std::size_t>(o.run.segment_length)) loss += task.forward_backward(data.next());
  if (loss.count == 0) detail::fail<InputError>(o.tokens, ": the stream has no next-token targets");
  task.save_gradients(o.save_gradients, 1.0 / static_cast<double>(loss.count));
  if (!o.quiet) {
    std::cout << "gradients of the mean next-token loss " << loss.mean() << " over " << loss.count << " targets -> "
              << o.save_gradients << "\n";
  }
  return 0;
}

template <ComputeType T, Fusion F>
int adapt(const Options& o) {
  auto backbone = Gpt2Backbone<T>::load(o.backbone);
  const int m = o.memory_layer.value_or(backbone.config().n_layer / 2);
  auto side_net = o.sidenet.empty() ? SideNet<T>::from_backbone(backbone, m, o.reduction) : SideNet<T>::load(o.sidenet);
  MemoryConfig mem;
  mem.memory_tokens = o.memory_tokens;
  mem.chunk_size = o.chunk_size;
  mem.retrieved_tokens = o.retrieved_tokens;
  mem.enabled = !o.no_memory;
  const auto& c = side_net.config();
  const bool gradient_mode = !o.save_gradients.empty();
  SideNetAdaptation<HostMemoryBank<T>, ExactChunkRetriever, F, T> task(std::move(backbone), std::move(side_net), mem,
                                                                           gradient_mode ? 1 : o.batch, ExactChunkRetriever{},
                                                                           o.allow_other);
  if (gradient_mode) return gradients(o, task);
  std::ostringstream what;
  what << "adapt    SideNet " << c.n_layer << " layers, d " << c.n_embd << ", memory at layer " << c.memory_augmented_layer()
       << " (backbone layer " << c.memory_layer << "); memory " << (mem.enabled ? "on" : "off") << ": " << mem.memory_tokens
       << " tokens, chunks of " << mem.chunk_size << ", " << mem.retrieved_tokens << " retrieved, " << F::name << " fusion";
  return train(o, task, "sidenet.safetensors", what.str());
}

template <ComputeType T>
int pretrain(const Options& o) {
  std::optional<Gpt2Backbone<T>> init;
  if (!o.backbone.empty()) {
    init.emplace(Gpt2Backbone<T>::load(o.backbone));
  } else {
    auto cfg = o.arch == "gpt2" ? BackboneConfig::gpt2(o.layers, o.width, o.heads, o.vocab, o.context)
                                : BackboneConfig::gpt2_star(o.layers, o.width, o.heads, o.vocab, o.context);
    if (o.inner > 0) cfg.n_inner = o.inner;
    init.emplace(initial_backbone<T>(cfg, o.run.seed));
  }
  const auto c = init->config();
  BackbonePretraining<T> task(std::move(*init), o.save_gradients.empty() ? o.batch : 1);
  if (!o.save_gradients.empty()) return gradients(o, task);
  std::ostringstream what;
  what << "pretrain " << c.architecture << " backbone: " << c.n_layer << " layers, d " << c.n_embd << ", " << c.n_head
       << " heads, vocabulary " << c.vocab_size << ", context " << c.n_positions;
  return train(o, task, "backbone.safetensors", what.str());
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  return cli::guarded(tool, [&] {
    if (o.mode == "pretrain") return o.dtype == "f64" ? pretrain<double>(o) : pretrain<float>(o);
    if (o.fusion == "joint") return o.dtype == "f64" ? adapt<double, JointFusion>(o) : adapt<float, JointFusion>(o);
    return o.dtype == "f64" ? adapt<double, GatedFusion>(o) : adapt<float, GatedFusion>(o);
  });
}
