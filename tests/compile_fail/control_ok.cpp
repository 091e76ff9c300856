// Control for the compile-fail tests: correct use of the same headers must compile
// (with -Wall -Wextra -Werror), so a failing misuse file fails for its misuse alone.
#include <longmem/tensor.hpp>

int longmem_compile_fail_control() {
  longmem::Tensor<float, longmem::Host> t(longmem::Shape{2, 3});  // (2, 3)
  longmem::fill(t.view(), 1.0f);
  longmem::TensorView<const float, longmem::Host> v = t.view();
  return static_cast<int>(v.numel());
}
