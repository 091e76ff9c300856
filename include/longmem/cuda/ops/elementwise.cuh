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
#include <algorithm>
#include <cstdint>
#include <cstring>

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

/// Elementwise kernels read and write 16 bytes per access (8 bf16 or 4 floats) when every pointer
/// is 16-byte aligned (`vec`): one-element accesses left the bf16 GELU at 40% of the copy bandwidth
/// (106 us for 2 x 64 MB on an H100). The first n / V x V elements go by vectors, the rest one by
/// one; each element is computed as in the one-element form, so results do not change.
/// Grid for n elements, with 16-byte accesses (vec) or without.
template <class E>
dim3 elementwise_grid(index_t n, bool vec) {
  return dim3(grid_for(vec ? std::max<index_t>(1, n / vec_elements<E>) : n, elementwise_block));
}

/// fn.operator()<V>(i) for the groups of V elements starting at i that cover [0, n): V =
/// vec_elements when vec (up to the last whole group), then V = 1 for the rest.
template <class E, class Fn>
__device__ inline void for_each_element(index_t n, bool vec, Fn&& fn) {
  constexpr index_t V = vec_elements<E>;
  const index_t start = blockIdx.x * index_t{blockDim.x} + threadIdx.x, step = index_t{gridDim.x} * blockDim.x;
  const index_t nv = vec ? n / V : 0;
  for (index_t i = start; i < nv; i += step) fn.template operator()<V>(i * V);
  for (index_t i = nv * V + start; i < n; i += step) fn.template operator()<1>(i);
}

/// y = gelu(x); y may be x (each element is read and written by one thread). E: float or
/// __nv_bfloat16 (computed in float, rounded once).
template <class E>
__global__ void gelu_kernel(E* y, const E* x, index_t n, bool tanh_form, bool vec) {
  for_each_element<E>(n, vec, [&]<index_t V>(index_t i) {
    float v[V];
    load_elements<V>(x + i, v);
#pragma unroll
    for (index_t j = 0; j < V; ++j) v[j] = gelu_value(v[j], tanh_form);
    store_elements<V>(y + i, v);
  });
}

/// y += a (- b when b is not null); a - b first, in float, then the sum, rounded once.
template <class E>
__global__ void add_kernel(E* y, const E* a, const E* b, index_t n, bool vec) {
  for_each_element<E>(n, vec, [&]<index_t V>(index_t i) {
    float yv[V], av[V], bv[V];
    load_elements<V>(y + i, yv);
    load_elements<V>(a + i, av);
    if (b) load_elements<V>(b + i, bv);
#pragma unroll
    for (index_t j = 0; j < V; ++j) yv[j] += b ? av[j] - bv[j] : av[j];
    store_elements<V>(y + i, yv);
  });
}

template <class T>
void launch_gelu(T* y, const T* x, index_t n, Activation kind) {
  using E = device_element_t<T>;
  const bool vec = vec_aligned(y, x);
  const dim3 block(elementwise_block), grid(elementwise_grid<E>(n, vec));
  gelu_kernel<<<grid, block, 0, stream()>>>(device_ptr(y), device_ptr(x), n, kind == Activation::GeluTanh, vec);
  check_launch("gelu", "the kernel for ", n, " elements (", launch_str(grid, block), ")");
}

template <class T>
void launch_add(const char* op, T* y, const T* a, const T* b, index_t n) {
  using E = device_element_t<T>;
  const bool vec = vec_aligned(y, a, b);
  const dim3 block(elementwise_block), grid(elementwise_grid<E>(n, vec));
  add_kernel<<<grid, block, 0, stream()>>>(device_ptr(y), device_ptr(a), device_ptr(b), n, vec);
  check_launch(op, "the kernel for ", n, " elements (", launch_str(grid, block), ")");
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
  launch_add("add", out.data(), in.data(), static_cast<const T*>(nullptr), out.numel());
}

/// out += a - b.
template <class T>
void add_difference(TensorView<T, Device> out, TensorView<const T, Device> a, TensorView<const T, Device> b) {
  require_forward_element<T>();
  expect_same_elements(out, a, "add_difference", "a");
  expect_same_elements(out, b, "add_difference", "b");
  if (absent(out)) return;
  launch_add("add_difference", out.data(), a.data(), b.data(), out.numel());
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
