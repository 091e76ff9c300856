// The whole LongMem forward on the GPU at the paper's shape (issue 7): backbone + SideNet +
// retrieval + memory attention of one segment per stream, as longmem::Model runs it on the device.
// The PyTorch peer of the same forward is bench/peers/longmem_torch.py --device cuda (fp16);
// bench/run_device.sh bench-gpu runs both on the same GPU.
//
// Model: Model<Gpt2Backbone<float, Device>, DeviceMemoryBank<float>, FusedChunkRetriever> (GatedFusion),
// all streams of a call as one batch (the device default)
//   backbone  GPT-2* (parallel blocks, ALiBi, bias-free q/k/v/out), 24 layers, d 1024, 16 heads
//             (dh 64), MLP 4096, vocabulary 50,257 (GPT-2's), window T 1024;
//             Gpt2Backbone<float>::random (seed 1, N(0, 0.02) matrices), then to_device()
//   SideNet   SideNet::from_backbone (reduction factor 2: 12 layers), memory layer m = 17 (SideNet
//             layer 8 is memory-augmented), every gate 0.5 (sigmoid 0.62: the memory branch counts)
//   memory    65,536 tokens per stream (16,384 chunks of csz 4), K 64 retrieved tokens (16 chunks),
//             fp32 storage
//
// Before timing, every stream's bank is filled to 65,536 tokens with the layer-17 keys/values of 64
// random 1024-token segments per stream through the same backbone (all streams in one backbone
// call per segment; filled under DeviceMath::tf32, which only changes the filler's rounding). The
// memory is read-only while timing (set_remember(false)): the banks stay full and identical, every
// query retrieves 16 chunks (checked).
//
//   Forward/streams:<B>/memory:<0|1>/math:<0|1|2>/stacked:<0|1>/dtype:0
//   Forward/streams:<B>/memory:<0|1>/math:0/stacked:1/dtype:<1|2>
// one model.forward of one fixed random 1024-token segment per stream (logits (1024, 50257) per
// stream, fp32) for B 1 and 8, memory on and off (off: every SideNet layer plain causal attention,
// no retrieval), under DeviceMath fp32 (0: float accuracy, the fixtures' mode), tf32 (1) and bf16 (2)
// (cuda/math_mode.hpp: what is rounded, and what is not: retrieval stays exact fp32 in every mode).
// dtype:1 is the bf16 model (Bf16Model below: Gpt2Backbone<bfloat16, Device> from the same host
// weights by to<Device, bfloat16>(), bf16 bank, bf16 logits); its retrieval scores bf16 queries
// against float chunk keys, exactly. dtype:2 is the same in fp16 (F16Model: half, __half bank).
//
// Timing: CUDA events around each forward on the ops' stream (the legacy default stream), so the
// figure is device time of the whole call, host gaps included; UseManualTime(), one warm-up call.
// Counters: tokens/s = B x 1024 per forward; TFLOP/s = the forward's matrix FLOPs (counted below,
// the DESIGN.md's ~8.9 TFLOP per B8 step) over the time.
#include <benchmark/benchmark.h>

#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <longmem/cuda/chunk_retriever.cuh>
#include <longmem/cuda/device_memory_bank.cuh>
#include <longmem/cuda/math_mode.hpp>
#include <longmem/cuda/ops.cuh>
#include <longmem/cuda/storage.hpp>
#include <longmem/model.hpp>

#include "bench_gpu_support.cuh"

namespace {

using namespace longmem;
using DevModel = Model<Gpt2Backbone<float, Device>, DeviceMemoryBank<float>, FusedChunkRetriever>;
// bf16 (fp16) buffers throughout (weights, activations, logits) and a bf16 (fp16) bank.
using Bf16Model = Model<Gpt2Backbone<bfloat16, Device>, DeviceMemoryBank<__nv_bfloat16>, FusedChunkRetriever>;
using F16Model = Model<Gpt2Backbone<longmem::half, Device>, DeviceMemoryBank<__half>, FusedChunkRetriever>;

constexpr int kLayers = 24, kD = 1024, kHeads = 16, kVocab = 50257, kT = 1024;
constexpr int kMemoryLayer = 17, kReduction = 2;
constexpr int kMemoryTokens = 65536, kChunk = 4, kRetrieved = 64;
constexpr int kFillSegments = kMemoryTokens / kT;  // 64
constexpr int kMaxStreams = 8;
constexpr DeviceMath kMaths[] = {DeviceMath::fp32, DeviceMath::tf32, DeviceMath::bf16};

/// Matrix FLOPs of one forward of B streams x T tokens (2 per multiply-add): every GEMM of the
/// backbone and SideNet (q, k, v, out, fc_in/fc1, fc_out/fc2), the tied head, causal attention
/// (q k^T and P v over the causal triangle, T (T + 1) / 2 pairs), and with memory the retrieval
/// scores (T x chunks x dh per head) and the memory branch (T x K x dh, twice).
double forward_flops(int B, bool memory) {
  const double d = kD, F = 4.0 * kD, T = kT, V = kVocab, H = kHeads, dh = kD / kHeads;
  const double layers = kLayers + kLayers / kReduction;
  const double gemm = layers * T * (4 * d * d + 2 * d * F) * 2 + T * d * V * 2;
  const double attn = layers * H * (T * (T + 1) / 2) * dh * 2 * 2;
  const double mem = memory ? H * T * (kMemoryTokens / double(kChunk)) * dh * 2 + H * T * kRetrieved * dh * 2 * 2 : 0;
  return B * (gemm + attn + mem);
}

std::vector<std::int32_t> random_tokens(std::mt19937_64& rng, std::size_t n) {
  std::uniform_int_distribution<int> u(0, kVocab - 1);
  std::vector<std::int32_t> t(n);
  for (auto& x : t) x = u(rng);
  return t;
}

template <class M>
struct Setup {
  std::unique_ptr<M> model;
  std::vector<std::vector<std::int32_t>> segments;  // the timed segment of each stream
};

// The host weights, drawn once.
struct HostWeights {
  Gpt2Backbone<float> backbone;
  SideNet<float> side_net;
};
const HostWeights& host_weights() {
  static const HostWeights w = [] {
    const auto cfg = BackboneConfig::gpt2_star(kLayers, kD, kHeads, kVocab, kT);
    auto bb = Gpt2Backbone<float>::random(cfg, 1, 0.02);
    auto sn = SideNet<float>::from_backbone(bb, kMemoryLayer, kReduction);
    fill(sn.layer(sn.config().memory_augmented_layer()).gate.view(), 0.5f);
    return HostWeights{std::move(bb), std::move(sn)};
  }();
  return w;
}

// One model per element type and stream count, built on first use (the 8-stream float one holds
// 4.3 GB of banks, the bf16 one 2.1 GB); a new stream count replaces the model of that type.
template <class E>
auto& setup(int streams) {
  using M = std::conditional_t<std::is_same_v<E, float>, DevModel,
                               std::conditional_t<std::is_same_v<E, bfloat16>, Bf16Model, F16Model>>;
  static int built = -1;
  static Setup<M> s;
  if (built == streams) return s;
  s = Setup<M>{};
  MemoryConfig mem;
  mem.memory_tokens = kMemoryTokens;
  mem.chunk_size = kChunk;
  mem.retrieved_tokens = kRetrieved;
  const HostWeights& w = host_weights();
  s.model = std::make_unique<M>(w.backbone.template to<Device, E>(), w.side_net.template to<Device, E>(), mem, streams);
  {
    const DeviceMathScope fast(DeviceMath::tf32);
    std::mt19937_64 rng(42 + static_cast<std::uint64_t>(streams));
    const BackboneRequest req{false, false, kMemoryLayer};
    BackboneOutput<E, Device> out;
    for (int i = 0; i < kFillSegments; ++i) {
      std::vector<std::vector<std::int32_t>> toks;
      for (int b = 0; b < streams; ++b) toks.push_back(random_tokens(rng, kT));
      std::vector<std::span<const std::int32_t>> segs(toks.begin(), toks.end());
      s.model->backbone().forward(std::span<const std::span<const std::int32_t>>(segs), req, out);
      for (int b = 0; b < streams; ++b) {
        s.model->bank(b).append(cview(out.mem_keys).slice(out.offsets[b], out.offsets[b + 1]),
                                cview(out.mem_values).slice(out.offsets[b], out.offsets[b + 1]));
      }
    }
  }
  std::mt19937_64 seg_rng(7);
  for (int b = 0; b < streams; ++b) s.segments.push_back(random_tokens(seg_rng, kT));
  s.model->set_remember(false);
  built = streams;
  return s;
}

template <class E>
void run_forward(benchmark::State& state) {
  const int streams = static_cast<int>(state.range(0));
  const bool memory = state.range(1) != 0;
  const DeviceMath math = kMaths[state.range(2)];
  const bool stacked = state.range(3) != 0;
  auto& s = setup<E>(streams);
  auto& model = *s.model;
  model.set_memory_enabled(memory);
  model.set_stacked_retrieval(stacked);
  for (int b = 0; b < streams; ++b) {
    if (model.bank(b).size_tokens() != kMemoryTokens) {
      state.SkipWithError("a bank is not full");
      return;
    }
  }
  const DeviceMathScope scope(math);
  std::vector<std::span<const std::int32_t>> segs(s.segments.begin(), s.segments.end());
  const cudaStream_t st = detail::cuda::stream();
  const auto& warm = model.forward(segs);  // warm-up: workspaces, cuBLASLt heuristics
  detail::cuda_check(cudaStreamSynchronize(st), "warm-up forward", 0);
  for (int b = 0; b < streams; ++b) {
    if (warm.retrieved_chunks[static_cast<std::size_t>(b)] != (memory ? kRetrieved / kChunk : 0)) {
      state.SkipWithError("unexpected number of retrieved chunks");
      return;
    }
  }
  // LONGMEM_BENCH_PROFILE=1: one more forward between cudaProfilerStart/Stop, the first time a
  // process gets here, so that `ncu --profile-from-start off` sees exactly one forward (run one case
  // per process; bench/profile_kernels.py sums its kernels by name).
  static bool profiled = false;
  if (const char* p = std::getenv("LONGMEM_BENCH_PROFILE"); p && *p == '1' && !profiled) {
    profiled = true;
    detail::cuda_check(cudaProfilerStart(), "cudaProfilerStart", 0);
    model.forward(segs);
    detail::cuda_check(cudaStreamSynchronize(st), "profiled forward", 0);
    detail::cuda_check(cudaProfilerStop(), "cudaProfilerStop", 0);
  }
  bench::EventTimer timer;
  for (auto _ : state) {
    timer.start(st);
    const auto& r = model.forward(segs);
    state.SetIterationTime(timer.seconds(st));
    benchmark::DoNotOptimize(r.logits.back().data());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(streams) * kT, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["TFLOP/s"] =
      benchmark::Counter(forward_flops(streams, memory) * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(std::string(memory ? "memory 64Ki" : "memory off") + ", " +
                 (std::is_same_v<E, float> ? to_string(math) : std::is_same_v<E, bfloat16> ? "bf16 model" : "fp16 model") +
                 (memory && streams > 1 ? (stacked ? ", stacked retrieval" : ", retrieval per stream") : ""));
}

void BM_Forward(benchmark::State& state) {
  if (!cuda_device_available()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  if (state.range(4) == 0) {
    run_forward<float>(state);
  } else if (state.range(4) == 1) {
    run_forward<bfloat16>(state);
  } else {
    run_forward<longmem::half>(state);
  }
}

// streams, memory, math, stacked (every stream's retrieval and memory attention in one call: the
// default; 0 = stream by stream, for comparison), dtype (0: float buffers under `math`; 1: the bf16
// model, 2: the fp16 model, where math does not apply). The peer prints streams 1 and 8, memory on
// and off, in fp16.
BENCHMARK(BM_Forward)
    ->ArgNames({"streams", "memory", "math", "stacked", "dtype"})
    ->ArgsProduct({{1, kMaxStreams}, {1, 0}, {0, 1, 2}, {1}, {0}})
    ->Args({kMaxStreams, 1, 1, 0, 0})
    ->Args({kMaxStreams, 1, 0, 0, 0})
    ->ArgsProduct({{1, kMaxStreams}, {1, 0}, {0}, {1}, {1, 2}})
    ->Args({kMaxStreams, 1, 0, 0, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseManualTime()
    ->MinTime(1.0);

}  // namespace

BENCHMARK_MAIN();
