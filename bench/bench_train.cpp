// Training on the CPU: one update (forward, backward, AdamW) of memory-augmented adaptation and
// of from-scratch backbone training, in tokens/s, beside the same step in PyTorch
// (bench/peers/train_torch.py, same shapes and defaults); and the backward ops on their own.
//
//   BM_AdaptationStep  GPT-2* backbone (L layers, d, d/32 heads, V 256) frozen; SideNet L/2 layers;
//                      B streams x T tokens; every bank full (msz tokens, csz 4, K 64) before timing
//   BM_PretrainStep    the same backbone trained from scratch, B x T tokens per update
//   BM_*Backward       one backward op at a training shape
#include <benchmark/benchmark.h>

#include <vector>

#include <longmem/train.hpp>

#include "bench_support.hpp"
#include "bench_train_support.hpp"

namespace {

using namespace longmem;

void BM_AdaptationStep(benchmark::State& state) {
  const int T = static_cast<int>(state.range(0)), d = static_cast<int>(state.range(1));
  const int L = static_cast<int>(state.range(2)), B = static_cast<int>(state.range(3));
  const int msz = static_cast<int>(state.range(4));
  const auto cfg = BackboneConfig::gpt2_star(L, d, d / 32, 256, T);
  auto backbone = initial_backbone<float>(cfg, 1);
  auto side_net = SideNet<float>::from_backbone(backbone, L / 2);
  MemoryConfig mem;
  mem.memory_tokens = msz;
  mem.chunk_size = 4;
  mem.retrieved_tokens = 64;
  SideNetAdaptation<HostMemoryBank<float>, ExactChunkRetriever> task(std::move(backbone), std::move(side_net), mem, B);
  // Documents long enough that no stream reaches a document boundary while timing.
  const auto docs = bench::random_corpus(B, static_cast<std::size_t>(msz + 400 * T), 256);
  DocumentStreams fill(docs, B, T);
  for (int s = 0; s < msz / T; ++s) task.memorize(fill.next());
  Trainer<decltype(task)> trainer(task, docs, {}, bench::train_config(T));
  trainer.restore_data(fill.state());  // continue the streams where the memory ends
  trainer.step();               // warm-up: allocations
  for (auto _ : state) benchmark::DoNotOptimize(trainer.step().loss);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(B) * T, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel("memory full: " + std::to_string(task.bank(0).size_tokens()) + " tokens/stream");
}

void BM_PretrainStep(benchmark::State& state) {
  const int T = static_cast<int>(state.range(0)), d = static_cast<int>(state.range(1));
  const int L = static_cast<int>(state.range(2)), B = static_cast<int>(state.range(3));
  const auto cfg = BackboneConfig::gpt2_star(L, d, d / 32, 256, T);
  BackbonePretraining<float> task(initial_backbone<float>(cfg, 1), B);
  const auto docs = bench::random_corpus(B, static_cast<std::size_t>(400 * T), 256);
  Trainer<decltype(task)> trainer(task, docs, {}, bench::train_config(T));
  trainer.step();
  for (auto _ : state) benchmark::DoNotOptimize(trainer.step().loss);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(B) * T, benchmark::Counter::kIsIterationInvariantRate);
}

// T, d, L, B, memory tokens per stream: the PyTorch peer's default shape, and the demo's scale
BENCHMARK(BM_AdaptationStep)->ArgNames({"T", "d", "L", "B", "msz"})->Args({256, 256, 4, 8, 16384})
    ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(3.0);
BENCHMARK(BM_PretrainStep)->ArgNames({"T", "d", "L", "B"})->Args({256, 256, 4, 8})
    ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(3.0);

template <class F>
void time_op(benchmark::State& state, double flops, F&& f) {
  f();
  for (auto _ : state) {
    f();
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

Tensor<float, Host> random_tensor(Shape s, std::uint64_t seed) {
  Tensor<float, Host> t(s);
  bench::Random r{seed};
  for (float& x : t) x = r.next();
  return t;
}

void BM_LinearBackward(benchmark::State& state) {
  const index_t N = state.range(0), I = state.range(1), O = state.range(2);
  auto x = random_tensor({N, I}, 1), w = random_tensor({O, I}, 2), g = random_tensor({N, O}, 3);
  Tensor<float, Host> dx({N, I}), dw({O, I}), db({O});
  time_op(state, 4.0 * N * I * O, [&] { ops::linear_backward(dx.view(), dw.view(), db.view(), cview(g), cview(x), cview(w)); });
}

void BM_CausalAttentionBackward(benchmark::State& state) {
  const index_t T = state.range(0), H = state.range(1), dh = 64;
  auto q = random_tensor({T, H, dh}, 1), k = random_tensor({T, H, dh}, 2), v = random_tensor({T, H, dh}, 3);
  auto g = random_tensor({T, H, dh}, 4);
  Tensor<float, Host> dq({T, H, dh}), dk({T, H, dh}), dv({T, H, dh});
  // recompute (2 GEMMs over the lower triangle) + 5 backward GEMMs
  time_op(state, 7.0 * T * (T + 1) * H * dh, [&] {
    ops::causal_attention_backward(dq.view(), dk.view(), dv.view(), cview(g), cview(q), cview(k), cview(v), PositionScheme::Alibi);
  });
}

void BM_MemoryAttentionBackward(benchmark::State& state) {
  const index_t T = state.range(0), H = state.range(1), K = state.range(2), dh = 64;
  auto q = random_tensor({T, H, dh}, 1), k = random_tensor({T, H, dh}, 2), v = random_tensor({T, H, dh}, 3);
  auto mk = random_tensor({T, H, K, dh}, 4), mv = random_tensor({T, H, K, dh}, 5), g = random_tensor({T, H, dh}, 6);
  auto gate = random_tensor({H}, 7);
  Tensor<float, Host> dq({T, H, dh}), dk({T, H, dh}), dv({T, H, dh}), dgate({H});
  time_op(state, 7.0 * T * (T + 1) * H * dh + 8.0 * T * H * K * dh, [&] {
    ops::memory_attention_backward<GatedFusion>(dq.view(), dk.view(), dv.view(), dgate.view(), cview(g), cview(q), cview(k),
                                                cview(v), cview(mk), cview(mv), cview(gate), PositionScheme::Alibi);
  });
}

void BM_LayerNormBackward(benchmark::State& state) {
  const index_t N = state.range(0), C = state.range(1);
  auto x = random_tensor({N, C}, 1), w = random_tensor({C}, 2), g = random_tensor({N, C}, 3);
  Tensor<float, Host> dx({N, C}), dw({C}), db({C});
  time_op(state, 10.0 * N * C, [&] {
    ops::layer_norm_backward(dx.view(), dw.view(), db.view(), cview(g), cview(x), cview(w), 1e-5);
  });
}

BENCHMARK(BM_LinearBackward)->ArgNames({"N", "I", "O"})->Args({2048, 256, 768})->Args({2048, 1024, 256})->UseRealTime();
BENCHMARK(BM_CausalAttentionBackward)->ArgNames({"T", "H"})->Args({256, 8})->Args({1024, 16})->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_MemoryAttentionBackward)->ArgNames({"T", "H", "K"})->Args({256, 8, 64})->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LayerNormBackward)->ArgNames({"N", "C"})->Args({2048, 256})->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
