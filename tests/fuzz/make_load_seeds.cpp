// Writes the seed corpus of fuzz_load (tests/fuzz/load_corpus): small valid inputs of every kind
// and architecture (see load_harness.hpp), each checked to run before it is written.
//   make_load_seeds [folder]      default: the load_corpus folder beside this file
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "load_harness.hpp"

int main(int argc, char** argv) {
  const std::filesystem::path out = argc > 1 ? argv[1] : std::filesystem::path(LONGMEM_FUZZ_SOURCE_DIR) / "load_corpus";
  std::filesystem::create_directories(out);
  int failures = 0;
  for (const auto& [name, bytes] : longmem::fuzz::seeds()) {
    try {
      longmem::fuzz::exercise_unchecked(bytes);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "make_load_seeds: seed %s: %s\n", name.c_str(), e.what());
      ++failures;
      continue;
    }
    std::ofstream f(out / name, std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    std::printf("%s: %zu bytes\n", name.c_str(), bytes.size());
  }
  return failures ? 1 : 0;
}
