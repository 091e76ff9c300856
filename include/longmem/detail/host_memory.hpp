#pragma once
// How much memory this machine has, and checked sizes, so that a model, a memory bank or a
// tensor that cannot fit is refused up front with the number of bytes it would need instead of
// failing in an allocation halfway (or, with overcommit, being killed when its pages are touched).
//
//   physical_memory_bytes()  sysconf(_SC_PHYS_PAGES) * sysconf(_SC_PAGE_SIZE), read once
//   checked_bytes(...)       a product of extents and an element size, nullopt when it overflows
//   HostMemoryClaim          RAII share of a process-wide ledger (memory banks: together they
//                            may not claim more than the machine has)
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include "longmem/error.hpp"

namespace longmem::detail {

/// Bytes of physical memory (0 when sysconf cannot tell; then nothing is refused for size alone).
inline std::uint64_t physical_memory_bytes() {
  static const std::uint64_t bytes = [] {
    const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGE_SIZE);
    if (pages <= 0 || page <= 0) return std::uint64_t{0};
    return static_cast<std::uint64_t>(pages) * static_cast<std::uint64_t>(page);
  }();
  return bytes;
}

/// "3,221,225,472 bytes (3.0 GiB)".
inline std::string describe_bytes(std::uint64_t n) {
  std::string digits = std::to_string(n), out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  out += " bytes";
  if (n >= (1u << 20)) {
    char buf[32];
    const double v = static_cast<double>(n);
    if (n >= (std::uint64_t{1} << 30)) {
      std::snprintf(buf, sizeof buf, " (%.1f GiB)", v / 1073741824.0);
    } else {
      std::snprintf(buf, sizeof buf, " (%.1f MiB)", v / 1048576.0);
    }
    out += buf;
  }
  return out;
}

/// element_size * every extent, or nullopt when an extent is negative or the product overflows 64 bits.
inline std::optional<std::uint64_t> checked_bytes(std::uint64_t element_size, std::initializer_list<std::int64_t> extents) {
  std::uint64_t n = element_size;
  for (std::int64_t e : extents) {
    if (e < 0) return std::nullopt;
    const auto u = static_cast<std::uint64_t>(e);
    if (u != 0 && n > std::numeric_limits<std::uint64_t>::max() / u) return std::nullopt;
    n *= u;
  }
  return n;
}

/// a + b, or nullopt on overflow.
inline std::optional<std::uint64_t> checked_sum(std::optional<std::uint64_t> a, std::optional<std::uint64_t> b) {
  if (!a || !b || *a > std::numeric_limits<std::uint64_t>::max() - *b) return std::nullopt;
  return *a + *b;
}

/// Bytes claimed by every live HostMemoryClaim of this process.
inline std::atomic<std::uint64_t>& claimed_host_bytes() {
  static std::atomic<std::uint64_t> claimed{0};
  return claimed;
}

/// Throws ConfigError unless `bytes` more fit beside what the claims of this process hold (a
/// check before building several claimants at once; HostMemoryClaim itself claims atomically).
inline void require_host_memory(std::optional<std::uint64_t> bytes, const std::string& what,
                                std::uint64_t claimed = claimed_host_bytes().load()) {
  const std::uint64_t have = physical_memory_bytes();
  if (!bytes) fail<ConfigError>(what, " needs more than 2^64 bytes of memory");
  if (have == 0 || (*bytes <= have && claimed <= have - *bytes)) return;
  if (claimed == 0 || *bytes > have) {
    fail<ConfigError>(what, " needs ", describe_bytes(*bytes), " but this machine has ", describe_bytes(have),
                      " of memory");
  }
  fail<ConfigError>(what, " needs ", describe_bytes(*bytes), " but this machine has ", describe_bytes(have),
                    " of memory and the memory banks already built in this process hold ", describe_bytes(claimed));
}

/// A share of the machine's memory held for the lifetime of an object (a memory bank's buffers).
/// Claims together may not exceed physical_memory_bytes(); a claim that would is refused with a
/// ConfigError naming `what` needs, what the machine has and what other claims hold.
class HostMemoryClaim {
 public:
  HostMemoryClaim() = default;
  /// `bytes` nullopt means "more than 64 bits can count" and is always refused.
  HostMemoryClaim(std::optional<std::uint64_t> bytes, const std::string& what) {
    if (!bytes) fail<ConfigError>(what, " needs more than 2^64 bytes of memory");
    auto& claimed = claimed_host_bytes();
    const std::uint64_t before = claimed.fetch_add(*bytes);
    try {
      require_host_memory(bytes, what, before);
    } catch (...) {
      claimed.fetch_sub(*bytes);
      throw;
    }
    bytes_ = *bytes;
  }
  HostMemoryClaim(const HostMemoryClaim&) = delete;
  HostMemoryClaim& operator=(const HostMemoryClaim&) = delete;
  HostMemoryClaim(HostMemoryClaim&& o) noexcept : bytes_(std::exchange(o.bytes_, 0)) {}
  HostMemoryClaim& operator=(HostMemoryClaim&& o) noexcept {
    if (this != &o) {
      release();
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  ~HostMemoryClaim() { release(); }

  std::uint64_t bytes() const { return bytes_; }

 private:
  void release() noexcept {
    if (bytes_) claimed_host_bytes().fetch_sub(bytes_);
    bytes_ = 0;
  }
  std::uint64_t bytes_ = 0;
};

}  // namespace longmem::detail
