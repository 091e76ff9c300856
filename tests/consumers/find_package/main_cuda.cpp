// The CUDA storage header compiled by the host compiler only (no nvcc), linked with cudart.
#include <longmem/cuda/storage.hpp>
#include <cstdio>

int main() {
  std::printf("cuda device available: %s\n", longmem::cuda_device_available() ? "yes" : "no");
  return 0;
}
