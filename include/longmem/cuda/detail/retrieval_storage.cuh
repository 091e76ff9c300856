#pragma once
// Storage element types of device banks and their conversions, shared by the bank's append
// kernels and the retriever's gather (users name DeviceStorageType only).
//
//   DeviceStorageType<S>   float, __half or __nv_bfloat16
//   device_store<S>(x)     float -> S, round to nearest even (HostMemoryBank's from_float rounding)
//   device_load(s)         S -> float, exact
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace longmem {

/// Element types a device bank stores keys and values in.
template <class S>
concept DeviceStorageType = std::is_same_v<S, float> || std::is_same_v<S, __half> || std::is_same_v<S, __nv_bfloat16>;

namespace detail {

template <class S>
__device__ inline S device_store(float x) {
  if constexpr (std::is_same_v<S, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<S, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

template <class S>
__device__ inline float device_load(S x) {
  if constexpr (std::is_same_v<S, __half>) {
    return __half2float(x);
  } else if constexpr (std::is_same_v<S, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else {
    return x;
  }
}

}  // namespace detail
}  // namespace longmem
