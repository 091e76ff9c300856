#pragma once
// Storage element types of device banks and their conversions, shared by the bank's append
// kernels, the retriever's gather and the device ops (users name DeviceStorageType only).
//
//   DeviceStorageType<S>   float, __half or __nv_bfloat16
//   device_store<S>(x)     float -> S, round to nearest even (HostMemoryBank's from_float rounding)
//   device_load(s)         S -> float, exact
//   device_element_t<T>    the CUDA twin of a library element type: longmem::bfloat16 and
//                          longmem::half have __nv_bfloat16's and __half's layout (one uint16)
//   device_ptr(p)          a T* as a device_element_t<T>*
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "longmem/dtype.hpp"

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

template <class T>
struct device_element {
  using type = T;
};
template <>
struct device_element<bfloat16> {
  using type = __nv_bfloat16;
};
template <>
struct device_element<half> {
  using type = __half;
};
template <class T>
using device_element_t = typename device_element<T>::type;
static_assert(sizeof(bfloat16) == sizeof(__nv_bfloat16) && sizeof(half) == sizeof(__half));

template <class T>
device_element_t<T>* device_ptr(T* p) {
  return reinterpret_cast<device_element_t<T>*>(p);
}
template <class T>
const device_element_t<T>* device_ptr(const T* p) {
  return reinterpret_cast<const device_element_t<T>*>(p);
}

}  // namespace detail
}  // namespace longmem
