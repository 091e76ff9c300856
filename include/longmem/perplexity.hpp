#pragma once
// Perplexity of a LongMem model over one long token stream, segment by segment.
//
// The stream x_0 .. x_N is cut into segments of `segment_length` inputs; segment s
// reads x[sT, sT+T) and predicts x[sT+1, sT+T+1), so every token but x_0 is predicted
// exactly once and the memory carries what earlier segments saw.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "longmem/error.hpp"

namespace longmem {

struct PerplexityResult {
  double nll_sum = 0;                   // nats
  std::int64_t tokens = 0;              // predicted tokens
  std::vector<double> segment_mean_nll;  // per segment

  double mean_nll() const { return tokens ? nll_sum / static_cast<double>(tokens) : 0.0; }
  double perplexity() const { return std::exp(mean_nll()); }
};

/// Runs `model` (stream 0 of a single-stream model) over `tokens`. Its memory is reset
/// first when `reset_memory` is true (the default), so results do not depend on earlier
/// calls. Throws InputError for fewer than 2 tokens or a non-positive segment length.
template <class ModelT>
PerplexityResult perplexity(ModelT& model, std::span<const std::int32_t> tokens, int segment_length,
                            bool reset_memory = true) {
  if (model.streams() != 1) {
    detail::fail<InputError>("perplexity: the model has ", model.streams(), " streams; use a single-stream model");
  }
  if (segment_length <= 0) detail::fail<InputError>("perplexity: segment_length must be positive, got ", segment_length);
  if (tokens.size() < 2) detail::fail<InputError>("perplexity: need at least 2 tokens, got ", tokens.size());
  if (reset_memory) model.reset();
  PerplexityResult r;
  const std::size_t n = tokens.size() - 1;  // inputs that have a next token
  for (std::size_t begin = 0; begin < n; begin += static_cast<std::size_t>(segment_length)) {
    const std::size_t len = std::min<std::size_t>(static_cast<std::size_t>(segment_length), n - begin);
    const auto& out = model.forward(tokens.subspan(begin, len), tokens.subspan(begin + 1, len));
    r.nll_sum += out.loss_sum;
    r.tokens += out.loss_tokens;
    r.segment_mean_nll.push_back(out.mean_loss());
  }
  return r;
}

}  // namespace longmem
