// 16-bit float conversions in dtype.hpp against Eigen::half / Eigen::bfloat16 and a
// plain float64 rounding reference: every bit pattern one way, edge cases, every
// rounding boundary and random floats across the exponent range the other way.
#include <Eigen/Core>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "longmem/cuda/math_mode.hpp"  // plain C++: the device math setting, no CUDA needed
#include "longmem/dtype.hpp"

using namespace longmem;

namespace {

float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
std::uint32_t float_to_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

Eigen::half eigen_half_from_bits(std::uint16_t b) { return Eigen::half_impl::raw_uint16_to_half(b); }
Eigen::bfloat16 eigen_bf16_from_bits(std::uint16_t b) { return Eigen::bfloat16_impl::raw_uint16_to_bfloat16(b); }
std::uint16_t bits_of(Eigen::half h) {
  std::uint16_t b;
  static_assert(sizeof(Eigen::half) == 2);
  std::memcpy(&b, &h, 2);
  return b;
}
std::uint16_t bits_of(Eigen::bfloat16 h) {
  std::uint16_t b;
  static_assert(sizeof(Eigen::bfloat16) == 2);
  std::memcpy(&b, &h, 2);
  return b;
}

bool is_nan16(std::uint16_t b, int exp_bits) {
  const int mant_bits = 15 - exp_bits;
  const std::uint16_t exp_mask = static_cast<std::uint16_t>(((1u << exp_bits) - 1) << mant_bits);
  return (b & exp_mask) == exp_mask && (b & ((1u << mant_bits) - 1)) != 0;
}

/// Same value, sign of zero included; any NaN equals any NaN.
bool same_float(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return float_to_bits(a) == float_to_bits(b);
}

/// Float64 reference of round-to-nearest-even into a binary format with `mant` stored
/// mantissa bits, minimum normal exponent `emin` and largest finite value `max`.
double ref_round(float f, int mant, int emin, double max) {
  const double x = f;
  if (std::isnan(x)) return x;
  if (std::isinf(x)) return x;
  if (x == 0) return x;
  const int e = std::max(std::ilogb(x), emin);
  const double q = std::ldexp(1.0, e - mant);  // the spacing of representable values near x
  double r = std::nearbyint(x / q) * q;       // x / q is exact; nearbyint rounds half to even
  if (std::abs(r) > max) r = std::copysign(std::numeric_limits<double>::infinity(), x);
  if (r == 0) r = std::copysign(0.0, x);
  return r;
}
double ref_half(float f) { return ref_round(f, 10, -14, 65504.0); }
double ref_bf16(float f) { return ref_round(f, 7, -126, std::ldexp(255.0, 120)); }

/// Checks to_half(f) against Eigen::half and the float64 reference.
void check_half(float f) {
  CAPTURE(f, float_to_bits(f));
  const std::uint16_t ours = to_half(f).bits;
  const std::uint16_t eigen = bits_of(Eigen::half(f));
  CAPTURE(ours, eigen);
  if (std::isnan(f)) {
    CHECK(is_nan16(ours, 5));
    CHECK(is_nan16(eigen, 5));
  } else {
    CHECK(ours == eigen);
    CHECK(static_cast<double>(to_float(half{ours})) == ref_half(f));
    CHECK(std::signbit(to_float(half{ours})) == std::signbit(f));
  }
}

void check_bf16(float f) {
  CAPTURE(f, float_to_bits(f));
  const std::uint16_t ours = to_bfloat16(f).bits;
  const std::uint16_t eigen = bits_of(Eigen::bfloat16(f));
  CAPTURE(ours, eigen);
  if (std::isnan(f)) {
    CHECK(is_nan16(ours, 8));
    CHECK(is_nan16(eigen, 8));
  } else {
    CHECK(ours == eigen);
    CHECK(static_cast<double>(to_float(bfloat16{ours})) == ref_bf16(f));
    CHECK(std::signbit(to_float(bfloat16{ours})) == std::signbit(f));
  }
}

/// Edge cases common to both formats, plus format-specific ones.
std::vector<float> edge_floats() {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> v = {0.f, -0.f, 1.f, -1.f, 0.1f, 1e-3f, 3.14159f, inf, -inf,
                          std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN(),
                          std::numeric_limits<float>::signaling_NaN(), bits_to_float(0x7f800001u),
                          bits_to_float(0xff800001u), bits_to_float(0x7fffffffu), bits_to_float(0x7f801000u),
                          std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(),
                          std::numeric_limits<float>::min(), std::numeric_limits<float>::denorm_min(),
                          -std::numeric_limits<float>::denorm_min(), bits_to_float(0x007fffffu)};
  // binary16: smallest subnormal 2^-24 and half of it (a tie that rounds to 0), just above
  // that half, 1.5 * 2^-24 (tie to even: 2^-23), the largest subnormal, the smallest normal
  // and the tie between them, max 65504, just below / at / above the overflow boundary 65520.
  for (float x : {std::ldexp(1.f, -24), std::ldexp(1.f, -25), std::nextafter(std::ldexp(1.f, -25), 1.f),
                  std::nextafter(std::ldexp(1.f, -25), 0.f), 1.5f * std::ldexp(1.f, -24),
                  2.5f * std::ldexp(1.f, -24), 1023.f * std::ldexp(1.f, -24), std::ldexp(1.f, -14),
                  std::ldexp(1.f, -14) - std::ldexp(1.f, -25), std::ldexp(1.f, -26), 65504.f, 65505.f, 65519.f,
                  std::nextafter(65520.f, 0.f), 65520.f, std::nextafter(65520.f, inf), 65536.f, 1e5f,
                  1.f + std::ldexp(1.f, -11), 1.f + 3 * std::ldexp(1.f, -11), 2049.f, 2051.f}) {
    v.push_back(x);
    v.push_back(-x);
  }
  // bfloat16: ties at 1 + 2^-8, overflow near FLT_MAX, the bfloat16 subnormal range.
  for (float x : {1.f + std::ldexp(1.f, -8), 1.f + 3 * std::ldexp(1.f, -8), std::nextafter(1.f + std::ldexp(1.f, -8), 2.f),
                  std::ldexp(255.f, 120), std::ldexp(255.5f, 120), std::nextafter(std::ldexp(255.5f, 120), 0.f),
                  std::ldexp(1.f, -133), std::ldexp(1.f, -134), std::ldexp(3.f, -134), std::ldexp(1.f, -127)}) {
    v.push_back(x);
    v.push_back(-x);
  }
  return v;
}

/// Floats with a random sign, a random exponent in [lo, hi] and random mantissa bits.
std::vector<float> random_floats(std::uint64_t seed, int count, int lo, int hi) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::uint32_t> mant(0, 0x7fffff), sign(0, 1);
  std::uniform_int_distribution<int> exp(lo, hi);
  std::vector<float> v(static_cast<std::size_t>(count));
  for (auto& f : v) {
    const int e = exp(rng);  // biased float exponent, 0 = subnormal
    f = bits_to_float((sign(rng) << 31) | (static_cast<std::uint32_t>(e) << 23) | mant(rng));
  }
  return v;
}

}  // namespace

TEST_CASE("dtype: to_float(half) is exact for all 65536 bit patterns", "[dtype]") {
  for (std::uint32_t b = 0; b <= 0xffff; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    const float ours = to_float(half{bits});
    const float eigen = static_cast<float>(eigen_half_from_bits(bits));
    if (!same_float(ours, eigen)) {
      CAPTURE(b, ours, eigen);
      FAIL("to_float(half) differs from Eigen::half");
    }
    CHECK(std::isnan(ours) == is_nan16(bits, 5));
    // and going back gives the same half (NaN stays NaN)
    const std::uint16_t back = to_half(ours).bits;
    if (is_nan16(bits, 5) ? !is_nan16(back, 5) : back != bits) {
      CAPTURE(b, back);
      FAIL("to_half(to_float(h)) != h");
    }
  }
}

TEST_CASE("dtype: to_float(bfloat16) is exact for all 65536 bit patterns", "[dtype]") {
  for (std::uint32_t b = 0; b <= 0xffff; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    const float ours = to_float(bfloat16{bits});
    const float eigen = static_cast<float>(eigen_bf16_from_bits(bits));
    if (!same_float(ours, eigen)) {
      CAPTURE(b, ours, eigen);
      FAIL("to_float(bfloat16) differs from Eigen::bfloat16");
    }
    CHECK(std::isnan(ours) == is_nan16(bits, 8));
    const std::uint16_t back = to_bfloat16(ours).bits;
    if (is_nan16(bits, 8) ? !is_nan16(back, 8) : back != bits) {
      CAPTURE(b, back);
      FAIL("to_bfloat16(to_float(b)) != b");
    }
  }
}

TEST_CASE("dtype: to_half and to_bfloat16 on edge cases", "[dtype]") {
  for (float f : edge_floats()) {
    check_half(f);
    check_bf16(f);
  }
  // A few spelled out, so the expectations do not rest on Eigen alone.
  CHECK(to_half(0.f).bits == 0x0000);
  CHECK(to_half(-0.f).bits == 0x8000);
  CHECK(to_half(std::ldexp(1.f, -24)).bits == 0x0001);
  CHECK(to_half(std::ldexp(1.f, -25)).bits == 0x0000);  // tie, to even
  CHECK(to_half(std::nextafter(std::ldexp(1.f, -25), 1.f)).bits == 0x0001);
  CHECK(to_half(65504.f).bits == 0x7bff);
  CHECK(to_half(std::nextafter(65520.f, 0.f)).bits == 0x7bff);
  CHECK(to_half(65520.f).bits == 0x7c00);
  CHECK(to_half(-std::numeric_limits<float>::infinity()).bits == 0xfc00);
  CHECK(to_bfloat16(1.f + std::ldexp(1.f, -8)).bits == 0x3f80);  // tie, to even
  CHECK(to_bfloat16(std::numeric_limits<float>::max()).bits == 0x7f80);
  CHECK(to_bfloat16(std::ldexp(1.f, -133)).bits == 0x0001);
}

TEST_CASE("dtype: to_half at every rounding boundary of binary16", "[dtype]") {
  // For each pair of neighbouring finite halves: the midpoint (a tie), and the floats
  // just either side of it and of each half itself.
  for (std::uint32_t b = 0; b < 0x7c00; ++b) {
    const float lo = to_float(half{static_cast<std::uint16_t>(b)});
    const float hi = b + 1 < 0x7c00 ? to_float(half{static_cast<std::uint16_t>(b + 1)}) : 65536.f;
    const float mid = lo + (hi - lo) / 2;  // exact: halves have 11 significant bits
    for (float f : {lo, std::nextafter(lo, 0.f), std::nextafter(lo, 1e30f), mid, std::nextafter(mid, 0.f),
                    std::nextafter(mid, 1e30f)}) {
      const std::uint16_t pos = to_half(f).bits, neg = to_half(-f).bits;
      const std::uint16_t epos = bits_of(Eigen::half(f)), eneg = bits_of(Eigen::half(-f));
      if (pos != epos || neg != eneg || static_cast<double>(to_float(half{pos})) != ref_half(f)) {
        CAPTURE(b, f, pos, epos, neg, eneg);
        FAIL("to_half differs from Eigen::half or the float64 reference");
      }
    }
  }
}

TEST_CASE("dtype: to_half and to_bfloat16 on random floats across the exponent range", "[dtype]") {
  const std::uint64_t seed = GENERATE(1u, 2u);
  CAPTURE(seed);
  // All float exponents, then concentrated on the binary16 range (2^-26 .. 2^17).
  for (const auto& [lo, hi] : {std::pair{0, 254}, std::pair{101, 144}}) {
    for (float f : random_floats(seed * 1000 + static_cast<std::uint64_t>(lo), 100000, lo, hi)) {
      const std::uint16_t h = to_half(f).bits, eh = bits_of(Eigen::half(f));
      const std::uint16_t b = to_bfloat16(f).bits, eb = bits_of(Eigen::bfloat16(f));
      if (h != eh || b != eb || static_cast<double>(to_float(half{h})) != ref_half(f) ||
          static_cast<double>(to_float(bfloat16{b})) != ref_bf16(f)) {
        CAPTURE(f, float_to_bits(f), h, eh, b, eb);
        FAIL("a 16-bit conversion differs from Eigen or the float64 reference");
      }
    }
  }
  // Random NaNs of every payload stay NaN.
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 1000; ++i) {
    const std::uint32_t payload = std::uniform_int_distribution<std::uint32_t>(1, 0x7fffff)(rng);
    const float nan = bits_to_float((i % 2 ? 0x80000000u : 0u) | 0x7f800000u | payload);
    CAPTURE(payload);
    REQUIRE(is_nan16(to_half(nan).bits, 5));
    REQUIRE(is_nan16(to_bfloat16(nan).bits, 8));
  }
}

TEST_CASE("dtype: names, sizes and type mapping", "[dtype]") {
  for (DType t : {DType::F16, DType::BF16, DType::F32, DType::F64, DType::I32, DType::I64}) {
    DType back{};
    REQUIRE(parse_dtype(dtype_name(t), back));
    CHECK(back == t);
  }
  DType out = DType::F32;
  CHECK_FALSE(parse_dtype("f32", out));
  CHECK_FALSE(parse_dtype("U8", out));
  CHECK_FALSE(parse_dtype("", out));
  CHECK(dtype_size(DType::F16) == 2);
  CHECK(dtype_size(DType::BF16) == 2);
  CHECK(dtype_size(DType::F32) == 4);
  CHECK(dtype_size(DType::I32) == 4);
  CHECK(dtype_size(DType::F64) == 8);
  CHECK(dtype_size(DType::I64) == 8);
  STATIC_REQUIRE(dtype_of_v<const half> == DType::F16);
  STATIC_REQUIRE(dtype_of_v<bfloat16> == DType::BF16);
  STATIC_REQUIRE(dtype_of_v<std::int64_t> == DType::I64);
  CHECK(from_float<half>(1.f).bits == 0x3c00);
  CHECK(from_float<bfloat16>(-2.f).bits == 0xc000);
  CHECK(from_float<double>(0.5f) == 0.5);
}

TEST_CASE("device math: names, parsing, scopes restore the previous mode", "[dtype]") {
  REQUIRE(device_math() == DeviceMath::fp32);  // the default: float accuracy
  for (DeviceMath m : {DeviceMath::fp32, DeviceMath::tf32, DeviceMath::bf16}) CHECK(parse_device_math(to_string(m)) == m);
  CHECK_THROWS_AS(parse_device_math("fp16"), ConfigError);
  CHECK_THROWS_WITH(parse_device_math("BF16"), Catch::Contains("not one of fp32, tf32, bf16"));
  {
    const DeviceMathScope outer(DeviceMath::bf16);
    CHECK(device_math() == DeviceMath::bf16);
    {
      const DeviceMathScope inner(DeviceMath::tf32);
      CHECK(device_math() == DeviceMath::tf32);
    }
    CHECK(device_math() == DeviceMath::bf16);
  }
  CHECK(device_math() == DeviceMath::fp32);
}
