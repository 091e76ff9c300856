#pragma once
// longmem-train's options and its training driver (the progress bar, the CSV log, checkpoints,
// Ctrl-C, the loss plot), shared by train.cpp (g++: the CPU) and train_device.cu (nvcc: pretrain
// --device cuda, whose ops are CUDA kernels), as cli_run.hpp is for longmem-run.
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
#include <type_traits>
#include <vector>

#include <unistd.h>

#include <longmem/train.hpp>

#include "cli_support.hpp"

namespace longmem::train_cli {

namespace fs = std::filesystem;

inline constexpr const char* tool = "longmem-train";

inline std::atomic<bool> interrupted{false};
extern "C" inline void on_sigint(int) { interrupted = true; }

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
  std::string device = "cpu";  // cpu | cuda
  std::string save_gradients, tokens;
  bool quiet = false, no_plot = false;
};

inline std::vector<Document> read_documents(const std::vector<std::string>& paths) {
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

inline std::string duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  const long long t = static_cast<long long>(s + 0.5);
  std::ostringstream os;
  if (t >= 3600) os << t / 3600 << "h";
  if (t >= 60) os << std::setw(t >= 3600 ? 2 : 1) << std::setfill('0') << (t / 60) % 60 << "m";
  os << std::setw(t >= 60 ? 2 : 1) << std::setfill('0') << t % 60 << "s";
  return os.str();
}

/// loss.png from log.csv with gnuplot (Debian's gnuplot-nox); a missing gnuplot is reported, not fatal.
inline void plot(const fs::path& csv, const fs::path& png, const std::string& title, bool quiet) {
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

/// adapt with a Bank and Retriever of one location: HostMemoryBank<T> + ExactChunkRetriever (the
/// CPU), or DeviceMemoryBank<float> + FusedChunkRetriever (train_device.cu).
template <ComputeType T, Fusion F, class Bank, class Retriever>
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
  SideNetAdaptation<Bank, Retriever, F, T> task(std::move(backbone), std::move(side_net), mem, gradient_mode ? 1 : o.batch,
                                                 Retriever{}, o.allow_other);
  if (gradient_mode) return gradients(o, task);
  std::ostringstream what;
  what << "adapt    SideNet " << c.n_layer << " layers, d " << c.n_embd << ", memory at layer " << c.memory_augmented_layer()
       << " (backbone layer " << c.memory_layer << "); memory " << (mem.enabled ? "on" : "off") << ": " << mem.memory_tokens
       << " tokens, chunks of " << mem.chunk_size << ", " << mem.retrieved_tokens << " retrieved, " << F::name << " fusion";
  if constexpr (!std::is_same_v<typename Bank::location, Host>) what << " (on the GPU)";
  return train(o, task, "sidenet.safetensors", what.str());
}

template <ComputeType T, Fusion F>
int adapt_on_host(const Options& o) {
  return adapt<T, F, HostMemoryBank<T>, ExactChunkRetriever>(o);
}

/// pretrain on location L (Host, or Device in a CUDA translation unit: train_device.cu).
template <ComputeType T, class L = Host>
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
  BackbonePretraining<T, L> task(std::move(*init), o.save_gradients.empty() ? o.batch : 1);
  if (!o.save_gradients.empty()) return gradients(o, task);
  std::ostringstream what;
  what << "pretrain " << c.architecture << " backbone: " << c.n_layer << " layers, d " << c.n_embd << ", " << c.n_head
       << " heads, vocabulary " << c.vocab_size << ", context " << c.n_positions;
  if constexpr (!std::is_same_v<L, Host>) what << " (on the GPU)";
  return train(o, task, "backbone.safetensors", what.str());
}

}  // namespace longmem::train_cli
