#pragma once
// ALiBi slopes, shared by host and device code.
#include <cmath>

#include "longmem/config.hpp"

namespace longmem::detail {

/// Slope of head `head` (0-based) of `n_head`: 2^(-8 (head+1) / n_head) when n_head is a
/// power of two; otherwise the closest power of two p below n_head gives the first p
/// slopes and the odd-indexed slopes of 2p fill the rest (Press et al., as in fairseq).
LONGMEM_HOST_DEVICE double alibi_slope(int head, int n_head) {
  int p = 1;
  while (p * 2 <= n_head) p *= 2;
  if (head < p) return std::exp2(-8.0 * (head + 1) / p);
  const int extra = head - p;                          // 0-based among the extra heads
  return std::exp2(-8.0 * (2 * extra + 1) / (2 * p));  // odd entries of the 2p sequence
}

}  // namespace longmem::detail
