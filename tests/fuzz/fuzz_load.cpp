// libFuzzer target for the whole load path: bytes -> backbone, SideNet, training checkpoint or
// config.json (chosen by the first byte, see load_harness.hpp) -> a forward over a tiny token
// stream (or one training update after Trainer::resume). An input must be refused with a
// longmem::Error or run; any other exception (std::bad_alloc included), a sanitizer report, a
// malloc over -malloc_limit_mb or a timeout is a crash.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <span>

#include "load_harness.hpp"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Build the harness's backbones and files once, outside the first input's time.
  (void)longmem::fuzz::gpt2_backbone();
  (void)longmem::fuzz::gpt2_star_backbone();
  (void)longmem::fuzz::metadata_free_gpt2();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  (void)longmem::fuzz::exercise(std::as_bytes(std::span<const std::uint8_t>(data, size)));
  return 0;
}

extern "C" std::size_t LLVMFuzzerMutate(std::uint8_t* data, std::size_t size, std::size_t max_size);

// Half the mutations are structure-aware (load_harness.hpp: metadata values, renamed, reshaped
// or poisoned tensors in a file that stays well formed), half are libFuzzer's byte-level ones.
extern "C" std::size_t LLVMFuzzerCustomMutator(std::uint8_t* data, std::size_t size, std::size_t max_size,
                                               unsigned int seed) {
  std::minstd_rand rng(seed);
  if (rng() % 2 == 0) {
    if (auto m = longmem::fuzz::structured_mutant(std::as_bytes(std::span<const std::uint8_t>(data, size)), rng);
        m && m->size() <= max_size) {
      std::memcpy(data, m->data(), m->size());
      return m->size();
    }
  }
  return LLVMFuzzerMutate(data, size, max_size);
}
