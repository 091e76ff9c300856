#pragma once
// How the device backend rounds the inputs of its tensor-core products on float buffers (a bf16 or
// fp16 model, Tensor<bfloat16 | half, Device>, computes in its own type whatever the mode). Buffers stay float
// (Tensor<float, Device>) in every mode and every product accumulates in fp32; what changes is
// how many mantissa bits of each input reach the tensor cores, which trades accuracy for speed
// the way PyTorch's torch.set_float32_matmul_precision("highest" | "high" | "medium") does:
//
//   DeviceMath::fp32  (default)  GEMMs CUBLAS_COMPUTE_32F (no rounding of the inputs); the local
//                                attention branch in 3xTF32 (x = big + small, three mma per
//                                product): float accuracy, what the fixtures' 1e-4 checks need
//   DeviceMath::tf32             GEMMs CUBLAS_COMPUTE_32F_FAST_TF32 and attention in 1xTF32:
//                                inputs rounded to 10 mantissa bits (relative error ~2^-11 per input)
//   DeviceMath::bf16             GEMMs CUBLAS_COMPUTE_32F_FAST_16BF, which lets cuBLASLt round the
//                                inputs to bf16 (7 mantissa bits, ~2^-8); attention as tf32. With
//                                fp32 buffers, CUDA 13.0's cuBLASLt on an H200 chose the tf32 kernels
//                                (same times and results: bench/RESULTS.md), so this is tf32 there
//
// Not affected by the mode, in any mode: retrieval (FusedChunkRetriever scores chunks with fp32
// FMAs, so the chosen chunks are the exact ones for the queries it is given), the memory branch
// of memory_attention (fp32 FMAs over the retrieved keys/values), LayerNorm, GELU, softmax and
// cross-entropy (fp32, LayerNorm statistics in double). Retrieval still sees queries that earlier
// reduced-precision layers computed, so in tf32/bf16 a near-tie between two chunks can resolve
// differently from the fp32 model's.
//
// The mode is one process-wide setting, read when each op is enqueued (like PyTorch's flag);
// DeviceMathScope sets it for a block and restores the previous mode. Host ops ignore it.
#include <atomic>
#include <string_view>

#include "longmem/error.hpp"

namespace longmem {

enum class DeviceMath { fp32, tf32, bf16 };

namespace detail {
inline std::atomic<DeviceMath>& device_math_flag() {
  static std::atomic<DeviceMath> mode{DeviceMath::fp32};
  return mode;
}
}  // namespace detail

/// The mode device ops use from now on (all threads).
inline void set_device_math(DeviceMath mode) { detail::device_math_flag().store(mode, std::memory_order_relaxed); }
inline DeviceMath device_math() { return detail::device_math_flag().load(std::memory_order_relaxed); }

inline const char* to_string(DeviceMath m) {
  switch (m) {
    case DeviceMath::fp32: return "fp32";
    case DeviceMath::tf32: return "tf32";
    case DeviceMath::bf16: return "bf16";
  }
  return "?";
}

/// "fp32", "tf32" or "bf16"; anything else is a ConfigError that lists the three.
inline DeviceMath parse_device_math(std::string_view s) {
  if (s == "fp32") return DeviceMath::fp32;
  if (s == "tf32") return DeviceMath::tf32;
  if (s == "bf16") return DeviceMath::bf16;
  detail::fail<ConfigError>("device math '", s, "' is not one of fp32, tf32, bf16");
}

/// Sets the mode for the lifetime of the scope, then restores the one before.
class DeviceMathScope {
 public:
  explicit DeviceMathScope(DeviceMath mode) : previous_(device_math()) { set_device_math(mode); }
  DeviceMathScope(const DeviceMathScope&) = delete;
  DeviceMathScope& operator=(const DeviceMathScope&) = delete;
  ~DeviceMathScope() { set_device_math(previous_); }

 private:
  DeviceMath previous_;
};

}  // namespace longmem
