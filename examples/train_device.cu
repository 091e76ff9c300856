// longmem-train pretrain|adapt --device cuda: forward, backward and AdamW on the GPU (float, the
// device op table of <longmem/cuda/ops.cuh>); adapt keeps each stream's memory in a
// DeviceMemoryBank searched by the FusedChunkRetriever. The Trainer drives it from the host. A
// separate nvcc translation unit because the device ops are CUDA kernels; train.cpp (g++) calls it
// when the build has CUDA (LONGMEM_TRAIN_CUDA).
#define EIGEN_NO_CUDA

#include <longmem/cuda/chunk_retriever.cuh>
#include <longmem/cuda/device_memory_bank.cuh>
#include <longmem/cuda/ops.cuh>

#include "train_run.hpp"

int pretrain_on_cuda(const longmem::train_cli::Options& o) {
  return longmem::train_cli::pretrain<float, longmem::Device>(o);
}

int adapt_on_cuda(const longmem::train_cli::Options& o) {
  using namespace longmem;
  using Bank = DeviceMemoryBank<float>;
  if (o.fusion == "joint") return train_cli::adapt<float, JointFusion, Bank, FusedChunkRetriever>(o);
  return train_cli::adapt<float, GatedFusion, Bank, FusedChunkRetriever>(o);
}
