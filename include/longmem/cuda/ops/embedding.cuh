#pragma once
// Device token (and learned position) embedding.
//   embedding   out (T, d) = wte[tokens] (+ wpe[0..T))
// Token ids arrive as a host span: they are checked on the host exactly as the host backend
// checks them (so nothing is written when one is bad), then copied to a scratch buffer.
#include <cstdint>
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

/// One block per token row; threads stride over the d features. Same float sum as the host.
template <class T>
__global__ void embedding_kernel(T* __restrict__ out /*(T,d)*/, const std::int32_t* __restrict__ tokens /*(T)*/,
                                 const T* __restrict__ wte /*(V,d)*/, const T* __restrict__ wpe /*(P,d) or null*/,
                                 index_t n_tok, index_t d) {
  for (index_t t = blockIdx.x; t < n_tok; t += gridDim.x) {
    const T* e = wte + static_cast<index_t>(tokens[t]) * d;
    T* y = out + t * d;
    if (wpe) {
      const T* pe = wpe + t * d;
      for (index_t c = threadIdx.x; c < d; c += blockDim.x) y[c] = e[c] + pe[c];
    } else {
      for (index_t c = threadIdx.x; c < d; c += blockDim.x) y[c] = e[c];
    }
  }
}

template <class T>
void embedding(TensorView<T, Device> out, std::span<const std::int32_t> tokens, TensorView<const T, Device> wte,
               TensorView<const T, Device> wpe) {
  require_float<T>();
  const char* op = "embedding";
  const index_t d = check_embedding<T>(op, out, tokens, wte, wpe, "out");
  const index_t n_tok = static_cast<index_t>(tokens.size());
  Scratch ids(tokens.size_bytes(), op);
  upload_ids(tokens, ids.as<std::int32_t>(), op);
  const dim3 block(d >= 256 ? 256 : 128), grid(grid_for(n_tok, 1));
  embedding_kernel<T><<<grid, block, 0, stream()>>>(out.data(), ids.as<std::int32_t>(), wte.data(),
                                                    absent(wpe) ? nullptr : wpe.data(), n_tok, d);
  check_launch(op, "the kernel for ", n_tok, " tokens of width ", d, " (", launch_str(grid, block), ")");
}

}  // namespace longmem::detail::cuda
