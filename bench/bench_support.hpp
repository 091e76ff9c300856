#pragma once
// Shared by the benchmarks: a fast generator of non-zero timing inputs.
#include <cstdint>

namespace longmem::bench {

/// xorshift64*: uniform in (-1, 1) and never 0 (zeros can hide unwritten outputs and time
/// faster than real data); cheap enough to fill gigabytes of inputs.
struct Random {
  std::uint64_t s;
  float next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    const std::uint64_t x = s * 2685821657736338717ull;
    const auto m = static_cast<float>(x >> 40);      // 24 bits
    return (m + 0.5f) * (2.0f / 16777216.0f) - 1.0f;  // (m + 0.5) / 2^23 - 1 is never 0
  }
};

}  // namespace longmem::bench
