#pragma once
// Device linear layer in PyTorch Linear layout through cuBLASLt, fp32 accumulation.
// float buffers: the compute type follows longmem::device_math() (cuda/math_mode.hpp):
// CUBLAS_COMPUTE_32F (fp32, the default: no rounding of the inputs), CUBLAS_COMPUTE_32F_FAST_TF32
// (tf32) or CUBLAS_COMPUTE_32F_FAST_16BF (bf16: cuBLASLt may round the inputs to bf16; on an H200
// it ran the tf32 kernels).
// bfloat16 or half buffers (forward only): A, B, C, D and the bias in bf16 (fp16), CUBLAS_COMPUTE_32F
// (bf16 or fp16 tensor cores, fp32 accumulation, the result rounded once); device_math() does not apply.
//   linear            out (N, O) [+]= in (N, I) W (O, I)^T + b (O)
//   linear_gelu       out (N, O) = gelu(in W^T + b): on bf16/fp16 buffers the tanh form goes through
//                     cuBLASLt's GELU epilogue (the tanh approximation, computed on the fp32
//                     accumulator before the one rounding to the output type); float buffers, the
//                     erf form and padded outputs run linear + gelu
//   linear_backward   d_in (N, I) [+]= d_out W;  d_W (O, I) += d_out^T in;  d_b (O) += sum_n d_out
//   gemm              any row-major C = op(A) op(B) (+ C), strided-batched (linear_backward, the
//                     attention backward)
//
// cuBLASLt is column-major. The row-major buffers read column-major are out^T (O, N), in^T (I, N)
// and W^T (I, O), so the product is out^T = op(W^T) in^T with op = transpose: m = O, n = N, k = I.
// The bias is one value per row of out^T, which is what CUBLASLT_EPILOGUE_BIAS broadcasts, and it is
// added on top of beta * C, so Accumulate::Yes is beta = 1 with C = D = out.
//
// Dispatch:
//   bias, heuristic finds an algorithm with the bias epilogue   one cublasLtMatmul
//   otherwise                                                   cublasLtMatmul, then a bias kernel
//   rows of out not whole 16-byte units (O = 50,257)            the same on blocks of rows into a
//                                                               padded scratch, each copied out (linear_padded)
//
// The handle and a 32 MiB workspace are created once per device, on first use, under a mutex, and
// never destroyed (destroying them from a static destructor races the CUDA runtime's own teardown
// at exit). The workspace is shared by every call on the device: they are all enqueued on stream()
// and so run one after another; giving ops their own streams will need a workspace per stream.
#include <cublasLt.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>

#include "longmem/cuda/math_mode.hpp"
#include "longmem/cuda/ops/common.cuh"
#include "longmem/cuda/ops/elementwise.cuh"
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

/// What decides cuBLASLt's choice of algorithm: the device, compute type, epilogue, transposes,
/// sizes, leading dimensions, batch and strides, pointer alignments.
using GemmKey = std::array<std::int64_t, 18>;

/// The heuristic's first algorithm for a GEMM, remembered per GemmKey: the query costs about as
/// much as a small GEMM, and training repeats the same few dozen shapes every update. Returns
/// false when no algorithm supports the request (remembered too).
inline bool cached_algo(const BlasLtContext& ctx, const MatmulDescriptors& d, const GemmKey& key, const char* op,
                        cublasLtMatmulAlgo_t& algo) {
  static std::mutex mutex;
  static std::map<GemmKey, std::optional<cublasLtMatmulAlgo_t>> cache;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (auto it = cache.find(key); it != cache.end()) {
      if (it->second) algo = *it->second;
      return it->second.has_value();
    }
  }
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t h = cublasLtMatmulAlgoGetHeuristic(ctx.handle, d.op, d.a, d.b, d.c, d.c, d.pref, 1, &result, &found);
  if (h != CUBLAS_STATUS_NOT_SUPPORTED) check_cublas(h, op, "cublasLtMatmulAlgoGetHeuristic");
  std::optional<cublasLtMatmulAlgo_t> chosen;
  if (h != CUBLAS_STATUS_NOT_SUPPORTED && found > 0 && result.state == CUBLAS_STATUS_SUCCESS) chosen = result.algo;
  std::lock_guard<std::mutex> lock(mutex);
  cache.emplace(key, chosen);
  if (chosen) algo = *chosen;
  return chosen.has_value();
}

/// out (N, O) += bias (O) per row, for the path without the epilogue (E float, __nv_bfloat16 or __half).
template <class E>
__global__ void add_bias_kernel(E* out, const E* __restrict__ bias, index_t N, index_t O) {
  const index_t n_el = N * O;
  for (index_t i = blockIdx.x * index_t{blockDim.x} + threadIdx.x; i < n_el; i += index_t{gridDim.x} * blockDim.x) {
    out[i] = device_store<E>(device_load(out[i]) + device_load(bias[i % O]));
  }
}

/// The cuBLASLt compute type of a device math mode.
inline cublasComputeType_t compute_type(DeviceMath m) {
  switch (m) {
    case DeviceMath::tf32: return CUBLAS_COMPUTE_32F_FAST_TF32;
    case DeviceMath::bf16: return CUBLAS_COMPUTE_32F_FAST_16BF;
    case DeviceMath::fp32: break;
  }
  return CUBLAS_COMPUTE_32F;
}

/// The cuBLASLt data type of a buffer element type.
template <class T>
constexpr cudaDataType_t blas_data_type() {
  if constexpr (std::is_same_v<T, bfloat16>) {
    return CUDA_R_16BF;
  } else if constexpr (std::is_same_v<T, half>) {
    return CUDA_R_16F;
  } else {
    static_assert(std::is_same_v<T, float>, "cuBLASLt GEMMs take float, bfloat16 or half buffers");
    return CUDA_R_32F;
  }
}

/// What a failed GEMM's message calls its arithmetic.
inline std::string arithmetic_name(cudaDataType_t type, DeviceMath math) {
  return type == CUDA_R_16BF ? "bf16" : type == CUDA_R_16F ? "fp16" : to_string(math);
}

/// What cuBLASLt applies to the product before it is stored (the values are cublasLtEpilogue_t's).
enum class Epilogue : int {
  None = CUBLASLT_EPILOGUE_DEFAULT,
  Bias = CUBLASLT_EPILOGUE_BIAS,          // + bias per output feature
  Gelu = CUBLASLT_EPILOGUE_GELU,          // gelu (tanh form)
  GeluBias = CUBLASLT_EPILOGUE_GELU_BIAS  // gelu(. + bias)
};

inline bool epilogue_has_bias(Epilogue e) { return e == Epilogue::Bias || e == Epilogue::GeluBias; }

inline const char* epilogue_name(Epilogue e) {
  switch (e) {
    case Epilogue::Bias: return " with bias";
    case Epilogue::Gelu: return " with GELU";
    case Epilogue::GeluBias: return " with bias and GELU";
    default: return "";
  }
}

/// One cuBLASLt GEMM: out = epilogue(W in (+ beta out)).
/// Returns false, having enqueued nothing, when no algorithm supports the request.
/// out, in, weight, bias all of element type `type` (CUDA_R_32F: compute as `math` says;
/// CUDA_R_16BF / CUDA_R_16F: CUBLAS_COMPUTE_32F, bf16 / fp16 tensor cores).
/// `ld_out` is the stored length of out's rows (O, or more for a padded output).
inline bool matmul(void* out, const void* in, const void* weight, const void* bias, index_t N, index_t O, index_t I,
                   bool accumulate, Epilogue epilogue, DeviceMath math, cudaDataType_t type = CUDA_R_32F,
                   index_t ld_out = 0) {
  if (ld_out == 0) ld_out = O;
  const char* op = "linear";
  const BlasLtContext& ctx = blaslt_context();
  MatmulDescriptors d;
  const cublasComputeType_t compute = type == CUDA_R_32F ? compute_type(math) : CUBLAS_COMPUTE_32F;
  check_cublas(cublasLtMatmulDescCreate(&d.op, compute, CUDA_R_32F), op, "cublasLtMatmulDescCreate (",
               arithmetic_name(type, math), ")");
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  check_cublas(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_a, sizeof(trans_a)), op,
               "setting TRANSA");
  check_cublas(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &trans_b, sizeof(trans_b)), op,
               "setting TRANSB");
  if (epilogue != Epilogue::None) {
    const auto epi = static_cast<cublasLtEpilogue_t>(epilogue);
    check_cublas(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)), op,
                 "setting the epilogue", epilogue_name(epilogue));
  }
  if (epilogue_has_bias(epilogue)) {
    const cudaDataType_t bias_type = type;
    check_cublas(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type)),
                 op, "setting the bias type");
    check_cublas(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)), op,
                 "setting the bias pointer");
  }
  const auto m = static_cast<std::uint64_t>(O), n = static_cast<std::uint64_t>(N), k = static_cast<std::uint64_t>(I);
  // A = W^T stored (I, O) column-major, ld I; B = in^T (I, N), ld I; C = D = out^T (O, N), ld O.
  check_cublas(cublasLtMatrixLayoutCreate(&d.a, type, k, m, static_cast<std::int64_t>(I)), op, "layout of weight");
  check_cublas(cublasLtMatrixLayoutCreate(&d.b, type, k, n, static_cast<std::int64_t>(I)), op, "layout of in");
  check_cublas(cublasLtMatrixLayoutCreate(&d.c, type, m, n, static_cast<std::int64_t>(ld_out)), op, "layout of out");

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

  const GemmKey key{current_device(), static_cast<std::int64_t>(compute) * 1000 + static_cast<std::int64_t>(type),
                    static_cast<std::int64_t>(epilogue), 1, 0, O, N, I, I, I, ld_out, 1, 0, 0, 0, align_a, align_b, align_c};
  cublasLtMatmulAlgo_t algo;
  if (!cached_algo(ctx, d, key, op, algo)) return false;

  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  const cublasStatus_t s = cublasLtMatmul(ctx.handle, d.op, &alpha, weight, d.a, in, d.b, &beta, out, d.c, out, d.c,
                                          &algo, ctx.workspace, ctx.workspace_bytes, stream());
  if (s == CUBLAS_STATUS_NOT_SUPPORTED) return false;
  check_cublas(s, op, "cublasLtMatmul of (", N, ", ", I, ") x (", O, ", ", I, ")^T", epilogue_name(epilogue),
               accumulate ? " accumulating" : "");
  return true;
}

using op_checks::check_linear;
using op_checks::check_linear_params;

/// Scratch for linear_padded's output blocks, one per device, grown on demand and kept (like the
/// cuBLASLt workspace). Every call runs on stream(), so one block is done before the next is written.
inline void* padded_output_scratch(std::size_t bytes) {
  static std::mutex mutex;
  static std::array<std::pair<void*, std::size_t>, max_devices> scratch{};
  const int dev = current_device();
  if (dev < 0 || dev >= max_devices) fail<BackendError>("linear: device ", dev, " is beyond the ", max_devices, " supported");
  std::lock_guard<std::mutex> lock(mutex);
  auto& [ptr, size] = scratch[static_cast<std::size_t>(dev)];
  if (size < bytes) {
    void* p = nullptr;
    check(cudaMalloc(&p, bytes), "linear", "cudaMalloc of ", bytes, " bytes of padded-output scratch on device ", dev);
    if (ptr) (void)cudaFree(ptr);  // waits for the device: no kernel still writes the old block
    ptr = p;
    size = bytes;
  }
  return ptr;
}

/// Bytes of linear_padded's scratch when the rows allow it: 64 MiB is 640 rows of the tied head
/// at V 50,257 in bf16, enough for cuBLASLt to fill the GPU.
inline constexpr std::size_t padded_block_bytes = std::size_t{64} << 20;

/// Columns of an output row padded to whole 16-byte units: cuBLASLt's fast Hopper kernels need every
/// leading dimension in such units, and given another (the tied head's V = 50,257) it runs a generic
/// kernel 6x slower (8.8 ms against 1.4 ms for (8192, 1024) x (50257, 1024)^T in bf16, one H100).
template <class T>
constexpr index_t padded_columns(index_t O) {
  constexpr index_t per_unit = 16 / static_cast<index_t>(sizeof(T));
  return (O + per_unit - 1) / per_unit * per_unit;
}

/// linear for an out whose rows are not whole 16-byte units: the product of `rows` input rows at a
/// time goes to a scratch of padded rows, then one 2D copy puts it in place (with accumulation the
/// rows are first copied into the scratch). Bias as in linear: epilogue, else a kernel on out.
template <class T>
void linear_padded(T* out, const T* in, const T* weight, const T* bias, index_t N, index_t O, index_t I, bool accumulate,
                   DeviceMath math) {
  const char* op = "linear";
  constexpr cudaDataType_t type = blas_data_type<T>();
  const index_t O_pad = padded_columns<T>(O);
  const std::size_t row_bytes = static_cast<std::size_t>(O_pad) * sizeof(T), out_row_bytes = static_cast<std::size_t>(O) * sizeof(T);
  index_t rows = std::max<index_t>(1, static_cast<index_t>(padded_block_bytes / row_bytes));
  if (rows > 128) rows -= rows % 128;  // whole 128-row tiles
  rows = std::min(rows, N);
  T* scratch = static_cast<T*>(padded_output_scratch(static_cast<std::size_t>(rows) * row_bytes));
  for (index_t n0 = 0; n0 < N; n0 += rows) {
    const index_t nb = std::min(rows, N - n0);
    T* o = out + n0 * O;
    if (accumulate) {
      check(cudaMemcpy2DAsync(scratch, row_bytes, o, out_row_bytes, out_row_bytes, nb, cudaMemcpyDeviceToDevice, stream()),
            op, "copying ", nb, " rows of ", O, " into the padded scratch");
    }
    const bool fused_bias =
        bias && matmul(scratch, in + n0 * I, weight, bias, nb, O, I, accumulate, Epilogue::Bias, math, type, O_pad);
    if (!fused_bias && !matmul(scratch, in + n0 * I, weight, nullptr, nb, O, I, accumulate, Epilogue::None, math, type, O_pad)) {
      fail<BackendError>("linear: cuBLASLt has no ", arithmetic_name(type, math), " algorithm for (", nb,
                         ", ", I, ") x (", O, ", ", I, ")^T into rows padded to ", O_pad);
    }
    check(cudaMemcpy2DAsync(o, out_row_bytes, scratch, row_bytes, out_row_bytes, nb, cudaMemcpyDeviceToDevice, stream()),
          op, "copying ", nb, " rows of ", O, " out of the padded scratch");
    if (bias && !fused_bias) {
      const index_t n_el = nb * O;
      const dim3 block(256), grid(grid_for(n_el, 256));
      add_bias_kernel<<<grid, block, 0, stream()>>>(device_ptr(o), device_ptr(bias), nb, O);
      check_launch(op, "the bias kernel for ", nb, " rows of ", O, " features (", launch_str(grid, block), ")");
    }
  }
}

/// linear's GEMM and bias on checked arguments (out (N, O), in (N, I), weight (O, I), bias (O) or null).
template <class T>
void enqueue_linear(T* out, const T* in, const T* weight, const T* bias, index_t N, index_t O, index_t I,
                    bool accumulate) {
  const DeviceMath math = device_math();
  constexpr cudaDataType_t type = blas_data_type<T>();
  if (padded_columns<T>(O) != O) {
    linear_padded(out, in, weight, bias, N, O, I, accumulate, math);
    return;
  }
  if (bias && matmul(out, in, weight, bias, N, O, I, accumulate, Epilogue::Bias, math, type)) return;
  if (!matmul(out, in, weight, nullptr, N, O, I, accumulate, Epilogue::None, math, type)) {
    fail<BackendError>("linear: cuBLASLt has no ", arithmetic_name(type, math),
                       " algorithm for (", N, ", ", I, ") x (", O, ", ", I,
                       ")^T with these pointer alignments (", pointer_alignment(in), ", ",
                       pointer_alignment(weight), ", ", pointer_alignment(out), " bytes)");
  }
  if (bias) {
    const index_t n_el = N * O;
    const dim3 block(256), grid(grid_for(n_el, 256));
    add_bias_kernel<<<grid, block, 0, stream()>>>(device_ptr(out), device_ptr(bias), N, O);
    check_launch("linear", "the bias kernel for ", N, " rows of ", O, " features (", launch_str(grid, block), ")");
  }
}

template <class T>
void linear(TensorView<T, Device> out, TensorView<const T, Device> in, TensorView<const T, Device> weight,
            TensorView<const T, Device> bias, Accumulate acc) {
  require_forward_element<T>();
  const index_t N = check_linear("linear", out, in, weight, bias);
  if (N == 0) return;
  enqueue_linear(out.data(), in.data(), weight.data(), absent(bias) ? nullptr : bias.data(), N, weight.dim(0),
                 weight.dim(1), acc == Accumulate::Yes);
}

/// out (N, O) = gelu(in W^T + b). On bf16/fp16 buffers the tanh form, with out rows in whole 16-byte
/// units, goes through cuBLASLt's GELU epilogue: one GEMM, no separate pass over out. Float buffers
/// keep linear + gelu: cuBLASLt does not document the accuracy of its GELU arithmetic, which is
/// far inside a 16-bit output's rounding but could exceed the fp32 model's. Otherwise, or when
/// cuBLASLt has no such algorithm, linear then gelu in place.
template <class T>
void linear_gelu(TensorView<T, Device> out, TensorView<const T, Device> in, TensorView<const T, Device> weight,
                 TensorView<const T, Device> bias, Activation kind) {
  require_forward_element<T>();
  check_activation("linear_gelu", kind);
  const index_t N = check_linear("linear_gelu", out, in, weight, bias);
  if (N == 0) return;
  const index_t O = weight.dim(0), I = weight.dim(1);
  const T* b = absent(bias) ? nullptr : bias.data();
  if (HalfWidthType<T> && kind == Activation::GeluTanh && padded_columns<T>(O) == O &&
      matmul(out.data(), in.data(), weight.data(), b, N, O, I, false, b ? Epilogue::GeluBias : Epilogue::Gelu,
             device_math(), blas_data_type<T>())) {
    return;
  }
  enqueue_linear(out.data(), in.data(), weight.data(), b, N, O, I, false);
  launch_gelu(out.data(), out.data(), out.numel(), kind);
}

// ---------------------------------------------------------------------------------------------
// General GEMM and the backward

/// Row-major C (M, N) = op(A) (M, K) op(B) (K, N) + beta C, `batch` times: matrix b of each operand
/// starts `stride_*` elements after matrix b - 1. A is stored (K, M) when ta, B (N, K) when tb;
/// lda, ldb, ldc are stored row lengths. Read column-major, the row-major buffers are transposes,
/// so cuBLASLt computes C^T (N, M) = op(B)^T op(A)^T: B is its first operand, A its second.
struct GemmOperand {
  const float* data;
  index_t ld, stride;
  bool transposed;
};

inline void gemm(const char* op, index_t M, index_t N, index_t K, GemmOperand A, GemmOperand B, float beta, float* C,
                 index_t ldc, index_t stride_c, int batch, DeviceMath math) {
  if (M == 0 || N == 0 || batch == 0) return;
  const BlasLtContext& ctx = blaslt_context();
  MatmulDescriptors d;
  check_cublas(cublasLtMatmulDescCreate(&d.op, compute_type(math), CUDA_R_32F), op, "cublasLtMatmulDescCreate (",
               to_string(math), ")");
  const cublasOperation_t trans_first = B.transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t trans_second = A.transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
  check_cublas(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_first, sizeof(trans_first)), op,
               "setting TRANSA");
  check_cublas(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &trans_second, sizeof(trans_second)),
               op, "setting TRANSB");
  auto u = [](index_t x) { return static_cast<std::uint64_t>(x); };
  // Stored column-major shapes: B^T is (N, K) or, transposed, (K, N); A^T is (K, M) or (M, K).
  check_cublas(cublasLtMatrixLayoutCreate(&d.a, CUDA_R_32F, B.transposed ? u(K) : u(N), B.transposed ? u(N) : u(K), B.ld),
               op, "layout of the second factor");
  check_cublas(cublasLtMatrixLayoutCreate(&d.b, CUDA_R_32F, A.transposed ? u(M) : u(K), A.transposed ? u(K) : u(M), A.ld),
               op, "layout of the first factor");
  check_cublas(cublasLtMatrixLayoutCreate(&d.c, CUDA_R_32F, u(N), u(M), ldc), op, "layout of the product");
  if (batch > 1) {
    const std::int32_t count = batch;
    const std::int64_t strides[3] = {B.stride, A.stride, stride_c};
    cublasLtMatrixLayout_t layouts[3] = {d.a, d.b, d.c};
    for (int i = 0; i < 3; ++i) {
      check_cublas(cublasLtMatrixLayoutSetAttribute(layouts[i], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)),
                   op, "setting the batch count");
      check_cublas(cublasLtMatrixLayoutSetAttribute(layouts[i], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &strides[i],
                                                    sizeof(strides[i])), op, "setting the batch stride");
    }
  }
  check_cublas(cublasLtMatmulPreferenceCreate(&d.pref), op, "cublasLtMatmulPreferenceCreate");
  const std::uint64_t ws = ctx.workspace_bytes;
  check_cublas(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
               op, "setting the workspace size");
  // With a batch, every matrix's start counts: the alignment of the strides too.
  auto align = [&](const void* p, index_t stride) {
    std::uint32_t a = pointer_alignment(p);
    if (batch > 1) a = std::min(a, pointer_alignment(reinterpret_cast<const void*>(static_cast<std::uintptr_t>(stride) * 4)));
    return a;
  };
  const std::uint32_t align_a = align(B.data, B.stride), align_b = align(A.data, A.stride), align_c = align(C, stride_c);
  const cublasLtMatmulPreferenceAttributes_t which[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  const std::uint32_t values[4] = {align_a, align_b, align_c, align_c};
  for (int i = 0; i < 4; ++i) {
    check_cublas(cublasLtMatmulPreferenceSetAttribute(d.pref, which[i], &values[i], sizeof(values[i])), op,
                 "setting an alignment");
  }
  const GemmKey key{current_device(), static_cast<std::int64_t>(compute_type(math)), 0, B.transposed, A.transposed,
                    M, N, K, A.ld, B.ld, ldc, batch, A.stride, B.stride, stride_c, align_a, align_b, align_c};
  cublasLtMatmulAlgo_t algo;
  if (!cached_algo(ctx, d, key, op, algo)) {
    fail<BackendError>(op, ": cuBLASLt has no ", to_string(math), " algorithm for a ", M, " x ", N, " x ", K,
                       " product (batch ", batch, ") with these pointer alignments (", align_a, ", ", align_b, ", ",
                       align_c, " bytes)");
  }
  const float alpha = 1.0f;
  check_cublas(cublasLtMatmul(ctx.handle, d.op, &alpha, B.data, d.a, A.data, d.b, &beta, C, d.c, C, d.c, &algo,
                              ctx.workspace, ctx.workspace_bytes, stream()),
               op, "cublasLtMatmul of ", M, " x ", N, " x ", K, " (batch ", batch, ")");
}

/// linear_backward (see the header); the argument checks are the host backend's.
template <class T>
void linear_backward(TensorView<T, Device> d_in, TensorView<T, Device> d_weight, TensorView<T, Device> d_bias,
                     TensorView<const T, Device> d_out, TensorView<const T, Device> in, TensorView<const T, Device> weight,
                     Accumulate acc) {
  require_float<T>();
  const char* op = "linear_backward";
  check_linear_params(op, weight, TensorView<const T, Device>{}, "bias");
  const index_t O = weight.dim(0), I = weight.dim(1);
  const index_t N = op_checks::check_linear_backward(op, d_in, d_weight, d_bias, d_out, in, weight);
  if (N == 0) return;
  const DeviceMath math = device_math();
  // d_in (N, I) [+]= d_out (N, O) W (O, I)
  if (!absent(d_in)) {
    gemm(op, N, I, O, {d_out.data(), O, 0, false}, {weight.data(), I, 0, false}, acc == Accumulate::Yes ? 1.0f : 0.0f,
         d_in.data(), I, 0, 1, math);
  }
  // d_W (O, I) += d_out^T (O, N) in (N, I)
  if (!absent(d_weight)) {
    gemm(op, O, I, N, {d_out.data(), O, 0, true}, {in.data(), I, 0, false}, 1.0f, d_weight.data(), I, 0, 1, math);
  }
  if (!absent(d_bias)) add_column_sums(op, d_bias.data(), nullptr, d_out.data(), nullptr, nullptr, nullptr, N, O);
}

}  // namespace longmem::detail::cuda
