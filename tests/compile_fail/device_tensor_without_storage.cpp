// Misuse: a device tensor allocates through detail::Allocator<Device>, which only
// <longmem/cuda/storage.hpp> defines; without it, Tensor::resize must name that header.
// EXPECT-ERROR: Tensor<T, longmem::Device> needs #include <longmem/cuda/storage.hpp>
#include <longmem/tensor.hpp>

int longmem_compile_fail_case() {
  longmem::Tensor<float, longmem::Device> t(longmem::Shape{4});  // (4)
  return static_cast<int>(t.numel());
}
