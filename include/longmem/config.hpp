#pragma once
// Compiler glue shared by every header: host/device annotations and the version.

// LONGMEM_HOST_DEVICE marks maths that runs on both sides (softmax pieces, ALiBi
// slopes, chunk arithmetic). Without nvcc it is plain `inline`, so the same code is
// compiled and tested on the CPU.
#if defined(__CUDACC__)
#define LONGMEM_HOST_DEVICE __host__ __device__ inline
#define LONGMEM_DEVICE __device__ inline
#else
#define LONGMEM_HOST_DEVICE inline
#endif

#define LONGMEM_VERSION_MAJOR 0
#define LONGMEM_VERSION_MINOR 1
#define LONGMEM_VERSION_PATCH 0

namespace longmem {
inline constexpr const char* version_string = "0.1.0";
}  // namespace longmem
