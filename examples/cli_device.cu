// longmem-run --device cuda: the backbone or LongMem model on the GPU (cli_run.hpp instantiated for
// Device placement). Compiled by nvcc, and only in CUDA builds (examples/CMakeLists.txt); cli.cpp
// calls run_on_cuda() when --device cuda is given.

// The host backend (Eigen, pulled in by <longmem/longmem.hpp>) is compiled here as plain host code.
#define EIGEN_NO_CUDA

#include <longmem/cuda/chunk_retriever.cuh>
#include <longmem/cuda/device_memory_bank.cuh>
#include <longmem/cuda/math_mode.hpp>
#include <longmem/cuda/ops.cuh>
#include <longmem/cuda/storage.hpp>

#include "cli_run.hpp"

namespace longmem::cli {

/// Device placement: weights, activations and every stream's memory in GPU memory.
struct DevicePlacement {
  using location = Device;
  using Bank = DeviceMemoryBank<float>;
  using Retriever = FusedChunkRetriever;
};

/// A 16-bit model: weights, activations and memory in bf16 (--dtype bf16) or fp16 (--dtype f16) on
/// the device; S is the bank's CUDA storage type.
template <class S>
struct Device16Placement {
  using location = Device;
  using Bank = DeviceMemoryBank<S>;
  using Retriever = FusedChunkRetriever;
};

int run_on_cuda(const RunOptions& o, const std::vector<std::int32_t>& ids) {
  // A BackendError naming what was asked when the machine has no usable GPU (the caller turns it into exit 2).
  detail::require_cuda_device("--device cuda");
  if (o.dtype == "bf16") return run<Device16Placement<__nv_bfloat16>, bfloat16>(o, ids);
  if (o.dtype == "f16") return run<Device16Placement<__half>, half>(o, ids);
  const DeviceMathScope math(parse_device_math(o.device_math));
  return run<DevicePlacement, float>(o, ids);
}

}  // namespace longmem::cli
