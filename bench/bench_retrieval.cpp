// Exact chunk retrieval on the CPU, LongMem shape: 16 heads, dh 64, 1,024 queries.
//
//   Retrieve/<memory tokens>/<csz>/<K>   ExactChunkRetriever::retrieve: scores + top-k + gather
//   Select/...                           scores + top-k only (no gather)
//   ScoresOnly/...                       raw baseline: the same tiled Eigen GEMMs, no top-k
//   Faiss/...                            the peer: one faiss::IndexFlatIP per head over the same
//                                        chunk keys, search() of the same queries for K/csz chunks
//                                        (only with LONGMEM_HAVE_FAISS)
//
// Banks store half (the reference implementation keeps its memory in fp16); outputs are float.
// Counters: GFLOP/s of the score GEMM (2 T H n dh per call), GB/s of chunk keys read
// (H n dh floats per call, once), items/s = queries. Wall time: the work is multi-threaded.
// OpenMP threads (ours and faiss's, and OpenBLAS's when faiss uses it) = the machine's cores
// unless OMP_NUM_THREADS says otherwise.
#include <benchmark/benchmark.h>

#include "bench_support.hpp"

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "longmem/cpu/exact_chunk_retriever.hpp"
#include "longmem/cpu/host_memory_bank.hpp"

#if defined(LONGMEM_HAVE_FAISS)
#include <faiss/IndexFlat.h>
#endif

namespace {

using namespace longmem;

constexpr int kHeads = 16;
constexpr int kHeadDim = 64;
constexpr index_t kQueries = 1024;
constexpr index_t kSegment = 1024;  // tokens per append while filling a bank

using longmem::bench::Random;

// One bank (and its faiss copy) at a time: a 1 Mi-token half bank takes 4 GiB plus 1 GiB of chunk keys.
struct Setup {
  index_t memory = 0;
  int csz = 0;
  std::unique_ptr<HostMemoryBank<half>> bank;
  Tensor<float, Host> queries;  // (T, H, dh)
#if defined(LONGMEM_HAVE_FAISS)
  std::vector<std::unique_ptr<faiss::IndexFlatIP>> index;  // per head, over the chunk keys
  std::vector<std::vector<float>> head_queries;            // per head, (T, dh) contiguous
#endif
};

Setup& setup(index_t memory, int csz) {
  static Setup s;
  if (s.bank && s.memory == memory && s.csz == csz) return s;
  s = Setup{};
  s.memory = memory;
  s.csz = csz;
  const MemoryGeometry g{kHeads, kHeadDim, csz, memory / csz};
  s.bank = std::make_unique<HostMemoryBank<half>>(g);
  Random rng{0x9e3779b97f4a7c15ull ^ static_cast<std::uint64_t>(memory * 8 + csz)};
  Tensor<float, Host> k({kSegment, kHeads, kHeadDim}), v({kSegment, kHeads, kHeadDim});
  for (index_t filled = 0; filled < memory; filled += kSegment) {
    for (float& x : k) x = rng.next();
    for (float& x : v) x = rng.next();
    s.bank->append(k, v);
  }
  s.queries.resize({kQueries, kHeads, kHeadDim});
  for (float& x : s.queries) x = rng.next();
#if defined(LONGMEM_HAVE_FAISS)
  const index_t n = s.bank->num_chunks();
  const float* ck = s.bank->chunk_keys().data();  // (H, C, dh)
  for (int h = 0; h < kHeads; ++h) {
    auto idx = std::make_unique<faiss::IndexFlatIP>(kHeadDim);
    idx->add(n, ck + static_cast<index_t>(h) * n * kHeadDim);
    s.index.push_back(std::move(idx));
    std::vector<float> q(static_cast<std::size_t>(kQueries * kHeadDim));
    for (index_t t = 0; t < kQueries; ++t) {
      for (int d = 0; d < kHeadDim; ++d) q[static_cast<std::size_t>(t * kHeadDim + d)] = s.queries(t, h, d);
    }
    s.head_queries.push_back(std::move(q));
  }
#endif
  return s;
}

void set_counters(benchmark::State& state, index_t n_chunks) {
  const double gemm_flops = 2.0 * kQueries * kHeads * static_cast<double>(n_chunks) * kHeadDim;
  const double key_bytes = static_cast<double>(kHeads) * static_cast<double>(n_chunks) * kHeadDim * sizeof(float);
  const auto iters = static_cast<double>(state.iterations());
  state.counters["GFLOP/s"] = benchmark::Counter(gemm_flops * iters * 1e-9, benchmark::Counter::kIsRate);
  state.counters["keys_GB/s"] = benchmark::Counter(key_bytes * iters * 1e-9, benchmark::Counter::kIsRate);
  state.counters["chunks"] = static_cast<double>(n_chunks);
  state.SetItemsProcessed(state.iterations() * kQueries);
}

void BM_Retrieve(benchmark::State& state, index_t memory, int csz, int K) {
  Setup& s = setup(memory, csz);
  ExactChunkRetriever retriever;
  Retrieved<float, Host> out;
  retriever.retrieve(*s.bank, cview(s.queries), K / csz, out);  // warm-up: scratch and outputs allocated
  for (auto _ : state) {
    retriever.retrieve(*s.bank, cview(s.queries), K / csz, out);
    benchmark::DoNotOptimize(out.keys.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, s.bank->num_chunks());
}

// Select with the given tile sizes (the defaults, or others: how the defaults were chosen).
void BM_SelectTuning(benchmark::State& state, index_t memory, int csz, int K, ExactRetrieverTuning tuning) {
  Setup& s = setup(memory, csz);
  ExactChunkRetriever retriever(tuning);
  Tensor<std::int32_t, Host> slots;
  Tensor<float, Host> scores;
  retriever.select(*s.bank, cview(s.queries), K / csz, slots, scores);
  for (auto _ : state) {
    retriever.select(*s.bank, cview(s.queries), K / csz, slots, scores);
    benchmark::DoNotOptimize(slots.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, s.bank->num_chunks());
}

void BM_Select(benchmark::State& state, index_t memory, int csz, int K) {
  BM_SelectTuning(state, memory, csz, K, default_exact_retriever_tuning);
}

// The GEMM part of the retriever alone, same tiles and threads, scores thrown away.
void BM_ScoresOnly(benchmark::State& state, index_t memory, int csz, int /*K*/) {
  Setup& s = setup(memory, csz);
  using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const ExactRetrieverTuning t = default_exact_retriever_tuning;
  const index_t n = s.bank->num_chunks(), C = s.bank->geometry().capacity_chunks;
  const index_t n_qtiles = (kQueries + t.query_tile - 1) / t.query_tile;
  const float* ck = s.bank->chunk_keys().data();
  std::vector<Tensor<float, Host>> tiles(static_cast<std::size_t>(detail::omp_threads()));
  for (auto& tile : tiles) tile.resize({t.query_tile, t.chunk_tile});
  for (auto _ : state) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1)
#endif
    for (index_t task = 0; task < kHeads * n_qtiles; ++task) {
      const index_t h = task / n_qtiles, q0 = (task % n_qtiles) * t.query_tile;
      const index_t nq = std::min(t.query_tile, kQueries - q0);
      Eigen::Map<const RowMajor, Eigen::Unaligned, Eigen::OuterStride<>> Q(
          s.queries.data() + (q0 * kHeads + h) * kHeadDim, nq, kHeadDim, Eigen::OuterStride<>(kHeads * kHeadDim));
      Tensor<float, Host>& tile = tiles[static_cast<std::size_t>(detail::omp_thread())];
      for (index_t c0 = 0; c0 < n; c0 += t.chunk_tile) {
        const index_t nc = std::min(t.chunk_tile, n - c0);
        Eigen::Map<const RowMajor> K(ck + (h * C + c0) * kHeadDim, nc, kHeadDim);
        Eigen::Map<RowMajor> S(tile.data(), nq, nc);
        S.noalias() = Q * K.transpose();
        benchmark::DoNotOptimize(tile.data());
      }
    }
  }
  set_counters(state, n);
}

#if defined(LONGMEM_HAVE_FAISS)
void BM_Faiss(benchmark::State& state, index_t memory, int csz, int K) {
  Setup& s = setup(memory, csz);
  const int k = K / csz;
  std::vector<float> D(static_cast<std::size_t>(kQueries * k));
  std::vector<faiss::Index::idx_t> I(static_cast<std::size_t>(kQueries * k));
  for (auto _ : state) {
    for (int h = 0; h < kHeads; ++h) {
      s.index[static_cast<std::size_t>(h)]->search(kQueries, s.head_queries[static_cast<std::size_t>(h)].data(), k,
                                                   D.data(), I.data());
      benchmark::DoNotOptimize(I.data());
    }
    benchmark::ClobberMemory();
  }
  set_counters(state, s.bank->num_chunks());
}
#endif

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("omp_threads", std::to_string(detail::omp_threads()));
  benchmark::AddCustomContext("retriever_tuning",
                              detail::concat(default_exact_retriever_tuning));
  // Grouped by bank so each bank (and its faiss copy) is built once.
  for (index_t memory : {index_t{4096}, index_t{16384}, index_t{65536}, index_t{262144}, index_t{1048576}}) {
    for (int csz : {2, 4}) {
      for (int K : {16, 64}) {
        const std::string args = detail::concat('/', memory, '/', csz, '/', K);
        auto reg = [&](const char* name, auto fn) {
          benchmark::RegisterBenchmark((std::string(name) += args).c_str(), fn, memory, csz, K)
              ->Unit(benchmark::kMillisecond)
              ->UseRealTime()
              ->MeasureProcessCPUTime();
        };
        if (memory == 65536 && csz == 4 && K == 16) {
          for (index_t ct : {128, 256, 512, 1024, 2048}) {
            for (index_t qt : {64, 128, 256, 512, 1024}) {
              benchmark::RegisterBenchmark(detail::concat("SelectTuning", args, "/ct:", ct, "/qt:", qt).c_str(),
                                           BM_SelectTuning, memory, csz, K, ExactRetrieverTuning{ct, qt})
                  ->Unit(benchmark::kMillisecond)
                  ->UseRealTime()
                  ->MeasureProcessCPUTime();
            }
          }
        }
        reg("Retrieve", BM_Retrieve);
        reg("Select", BM_Select);
        if (K == 16) reg("ScoresOnly", BM_ScoresOnly);
#if defined(LONGMEM_HAVE_FAISS)
        reg("Faiss", BM_Faiss);
#endif
      }
    }
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
