#pragma once
// HostMemoryBank<S>: one stream's memory in host RAM (one bank per stream; banks never
// share state), keys and values stored as S (float, double, half or bfloat16), a ring of
// chunk slots with FIFO eviction.
//
//   keys(), values()  (H, C, csz, dh)  S      token keys/values of each chunk, token order
//   chunk_keys()      (H, C, dh)       float  mean of the chunk's csz keys
//   pending           (H, csz, dh)     S      tokens of the incomplete chunk (not retrievable)
//
// The chunk with completion order q lives in slot q % C, so slots fill 0, 1, 2, ... and,
// once C chunks are stored, each new chunk overwrites the oldest one: eviction is O(1)
// per chunk, nothing is shifted. A chunk's first token has stream position q * csz.
//
// Chunk keys are the mean of the *input* keys (float or double), accumulated in double
// and rounded to float once; they are not recomputed from the rounded S storage, so a
// half or bfloat16 bank ranks chunks exactly as a float bank fed the same keys would.
// Stored keys/values are the input rounded once to S (double input to half or bfloat16
// goes through float first).
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

#include "longmem/detail/host_memory.hpp"
#include "longmem/dtype.hpp"
#include "longmem/error.hpp"
#include "longmem/memory_bank.hpp"
#include "longmem/model_config.hpp"
#include "longmem/safetensors.hpp"
#include "longmem/tensor.hpp"

namespace longmem {

template <StorageType S>
class HostMemoryBank {
 public:
  using value_type = S;
  using location = Host;

  /// All buffers are allocated here; append() never allocates. A bank that needs more memory
  /// than the machine has (physical memory, less what the other banks of this process hold) is
  /// refused with a ConfigError giving both numbers, before anything is allocated.
  explicit HostMemoryBank(MemoryGeometry g) : geom_(checked(g)), claim_(bytes_for(geom_), describe(geom_)) {
    const index_t H = geom_.n_head, C = geom_.capacity_chunks, csz = geom_.chunk_size, dh = geom_.head_dim;
    keys_.resize({H, C, csz, dh});
    values_.resize({H, C, csz, dh});
    chunk_keys_.resize({H, C, dh});
    pending_keys_.resize({H, csz, dh});
    pending_values_.resize({H, csz, dh});
    pending_sum_.resize({H, dh});
    reset();
  }

  /// A bank of m.memory_tokens / m.chunk_size chunks for n_head heads of head_dim.
  HostMemoryBank(int n_head, int head_dim, const MemoryConfig& m) : HostMemoryBank(geometry_of(n_head, head_dim, m)) {}

  /// Bytes a bank of geometry `g` allocates (keys and values in S, chunk keys in float, the pending
  /// chunk and its key sum in double); nullopt when that does not fit in 64 bits.
  static std::optional<std::uint64_t> bytes_for(const MemoryGeometry& g) {
    const std::int64_t H = g.n_head, C = g.capacity_chunks, csz = g.chunk_size, dh = g.head_dim;
    auto total = detail::checked_bytes(2 * sizeof(S), {H, C, csz, dh});                 // keys, values
    total = detail::checked_sum(total, detail::checked_bytes(sizeof(float), {H, C, dh}));  // chunk keys
    total = detail::checked_sum(total, detail::checked_bytes(2 * sizeof(S), {H, csz, dh}));
    return detail::checked_sum(total, detail::checked_bytes(sizeof(double), {H, dh}));
  }

  const MemoryGeometry& geometry() const { return geom_; }
  /// Complete chunks stored (<= capacity).
  index_t num_chunks() const { return std::min(chunks_appended_, geom_.capacity_chunks); }
  index_t size_tokens() const { return num_chunks() * geom_.chunk_size; }
  index_t pending_tokens() const { return pending_; }
  index_t capacity_tokens() const { return geom_.capacity_tokens(); }
  /// Chunks ever completed since construction or reset().
  index_t chunks_appended() const { return chunks_appended_; }
  /// Tokens ever appended (the stream position of the next token).
  index_t tokens_appended() const { return chunks_appended_ * geom_.chunk_size + pending_; }

  /// Bytes of stored chunks (keys + values in S, chunk key in float) and pending tokens.
  std::size_t bytes_used() const {
    const auto H = static_cast<std::size_t>(geom_.n_head), dh = static_cast<std::size_t>(geom_.head_dim);
    const auto csz = static_cast<std::size_t>(geom_.chunk_size);
    const std::size_t per_chunk = H * (2 * csz * dh * sizeof(S) + dh * sizeof(float));
    const std::size_t per_pending = H * 2 * dh * sizeof(S);
    return static_cast<std::size_t>(num_chunks()) * per_chunk + static_cast<std::size_t>(pending_) * per_pending;
  }

  /// Completion order (0 = first chunk of the stream) of the chunk in `slot`.
  index_t chunk_sequence(index_t slot) const {
    check_slot(slot, "chunk_sequence");
    const index_t C = geom_.capacity_chunks;
    if (chunks_appended_ <= C) return slot;
    const index_t oldest = chunks_appended_ % C;
    return chunks_appended_ - C + (slot - oldest + C) % C;
  }
  /// Stream position of the first token of the chunk in `slot`.
  index_t chunk_position(index_t slot) const { return chunk_sequence(slot) * geom_.chunk_size; }
  /// Slot of the oldest stored chunk (0 while the ring has not wrapped, and when empty).
  index_t oldest_slot() const { return chunks_appended_ <= geom_.capacity_chunks ? 0 : chunks_appended_ % geom_.capacity_chunks; }

  TensorView<const float, Host> chunk_keys() const { return chunk_keys_.view(); }  // (H, C, dh)
  TensorView<const S, Host> keys() const { return keys_.view(); }                  // (H, C, csz, dh)
  TensorView<const S, Host> values() const { return values_.view(); }              // (H, C, csz, dh)
  /// The incomplete chunk: its tokens (H, csz, dh), the first pending_tokens() of each head valid,
  /// and the double sum of their input keys (H, dh). (A device bank's checkpoint passes through these.)
  TensorView<const S, Host> pending_keys() const { return pending_keys_.view(); }
  TensorView<const S, Host> pending_values() const { return pending_values_.view(); }
  TensorView<const double, Host> pending_key_sum() const { return pending_sum_.view(); }

  /// Appends T tokens of keys and values, both (T, H, dh). Tokens first complete the
  /// pending chunk, then fill whole chunks; a trailing remainder becomes the new pending
  /// chunk. When one call completes more than C chunks only the newest C are written.
  template <ComputeType T>
  void append(TensorView<const T, Host> keys, TensorView<const T, Host> values) {
    const Shape expected{keys.rank() == 3 ? keys.dim(0) : 0, geom_.n_head, geom_.head_dim};
    if (keys.rank() != 3 || !(keys.shape() == expected)) {
      detail::fail<ShapeError>("HostMemoryBank::append: keys must be (T, H, dh) = (T, ", geom_.n_head, ", ",
                               geom_.head_dim, "), got ", keys.shape().str());
    }
    if (!(values.shape() == keys.shape())) {
      detail::fail<ShapeError>("HostMemoryBank::append: values must have the keys' shape ", keys.shape().str(),
                               ", got ", values.shape().str());
    }
    const index_t n_tok = keys.dim(0), csz = geom_.chunk_size, C = geom_.capacity_chunks;
    index_t t = 0;
    // Tokens that only complete chunks evicted later in this same call are skipped
    // (after the pending chunk, whose earlier tokens are already counted).
    auto push_until_chunk_end = [&](index_t t_end) {
      for (; t < t_end; ++t) push_token(keys.data() + t * keys_row(), values.data() + t * keys_row());
    };
    if (pending_ > 0) push_until_chunk_end(std::min(n_tok, csz - pending_));
    const index_t whole = (n_tok - t) / csz;
    if (whole > C) {
      chunks_appended_ += whole - C;
      t += (whole - C) * csz;
    }
    push_until_chunk_end(n_tok);
  }

  /// Convenience: append from owning tensors or mutable views.
  template <class K, class V>
    requires requires(const K& k, const V& v) {
      cview(k);
      cview(v);
    }
  void append(const K& keys, const V& values) {
    append(cview(keys), cview(values));
  }

  /// Writes everything the bank holds under `prefix` (training checkpoints): the ring arrays
  /// as stored (S), the chunk keys, the pending chunk (its key sum in double) and the counters,
  /// so load_state() restores it bit for bit.
  void save_state(SafetensorsWriter& w, const std::string& prefix) const {
    w.add<S>(prefix + "keys", keys_.view());
    w.add<S>(prefix + "values", values_.view());
    w.add<float>(prefix + "chunk_keys", chunk_keys_.view());
    w.add<S>(prefix + "pending_keys", pending_keys_.view());
    w.add<S>(prefix + "pending_values", pending_values_.view());
    w.add<double>(prefix + "pending_key_sum", pending_sum_.view());
    Tensor<std::int64_t, Host> counters({2});
    counters(0) = chunks_appended_;
    counters(1) = pending_;
    w.add<std::int64_t>(prefix + "counters", counters.view());
  }

  /// Restores what save_state() wrote for a bank of the same geometry and storage type;
  /// FormatError / ShapeError naming the tensor otherwise (the bank is unchanged then).
  void load_state(const SafetensorsFile& f, const std::string& prefix) {
    const index_t H = geom_.n_head, C = geom_.capacity_chunks, csz = geom_.chunk_size, dh = geom_.head_dim;
    for (const char* n : {"keys", "values", "pending_keys", "pending_values"}) {
      if (f.info(prefix + n).dtype != dtype_of_v<S>) {
        detail::fail<FormatError>(f.name(), ": ", prefix, n, " is stored as ", dtype_name(f.info(prefix + n).dtype),
                                  ", this bank stores ", dtype_name(dtype_of_v<S>));
      }
    }
    auto keys = f.read<S>(prefix + "keys", {H, C, csz, dh});
    auto values = f.read<S>(prefix + "values", {H, C, csz, dh});
    auto chunk_keys = f.read<float>(prefix + "chunk_keys", {H, C, dh});
    auto pk = f.read<S>(prefix + "pending_keys", {H, csz, dh});
    auto pv = f.read<S>(prefix + "pending_values", {H, csz, dh});
    auto sum = f.read<double>(prefix + "pending_key_sum", {H, dh});
    auto counters = f.read<std::int64_t>(prefix + "counters", {2});
    if (counters(0) < 0 || counters(1) < 0 || counters(1) >= csz) {
      detail::fail<FormatError>(f.name(), ": ", prefix, "counters (", counters(0), " chunks, ", counters(1),
                                " pending tokens) do not describe a bank with chunks of ", csz);
    }
    // Stream positions (chunks * csz + pending) stay below 2^53: exact as doubles, and far from
    // overflowing the int64 arithmetic of positions and eviction order.
    if (counters(0) > max_stream_tokens / csz) {
      detail::fail<FormatError>(f.name(), ": ", prefix, "counters claim ", counters(0), " chunks of ", csz,
                                " tokens appended, beyond the 2^53 tokens a stream can hold");
    }
    keys_ = std::move(keys);
    values_ = std::move(values);
    chunk_keys_ = std::move(chunk_keys);
    pending_keys_ = std::move(pk);
    pending_values_ = std::move(pv);
    pending_sum_ = std::move(sum);
    chunks_appended_ = counters(0);
    pending_ = counters(1);
  }

  /// Empties the bank; all counters go back to 0.
  void reset() {
    chunks_appended_ = 0;
    pending_ = 0;
    std::fill(pending_sum_.begin(), pending_sum_.end(), 0.0);
  }

 private:
  static constexpr index_t max_stream_tokens = index_t{1} << 53;

  static MemoryGeometry checked(MemoryGeometry g) {
    if (g.n_head <= 0 || g.head_dim <= 0 || g.chunk_size <= 0 || g.capacity_chunks <= 0) {
      detail::fail<ConfigError>("HostMemoryBank: n_head, head_dim, chunk_size and capacity_chunks must be positive, got ",
                                g.n_head, ", ", g.head_dim, ", ", g.chunk_size, ", ", g.capacity_chunks);
    }
    if (g.capacity_chunks > max_stream_tokens / g.chunk_size) {
      detail::fail<ConfigError>("HostMemoryBank: ", g.capacity_chunks, " chunks of ", g.chunk_size,
                                " tokens exceed the 2^53 tokens a stream can hold");
    }
    return g;
  }

  static std::string describe(const MemoryGeometry& g) {
    return detail::concat("HostMemoryBank: a bank of ", g.capacity_chunks, " chunks of ", g.chunk_size, " tokens (",
                          g.capacity_tokens(), " tokens, ", g.n_head, " heads of ", g.head_dim, ", stored as ",
                          dtype_name(dtype_of_v<S>), ")");
  }

  static MemoryGeometry geometry_of(int n_head, int head_dim, const MemoryConfig& m) {
    m.validate();
    MemoryGeometry g;
    g.n_head = n_head;
    g.head_dim = head_dim;
    g.chunk_size = m.chunk_size;
    g.capacity_chunks = m.capacity_chunks();
    return g;
  }

  index_t keys_row() const { return static_cast<index_t>(geom_.n_head) * geom_.head_dim; }

  void check_slot(index_t slot, const char* what) const {
    if (slot < 0 || slot >= num_chunks()) {
      detail::fail<ShapeError>("HostMemoryBank::", what, ": slot ", slot, " is not a stored chunk (valid slots are [0, ",
                               num_chunks(), "))");
    }
  }

  /// One token's keys and values, (H, dh) each, into the pending chunk.
  template <class T>
  void push_token(const T* k, const T* v) {
    const index_t H = geom_.n_head, dh = geom_.head_dim, csz = geom_.chunk_size;
    for (index_t h = 0; h < H; ++h) {
      S* pk = pending_keys_.data() + (h * csz + pending_) * dh;
      S* pv = pending_values_.data() + (h * csz + pending_) * dh;
      double* sum = pending_sum_.data() + h * dh;
      const T* kh = k + h * dh;
      const T* vh = v + h * dh;
      for (index_t d = 0; d < dh; ++d) {
        pk[d] = store(kh[d]);
        pv[d] = store(vh[d]);
        sum[d] += static_cast<double>(kh[d]);
      }
    }
    if (++pending_ == csz) commit_pending();
  }

  /// Moves the completed pending chunk into slot chunks_appended_ % C, overwriting the oldest.
  void commit_pending() {
    const index_t H = geom_.n_head, dh = geom_.head_dim, csz = geom_.chunk_size, C = geom_.capacity_chunks;
    const index_t slot = chunks_appended_ % C;
    const double inv = 1.0 / static_cast<double>(csz);
    for (index_t h = 0; h < H; ++h) {
      std::copy_n(pending_keys_.data() + h * csz * dh, csz * dh, keys_.data() + (h * C + slot) * csz * dh);
      std::copy_n(pending_values_.data() + h * csz * dh, csz * dh, values_.data() + (h * C + slot) * csz * dh);
      float* ck = chunk_keys_.data() + (h * C + slot) * dh;
      double* sum = pending_sum_.data() + h * dh;
      for (index_t d = 0; d < dh; ++d) {
        ck[d] = static_cast<float>(sum[d] * inv);
        sum[d] = 0.0;
      }
    }
    pending_ = 0;
    ++chunks_appended_;
  }

  template <class T>
  static S store(T x) {
    if constexpr (std::is_same_v<S, double> || std::is_same_v<S, float>) {
      return static_cast<S>(x);
    } else {
      return from_float<S>(static_cast<float>(x));
    }
  }

  MemoryGeometry geom_;
  detail::HostMemoryClaim claim_;    // this bank's share of the machine, claimed before allocating
  Tensor<S, Host> keys_;             // (H, C, csz, dh)
  Tensor<S, Host> values_;           // (H, C, csz, dh)
  Tensor<float, Host> chunk_keys_;   // (H, C, dh)
  Tensor<S, Host> pending_keys_;     // (H, csz, dh)
  Tensor<S, Host> pending_values_;   // (H, csz, dh)
  Tensor<double, Host> pending_sum_;  // (H, dh) sum of the pending chunk's input keys
  index_t chunks_appended_ = 0;
  index_t pending_ = 0;
};

static_assert(MemoryBank<HostMemoryBank<float>>);
static_assert(MemoryBank<HostMemoryBank<double>>);
static_assert(MemoryBank<HostMemoryBank<half>>);
static_assert(MemoryBank<HostMemoryBank<bfloat16>>);

}  // namespace longmem
