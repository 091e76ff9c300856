#pragma once
// Device token (and learned position) embedding.
//   embedding            out (T, d) = wte[tokens] (+ wpe[0..T))
//   embedding_backward   d_wte[tokens[t]] += d_out[t];  d_wpe[t] += d_out[t]   (no atomics)
// Token ids arrive as a host span: they are checked on the host exactly as the host backend
// checks them (so nothing is written when one is bad), then copied to a scratch buffer.
#include <algorithm>
#include <cstdint>
#include <vector>
#include <span>

#include "longmem/cuda/ops/common.cuh"

namespace longmem::detail::cuda {

/// Checks wte (V, d), the optional wpe (P, d), the token ids and the (T, d) output `rows`; returns d.
template <class T, class Rows>
index_t check_embedding(const char* op, const Rows& rows, std::span<const std::int32_t> tokens,
                        TensorView<const T, Device> wte, TensorView<const T, Device> wpe, const char* rows_name) {
  const index_t n_tok = static_cast<index_t>(tokens.size());
  if (n_tok == 0) fail<InputError>(op, ": the segment is empty; pass at least one token");
  if (wte.rank() != 2 || wte.dim(0) == 0 || wte.dim(1) == 0) {
    fail<ShapeError>(op, ": wte: expected a non-empty (V, d) tensor, got shape ", wte.shape().str());
  }
  const index_t V = wte.dim(0), d = wte.dim(1);
  if (!absent(wpe)) {
    if (wpe.rank() != 2 || wpe.dim(1) != d) {
      fail<ShapeError>(op, ": wpe: expected shape (P, ", d, ") to match wte's width, got ", wpe.shape().str());
    }
    if (n_tok > wpe.dim(0)) {
      fail<InputError>(op, ": the segment has ", n_tok, " tokens but the model has only ", wpe.dim(0),
                       " positions (wpe rows); split the input into segments of at most ", wpe.dim(0), " tokens");
    }
  }
  if (rows_of(rows, d, op, rows_name) != n_tok) {
    fail<ShapeError>(op, ": ", rows_name, ": expected shape ", Shape{n_tok, d}.str(), " for ", n_tok, " tokens, got ",
                     rows.shape().str());
  }
  for (index_t t = 0; t < n_tok; ++t) {
    const std::int32_t id = tokens[static_cast<std::size_t>(t)];
    if (id < 0 || id >= V) {
      fail<InputError>(op, ": token id ", id, " at position ", t, " is outside the vocabulary [0, ", V, ")");
    }
  }
  return d;
}

/// One block per token row; threads stride over the d features. Same float sum as the host; E
/// float, __nv_bfloat16 or __half (the sum in float, rounded once).
template <class E>
__global__ void embedding_kernel(E* __restrict__ out /*(T,d)*/, const std::int32_t* __restrict__ tokens /*(T)*/,
                                 const E* __restrict__ wte /*(V,d)*/, const E* __restrict__ wpe /*(P,d) or null*/,
                                 index_t n_tok, index_t d) {
  for (index_t t = blockIdx.x; t < n_tok; t += gridDim.x) {
    const E* e = wte + static_cast<index_t>(tokens[t]) * d;
    E* y = out + t * d;
    if (wpe) {
      const E* pe = wpe + t * d;
      for (index_t c = threadIdx.x; c < d; c += blockDim.x) y[c] = device_store<E>(device_load(e[c]) + device_load(pe[c]));
    } else {
      for (index_t c = threadIdx.x; c < d; c += blockDim.x) y[c] = e[c];
    }
  }
}

template <class T>
void embedding(TensorView<T, Device> out, std::span<const std::int32_t> tokens, TensorView<const T, Device> wte,
               TensorView<const T, Device> wpe) {
  require_forward_element<T>();
  const char* op = "embedding";
  const index_t d = check_embedding<T>(op, out, tokens, wte, wpe, "out");
  const index_t n_tok = static_cast<index_t>(tokens.size());
  Scratch ids(tokens.size_bytes(), op);
  upload_ids(tokens, ids.as<std::int32_t>(), op);
  const dim3 block(d >= 256 ? 256 : 128), grid(grid_for(n_tok, 1));
  embedding_kernel<<<grid, block, 0, stream()>>>(device_ptr(out.data()), ids.as<std::int32_t>(), device_ptr(wte.data()),
                                                 absent(wpe) ? nullptr : device_ptr(wpe.data()), n_tok, d);
  check_launch(op, "the kernel for ", n_tok, " tokens of width ", d, " (", launch_str(grid, block), ")");
}

/// d_wte[id] += the d_out rows of the positions holding id, one block per distinct id: `order`
/// lists positions grouped by id (ascending position within an id), `starts` where each group
/// begins, so every row of d_wte is summed in position order by one block (deterministic).
template <class T>
__global__ void embedding_backward_kernel(T* __restrict__ d_wte, const T* __restrict__ d_out,
                                          const std::int32_t* __restrict__ ids /*(G)*/,
                                          const std::int32_t* __restrict__ starts /*(G+1)*/,
                                          const std::int32_t* __restrict__ order /*(T)*/, index_t groups, index_t d) {
  for (index_t gi = blockIdx.x; gi < groups; gi += gridDim.x) {
    T* e = d_wte + static_cast<index_t>(ids[gi]) * d;
    const std::int32_t p0 = starts[gi], p1 = starts[gi + 1];
    for (index_t c = threadIdx.x; c < d; c += blockDim.x) {
      T sum = e[c];
      for (std::int32_t p = p0; p < p1; ++p) sum += d_out[static_cast<index_t>(order[p]) * d + c];
      e[c] = sum;
    }
  }
}

/// d_wpe rows 0..T-1 += d_out.
template <class T>
__global__ void add_rows_kernel(T* __restrict__ dst, const T* __restrict__ src, index_t n) {
  for (index_t i = blockIdx.x * index_t{blockDim.x} + threadIdx.x; i < n; i += index_t{gridDim.x} * blockDim.x) {
    dst[i] += src[i];
  }
}

/// d_wte (V, d) += d_out rows scattered by token id; d_wpe (P, d) rows 0..T-1 += d_out. Either may
/// be empty. The ids are grouped on the host (they are there already) and uploaded with the groups.
template <class T>
void embedding_backward(TensorView<T, Device> d_wte, TensorView<T, Device> d_wpe, TensorView<const T, Device> d_out,
                        std::span<const std::int32_t> tokens) {
  require_float<T>();
  const char* op = "embedding_backward";
  const bool table = !absent(d_wte), positions = !absent(d_wpe);
  if (!table && !positions) return;
  const index_t d = table ? check_embedding<T>(op, d_out, tokens, TensorView<const T, Device>(d_wte),
                                               TensorView<const T, Device>(d_wpe), "d_out")
                          : op_checks::check_position_embedding_backward(d_wpe, d_out, tokens.size());
  expect_separate(d_wte, d_out, op, "d_out (as d_wte)");
  expect_separate(d_wpe, d_out, op, "d_out (as d_wpe)");
  const index_t n_tok = static_cast<index_t>(tokens.size());
  if (positions) {
    const index_t n = n_tok * d;
    const dim3 block(256), grid(grid_for(n, 256));
    add_rows_kernel<T><<<grid, block, 0, stream()>>>(d_wpe.data(), d_out.data(), n);
    check_launch(op, "the position kernel for ", n_tok, " rows of ", d, " (", launch_str(grid, block), ")");
  }
  if (!table) return;
  // Positions sorted by (id, position): a stable counting sort would need V counters; a stable
  // sort of T pairs is as cheap at these sizes and works for any vocabulary.
  std::vector<std::int32_t> order(tokens.size());
  for (std::size_t t = 0; t < order.size(); ++t) order[t] = static_cast<std::int32_t>(t);
  std::stable_sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) {
    return tokens[static_cast<std::size_t>(a)] < tokens[static_cast<std::size_t>(b)];
  });
  std::vector<std::int32_t> packed;  // ids (G), starts (G+1), order (T)
  std::vector<std::int32_t> starts;
  for (std::size_t i = 0; i < order.size(); ++i) {
    const std::int32_t id = tokens[static_cast<std::size_t>(order[i])];
    if (i == 0 || id != tokens[static_cast<std::size_t>(order[i - 1])]) {
      packed.push_back(id);
      starts.push_back(static_cast<std::int32_t>(i));
    }
  }
  const index_t groups = static_cast<index_t>(packed.size());
  starts.push_back(static_cast<std::int32_t>(order.size()));
  packed.insert(packed.end(), starts.begin(), starts.end());
  packed.insert(packed.end(), order.begin(), order.end());
  Scratch buf(packed.size() * sizeof(std::int32_t), op);
  upload_ids(packed, buf.as<std::int32_t>(), op);
  const std::int32_t* ids = buf.as<std::int32_t>();
  const dim3 block(d >= 256 ? 256 : 128), grid(grid_for(groups, 1));
  embedding_backward_kernel<T><<<grid, block, 0, stream()>>>(d_wte.data(), d_out.data(), ids, ids + groups,
                                                             ids + 2 * groups + 1, groups, d);
  check_launch(op, "the kernel for ", groups, " distinct ids of ", n_tok, " tokens, width ", d, " (",
               launch_str(grid, block), ")");
}

}  // namespace longmem::detail::cuda
