// Misuse: a device memory bank with a host backbone.
// EXPECT-ERROR: the MemoryBank and the Backbone live in different places
#include <longmem/longmem.hpp>

#include "stub_device_bank.hpp"

using Model = longmem::Model<longmem::Gpt2Backbone<float>, StubDeviceBank, longmem::ExactChunkRetriever>;
int longmem_compile_fail_case() { return sizeof(Model) > 0; }
