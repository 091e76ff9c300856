// Misuse: a type that is not a MemoryBank in the bank position.
// EXPECT-ERROR: MemoryBank
#include <longmem/longmem.hpp>

using Model = longmem::Model<longmem::Gpt2Backbone<float>, std::vector<float>, longmem::ExactChunkRetriever>;
int longmem_compile_fail_case() { return sizeof(Model) > 0; }
