// Device attention and linear ops (OpsBackend<Device>, cuda/ops.cuh), LongMem shape: 16 heads,
// dh 64, one stream of T tokens unless the name says B8.
//
//   Causal/<T>/<alibi>            ops::causal_attention                          (flash-style kernel, tensor cores)
//   Memory/<T>/<K>/<fusion>       ops::memory_attention<GatedFusion|JointFusion>, K retrieved tokens
//   Linear/<N>/<I>/<O>/<bias>     ops::linear through cuBLASLt, fp32 compute
//   .../tf32, .../bf16            the same under that DeviceMath (cuda/math_mode.hpp)
//
// The issue's shape, B 8 streams x T 1024, 16 heads, dh 64, K 64 retrieved tokens per query and
// head, ALiBi, each stream with its own 65,536-token bank per head (DESIGN.md: one bank per stream):
//
//   Causal/B8/1024/<pos>                        the local causal branch alone, 8 streams (8 calls)
//   CausalSegments/B8/1024/<pos>                the same as one call over the stacked streams (offsets)
//   Memory/B8/1024/64/<fusion>                  memory_attention on mem_k/mem_v (T, H, K, dh) that are
//                                               already gathered: the gather is EXCLUDED here
//   Gather/B8/1024/64/<ids>                     the gather alone: bank (H, 65536, dh) fp32 + ids (T, H, K)
//                                               -> mem_k, mem_v (T, H, K, dh), a bench-local kernel (float4
//                                               copies, one thread per 16 B); the library's own gather is
//                                               fused into FusedChunkRetriever's merge kernel, not an op
//   MemoryGather/B8/1024/64/gated/<ids>         gather + memory_attention<GatedFusion>, gather INCLUDED
//
// <ids>: "uniform" = each (stream, query, head) takes K token ids uniform over the 65,536 bank tokens,
// drawn with replacement (a query may repeat a token, ~3% of queries; timing-wise immaterial);
// "uniform-csz4" = K/4 = 16 chunks uniform over the 16,384 chunks of 4 tokens (what a chunk
// retriever returns: runs of 4 consecutive tokens). Host splitmix64, fixed seeds.
// The ops take one stream's (T, H, dh): the B8 rows loop the 8 streams inside one timed region
// (8 launches back to back on the same stream, no sync between them), which is what the library's
// SideNet does today.
//
// Timing: CUDA events around each call on the stream the ops use (the legacy default stream),
// UseManualTime(); one warm-up call per benchmark. The retrieved memory of Memory/1024/64 is 537 MB
// (mem_k + mem_v) per stream, 4.3 GB at B8, far beyond the L2, so every call reads it from HBM;
// q/k/v (4 MB each per stream) stay in L2 at B 1, which is what a fused layer would see too.
// Counters: TFLOP/s of the attention maths (2 dh per score and per value term: causal 4 H dh T(T+1)/2,
// memory 4 T H K dh, per stream, times B); fp32_floor_ms = those FLOPs at the SMs x 128 FMA/clock
// fp32 peak (dh <= 64 runs the local branch on tensor cores as 3xTF32, three mma per product, so
// this floor is a reference point, not a bound; the memory branch uses FMAs);
// retrieved_MB = bytes of retrieved keys + values read, each distinct byte once: for Memory rows the
// gathered mem_k + mem_v (the kernel reads each once); for Gather and MemoryGather rows the distinct
// bank rows the ids touch (uniform: ~63% of the bank, since T K = the bank size); mem_GB/s =
// retrieved_MB / time; hbm_floor_ms = retrieved bytes at 4.25 TB/s (DESIGN.md's measured H200 copy
// rate; re-measure on the machine at hand). Gather rows also give written_MB (mem_k + mem_v),
// moved_GB/s = (distinct bank bytes + ids + written) / time, and hbm_floor_ms on those moved bytes.
#include <benchmark/benchmark.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "longmem/cuda/math_mode.hpp"
#include "longmem/cuda/ops.cuh"
#include "longmem/cuda/storage.hpp"

#include "bench_gpu_support.cuh"

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
  bench::EventTimer timer;
  for (auto _ : state) {
    timer.start(s);
    f();
    state.SetIterationTime(timer.seconds(s));
  }
}

void set_counters(benchmark::State& state, double flops, double mem_bytes) {
  const DeviceInfo& d = DeviceInfo::get();
  const double iters = static_cast<double>(state.iterations());
  state.counters["TFLOP/s"] = benchmark::Counter(flops * iters * 1e-12, benchmark::Counter::kIsRate);
  state.counters["fp32_floor_ms"] = d.sms > 0 ? flops / (d.sms * 128.0 * 2.0 * d.clock_hz) * 1e3 : 0.0;
  if (mem_bytes > 0) {
    state.counters["retrieved_MB"] = mem_bytes * 1e-6;
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


// ---------------------------------------------------------------------------------------------
// The issue's shape: B 8 streams, T 1024, 16 heads, dh 64, K 64, 65,536-token bank per stream.

constexpr index_t kBatch = 8;
constexpr index_t kBankTokens = 65536;

double causal_flops(index_t T) {
  return 4.0 * kHeads * kHeadDim * static_cast<double>(T) * static_cast<double>(T + 1) / 2.0;
}
double memory_flops(index_t T, index_t K) { return 4.0 * static_cast<double>(T) * kHeads * static_cast<double>(K) * kHeadDim; }

/// Retrieved token ids (T, H, K) of one stream: K / csz chunks per (t, h), uniform over the
/// bank's kBankTokens / csz chunks with replacement, each expanded to its csz consecutive tokens.
/// Adds the number of distinct (head, token) pairs to *distinct.
Tensor<std::int32_t, Device> uniform_ids(index_t T, index_t K, index_t csz, std::uint64_t seed, double* distinct) {
  Tensor<std::int32_t, Host> ids(Shape{T, kHeads, K});
  std::vector<unsigned char> seen(static_cast<std::size_t>(kHeads * kBankTokens), 0);
  const std::uint64_t chunks = static_cast<std::uint64_t>(kBankTokens / csz);
  std::uint64_t state = seed;
  std::int32_t* p = ids.data();
  for (index_t t = 0; t < T; ++t) {
    for (index_t h = 0; h < kHeads; ++h) {
      for (index_t j = 0; j < K / csz; ++j) {
        std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);  // splitmix64
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        const index_t chunk = static_cast<index_t>(z % chunks);
        for (index_t i = 0; i < csz; ++i) {
          const index_t tok = chunk * csz + i;
          *p++ = static_cast<std::int32_t>(tok);
          unsigned char& s = seen[static_cast<std::size_t>(h * kBankTokens + tok)];
          if (!s) {
            s = 1;
            *distinct += 1;
          }
        }
      }
    }
  }
  Tensor<std::int32_t, Device> d(Shape{T, kHeads, K});
  copy(cview(ids), d.view());
  return d;
}

/// mem_k/mem_v (T, H, K, dh) = bank_k/bank_v (H, N, dh)[h, ids[t, h, j]]; dh % 4 == 0, 16-byte aligned.
__global__ void gather_kernel(float4* __restrict__ out_k, float4* __restrict__ out_v, const float4* __restrict__ bank_k,
                              const float4* __restrict__ bank_v, const std::int32_t* __restrict__ ids, index_t rows,
                              int H, int K, index_t N, int dh4) {
  const index_t n = rows * dh4;
  for (index_t e = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t row = e / dh4;
    const int c = static_cast<int>(e % dh4);
    const index_t h = (row / K) % H;
    const index_t src = (h * N + ids[row]) * dh4 + c;
    out_k[e] = __ldg(bank_k + src);
    out_v[e] = __ldg(bank_v + src);
  }
}

/// One stream's buffers at the issue's shape.
struct StreamData {
  Tensor<float, Device> q, k, v, out, mk, mv, bank_k, bank_v;
  Tensor<std::int32_t, Device> ids;
};

/// B streams; with_bank: a (H, N, dh) bank per stream and ids of granularity csz (else mem_k/mem_v
/// are filled directly, as in the B 1 rows). with_memory = false: q/k/v/out only.
std::vector<StreamData> make_streams(index_t T, index_t K, bool with_memory, bool with_bank, index_t csz,
                                     double* distinct) {
  std::vector<StreamData> st(static_cast<std::size_t>(kBatch));
  std::uint64_t seed = 100;
  for (auto& s : st) {
    s.q = random_device(Shape{T, kHeads, kHeadDim}, seed++);
    s.k = random_device(Shape{T, kHeads, kHeadDim}, seed++);
    s.v = random_device(Shape{T, kHeads, kHeadDim}, seed++);
    s.out = Tensor<float, Device>(Shape{T, kHeads, kHeadDim});
    if (!with_memory) continue;
    if (with_bank) {
      s.bank_k = random_device(Shape{kHeads, kBankTokens, kHeadDim}, seed++);
      s.bank_v = random_device(Shape{kHeads, kBankTokens, kHeadDim}, seed++);
      s.ids = uniform_ids(T, K, csz, 0x5eed0000ull + seed++, distinct);
      s.mk = Tensor<float, Device>(Shape{T, kHeads, K, kHeadDim});
      s.mv = Tensor<float, Device>(Shape{T, kHeads, K, kHeadDim});
    } else {
      s.mk = random_device(Shape{T, kHeads, K, kHeadDim}, seed++);
      s.mv = random_device(Shape{T, kHeads, K, kHeadDim}, seed++);
    }
  }
  detail::cuda_check(cudaDeviceSynchronize(), "make_streams", 0);
  return st;
}

void gather(StreamData& s) {
  const index_t rows = s.mk.dim(0) * s.mk.dim(1) * s.mk.dim(2);
  const int dh4 = static_cast<int>(kHeadDim / 4);
  gather_kernel<<<static_cast<unsigned>(8 * std::max(1.0, DeviceInfo::get().sms)), 256, 0, detail::cuda::stream()>>>(
      reinterpret_cast<float4*>(s.mk.data()), reinterpret_cast<float4*>(s.mv.data()),
      reinterpret_cast<const float4*>(s.bank_k.data()), reinterpret_cast<const float4*>(s.bank_v.data()),
      s.ids.data(), rows, static_cast<int>(kHeads), static_cast<int>(s.mk.dim(2)), kBankTokens, dh4);
  detail::cuda_check(cudaGetLastError(), "gather launch", 0);
}

void bm_causal_batch(benchmark::State& state, index_t T, PositionScheme pos) {
  auto st = make_streams(T, 0, false, false, 1, nullptr);
  time_loop(state, [&] {
    for (auto& s : st) ops::causal_attention(s.out.view(), cview(s.q), cview(s.k), cview(s.v), pos);
  });
  set_counters(state, kBatch * causal_flops(T), 0);
}

/// The 8 streams stacked in one (8 T, H, dh) buffer, one causal_attention call with their offsets
/// (one launch of the tensor-core kernel: what the batched backbone and SideNet do).
void bm_causal_segments(benchmark::State& state, index_t T, PositionScheme pos) {
  const index_t N = kBatch * T;
  auto q = random_device(Shape{N, kHeads, kHeadDim}, 11), k = random_device(Shape{N, kHeads, kHeadDim}, 12),
       v = random_device(Shape{N, kHeads, kHeadDim}, 13);
  Tensor<float, Device> out(Shape{N, kHeads, kHeadDim});
  std::vector<index_t> offsets;
  for (index_t b = 0; b <= kBatch; ++b) offsets.push_back(b * T);
  time_loop(state, [&] {
    ops::causal_attention(out.view(), cview(q), cview(k), cview(v), pos, std::span<const index_t>(offsets));
  });
  set_counters(state, kBatch * causal_flops(T), 0);
}

/// Gather excluded: mem_k/mem_v already (T, H, K, dh) per stream.
template <class Fusion>
void bm_memory_batch(benchmark::State& state, index_t T, index_t K) {
  auto st = make_streams(T, K, true, false, 1, nullptr);
  auto gate = random_device(Shape{kHeads}, 6);
  time_loop(state, [&] {
    for (auto& s : st) {
      ops::memory_attention<Fusion>(s.out.view(), cview(s.q), cview(s.k), cview(s.v), cview(s.mk), cview(s.mv),
                                    cview(gate), PositionScheme::Alibi);
    }
  });
  set_counters(state, kBatch * (causal_flops(T) + memory_flops(T, K)),
               static_cast<double>(kBatch) * static_cast<double>(st[0].mk.bytes() + st[0].mv.bytes()));
}

/// The gather alone (ids of granularity csz over each stream's bank).
void bm_gather_batch(benchmark::State& state, index_t T, index_t K, index_t csz) {
  double distinct = 0;
  auto st = make_streams(T, K, true, true, csz, &distinct);
  time_loop(state, [&] {
    for (auto& s : st) gather(s);
  });
  const double row = 2.0 * kHeadDim * sizeof(float);  // one token's key + value
  const double read = distinct * row;
  const double written = static_cast<double>(kBatch) * static_cast<double>(st[0].mk.bytes() + st[0].mv.bytes());
  const double ids = static_cast<double>(kBatch) * static_cast<double>(st[0].ids.bytes());
  const double iters = static_cast<double>(state.iterations());
  state.counters["retrieved_MB"] = read * 1e-6;
  state.counters["written_MB"] = written * 1e-6;
  state.counters["mem_GB/s"] = benchmark::Counter(read * iters * 1e-9, benchmark::Counter::kIsRate);
  state.counters["moved_GB/s"] = benchmark::Counter((read + ids + written) * iters * 1e-9, benchmark::Counter::kIsRate);
  state.counters["hbm_floor_ms"] = (read + ids + written) / 4.25e12 * 1e3;
  state.counters["distinct_frac"] = distinct / (static_cast<double>(kBatch) * kHeads * kBankTokens);
}

/// Gather + gated memory attention in one timed region (gather included).
void bm_memory_gather_batch(benchmark::State& state, index_t T, index_t K, index_t csz) {
  double distinct = 0;
  auto st = make_streams(T, K, true, true, csz, &distinct);
  auto gate = random_device(Shape{kHeads}, 6);
  time_loop(state, [&] {
    for (auto& s : st) {
      gather(s);
      ops::memory_attention<GatedFusion>(s.out.view(), cview(s.q), cview(s.k), cview(s.v), cview(s.mk), cview(s.mv),
                                         cview(gate), PositionScheme::Alibi);
    }
  });
  // Distinct bank bytes: what a layer that reads the bank directly must read at least.
  set_counters(state, kBatch * (causal_flops(T) + memory_flops(T, K)), distinct * 2.0 * kHeadDim * sizeof(float));
  state.counters["distinct_frac"] = distinct / (static_cast<double>(kBatch) * kHeads * kBankTokens);
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
  // The issue's shape: B 8 streams x T 1024, K 64, ALiBi (see the header).
  const auto reg = [](const std::string& name, auto&&... a) {
    benchmark::RegisterBenchmark(name.c_str(), a...)->Unit(benchmark::kMillisecond)->UseManualTime();
  };
  reg("Causal/B8/1024/learned", bm_causal_batch, index_t{1024}, PositionScheme::Learned);
  reg("Causal/B8/1024/alibi", bm_causal_batch, index_t{1024}, PositionScheme::Alibi);
  reg("CausalSegments/B8/1024/learned", bm_causal_segments, index_t{1024}, PositionScheme::Learned);
  reg("CausalSegments/B8/1024/alibi", bm_causal_segments, index_t{1024}, PositionScheme::Alibi);
  reg("Memory/B8/1024/64/gated", bm_memory_batch<GatedFusion>, index_t{1024}, index_t{64});
  reg("Memory/B8/1024/64/joint", bm_memory_batch<JointFusion>, index_t{1024}, index_t{64});
  reg("Gather/B8/1024/64/uniform", bm_gather_batch, index_t{1024}, index_t{64}, index_t{1});
  reg("Gather/B8/1024/64/uniform-csz4", bm_gather_batch, index_t{1024}, index_t{64}, index_t{4});
  reg("MemoryGather/B8/1024/64/gated/uniform", bm_memory_gather_batch, index_t{1024}, index_t{64}, index_t{1});
  reg("MemoryGather/B8/1024/64/gated/uniform-csz4", bm_memory_gather_batch, index_t{1024}, index_t{64}, index_t{4});
  // The SideNet's projections at the paper width for one 1024-token segment and a batch of 8.
  for (index_t N : {1024, 8192}) {
    for (auto [I, O] : {std::pair<index_t, index_t>{1024, 1024}, {1024, 4096}, {4096, 1024}}) {
      const std::string name = "Linear/" + std::to_string(N) + "/" + std::to_string(I) + "/" + std::to_string(O) + "/bias";
      benchmark::RegisterBenchmark(name.c_str(), bm_linear, N, I, O, true)->Unit(benchmark::kMillisecond)->UseManualTime();
    }
  }
  // The reduced-precision device maths (cuda/math_mode.hpp) on the same shapes: attention runs
  // 1xTF32 under tf32 and bf16 alike, the GEMMs COMPUTE_32F_FAST_TF32 / _FAST_16BF.
  reg("Causal/B8/1024/alibi/tf32", [](benchmark::State& st) {
    const DeviceMathScope math(DeviceMath::tf32);
    bm_causal_batch(st, 1024, PositionScheme::Alibi);
  });
  reg("CausalSegments/B8/1024/alibi/tf32", [](benchmark::State& st) {
    const DeviceMathScope math(DeviceMath::tf32);
    bm_causal_segments(st, 1024, PositionScheme::Alibi);
  });
  for (DeviceMath m : {DeviceMath::tf32, DeviceMath::bf16}) {
    for (auto [I, O] : {std::pair<index_t, index_t>{1024, 1024}, {1024, 4096}, {4096, 1024}}) {
      const std::string name = "Linear/8192/" + std::to_string(I) + "/" + std::to_string(O) + "/bias/" + to_string(m);
      reg(name, [m, I = I, O = O](benchmark::State& st) {
        const DeviceMathScope math(m);
        bm_linear(st, 8192, I, O, true);
      });
    }
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
