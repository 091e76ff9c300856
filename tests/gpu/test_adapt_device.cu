// Memory-augmented adaptation on the GPU: SideNetAdaptation<DeviceMemoryBank<float>,
// FusedChunkRetriever> (backbone, SideNet, gradients, activations, banks and AdamW moments on the
// device) against the same task on the host (HostMemoryBank<float>, ExactChunkRetriever), from the
// same weights and data. A small GPT-2* backbone (ALiBi, parallel blocks) and its SideNet with
// random gate logits; memory of 64 tokens in chunks of 4, 8 tokens (2 chunks) retrieved per query,
// so retrieval, eviction and both fusions are exercised within a few segments.
//   1. gradients   four micro-batches of 2 streams (segments of 24 and 17 tokens: memory fills and
//                  wraps) accumulated: the loss of each call within 1e-5 relative and every SideNet
//                  gradient within 1e-4 max |g_host| + 1e-5 G (G: the largest gradient element), for
//                  GatedFusion and JointFusion (fp32 on both sides; only summation orders differ)
//   2. trainer     20 updates of the Trainer (AdamW, warm-up, clipping) on each: every step's loss
//                  within 1e-3 relative, the final weights within 1e-3 max |w|, the validation loss
//                  within 1e-4 relative, and the loss goes down
//   3. checkpoint  a device run checkpointed after 6 updates and resumed into a fresh device task
//                  gives the same bits as the uninterrupted run after 10; the host task resumes the
//                  same checkpoint (banks and moments written in the host bank's layout) and its
//                  next step's loss is the device's within 1e-3
// Exit status: 0 passed, 1 failed, 77 no CUDA device (ctest: skipped).
#define EIGEN_NO_CUDA

#include <longmem/cpu/ops.hpp>
#include <longmem/cuda/chunk_retriever.cuh>
#include <longmem/cuda/device_memory_bank.cuh>
#include <longmem/cuda/ops.cuh>
#include <longmem/cuda/storage.hpp>
#include <longmem/train.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "gpu_check.hpp"

namespace {

using namespace longmem;

template <class F>
using HostTask = SideNetAdaptation<HostMemoryBank<float>, ExactChunkRetriever, F, float>;
template <class F>
using DeviceTask = SideNetAdaptation<DeviceMemoryBank<float>, FusedChunkRetriever, F, float>;

BackboneConfig small_backbone() { return BackboneConfig::gpt2_star(4, 64, 4, 64, 32); }

MemoryConfig small_memory() {
  MemoryConfig m;
  m.memory_tokens = 64;
  m.chunk_size = 4;
  m.retrieved_tokens = 8;
  return m;
}

Gpt2Backbone<float> backbone(std::uint64_t seed) { return Gpt2Backbone<float>::random(small_backbone(), seed, 0.3); }

/// The backbone's SideNet (memory at backbone layer 2) with random gate logits in [-2, 2].
SideNet<float> side_net(const Gpt2Backbone<float>& bb, std::uint64_t seed) {
  auto sn = SideNet<float>::from_backbone(bb, 2, 2);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-2, 2);
  for (int i = 0; i < sn.config().n_layer; ++i) {
    auto& g = sn.layer(i).gate;
    for (index_t h = 0; h < g.numel(); ++h) g.data()[h] = u(rng);
  }
  return sn;
}

std::vector<std::int32_t> random_tokens(std::size_t n, int vocab, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> u(0, vocab - 1);
  std::vector<std::int32_t> t(n);
  for (auto& x : t) x = u(rng);
  return t;
}

template <class L>
Tensor<float, Host> to_host(const Tensor<float, L>& t) {
  Tensor<float, Host> h(t.shape());
  copy(cview(t), h.view());
  return h;
}

double max_abs_diff(const Tensor<float, Host>& a, const Tensor<float, Host>& b) {
  double m = 0;
  for (index_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(double(a.data()[i]) - double(b.data()[i])));
  return m;
}
double max_abs(const Tensor<float, Host>& a) {
  double m = 0;
  for (index_t i = 0; i < a.numel(); ++i) m = std::max(m, std::abs(double(a.data()[i])));
  return m;
}

template <class F>
void gradients(std::uint64_t seed) {
  const char* label = F::name;
  auto bb = backbone(seed);
  auto sn = side_net(bb, seed + 1);
  HostTask<F> host(bb.clone(), sn.clone(), small_memory(), 2);
  DeviceTask<F> dev(bb.clone(), sn.clone(), small_memory(), 2);
  host.zero_gradients();
  dev.zero_gradients();
  std::mt19937_64 rng(seed + 2);
  const int vocab = small_backbone().vocab_size;
  for (int call = 0; call < 4; ++call) {
    std::vector<std::vector<std::int32_t>> tokens, targets;
    for (std::size_t len : {std::size_t{24}, std::size_t{17}}) {
      auto t = random_tokens(len + 1, vocab, rng);
      targets.emplace_back(t.begin() + 1, t.end());
      t.pop_back();
      tokens.push_back(std::move(t));
    }
    targets[1][5] = -1;  // an ignored target
    std::vector<StreamSegment> batch;
    for (std::size_t b = 0; b < 2; ++b) batch.push_back({tokens[b], targets[b], call == 0, 0, 0});
    const LossSum lh = host.forward_backward(batch), ld = dev.forward_backward(batch);
    EXPECT(ld.count == lh.count && std::abs(ld.sum - lh.sum) <= 1e-5 * std::abs(lh.sum),
           "%s: call %d: loss sum %.9g over %lld targets on the device, %.9g over %lld on the host", label, call, ld.sum,
           (long long)ld.count, lh.sum, (long long)lh.count);
  }
  for (int s = 0; s < 2; ++s) {
    EXPECT(dev.bank(s).num_chunks() == host.bank(s).num_chunks() && dev.bank(s).chunks_appended() == host.bank(s).chunks_appended(),
           "%s: stream %d: the device bank holds %lld chunks (%lld appended), the host's %lld (%lld)", label, s,
           (long long)dev.bank(s).num_chunks(), (long long)dev.bank(s).chunks_appended(), (long long)host.bank(s).num_chunks(),
           (long long)host.bank(s).chunks_appended());
  }
  EXPECT(host.bank(0).chunks_appended() > host.bank(0).geometry().capacity_chunks,
         "%s: the test meant the ring to wrap, but stream 0 appended only %lld chunks", label,
         (long long)host.bank(0).chunks_appended());
  auto gh = host.gradients();
  auto gd = dev.gradients();
  double global = 0, worst = 0;
  std::string worst_name;
  for (const auto& g : gh) global = std::max(global, max_abs(*g.tensor));
  EXPECT(global > 0, "%s: every host gradient is zero", label);
  for (std::size_t i = 0; i < gh.size(); ++i) {
    const double scale = max_abs(*gh[i].tensor), e = max_abs_diff(to_host(*gd[i].tensor), *gh[i].tensor);
    const double bound = 1e-4 * scale + 1e-5 * global;
    EXPECT(e <= bound, "%s: gradient %s: max |dev - host| %.3g, bound %.3g (max |host| %.3g)", label, gh[i].name.c_str(), e,
           bound, scale);
    if (e / bound > worst) worst = e / bound, worst_name = gh[i].name;
  }
  std::printf("%-6s gradients of %zu SideNet tensors over 4 micro-batches (memory wrapped): worst device error %.3g of the "
              "bound (%s)\n", label, gh.size(), worst, worst_name.c_str());
}

/// Documents that repeat a random phrase at a distance beyond one segment: memory helps.
std::vector<Document> documents(int n, std::size_t length, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Document> docs;
  for (int i = 0; i < n; ++i) {
    const auto phrase = random_tokens(40 + static_cast<std::size_t>(i), small_backbone().vocab_size, rng);
    std::vector<std::int32_t> t;
    while (t.size() < length) t.insert(t.end(), phrase.begin(), phrase.end());
    t.resize(length);
    docs.push_back({"doc " + std::to_string(i), t, {}});
  }
  return docs;
}

TrainConfig train_config(std::uint64_t seed, int steps) {
  TrainConfig tc;
  tc.segment_length = 24;
  tc.steps = steps;
  tc.optimizer.lr = 2e-3;
  tc.schedule.warmup = 4;
  tc.seed = seed;
  return tc;
}

template <class Task>
std::vector<Tensor<float, Host>> weights(Task& task) {
  std::vector<Tensor<float, Host>> w;
  for (auto& p : task.parameters()) w.push_back(to_host(*p.tensor));
  return w;
}

void trainer(std::uint64_t seed) {
  auto bb = backbone(seed);
  auto sn = side_net(bb, seed + 1);
  const auto train = documents(4, 400, seed + 2), valid = documents(2, 200, seed + 3);
  const TrainConfig tc = train_config(seed, 20);
  HostTask<GatedFusion> host(bb.clone(), sn.clone(), small_memory(), 2);
  DeviceTask<GatedFusion> dev(bb.clone(), sn.clone(), small_memory(), 2);
  Trainer<HostTask<GatedFusion>> th(host, train, valid, tc);
  Trainer<DeviceTask<GatedFusion>> td(dev, train, valid, tc);
  double worst = 0, first = 0, last = 0;
  for (int s = 0; s < tc.steps; ++s) {
    const StepStats a = th.step(), b = td.step();
    const double rel = std::abs(a.loss - b.loss) / std::max(1e-12, std::abs(a.loss));
    worst = std::max(worst, rel);
    EXPECT(rel <= 1e-3, "trainer: step %d loss %.7f on the device, %.7f on the host", s + 1, b.loss, a.loss);
    if (s == 0) first = b.loss;
    last = b.loss;
  }
  EXPECT(last < 0.9 * first, "trainer: the device adaptation did not learn (loss %.4f -> %.4f)", first, last);
  const auto wh = weights(host), wd = weights(dev);
  double werr = 0, wmax = 0;
  for (std::size_t i = 0; i < wh.size(); ++i) {
    werr = std::max(werr, max_abs_diff(wd[i], wh[i]));
    wmax = std::max(wmax, max_abs(wh[i]));
  }
  EXPECT(werr <= 1e-3 * wmax, "trainer: SideNet weights after %lld updates differ by %.3g (max |w| %.3g)", (long long)tc.steps,
         werr, wmax);
  const LossSum vh = th.validate(), vd = td.validate();
  EXPECT(vd.count == vh.count && std::abs(vd.sum - vh.sum) <= 1e-4 * std::abs(vh.sum),
         "trainer: validation loss %.7f on the device, %.7f on the host", vd.mean(), vh.mean());
  std::printf("trainer %lld updates: loss %.4f -> %.4f, worst step-loss difference %.3g relative, weights within %.3g (max "
              "|w| %.3g), validation %.6f (device) %.6f (host)\n", (long long)tc.steps, first, last, worst, werr, wmax,
              vd.mean(), vh.mean());
}

bool same_bits(const std::vector<Tensor<float, Host>>& a, const std::vector<Tensor<float, Host>>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].numel() != b[i].numel() || std::memcmp(a[i].data(), b[i].data(), a[i].bytes()) != 0) return false;
  }
  return true;
}

void checkpoint(std::uint64_t seed) {
  auto bb = backbone(seed);
  auto sn = side_net(bb, seed + 1);
  const auto train = documents(4, 400, seed + 2), valid = documents(1, 100, seed + 3);
  const TrainConfig tc = train_config(seed, 10);
  const auto path = std::filesystem::temp_directory_path() / ("longmem_adapt_device_" + std::to_string(seed) + ".safetensors");

  DeviceTask<GatedFusion> whole(bb.clone(), sn.clone(), small_memory(), 2);
  Trainer<DeviceTask<GatedFusion>> tw(whole, train, valid, tc);
  for (int s = 0; s < 6; ++s) tw.step();
  tw.save_checkpoint(path);
  const double next_loss = tw.step().loss;
  for (int s = 7; s < 10; ++s) tw.step();

  DeviceTask<GatedFusion> resumed(bb.clone(), sn.clone(), small_memory(), 2);
  Trainer<DeviceTask<GatedFusion>> tr(resumed, train, valid, tc);
  tr.resume(path);
  for (int s = 6; s < 10; ++s) tr.step();
  EXPECT(same_bits(weights(whole), weights(resumed)),
         "checkpoint: the device run resumed after 6 updates differs from the uninterrupted one after 10");

  HostTask<GatedFusion> host(bb.clone(), sn.clone(), small_memory(), 2);
  Trainer<HostTask<GatedFusion>> th(host, train, valid, tc);
  th.resume(path);
  const double host_loss = th.step().loss;
  EXPECT(std::abs(host_loss - next_loss) <= 1e-3 * std::abs(next_loss),
         "checkpoint: the host task resumed from the device checkpoint: step 7 loss %.7f, the device's %.7f", host_loss,
         next_loss);
  std::filesystem::remove(path);
  std::printf("checkpoint: device resume after 6 of 10 updates bit-identical; host resume of the device checkpoint: step 7 "
              "loss %.6f (device %.6f)\n", host_loss, next_loss);
}

}  // namespace

int main() {
  if (!cuda_device_available()) {
    std::printf("no CUDA device: the device adaptation checks are skipped\n");
    return 77;
  }
  run_part("gradients gated", [] { gradients<GatedFusion>(7); });
  run_part("gradients joint", [] { gradients<JointFusion>(8); });
  run_part("trainer", [] { trainer(9); });
  run_part("checkpoint", [] { checkpoint(10); });
  return finish("device adaptation");
}
