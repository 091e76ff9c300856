#pragma once
// The training loop around a task (SideNetAdaptation or BackbonePretraining):
//
//   step():  `accumulation` micro-batches (each: the next segment of every stream, forward and
//            backward, gradients summed), then gradients / targets (the mean loss over the whole
//            step), a non-finite check, global-norm clipping, AdamW at the scheduled rate; all
//            of it where the task keeps its weights (task_location_t: Host, or Device for
//            BackbonePretraining<T, Device>, whose update never copies weights or gradients out).
//   validate(): mean loss over the validation documents, each read as one stream from a fresh
//            memory (at most `eval_tokens` tokens per document when > 0).
//   save_checkpoint() / resume(): weights, AdamW moments, step, RNG, data position, every
//            stream's memory and the configuration in one safetensors file, written to a
//            temporary file and renamed; resuming continues bit for bit (same thread count).
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "longmem/error.hpp"
#include "longmem/safetensors.hpp"
#include "longmem/train/adaptation.hpp"
#include "longmem/train/data.hpp"
#include "longmem/train/optimizer.hpp"

namespace longmem {

namespace detail {
template <class K>
struct task_location {
  using type = Host;
};
template <class K>
  requires requires { typename K::location; }
struct task_location<K> {
  using type = typename K::location;
};
}  // namespace detail

/// Where a task's weights and gradients live (K::location; Host when it names none). The
/// Trainer's AdamW, norm and clipping run there (ops.hpp's optimizer ops).
template <class K>
using task_location_t = typename detail::task_location<K>::type;

/// What a training task provides to the Trainer.
template <class K>
concept TrainingTask = requires(K& k, const K& ck, std::span<const StreamSegment> batch, std::span<const std::int32_t> doc,
                                SafetensorsWriter& w, const SafetensorsFile& f, const std::filesystem::path& p) {
  typename K::value_type;
  { K::task_name } -> std::convertible_to<const char*>;
  { k.parameters() } -> std::same_as<std::vector<NamedTensor<typename K::value_type, task_location_t<K>>>>;
  { k.gradients() } -> std::same_as<std::vector<NamedTensor<typename K::value_type, task_location_t<K>>>>;
  k.zero_gradients();
  k.parameters_changed();
  k.reset_memory();
  { k.forward_backward(batch) } -> std::same_as<LossSum>;
  { k.evaluate(doc, 1, std::span<const std::uint8_t>{}) } -> std::same_as<LossSum>;
  { ck.streams() } -> std::convertible_to<int>;
  { ck.vocab_size() } -> std::convertible_to<int>;
  { ck.model_metadata() } -> std::convertible_to<std::map<std::string, std::string>>;
  ck.save_model(p);
  ck.save_state(w);
  k.load_state(f);
};

struct TrainConfig {
  int segment_length = 256;
  int accumulation = 1;          ///< micro-batches (segments per stream) per update
  std::int64_t steps = 1000;     ///< updates in the whole run
  AdamWConfig optimizer;
  ScheduleConfig schedule;       ///< schedule.total defaults to steps
  double clip_norm = 1.0;        ///< global gradient-norm clip; 0 = off
  std::uint64_t seed = 1;
  std::int64_t eval_tokens = 0;  ///< per validation document; 0 = all

  void validate() const {
    if (segment_length <= 0) detail::fail<ConfigError>("training: the segment length must be positive, got ", segment_length);
    if (accumulation <= 0) detail::fail<ConfigError>("training: gradient accumulation must be >= 1, got ", accumulation);
    if (steps <= 0) detail::fail<ConfigError>("training: the number of steps must be positive, got ", steps);
    if (!(clip_norm >= 0) || !std::isfinite(clip_norm)) {
      detail::fail<ConfigError>("training: the clip norm must be a finite number >= 0, got ", clip_norm);
    }
    if (eval_tokens < 0) detail::fail<ConfigError>("training: eval_tokens must be >= 0, got ", eval_tokens);
    optimizer.validate();
    schedule.validate();
  }

  nlohmann::json to_json() const {
    return {{"segment_length", segment_length},
            {"accumulation", accumulation},
            {"steps", steps},
            {"lr", optimizer.lr},
            {"beta1", optimizer.beta1},
            {"beta2", optimizer.beta2},
            {"eps", optimizer.eps},
            {"weight_decay", optimizer.weight_decay},
            {"decay_vectors", optimizer.decay_vectors},
            {"decay", to_string(schedule.decay)},
            {"warmup", schedule.warmup},
            {"total", schedule.total},
            {"end_lr", schedule.end_lr},
            {"power", schedule.power},
            {"clip_norm", clip_norm},
            {"seed", seed},
            {"eval_tokens", eval_tokens}};
  }
};

/// What one update did.
struct StepStats {
  std::int64_t step = 0;     // updates done, this one included
  double loss = 0;           // mean next-token loss of the step (nats)
  std::int64_t tokens = 0;   // input tokens of the step
  std::int64_t targets = 0;  // targets scored
  double lr = 0;
  double grad_norm = 0;      // before clipping
  double seconds = 0;
};

template <TrainingTask Task>
class Trainer {
 public:
  using T = typename Task::value_type;
  using L = task_location_t<Task>;

  /// `train` (and `valid`, may be empty) must outlive the trainer.
  Trainer(Task& task, const std::vector<Document>& train, const std::vector<Document>& valid, TrainConfig config)
      : task_(task), valid_(valid), config_(config), data_(train, task.streams(), config.segment_length),
        rng_(config.seed) {
    if (config_.schedule.total == 0) config_.schedule.total = config_.steps;
    config_.validate();
    check_vocabulary(train, task_.vocab_size());
    check_vocabulary(valid, task_.vocab_size());
    params_ = task_.parameters();
    grads_ = task_.gradients();
    optimizer_ = AdamW<T, L>(config_.optimizer, params_);
  }

  const TrainConfig& config() const { return config_; }
  std::int64_t step_count() const { return optimizer_.steps(); }
  const DocumentStreams& data() const { return data_; }
  /// Continues the streams from a position (DocumentStreams::state()), e.g. after filling the
  /// memory with the documents' first segments.
  void restore_data(const nlohmann::json& position) { data_.restore(position); }
  std::mt19937_64& rng() { return rng_; }

  /// One update. Throws TrainingError (leaving the weights as they were) when the loss or the
  /// gradient is not finite.
  StepStats step() {
    const auto t0 = std::chrono::steady_clock::now();
    task_.zero_gradients();
    LossSum loss;
    StepStats st;
    for (int a = 0; a < config_.accumulation; ++a) {
      const auto batch = data_.next();
      for (const auto& s : batch) st.tokens += static_cast<std::int64_t>(s.tokens.size());
      loss += task_.forward_backward(batch);
    }
    st.step = optimizer_.steps() + 1;
    st.targets = loss.count;
    st.loss = loss.mean();
    if (!std::isfinite(loss.sum)) {
      detail::fail<TrainingError>("training: the loss of step ", st.step, " is not finite (", loss.sum,
                                  "); the weights were not updated (lower the learning rate, or resume from the last checkpoint)");
    }
    if (loss.count > 0) scale_gradients(grads_, 1.0 / static_cast<double>(loss.count));
    st.grad_norm = global_norm(grads_);
    if (!std::isfinite(st.grad_norm)) {
      detail::fail<TrainingError>("training: the gradient norm of step ", st.step, " is not finite; the weights were not updated");
    }
    if (config_.clip_norm > 0 && st.grad_norm > config_.clip_norm) {
      scale_gradients(grads_, config_.clip_norm / (st.grad_norm + 1e-6));
    }
    st.lr = config_.schedule.rate(st.step, config_.optimizer.lr);
    if (loss.count > 0) {
      optimizer_.step(params_, grads_, st.lr);
    } else {
      optimizer_.set_steps(st.step);  // a step without targets (document tails) still counts
    }
    task_.parameters_changed();
    st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return st;
  }

  /// Mean loss over the validation documents (each from a fresh memory); 0 targets: {0, 0}.
  LossSum validate() {
    LossSum total;
    for (const auto& d : valid_) {
      std::span<const std::int32_t> tokens(d.tokens);
      std::span<const std::uint8_t> scored(d.scored);
      if (config_.eval_tokens > 0 && static_cast<std::int64_t>(tokens.size()) > config_.eval_tokens) {
        tokens = tokens.first(static_cast<std::size_t>(config_.eval_tokens));
        if (!scored.empty()) scored = scored.first(tokens.size());
      }
      total += task_.evaluate(tokens, config_.segment_length, scored);
    }
    return total;
  }

  /// Writes the whole training state (see the header comment) atomically to `path`.
  void save_checkpoint(const std::filesystem::path& path) const {
    SafetensorsWriter w;
    std::map<std::string, std::string> md;
    md["format"] = "longmem-train-checkpoint";
    md["format_version"] = "1";
    md["task"] = Task::task_name;
    md["compute_dtype"] = std::is_same_v<T, float> ? "float32" : "float64";
    md["step"] = std::to_string(optimizer_.steps());
    std::ostringstream rng;
    rng << rng_;
    md["rng"] = rng.str();
    md["data"] = data_.state().dump();
    md["config"] = config_.to_json().dump();
    md["model"] = nlohmann::json(task_.model_metadata()).dump();
    w.set_metadata(md);
    Tensor<T, Host> staged;  // L = Device: each tensor passes through the host (add() copies it)
    auto add = [&](const std::string& name, const Tensor<T, L>& t) {
      if constexpr (std::is_same_v<L, Host>) {
        w.add<T>(name, t.view());
      } else {
        staged.resize(t.shape());
        copy(cview(t), staged.view());
        w.add<T>(name, cview(staged));
      }
    };
    for (std::size_t i = 0; i < params_.size(); ++i) {
      add("param." + params_[i].name, *params_[i].tensor);
      add("adam_m." + params_[i].name, optimizer_.first_moment(i));
      add("adam_v." + params_[i].name, optimizer_.second_moment(i));
    }
    task_.save_state(w);
    w.write(path);
  }

  /// Restores a checkpoint written by save_checkpoint() for the same task, model, data and batch.
  /// A file that is not such a checkpoint or is damaged is refused with a FormatError (or the
  /// ShapeError of a tensor), one from another run (task, dtype, model, memory, batch, corpus) with
  /// a ConfigError naming the first difference; nothing is changed then. Everything the file
  /// states is checked before it is used: tensors against this run's names, dtypes and shapes,
  /// weights and AdamW moments for finite values (second moments >= 0), the step and the data
  /// position against bounds (at most 2^53: counts that stay exact as doubles), the memory banks'
  /// counters against their geometry.
  void resume(const std::filesystem::path& path) {
    SafetensorsFile f = SafetensorsFile::open(path);
    const std::string file = path.string();
    const auto& md = f.metadata();
    auto get = [&](const std::string& key) -> const std::string& {
      auto it = md.find(key);
      if (it == md.end()) detail::fail<FormatError>(file, ": not a training checkpoint (metadata '", key, "' is missing)");
      return it->second;
    };
    if (get("format") != "longmem-train-checkpoint") {
      detail::fail<FormatError>(file, ": not a training checkpoint (format ", detail::quote_text(get("format"), 40), ")");
    }
    if (get("task") != Task::task_name) {
      detail::fail<ConfigError>(file, ": a checkpoint of the ", get("task").substr(0, 40), " task, this run is ",
                                Task::task_name);
    }
    const std::string dtype = std::is_same_v<T, float> ? "float32" : "float64";
    if (get("compute_dtype") != dtype) {
      detail::fail<ConfigError>(file, ": computed in ", detail::quote_text(get("compute_dtype"), 40), ", this run in ", dtype);
    }
    std::map<std::string, std::string> model;
    try {
      model = nlohmann::json::parse(get("model")).template get<std::map<std::string, std::string>>();
    } catch (const nlohmann::json::exception& e) {
      detail::fail<FormatError>(file, ": its 'model' metadata is not valid (", e.what(), ")");
    }
    for (const auto& [k, v] : task_.model_metadata()) {
      auto it = model.find(k);
      if (it == model.end() || it->second != v) {
        detail::fail<ConfigError>(file, ": the checkpoint's model has ", k, " = ",
                                  it == model.end() ? std::string("<missing>") : detail::quote_text(it->second, 40),
                                  ", this run's is ", v, " (a checkpoint from another model, backbone or memory setting)");
      }
    }
    // Read everything first, so a bad file changes nothing.
    std::vector<Tensor<T, Host>> p, m, v;
    for (const auto& np : params_) {
      for (const char* kind : {"param.", "adam_m.", "adam_v."}) {
        const std::string name = kind + np.name;
        if (!f.contains(name)) detail::fail<FormatError>(file, ": tensor ", name, " is missing");
        if (f.info(name).dtype != dtype_of_v<T>) {
          detail::fail<FormatError>(file, ": tensor ", name, " is ", dtype_name(f.info(name).dtype), ", expected ",
                                    dtype_name(dtype_of_v<T>));
        }
      }
      p.push_back(f.read<T>("param." + np.name, np_shape(np)));
      m.push_back(f.read<T>("adam_m." + np.name, np_shape(np)));
      v.push_back(f.read<T>("adam_v." + np.name, np_shape(np)));
      check_values(file, "param." + np.name, p.back(), false);
      check_values(file, "adam_m." + np.name, m.back(), false);
      check_values(file, "adam_v." + np.name, v.back(), true);
    }
    DocumentStreams data = data_;
    nlohmann::json position;
    try {
      position = nlohmann::json::parse(get("data"));
    } catch (const nlohmann::json::exception& e) {
      detail::fail<FormatError>(file, ": its data position is not valid JSON (", e.what(), ")");
    }
    check_data_position(file, position);
    try {
      data.restore(position);
    } catch (const ConfigError& e) {
      detail::fail<ConfigError>(file, ": ", e.what());
    } catch (const Error& e) {
      detail::fail<FormatError>(file, ": ", e.what());
    }
    std::mt19937_64 rng;
    std::istringstream rs(get("rng"));
    rs >> rng;
    if (!rs) detail::fail<FormatError>(file, ": its RNG state is not valid");
    const std::string& step_text = get("step");
    long long step = -1;
    std::size_t used = 0;
    try {
      step = std::stoll(step_text, &used);
    } catch (const std::exception&) {
      step = -1;
    }
    if (used != step_text.size() || step < 0 || step > max_count) {
      detail::fail<FormatError>(file, ": its step ", detail::quote_text(step_text, 40),
                                " is not a count of updates (0 .. 2^53)");
    }
    task_.load_state(f);  // memory banks: validated tensor by tensor before any is replaced
    for (std::size_t i = 0; i < params_.size(); ++i) {
      copy(cview(p[i]), params_[i].tensor->view());
      copy(cview(m[i]), optimizer_.first_moment(i).view());
      copy(cview(v[i]), optimizer_.second_moment(i).view());
    }
    optimizer_.set_steps(step);
    data_ = data;
    rng_ = rng;
    task_.parameters_changed();
  }

 private:
  /// Largest step, epoch or document index a checkpoint may state: 2^53, where int64 counts stop
  /// being exact as doubles (the schedule and AdamW's bias correction compute in double).
  static constexpr std::int64_t max_count = std::int64_t{1} << 53;

  static const Shape& np_shape(const NamedTensor<T, L>& n) { return n.tensor->shape(); }

  /// FormatError at the first non-finite value (or negative one, for second moments).
  static void check_values(const std::string& file, const std::string& name, const Tensor<T, Host>& t, bool non_negative) {
    for (index_t i = 0; i < t.numel(); ++i) {
      const T x = t.data()[i];
      if (!std::isfinite(x) || (non_negative && x < 0)) {
        detail::fail<FormatError>(file, ": tensor ", name, " holds ", x, " at element ", i, " (",
                                  non_negative ? "second moments are finite and >= 0" : "weights and moments are finite", ")");
      }
    }
  }

  /// The shape DocumentStreams::state() writes, every number an integer in [-1, 2^53], before
  /// DocumentStreams::restore() converts any of them.
  static void check_data_position(const std::string& file, const nlohmann::json& j) {
    auto count = [&](const nlohmann::json& x, const char* what) {
      if (!x.is_number_integer() || (x.is_number_unsigned() ? x.get<std::uint64_t>() > std::uint64_t(max_count)
                                                             : x.get<std::int64_t>() < -1 || x.get<std::int64_t>() > max_count)) {
        detail::fail<FormatError>(file, ": its data position has ", detail::describe(x), " as ", what,
                                  " (an integer from -1 to 2^53)");
      }
    };
    if (!j.is_object() || !j.contains("streams") || !j["streams"].is_array() || !j.contains("next_document") ||
        !j.contains("epoch")) {
      detail::fail<FormatError>(file, ": its data position is not one DocumentStreams wrote (expected "
                                      "{\"next_document\", \"epoch\", \"streams\": [[document, offset], ...]})");
    }
    count(j["next_document"], "next document");
    count(j["epoch"], "epoch");
    if (j["epoch"].get<std::int64_t>() < 0) detail::fail<FormatError>(file, ": its data position has a negative epoch");
    for (const auto& s : j["streams"]) {
      if (!s.is_array() || s.size() != 2) {
        detail::fail<FormatError>(file, ": its data position has ", detail::describe(s), " as a stream (expected [document, offset])");
      }
      count(s[0], "a stream's document");
      count(s[1], "a stream's offset");
    }
  }

  Task& task_;
  const std::vector<Document>& valid_;
  TrainConfig config_;
  DocumentStreams data_;
  std::mt19937_64 rng_;
  std::vector<NamedTensor<T, L>> params_, grads_;  // at the task's location
  AdamW<T, L> optimizer_;
};

}  // namespace longmem
