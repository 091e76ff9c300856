// What a host application writes (the README's example): compose a LongMem model from
// policies, stream segments through it, read logits and the loss. Built by both consumer
// projects (find_package and add_subdirectory) and run by ctest.
#include <longmem/longmem.hpp>

#include <cstdio>
#include <vector>

using Model = longmem::Model<longmem::Gpt2Backbone<float>,    // frozen backbone
                             longmem::HostMemoryBank<float>,  // storage policy, e.g. HostMemoryBank<longmem::half>
                             longmem::ExactChunkRetriever>;   // retrieval policy

int main() {
  // A real application loads checkpoints:
  //   Model model(longmem::Gpt2Backbone<float>::load("backbone.safetensors"),
  //               longmem::SideNet<float>::load("sidenet.safetensors"), memory);
  auto backbone = longmem::Gpt2Backbone<float>::random(longmem::BackboneConfig::gpt2_star(4, 64, 4, 256, 128), 1);
  auto side_net = longmem::SideNet<float>::from_backbone(backbone, /*memory_layer=*/2);
  longmem::MemoryConfig memory;  // defaults: 65,536 tokens, chunks of 4, 64 tokens retrieved
  memory.memory_tokens = 1024;
  Model model(std::move(backbone), std::move(side_net), memory);

  const auto text = longmem::ByteTokenizer::encode("LongMem remembers what earlier segments said. Again: LongMem remembers.");
  const std::span<const std::int32_t> stream(text);
  for (std::size_t begin = 0; begin + 16 < stream.size(); begin += 16) {
    // Retrieves from earlier segments, then remembers this one.
    const auto& out = model.forward(stream.subspan(begin, 16), stream.subspan(begin + 1, 16));
    std::printf("segment at %2zu: logits %s, loss %.3f, %d chunks retrieved per query\n", begin,
                out.logits[0].shape().str().c_str(), out.mean_loss(), out.retrieved_chunks[0]);
  }
  std::printf("longmem %s: memory holds %lld tokens\n", longmem::version_string,
              static_cast<long long>(model.bank(0).size_tokens()));
  return model.bank(0).size_tokens() > 0 ? 0 : 1;
}
