// Misuse: calling an op on host buffers without including the CPU backend.
// EXPECT-ERROR: include <longmem/cpu/ops.hpp> for Host buffers
#include <longmem/ops.hpp>

int longmem_compile_fail_case() {
  longmem::Tensor<float, longmem::Host> a(longmem::Shape{3}), b(longmem::Shape{3});
  longmem::ops::add(a.view(), b);
  return 0;
}
