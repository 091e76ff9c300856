// longmem-train pretrain --device cuda: the backbone's forward and backward on the GPU (float,
// the device op table of <longmem/cuda/ops.cuh>), the Trainer (AdamW, clipping, checkpoints) on
// the host. A separate nvcc translation unit because the device ops are CUDA kernels; train.cpp
// (g++) calls it when the build has CUDA (LONGMEM_TRAIN_CUDA).
#define EIGEN_NO_CUDA

#include <longmem/cuda/ops.cuh>

#include "train_run.hpp"

int pretrain_on_cuda(const longmem::train_cli::Options& o) {
  return longmem::train_cli::pretrain<float, longmem::Device>(o);
}
