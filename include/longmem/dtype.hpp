#pragma once
// Element types the library stores and reads: the safetensors dtypes we accept, and
// 16-bit float storage types (half, bfloat16) usable on host and device.
#include <cstdint>
#include <cstring>
#include <string_view>
#include <type_traits>

#include "longmem/config.hpp"

namespace longmem {

/// Element types of tensors in files and buffers (the safetensors names, upper case).
enum class DType : std::uint8_t { F16, BF16, F32, F64, I32, I64 };

/// Bytes per element.
constexpr std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::F16:
    case DType::BF16: return 2;
    case DType::F32:
    case DType::I32: return 4;
    case DType::F64:
    case DType::I64: return 8;
  }
  return 0;
}

/// The safetensors spelling ("F16", "BF16", ...).
constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
  }
  return "?";
}

/// Parses a safetensors dtype name; returns false for names we do not support.
constexpr bool parse_dtype(std::string_view s, DType& out) {
  constexpr DType all[] = {DType::F16, DType::BF16, DType::F32, DType::F64, DType::I32, DType::I64};
  for (DType t : all) {
    if (dtype_name(t) == s) {
      out = t;
      return true;
    }
  }
  return false;
}

/// IEEE 754 binary16 storage. Arithmetic happens in float; this type only stores.
struct half {
  std::uint16_t bits = 0;
};

/// bfloat16 storage (the upper 16 bits of a float). Arithmetic happens in float.
struct bfloat16 {
  std::uint16_t bits = 0;
};

namespace detail {
LONGMEM_HOST_DEVICE std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
LONGMEM_HOST_DEVICE float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
}  // namespace detail

/// float -> binary16, round to nearest even; overflow gives infinity, NaN stays NaN.
LONGMEM_HOST_DEVICE half to_half(float f) {
  const std::uint32_t x = detail::float_bits(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t abs = x & 0x7fffffffu;
  half h;
  if (abs >= 0x7f800000u) {  // inf or NaN
    h.bits = static_cast<std::uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
    return h;
  }
  if (abs >= 0x477ff000u) {  // rounds to a value >= 65520: infinity
    h.bits = static_cast<std::uint16_t>(sign | 0x7c00u);
    return h;
  }
  if (abs < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    // Scale so that the half subnormal grid becomes the float integer grid, then let
    // the FPU round to nearest even: 0.5 * 2^-24 ... 2^-14.
    const float scaled = detail::bits_float(abs) + 0.5f;  // 0.5 = 2^-1, ulp there is 2^-24
    h.bits = static_cast<std::uint16_t>(sign | (detail::float_bits(scaled) - 0x3f000000u));
    return h;
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits.
  const std::uint32_t mant_odd = (abs >> 13) & 1u;
  const std::uint32_t rounded = abs + 0xc8000fffu + mant_odd;  // -(112 << 23) + 0xfff + odd
  h.bits = static_cast<std::uint16_t>(sign | (rounded >> 13));
  return h;
}

/// binary16 -> float, exact.
LONGMEM_HOST_DEVICE float to_float(half h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h.bits & 0x8000u) << 16;
  const std::uint32_t exp = (h.bits >> 10) & 0x1fu;
  const std::uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0x1f) return detail::bits_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    // subnormal or zero: mant * 2^-24
    const float mag = static_cast<float>(mant) * 5.9604644775390625e-08f;
    return sign ? -mag : mag;
  }
  return detail::bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

/// float -> bfloat16, round to nearest even; NaN stays NaN.
LONGMEM_HOST_DEVICE bfloat16 to_bfloat16(float f) {
  const std::uint32_t x = detail::float_bits(f);
  bfloat16 b;
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    b.bits = static_cast<std::uint16_t>((x >> 16) | 0x40u);
    return b;
  }
  const std::uint32_t rounded = x + 0x7fffu + ((x >> 16) & 1u);
  b.bits = static_cast<std::uint16_t>(rounded >> 16);
  return b;
}

/// bfloat16 -> float, exact.
LONGMEM_HOST_DEVICE float to_float(bfloat16 b) {
  return detail::bits_float(static_cast<std::uint32_t>(b.bits) << 16);
}

LONGMEM_HOST_DEVICE float to_float(float f) { return f; }
LONGMEM_HOST_DEVICE float to_float(double d) { return static_cast<float>(d); }

/// Converts a float to storage type S (float, double, half or bfloat16).
template <class S>
LONGMEM_HOST_DEVICE S from_float(float f) {
  if constexpr (std::is_same_v<S, half>) {
    return to_half(f);
  } else if constexpr (std::is_same_v<S, bfloat16>) {
    return to_bfloat16(f);
  } else {
    return static_cast<S>(f);
  }
}

/// The DType of a C++ element type; a compile error for types with none.
template <class T>
struct dtype_of;
template <> struct dtype_of<half> { static constexpr DType value = DType::F16; };
template <> struct dtype_of<bfloat16> { static constexpr DType value = DType::BF16; };
template <> struct dtype_of<float> { static constexpr DType value = DType::F32; };
template <> struct dtype_of<double> { static constexpr DType value = DType::F64; };
template <> struct dtype_of<std::int32_t> { static constexpr DType value = DType::I32; };
template <> struct dtype_of<std::int64_t> { static constexpr DType value = DType::I64; };
template <class T>
inline constexpr DType dtype_of_v = dtype_of<std::remove_cv_t<T>>::value;

/// Element types the host computes in (activations, weights after loading); a device model may also
/// hold bfloat16 (ModelValueType in tensor.hpp).
template <class T>
concept ComputeType = std::is_same_v<T, float> || std::is_same_v<T, double>;

/// Element types a memory bank may store keys and values in.
template <class T>
concept StorageType = ComputeType<T> || std::is_same_v<T, half> || std::is_same_v<T, bfloat16>;

}  // namespace longmem
