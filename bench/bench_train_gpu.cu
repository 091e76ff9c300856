// Training on the GPU (`longmem-train pretrain|adapt --device cuda`), one whole update through the
// Trainer (forward, backward, gradient scaling, norm, clipping, AdamW; weights, gradients and
// moments on the device):
//   BM_PretrainStepGpu             BackbonePretraining<float, Device>, a backbone from scratch
//   BM_PretrainForwardBackwardGpu  its forward + backward alone, so the rest is the update's own cost
//   BM_AdaptationStepGpu           SideNetAdaptation with DeviceMemoryBank<float> and the
//                                  FusedChunkRetriever: the backbone frozen, SideNet L/2 layers,
//                                  every bank full (msz tokens, csz 4, K 64) before timing
// GPT-2* (ALiBi, parallel blocks), d, L layers, d/32 heads, V 256, B streams x T tokens; random
// weights and tokens. CUDA events around each call with UseManualTime(); the GPU is idle when each
// starts, so host work counts.
// Peer: bench/peers/train_torch.py --device cuda --mode full|adapt (same shapes, fp32, fused AdamW).
#define EIGEN_NO_CUDA

#include <benchmark/benchmark.h>

#include <cuda_runtime.h>

#include <vector>

#include <longmem/cuda/chunk_retriever.cuh>
#include <longmem/cuda/device_memory_bank.cuh>
#include <longmem/cuda/ops.cuh>
#include <longmem/cuda/storage.hpp>
#include <longmem/train.hpp>

#include "bench_gpu_support.cuh"
#include "bench_train_support.hpp"

namespace {

using namespace longmem;

using Task = BackbonePretraining<float, Device>;

struct Shape4 {
  int T, d, L, B;
};

Shape4 shape_of(const benchmark::State& state) {
  return {static_cast<int>(state.range(0)), static_cast<int>(state.range(1)), static_cast<int>(state.range(2)),
          static_cast<int>(state.range(3))};
}

Task make_task(const Shape4& s) {
  const auto cfg = BackboneConfig::gpt2_star(s.L, s.d, s.d / 32, 256, s.T);
  return Task(initial_backbone<float>(cfg, 1), s.B);
}

void set_rate(benchmark::State& state, const Shape4& s) {
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(s.B) * s.T, benchmark::Counter::kIsIterationInvariantRate);
}

/// One warm-up update (buffers, cuBLASLt heuristics, the memory pool), then each iteration's
/// update timed with CUDA events.
template <class Tr>
void time_updates(benchmark::State& state, Tr& trainer) {
  trainer.step();
  detail::cuda_check(cudaDeviceSynchronize(), "warm-up", 0);
  bench::EventTimer timer;
  const cudaStream_t st = detail::cuda::stream();
  for (auto _ : state) {
    timer.start(st);
    benchmark::DoNotOptimize(trainer.step().loss);
    state.SetIterationTime(timer.seconds(st));
  }
}

bool have_device(benchmark::State& state) {
  if (cuda_device_available()) return true;
  state.SkipWithError("no CUDA device");
  return false;
}

void BM_PretrainStepGpu(benchmark::State& state) {
  if (!have_device(state)) return;
  const Shape4 s = shape_of(state);
  Task task = make_task(s);
  const auto docs = bench::random_corpus(s.B, static_cast<std::size_t>(400 * s.T), 256);
  Trainer<Task> trainer(task, docs, {}, bench::train_config(s.T));
  time_updates(state, trainer);
  set_rate(state, s);
}

void BM_PretrainForwardBackwardGpu(benchmark::State& state) {
  if (!have_device(state)) return;
  const Shape4 s = shape_of(state);
  Task task = make_task(s);
  const auto docs = bench::random_corpus(s.B, static_cast<std::size_t>(4 * s.T), 256);
  DocumentStreams data(docs, s.B, s.T);
  const auto batch = data.next();
  task.zero_gradients();
  task.forward_backward(batch);  // warm-up
  detail::cuda_check(cudaDeviceSynchronize(), "warm-up", 0);
  bench::EventTimer timer;
  const cudaStream_t st = detail::cuda::stream();
  for (auto _ : state) {
    timer.start(st);
    task.zero_gradients();
    benchmark::DoNotOptimize(task.forward_backward(batch).sum);
    state.SetIterationTime(timer.seconds(st));
  }
  set_rate(state, s);
}

void BM_AdaptationStepGpu(benchmark::State& state) {
  if (!have_device(state)) return;
  const Shape4 s = shape_of(state);
  const int msz = static_cast<int>(state.range(4));
  auto backbone = initial_backbone<float>(BackboneConfig::gpt2_star(s.L, s.d, s.d / 32, 256, s.T), 1);
  auto side_net = SideNet<float>::from_backbone(backbone, s.L / 2);
  MemoryConfig mem;
  mem.memory_tokens = msz;
  mem.chunk_size = 4;
  mem.retrieved_tokens = 64;
  SideNetAdaptation<DeviceMemoryBank<float>, FusedChunkRetriever> task(std::move(backbone), std::move(side_net), mem, s.B);
  // Documents long enough that no stream reaches a document boundary while timing.
  const auto docs = bench::random_corpus(s.B, static_cast<std::size_t>(msz + 400 * s.T), 256);
  DocumentStreams fill(docs, s.B, s.T);
  for (int i = 0; i < msz / s.T; ++i) task.memorize(fill.next());
  Trainer<decltype(task)> trainer(task, docs, {}, bench::train_config(s.T));
  trainer.restore_data(fill.state());  // continue the streams where the memory ends
  time_updates(state, trainer);
  set_rate(state, s);
  state.SetLabel("memory full: " + std::to_string(task.bank(0).size_tokens()) + " tokens/stream");
}

// T, d, L, B: the demo backbone's shape at the batches of bench/RESULTS.md (8, 32, 128)
BENCHMARK(BM_PretrainStepGpu)->ArgNames({"T", "d", "L", "B"})->ArgsProduct({{256}, {256}, {4}, {8, 32, 128}})
    ->Unit(benchmark::kMillisecond)->UseManualTime()->MinTime(1.0);
BENCHMARK(BM_PretrainForwardBackwardGpu)->ArgNames({"T", "d", "L", "B"})->ArgsProduct({{256}, {256}, {4}, {8, 32, 128}})
    ->Unit(benchmark::kMillisecond)->UseManualTime()->MinTime(1.0);
// T, d, L, B, memory tokens per stream: the CPU benchmark's shape (the demo's SideNet), and B 32
BENCHMARK(BM_AdaptationStepGpu)->ArgNames({"T", "d", "L", "B", "msz"})->ArgsProduct({{256}, {256}, {4}, {8, 32}, {16384}})
    ->Unit(benchmark::kMillisecond)->UseManualTime()->MinTime(1.0);

}  // namespace

BENCHMARK_MAIN();
