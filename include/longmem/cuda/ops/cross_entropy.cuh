#pragma once
// Device next-token cross-entropy and its backward.
//   cross_entropy_backward   d_logits = scale (softmax(logits) - onehot(y))   (0 where y = -1)
//   cross_entropy   loss_t = logsumexp(logits_t) - logits_t[y_t]     (targets of -1 ignored: loss 0)
// One block per row: the maximum in float (exact), exp(x - max) in float summed in double, the log
// and the loss in double. Per-row losses come back to the host in double and are summed there in
// row order, as the host backend sums them; the returned pair makes this op synchronise.
// cross_entropy also reads bfloat16 and half logits (a 16-bit model's), exactly as float.
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "longmem/cuda/ops/common.cuh"

namespace longmem::detail::cuda {

/// Validates logits (T, V) against T targets in [0, V) or -1; returns V.
template <class V>
index_t check_cross_entropy(const char* op, const V& logits, std::span<const std::int32_t> targets) {
  const index_t n_tok = static_cast<index_t>(targets.size());
  if (logits.rank() != 2 || logits.dim(0) != n_tok || logits.dim(1) == 0) {
    fail<ShapeError>(op, ": logits: expected shape (", n_tok, ", V) for ", n_tok, " targets with V > 0, got ",
                     logits.shape().str());
  }
  const index_t Vn = logits.dim(1);
  for (index_t t = 0; t < n_tok; ++t) {
    const std::int32_t y = targets[static_cast<std::size_t>(t)];
    if (y != -1 && (y < 0 || y >= Vn)) {
      fail<InputError>(op, ": target ", y, " at position ", t, " is outside the vocabulary [0, ", Vn,
                       "); use -1 to ignore a position");
    }
  }
  return Vn;
}

inline constexpr unsigned cross_entropy_block = 256;

/// E float, __nv_bfloat16 or __half (16-bit logits are read exactly as float).
template <class E>
__global__ void __launch_bounds__(cross_entropy_block)
    cross_entropy_kernel(const E* __restrict__ logits /*(T,V)*/, const std::int32_t* __restrict__ targets /*(T)*/,
                         double* __restrict__ row_loss /*(T)*/, float* __restrict__ losses /*(T) or null*/,
                         index_t n_tok, index_t Vn) {
  __shared__ float partial_max[32];
  __shared__ double partial_sum[32];
  for (index_t t = blockIdx.x; t < n_tok; t += gridDim.x) {
    const std::int32_t y = targets[t];  // uniform over the block
    if (y == -1) {
      if (threadIdx.x == 0) {
        row_loss[t] = 0.0;
        if (losses) losses[t] = 0.0f;
      }
      continue;
    }
    const E* x = logits + t * Vn;
    float mx = -INFINITY;
    for (index_t j = threadIdx.x; j < Vn; j += blockDim.x) mx = fmaxf(mx, device_load(x[j]));
    mx = block_max(mx, partial_max);
    double z = 0;
    for (index_t j = threadIdx.x; j < Vn; j += blockDim.x) z += static_cast<double>(expf(device_load(x[j]) - mx));
    z = block_sum(z, partial_sum);
    if (threadIdx.x == 0) {
      const double loss = log(z) - (static_cast<double>(device_load(x[y])) - static_cast<double>(mx));
      row_loss[t] = loss;
      if (losses) losses[t] = static_cast<float>(loss);
    }
  }
}

/// Sum and count of -log softmax(logits)[target] over targets != -1.
template <class T>
std::pair<double, std::int64_t> cross_entropy(TensorView<const T, Device> logits, std::span<const std::int32_t> targets,
                                              TensorView<float, Device> losses) {
  require_forward_element<T>();
  const char* op = "cross_entropy";
  const index_t Vn = check_cross_entropy(op, logits, targets);
  const index_t n_tok = static_cast<index_t>(targets.size());
  const bool write_losses = !absent(losses);
  if (write_losses) expect_shape(losses, Shape{n_tok}, "cross_entropy: losses (one per target)");
  if (n_tok == 0) return {0.0, 0};

  // Scratch: the targets (int32) then the per-row losses (double, 8-byte aligned).
  const std::size_t ids_bytes = (targets.size_bytes() + 7) / 8 * 8;
  Scratch scratch(ids_bytes + static_cast<std::size_t>(n_tok) * sizeof(double), op);
  auto* ids = scratch.as<std::int32_t>();
  auto* row_loss = scratch.as<double>(ids_bytes);
  upload_ids(targets, ids, op);
  const dim3 block(cross_entropy_block), grid(grid_for(n_tok, 1));
  cross_entropy_kernel<<<grid, block, 0, stream()>>>(device_ptr(logits.data()), ids, row_loss,
                                                     write_losses ? losses.data() : nullptr, n_tok, Vn);
  check_launch(op, "the kernel for ", n_tok, " rows of ", Vn, " logits (", launch_str(grid, block), ")");

  std::vector<double> host(static_cast<std::size_t>(n_tok));
  check(cudaMemcpyAsync(host.data(), row_loss, host.size() * sizeof(double), cudaMemcpyDeviceToHost, stream()), op,
        "copying ", n_tok, " row losses device -> host");
  check(cudaStreamSynchronize(stream()), op, "waiting for the kernel for ", n_tok, " rows of ", Vn, " logits");
  double sum = 0;
  std::int64_t count = 0;
  for (index_t t = 0; t < n_tok; ++t) {
    if (targets[static_cast<std::size_t>(t)] == -1) continue;
    sum += host[static_cast<std::size_t>(t)];
    ++count;
  }
  return {sum, count};
}

/// Row t: d_logits = scale (softmax(logits) - onehot(y)), 0 when y = -1; as the forward, the max
/// in float, the normaliser summed in double. d_logits may be logits (each element is read by the
/// thread that writes it, after the row's reductions, which end in a barrier).
template <class T>
__global__ void __launch_bounds__(cross_entropy_block)
    cross_entropy_backward_kernel(T* d_logits, const T* logits, const std::int32_t* __restrict__ targets, index_t n_tok,
                                  index_t Vn, double scale) {
  __shared__ float partial_max[32];
  __shared__ double partial_sum[32];
  for (index_t t = blockIdx.x; t < n_tok; t += gridDim.x) {
    const std::int32_t y = targets[t];
    T* g = d_logits + t * Vn;
    if (y == -1) {
      for (index_t j = threadIdx.x; j < Vn; j += blockDim.x) g[j] = T(0);
      continue;
    }
    const T* x = logits + t * Vn;
    float mx = -INFINITY;
    for (index_t j = threadIdx.x; j < Vn; j += blockDim.x) mx = fmaxf(mx, static_cast<float>(x[j]));
    mx = block_max(mx, partial_max);
    double z = 0;
    for (index_t j = threadIdx.x; j < Vn; j += blockDim.x) z += static_cast<double>(expf(static_cast<float>(x[j]) - mx));
    z = block_sum(z, partial_sum);
    const double s = scale / z;
    for (index_t j = threadIdx.x; j < Vn; j += blockDim.x) {
      const double p = s * static_cast<double>(expf(static_cast<float>(x[j]) - mx));
      g[j] = static_cast<T>(j == y ? p - scale : p);
    }
  }
}

/// d_logits (T, V) = scale (softmax(logits) - onehot(target)) per row; 0 where the target is -1.
template <class T>
void cross_entropy_backward(TensorView<T, Device> d_logits, TensorView<const T, Device> logits,
                            std::span<const std::int32_t> targets, double scale) {
  require_float<T>();
  const char* op = "cross_entropy_backward";
  const index_t Vn = check_cross_entropy(op, logits, targets);
  op_checks::check_cross_entropy_backward(d_logits, logits, scale);
  const index_t n_tok = static_cast<index_t>(targets.size());
  if (n_tok == 0) return;
  Scratch ids(targets.size_bytes(), op);
  upload_ids(targets, ids.as<std::int32_t>(), op);
  const dim3 block(cross_entropy_block), grid(grid_for(n_tok, 1));
  cross_entropy_backward_kernel<T><<<grid, block, 0, stream()>>>(d_logits.data(), logits.data(), ids.as<std::int32_t>(),
                                                                 n_tok, Vn, scale);
  check_launch(op, "the kernel for ", n_tok, " rows of ", Vn, " logits (", launch_str(grid, block), ")");
}

}  // namespace longmem::detail::cuda
