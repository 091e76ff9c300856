#pragma once
// Shared by the GPU test programs (each has its own main, exit 77 = no device = skipped): the
// check counters and EXPECT(cond, printf-format, ...), which counts a check and, when cond is
// false, counts a failure and prints where and why, without stopping the program.
#include <cstdio>

namespace {

int failures = 0;
int checks = 0;

}  // namespace

#define EXPECT(cond, ...)                                           \
  do {                                                              \
    ++checks;                                                       \
    if (!(cond)) {                                                  \
      ++failures;                                                   \
      std::printf("FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                     \
      std::printf("\n");                                            \
      std::fflush(stdout);                                          \
    }                                                               \
  } while (0)
