// Misuse: a retriever for device banks with a host backbone and host bank.
// EXPECT-ERROR: the ChunkRetriever searches banks in another place than the Backbone's
#include <longmem/longmem.hpp>

struct DeviceRetriever {
  using location = longmem::Device;
};

using Model = longmem::Model<longmem::Gpt2Backbone<float>, longmem::HostMemoryBank<float>, DeviceRetriever>;
int longmem_compile_fail_case() { return sizeof(Model) > 0; }
