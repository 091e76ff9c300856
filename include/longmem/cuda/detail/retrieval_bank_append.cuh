#pragma once
// DeviceMemoryBank's append, split into what the host decides and what the kernels do (users never
// name these). The plan is plain host arithmetic on the counters, so it can be tested without a GPU.
//
//   plan_bank_append(chunks, pending, T, csz, C)   which of the three steps run, on which tokens
//   bank_append_pending_kernel                      steps 1 and 3: tokens into the pending chunk
//                                                   (and its commit to a slot when it fills)
//   bank_append_chunks_kernel                       step 2: whole chunks straight into their slots
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "longmem/cuda/detail/retrieval_storage.cuh"
#include "longmem/tensor.hpp"

namespace longmem::detail {

/// What one append of T tokens does, decided from the counters alone (HostMemoryBank's order).
struct BankAppendPlan {
  index_t complete_count = 0;        ///< step 1: tokens [0, complete_count) finish the pending chunk
  index_t complete_commit_slot = -1;  ///< the slot it is committed to when it fills, else -1
  index_t whole_t0 = 0;              ///< step 2: whole chunks from token whole_t0 ...
  index_t whole_count = 0;           ///< ... this many (<= C) ...
  index_t whole_first_sequence = 0;  ///< ... the first with this completion order (slot = order % C)
  index_t tail_t0 = 0;               ///< step 3: tokens [tail_t0, T) start the new pending chunk
  index_t tail_count = 0;
  index_t chunks_after = 0;          ///< chunks_appended after the call
  index_t pending_after = 0;         ///< pending tokens after the call
};

/// The plan for appending n_tok tokens to a bank with these counters, chunk size csz, C slots.
/// Tokens first complete the pending chunk, then fill whole chunks; when more than C whole chunks
/// arrive, the oldest of them would be evicted within the same call and are skipped (but counted).
inline BankAppendPlan plan_bank_append(index_t chunks_appended, index_t pending, index_t n_tok, index_t csz, index_t C) {
  BankAppendPlan p;
  index_t chunks = chunks_appended, t = 0;
  if (pending > 0) {
    p.complete_count = std::min(n_tok, csz - pending);
    t = p.complete_count;
    pending += p.complete_count;
    if (pending == csz) {
      p.complete_commit_slot = chunks % C;
      pending = 0;
      ++chunks;
    }
  }
  index_t whole = (n_tok - t) / csz;
  if (whole > C) {
    chunks += whole - C;
    t += (whole - C) * csz;
    whole = C;
  }
  p.whole_t0 = t;
  p.whole_count = whole;
  p.whole_first_sequence = chunks;
  chunks += whole;
  t += whole * csz;
  if (t < n_tok) {
    p.tail_t0 = t;
    p.tail_count = n_tok - t;
    pending = p.tail_count;
  }
  p.chunks_after = chunks;
  p.pending_after = pending;
  return p;
}

/// Where a device bank's arrays are, for its append kernels.
template <class S>
struct DeviceBankArrays {
  S* keys;                // (H, C, csz, dh)
  S* values;              // (H, C, csz, dh)
  float* chunk_keys;      // (H, C, dh)
  S* pending_keys;        // (H, csz, dh)
  S* pending_values;      // (H, csz, dh)
  double* pending_sum;    // (H, dh)
  index_t capacity;       // C
  int n_head, head_dim, chunk_size;
};

/// Keys and values arrive as E (float, or __nv_bfloat16 / __half from a 16-bit model: exact in
/// float, so a bank of the same type stores them unchanged).
/// Tokens [t0, t0 + count) of keys/values (T, H, dh) go to pending positions
/// [pending_before, pending_before + count). The key sum continues from the stored one, or starts
/// at 0 when `fresh`. When commit_slot >= 0 the pending chunk is then complete: it is copied to
/// that slot and its chunk key written. Grid: one block per head; threads stride over d.
template <class S, class E>
__global__ void bank_append_pending_kernel(const E* __restrict__ keys, const E* __restrict__ values,
                                           index_t t0, int count, int pending_before, bool fresh,
                                           index_t commit_slot, DeviceBankArrays<S> a) {
  const int h = static_cast<int>(blockIdx.x);
  const index_t H = a.n_head, dh = a.head_dim, csz = a.chunk_size, C = a.capacity;
  const double inv = 1.0 / static_cast<double>(csz);
  for (index_t d = threadIdx.x; d < dh; d += blockDim.x) {
    double sum = fresh ? 0.0 : a.pending_sum[h * dh + d];
    for (int j = 0; j < count; ++j) {
      const index_t src = ((t0 + j) * H + h) * dh + d;
      const index_t dst = (h * csz + pending_before + j) * dh + d;
      const float k = device_load(keys[src]);
      a.pending_keys[dst] = device_store<S>(k);
      a.pending_values[dst] = device_store<S>(device_load(values[src]));
      sum += static_cast<double>(k);
    }
    if (commit_slot >= 0) {
      // Positions written by earlier launches for this (h, d) column are visible: same column,
      // earlier kernel on the same stream.
      for (index_t j = 0; j < csz; ++j) {
        const index_t p = (h * csz + j) * dh + d;
        const index_t s = ((h * C + commit_slot) * csz + j) * dh + d;
        a.keys[s] = a.pending_keys[p];
        a.values[s] = a.pending_values[p];
      }
      a.chunk_keys[(h * C + commit_slot) * dh + d] = static_cast<float>(sum * inv);
      sum = 0.0;
    }
    a.pending_sum[h * dh + d] = sum;
  }
}

/// n_whole complete chunks: chunk j is tokens [t0 + j*csz, t0 + (j+1)*csz) of keys/values
/// (T, H, dh) and goes to slot (first_sequence + j) % C. Grid: (n_whole, H); threads stride over d.
template <class S, class E>
__global__ void bank_append_chunks_kernel(const E* __restrict__ keys, const E* __restrict__ values,
                                          index_t t0, index_t first_sequence, DeviceBankArrays<S> a) {
  const index_t j = blockIdx.x;
  const int h = static_cast<int>(blockIdx.y);
  const index_t H = a.n_head, dh = a.head_dim, csz = a.chunk_size, C = a.capacity;
  const index_t slot = (first_sequence + j) % C;
  const double inv = 1.0 / static_cast<double>(csz);
  for (index_t d = threadIdx.x; d < dh; d += blockDim.x) {
    double sum = 0.0;  // as the host's sum after a commit (or reset): 0, then each token in order
    for (index_t i = 0; i < csz; ++i) {
      const index_t src = ((t0 + j * csz + i) * H + h) * dh + d;
      const index_t dst = ((h * C + slot) * csz + i) * dh + d;
      const float k = device_load(keys[src]);
      a.keys[dst] = device_store<S>(k);
      a.values[dst] = device_store<S>(device_load(values[src]));
      sum += static_cast<double>(k);
    }
    a.chunk_keys[(h * C + slot) * dh + d] = static_cast<float>(sum * inv);
  }
}

/// Threads per append block: the head dimension rounded up to a warp, at most 256.
inline unsigned bank_append_threads(int head_dim) {
  const int warps = std::min(8, (head_dim + 31) / 32);
  return static_cast<unsigned>(std::max(1, warps) * 32);
}

}  // namespace longmem::detail
