// Exact chunk retrieval on the GPU, LongMem shape: 16 heads, dh 64, csz 4, K = 64 tokens (16 chunks).
//
//   Select/<memory tokens>/<queries>/<storage>     FusedChunkRetriever::select: scores + top-k
//   Retrieve/<memory tokens>/<queries>/<storage>   ... + gather of the chosen chunks' keys and values
//   SelectSplits/65536/1024/half/<S>               select with S chunk-range splits (how the
//                                                  automatic choice is judged)
//   SelectTC/<memory>/<queries>/half, RetrieveTC/...  FusedRetrieverTuning::tensor_core_prefilter on
//                                                  (TF32 tensor-core scores as an exact prefilter;
//                                                  the default; Select/Retrieve: the fp32 FMA kernel)
//   SelectTCSplits/65536/1024/half/<S>             the same with S splits
//   SelectUnfiltered/<memory>/<queries>/half       select with FusedRetrieverTuning::threshold_filter
//                                                  off (every score tile merged for every row: the
//                                                  earlier path), automatic splits
// Memories: 65,536 tokens with 1,024 queries, 1 Mi tokens with 1,024, 4 Mi tokens with 256
// (bench/peers/retrieval_torch.py measures PyTorch's bmm + topk at the same shapes).
//
// Timing: CUDA events around each call on the bank's stream, UseManualTime(). Banks and queries
// rotate over enough copies that consecutive calls read more than three times the L2 cache, so a
// call never finds the previous call's chunk keys in L2 (the 65,536-token bank has 64 MB of chunk
// keys; the 1 Mi and 4 Mi banks, 1 and 4 GB, need no rotation). One warm-up call per benchmark.
// Counters: TFLOP/s of the scoring (2 T H n dh per call); fp32_floor_ms = those FLOPs at the
// device's fp32 FMA peak (SMs x 128 FMA/clock, what this kernel uses); tc_floor_ms = the same at
// the dense fp16 tensor-core peak (SMs x 2048 FMA/clock, Hopper), the floor of a tensor-core
// version; keys_GB/s = chunk keys read once per call; chunks = n.
#include <benchmark/benchmark.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "longmem/cuda/chunk_retriever.cuh"
#include "longmem/cuda/device_memory_bank.cuh"
#include "longmem/cuda/storage.hpp"

#include "bench_gpu_support.cuh"

namespace {

using namespace longmem;

constexpr int kHeads = 16;
constexpr int kHeadDim = 64;
constexpr int kChunk = 4;
constexpr int kRetrievedTokens = 64;
constexpr index_t kSegment = 8192;  // tokens per append while filling a bank

// Uniform in (-1, 1) from a hash of (seed, index): fills gigabytes on the device in milliseconds.
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

void fill_uniform(Tensor<float, Device>& t, std::uint64_t seed) {
  fill_uniform_kernel<<<1024, 256>>>(t.data(), t.numel(), seed);
  detail::cuda_check(cudaGetLastError(), "fill_uniform launch", t.bytes());
}

struct DeviceInfo {
  int sms = 0;
  double clock_hz = 0;
  double l2_bytes = 0;
  std::string name;
};

const DeviceInfo& device_info() {
  static DeviceInfo info = [] {
    DeviceInfo d;
    int dev = 0, khz = 0, l2 = 0;
    detail::cuda_check(cudaGetDevice(&dev), "cudaGetDevice", 0);
    detail::cuda_check(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev), "SM count", 0);
    detail::cuda_check(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, dev), "clock rate", 0);
    detail::cuda_check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev), "L2 size", 0);
    cudaDeviceProp p{};
    detail::cuda_check(cudaGetDeviceProperties(&p, dev), "cudaGetDeviceProperties", 0);
    d.name = p.name;
    d.clock_hz = khz * 1e3;
    d.l2_bytes = l2;
    return d;
  }();
  return info;
}

template <class S>
struct Setup {
  index_t memory = 0, queries = 0;
  std::vector<std::unique_ptr<DeviceMemoryBank<S>>> banks;
  std::vector<Tensor<float, Device>> q;  // (T, H, dh) each
};

template <class S>
Setup<S>& setup(index_t memory, index_t queries) {
  static Setup<S> s;
  if (!s.banks.empty() && s.memory == memory && s.queries == queries) return s;
  s = Setup<S>{};  // one configuration at a time: a 4 Mi-token bank takes 21 GB
  s.memory = memory;
  s.queries = queries;
  const MemoryGeometry g{kHeads, kHeadDim, kChunk, memory / kChunk};
  const double per_call = static_cast<double>(kHeads) * g.capacity_chunks * kHeadDim * 4.0 +
                          static_cast<double>(queries) * kHeads * kHeadDim * 4.0;
  const int copies = std::max(1, std::min(8, static_cast<int>(3.0 * device_info().l2_bytes / per_call) + 1));
  Tensor<float, Device> k({kSegment, kHeads, kHeadDim}), v({kSegment, kHeads, kHeadDim});
  std::uint64_t seed = 0x5eed0000ull + static_cast<std::uint64_t>(memory);
  for (int c = 0; c < copies; ++c) {
    auto bank = std::make_unique<DeviceMemoryBank<S>>(g);
    for (index_t filled = 0; filled < memory; filled += kSegment) {
      fill_uniform(k, ++seed);
      fill_uniform(v, ++seed);
      const index_t n = std::min(kSegment, memory - filled);
      bank->append(cview(k).slice(0, n), cview(v).slice(0, n));
    }
    s.banks.push_back(std::move(bank));
    Tensor<float, Device> q({queries, kHeads, kHeadDim});
    fill_uniform(q, ++seed);
    s.q.push_back(std::move(q));
  }
  detail::cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize (bench setup)", 0);
  return s;
}

void set_counters(benchmark::State& state, index_t queries, index_t n_chunks, int rotation) {
  const DeviceInfo& d = device_info();
  const double flops = 2.0 * static_cast<double>(queries) * kHeads * static_cast<double>(n_chunks) * kHeadDim;
  const double key_bytes = static_cast<double>(kHeads) * static_cast<double>(n_chunks) * kHeadDim * sizeof(float);
  const auto iters = static_cast<double>(state.iterations());
  state.counters["TFLOP/s"] = benchmark::Counter(flops * iters * 1e-12, benchmark::Counter::kIsRate);
  state.counters["keys_GB/s"] = benchmark::Counter(key_bytes * iters * 1e-9, benchmark::Counter::kIsRate);
  state.counters["fp32_floor_ms"] = flops / (d.sms * 128.0 * 2.0 * d.clock_hz) * 1e3;
  state.counters["tc_floor_ms"] = flops / (d.sms * 2048.0 * 2.0 * d.clock_hz) * 1e3;
  state.counters["chunks"] = static_cast<double>(n_chunks);
  state.counters["rotation"] = rotation;
  state.SetItemsProcessed(state.iterations() * queries);
}

// Times `call(bank, queries)` with CUDA events, rotating over the setup's copies.
template <class S, class F>
void timed(benchmark::State& state, Setup<S>& s, F&& call) {
  bench::EventTimer timer;
  call(*s.banks[0], s.q[0]);  // warm-up: workspace and outputs allocated, kernels loaded
  detail::cuda_check(cudaDeviceSynchronize(), "warm-up", 0);
  std::size_t next = 0;
  for (auto _ : state) {
    const std::size_t i = next++ % s.banks.size();
    const cudaStream_t stream = s.banks[i]->stream();
    timer.start(stream);
    call(*s.banks[i], s.q[i]);
    state.SetIterationTime(timer.seconds(stream));
  }
}

template <class S>
void BM_Select(benchmark::State& state, index_t memory, index_t queries, int splits, bool filter, bool tc,
               bool seeded) {
  Setup<S>& s = setup<S>(memory, queries);
  FusedChunkRetriever retriever(FusedRetrieverTuning{splits, filter, tc, seeded});
  Tensor<std::int32_t, Device> slots;
  Tensor<float, Device> scores;
  timed(state, s, [&](const DeviceMemoryBank<S>& bank, const Tensor<float, Device>& q) {
    retriever.select(bank, cview(q), kRetrievedTokens / kChunk, slots, scores);
  });
  const index_t n = s.banks[0]->num_chunks();
  set_counters(state, queries, n, static_cast<int>(s.banks.size()));
  state.counters["splits"] = retriever.splits_for(kHeads * ((queries + 127) / 128), n);
}

template <class S>
void BM_Retrieve(benchmark::State& state, index_t memory, index_t queries, bool tc) {
  Setup<S>& s = setup<S>(memory, queries);
  FusedChunkRetriever retriever(FusedRetrieverTuning{0, true, tc});
  Retrieved<float, Device> out;
  timed(state, s, [&](const DeviceMemoryBank<S>& bank, const Tensor<float, Device>& q) {
    retriever.retrieve(bank, cview(q), kRetrievedTokens / kChunk, out);
  });
  set_counters(state, queries, s.banks[0]->num_chunks(), static_cast<int>(s.banks.size()));
  // Gathered keys + values written (float), once per call.
  const double out_bytes = 2.0 * static_cast<double>(queries) * kHeads * kRetrievedTokens * kHeadDim * sizeof(float);
  state.counters["gather_GB/s"] =
      benchmark::Counter(out_bytes * static_cast<double>(state.iterations()) * 1e-9, benchmark::Counter::kIsRate);
}

template <class S>
const char* storage_name() {
  return std::is_same_v<S, float> ? "float" : std::is_same_v<S, __half> ? "half" : "bf16";
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (!cuda_device_available()) {
    std::fprintf(stderr, "bench_retrieval_gpu: no CUDA device\n");
    return 77;
  }
  const DeviceInfo& d = device_info();
  benchmark::AddCustomContext("device", d.name);
  benchmark::AddCustomContext("sms", std::to_string(d.sms));
  benchmark::AddCustomContext("clock_mhz", std::to_string(d.clock_hz * 1e-6));
  benchmark::AddCustomContext("l2_mib", std::to_string(d.l2_bytes / (1 << 20)));
  auto reg = [](const std::string& name, auto fn, auto... args) {
    benchmark::RegisterBenchmark(name.c_str(), fn, args...)->Unit(benchmark::kMillisecond)->UseManualTime();
  };
  // Grouped by setup so each bank set is built once.
  struct Shape {
    index_t memory, queries;
  };
  for (const Shape sh : {Shape{65536, 1024}, Shape{1048576, 1024}, Shape{4194304, 256}}) {
    const std::string args = detail::concat('/', sh.memory, '/', sh.queries, '/');
    reg("Select" + args + storage_name<__half>(), BM_Select<__half>, sh.memory, sh.queries, 0, true, false, true);
    reg("Retrieve" + args + storage_name<__half>(), BM_Retrieve<__half>, sh.memory, sh.queries, false);
    reg("SelectUnfiltered" + args + storage_name<__half>(), BM_Select<__half>, sh.memory, sh.queries, 0, false, false, true);
    reg("SelectTC" + args + storage_name<__half>(), BM_Select<__half>, sh.memory, sh.queries, 0, true, true, true);
    reg("SelectTCUnseeded" + args + storage_name<__half>(), BM_Select<__half>, sh.memory, sh.queries, 0, true, true, false);
    reg("RetrieveTC" + args + storage_name<__half>(), BM_Retrieve<__half>, sh.memory, sh.queries, true);
    if (sh.memory == 65536) {
      for (int splits : {1, 2, 4, 8, 16, 32}) {
        reg(detail::concat("SelectSplits", args, storage_name<__half>(), '/', splits), BM_Select<__half>, sh.memory,
            sh.queries, splits, true, false, true);
        reg(detail::concat("SelectTCSplits", args, storage_name<__half>(), '/', splits), BM_Select<__half>, sh.memory,
            sh.queries, splits, true, true, true);
      }
    }
  }
  reg("Select/65536/1024/float", BM_Select<float>, index_t{65536}, index_t{1024}, 0, true, false, true);
  reg("Retrieve/65536/1024/float", BM_Retrieve<float>, index_t{65536}, index_t{1024}, false);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
