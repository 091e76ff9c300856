#pragma once
// Helpers shared by the backbone, SideNet and model tests.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include "longmem/tensor.hpp"

namespace longmem::test {

/// A fresh directory under the system temp dir, removed at scope exit.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = std::filesystem::temp_directory_path() /
            ("longmem-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

/// n token ids uniform in [0, vocab).
inline std::vector<std::int32_t> random_tokens(std::size_t n, int vocab, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> u(0, vocab - 1);
  std::vector<std::int32_t> t(n);
  for (auto& x : t) x = u(rng);
  return t;
}

/// max |a - b| over paired elements, and max |b|; NaN in `a` gives an infinite error.
struct ErrorStats {
  double max_abs_err = 0;
  double max_abs_ref = 0;
  double relative() const { return max_abs_ref > 0 ? max_abs_err / max_abs_ref : max_abs_err; }
};

template <class A, class B>
ErrorStats compare(const A* a, const B* b, std::int64_t n) {
  ErrorStats s;
  for (std::int64_t i = 0; i < n; ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    const double e = std::isnan(x) || std::isnan(y) ? std::numeric_limits<double>::infinity() : std::abs(x - y);
    s.max_abs_err = std::max(s.max_abs_err, e);
    s.max_abs_ref = std::max(s.max_abs_ref, std::abs(y));
  }
  return s;
}

/// Fills a host tensor with NaN (or the type's closest poison) to catch unwritten outputs.
template <class T>
void poison(Tensor<T, Host>& t, Shape s) {
  t.resize(s);
  fill(t.view(), std::numeric_limits<T>::quiet_NaN());
}

}  // namespace longmem::test
