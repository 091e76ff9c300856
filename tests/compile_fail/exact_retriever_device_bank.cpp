// Misuse: the CPU retriever asked to search a bank that lives on the GPU.
// EXPECT-ERROR: ExactChunkRetriever searches host banks
#include <longmem/longmem.hpp>

#include "stub_device_bank.hpp"

int longmem_compile_fail_case() {
  StubDeviceBank bank(longmem::MemoryGeometry{2, 4, 2, 8});
  longmem::ExactChunkRetriever r;
  longmem::Retrieved<float, longmem::Host> out;
  longmem::Tensor<float, longmem::Host> q(longmem::Shape{1, 2, 4});  // (T, H, dh)
  r.retrieve(bank, q.view(), 2, out);
  return out.chunks;
}
