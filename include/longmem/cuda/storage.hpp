#pragma once
// Device buffers: what makes Tensor<T, Device> allocatable, and moving data to and from it.
//
//   detail::Allocator<Device>   cudaMalloc / cudaFree on the current device
//   copy(src, dst)              host -> device, device -> host, device -> device; shapes must match
//   fill(v, value)              device view := value (cudaMemset when every byte of value is the
//                               same, e.g. 0; otherwise a host staging buffer and doubling copies)
//   cuda_device_available()     whether the CUDA runtime sees at least one device
//   detail::require_cuda_device(what)  BackendError naming `what` when it does not
//
// Only <cuda_runtime.h> is included and no kernels are defined, so plain C++ translation
// units (g++, linked with cudart) can use device tensors. All calls are synchronous on the
// default stream: when copy() or fill() returns, the data is in place.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <type_traits>
#include <vector>

#include "longmem/error.hpp"
#include "longmem/tensor.hpp"

namespace longmem {
namespace detail {

/// Throws BackendError naming the CUDA call, the bytes involved and the runtime's message.
inline void cuda_check(cudaError_t err, const char* call, std::size_t bytes) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();  // clear a non-sticky error so later calls are not blamed for it
  fail<BackendError>(call, " of ", bytes, " bytes failed: ", cudaGetErrorString(err), " (",
                     cudaGetErrorName(err), ")");
}

/// Throws BackendError unless the CUDA runtime sees a usable device: "<what> needs a CUDA device,
/// but ..." with the runtime's reason (no driver, no device), instead of a failure deep inside a copy.
inline void require_cuda_device(const char* what) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    fail<BackendError>(what, " needs a CUDA device, but the CUDA runtime reports none: ", cudaGetErrorString(err), " (",
                       cudaGetErrorName(err), "); use the host (CPU) policies on this machine");
  }
  if (n <= 0) {
    fail<BackendError>(what, " needs a CUDA device, but the CUDA runtime sees 0 devices; use the host (CPU) policies "
                       "on this machine");
  }
}

template <>
struct Allocator<Device> {
  static void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    void* p = nullptr;
    cuda_check(cudaMalloc(&p, bytes), "cudaMalloc", bytes);
    return p;
  }
  // Destructors cannot throw; a failing cudaFree here means the context is already gone.
  static void deallocate(void* p) noexcept {
    if (p) (void)cudaFree(p);
  }
  /// For generic code (a model or backbone moving to the device): BackendError without a GPU.
  static void require_usable(const char* what) { require_cuda_device(what); }
};

template <class T, class LS, class LD>
void check_copy_shapes(const TensorView<const T, LS>& src, const TensorView<T, LD>& dst) {
  if (!(src.shape() == dst.shape())) {
    fail<ShapeError>("copy ", LS::name, " -> ", LD::name, ": source shape ", src.shape().str(),
                     " differs from destination shape ", dst.shape().str());
  }
}

}  // namespace detail

/// True when the CUDA runtime reports at least one usable device (false without a driver).
inline bool cuda_device_available() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return n > 0;
}

// The source is not deduced (T comes from the destination), so a non-const view or an
// owning Tensor converts to the const source view.

/// Host-to-device copy; shapes must match exactly.
template <class T>
void copy(std::type_identity_t<TensorView<const T, Host>> src, TensorView<T, Device> dst) {
  detail::check_copy_shapes(src, dst);
  if (src.numel() == 0) return;
  detail::cuda_check(cudaMemcpy(dst.data(), src.data(), src.bytes(), cudaMemcpyHostToDevice),
                     "cudaMemcpy host -> device", src.bytes());
}

/// Device-to-host copy; shapes must match exactly.
template <class T>
void copy(std::type_identity_t<TensorView<const T, Device>> src, TensorView<T, Host> dst) {
  detail::check_copy_shapes(src, dst);
  if (src.numel() == 0) return;
  detail::cuda_check(cudaMemcpy(dst.data(), src.data(), src.bytes(), cudaMemcpyDeviceToHost),
                     "cudaMemcpy device -> host", src.bytes());
}

/// Device-to-device copy; shapes must match exactly.
template <class T>
void copy(std::type_identity_t<TensorView<const T, Device>> src, TensorView<T, Device> dst) {
  detail::check_copy_shapes(src, dst);
  if (src.numel() == 0) return;
  detail::cuda_check(cudaMemcpy(dst.data(), src.data(), src.bytes(), cudaMemcpyDeviceToDevice),
                     "cudaMemcpy device -> device", src.bytes());
}

/// Sets every element of a device view to `value` (tests poison outputs with NaN this way).
template <class T>
void fill(TensorView<T, Device> v, std::type_identity_t<T> value) {
  static_assert(std::is_trivially_copyable_v<T>, "fill needs a trivially copyable element type");
  const std::size_t n = static_cast<std::size_t>(v.numel());
  if (n == 0) return;

  unsigned char bytes[sizeof(T)];
  std::memcpy(bytes, &value, sizeof(T));
  if (std::all_of(bytes, bytes + sizeof(T), [&](unsigned char b) { return b == bytes[0]; })) {
    detail::cuda_check(cudaMemset(v.data(), bytes[0], v.bytes()), "cudaMemset", v.bytes());
    return;
  }
  // Stage at most 64 Ki elements on the host, then double the filled prefix on the device,
  // so a large fill costs one small upload and log2(n / 64Ki) device copies.
  const std::size_t staged = std::min<std::size_t>(n, std::size_t{1} << 16);
  const std::vector<T> host(staged, value);
  detail::cuda_check(cudaMemcpy(v.data(), host.data(), staged * sizeof(T), cudaMemcpyHostToDevice),
                     "cudaMemcpy host -> device (fill)", staged * sizeof(T));
  for (std::size_t done = staged; done < n;) {
    const std::size_t count = std::min(done, n - done);
    detail::cuda_check(cudaMemcpy(v.data() + done, v.data(), count * sizeof(T), cudaMemcpyDeviceToDevice),
                       "cudaMemcpy device -> device (fill)", count * sizeof(T));
    done += count;
  }
}

}  // namespace longmem
