#pragma once
// Device linear layer in PyTorch Linear layout through cuBLASLt, fp32 data, fp32 accumulation.
// The compute type follows longmem::device_math() (cuda/math_mode.hpp): CUBLAS_COMPUTE_32F (fp32,
// the default: no rounding of the inputs), CUBLAS_COMPUTE_32F_FAST_TF32 (tf32) or
// CUBLAS_COMPUTE_32F_FAST_16BF (bf16: cuBLASLt may round the inputs to bf16; on an H200 it ran
// the tf32 kernels).
//   linear   out (N, O) [+]= in (N, I) W (O, I)^T + b (O)
//
// cuBLASLt is column-major. The row-major buffers read column-major are out^T (O, N), in^T (I, N)
// and W^T (I, O), so the product is out^T = op(W^T) in^T with op = transpose: m = O, n = N, k = I.
// The bias is one value per row of out^T, which is what CUBLASLT_EPILOGUE_BIAS broadcasts, and it is
// added on top of beta * C, so Accumulate::Yes is beta = 1 with C = D = out.
//
// Dispatch:
//   bias, heuristic finds an algorithm with the bias epilogue   one cublasLtMatmul
//   otherwise                                                   cublasLtMatmul, then a bias kernel
//
// The handle and a 32 MiB workspace are created once per device, on first use, under a mutex, and
// never destroyed (destroying them from a static destructor races the CUDA runtime's own teardown
// at exit). The workspace is shared by every call on the device: they are all enqueued on stream()
// and so run one after another; giving ops their own streams will need a workspace per stream.
#include <cublasLt.h>

#include <array>
#include <cstdint>
#include <mutex>
#include <string>

#include "longmem/cuda/math_mode.hpp"
#include "longmem/cuda/ops/common.cuh"
#include "longmem/ops.hpp"

namespace longmem::detail::cuda {

/// Throws BackendError for a failed cuBLASLt call.
template <class... What>
void check_cublas(cublasStatus_t status, const char* op, What&&... what) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  fail<BackendError>(op, ": ", std::forward<What>(what)..., " failed: ", cublasLtGetStatusString(status), " (status ",
                     static_cast<int>(status), ")");
}

/// The cuBLASLt handle and workspace of one device.
struct BlasLtContext {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
};

inline constexpr std::size_t blaslt_workspace_bytes = std::size_t{32} << 20;  // NVIDIA's advice for Hopper
inline constexpr int max_devices = 64;

/// The context of the current device, created on first use (thread-safe).
inline const BlasLtContext& blaslt_context() {
  static std::mutex mutex;
  static std::array<BlasLtContext, max_devices> contexts{};
  const int dev = current_device();
  if (dev < 0 || dev >= max_devices) fail<BackendError>("linear: device ", dev, " is beyond the ", max_devices, " supported");
  std::lock_guard<std::mutex> lock(mutex);
  BlasLtContext& ctx = contexts[static_cast<std::size_t>(dev)];
  if (!ctx.handle) {
    cublasLtHandle_t handle = nullptr;
    check_cublas(cublasLtCreate(&handle), "linear", "cublasLtCreate on device ", dev);
    void* ws = nullptr;
    const cudaError_t err = cudaMalloc(&ws, blaslt_workspace_bytes);
    if (err != cudaSuccess) {
      (void)cublasLtDestroy(handle);
      check(err, "linear", "cudaMalloc of the ", blaslt_workspace_bytes, "-byte cuBLASLt workspace on device ", dev);
    }
    ctx.workspace = ws;
    ctx.workspace_bytes = blaslt_workspace_bytes;
    ctx.handle = handle;  // published last: a half-made context is never seen
  }
  return ctx;
}

/// Largest power of two (at most 256) that divides the address: what cuBLASLt may assume.
inline std::uint32_t pointer_alignment(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  std::uint32_t align = 256;
  while (align > 1 && a % align != 0) align /= 2;
  return align;
}

/// Owns the cuBLASLt descriptors of one call.
struct MatmulDescriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  MatmulDescriptors() = default;
  MatmulDescriptors(const MatmulDescriptors&) = delete;
  MatmulDescriptors& operator=(const MatmulDescriptors&) = delete;
  ~MatmulDescriptors() {
    if (pref) (void)cublasLtMatmulPreferenceDestroy(pref);
    if (c) (void)cublasLtMatrixLayoutDestroy(c);
    if (b) (void)cublasLtMatrixLayoutDestroy(b);
    if (a) (void)cublasLtMatrixLayoutDestroy(a);
    if (op) (void)cublasLtMatmulDescDestroy(op);
  }
};

/// out (N, O) += bias (O) per row, for the path without the epilogue.
template <class T>
__global__ void add_bias_kernel(T* out, const T* __restrict__ bias, index_t N, index_t O) {
  const index_t n_el = N * O;
  for (index_t i = blockIdx.x * index_t{blockDim.x} + threadIdx.x; i < n_el; i += index_t{gridDim.x} * blockDim.x) {
    out[i] += bias[i % O];
  }
}

/// One cuBLASLt GEMM: out = W in (+ beta out) (+ bias through the epilogue when `epilogue_bias`).
/// Returns false, having enqueued nothing, when no algorithm supports the request.
/// The cuBLASLt compute type of a device math mode.
inline cublasComputeType_t compute_type(DeviceMath m) {
  switch (m) {
    case DeviceMath::tf32: return CUBLAS_COMPUTE_32F_FAST_TF32;
    case DeviceMath::bf16: return CUBLAS_COMPUTE_32F_FAST_16BF;
    case DeviceMath::fp32: break;
  }
  return CUBLAS_COMPUTE_32F;
}

inline bool matmul(float* out, const float* in, const float* weight, const float* bias, index_t N, index_t O, index_t I,
                   bool accumulate, bool epilogue_bias, DeviceMath math) {
  const char* op = "linear";
  const BlasLtContext& ctx = blaslt_context();
  MatmulDescriptors d;
  check_cublas(cublasLtMatmulDescCreate(&d.op, compute_type(math), CUDA_R_32F), op, "cublasLtMatmulDescCreate (",
               to_string(math), ")");
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  check_cublas(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)), op,
               "setting TRANSA");
  check_cublas(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)), op,
               "setting TRANSB");
  if (epilogue_bias) {
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    check_cublas(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)), op,
                 "setting the bias epilogue");
    const cudaDataType_t bias_type = CUDA_R_32F;
    check_cublas(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type)),
                 op, "setting the bias type");
    check_cublas(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)), op,
                 "setting the bias pointer");
  }
  const auto m = static_cast<std::uint64_t>(O), n = static_cast<std::uint64_t>(N), k = static_cast<std::uint64_t>(I);
  // A = W^T stored (I, O) column-major, ld I; B = in^T (I, N), ld I; C = D = out^T (O, N), ld O.
  check_cublas(cublasLtMatrixLayoutCreate(&d.a, CUDA_R_32F, k, m, static_cast<std::int64_t>(I)), op, "layout of weight");
  check_cublas(cublasLtMatrixLayoutCreate(&d.b, CUDA_R_32F, k, n, static_cast<std::int64_t>(I)), op, "layout of in");
  check_cublas(cublasLtMatrixLayoutCreate(&d.c, CUDA_R_32F, m, n, static_cast<std::int64_t>(O)), op, "layout of out");

  check_cublas(cublasLtMatmulPreferenceCreate(&d.pref), op, "cublasLtMatmulPreferenceCreate");
  const std::uint64_t ws = ctx.workspace_bytes;
  check_cublas(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
               op, "setting the workspace size");
  // Views may start anywhere inside an allocation: tell the heuristic what the pointers guarantee.
  const std::uint32_t align_a = pointer_alignment(weight), align_b = pointer_alignment(in),
                      align_c = pointer_alignment(out);
  check_cublas(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a,
                                                    sizeof(align_a)), op, "setting alignment A");
  check_cublas(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b,
                                                    sizeof(align_b)), op, "setting alignment B");
  check_cublas(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c,
                                                    sizeof(align_c)), op, "setting alignment C");
  check_cublas(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c,
                                                    sizeof(align_c)), op, "setting alignment D");

  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t h = cublasLtMatmulAlgoGetHeuristic(ctx.handle, d.op, d.a, d.b, d.c, d.c, d.pref, 1, &result, &found);
  if (h != CUBLAS_STATUS_NOT_SUPPORTED) {
    check_cublas(h, op, "cublasLtMatmulAlgoGetHeuristic for (", N, ", ", I, ") x (", O, ", ", I, ")^T");
  }
  if (h == CUBLAS_STATUS_NOT_SUPPORTED || found == 0 || result.state != CUBLAS_STATUS_SUCCESS) return false;

  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  const cublasStatus_t s = cublasLtMatmul(ctx.handle, d.op, &alpha, weight, d.a, in, d.b, &beta, out, d.c, out, d.c,
                                          &result.algo, ctx.workspace, ctx.workspace_bytes, stream());
  if (s == CUBLAS_STATUS_NOT_SUPPORTED) return false;
  check_cublas(s, op, "cublasLtMatmul of (", N, ", ", I, ") x (", O, ", ", I, ")^T", epilogue_bias ? " with bias" : "",
               accumulate ? " accumulating" : "");
  return true;
}

/// Validates weight (O, I) and the optional bias (O).
template <class W, class B>
void check_linear_params(const char* op, const W& weight, const B& bias, const char* bias_name) {
  if (weight.rank() != 2 || weight.dim(0) == 0 || weight.dim(1) == 0) {
    fail<ShapeError>(op, ": weight: expected a non-empty (O, I) matrix in PyTorch layout, got shape ",
                     weight.shape().str());
  }
  if (!absent(bias)) expect_shape(bias, Shape{weight.dim(0)}, (std::string(op) + ": " + bias_name + " (O, the rows of weight)").c_str());
}

template <class T>
void linear(TensorView<T, Device> out, TensorView<const T, Device> in, TensorView<const T, Device> weight,
            TensorView<const T, Device> bias, Accumulate acc) {
  require_float<T>();
  const char* op = "linear";
  check_linear_params(op, weight, bias, "bias");
  const index_t O = weight.dim(0), I = weight.dim(1);
  const bool has_bias = !absent(bias);
  const index_t N = rows_of(in, I, op, "in");
  if (rows_of(out, O, op, "out") != N) {
    fail<ShapeError>("linear: out has shape ", out.shape().str(), ", expected ", Shape{N, O}.str(), " for ", N,
                     " input rows and ", O, " output features");
  }
  expect_separate(out, in, op, "in");
  expect_separate(out, weight, op, "weight");
  if (has_bias) expect_separate(out, bias, op, "bias");
  if (N == 0) return;
  const bool accumulate = acc == Accumulate::Yes;
  const DeviceMath math = device_math();
  if (has_bias && matmul(out.data(), in.data(), weight.data(), bias.data(), N, O, I, accumulate, true, math)) return;
  if (!matmul(out.data(), in.data(), weight.data(), nullptr, N, O, I, accumulate, false, math)) {
    fail<BackendError>("linear: cuBLASLt has no ", to_string(math), " algorithm for (", N, ", ", I, ") x (", O, ", ", I,
                       ")^T with these pointer alignments (", pointer_alignment(in.data()), ", ",
                       pointer_alignment(weight.data()), ", ", pointer_alignment(out.data()), " bytes)");
  }
  if (has_bias) {
    const index_t n_el = N * O;
    const dim3 block(256), grid(grid_for(n_el, 256));
    add_bias_kernel<T><<<grid, block, 0, stream()>>>(out.data(), bias.data(), N, O);
    check_launch(op, "the bias kernel for ", N, " rows of ", O, " features (", launch_str(grid, block), ")");
  }
}

}  // namespace longmem::detail::cuda
