#pragma once
// Shared by the training benchmarks (bench_train.cpp on the CPU, bench_train_gpu.cu): a random
// corpus and a run configuration that never ends its schedule while timing.
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <longmem/train.hpp>

namespace longmem::bench {

/// `docs` documents of `tokens` uniform random token ids (timing does not depend on the text).
inline std::vector<Document> random_corpus(int docs, std::size_t tokens, int vocab) {
  std::mt19937_64 rng(5);
  std::uniform_int_distribution<int> u(0, vocab - 1);
  std::vector<Document> out;
  for (int i = 0; i < docs; ++i) {
    Document d{"doc " + std::to_string(i), std::vector<std::int32_t>(tokens), {}};
    for (auto& t : d.tokens) t = u(rng);
    out.push_back(std::move(d));
  }
  return out;
}

/// Segments of T tokens, a constant learning rate, and more steps than any benchmark runs.
inline TrainConfig train_config(int T) {
  TrainConfig c;
  c.segment_length = T;
  c.steps = 1 << 30;
  c.schedule.decay = Decay::Constant;
  return c;
}

}  // namespace longmem::bench
