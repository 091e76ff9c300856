// Training a backbone from scratch on the GPU: BackbonePretraining<float, Device> (forward, backward
// and the Trainer's AdamW<float, Device> on the device) against the same task on the host.
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
//   5. optimizer ops  sum_of_squares, scale and adamw_update on the device against the host backend
//                  on fresh random tensors of odd sizes (1 to 100,003 elements; 130 tensors, more
//                  than one launch's 96): the sum within 1e-12 relative of a float64 sum (both sum
//                  float squares in double) and the same bits on a second call; scale equal bit for
//                  bit (both round the double product to float); each of three AdamW updates from
//                  the same state within 1 float ulp of the result + 1 ulp of its largest term (the
//                  device may fuse the double multiply-adds; m and weights may cancel); bad shapes and aliasing refused with
//                  the host's exceptions, the parameter unchanged
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
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "gpu_check.hpp"

namespace {

using namespace longmem;

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

Tensor<float, Host> to_host(const Tensor<float, Device>& t) {
  Tensor<float, Host> h(t.shape());
  copy(cview(t), h.view());
  return h;
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
    const double e = max_abs_diff(to_host(*gd[i].tensor), *gr[i].tensor), eh = max_abs_diff(*gh[i].tensor, *gr[i].tensor);
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
  for (auto& g : gd) once.push_back(to_host(*g.tensor));
  dev.forward_backward(batch.segments);
  auto g2 = dev.gradients();
  double acc_err = 0;
  for (std::size_t i = 0; i < g2.size(); ++i) {
    const double scale = max_abs(once[i]);
    const Tensor<float, Host> twice = to_host(*g2[i].tensor);
    double e = 0;
    for (index_t j = 0; j < once[i].numel(); ++j) e = std::max(e, std::abs(double(twice.data()[j]) - 2.0 * once[i].data()[j]));
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
    werr = std::max(werr, max_abs_diff(to_host(*pd[i].tensor), *ph[i].tensor));
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

std::vector<Tensor<float, Host>> random_host_tensors(const std::vector<index_t>& sizes, std::uint64_t seed, float lo, float hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<Tensor<float, Host>> out;
  for (index_t n : sizes) {
    Tensor<float, Host> t(Shape{n});
    for (index_t i = 0; i < n; ++i) t.data()[i] = u(rng);
    out.push_back(std::move(t));
  }
  return out;
}

std::vector<Tensor<float, Device>> to_device(const std::vector<Tensor<float, Host>>& xs) {
  std::vector<Tensor<float, Device>> out;
  for (const auto& x : xs) {
    Tensor<float, Device> d(x.shape());
    copy(cview(x), d.view());
    out.push_back(std::move(d));
  }
  return out;
}

template <class T, class L>
std::vector<TensorView<const T, L>> const_views(const std::vector<Tensor<T, L>>& xs) {
  std::vector<TensorView<const T, L>> v;
  for (const auto& x : xs) v.push_back(cview(x));
  return v;
}

template <class T, class L>
std::vector<TensorView<T, L>> views(std::vector<Tensor<T, L>>& xs) {
  std::vector<TensorView<T, L>> v;
  for (auto& x : xs) v.push_back(x.view());
  return v;
}

void optimizer_ops(std::uint64_t seed) {
  std::vector<index_t> sizes = {1, 1000, 32768, 32769, 100003, 7};
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 124; ++i) sizes.push_back(1 + static_cast<index_t>(rng() % 5000));
  auto host = random_host_tensors(sizes, seed + 1, -3.0f, 3.0f);
  auto dev = to_device(host);

  // sum_of_squares
  double exact = 0;
  for (const auto& t : host)
    for (index_t i = 0; i < t.numel(); ++i) exact += static_cast<double>(t.data()[i]) * t.data()[i];
  const auto dv = const_views(dev);
  const double s1 = ops::sum_of_squares(std::span<const TensorView<const float, Device>>(dv));
  const double s2 = ops::sum_of_squares(std::span<const TensorView<const float, Device>>(dv));
  const auto hv = const_views(host);
  const double sh = ops::sum_of_squares(std::span<const TensorView<const float, Host>>(hv));
  EXPECT(std::abs(s1 - exact) <= 1e-12 * exact, "sum_of_squares: device %.17g, float64 %.17g", s1, exact);
  EXPECT(std::abs(sh - exact) <= 1e-12 * exact, "sum_of_squares: host %.17g, float64 %.17g", sh, exact);
  EXPECT(s1 == s2, "sum_of_squares: two device calls differ (%.17g, %.17g)", s1, s2);
  EXPECT(ops::sum_of_squares(std::span<const TensorView<const float, Device>>()) == 0.0, "sum_of_squares of no tensors");

  // scale
  const double factor = 0.37136;
  auto dm = views(dev);
  ops::scale(std::span<const TensorView<float, Device>>(dm), factor);
  auto hm = views(host);
  ops::scale(std::span<const TensorView<float, Host>>(hm), factor);
  double scale_err = 0;
  for (std::size_t i = 0; i < host.size(); ++i) scale_err = std::max(scale_err, max_abs_diff(to_host(dev[i]), host[i]));
  EXPECT(scale_err == 0.0, "scale: device and host differ by %.3g", scale_err);

  // adamw_update: three updates, each judged alone: before each, the device takes the host's state.
  // Both compute in double and round to float, but the device may fuse multiply-adds, which moves
  // the double result by about 1e-16 of its largest term. So a float result may differ by one
  // rounding (1 ulp of the result) plus one ulp of the largest term where terms cancel (m near 0,
  // a weight that steps across 0).
  auto hg = random_host_tensors(sizes, seed + 2, -0.5f, 0.5f);
  auto hmom = random_host_tensors(sizes, seed + 3, -0.1f, 0.1f);
  auto hvar = random_host_tensors(sizes, seed + 4, 0.0f, 0.02f);
  const auto dg = to_device(hg);
  const auto snapshot = [](const std::vector<Tensor<float, Host>>& xs) {
    std::vector<std::vector<float>> s;
    for (const auto& x : xs) s.emplace_back(x.data(), x.data() + x.numel());
    return s;
  };
  const auto float_ulp = [](double x) { return std::ldexp(1.0, std::ilogb(std::max(std::abs(x), 1e-30)) - 23); };
  ops::AdamWStep st;
  st.beta1 = 0.9;
  st.beta2 = 0.98;
  st.eps = 1e-6;
  st.weight_decay = 0.01;
  double worst = 0;  // the largest |device - host| in units of its bound
  std::vector<Tensor<float, Device>> dmom, dvar;  // the last update's moments (for the refusals below)
  for (int t = 1; t <= 3; ++t) {
    st.lr = 1e-3 * t;
    st.bias1 = 1.0 - std::pow(st.beta1, t);
    st.bias2 = 1.0 - std::pow(st.beta2, t);
    const auto p0 = snapshot(host), m0 = snapshot(hmom), v0 = snapshot(hvar);
    auto dparam = to_device(host);
    dmom = to_device(hmom);
    dvar = to_device(hvar);
    for (std::size_t i = 0; i < host.size(); ++i) {
      ops::adamw_update(host[i].view(), cview(hg[i]), hmom[i].view(), hvar[i].view(), st);
      ops::adamw_update(dparam[i].view(), cview(dg[i]), dmom[i].view(), dvar[i].view(), st);
    }
    for (std::size_t i = 0; i < host.size(); ++i) {
      const Tensor<float, Host> gp = to_host(dparam[i]), gm = to_host(dmom[i]), gv = to_host(dvar[i]);
      for (index_t j = 0; j < gp.numel(); ++j) {
        const double g = hg[i].data()[j], m = hmom[i].data()[j], v = hvar[i].data()[j];
        const double m_term = std::max(std::abs(st.beta1 * m0[i][j]), std::abs((1 - st.beta1) * g));
        const double v_term = std::max(st.beta2 * v0[i][j], (1 - st.beta2) * g * g);
        const double step = st.lr * std::abs(m / st.bias1) / (std::sqrt(v / st.bias2) + st.eps);
        const double p_term = std::max(std::abs(static_cast<double>(p0[i][j])), step);
        const double p = host[i].data()[j];
        worst = std::max({worst, std::abs(gm.data()[j] - m) / (float_ulp(m) + float_ulp(m_term)),
                          std::abs(gv.data()[j] - v) / (float_ulp(v) + float_ulp(v_term)),
                          std::abs(gp.data()[j] - p) / (float_ulp(p) + float_ulp(p_term))});
      }
    }
  }
  EXPECT(worst <= 1.0, "adamw_update: device and host differ by %.3g of the bound (1 ulp of the result + 1 ulp of its largest term)", worst);

  // bad input: refused before anything is written
  const Tensor<float, Host> before = to_host(dev[1]);
  Tensor<float, Device> wrong(Shape{999});
  bool shape_error = false, alias_error = false;
  try {
    ops::adamw_update(dev[1].view(), cview(wrong), dmom[1].view(), dvar[1].view(), st);
  } catch (const ShapeError&) {
    shape_error = true;
  }
  try {
    ops::adamw_update(dev[1].view(), cview(dg[1]), dmom[1].view(), dmom[1].view(), st);
  } catch (const InputError&) {
    alias_error = true;
  }
  EXPECT(shape_error, "adamw_update accepted a gradient of another shape");
  EXPECT(alias_error, "adamw_update accepted m and v in one buffer");
  EXPECT(max_abs_diff(to_host(dev[1]), before) == 0.0, "a refused adamw_update changed the parameter");
  std::printf("optimizer ops: %zu tensors (%lld elements): sum of squares %.17g (device) %.17g (float64), scale equal, "
              "AdamW within %.3g of its bound\n", sizes.size(), (long long)std::accumulate(sizes.begin(), sizes.end(), index_t{0}), s1,
              exact, worst);
}

}  // namespace

int main() {
  if (!cuda_device_available()) {
    std::printf("no CUDA device: the device training checks are skipped\n");
    return 77;
  }
  const auto star = BackboneConfig::gpt2_star(3, 64, 4, 50, 64);
  const auto gpt2 = BackboneConfig::gpt2(3, 64, 4, 50, 64);
  run_part("gradients gpt2*", [&] { gradients("gpt2*", star, 5); });
  run_part("gradients gpt2", [&] { gradients("gpt2", gpt2, 6); });
  run_part("trainer gpt2*", [&] { trainer("gpt2*", star, 7); });
  run_part("trainer gpt2", [&] { trainer("gpt2", gpt2, 8); });
  run_part("optimizer ops", [] { optimizer_ops(9); });
  return finish("device training");
}
