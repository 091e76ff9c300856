// The whole LongMem forward on the CPU (issue 9): backbone + SideNet + retrieval + memory
// attention of one segment per stream, as longmem::Model runs it. The user-style PyTorch peer of
// the same forward is bench/peers/longmem_torch.py; bench/run_longmem_vs_torch.sh runs both.
//
// Model: longmem::Model<Gpt2Backbone<float>, HostMemoryBank<float>, ExactChunkRetriever> (GatedFusion)
//   backbone  GPT-2* (parallel blocks, ALiBi, bias-free q/k/v/out), d 512, 8 heads (dh 64),
//             8 layers, MLP 2048, vocabulary 256, window T 512; Gpt2Backbone<float>::random (seed 1)
//   SideNet   SideNet::from_backbone (reduction factor 2: 4 layers), memory layer m = 4 (SideNet
//             layer 2 is memory-augmented), every gate set to 0.5 (sigmoid 0.62: memory matters)
//   memory    16384 tokens per stream (4096 chunks of csz 4), K 64 retrieved tokens (16 chunks)
//
// Before timing, every stream's bank is filled to 16384 tokens with the layer-4 keys/values of 32
// random 512-token segments through the same backbone (computed once, stream b gets them rotated
// by b so the banks differ). The memory is read-only while timing (set_remember(false)): the bank
// stays full and identical every iteration, every query retrieves 16 chunks (checked).
//
// Timed: one model.forward(segments) of one fixed random 512-token segment per stream (logits
// (512, 256) per stream), for
//   streams 1      per-stream path
//   streams 8      one call with 8 segments, per stream (set_batched_streams(false), the host
//                  default) and batched (set_batched_streams(true): one backbone and one SideNet
//                  pass over all 4096 rows)
// each with the memory on and off (memory:0: set_memory_enabled(false), the MemoryConfig
// enabled=false path: every SideNet layer plain causal attention, no retrieval).
// Counter tokens/s = streams * 512 per forward over wall time; the CPU column is the CPU time of
// all threads of the process (MeasureProcessCPUTime), like the peer's cpu_ms.
//
// --export_check=DIR (instead of benchmarking) writes a small model, its inputs and our logits for
// the peer's correctness check (bench/peers/longmem_torch.py --check DIR): see export_check().
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <longmem/longmem.hpp>

namespace {

using namespace longmem;
using LongMem = Model<Gpt2Backbone<float>, HostMemoryBank<float>, ExactChunkRetriever>;

constexpr int kD = 512, kHeads = 8, kLayers = 8, kVocab = 256, kT = 512;
constexpr int kMemoryLayer = 4, kReduction = 2;
constexpr int kMemoryTokens = 16384, kChunk = 4, kRetrieved = 64;
constexpr int kFillSegments = kMemoryTokens / kT;  // 32
constexpr int kMaxStreams = 8;

std::vector<std::int32_t> random_tokens(std::mt19937_64& rng, std::size_t n, int vocab) {
  std::uniform_int_distribution<int> u(0, vocab - 1);
  std::vector<std::int32_t> t(n);
  for (auto& x : t) x = u(rng);
  return t;
}

Tensor<float, Host> clone(TensorView<const float, Host> t) {
  Tensor<float, Host> c(t.shape());
  copy(t, c.view());
  return c;
}

/// Every gate of the memory-augmented layer set to `g`.
void set_gates(SideNet<float>& sn, float g) {
  fill(sn.layer(sn.config().memory_augmented_layer()).gate.view(), g);
}

struct Setup {
  std::unique_ptr<LongMem> model;
  std::vector<std::vector<std::int32_t>> segments;  // the timed segment of each stream
};

// One model kept at a time (the 8-stream one holds 0.5 GB of banks); the filler keys/values of
// the 32 segments are computed once and shared by both models.
Setup& setup(int streams) {
  static int built = -1;
  static Setup s;
  static std::vector<Tensor<float, Host>> fill_k, fill_v;  // 32 x (512, H, dh)
  if (built == streams) return s;
  s = Setup{};
  const auto cfg = BackboneConfig::gpt2_star(kLayers, kD, kHeads, kVocab, kT);
  auto backbone = Gpt2Backbone<float>::random(cfg, 1, 0.02);
  auto side_net = SideNet<float>::from_backbone(backbone, kMemoryLayer, kReduction);
  set_gates(side_net, 0.5f);
  MemoryConfig mem;
  mem.memory_tokens = kMemoryTokens;
  mem.chunk_size = kChunk;
  mem.retrieved_tokens = kRetrieved;
  s.model = std::make_unique<LongMem>(std::move(backbone), std::move(side_net), mem, streams);
  std::mt19937_64 rng(42);
  if (fill_k.empty()) {
    const BackboneRequest req{false, false, kMemoryLayer};
    BackboneOutput<float> out;
    for (int i = 0; i < kFillSegments; ++i) {
      const auto tokens = random_tokens(rng, kT, kVocab);
      s.model->backbone().forward(tokens, req, out);
      fill_k.push_back(clone(cview(out.mem_keys)));
      fill_v.push_back(clone(cview(out.mem_values)));
    }
  }
  for (int b = 0; b < streams; ++b) {
    for (int i = 0; i < kFillSegments; ++i) {
      const auto j = static_cast<std::size_t>((i + b) % kFillSegments);
      s.model->bank(b).append(cview(fill_k[j]), cview(fill_v[j]));
    }
  }
  std::mt19937_64 seg_rng(7);
  for (int b = 0; b < streams; ++b) s.segments.push_back(random_tokens(seg_rng, kT, kVocab));
  s.model->set_remember(false);
  built = streams;
  return s;
}

void BM_LongMemForward(benchmark::State& state) {
  const int streams = static_cast<int>(state.range(0));
  const bool batched = state.range(1) != 0, memory = state.range(2) != 0;
  Setup& s = setup(streams);
  LongMem& model = *s.model;
  model.set_batched_streams(batched);
  model.set_memory_enabled(memory);
  std::vector<std::span<const std::int32_t>> segs(s.segments.begin(), s.segments.end());
  for (int b = 0; b < streams; ++b) {
    if (model.bank(b).size_tokens() != kMemoryTokens) {
      state.SkipWithError("a bank is not full");
      return;
    }
  }
  const auto& warm = model.forward(segs);  // warm-up: workspaces and first touch
  for (int b = 0; b < streams; ++b) {
    if (warm.retrieved_chunks[static_cast<std::size_t>(b)] != (memory ? kRetrieved / kChunk : 0)) {
      state.SkipWithError("unexpected number of retrieved chunks");
      return;
    }
  }
  for (auto _ : state) {
    const auto& r = model.forward(segs);
    benchmark::DoNotOptimize(r.logits.back().data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * streams * kT);
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(streams) * kT, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(std::string(memory ? "memory 16Ki" : "memory off") + (streams > 1 ? (batched ? ", batched" : ", per stream") : ""));
}

// streams, batched, memory: the peer (bench/peers/longmem_torch.py) prints streams 1 and 8, memory on and off.
BENCHMARK(BM_LongMemForward)
    ->ArgNames({"streams", "batched", "memory"})
    ->Args({1, 0, 1})
    ->Args({1, 0, 0})
    ->Args({kMaxStreams, 0, 1})
    ->Args({kMaxStreams, 1, 1})
    ->Args({kMaxStreams, 0, 0})
    ->Args({kMaxStreams, 1, 0})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MeasureProcessCPUTime()
    ->MinTime(2.0);

// The peer's correctness check: a small model of the same kind (GPT-2* d 128, 4 heads (dh 32),
// 4 layers, V 256, T 64; SideNet of 2 layers, memory layer 2 (SideNet layer 1); 256-token memory,
// csz 4, K 16 (4 chunks)), 2 streams of 6 segments each. The SideNet comes from a second random
// backbone (seed 2, so its weights differ from the backbone's) and its gates are random in
// [-1, 2]. Writes to DIR:
//   backbone.safetensors, sidenet.safetensors   (the library's own writers)
//   check.safetensors:
//     tokens           (B, S*T) I32   the streams
//     logits_memory    (B, S*T, V)    every segment, memory on (remember on: segment 4 sees a
//                                     full bank, segment 5 one that has evicted segment 0), per stream
//     logits_batched   (B, S*T, V)    the same through set_batched_streams(true)
//     logits_nomemory  (B, T, V)      the last segment with the memory off
//     retrieved_slots  (B, T, H, k')  bank slots retrieved for the last segment (batched model)
//   metadata: segment_length, num_segments, streams, memory_tokens, chunk_size, retrieved_tokens
int export_check(const std::filesystem::path& dir) {
  constexpr int d = 128, H = 4, L = 4, V = 256, T = 64, m = 2, B = 2, S = 6;
  MemoryConfig mem;
  mem.memory_tokens = 256;
  mem.chunk_size = 4;
  mem.retrieved_tokens = 16;
  const auto cfg = BackboneConfig::gpt2_star(L, d, H, V, T);
  std::filesystem::create_directories(dir);
  auto make = [&] {
    auto backbone = Gpt2Backbone<float>::random(cfg, 1, 0.05);
    auto side_net = SideNet<float>::from_backbone(Gpt2Backbone<float>::random(cfg, 2, 0.05), m, kReduction);
    auto& gate = side_net.layer(side_net.config().memory_augmented_layer()).gate;
    std::mt19937_64 rng(3);
    std::uniform_real_distribution<float> u(-1.0f, 2.0f);
    for (float& g : gate) g = u(rng);
    return LongMem(std::move(backbone), std::move(side_net), mem, B, {}, /*allow_other_backbone=*/true);
  };
  LongMem per_stream = make(), batched = make();
  batched.set_batched_streams(true);
  per_stream.backbone().save(dir / "backbone.safetensors");
  per_stream.side_net().save(dir / "sidenet.safetensors", mem);

  std::mt19937_64 rng(11);
  Tensor<std::int32_t, Host> tokens({B, S * T});
  for (int b = 0; b < B; ++b) {
    const auto t = random_tokens(rng, S * T, V);
    std::copy(t.begin(), t.end(), tokens[b].data());
  }
  Tensor<float, Host> with_memory({B, S * T, V}), with_batched({B, S * T, V}), without({B, T, V});
  Tensor<std::int32_t, Host> slots;
  auto segments = [&](int s) {
    std::vector<std::span<const std::int32_t>> segs;
    for (int b = 0; b < B; ++b) segs.emplace_back(tokens[b].data() + s * T, static_cast<std::size_t>(T));
    return segs;
  };
  for (int s = 0; s < S; ++s) {
    const auto segs = segments(s);
    for (auto* pair : {&per_stream, &batched}) {
      const auto& out = pair->forward(segs);
      Tensor<float, Host>& dst = pair == &per_stream ? with_memory : with_batched;
      for (int b = 0; b < B; ++b) {
        copy(cview(out.logits[static_cast<std::size_t>(b)]), dst[b].slice(static_cast<index_t>(s) * T, (s + 1) * T));
      }
    }
  }
  const Retrieved<float>& r0 = batched.retrieval(0);
  slots.resize({B, T, H, r0.chunks});
  for (int b = 0; b < B; ++b) copy(cview(batched.retrieval(b).slots), slots[b]);
  per_stream.set_memory_enabled(false);
  const auto& off = per_stream.forward(segments(S - 1));
  for (int b = 0; b < B; ++b) copy(cview(off.logits[static_cast<std::size_t>(b)]), without[b]);

  SafetensorsWriter w;
  w.set_metadata("segment_length", std::to_string(T));
  w.set_metadata("num_segments", std::to_string(S));
  w.set_metadata("streams", std::to_string(B));
  w.set_metadata("memory_tokens", std::to_string(mem.memory_tokens));
  w.set_metadata("chunk_size", std::to_string(mem.chunk_size));
  w.set_metadata("retrieved_tokens", std::to_string(mem.retrieved_tokens));
  w.add<std::int32_t>("tokens", cview(tokens));
  w.add<float>("logits_memory", cview(with_memory));
  w.add<float>("logits_batched", cview(with_batched));
  w.add<float>("logits_nomemory", cview(without));
  w.add<std::int32_t>("retrieved_slots", cview(slots));
  w.write(dir / "check.safetensors");
  std::printf("wrote %s/{backbone,sidenet,check}.safetensors\n", dir.string().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  constexpr std::string_view flag = "--export_check=";
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a.substr(0, flag.size()) == flag) return export_check(std::filesystem::path(std::string(a.substr(flag.size()))));
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("omp_threads", std::to_string(detail::omp_threads()));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
