// Memory-augmented attention on the CPU, LongMem shape: 16 heads, dh 64, float, ALiBi.
//
//   Gated/<T>/<K>    ops::memory_attention<GatedFusion>: causal A, memory M, per-head gate
//   Joint/<T>/<K>    ops::memory_attention<JointFusion>: one softmax over local and memory scores
//   Causal/<T>       ops::causal_attention (the K = 0 path of the two above)
//   RawGemms/<T>     raw baseline: per head, the full (not causal) Q K^T and S V Eigen GEMMs,
//                    threaded over heads, no softmax: the GEMM rate the kernel could reach
//
// Counters (rates over wall time; the work is threaded with OpenMP):
//   GFLOP/s  local causal part 2*2*T^2/2*H*dh plus memory part 2*2*T*K*H*dh
//            (RawGemms: 2*2*T^2*H*dh, it computes the full square)
//   GB/s     bytes of q, k, v, mem_k, mem_v read once and out written once
// mem_k and mem_v are (T, H, K, dh): 268 MB each at T 1024, K 64, far beyond any cache.
// The PyTorch peer of the same computation is bench/peers/memory_attention_torch.py.
#include <benchmark/benchmark.h>

#include "bench_support.hpp"

#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <utility>

#include "longmem/cpu/ops.hpp"

namespace {

using namespace longmem;

constexpr index_t kHeads = 16;
constexpr index_t kHeadDim = 64;

using longmem::bench::Random;

struct Problem {
  Tensor<float, Host> q, k, v;    // (T, H, dh)
  Tensor<float, Host> mem_k, mem_v;  // (T, H, K, dh)
  Tensor<float, Host> gate;       // (H)
  Tensor<float, Host> out;        // (T, H, dh)
};

// One problem kept at a time: the largest takes 0.5 GB.
Problem& problem(index_t T, index_t K) {
  static std::pair<index_t, index_t> key{-1, -1};
  static std::unique_ptr<Problem> p;
  if (p && key == std::pair{T, K}) return *p;
  p.reset();
  p = std::make_unique<Problem>();
  key = {T, K};
  Random rng{0x9e3779b97f4a7c15ull ^ static_cast<std::uint64_t>(T * 1000 + K)};
  auto filled = [&](Shape s, float scale) {
    Tensor<float, Host> t(s);
    for (float& x : t) x = scale * rng.next();
    return t;
  };
  p->q = filled({T, kHeads, kHeadDim}, 3.0f);  // scores of a few units, like trained models
  p->k = filled({T, kHeads, kHeadDim}, 1.0f);
  p->v = filled({T, kHeads, kHeadDim}, 1.0f);
  p->mem_k = filled({T, kHeads, K, kHeadDim}, 1.0f);
  p->mem_v = filled({T, kHeads, K, kHeadDim}, 1.0f);
  p->gate = filled({kHeads}, 1.0f);
  p->out = Tensor<float, Host>({T, kHeads, kHeadDim});
  return *p;
}

void set_counters(benchmark::State& state, index_t T, index_t K, double local_flops) {
  const double H = kHeads, dh = kHeadDim;
  const double flops = local_flops + 2.0 * 2.0 * T * K * H * dh;
  const double bytes = sizeof(float) * (3.0 * T * H * dh + 2.0 * T * H * K * dh + T * H * dh);
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

double causal_flops(index_t T) { return 2.0 * 2.0 * T * T / 2.0 * kHeads * kHeadDim; }

template <class Fusion>
void BM_MemoryAttention(benchmark::State& state) {
  const index_t T = state.range(0), K = state.range(1);
  Problem& p = problem(T, K);
  for (auto _ : state) {
    ops::memory_attention<Fusion>(p.out.view(), cview(p.q), cview(p.k), cview(p.v), cview(p.mem_k), cview(p.mem_v),
                                  cview(p.gate), PositionScheme::Alibi);
    benchmark::DoNotOptimize(p.out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, K, causal_flops(T));
}

void BM_Causal(benchmark::State& state) {
  const index_t T = state.range(0);
  Problem& p = problem(T, 0);
  for (auto _ : state) {
    ops::causal_attention(p.out.view(), cview(p.q), cview(p.k), cview(p.v), PositionScheme::Alibi);
    benchmark::DoNotOptimize(p.out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, 0, causal_flops(T));
}

void BM_RawGemms(benchmark::State& state) {
  using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Map = Eigen::Map<const RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;
  using OutMap = Eigen::Map<RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;
  const index_t T = state.range(0), ld = kHeads * kHeadDim;
  Problem& p = problem(T, 0);
  Tensor<float, Host> scores({kHeads, T, T});  // (H, T, T)
  for (auto _ : state) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
#endif
    for (index_t h = 0; h < kHeads; ++h) {
      Map Q(p.q.data() + h * kHeadDim, T, kHeadDim, Eigen::OuterStride<>(ld));
      Map Kh(p.k.data() + h * kHeadDim, T, kHeadDim, Eigen::OuterStride<>(ld));
      Map Vh(p.v.data() + h * kHeadDim, T, kHeadDim, Eigen::OuterStride<>(ld));
      OutMap S(scores.data() + h * T * T, T, T, Eigen::OuterStride<>(T));
      OutMap O(p.out.data() + h * kHeadDim, T, kHeadDim, Eigen::OuterStride<>(ld));
      S.noalias() = Q * Kh.transpose();
      O.noalias() = S * Vh;
    }
    benchmark::DoNotOptimize(p.out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, T, 0, 2.0 * causal_flops(T));
}

}  // namespace

BENCHMARK_TEMPLATE(BM_MemoryAttention, GatedFusion)
    ->Name("Gated")
    ->ArgNames({"T", "K"})
    ->ArgsProduct({{256, 1024}, {0, 16, 64}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_MemoryAttention, JointFusion)
    ->Name("Joint")
    ->ArgNames({"T", "K"})
    ->ArgsProduct({{256, 1024}, {16, 64}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Causal)->Name("Causal")->ArgName("T")->Arg(256)->Arg(1024)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_RawGemms)->Name("RawGemms")->ArgName("T")->Arg(256)->Arg(1024)->UseRealTime()->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
