#pragma once
// Device optimizer ops: the Trainer's gradient scaling, global gradient norm and AdamW update
// (formulas in ops.hpp), so training on the GPU keeps weights, gradients and moments there and
// an update crosses PCIe only for the norm (one double back).
//   sum_of_squares   one launch per 96 tensors: a thread block per fixed 32 Ki-element block
//                    (op_checks::square_sum_block, as on the host), summed in double in a fixed
//                    tree; then one thread adds the block sums in list order. Deterministic (same
//                    result every run); it differs from the host's element-order sums by rounding.
//   scale            one launch per 96 tensors over the same blocks
//   adamw_update     one launch per tensor, element by element in double
#include <cstdint>
#include <span>

#include "longmem/cuda/ops/common.cuh"
#include "longmem/ops.hpp"

namespace longmem::detail::cuda {

inline constexpr unsigned optimizer_block = 256;

/// Up to `capacity` tensors of a list, passed to a kernel by value (under the 4 KiB parameter
/// limit): their data, sizes, and the index of the first fixed block of each (a prefix sum).
template <class P>
struct TensorBlocks {
  static constexpr int capacity = 96;
  P data[capacity];
  index_t numel[capacity];
  index_t first_block[capacity + 1];
  int count = 0;
};

/// Which tensor of `list` the fixed block `b` belongs to (the lists are short: a linear scan).
template <class P>
__device__ inline int tensor_of_block(const TensorBlocks<P>& list, index_t b) {
  int i = 0;
  while (i + 1 < list.count && list.first_block[i + 1] <= b) ++i;
  return i;
}

/// Fixed block b's element range [begin, end) within its tensor i.
template <class P>
__device__ inline void block_range(const TensorBlocks<P>& list, index_t b, int i, index_t& begin, index_t& end) {
  begin = (b - list.first_block[i]) * op_checks::square_sum_block;
  const index_t stop = begin + op_checks::square_sum_block;
  end = list.numel[i] < stop ? list.numel[i] : stop;
}

/// partial[b] = sum of x^2 over fixed block b of the list, in double.
template <class T>
__global__ void __launch_bounds__(optimizer_block)
    square_sums_kernel(const TensorBlocks<const T*> list, double* __restrict__ partial) {
  __shared__ double shared[32];
  const index_t b = blockIdx.x;
  const int i = tensor_of_block(list, b);
  index_t begin = 0, end = 0;
  block_range(list, b, i, begin, end);
  const T* x = list.data[i];
  double s = 0;
  for (index_t k = begin + threadIdx.x; k < end; k += blockDim.x) s += static_cast<double>(x[k]) * static_cast<double>(x[k]);
  s = block_sum(s, shared);
  if (threadIdx.x == 0) partial[b] = s;
}

/// total[0] = sum of partial[0..n) in index order (one thread: a few hundred values). A template,
/// as every kernel in a header, so that translation units including it share one definition.
template <class S>
__global__ void ordered_sum_kernel(const S* __restrict__ partial, index_t n, S* __restrict__ total) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  S s = 0;
  for (index_t j = 0; j < n; ++j) s += partial[j];
  *total = s;
}

template <class T>
__global__ void __launch_bounds__(optimizer_block) scale_kernel(const TensorBlocks<T*> list, double factor) {
  const index_t b = blockIdx.x;
  const int i = tensor_of_block(list, b);
  index_t begin = 0, end = 0;
  block_range(list, b, i, begin, end);
  T* x = list.data[i];
  for (index_t k = begin + threadIdx.x; k < end; k += blockDim.x) x[k] = static_cast<T>(static_cast<double>(x[k]) * factor);
}

template <class T>
__global__ void __launch_bounds__(optimizer_block)
    adamw_kernel(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m, T* __restrict__ v, index_t n,
                 const ops::AdamWStep s) {
  for (index_t j = blockIdx.x * index_t{blockDim.x} + threadIdx.x; j < n; j += index_t{gridDim.x} * blockDim.x) {
    const double gj = static_cast<double>(g[j]);
    const double mj = s.beta1 * static_cast<double>(m[j]) + (1.0 - s.beta1) * gj;
    const double vj = s.beta2 * static_cast<double>(v[j]) + (1.0 - s.beta2) * gj * gj;
    m[j] = static_cast<T>(mj);
    v[j] = static_cast<T>(vj);
    double x = static_cast<double>(p[j]);
    x -= s.lr * s.weight_decay * x;
    x -= s.lr * (mj / s.bias1) / (sqrt(vj / s.bias2) + s.eps);
    p[j] = static_cast<T>(x);
  }
}

/// Runs launch(list, total blocks, first block overall) for the non-empty tensors of `xs`, at most
/// TensorBlocks::capacity at a time, in list order.
template <class P, class V, class F>
void for_tensor_batches(std::span<const V> xs, F&& launch) {
  TensorBlocks<P> list;
  index_t before = 0;  // fixed blocks of earlier batches
  auto flush = [&] {
    if (list.count == 0) return;
    launch(list, list.first_block[list.count], before);
    before += list.first_block[list.count];
    list.count = 0;
  };
  for (const V& x : xs) {
    if (x.numel() == 0) continue;
    if (list.count == 0) list.first_block[0] = 0;
    list.data[list.count] = x.data();
    list.numel[list.count] = x.numel();
    list.first_block[list.count + 1] = list.first_block[list.count] + op_checks::square_sum_blocks(x.numel());
    if (++list.count == TensorBlocks<P>::capacity) flush();
  }
  flush();
}

template <class T>
double sum_of_squares(std::span<const TensorView<const T, Device>> xs) {
  require_float<T>();
  const char* op = "sum_of_squares";
  index_t blocks = 0;
  for (const auto& x : xs) blocks += op_checks::square_sum_blocks(x.numel());
  if (blocks == 0) return 0.0;
  Scratch scratch(static_cast<std::size_t>(blocks + 1) * sizeof(double), op);
  double* partial = scratch.as<double>();
  for_tensor_batches<const T*>(xs, [&](const TensorBlocks<const T*>& list, index_t n_blocks, index_t first) {
    square_sums_kernel<T><<<static_cast<unsigned>(n_blocks), optimizer_block, 0, stream()>>>(list, partial + first);
    check_launch(op, "the block-sum kernel over ", list.count, " tensors (", n_blocks, " blocks)");
  });
  ordered_sum_kernel<double><<<1, 32, 0, stream()>>>(partial, blocks, partial + blocks);
  check_launch(op, "the final sum of ", blocks, " block sums");
  double total = 0;
  check(cudaMemcpyAsync(&total, partial + blocks, sizeof(double), cudaMemcpyDeviceToHost, stream()), op,
        "cudaMemcpyAsync of the sum device -> host");
  check(cudaStreamSynchronize(stream()), op, "waiting for the sum");
  return total;
}

template <class T>
void scale(std::span<const TensorView<T, Device>> xs, double factor) {
  require_float<T>();
  const char* op = "scale";
  for_tensor_batches<T*>(xs, [&](const TensorBlocks<T*>& list, index_t n_blocks, index_t) {
    scale_kernel<T><<<static_cast<unsigned>(n_blocks), optimizer_block, 0, stream()>>>(list, factor);
    check_launch(op, "the kernel over ", list.count, " tensors (", n_blocks, " blocks)");
  });
}

template <class T>
void adamw_update(TensorView<T, Device> param, TensorView<const T, Device> grad, TensorView<T, Device> m,
                  TensorView<T, Device> v, const ops::AdamWStep& s) {
  require_float<T>();
  const char* op = "adamw_update";
  op_checks::check_adamw_update(param, grad, m, v);
  const index_t n = param.numel();
  if (n == 0) return;
  const dim3 block(optimizer_block), grid(grid_for(n, optimizer_block, 1024));
  adamw_kernel<T><<<grid, block, 0, stream()>>>(param.data(), grad.data(), m.data(), v.data(), n, s);
  check_launch(op, "the kernel for ", n, " parameters (", launch_str(grid, block), ")");
}

}  // namespace longmem::detail::cuda
