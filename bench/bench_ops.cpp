// Where the backbone's time goes: each op of one GPT-2 block, alone, at the block's shapes
// (N rows, width d, heads of 64, MLP 4d), on the host backend. The PyTorch peer of the same ops
// is bench/peers/ops_torch.py. Summing an op's time over a block's calls (q, k, v, out: linear
// d->d four times; fc_in d->4d; fc_out 4d->d; two LayerNorms; GELU; attention) gives the block,
// which the whole-forward benchmark (bench_backbone) then checks.
#include <benchmark/benchmark.h>

#include <longmem/longmem.hpp>

#include "bench_support.hpp"

namespace {

using longmem::Host;
using longmem::index_t;
using longmem::Tensor;

Tensor<float, Host> filled(longmem::Shape s, std::uint64_t seed) {
  Tensor<float, Host> t(s);
  longmem::bench::Random r{seed * 0x9E3779B97F4A7C15ull + 1};
  for (index_t i = 0; i < t.numel(); ++i) t.data()[i] = r.next();
  return t;
}

void set_counters(benchmark::State& state, double flops) {
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// Y (N, O) = X (N, I) W (O, I)^T + b
void BM_Linear(benchmark::State& state) {
  const index_t N = state.range(0), I = state.range(1), O = state.range(2);
  auto x = filled({N, I}, 1), w = filled({O, I}, 2), b = filled({O}, 3);
  Tensor<float, Host> y({N, O});
  for (auto _ : state) {
    longmem::ops::linear(y.view(), x, w, b);
    benchmark::DoNotOptimize(y.data());
  }
  set_counters(state, 2.0 * N * I * O);
}

void BM_LayerNorm(benchmark::State& state) {
  const index_t N = state.range(0), d = state.range(1);
  auto x = filled({N, d}, 1), g = filled({d}, 2), b = filled({d}, 3);
  Tensor<float, Host> y({N, d});
  for (auto _ : state) {
    longmem::ops::layer_norm(y.view(), x, g, b, 1e-5);
    benchmark::DoNotOptimize(y.data());
  }
}

void BM_Gelu(benchmark::State& state) {
  const index_t N = state.range(0), C = state.range(1);
  auto x = filled({N, C}, 1);
  Tensor<float, Host> y({N, C});
  for (auto _ : state) {
    longmem::ops::gelu(y.view(), x, longmem::Activation::GeluTanh);
    benchmark::DoNotOptimize(y.data());
  }
}

// causal attention over one segment of N tokens, H heads of 64; range(2): 1 = ALiBi
void BM_CausalAttention(benchmark::State& state) {
  const index_t N = state.range(0), d = state.range(1), H = d / 64;
  auto q = filled({N, H, 64}, 1), k = filled({N, H, 64}, 2), v = filled({N, H, 64}, 3);
  Tensor<float, Host> o({N, H, 64});
  const auto pos = state.range(2) ? longmem::PositionScheme::Alibi : longmem::PositionScheme::Learned;
  for (auto _ : state) {
    longmem::ops::causal_attention(o.view(), q, k, v, pos);
    benchmark::DoNotOptimize(o.data());
  }
  set_counters(state, 2.0 * static_cast<double>(N) * static_cast<double>(N + 1) * static_cast<double>(d));
  state.SetLabel(state.range(2) ? "alibi" : "causal");
}

void shapes_linear(benchmark::internal::Benchmark* b) {
  for (index_t N : {256, 1024}) {
    for (index_t d : {256, 512}) {
      b->Args({N, d, d})->Args({N, d, 3 * d})->Args({N, d, 4 * d})->Args({N, 4 * d, d});
    }
  }
}

BENCHMARK(BM_Linear)->ArgNames({"N", "I", "O"})->Apply(shapes_linear)->Unit(benchmark::kMicrosecond)->UseRealTime()->MinTime(0.3);
BENCHMARK(BM_LayerNorm)->ArgNames({"N", "d"})->Args({256, 256})->Args({1024, 256})->Args({1024, 512})->Unit(benchmark::kMicrosecond)->UseRealTime()->MinTime(0.3);
BENCHMARK(BM_Gelu)->ArgNames({"N", "C"})->Args({256, 1024})->Args({1024, 1024})->Args({1024, 2048})->Unit(benchmark::kMicrosecond)->UseRealTime()->MinTime(0.3);
BENCHMARK(BM_CausalAttention)
    ->ArgNames({"N", "d", "alibi"})
    ->Args({256, 256, 0})->Args({256, 256, 1})->Args({1024, 256, 0})->Args({1024, 256, 1})->Args({1024, 512, 0})
    ->Unit(benchmark::kMicrosecond)->UseRealTime()->MinTime(0.3);

}  // namespace

BENCHMARK_MAIN();
