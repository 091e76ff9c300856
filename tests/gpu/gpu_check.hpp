#pragma once
// Shared by the GPU test programs (each has its own main, exit 77 = no device = skipped): the
// check counters and EXPECT(cond, printf-format, ...), which counts a check and, when cond is
// false, counts a failure and prints where and why, without stopping the program; run_part() and
// finish() for main.
#include <cstdio>
#include <exception>

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

namespace {

/// Runs one part of a test program; an exception escaping it counts as a failure, named, so a part
/// that throws does not hide the others' results.
template <class F>
void run_part(const char* name, F&& part) {
  try {
    part();
  } catch (const std::exception& e) {
    ++failures;
    std::printf("FAILED %s: uncaught exception: %s\n", name, e.what());
    std::fflush(stdout);
  }
}

/// main's exit status once every part ran: 1 (with the count) when a check failed, else 0 with
/// "all N <what> checks passed".
inline int finish(const char* what) {
  if (failures) {
    std::printf("%d of %d checks failed\n", failures, checks);
    return 1;
  }
  std::printf("all %d %s checks passed\n", checks, what);
  return 0;
}

}  // namespace
