// Placeholder demo (the real one, a model streaming segments through memory, replaces it):
// prints the version and does a tiny computation with the spine types: chunk keys of a
// small (T, H, dh) key tensor as the mean of each chunk's keys, and the ALiBi slopes.
#include <cstdio>

#include "longmem/config.hpp"
#include "longmem/detail/alibi.hpp"
#include "longmem/dtype.hpp"
#include "longmem/tensor.hpp"

int main() {
  std::printf("longmem %s: LongMem (language models with long-term memory), header-only C++20\n",
              longmem::version_string);

  constexpr longmem::index_t T = 8, H = 2, dh = 4, csz = 4;
  longmem::Tensor<float> keys(longmem::Shape{T, H, dh});  // (T, H, dh)
  for (longmem::index_t t = 0; t < T; ++t)
    for (longmem::index_t h = 0; h < H; ++h)
      for (longmem::index_t d = 0; d < dh; ++d) keys(t, h, d) = static_cast<float>(t + 10 * h) + 0.25f * static_cast<float>(d);

  // Chunk keys (H, T / csz, dh): the mean of each chunk's csz token keys.
  longmem::Tensor<float> chunk_keys(longmem::Shape{H, T / csz, dh});
  longmem::fill(chunk_keys.view(), 0.0f);
  for (longmem::index_t t = 0; t < T; ++t)
    for (longmem::index_t h = 0; h < H; ++h)
      for (longmem::index_t d = 0; d < dh; ++d) chunk_keys(h, t / csz, d) += keys(t, h, d) / static_cast<float>(csz);

  std::printf("keys %s -> chunk keys %s (csz %lld)\n", keys.shape().str().c_str(), chunk_keys.shape().str().c_str(),
              static_cast<long long>(csz));
  for (longmem::index_t h = 0; h < H; ++h) {
    for (longmem::index_t c = 0; c < T / csz; ++c) {
      std::printf("  head %lld chunk %lld:", static_cast<long long>(h), static_cast<long long>(c));
      for (longmem::index_t d = 0; d < dh; ++d) std::printf(" %6.3f", static_cast<double>(chunk_keys(h, c, d)));
      std::printf("   (stored as half: %6.3f)\n", static_cast<double>(longmem::to_float(longmem::to_half(chunk_keys(h, c, 0)))));
    }
  }
  std::printf("ALiBi slopes for 4 heads:");
  for (int h = 0; h < 4; ++h) std::printf(" %g", longmem::detail::alibi_slope(h, 4));
  std::printf("\n");
  return 0;
}
