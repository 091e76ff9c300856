// Device attention and linear ops (OpsBackend<Device>, cuda/ops.cuh), LongMem shape: 16 heads,
// dh 64, one stream of T tokens.
//
//   Causal/<T>/<alibi>            ops::causal_attention                          (flash-style kernel)
//   Memory/<T>/<K>/<fusion>       ops::memory_attention<GatedFusion|JointFusion>, K retrieved tokens
//   Linear/<N>/<I>/<O>/<bias>     ops::linear through cuBLASLt, fp32 compute
//
// Timing: CUDA events around each call on the stream the ops use (the legacy default stream),
// UseManualTime(); one warm-up call per benchmark. The retrieved memory of Memory/1024/64 is 512 MB
// (mem_k + mem_v), far beyond the L2, so every call reads it from HBM; q/k/v (4 MB each) stay in L2,
// which is what a fused layer would see too.
// Counters: TFLOP/s of the attention maths (2 dh per score and per value term: causal 4 H dh T(T+1)/2,
// memory 4 T H K dh); mem_GB/s = retrieved keys and values read once; fp32_floor_ms = those FLOPs at
// the SMs x 128 FMA/clock fp32 peak (this kernel uses FMAs); hbm_floor_ms = retrieved memory at
// 4.25 TB/s (DESIGN.md's measured H200 copy rate; re-measure on the machine at hand).
#include <benchmark/benchmark.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>

#include "longmem/cuda/ops.cuh"
#include "longmem/cuda/storage.hpp"

namespace {

using namespace longmem;

constexpr index_t kHeads = 16;
constexpr index_t kHeadDim = 64;

__global__ void fill_uniform_kernel(float* x, index_t n, std::uint64_t seed) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    std::uint64_t z = seed + static_cast<std::uint64_t>(i) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    x[i] = (static_cast<float>(z >> 40) + 0.5f) * (2.0f / 16777216.0f) - 1.0f;
  }
}

Tensor<float, Device> random_device(Shape s, std::uint64_t seed) {
  Tensor<float, Device> t(s);
  if (t.numel() > 0) {
    fill_uniform_kernel<<<1024, 256>>>(t.data(), t.numel(), seed);
    detail::cuda_check(cudaGetLastError(), "fill_uniform launch", t.bytes());
  }
  return t;
}

struct DeviceInfo {
  double sms = 0, clock_hz = 0;
  static const DeviceInfo& get() {
    static const DeviceInfo d = [] {
      DeviceInfo i;
      int dev = 0, sms = 0, khz = 0;
      (void)cudaGetDevice(&dev);
      (void)cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
      (void)cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, dev);
      i.sms = sms;
      i.clock_hz = khz * 1e3;
      return i;
    }();
    return d;
  }
};

/// Times f() with CUDA events on the ops' stream, one warm-up call first.
template <class F>
void time_loop(benchmark::State& state, F&& f) {
  const cudaStream_t s = detail::cuda::stream();
  f();
  detail::cuda_check(cudaStreamSynchronize(s), "warm-up", 0);
  cudaEvent_t start, stop;
  detail::cuda_check(cudaEventCreate(&start), "cudaEventCreate", 0);
  detail::cuda_check(cudaEventCreate(&stop), "cudaEventCreate", 0);
  for (auto _ : state) {
    detail::cuda_check(cudaEventRecord(start, s), "cudaEventRecord", 0);
    f();
    detail::cuda_check(cudaEventRecord(stop, s), "cudaEventRecord", 0);
    detail::cuda_check(cudaEventSynchronize(stop), "cudaEventSynchronize", 0);
    float ms = 0;
    detail::cuda_check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime", 0);
    state.SetIterationTime(ms * 1e-3);
  }
  (void)cudaEventDestroy(start);
  (void)cudaEventDestroy(stop);
}

void set_counters(benchmark::State& state, double flops, double mem_bytes) {
  const DeviceInfo& d = DeviceInfo::get();
  const double iters = static_cast<double>(state.iterations());
  state.counters["TFLOP/s"] = benchmark::Counter(flops * iters * 1e-12, benchmark::Counter::kIsRate);
  state.counters["fp32_floor_ms"] = d.sms > 0 ? flops / (d.sms * 128.0 * 2.0 * d.clock_hz) * 1e3 : 0.0;
  if (mem_bytes > 0) {
    state.counters["mem_GB/s"] = benchmark::Counter(mem_bytes * iters * 1e-9, benchmark::Counter::kIsRate);
    state.counters["hbm_floor_ms"] = mem_bytes / 4.25e12 * 1e3;
  }
}

void bm_causal(benchmark::State& state, index_t T, PositionScheme pos) {
  auto q = random_device(Shape{T, kHeads, kHeadDim}, 1), k = random_device(Shape{T, kHeads, kHeadDim}, 2),
       v = random_device(Shape{T, kHeads, kHeadDim}, 3);
  Tensor<float, Device> out(Shape{T, kHeads, kHeadDim});
  time_loop(state, [&] { ops::causal_attention(out.view(), cview(q), cview(k), cview(v), pos); });
  set_counters(state, 4.0 * kHeads * kHeadDim * static_cast<double>(T) * static_cast<double>(T + 1) / 2.0, 0);
}

template <class Fusion>
void bm_memory(benchmark::State& state, index_t T, index_t K) {
  auto q = random_device(Shape{T, kHeads, kHeadDim}, 1), k = random_device(Shape{T, kHeads, kHeadDim}, 2),
       v = random_device(Shape{T, kHeads, kHeadDim}, 3);
  auto mk = random_device(Shape{T, kHeads, K, kHeadDim}, 4), mv = random_device(Shape{T, kHeads, K, kHeadDim}, 5);
  auto g = random_device(Shape{kHeads}, 6);
  Tensor<float, Device> out(Shape{T, kHeads, kHeadDim});
  time_loop(state, [&] {
    ops::memory_attention<Fusion>(out.view(), cview(q), cview(k), cview(v), cview(mk), cview(mv), cview(g),
                                  PositionScheme::Alibi);
  });
  const double local = 4.0 * kHeads * kHeadDim * static_cast<double>(T) * static_cast<double>(T + 1) / 2.0;
  const double memory = 4.0 * static_cast<double>(T) * kHeads * static_cast<double>(K) * kHeadDim;
  set_counters(state, local + memory, static_cast<double>(mk.bytes() + mv.bytes()));
}

void bm_linear(benchmark::State& state, index_t N, index_t I, index_t O, bool bias) {
  auto x = random_device(Shape{N, I}, 1), w = random_device(Shape{O, I}, 2), b = random_device(Shape{O}, 3);
  Tensor<float, Device> out(Shape{N, O});
  time_loop(state, [&] {
    ops::linear(out.view(), cview(x), cview(w), bias ? cview(b) : TensorView<const float, Device>{});
  });
  set_counters(state, 2.0 * static_cast<double>(N) * static_cast<double>(I) * static_cast<double>(O), 0);
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda_device_available()) {
    std::printf("no CUDA device: nothing to measure\n");
    return 0;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) std::printf("device: %s\n", prop.name);
  for (index_t T : {1024, 4096}) {
    for (auto pos : {PositionScheme::Learned, PositionScheme::Alibi}) {
      const std::string name = "Causal/" + std::to_string(T) + "/" + (pos == PositionScheme::Alibi ? "alibi" : "learned");
      benchmark::RegisterBenchmark(name.c_str(), bm_causal, T, pos)->Unit(benchmark::kMillisecond)->UseManualTime();
    }
  }
  for (index_t K : {16, 64}) {
    const std::string tail = "1024/" + std::to_string(K);
    benchmark::RegisterBenchmark(("Memory/" + tail + "/gated").c_str(), bm_memory<GatedFusion>, index_t{1024}, K)
        ->Unit(benchmark::kMillisecond)
        ->UseManualTime();
    benchmark::RegisterBenchmark(("Memory/" + tail + "/joint").c_str(), bm_memory<JointFusion>, index_t{1024}, K)
        ->Unit(benchmark::kMillisecond)
        ->UseManualTime();
  }
  // The SideNet's projections at the paper width for one 1024-token segment and a batch of 8.
  for (index_t N : {1024, 8192}) {
    for (auto [I, O] : {std::pair<index_t, index_t>{1024, 1024}, {1024, 4096}, {4096, 1024}}) {
      const std::string name = "Linear/" + std::to_string(N) + "/" + std::to_string(I) + "/" + std::to_string(O) + "/bias";
      benchmark::RegisterBenchmark(name.c_str(), bm_linear, N, I, O, true)->Unit(benchmark::kMillisecond)->UseManualTime();
    }
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
