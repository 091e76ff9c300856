// Misuse: a fusion policy that is neither GatedFusion nor JointFusion.
// EXPECT-ERROR: Fusion
#include <longmem/longmem.hpp>

struct AverageFusion {};
using Model = longmem::Model<longmem::Gpt2Backbone<float>, longmem::HostMemoryBank<float>, longmem::ExactChunkRetriever,
                             AverageFusion>;
int longmem_compile_fail_case() { return sizeof(Model) > 0; }
