#pragma once
// Host token (and learned position) embedding, forward and backward.
//   embedding           out (T, d) = wte[tokens] (+ wpe[0..T))
//   embedding_backward  d_wte[tokens[t]] += d_out[t];  d_wpe[t] += d_out[t]
#include <algorithm>
#include <cstdint>
#include <span>

#include "longmem/cpu/ops/common.hpp"

namespace longmem::detail::cpu {

/// Checks wte (V, d), the optional wpe (P, d), the token ids and the (T, d) output/gradient `rows`;
/// returns d.
template <class T, class Rows>
index_t check_embedding(const char* op, const Rows& rows, std::span<const std::int32_t> tokens,
                        TensorView<const T, Host> wte_like, TensorView<const T, Host> wpe_like, bool check_wpe,
                        const char* rows_name) {
  const index_t n_tok = static_cast<index_t>(tokens.size());
  if (n_tok == 0) fail<InputError>(op, ": the segment is empty; pass at least one token");
  if (wte_like.rank() != 2 || wte_like.dim(0) == 0 || wte_like.dim(1) == 0) {
    fail<ShapeError>(op, ": wte: expected a non-empty (V, d) tensor, got shape ", wte_like.shape().str());
  }
  const index_t V = wte_like.dim(0), d = wte_like.dim(1);
  if (check_wpe && !absent(wpe_like)) {
    if (wpe_like.rank() != 2 || wpe_like.dim(1) != d) {
      fail<ShapeError>(op, ": wpe: expected shape (P, ", d, ") to match wte's width, got ", wpe_like.shape().str());
    }
    if (n_tok > wpe_like.dim(0)) {
      fail<InputError>(op, ": the segment has ", n_tok, " tokens but the model has only ", wpe_like.dim(0),
                       " positions (wpe rows); split the input into segments of at most ", wpe_like.dim(0), " tokens");
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

/// out (T, d) = wte[tokens] (+ wpe[0..T)). All ids are checked before anything is written.
template <class T>
void embedding(TensorView<T, Host> out, std::span<const std::int32_t> tokens, TensorView<const T, Host> wte,
               TensorView<const T, Host> wpe) {
  const index_t d = check_embedding<T>("embedding", out, tokens, wte, wpe, true, "out");
  const bool positions = !absent(wpe);
  for (index_t t = 0; t < static_cast<index_t>(tokens.size()); ++t) {
    const T* e = wte.data() + static_cast<index_t>(tokens[static_cast<std::size_t>(t)]) * d;
    T* y = out.data() + t * d;
    if (positions) {
      const T* pe = wpe.data() + t * d;
      for (index_t c = 0; c < d; ++c) y[c] = e[c] + pe[c];
    } else {
      std::copy(e, e + d, y);
    }
  }
}

/// d_wte (V, d) += rows of d_out (T, d) scattered by token id, in token order (a token that
/// occurs twice sums its rows in position order, so the result does not depend on threads);
/// d_wpe (P, d) rows 0..T-1 += d_out. Either gradient may be empty.
template <class T>
void embedding_backward(TensorView<T, Host> d_wte, TensorView<T, Host> d_wpe, TensorView<const T, Host> d_out,
                        std::span<const std::int32_t> tokens) {
  const bool table = !absent(d_wte), positions = !absent(d_wpe);
  if (!table && !positions) return;
  if (table) {
    check_embedding<T>("embedding_backward", d_out, tokens, TensorView<const T, Host>(d_wte),
                       TensorView<const T, Host>(d_wpe), true, "d_out");
  } else {
    // Only positions: the vocabulary is unknown here, so ids are not checked.
    op_checks::check_position_embedding_backward(d_wpe, d_out, tokens.size());
  }
  const index_t d = table ? d_wte.dim(1) : d_wpe.dim(1);
  expect_separate(d_wte, d_out, "embedding_backward", "d_out (as d_wte)");
  expect_separate(d_wpe, d_out, "embedding_backward", "d_out (as d_wpe)");
  for (index_t t = 0; t < static_cast<index_t>(tokens.size()); ++t) {
    const T* g = d_out.data() + t * d;
    if (table) {
      T* e = d_wte.data() + static_cast<index_t>(tokens[static_cast<std::size_t>(t)]) * d;
      for (index_t c = 0; c < d; ++c) e[c] += g[c];
    }
    if (positions) {
      T* pe = d_wpe.data() + t * d;
      for (index_t c = 0; c < d; ++c) pe[c] += g[c];
    }
  }
}

}  // namespace longmem::detail::cpu
