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
#include <cstdlib>
#include <iostream>
#include <string>

#include "train_run.hpp"

namespace {

using namespace longmem;
using namespace longmem::train_cli;

#if defined(LONGMEM_TRAIN_CUDA)
constexpr bool built_with_cuda = true;
#else
constexpr bool built_with_cuda = false;
#endif

}  // namespace

/// pretrain and adapt --device cuda (train_device.cu, compiled by nvcc in CUDA builds).
int pretrain_on_cuda(const longmem::train_cli::Options& o);
int adapt_on_cuda(const longmem::train_cli::Options& o);

namespace {

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
  model->add_option("--device", o.device,
                    "cpu, or cuda (forward, backward, AdamW and, for adapt, the memory banks on the GPU, in float)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();

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
  if (o.device == "cuda") {
    if (o.dtype != "f32") usage("--device cuda computes in float: use --dtype f32 (the default)");
    if (!built_with_cuda) {
      std::cerr << tool << ": --device cuda: this longmem-train was built without CUDA support; rebuild with nvcc "
                   "available and -DLONGMEM_CUDA=ON, or use --device cpu\n";
      std::exit(cli::exit_refused);
    }
  }
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

}  // namespace

#if !defined(LONGMEM_TRAIN_CUDA)
int pretrain_on_cuda(const longmem::train_cli::Options&) { return longmem::cli::exit_refused; }  // refused in parse()
int adapt_on_cuda(const longmem::train_cli::Options&) { return longmem::cli::exit_refused; }     // refused in parse()
#endif

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  return cli::guarded(tool, [&] {
    if (o.device == "cuda") return o.mode == "pretrain" ? pretrain_on_cuda(o) : adapt_on_cuda(o);
    if (o.mode == "pretrain") return o.dtype == "f64" ? pretrain<double>(o) : pretrain<float>(o);
    if (o.fusion == "joint") return o.dtype == "f64" ? adapt_on_host<double, JointFusion>(o) : adapt_on_host<float, JointFusion>(o);
    return o.dtype == "f64" ? adapt_on_host<double, GatedFusion>(o) : adapt_on_host<float, GatedFusion>(o);
  });
}
