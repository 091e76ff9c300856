// Backbone forward on the CPU: tokens/s and GFLOP/s of one segment through
// Gpt2Backbone<float> (GPT-2 and GPT-2* blocks). The PyTorch fp32 peer of the same
// shapes is bench/peers/backbone_torch.py; bench/run_backbone_vs_torch.sh runs both.
//
// FLOPs counted per segment (T tokens, width d, L layers, MLP 4d, vocabulary V):
//   projections 2*T*d*(4d) + MLP 2*T*d*(8d) per layer, causal attention 2*T*(T+1)*d per
//   layer (q.k and p.v over the lower triangle), logits 2*T*d*V.
#include <benchmark/benchmark.h>

#include <longmem/longmem.hpp>

namespace {

double forward_flops(double T, double d, double L, double V) {
  return L * (24.0 * T * d * d + 2.0 * T * (T + 1) * d) + 2.0 * T * d * V;
}

void BM_Gpt2Forward(benchmark::State& state) {
  const int T = static_cast<int>(state.range(0)), d = static_cast<int>(state.range(1));
  const int L = static_cast<int>(state.range(2)), V = static_cast<int>(state.range(3));
  const bool parallel = state.range(4) != 0;
  const int H = d / 64;
  auto cfg = parallel ? longmem::BackboneConfig::gpt2_star(L, d, H, V, T) : longmem::BackboneConfig::gpt2(L, d, H, V, T);
  auto backbone = longmem::Gpt2Backbone<float>::random(cfg, 1, 0.02);
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(T));
  for (int t = 0; t < T; ++t) tokens[static_cast<std::size_t>(t)] = (t * 7919 + 13) % V;
  longmem::BackboneOutput<float> out;
  const longmem::BackboneRequest req{true, false, -1};
  backbone.forward(tokens, req, out);  // warm-up: allocations and first touch
  for (auto _ : state) {
    backbone.forward(tokens, req, out);
    benchmark::DoNotOptimize(out.logits.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * T);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(T), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] = benchmark::Counter(forward_flops(T, d, L, V) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(parallel ? "gpt2-star" : "gpt2");
}

// T, d, L, V, parallel block (GPT-2*): the same list as SHAPES in bench/peers/backbone_torch.py
BENCHMARK(BM_Gpt2Forward)
    ->ArgNames({"T", "d", "L", "V", "star"})
    ->Args({1024, 256, 4, 256, 0})
    ->Args({1024, 256, 4, 256, 1})
    ->Args({1024, 256, 4, 50257, 0})
    ->Args({256, 256, 4, 256, 0})
    ->Args({128, 256, 4, 256, 0})
    ->Args({4096, 256, 4, 256, 0})
    ->Args({1024, 512, 12, 256, 0})
    ->Args({512, 1024, 24, 256, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2.0);

}  // namespace

BENCHMARK_MAIN();
