#pragma once
// DeviceMemoryBank<S>: one stream's memory in GPU memory, the device twin of HostMemoryBank
// (cpu/host_memory_bank.hpp): same ring of chunk slots, same FIFO eviction, same pending chunk,
// same counters. Keys and values are stored as S (float, __half or __nv_bfloat16); chunk keys
// are float.
//
//   keys(), values()  (H, C, csz, dh)  S      token keys/values of each chunk, token order
//   chunk_keys()      (H, C, dh)       float  mean of the chunk's csz keys
//   pending           (H, csz, dh)     S      tokens of the incomplete chunk (not retrievable)
//   pending key sum   (H, dh)          double running sum of the pending chunk's input keys
//
// The chunk with completion order q lives in slot q % C. append() of (T, H, dh) float keys and
// values already on the device runs as at most three kernels on the bank's CUDA stream, with no
// copy of the data through the host: the host only does the bookkeeping, which T decides:
//   1. complete the pending chunk (its missing tokens first), committing it when it fills;
//   2. whole chunks straight into their slots (only the newest C when one call brings more);
//   3. a trailing remainder becomes the new pending chunk.
// Each kernel thread owns one (head, d) column, so the double sums run in token order exactly
// as on the host: chunk keys are bit for bit those of a HostMemoryBank fed the same keys, and
// stored values are the input rounded once to S (round to nearest even, as the host does).
//
// Work is stream-ordered: append() returns once the kernels are queued. Views returned by
// keys() etc. are valid for kernels on the same stream; before reading them from another stream
// or the host with plain cudaMemcpy on a non-blocking stream, synchronise that stream.
// longmem::copy() uses the legacy default stream, which waits for the bank's blocking stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

#include "longmem/cpu/host_memory_bank.hpp"
#include "longmem/cuda/detail/retrieval_bank_append.cuh"
#include "longmem/cuda/detail/retrieval_storage.cuh"
#include "longmem/cuda/storage.hpp"
#include "longmem/detail/host_memory.hpp"
#include "longmem/error.hpp"
#include "longmem/memory_bank.hpp"
#include "longmem/model_config.hpp"
#include "longmem/safetensors.hpp"
#include "longmem/tensor.hpp"

namespace longmem {

namespace detail {
/// The host storage type with S's bits: what a device bank's checkpoint is written as.
template <class S>
struct host_storage {
  using type = S;
};
template <>
struct host_storage<__half> {
  using type = longmem::half;
};
template <>
struct host_storage<__nv_bfloat16> {
  using type = longmem::bfloat16;
};
template <class S>
using host_storage_t = typename host_storage<S>::type;
}  // namespace detail

template <DeviceStorageType S>
class DeviceMemoryBank {
 public:
  using value_type = S;
  using location = Device;

  /// All device buffers are allocated here (append() never allocates); kernels run on `stream`
  /// (0: the legacy default stream). A bank larger than the device's free memory is refused with
  /// a BackendError giving both numbers, before anything is allocated.
  explicit DeviceMemoryBank(MemoryGeometry g, cudaStream_t stream = nullptr) : geom_(checked(g)), stream_(stream) {
    const std::optional<std::uint64_t> need = bytes_for(geom_);
    if (!need) detail::fail<ConfigError>(describe(geom_), " needs more bytes than 64 bits can count");
    std::size_t free_bytes = 0, total_bytes = 0;
    detail::cuda_check(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo (DeviceMemoryBank)", *need);
    if (*need > free_bytes) {
      detail::fail<BackendError>(describe(geom_), " needs ", detail::describe_bytes(*need), " (", *need,
                                 " bytes) of device memory, but the device has ", detail::describe_bytes(free_bytes),
                                 " free of ", detail::describe_bytes(total_bytes));
    }
    const index_t H = geom_.n_head, C = geom_.capacity_chunks, csz = geom_.chunk_size, dh = geom_.head_dim;
    try {
      keys_.resize({H, C, csz, dh});
      values_.resize({H, C, csz, dh});
      chunk_keys_.resize({H, C, dh});
      pending_keys_.resize({H, csz, dh});
      pending_values_.resize({H, csz, dh});
      pending_sum_.resize({H, dh});
    } catch (const BackendError& e) {
      detail::fail<BackendError>(describe(geom_), " (", *need, " bytes in all) could not be allocated: ", e.what());
    }
    // Zeros in the slots nothing was appended to yet: save_state copies the whole ring, and a
    // checkpoint must hold no uninitialised bytes (compute-sanitizer initcheck found them there).
    fill(keys_.view(), S{});
    fill(values_.view(), S{});
    fill(chunk_keys_.view(), 0.0f);
    fill(pending_keys_.view(), S{});
    fill(pending_values_.view(), S{});
    fill(pending_sum_.view(), 0.0);
    reset();
  }

  /// A bank of m.memory_tokens / m.chunk_size chunks for n_head heads of head_dim.
  DeviceMemoryBank(int n_head, int head_dim, const MemoryConfig& m, cudaStream_t stream = nullptr)
      : DeviceMemoryBank(geometry_of(n_head, head_dim, m), stream) {}

  /// Device bytes a bank of geometry `g` allocates (keys and values in S, chunk keys in float, the
  /// pending chunk in S and its key sum in double); nullopt when that does not fit in 64 bits.
  static std::optional<std::uint64_t> bytes_for(const MemoryGeometry& g) {
    const std::int64_t H = g.n_head, C = g.capacity_chunks, csz = g.chunk_size, dh = g.head_dim;
    auto total = detail::checked_bytes(2 * sizeof(S), {H, C, csz, dh});
    total = detail::checked_sum(total, detail::checked_bytes(sizeof(float), {H, C, dh}));
    total = detail::checked_sum(total, detail::checked_bytes(2 * sizeof(S), {H, csz, dh}));
    return detail::checked_sum(total, detail::checked_bytes(sizeof(double), {H, dh}));
  }

  const MemoryGeometry& geometry() const { return geom_; }
  cudaStream_t stream() const { return stream_; }
  /// Later appends (and retrievals from this bank) run on `s`; the caller orders it after the old one.
  void set_stream(cudaStream_t s) { stream_ = s; }

  index_t num_chunks() const { return std::min(chunks_appended_, geom_.capacity_chunks); }
  index_t size_tokens() const { return num_chunks() * geom_.chunk_size; }
  index_t pending_tokens() const { return pending_; }
  index_t capacity_tokens() const { return geom_.capacity_tokens(); }
  index_t chunks_appended() const { return chunks_appended_; }
  index_t tokens_appended() const { return chunks_appended_ * geom_.chunk_size + pending_; }

  /// Bytes of stored chunks (keys + values in S, chunk key in float) and pending tokens, counted as
  /// HostMemoryBank counts them.
  std::size_t bytes_used() const {
    const auto H = static_cast<std::size_t>(geom_.n_head), dh = static_cast<std::size_t>(geom_.head_dim);
    const auto csz = static_cast<std::size_t>(geom_.chunk_size);
    const std::size_t per_chunk = H * (2 * csz * dh * sizeof(S) + dh * sizeof(float));
    const std::size_t per_pending = H * 2 * dh * sizeof(S);
    return static_cast<std::size_t>(num_chunks()) * per_chunk + static_cast<std::size_t>(pending_) * per_pending;
  }

  index_t chunk_sequence(index_t slot) const {
    check_slot(slot, "chunk_sequence");
    const index_t C = geom_.capacity_chunks;
    if (chunks_appended_ <= C) return slot;
    const index_t oldest = chunks_appended_ % C;
    return chunks_appended_ - C + (slot - oldest + C) % C;
  }
  index_t chunk_position(index_t slot) const { return chunk_sequence(slot) * geom_.chunk_size; }
  /// Slot of the oldest stored chunk (0 while the ring has not wrapped, and when empty).
  index_t oldest_slot() const {
    return chunks_appended_ <= geom_.capacity_chunks ? 0 : chunks_appended_ % geom_.capacity_chunks;
  }

  TensorView<const float, Device> chunk_keys() const { return chunk_keys_.view(); }  // (H, C, dh)
  TensorView<const S, Device> keys() const { return keys_.view(); }                  // (H, C, csz, dh)
  TensorView<const S, Device> values() const { return values_.view(); }              // (H, C, csz, dh)

  /// Appends T tokens of keys and values, both (T, H, dh) float, bfloat16 or half (a 16-bit model's)
  /// on the device; semantics of HostMemoryBank::append (pending chunk first, only the newest C
  /// chunks of one call written). Chunk keys are the float means of the keys as given.
  template <class T>
  void append(TensorView<const T, Device> keys, TensorView<const T, Device> values) {
    static_assert(std::is_same_v<T, float> || HalfWidthType<T>,
                  "DeviceMemoryBank::append takes float, bfloat16 or half keys and values");
    const Shape expected{keys.rank() == 3 ? keys.dim(0) : 0, geom_.n_head, geom_.head_dim};
    if (keys.rank() != 3 || !(keys.shape() == expected)) {
      detail::fail<ShapeError>("DeviceMemoryBank::append: keys must be (T, H, dh) = (T, ", geom_.n_head, ", ",
                               geom_.head_dim, "), got ", keys.shape().str());
    }
    if (!(values.shape() == keys.shape())) {
      detail::fail<ShapeError>("DeviceMemoryBank::append: values must have the keys' shape ", keys.shape().str(),
                               ", got ", values.shape().str());
    }
    const index_t n_tok = keys.dim(0), csz = geom_.chunk_size, C = geom_.capacity_chunks;
    if (n_tok == 0) return;
    if (!keys.data() || !values.data()) detail::fail<ShapeError>("DeviceMemoryBank::append: keys or values have no data");
    if (n_tok > max_stream_tokens - tokens_appended()) {
      detail::fail<InputError>("DeviceMemoryBank::append: ", n_tok, " more tokens exceed the 2^53 tokens a stream can hold");
    }
    const detail::BankAppendPlan plan = detail::plan_bank_append(chunks_appended_, pending_, n_tok, csz, C);
    const detail::DeviceBankArrays<S> a = arrays();
    const unsigned threads = detail::bank_append_threads(geom_.head_dim);
    const dim3 heads(static_cast<unsigned>(geom_.n_head));
    if (plan.complete_count > 0) {
      detail::bank_append_pending_kernel<S><<<heads, threads, 0, stream_>>>(
          detail::device_ptr(keys.data()), detail::device_ptr(values.data()), 0, static_cast<int>(plan.complete_count),
          static_cast<int>(pending_), false,
          plan.complete_commit_slot, a);
      check_launch("completing the pending chunk");
    }
    if (plan.whole_count > 0) {
      const dim3 grid(static_cast<unsigned>(plan.whole_count), static_cast<unsigned>(geom_.n_head));
      detail::bank_append_chunks_kernel<S><<<grid, threads, 0, stream_>>>(
          detail::device_ptr(keys.data()), detail::device_ptr(values.data()), plan.whole_t0,
                                                                           plan.whole_first_sequence, a);
      check_launch("writing whole chunks");
    }
    if (plan.tail_count > 0) {
      detail::bank_append_pending_kernel<S><<<heads, threads, 0, stream_>>>(
          detail::device_ptr(keys.data()), detail::device_ptr(values.data()), plan.tail_t0,
          static_cast<int>(plan.tail_count), 0, true, index_t{-1}, a);
      check_launch("starting the pending chunk");
    }
    chunks_appended_ = plan.chunks_after;
    pending_ = plan.pending_after;
  }

  /// Convenience: append from owning device tensors or mutable views.
  template <class K, class V>
    requires requires(const K& k, const V& v) {
      cview(k);
      cview(v);
    }
  void append(const K& keys, const V& values) {
    append(cview(keys), cview(values));
  }

  /// Writes the whole state under `prefix` with HostMemoryBank's names, shapes and dtypes, so a
  /// host bank of the same storage type resumes from it and the other way round. Waits for the
  /// bank's stream.
  void save_state(SafetensorsWriter& w, const std::string& prefix) const {
    using HS = detail::host_storage_t<S>;
    synchronize("save_state");
    w.add<HS>(prefix + "keys", cview(download<HS>(keys_)));
    w.add<HS>(prefix + "values", cview(download<HS>(values_)));
    w.add<float>(prefix + "chunk_keys", cview(download<float>(chunk_keys_)));
    w.add<HS>(prefix + "pending_keys", cview(download<HS>(pending_keys_)));
    w.add<HS>(prefix + "pending_values", cview(download<HS>(pending_values_)));
    Tensor<double, Host> sum = download<double>(pending_sum_);
    if (pending_ == 0) std::fill(sum.begin(), sum.end(), 0.0);  // stale here; the host bank's is 0
    w.add<double>(prefix + "pending_key_sum", cview(sum));
    Tensor<std::int64_t, Host> counters({2});
    counters(0) = chunks_appended_;
    counters(1) = pending_;
    w.add<std::int64_t>(prefix + "counters", cview(counters));
  }

  /// Restores what save_state() (or HostMemoryBank::save_state of the same storage type) wrote,
  /// checked as the host bank checks it: FormatError / ShapeError naming the tensor otherwise, and
  /// the bank is unchanged then.
  void load_state(const SafetensorsFile& f, const std::string& prefix) {
    using HS = detail::host_storage_t<S>;
    HostMemoryBank<HS> staged(geom_);
    staged.load_state(f, prefix);
    synchronize("load_state");
    upload(staged.keys(), keys_);
    upload(staged.values(), values_);
    upload(staged.chunk_keys(), chunk_keys_);
    upload(staged.pending_keys(), pending_keys_);
    upload(staged.pending_values(), pending_values_);
    upload(staged.pending_key_sum(), pending_sum_);
    chunks_appended_ = staged.chunks_appended();
    pending_ = staged.pending_tokens();
  }

  /// Empties the bank; all counters go back to 0. (The pending key sum restarts at 0 with the
  /// next pending chunk, so no device work is needed.)
  void reset() {
    chunks_appended_ = 0;
    pending_ = 0;
  }

 private:
  static constexpr index_t max_stream_tokens = index_t{1} << 53;
  // Slots are reported as int32 and ages are 32-bit keys in the retriever.
  static constexpr index_t max_capacity_chunks = (index_t{1} << 31) - 1;

  static MemoryGeometry checked(MemoryGeometry g) {
    if (g.n_head <= 0 || g.head_dim <= 0 || g.chunk_size <= 0 || g.capacity_chunks <= 0) {
      detail::fail<ConfigError>("DeviceMemoryBank: n_head, head_dim, chunk_size and capacity_chunks must be positive, got ",
                                g.n_head, ", ", g.head_dim, ", ", g.chunk_size, ", ", g.capacity_chunks);
    }
    if (g.capacity_chunks > max_capacity_chunks) {
      detail::fail<ConfigError>("DeviceMemoryBank: ", g.capacity_chunks, " chunks exceed the 2^31 - 1 slots a device bank "
                                "can address (slots are int32); use fewer, larger chunks");
    }
    if (g.capacity_chunks > max_stream_tokens / g.chunk_size) {
      detail::fail<ConfigError>("DeviceMemoryBank: ", g.capacity_chunks, " chunks of ", g.chunk_size,
                                " tokens exceed the 2^53 tokens a stream can hold");
    }
    if (g.n_head > 65535) {
      detail::fail<ConfigError>("DeviceMemoryBank: ", g.n_head, " heads exceed the 65535 a kernel grid dimension allows");
    }
    return g;
  }

  static std::string describe(const MemoryGeometry& g) {
    const char* type = std::is_same_v<S, float> ? "float" : std::is_same_v<S, __half> ? "__half" : "__nv_bfloat16";
    return detail::concat("DeviceMemoryBank: a bank of ", g.capacity_chunks, " chunks of ", g.chunk_size, " tokens (",
                          g.capacity_tokens(), " tokens, ", g.n_head, " heads of ", g.head_dim, ", stored as ", type, ")");
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

  void check_slot(index_t slot, const char* what) const {
    if (slot < 0 || slot >= num_chunks()) {
      detail::fail<ShapeError>("DeviceMemoryBank::", what, ": slot ", slot,
                               " is not a stored chunk (valid slots are [0, ", num_chunks(), "))");
    }
  }

  void check_launch(const char* what) const {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
      detail::fail<BackendError>("DeviceMemoryBank::append: the kernel ", what, " failed to launch: ",
                                 cudaGetErrorString(err), " (", cudaGetErrorName(err), ")");
    }
  }

  void synchronize(const char* what) const {
    if (const cudaError_t err = cudaStreamSynchronize(stream_); err != cudaSuccess) {
      detail::fail<BackendError>("DeviceMemoryBank::", what, ": waiting for the bank's stream failed: ",
                                 cudaGetErrorString(err), " (", cudaGetErrorName(err), ")");
    }
  }
  /// A device buffer's bits as host type H (same size).
  template <class H, class D>
  static Tensor<H, Host> download(const Tensor<D, Device>& src) {
    static_assert(sizeof(H) == sizeof(D));
    Tensor<H, Host> dst(src.shape());
    detail::cuda_check(cudaMemcpy(dst.data(), src.data(), src.bytes(), cudaMemcpyDeviceToHost),
                       "DeviceMemoryBank::save_state: cudaMemcpy device -> host", src.bytes());
    return dst;
  }
  template <class H, class D>
  static void upload(TensorView<const H, Host> src, Tensor<D, Device>& dst) {
    static_assert(sizeof(H) == sizeof(D));
    detail::cuda_check(cudaMemcpy(dst.data(), src.data(), src.bytes(), cudaMemcpyHostToDevice),
                       "DeviceMemoryBank::load_state: cudaMemcpy host -> device", src.bytes());
  }

  detail::DeviceBankArrays<S> arrays() {
    return {keys_.data(),         values_.data(),          chunk_keys_.data(), pending_keys_.data(),
            pending_values_.data(), pending_sum_.data(),   geom_.capacity_chunks, geom_.n_head,
            geom_.head_dim,       geom_.chunk_size};
  }

  MemoryGeometry geom_;
  cudaStream_t stream_ = nullptr;
  Tensor<S, Device> keys_;              // (H, C, csz, dh)
  Tensor<S, Device> values_;            // (H, C, csz, dh)
  Tensor<float, Device> chunk_keys_;    // (H, C, dh)
  Tensor<S, Device> pending_keys_;      // (H, csz, dh)
  Tensor<S, Device> pending_values_;    // (H, csz, dh)
  Tensor<double, Device> pending_sum_;  // (H, dh)
  index_t chunks_appended_ = 0;
  index_t pending_ = 0;
};

static_assert(MemoryBank<DeviceMemoryBank<float>>);
static_assert(MemoryBank<DeviceMemoryBank<__half>>);
static_assert(MemoryBank<DeviceMemoryBank<__nv_bfloat16>>);

}  // namespace longmem
