#pragma once
// Device elementwise ops, grid-stride loops over the flat elements:
//   gelu             tanh: 0.5 x (1 + tanh(c (x + a x^3)))        c = sqrt(2/pi), a = 0.044715
//                    erf:  0.5 x (1 + erf(x / sqrt 2))
//   add              out += in
//   add_difference   out += a - b
//   gelu_backward    d_in = d_out gelu'(in)
// CUDA's tanhf and erff (a few ulp) stand in for the host's Eigen tanh and vectorised erf.
// The forward ops take float or bfloat16 buffers (bf16: computed in float, rounded once on write);
// gelu_backward is float only.
#include "longmem/cuda/ops/common.cuh"
#include "longmem/model_config.hpp"

namespace longmem::detail::cuda {

inline void check_activation(const char* op, Activation kind) {
  if (kind != Activation::GeluTanh && kind != Activation::GeluErf) {
    fail<InputError>(op, ": unknown activation kind ", static_cast<int>(kind));
  }
}

inline constexpr unsigned elementwise_block = 256;

__device__ inline float gelu_value(float v, bool tanh_form) {
  if (tanh_form) return 0.5f * v * (1.0f + tanhf(0.7978845608f * (v + 0.044715f * v * v * v)));
  return 0.5f * v * (1.0f + erff(v * 0.7071067812f));
}

/// y = gelu(x); y may be x (each element is read and written by one thread). E: float or
/// __nv_bfloat16 (computed in float, rounded once).
template <class E>
__global__ void gelu_kernel(E* y, const E* x, index_t n, bool tanh_form) {
  for (index_t i = blockIdx.x * index_t{blockDim.x} + threadIdx.x; i < n; i += index_t{gridDim.x} * blockDim.x) {
    y[i] = device_store<E>(gelu_value(device_load(x[i]), tanh_form));
  }
}

/// y += a (- b when b is not null); a - b first, in float, then the sum, rounded once.
template <class E>
__global__ void add_kernel(E* y, const E* a, const E* b, index_t n) {
  for (index_t i = blockIdx.x * index_t{blockDim.x} + threadIdx.x; i < n; i += index_t{gridDim.x} * blockDim.x) {
    const float r = b ? device_load(a[i]) - device_load(b[i]) : device_load(a[i]);
    y[i] = device_store<E>(device_load(y[i]) + r);
  }
}

template <class T>
void launch_gelu(T* y, const T* x, index_t n, Activation kind) {
  const dim3 block(elementwise_block), grid(grid_for(n, elementwise_block));
  gelu_kernel<<<grid, block, 0, stream()>>>(device_ptr(y), device_ptr(x), n, kind == Activation::GeluTanh);
  check_launch("gelu", "the kernel for ", n, " elements (", launch_str(grid, block), ")");
}

/// x = gelu(x) in place.
template <class T>
void gelu(TensorView<T, Device> x, Activation kind) {
  require_forward_element<T>();
  check_activation("gelu", kind);
  if (absent(x)) return;
  launch_gelu(x.data(), x.data(), x.numel(), kind);
}

/// out = gelu(in); out may be in.
template <class T>
void gelu(TensorView<T, Device> out, TensorView<const T, Device> in, Activation kind) {
  require_forward_element<T>();
  check_activation("gelu", kind);
  expect_same_elements(out, in, "gelu", "in");
  if (out.data() != in.data()) expect_separate(out, in, "gelu", "in (only exact in-place use is allowed)");
  if (absent(out)) return;
  launch_gelu(out.data(), in.data(), out.numel(), kind);
}

/// out += in.
template <class T>
void add(TensorView<T, Device> out, TensorView<const T, Device> in) {
  require_forward_element<T>();
  expect_same_elements(out, in, "add", "in");
  if (absent(out)) return;
  const index_t n = out.numel();
  const dim3 block(elementwise_block), grid(grid_for(n, elementwise_block));
  add_kernel<<<grid, block, 0, stream()>>>(device_ptr(out.data()), device_ptr(in.data()),
                                           static_cast<const device_element_t<T>*>(nullptr), n);
  check_launch("add", "the kernel for ", n, " elements (", launch_str(grid, block), ")");
}

/// out += a - b.
template <class T>
void add_difference(TensorView<T, Device> out, TensorView<const T, Device> a, TensorView<const T, Device> b) {
  require_forward_element<T>();
  expect_same_elements(out, a, "add_difference", "a");
  expect_same_elements(out, b, "add_difference", "b");
  if (absent(out)) return;
  const index_t n = out.numel();
  const dim3 block(elementwise_block), grid(grid_for(n, elementwise_block));
  add_kernel<<<grid, block, 0, stream()>>>(device_ptr(out.data()), device_ptr(a.data()), device_ptr(b.data()), n);
  check_launch("add_difference", "the kernel for ", n, " elements (", launch_str(grid, block), ")");
}

/// gelu'(x): tanh form  0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2),  t = tanh(c (x + a x^3));
///           erf form   Phi(x) + x phi(x).
__device__ inline float gelu_derivative(float v, bool tanh_form) {
  if (tanh_form) {
    const float c = 0.7978845608f, a = 0.044715f;
    const float t = tanhf(c * (v + a * v * v * v));
    return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * c * (1.0f + 3.0f * a * v * v);
  }
  return 0.5f * (1.0f + erff(v * 0.7071067812f)) + v * 0.3989422804f * expf(-0.5f * v * v);
}

/// d_in = d_out * gelu'(x); d_in may be d_out (each element read and written by one thread).
template <class T>
__global__ void gelu_backward_kernel(T* d_in, const T* d_out, const T* __restrict__ x, index_t n, bool tanh_form) {
  for (index_t i = blockIdx.x * index_t{blockDim.x} + threadIdx.x; i < n; i += index_t{gridDim.x} * blockDim.x) {
    d_in[i] = d_out[i] * gelu_derivative(x[i], tanh_form);
  }
}

/// d_in = d_out * gelu'(in), elementwise; d_in may be d_out itself.
template <class T>
void gelu_backward(TensorView<T, Device> d_in, TensorView<const T, Device> d_out, TensorView<const T, Device> in,
                   Activation kind) {
  require_float<T>();
  const char* op = "gelu_backward";
  check_activation(op, kind);
  expect_same_elements(d_in, d_out, op, "d_out");
  expect_same_elements(d_in, in, op, "in");
  if (d_in.data() != d_out.data()) expect_separate(d_in, d_out, op, "d_out (only exact in-place use is allowed)");
  expect_separate(d_in, in, op, "in");
  if (absent(d_in)) return;
  const index_t n = d_in.numel();
  const dim3 block(elementwise_block), grid(grid_for(n, elementwise_block));
  gelu_backward_kernel<T><<<grid, block, 0, stream()>>>(d_in.data(), d_out.data(), in.data(), n, kind == Activation::GeluTanh);
  check_launch(op, "the kernel for ", n, " elements (", launch_str(grid, block), ")");
}

}  // namespace longmem::detail::cuda
