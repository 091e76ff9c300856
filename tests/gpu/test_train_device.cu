// Training a backbone from scratch on the GPU: BackbonePretraining<float, Device> (forward and
// backward on the device, AdamW on the host) against the same task on the host.
//   1. gradients   one forward_backward over 3 segments of different lengths (GPT-2* with ALiBi and
//                  parallel blocks; GPT-2 with learned positions and sequential blocks): the loss and
//                  every gradient tensor of the device task against the float64 host task on the same
//                  weights, and the float host task beside it for scale:
//                    |loss_dev - loss_ref| <= 1e-5 |loss_ref|,  max |g_dev - g_ref| <= 1e-4 max |g_ref| + 1e-5 G
//                  (G: the largest gradient element of the model; exactly-zero gradients hold float noise)
//                  (fp32 throughout; only summation orders differ, over chains of about 15 GEMMs)
//   2. accumulation   two calls accumulate: the gradients equal the sum of two single calls
//   3. trainer     30 updates of the Trainer (AdamW, warm-up, clipping) on the device and on the host from
//                  the same weights and data: every step's loss within 1e-3 relative, and the final
//                  weights within 1e-3 x max |w| (rounding differences grow through AdamW's updates,
//                  which divide by sqrt(v): a few ulp of gradient move a weight by a few ulp of lr)
//   4. evaluate    the validation loss of the device task equals the host's within 1e-5 relative
// Exit status: 0 passed, 1 failed, 77 no CUDA device (ctest: skipped).
#define EIGEN_NO_CUDA

#include <longmem/cpu/ops.hpp>
#include <longmem/cuda/ops.cuh>
#include <longmem/cuda/storage.hpp>
#include <longmem/train.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace longmem;

int failures = 0, checks = 0;

#define EXPECT(cond, ...)                                           \
  do {                                                              \
    ++checks;                                                       \
    if (!(cond)) {                                                  \
      ++failures;                                                   \
      std::printf("FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                     \
      std::printf("\n");                                            \
      std::fflush(stdout);                                          \
    }                                                               \
  } while (0)

std::vector<std::int32_t> random_tokens(std::size_t n, int vocab, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> u(0, vocab - 1);
  std::vector<std::int32_t> t(n);
  for (auto& x : t) x = u(rng);
  return t;
}

/// A random backbone in double and the same weights in float (through a safetensors file).
struct Weights {
  Gpt2Backbone<double> f64;
  Gpt2Backbone<float> f32;
};
Weights random_weights(const BackboneConfig& cfg, std::uint64_t seed) {
  auto bb = Gpt2Backbone<double>::random(cfg, seed, 0.3);
  const auto path = std::filesystem::temp_directory_path() / ("longmem_train_device_" + std::to_string(seed) + ".safetensors");
  bb.save(path);
  auto f = Gpt2Backbone<float>::load(path);
  std::filesystem::remove(path);
  // The float weights, back in double, so the reference sees exactly the float model.
  const auto path2 = std::filesystem::temp_directory_path() / ("longmem_train_device_" + std::to_string(seed) + "_f.safetensors");
  f.save(path2);
  auto d = Gpt2Backbone<double>::load(path2);
  std::filesystem::remove(path2);
  return {std::move(d), std::move(f)};
}

struct Batch {
  std::vector<std::vector<std::int32_t>> tokens, targets;
  std::vector<StreamSegment> segments;
};
Batch make_batch(const std::vector<std::size_t>& lengths, int vocab, std::uint64_t seed) {
  Batch b;
  for (std::size_t i = 0; i < lengths.size(); ++i) {
    auto t = random_tokens(lengths[i] + 1, vocab, seed + i);
    b.targets.emplace_back(t.begin() + 1, t.end());
    t.pop_back();
    if (i == 1) b.targets.back()[lengths[i] / 2] = -1;  // an ignored target
    b.tokens.push_back(std::move(t));
  }
  for (std::size_t i = 0; i < lengths.size(); ++i) b.segments.push_back({b.tokens[i], b.targets[i], true, 0, 0});
  return b;
}

template <class A, class B>
double max_abs_diff(const Tensor<A, Host>& a, const Tensor<B, Host>& b) {
  double m = 0;
  for (index_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(static_cast<double>(a.data()[i]) - static_cast<double>(b.data()[i])));
  return m;
}
template <class A>
double max_abs(const Tensor<A, Host>& a) {
  double m = 0;
  for (index_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(static_cast<double>(a.data()[i])));
  return m;
}

void gradients(const char* label, const BackboneConfig& cfg, std::uint64_t seed) {
  auto w = random_weights(cfg, seed);
  const Batch batch = make_batch({static_cast<std::size_t>(cfg.n_positions), 17, 40}, cfg.vocab_size, seed + 100);
  BackbonePretraining<double> ref(w.f64.clone(), 3);
  BackbonePretraining<float> host(w.f32.clone(), 3);
  BackbonePretraining<float, Device> dev(w.f32.clone(), 3);
  for (auto* t : {&host}) t->zero_gradients();
  ref.zero_gradients();
  dev.zero_gradients();
  const LossSum lr = ref.forward_backward(batch.segments);
  const LossSum lh = host.forward_backward(batch.segments);
  const LossSum ld = dev.forward_backward(batch.segments);
  EXPECT(ld.count == lr.count, "%s: %lld targets on the device, %lld on the host", label, (long long)ld.count, (long long)lr.count);
  EXPECT(std::abs(ld.sum - lr.sum) <= 1e-5 * std::abs(lr.sum), "%s: loss sum %.9g on the device, %.9g float64", label, ld.sum,
         lr.sum);
  auto gr = ref.gradients();
  auto gh = host.gradients();
  auto gd = dev.gradients();
  double worst = 0, worst_host = 0, global = 0;
  std::string worst_name;
  for (const auto& g : gr) global = std::max(global, max_abs(*g.tensor));
  for (std::size_t i = 0; i < gr.size(); ++i) {
    const double scale = max_abs(*gr[i].tensor);
    const double e = max_abs_diff(*gd[i].tensor, *gr[i].tensor), eh = max_abs_diff(*gh[i].tensor, *gr[i].tensor);
    // atol 1e-5 of the largest gradient of the model: a tensor whose exact gradient is 0 (the key
    // bias: adding q.b to every score of a row leaves its softmax unchanged) holds float noise.
    const double bound = 1e-4 * scale + 1e-5 * global;
    EXPECT(e <= bound, "%s: gradient %s: max |dev - ref| %.3g, bound %.3g (max |ref| %.3g; host float %.3g)", label,
           gr[i].name.c_str(), e, bound, scale, eh);
    if (e / bound > worst) worst = e / bound, worst_name = gr[i].name;
    worst_host = std::max(worst_host, eh / bound);
  }
  std::printf("%-8s gradients of %zu tensors: loss %.6f (device) %.6f (host float) %.6f (float64); worst device error "
              "%.3g of the bound (%s), host float %.3g\n", label, gr.size(), ld.mean(), lh.mean(), lr.mean(), worst,
              worst_name.c_str(), worst_host);

  // Accumulation: a second call adds the same gradient again.
  std::vector<Tensor<float, Host>> once;
  for (auto& g : gd) {
    Tensor<float, Host> c(g.tensor->shape());
    copy(cview(*g.tensor), c.view());
    once.push_back(std::move(c));
  }
  dev.forward_backward(batch.segments);
  auto g2 = dev.gradients();
  double acc_err = 0;
  for (std::size_t i = 0; i < g2.size(); ++i) {
    const double scale = max_abs(once[i]);
    double e = 0;
    for (index_t j = 0; j < once[i].numel(); ++j) e = std::max(e, std::abs(double(g2[i].tensor->data()[j]) - 2.0 * once[i].data()[j]));
    acc_err = std::max(acc_err, scale > 0 ? e / scale : e);
    EXPECT(e <= 1e-6 * scale + 1e-9, "%s: accumulated gradient %s is not twice one call (err %.3g, max %.3g)", label,
           g2[i].name.c_str(), e, scale);
  }
  std::printf("%-8s accumulation: two calls = 2 x one call within %.3g relative\n", label, acc_err);
}

std::vector<Document> pattern_documents(int n, std::size_t length, int vocab, std::uint64_t seed) {
  // Repeated short random phrases: learnable in a few steps, so the trajectories move.
  std::vector<Document> docs;
  for (int i = 0; i < n; ++i) {
    const auto phrase = random_tokens(7 + static_cast<std::size_t>(i), vocab, seed + i);
    std::vector<std::int32_t> t;
    while (t.size() < length) t.insert(t.end(), phrase.begin(), phrase.end());
    t.resize(length);
    docs.push_back({"doc " + std::to_string(i), t, {}});
  }
  return docs;
}

void trainer(const char* label, const BackboneConfig& cfg, std::uint64_t seed) {
  auto w = random_weights(cfg, seed);
  const auto train = pattern_documents(4, 600, cfg.vocab_size, seed + 1);
  const auto valid = pattern_documents(2, 300, cfg.vocab_size, seed + 50);
  TrainConfig tc;
  tc.segment_length = 48;
  tc.steps = 30;
  tc.optimizer.lr = 3e-3;
  tc.schedule.warmup = 5;
  tc.seed = seed;
  BackbonePretraining<float> host(w.f32.clone(), 2);
  BackbonePretraining<float, Device> dev(w.f32.clone(), 2);
  Trainer<BackbonePretraining<float>> th(host, train, valid, tc);
  Trainer<BackbonePretraining<float, Device>> td(dev, train, valid, tc);
  double worst = 0, first = 0, last = 0;
  for (int s = 0; s < tc.steps; ++s) {
    const StepStats a = th.step(), b = td.step();
    const double rel = std::abs(a.loss - b.loss) / std::max(1e-12, std::abs(a.loss));
    worst = std::max(worst, rel);
    EXPECT(rel <= 1e-3, "%s: step %d loss %.7f on the device, %.7f on the host", label, s + 1, b.loss, a.loss);
    if (s == 0) first = b.loss;
    last = b.loss;
  }
  EXPECT(last < 0.8 * first, "%s: the device training did not learn the repeated phrases (loss %.4f -> %.4f)", label, first, last);
  auto ph = host.parameters();
  auto pd = dev.parameters();
  double werr = 0, wmax = 0;
  for (std::size_t i = 0; i < ph.size(); ++i) {
    werr = std::max(werr, max_abs_diff(*pd[i].tensor, *ph[i].tensor));
    wmax = std::max(wmax, max_abs(*ph[i].tensor));
  }
  EXPECT(werr <= 1e-3 * wmax, "%s: weights after %lld updates differ by %.3g (max |w| %.3g)", label, (long long)tc.steps, werr, wmax);
  const LossSum vh = th.validate(), vd = td.validate();
  EXPECT(vd.count == vh.count && std::abs(vd.sum - vh.sum) <= 1e-5 * std::abs(vh.sum) + 1e-3 * werr,
         "%s: validation loss %.7f on the device, %.7f on the host", label, vd.mean(), vh.mean());
  std::printf("%-8s trainer: %lld updates, loss %.4f -> %.4f, worst step-loss difference %.3g relative, weights within %.3g "
              "(max |w| %.3g), validation %.6f (device) %.6f (host)\n", label, (long long)tc.steps, first, last, worst, werr,
              wmax, vd.mean(), vh.mean());
}

}  // namespace

int main() {
  if (!cuda_device_available()) {
    std::printf("no CUDA device: the device training checks are skipped\n");
    return 77;
  }
  try {
    const auto star = BackboneConfig::gpt2_star(3, 64, 4, 50, 64);
    const auto gpt2 = BackboneConfig::gpt2(3, 64, 4, 50, 64);
    gradients("gpt2*", star, 5);
    gradients("gpt2", gpt2, 6);
    trainer("gpt2*", star, 7);
    trainer("gpt2", gpt2, 8);
  } catch (const std::exception& e) {
    ++failures;
    std::printf("FAILED: uncaught exception: %s\n", e.what());
  }
  if (failures) {
    std::printf("%d of %d checks failed\n", failures, checks);
    return 1;
  }
  std::printf("all %d device training checks passed\n", checks);
  return 0;
}
