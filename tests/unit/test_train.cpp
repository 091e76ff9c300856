// Training: whole-model gradients against PyTorch float64 autograd and against finite
// differences, the data streams, AdamW and its schedule, checkpoints (resume bit for bit, refused
// mismatches), bad input, and a task only memory can solve.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <random>
#include <set>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "longmem/train.hpp"
#include "model_test_support.hpp"
#include "recall_task.hpp"

namespace {

using namespace longmem;
using test::TempDir;

const std::filesystem::path fixtures = LONGMEM_FIXTURE_DIR;

template <class T>
using Adaptation = SideNetAdaptation<HostMemoryBank<T>, ExactChunkRetriever, GatedFusion, T>;
template <class T>
using JointAdaptation = SideNetAdaptation<HostMemoryBank<T>, ExactChunkRetriever, JointFusion, T>;

/// One document per stream row of the fixture's tokens (B, S*T).
std::vector<Document> fixture_documents(const SafetensorsFile& expected) {
  auto tokens = expected.read<std::int32_t>("tokens");
  std::vector<Document> docs;
  for (index_t b = 0; b < tokens.dim(0); ++b) {
    Document d{"stream " + std::to_string(b), {}, {}};
    for (index_t i = 0; i < tokens.dim(1); ++i) d.tokens.push_back(tokens(b, i));
    docs.push_back(std::move(d));
  }
  return docs;
}

int metadata_int(const SafetensorsFile& f, const std::string& key) {
  return std::stoi(f.metadata().at(key));
}

/// Every segment of every stream once, as the fixture script streams them; returns the loss.
template <class Task>
LossSum run_stream_once(Task& task, const std::vector<Document>& docs, int segment_length) {
  DocumentStreams data(docs, static_cast<int>(docs.size()), segment_length);
  const auto n = static_cast<std::int64_t>(docs[0].tokens.size());
  LossSum loss;
  for (std::int64_t s = 0; s * segment_length < n; ++s) loss += task.forward_backward(data.next());
  return loss;
}

struct GradientComparison {
  double worst = 0;  // max over tensors of max |got - want| / max |want| (absolute / global scale for zero tensors)
  std::string where;
  int tensors = 0;
};

/// Compares a gradients file we wrote with the fixture's `prefix`-ed tensors of the same names.
GradientComparison compare_gradient_files(const std::filesystem::path& ours, const SafetensorsFile& want,
                                          const std::string& prefix) {
  SafetensorsFile got = SafetensorsFile::open(ours);
  GradientComparison c;
  double global = 0;
  for (const auto& n : got.names()) {
    auto w = want.read<double>(prefix + n);
    for (double x : w) global = std::max(global, std::abs(x));
  }
  for (const auto& n : got.names()) {
    auto g = got.read<double>(n);
    auto w = want.read<double>(prefix + n, g.shape());
    double err = 0, ref = 0;
    for (index_t i = 0; i < g.numel(); ++i) {
      err = std::max(err, std::abs(g.data()[i] - w.data()[i]));
      ref = std::max(ref, std::abs(w.data()[i]));
    }
    // A tensor whose exact gradient is 0 (a key bias under a causal softmax) is compared with
    // the largest gradient of the model as the scale.
    const double rel = ref > 1e-12 * global ? err / ref : err / global;
    if (rel > c.worst) {
      c.worst = rel;
      c.where = n;
    }
    ++c.tensors;
  }
  return c;
}

}  // namespace

TEST_CASE("train: whole-model gradients equal PyTorch float64 autograd (adaptation and from scratch)", "[train][reference]") {
  for (const char* folder : {"longmem_gpt2star", "longmem_gpt2"}) {
    const auto dir = fixtures / folder;
    SafetensorsFile expected = SafetensorsFile::open(dir / "expected.safetensors");
    SafetensorsFile want = SafetensorsFile::open(dir / "gradients.safetensors");
    const auto docs = fixture_documents(expected);
    const int T = metadata_int(expected, "segment_length");
    MemoryConfig mem;
    mem.memory_tokens = metadata_int(expected, "memory_tokens");
    mem.chunk_size = metadata_int(expected, "chunk_size");
    mem.retrieved_tokens = metadata_int(expected, "retrieved_tokens");
    const int B = static_cast<int>(docs.size());
    TempDir tmp;
    CAPTURE(folder);

    auto check = [&](auto& task, const char* prefix, const char* loss_key) {
      const LossSum loss = run_stream_once(task, docs, T);
      CHECK(loss.count == std::stoll(want.metadata().at("targets")));
      CHECK(std::abs(loss.mean() - std::stod(want.metadata().at(loss_key))) < 1e-10);
      const auto path = tmp / (std::string(prefix) + "safetensors");
      task.save_gradients(path, 1.0 / static_cast<double>(loss.count));
      const auto c = compare_gradient_files(path, want, prefix);
      CAPTURE(prefix, c.where, c.worst, c.tensors);
      int expected_tensors = 0;
      for (const auto& n : want.names()) expected_tensors += n.starts_with(prefix);
      CHECK(c.tensors == expected_tensors);
      CHECK(c.worst <= 1e-6);
    };
    {
      Adaptation<double> task(Gpt2Backbone<double>::load(dir / "backbone.safetensors"),
                              SideNet<double>::load(dir / "sidenet.safetensors"), mem, B);
      check(task, "sidenet_gated.", "loss_sidenet_gated");
    }
    {
      JointAdaptation<double> task(Gpt2Backbone<double>::load(dir / "backbone.safetensors"),
                                   SideNet<double>::load(dir / "sidenet.safetensors"), mem, B);
      check(task, "sidenet_joint.", "loss_sidenet_joint");
    }
    {
      Adaptation<double> task(Gpt2Backbone<double>::load(dir / "backbone.safetensors"),
                              SideNet<double>::load(dir / "sidenet.safetensors"), mem, B);
      task.set_memory_enabled(false);
      check(task, "sidenet_no_memory.", "loss_sidenet_no_memory");
    }
    {
      BackbonePretraining<double> task(Gpt2Backbone<double>::load(dir / "backbone.safetensors"), B);
      check(task, "backbone.", "loss_backbone");
    }
  }
}

namespace {

/// A small GPT-2* backbone and a SideNet from it with every weight perturbed (gates nonzero),
/// so that no gradient is accidentally zero.
template <class T>
std::pair<Gpt2Backbone<T>, SideNet<T>> small_model(std::uint64_t seed, bool gpt2 = false) {
  const auto cfg = gpt2 ? BackboneConfig::gpt2(4, 16, 2, 32, 24) : BackboneConfig::gpt2_star(4, 16, 2, 32, 24);
  auto bb = Gpt2Backbone<T>::random(cfg, seed, 0.3);
  auto sn = SideNet<T>::from_backbone(bb, 2);
  std::mt19937_64 rng(seed + 1);
  std::normal_distribution<double> noise(0.0, 0.2);
  visit_side_net_tensors(sn.config(), sn.parameters(), [&](const std::string&, Tensor<T, Host>& t, const Shape&) {
    for (T& x : t) x = static_cast<T>(static_cast<double>(x) + noise(rng));
  });
  return {std::move(bb), std::move(sn)};
}

std::vector<Document> random_documents(int n, std::size_t length, int vocab, std::uint64_t seed) {
  std::vector<Document> docs;
  for (int i = 0; i < n; ++i) docs.push_back({"doc " + std::to_string(i), test::random_tokens(length, vocab, seed + i), {}});
  return docs;
}

/// Central finite differences of the stream's mean loss along single coordinates and along a
/// random direction, against the analytic gradient of one pass. `make` builds a fresh task.
template <class Make>
void check_finite_differences(Make&& make, const std::vector<Document>& docs, int segment_length) {
  auto task = make();
  const LossSum loss = run_stream_once(task, docs, segment_length);
  const double scale = 1.0 / static_cast<double>(loss.count);
  auto grads = task.gradients();
  auto params = task.parameters();
  auto mean_loss = [&] {
    auto fresh = make();
    auto p = fresh.parameters();
    for (std::size_t i = 0; i < p.size(); ++i) copy(cview(*params[i].tensor), p[i].tensor->view());
    return run_stream_once(fresh, docs, segment_length).mean();
  };
  const double h = 1e-6;
  std::mt19937_64 rng(99);
  double worst = 0, global = 0;
  for (const auto& g : grads)
    for (double x : *g.tensor) global = std::max(global, std::abs(x) * scale);
  std::string where;
  for (std::size_t i = 0; i < params.size(); ++i) {
    auto& p = *params[i].tensor;
    std::uniform_int_distribution<index_t> pick(0, p.numel() - 1);
    double max_g = 0;
    for (double g : *grads[i].tensor) max_g = std::max(max_g, std::abs(g) * scale);
    for (int c = 0; c < 2; ++c) {
      const index_t j = pick(rng);
      const double x0 = p.data()[j];
      p.data()[j] = x0 + h;
      const double up = mean_loss();
      p.data()[j] = x0 - h;
      const double down = mean_loss();
      p.data()[j] = x0;
      const double fd = (up - down) / (2 * h), g = grads[i].tensor->data()[j] * scale;
      // a tensor whose exact gradient is 0 (a key bias under a causal softmax shifts every score
      // of a query equally) is measured against the model's largest gradient
      const double err = std::abs(fd - g) / (max_g > 1e-12 * global ? max_g : global);
      if (err > worst) {
        worst = err;
        where = params[i].name;
      }
    }
  }
  // along one random direction over every parameter at once
  std::normal_distribution<double> n01(0.0, 1.0);
  std::vector<Tensor<double, Host>> dir;
  double g_dot_u = 0, u_norm = 0, g_norm = 0;
  for (std::size_t i = 0; i < params.size(); ++i) {
    Tensor<double, Host> u(params[i].tensor->shape());
    for (index_t j = 0; j < u.numel(); ++j) {
      u.data()[j] = n01(rng);
      g_dot_u += u.data()[j] * grads[i].tensor->data()[j] * scale;
      u_norm += u.data()[j] * u.data()[j];
      g_norm += std::pow(grads[i].tensor->data()[j] * scale, 2);
    }
    dir.push_back(std::move(u));
  }
  auto shift = [&](double a) {
    for (std::size_t i = 0; i < params.size(); ++i)
      for (index_t j = 0; j < dir[i].numel(); ++j) params[i].tensor->data()[j] += a * dir[i].data()[j];
  };
  shift(h);
  const double up = mean_loss();
  shift(-2 * h);
  const double down = mean_loss();
  shift(h);
  const double directional = std::abs((up - down) / (2 * h) - g_dot_u) / (std::sqrt(g_norm) * std::sqrt(u_norm));
  CAPTURE(worst, where, directional);
  CHECK(worst <= 1e-6);
  CHECK(directional <= 1e-6);
}

}  // namespace

TEST_CASE("train: whole-model gradients with memory in use (eviction, pending tokens) equal finite differences", "[train]") {
  // 2 streams x 5 segments of 11 tokens; chunks of 2 (one token pending after each segment),
  // 4 chunks retrieved of a 16-token memory: the banks fill and evict.
  const auto docs = random_documents(2, 55, 32, 7);
  MemoryConfig mem;
  mem.memory_tokens = 16;
  mem.chunk_size = 2;
  mem.retrieved_tokens = 8;
  SECTION("gated fusion") {
    check_finite_differences(
        [&] {
          auto [bb, sn] = small_model<double>(3);
          return Adaptation<double>(std::move(bb), std::move(sn), mem, 2);
        },
        docs, 11);
  }
  SECTION("joint fusion") {
    check_finite_differences(
        [&] {
          auto [bb, sn] = small_model<double>(4);
          return JointAdaptation<double>(std::move(bb), std::move(sn), mem, 2);
        },
        docs, 11);
  }
  SECTION("from scratch, GPT-2 with learned positions and sequential blocks") {
    check_finite_differences([&] { return BackbonePretraining<double>(small_model<double>(5, true).first, 2); }, docs, 11);
  }
}

TEST_CASE("train: the batched training forward computes what Model computes stream by stream", "[train]") {
  const auto docs = random_documents(3, 40, 32, 11);
  MemoryConfig mem;
  mem.memory_tokens = 24;
  mem.chunk_size = 4;
  mem.retrieved_tokens = 8;
  auto [bb, sn] = small_model<float>(8);
  using M = Model<Gpt2Backbone<float>, HostMemoryBank<float>, ExactChunkRetriever>;
  M model(bb.clone(), sn.clone(), mem, 3);
  Adaptation<float> task(std::move(bb), std::move(sn), mem, 3);
  DocumentStreams data(docs, 3, 10);
  for (int s = 0; s < 4; ++s) {
    const auto batch = data.next();
    std::vector<std::span<const std::int32_t>> segs, tgts;
    for (const auto& b : batch) {
      segs.push_back(b.tokens);
      tgts.push_back(b.targets);
    }
    const auto& out = model.forward(segs, tgts);
    const LossSum l = task.forward_backward(batch);
    CAPTURE(s, out.loss_sum, l.sum);
    CHECK(out.loss_tokens == l.count);
    CHECK(std::abs(out.loss_sum - l.sum) <= 1e-5 * std::abs(out.loss_sum));
    if (s > 0) CHECK(out.retrieved_chunks[0] == 2);
  }
}

TEST_CASE("train: document streams read documents in consecutive segments with next-token targets", "[train][data]") {
  std::vector<Document> docs{{"a", {1, 2, 3, 4, 5, 6, 7}, {}}, {"b", {10, 11, 12}, {}}, {"c", {20, 21, 22, 23, 24}, {}}};
  DocumentStreams data(docs, 2, 3);
  auto seg = [](const StreamSegment& s) { return std::vector<std::int32_t>(s.tokens.begin(), s.tokens.end()); };
  auto tgt = [](const StreamSegment& s) { return std::vector<std::int32_t>(s.targets.begin(), s.targets.end()); };
  auto b = data.next();
  CHECK(seg(b[0]) == std::vector<std::int32_t>{1, 2, 3});
  CHECK(tgt(b[0]) == std::vector<std::int32_t>{2, 3, 4});  // the last target is the next segment's first token
  CHECK(b[0].starts_document);
  CHECK(seg(b[1]) == std::vector<std::int32_t>{10, 11, 12});
  CHECK(tgt(b[1]) == std::vector<std::int32_t>{11, 12, -1});  // the document's last token has none
  const auto saved = data.state();
  b = data.next();
  CHECK(seg(b[0]) == std::vector<std::int32_t>{4, 5, 6});
  CHECK_FALSE(b[0].starts_document);
  CHECK(seg(b[1]) == std::vector<std::int32_t>{20, 21, 22});  // stream 1 takes the next document, memory reset
  CHECK(b[1].starts_document);
  b = data.next();
  CHECK(seg(b[0]) == std::vector<std::int32_t>{7});
  CHECK(tgt(b[0]) == std::vector<std::int32_t>{-1});
  CHECK(seg(b[1]) == std::vector<std::int32_t>{23, 24});
  b = data.next();
  CHECK(seg(b[0]) == std::vector<std::int32_t>{1, 2, 3});  // wrapped: epoch 1
  CHECK(data.epoch() == 1);
  DocumentStreams again(docs, 2, 3);
  again.restore(saved);
  b = again.next();
  CHECK(seg(b[0]) == std::vector<std::int32_t>{4, 5, 6});
  CHECK(seg(b[1]) == std::vector<std::int32_t>{20, 21, 22});
  // a mask removes targets
  std::vector<Document> masked{{"m", {1, 2, 3, 4}, {1, 0, 1, 0}}};
  DocumentStreams md(masked, 1, 3);
  CHECK(tgt(md.next()[0]) == std::vector<std::int32_t>{-1, 3, -1});
  // refusals
  std::vector<Document> empty_doc{{"e", {}, {}}}, tiny{{"t", {1, 2}, {}}};
  CHECK_THROWS_WITH(DocumentStreams(empty_doc, 1, 4), Catch::Contains("document e is empty"));
  CHECK_THROWS_WITH(DocumentStreams(tiny, 1, 4), Catch::Contains("fewer than one segment"));
  CHECK_THROWS_WITH(DocumentStreams(docs, 0, 4), Catch::Contains("streams"));
  DocumentStreams three(docs, 3, 3);
  CHECK_THROWS_WITH(three.restore(saved), Catch::Contains("same batch size"));
}

TEST_CASE("train: the optimizer ops sum in fixed blocks, whatever the thread count", "[train][optimizer]") {
  // Several tensors, two of them longer than one 32 Ki-element block; fresh random values.
  std::mt19937_64 rng(Catch::rngSeed() + 17);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  std::vector<Tensor<float, Host>> ts;
  for (index_t n : {index_t{5}, index_t{70001}, index_t{1}, index_t{32768}, index_t{40000}}) {
    Tensor<float, Host> t(Shape{n});
    for (float& x : t) x = u(rng);
    ts.push_back(std::move(t));
  }
  std::vector<NamedTensor<float, Host>> grads;
  double exact = 0;
  for (auto& t : ts) {
    grads.push_back({"t", &t});
    for (float x : t) exact += static_cast<double>(x) * x;
  }
  const double one = [&] {
#if defined(_OPENMP)
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    const double r = global_norm(grads);
    omp_set_num_threads(saved);
    return r;
#else
    return global_norm(grads);
#endif
  }();
  const double all = global_norm(grads);
  CHECK(all == one);  // bit for bit
  CHECK(all == Approx(std::sqrt(exact)).epsilon(1e-13));
  // scale: the double product rounded to float, element by element
  const std::vector<float> before(ts[1].begin(), ts[1].end());
  scale_gradients(grads, 0.3);
  for (index_t i = 0; i < ts[1].numel(); ++i) {
    REQUIRE(ts[1].data()[i] == static_cast<float>(static_cast<double>(before[static_cast<std::size_t>(i)]) * 0.3));
  }
  // AdamW refuses a gradient of another shape before changing anything
  Tensor<float, Host> p(Shape{5}), g(Shape{4});
  fill(p.view(), 1.0f);
  std::vector<NamedTensor<float, Host>> ps{{"w", &p}}, gs{{"w", &g}};
  AdamW<float> opt(AdamWConfig{}, ps);
  CHECK_THROWS_WITH(opt.step(ps, gs, 0.1), Catch::Contains("AdamW: tensor w has shape (5)"));
  CHECK(opt.steps() == 0);
  for (float x : p) CHECK(x == 1.0f);
  Tensor<float, Host> m(Shape{5}), v(Shape{6});
  CHECK_THROWS_AS(ops::adamw_update(p.view(), cview(ts[0]), m.view(), v.view(), ops::AdamWStep{}), ShapeError);
  CHECK_THROWS_AS(ops::adamw_update(p.view(), cview(ts[0]), m.view(), m.view(), ops::AdamWStep{}), InputError);
}

TEST_CASE("train: AdamW, the schedule and clipping follow their formulas", "[train][optimizer]") {
  Tensor<double, Host> p({3}), g({3});
  p(0) = 1.0, p(1) = -2.0, p(2) = 0.5;
  std::vector<NamedTensor<double, Host>> params{{"p", &p}}, grads{{"p", &g}};
  AdamWConfig c;
  c.lr = 0.1, c.weight_decay = 0.01;
  AdamW<double> opt(c, params);
  double m[3] = {0, 0, 0}, v[3] = {0, 0, 0}, x[3] = {1.0, -2.0, 0.5};
  for (int t = 1; t <= 3; ++t) {
    for (int i = 0; i < 3; ++i) g(i) = 0.3 * (i + 1) * t - x[i];
    for (int i = 0; i < 3; ++i) {
      const double gi = 0.3 * (i + 1) * t - x[i];
      m[i] = 0.9 * m[i] + 0.1 * gi;
      v[i] = 0.98 * v[i] + 0.02 * gi * gi;
      x[i] -= 0.1 * 0.01 * x[i];
      x[i] -= 0.1 * (m[i] / (1 - std::pow(0.9, t))) / (std::sqrt(v[i] / (1 - std::pow(0.98, t))) + 1e-6);
    }
    opt.step(params, grads, 0.1);
    for (int i = 0; i < 3; ++i) CHECK(p(i) == Approx(x[i]).epsilon(1e-14));
  }
  ScheduleConfig s;
  s.warmup = 4, s.total = 14, s.end_lr = 0.1;
  CHECK(s.rate(1, 1.0) == Approx(0.25));
  CHECK(s.rate(4, 1.0) == Approx(1.0));
  CHECK(s.rate(5, 1.0) == Approx(1.0));  // first update after warm-up: the peak
  CHECK(s.rate(10, 1.0) == Approx(0.1 + 0.9 * 0.5));
  s.decay = Decay::Cosine;
  CHECK(s.rate(10, 1.0) == Approx(0.1 + 0.9 * 0.5 * (1 + std::cos(3.14159265358979 * 0.5))));
  s.decay = Decay::Constant;
  CHECK(s.rate(14, 1.0) == 1.0);
  g(0) = 3, g(1) = 4, g(2) = 0;
  CHECK(global_norm(grads) == Approx(5.0));
  AdamWConfig bad;
  bad.lr = -1;
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("learning rate"));
  ScheduleConfig bad_s;
  bad_s.total = 5, bad_s.warmup = 6;
  CHECK_THROWS_WITH(bad_s.validate(), Catch::Contains("warm-up"));
}

namespace {

/// Weights of every parameter, flattened (bitwise comparisons of runs).
template <class Task>
std::vector<float> all_weights(Task& task) {
  std::vector<float> w;
  for (auto& p : task.parameters()) w.insert(w.end(), p.tensor->begin(), p.tensor->end());
  return w;
}

TrainConfig small_run(std::int64_t steps) {
  TrainConfig c;
  c.segment_length = 10;
  c.accumulation = 2;
  c.steps = steps;
  c.optimizer.lr = 3e-3;
  c.schedule.warmup = 2;
  c.clip_norm = 0.5;
  return c;
}

}  // namespace

TEST_CASE("train: resuming from a checkpoint continues bit for bit", "[train][checkpoint]") {
  const auto docs = random_documents(3, 75, 32, 21);
  MemoryConfig mem;
  mem.memory_tokens = 20;
  mem.chunk_size = 4;
  mem.retrieved_tokens = 8;
  TempDir tmp;
  auto adaptation = [&] {
    auto [bb, sn] = small_model<float>(12);
    return Adaptation<float>(std::move(bb), std::move(sn), mem, 2);
  };
  auto pretraining = [&] { return BackbonePretraining<float>(small_model<float>(13).first, 2); };
  auto check = [&](auto make) {
    auto straight = make();
    Trainer<decltype(straight)> a(straight, docs, docs, small_run(8));
    for (int s = 0; s < 8; ++s) a.step();
    const auto path = tmp / "ck.safetensors";
    {
      auto first = make();
      Trainer<decltype(first)> b(first, docs, docs, small_run(8));
      for (int s = 0; s < 5; ++s) b.step();
      b.save_checkpoint(path);
      CHECK_FALSE(std::filesystem::exists(tmp / "ck.safetensors.tmp"));
    }
    auto resumed = make();
    Trainer<decltype(resumed)> c(resumed, docs, docs, small_run(8));
    c.resume(path);
    CHECK(c.step_count() == 5);
    for (int s = 0; s < 3; ++s) c.step();
    CHECK(all_weights(straight) == all_weights(resumed));  // bit for bit
    CHECK(a.validate().sum == c.validate().sum);
  };
  SECTION("adaptation with memory") { check(adaptation); }
  SECTION("from scratch") { check(pretraining); }
}

TEST_CASE("train: checkpoints that do not fit the run are refused and change nothing", "[train][checkpoint][errors]") {
  const auto docs = random_documents(2, 60, 32, 31);
  MemoryConfig mem;
  mem.memory_tokens = 20;
  mem.chunk_size = 4;
  mem.retrieved_tokens = 8;
  TempDir tmp;
  auto [bb, sn] = small_model<float>(14);
  Adaptation<float> task(bb.clone(), sn.clone(), mem, 2);
  Trainer<Adaptation<float>> trainer(task, docs, docs, small_run(4));
  trainer.step();
  trainer.save_checkpoint(tmp / "a.safetensors");
  const auto before = all_weights(task);

  // another memory setting
  MemoryConfig other = mem;
  other.retrieved_tokens = 4;
  Adaptation<float> t2(bb.clone(), sn.clone(), other, 2);
  Trainer<Adaptation<float>> r2(t2, docs, docs, small_run(4));
  const auto w2 = all_weights(t2);
  CHECK_THROWS_WITH(r2.resume(tmp / "a.safetensors"), Catch::Contains("retrieved_tokens"));
  CHECK(all_weights(t2) == w2);
  // another batch size
  Adaptation<float> t3(bb.clone(), sn.clone(), mem, 3);
  Trainer<Adaptation<float>> r3(t3, docs, docs, small_run(4));
  CHECK_THROWS_WITH(r3.resume(tmp / "a.safetensors"), Catch::Contains("batch"));
  // another task
  BackbonePretraining<float> t4(bb.clone(), 2);
  Trainer<BackbonePretraining<float>> r4(t4, docs, docs, small_run(4));
  CHECK_THROWS_WITH(r4.resume(tmp / "a.safetensors"), Catch::Contains("adaptation task"));
  // a model file is not a checkpoint
  sn.save(tmp / "sidenet.safetensors");
  CHECK_THROWS_WITH(trainer.resume(tmp / "sidenet.safetensors"), Catch::Contains("not a training checkpoint"));
  // a truncated checkpoint
  std::filesystem::copy_file(tmp / "a.safetensors", tmp / "cut.safetensors");
  std::filesystem::resize_file(tmp / "cut.safetensors", std::filesystem::file_size(tmp / "a.safetensors") / 2);
  CHECK_THROWS_AS(trainer.resume(tmp / "cut.safetensors"), Error);
  CHECK(all_weights(task) == before);
}

TEST_CASE("train: a non-finite loss stops the step and leaves the weights as they were", "[train][errors]") {
  const auto docs = random_documents(2, 40, 32, 41);
  BackbonePretraining<float> task(small_model<float>(15).first, 2);
  Trainer<BackbonePretraining<float>> trainer(task, docs, docs, small_run(4));
  trainer.step();
  task.parameters()[0].tensor->data()[0] = std::numeric_limits<float>::infinity();
  const auto before = all_weights(task);
  CHECK_THROWS_AS(trainer.step(), TrainingError);
  CHECK(trainer.step_count() == 1);
  const auto after = all_weights(task);
  CHECK(std::equal(before.begin(), before.end(), after.begin(), [](float a, float b) { return a == b || (a != a && b != b); }));
}

TEST_CASE("train: bad settings and corpora are refused with a sentence", "[train][errors]") {
  const auto docs = random_documents(2, 40, 32, 51);
  BackbonePretraining<float> task(small_model<float>(16).first, 2);
  auto refused = [&](TrainConfig c, const char* part) {
    std::string what;
    try {
      Trainer<BackbonePretraining<float>> t(task, docs, docs, c);
    } catch (const Error& e) {
      what = e.what();
    }
    CAPTURE(what, part);
    CHECK_THAT(what, Catch::Contains(part));
  };
  TrainConfig c = small_run(4);
  c.accumulation = 0;
  refused(c, "accumulation");
  c = small_run(4);
  c.optimizer.lr = 0;
  refused(c, "learning rate");
  c = small_run(4);
  c.segment_length = 30;  // documents of 40 tokens are fine; one segment of 41 is not
  std::vector<Document> short_docs{{"s", {1, 2, 3}, {}}};
  CHECK_THROWS_WITH((Trainer<BackbonePretraining<float>>(task, short_docs, docs, c)), Catch::Contains("fewer than one segment"));
  std::vector<Document> out_of_vocab{{"o", std::vector<std::int32_t>(50, 40), {}}};
  CHECK_THROWS_WITH((Trainer<BackbonePretraining<float>>(task, out_of_vocab, docs, small_run(4))),
                    Catch::Contains("outside the model's vocabulary"));
  CHECK_THROWS_WITH(BackbonePretraining<float>(small_model<float>(16).first, 0), Catch::Contains("streams"));
}

TEST_CASE("train: a SideNet learns to recall a table from memory, which without memory it cannot", "[train][memory][slow]") {
  // The backbone (tests/fixtures/recall_backbone, made by make_recall_backbone.cpp) recalls a
  // key-value table inside its 32-token window. Here the table lies two segments before the
  // queries, beyond every window: only the memory can hold it. The same SideNet is adapted for
  // the same steps with memory and without, then evaluated on held-out tables the same way.
  const test::RecallSpec far{3, 3, 64, 32};
  const auto train = test::recall_documents(101, 2048, far);
  const auto valid = test::recall_documents(102, 128, far);
  const auto backbone_path = fixtures / "recall_backbone" / "backbone.safetensors";
  MemoryConfig mem;
  mem.memory_tokens = 128;
  mem.chunk_size = 1;
  mem.retrieved_tokens = 4;
  TrainConfig tc;
  tc.segment_length = 32;
  tc.accumulation = 3;  // one document (three segments) per stream and update
  tc.steps = 200;
  tc.optimizer.lr = 1e-2;
  tc.optimizer.weight_decay = 0;
  tc.schedule.decay = Decay::Cosine;
  tc.schedule.warmup = 20;
  LossSum result[2];
  for (int memory : {1, 0}) {
    auto backbone = Gpt2Backbone<float>::load(backbone_path);
    auto side_net = SideNet<float>::from_backbone(backbone, /*memory_layer=*/1);
    Adaptation<float> task(std::move(backbone), std::move(side_net), mem, 8);
    task.set_memory_enabled(memory == 1);
    Trainer<Adaptation<float>> trainer(task, train, valid, tc);
    for (std::int64_t s = 0; s < tc.steps; ++s) trainer.step();
    result[memory] = trainer.validate();
  }
  const double with = result[1].mean(), without = result[0].mean();
  const double acc_with = result[1].accuracy(), acc_without = result[0].accuracy();
  CAPTURE(with, without, acc_with, acc_without);
  WARN("recall from memory: validation loss on queried values " << with << " nats with memory (accuracy " << acc_with
                                                               << "), " << without << " without (accuracy "
                                                               << acc_without << "); chance is ln 16 = 2.77");
  CHECK(result[1].count == 128 * 3);
  CHECK(with <= 0.5 * without);
  CHECK(acc_with >= 0.5);
  CHECK(acc_without <= 0.25);
}

TEST_CASE("train: recall practice states facts, then real text, then recalls every fact", "[train][data]") {
  std::string text;
  for (int i = 0; i < 400; ++i) text += "Line " + std::to_string(i) + " of a long training document.\n";
  const std::vector<Document> source{{"src", ByteTokenizer::encode(text), {}}};
  RecallPractice spec;
  spec.facts = 4;
  spec.min_gap = 300;
  spec.max_gap = 900;
  const auto a = recall_practice_documents(source, 5, spec, 9), b = recall_practice_documents(source, 5, spec, 9);
  REQUIRE(a.size() == 5);
  for (std::size_t i = 0; i < a.size(); ++i) {
    CHECK(a[i].tokens == b[i].tokens);  // same seed, same documents
    const std::string s = ByteTokenizer::decode(a[i].tokens);
    CAPTURE(s.substr(0, 200));
    CHECK(s.find("pass key") == std::string::npos);  // never the evaluation's template
    // every stated fact is recalled later with the same words, after the filler
    std::size_t pos = 0, facts = 0;
    while ((pos = s.find("Remember: the number for ", pos)) != std::string::npos) {
      const std::size_t end = s.find(".\n", pos);
      const std::string fact = s.substr(pos + 10, end - pos - 10);  // "the number for NAME is DIGITS"
      const std::size_t recall = s.find("\nRecall: " + fact + ".");
      CHECK(recall != std::string::npos);
      CHECK(recall > end + static_cast<std::size_t>(spec.min_gap));
      pos = end;
      ++facts;
    }
    CHECK(facts == 4);
  }
  std::vector<Document> docs{{"x", {1, 2}, {}}, {"y", {3}, {}}, {"z", {4}, {}}};
  const auto mixed = interleave(std::move(docs), recall_practice_documents(source, 2, spec, 1));
  REQUIRE(mixed.size() == 5);
  CHECK(mixed[0].name == "x");
  CHECK(mixed[4].name.starts_with("recall practice"));
  CHECK_THROWS_WITH(recall_practice_documents(source, 1, RecallPractice{.facts = 2, .min_gap = 10, .max_gap = 100000}, 1),
                    Catch::Contains("fewer than the largest gap"));
  CHECK_THROWS_WITH(recall_practice_documents(source, 1, RecallPractice{.facts = 2, .min_facts = 3}, 1), Catch::Contains("min_facts"));
  // a fact count drawn per document: every count in [min_facts, facts] occurs, nothing outside it
  RecallPractice varied = spec;
  varied.min_facts = 1;
  std::set<int> counts;
  for (const auto& d : recall_practice_documents(source, 60, varied, 3)) {
    const std::string s = ByteTokenizer::decode(d.tokens);
    int n = 0;
    for (std::size_t p = s.find("Remember: "); p != std::string::npos; p = s.find("Remember: ", p + 1)) ++n;
    counts.insert(n);
  }
  CHECK(counts == std::set<int>{1, 2, 3, 4});
}

TEST_CASE("train: varied recall practice repeats each fact's words, and can score only the recalled digits", "[train][data]") {
  // filler without digits, stops or words, so the statements and recalls stand out
  std::string text;
  for (int i = 0; i < 1000; ++i) text += "~~~~ ~~ ~~~\n";
  const std::vector<Document> source{{"src", ByteTokenizer::encode(text), {}}};
  RecallPractice spec{.facts = 5, .min_facts = 1, .min_gap = 300, .max_gap = 900, .varied_wording = true, .score_answers_only = true};
  const auto docs = recall_practice_documents(source, 80, spec, 5);
  CHECK(recall_practice_documents(source, 80, spec, 5)[79].tokens == docs[79].tokens);
  std::set<std::string> contexts;
  std::set<std::size_t> lengths;
  for (const Document& d : docs) {
    REQUIRE(d.scored.size() == d.tokens.size());
    const std::string s = ByteTokenizer::decode(d.tokens);
    CAPTURE(s.substr(0, 300));
    CHECK(s.find("pass key") == std::string::npos);
    const std::size_t filler = s.find('~');
    REQUIRE(filler != std::string::npos);
    // every scored run is a whole recalled number after the filler, stated before it in the same words
    int answers = 0;
    for (std::size_t i = 0; i < s.size(); ++i) {
      if (!d.scored[i]) continue;
      std::size_t j = i;
      while (j < s.size() && d.scored[j]) ++j;
      const std::string number = s.substr(i, j - i), context = s.substr(i - 6, 6);
      CHECK(std::all_of(number.begin(), number.end(), [](char c) { return c >= '0' && c <= '9'; }));
      CHECK(i > filler + spec.min_gap);
      CHECK(s[i - 1] != '\n');
      CHECK((j < s.size() && s[j] == '.'));
      CHECK(s.substr(0, filler).find(context + number + ".\n") != std::string::npos);
      contexts.insert(context);
      lengths.insert(number.size());
      ++answers;
      i = j;
    }
    // as many answers as statements
    int stated = 0;
    for (std::size_t p = s.find(".\n"); p != std::string::npos && p < filler; p = s.find(".\n", p + 1)) ++stated;
    CHECK(answers == stated);
    CHECK(answers >= 1);
    CHECK(answers <= 5);
  }
  CHECK(contexts.size() >= 20);  // many phrasings and names, not one sentence
  CHECK(lengths == std::set<std::size_t>{4, 5, 6});
  // text_targets: the answers plus about that fraction of the other tokens
  spec.text_targets = 0.25;
  const auto some = recall_practice_documents(source, 20, spec, 5);
  std::size_t kept = 0, others = 0;
  for (std::size_t i = 0; i < some.size(); ++i) {
    CHECK(some[i].tokens == docs[i].tokens);  // the same words
    for (std::size_t j = 0; j < some[i].tokens.size(); ++j) {
      if (docs[i].scored[j]) {
        CHECK(some[i].scored[j]);
      } else {
        ++others;
        kept += some[i].scored[j];
      }
    }
  }
  CHECK(std::abs(static_cast<double>(kept) / static_cast<double>(others) - 0.25) < 0.02);
  spec.text_targets = 1.5;
  CHECK_THROWS_WITH(recall_practice_documents(source, 1, spec, 5), Catch::Contains("text_targets"));
  spec.text_targets = 0;
  // first_digit_only: the same words; of each scored run only its first digit stays scored
  spec.first_digit_only = true;
  const auto firsts = recall_practice_documents(source, 20, spec, 5);
  for (std::size_t i = 0; i < firsts.size(); ++i) {
    REQUIRE(firsts[i].tokens == docs[i].tokens);
    REQUIRE(firsts[i].scored.size() == docs[i].scored.size());
    std::size_t runs = 0, scored = 0;
    for (std::size_t j = 0; j < docs[i].scored.size(); ++j) {
      const bool starts_run = docs[i].scored[j] && (j == 0 || !docs[i].scored[j - 1]);
      runs += starts_run;
      scored += firsts[i].scored[j] != 0;
      CHECK(static_cast<bool>(firsts[i].scored[j]) == starts_run);
    }
    CHECK(scored == runs);
    CHECK(runs >= 1);
  }
  spec.first_digit_only = false;
  // without score_answers_only every token is a target (no mask)
  spec.score_answers_only = false;
  CHECK(recall_practice_documents(source, 1, spec, 5)[0].scored.empty());
}
