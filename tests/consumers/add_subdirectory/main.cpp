// Builds a tensor through the source tree (add_subdirectory) and prints its shape.
#if __has_include(<longmem/longmem.hpp>)
#include <longmem/longmem.hpp>
#else
#include <longmem/tensor.hpp>
#endif
#include <cstdio>

int main() {
  longmem::Tensor<float> t(longmem::Shape{2, 3, 4});  // (2, 3, 4)
  longmem::fill(t.view(), 0.5f);
  std::printf("longmem %s shape %s\n", longmem::version_string, t.shape().str().c_str());
  return t.numel() == 24 ? 0 : 1;
}
