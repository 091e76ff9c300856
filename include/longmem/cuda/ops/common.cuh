#pragma once
// Helpers shared by the device op families (cuda/ops/*.cuh): where work is enqueued, launch
// checks that become BackendError, stream-ordered scratch buffers, block reductions, deterministic
// column sums (the gradients of biases and LayerNorm weights), and the argument checks shared with
// the host backend (detail/op_checks.hpp), so both refuse the same inputs with the same exception
// types and messages.
//
// Every op runs on the legacy default stream, like <longmem/cuda/storage.hpp>'s copies, so a
// copy() after an op sees its result without an explicit synchronisation. stream() is the one
// place that says so; a per-model or per-thread stream replaces it later.
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <type_traits>

#include "longmem/cuda/detail/retrieval_storage.cuh"
#include "longmem/cuda/storage.hpp"
#include "longmem/detail/op_checks.hpp"
#include "longmem/error.hpp"
#include "longmem/tensor.hpp"

namespace longmem::detail::cuda {

/// The stream every device op is enqueued on.
inline cudaStream_t stream() { return cudaStreamLegacy; }

/// The device the calling thread works on (cudaGetDevice).
inline int current_device() {
  int dev = 0;
  const cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    fail<BackendError>("cudaGetDevice failed: ", cudaGetErrorString(err), " (", cudaGetErrorName(err), ")");
  }
  return dev;
}

/// Throws BackendError for a failed CUDA call: the op, what it was doing, the runtime's message.
template <class... What>
void check(cudaError_t err, const char* op, What&&... what) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();  // clear a non-sticky error so later calls are not blamed for it
  fail<BackendError>(op, ": ", std::forward<What>(what)..., " failed: ", cudaGetErrorString(err), " (",
                     cudaGetErrorName(err), ")");
}

/// Checks the launch just made (bad configuration, missing kernel image, too much shared memory).
/// `what` describes the launch; it is only formatted when the launch failed.
template <class... What>
void check_launch(const char* op, What&&... what) {
  check(cudaGetLastError(), op, std::forward<What>(what)...);
}

/// "grid (x, y) block b, s bytes of shared memory" for launch diagnostics.
inline std::string launch_str(dim3 grid, dim3 block, std::size_t smem = 0) {
  return concat("grid (", grid.x, ", ", grid.y, ", ", grid.z, ") x block ", block.x, ", ", smem,
                " bytes of shared memory");
}

/// Makes the device's stream-ordered pool keep the memory it has reserved. By default (release
/// threshold 0) the pool hands all of it back to the driver at every synchronisation, so each op's
/// scratch after a copy to the host is a fresh mapping (tens of microseconds, per op, per call);
/// with the threshold at its maximum the pool keeps its peak, as framework allocators do. Applied
/// once per device, and only to the default pool while its threshold is still the default: a pool
/// or threshold the application chose is left alone.
inline void keep_pool_memory(const char* op) {
  static std::atomic<std::uint64_t> done{0};  // one bit per device (devices >= 64: checked every time)
  const int dev = current_device();
  const std::uint64_t bit = dev < 64 ? std::uint64_t{1} << dev : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit) != 0) return;
  cudaMemPool_t current = nullptr, standard = nullptr;
  check(cudaDeviceGetMemPool(&current, dev), op, "cudaDeviceGetMemPool");
  check(cudaDeviceGetDefaultMemPool(&standard, dev), op, "cudaDeviceGetDefaultMemPool");
  if (current == standard) {
    std::uint64_t threshold = 0;
    check(cudaMemPoolGetAttribute(standard, cudaMemPoolAttrReleaseThreshold, &threshold), op,
          "reading the memory pool's release threshold");
    if (threshold == 0) {
      threshold = UINT64_MAX;
      check(cudaMemPoolSetAttribute(standard, cudaMemPoolAttrReleaseThreshold, &threshold), op,
            "setting the memory pool's release threshold");
    }
  }
  done.fetch_or(bit, std::memory_order_relaxed);
}

/// A device buffer from the stream-ordered allocator (cudaMallocAsync / cudaFreeAsync on stream()),
/// so scratch space costs no device-wide synchronisation and stays valid for work enqueued before
/// it is released. The pool keeps freed memory for the next call (keep_pool_memory).
class Scratch {
 public:
  Scratch(std::size_t bytes, const char* op) : bytes_(bytes) {
    if (bytes == 0) return;
    keep_pool_memory(op);
    check(cudaMallocAsync(&ptr_, bytes, stream()), op, "cudaMallocAsync of ", bytes, " bytes of scratch");
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() {
    if (ptr_) (void)cudaFreeAsync(ptr_, stream());
  }
  template <class T>
  T* as(std::size_t byte_offset = 0) const {
    return reinterpret_cast<T*>(static_cast<unsigned char*>(ptr_) + byte_offset);
  }
  std::size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

/// Copies host ids (token ids, targets) to `dst` on stream(). From pageable memory the call returns
/// once the ids are staged, so the caller's span may go away afterwards.
inline void upload_ids(std::span<const std::int32_t> ids, std::int32_t* dst, const char* op) {
  if (ids.empty()) return;
  check(cudaMemcpyAsync(dst, ids.data(), ids.size_bytes(), cudaMemcpyHostToDevice, stream()), op,
        "cudaMemcpyAsync of ", ids.size(), " ids (", ids.size_bytes(), " bytes) host -> device");
}

/// Grid size for a grid-stride loop over n elements.
inline unsigned grid_for(index_t n, unsigned block, unsigned max_blocks = 65535u * 8u) {
  const index_t blocks = (n + block - 1) / block;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > index_t{max_blocks} ? index_t{max_blocks} : blocks));
}

/// The forward ops take float, bfloat16 or half buffers: 16-bit values are read and written as
/// such, every sum and statistic inside is fp32 (or double), as in PyTorch's bf16 and fp16 kernels.
template <class T>
constexpr void require_forward_element() {
  static_assert(std::is_same_v<T, float> || HalfWidthType<T>,
                "the CUDA backend's forward ops take Tensor<float, Device>, Tensor<bfloat16, Device> or "
                "Tensor<half, Device> buffers; use the host backend for double");
}

/// The backward and optimiser ops compute in float (cuBLASLt fp32 GEMMs, float kernels).
template <class T>
constexpr void require_float() {
  static_assert(std::is_same_v<T, float>,
                "the CUDA backend (OpsBackend<Device>) computes in float: use Tensor<float, Device> buffers, "
                "or the host backend for double");
}

// Argument checks: the host backend's, shared through detail/op_checks.hpp (metadata only, so
// they work on views of either location).
using op_checks::absent;
using op_checks::expect_same_elements;
using op_checks::expect_separate;
using op_checks::overlaps;
using op_checks::rows_of;

// ---------------------------------------------------------------------------------------------
// Device building blocks

#if defined(__CUDACC__)
/// 16-byte accesses (8 bf16 / fp16 or 4 floats) for the elementwise, LayerNorm and similar kernels.
template <class E>
inline constexpr index_t vec_elements = 16 / static_cast<index_t>(sizeof(E));

inline bool vec_aligned(const void* a, const void* b = nullptr, const void* c = nullptr) {
  const auto bits = reinterpret_cast<std::uintptr_t>(a) | reinterpret_cast<std::uintptr_t>(b) |
                    reinterpret_cast<std::uintptr_t>(c);
  return bits % 16 == 0;
}

/// V elements at p (16 bytes when V > 1) as floats, and back (rounded once).
template <index_t V, class E>
__device__ inline void load_elements(const E* p, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = device_load(p[0]);
  } else {
    static_assert(V * sizeof(E) == 16);
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    E e[V];
    memcpy(e, &raw, 16);
#pragma unroll
    for (index_t x = 0; x < V; ++x) out[x] = device_load(e[x]);
  }
}
template <index_t V, class E>
__device__ inline void store_elements(E* p, const float (&in)[V]) {
  if constexpr (V == 1) {
    p[0] = device_store<E>(in[0]);
  } else {
    E e[V];
#pragma unroll
    for (index_t x = 0; x < V; ++x) e[x] = device_store<E>(in[x]);
    uint4 raw;
    memcpy(&raw, e, 16);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

/// Sum over a warp; every lane gets the result.
template <class T>
__device__ inline T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

/// warp_sum / warp_max as lane 0 has them, in every lane (the butterfly leaves each lane its own
/// association order; a row computed by one warp must use one value).
template <class T>
__device__ inline T warp_sum_lane0(T v);
template <class T>
__device__ inline T warp_max_lane0(T v);

template <class T>
__device__ inline T warp_max(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = o > v ? o : v;
  }
  return v;
}

template <class T>
__device__ inline T warp_sum_lane0(T v) {
  return __shfl_sync(0xffffffffu, warp_sum(v), 0);
}
template <class T>
__device__ inline T warp_max_lane0(T v) {
  return __shfl_sync(0xffffffffu, warp_max(v), 0);
}

/// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
/// `shared` holds 32 values. Contains __syncthreads: every thread of the block must call it.
template <class T>
__device__ inline T block_sum(T v, T* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T total = T(0);
  for (int w = 0; w < warps; ++w) total += shared[w];  // same order in every thread: one result
  return total;
}

template <class T>
__device__ inline T block_max(T v, T* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T best = shared[0];
  for (int w = 1; w < warps; ++w) best = shared[w] > best ? shared[w] : best;
  return best;
}

/// Splits of the rows for column sums: enough blocks to fill the GPU, each at least 32 rows.
inline index_t column_sum_splits(index_t N) {
  const index_t s = (N + 31) / 32;
  return s < 1 ? 1 : (s > 256 ? 256 : s);
}

/// Column sums over rows, deterministic (no atomics): block (x, s) sums its columns over the rows
/// of split s in row order into partial[s]; column_sums_finish adds the partials in split order.
///   partial_g[s][c]  = sum_n g[n][c]
///   partial_gx[s][c] = sum_n g[n][c] (x[n][c] - mean[n]) inv[n]      (when x; LayerNorm's d_weight)
template <class T>
__global__ void column_partials_kernel(float* __restrict__ partial_g, float* __restrict__ partial_gx,
                                       const T* __restrict__ g, const T* __restrict__ x,
                                       const double* __restrict__ mean, const double* __restrict__ inv, index_t N,
                                       index_t C, index_t rows_per_split) {
  const index_t c = blockIdx.x * index_t{blockDim.x} + threadIdx.x, s = blockIdx.y;
  if (c >= C) return;
  const index_t n0 = s * rows_per_split, n1 = n0 + rows_per_split < N ? n0 + rows_per_split : N;
  float sg = 0, sgx = 0;
  for (index_t n = n0; n < n1; ++n) {
    const float gv = g[n * C + c];
    sg += gv;
    if (x) sgx += gv * ((x[n * C + c] - static_cast<float>(mean[n])) * static_cast<float>(inv[n]));
  }
  if (partial_g) partial_g[s * C + c] = sg;
  if (partial_gx) partial_gx[s * C + c] = sgx;
}

/// Block x finishes columns [32 x, 32 x + 32): thread (lane, w) adds splits w, w + 8, ... of column
/// 32 x + lane in order, then the 8 partial sums are added in w order (a fixed order: the same bits
/// every run), so each thread makes splits / 8 loads instead of one thread walking all splits.
inline constexpr unsigned column_finish_columns = 32, column_finish_ways = 8;
template <class T>
__global__ void __launch_bounds__(column_finish_columns * column_finish_ways)
    column_sums_finish_kernel(T* __restrict__ dst, const float* __restrict__ partial, index_t splits, index_t C) {
  __shared__ float ways[column_finish_ways][column_finish_columns];
  const unsigned lane = threadIdx.x % column_finish_columns, w = threadIdx.x / column_finish_columns;
  const index_t c = blockIdx.x * index_t{column_finish_columns} + lane;
  float total = 0;
  if (c < C) {
    for (index_t s = w; s < splits; s += column_finish_ways) total += partial[s * C + c];
  }
  ways[w][lane] = total;
  __syncthreads();
  if (w == 0 && c < C) {
    float sum = ways[0][lane];
    for (unsigned i = 1; i < column_finish_ways; ++i) sum += ways[i][lane];
    dst[c] += sum;
  }
}

/// d_g (C) += column sums of g (N, C); d_gx (C) += column sums of g * xhat (x, mean, inv given).
/// Either destination may be null.
inline void add_column_sums(const char* op, float* d_g, float* d_gx, const float* g, const float* x, const double* mean,
                            const double* inv, index_t N, index_t C) {
  if (N == 0 || C == 0 || (!d_g && !d_gx)) return;
  const index_t splits = column_sum_splits(N), per = (N + splits - 1) / splits;
  const std::size_t part = static_cast<std::size_t>(splits * C) * sizeof(float);
  Scratch scratch(2 * part, op);
  float* pg = d_g ? scratch.as<float>() : nullptr;
  float* pgx = d_gx ? scratch.as<float>(part) : nullptr;
  const dim3 block(128), grid(static_cast<unsigned>((C + 127) / 128), static_cast<unsigned>(splits));
  column_partials_kernel<float><<<grid, block, 0, stream()>>>(pg, pgx, g, d_gx ? x : nullptr, mean, inv, N, C, per);
  check_launch(op, "the column-sum kernel for ", N, " rows of ", C, " (", launch_str(grid, block), ")");
  const dim3 fblock(column_finish_columns * column_finish_ways),
      fgrid(static_cast<unsigned>((C + column_finish_columns - 1) / column_finish_columns));
  if (d_g) column_sums_finish_kernel<float><<<fgrid, fblock, 0, stream()>>>(d_g, pg, splits, C);
  if (d_gx) column_sums_finish_kernel<float><<<fgrid, fblock, 0, stream()>>>(d_gx, pgx, splits, C);
  check_launch(op, "the column-sum finishing kernel for ", C, " columns");
}
#endif

}  // namespace longmem::detail::cuda
