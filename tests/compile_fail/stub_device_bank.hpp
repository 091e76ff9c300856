#pragma once
// A stub memory bank that claims to live on the GPU: enough to satisfy the MemoryBank
// concept, so the compile-fail tests reach the model's own diagnostics.
#include <longmem/memory_bank.hpp>

struct StubDeviceBank {
  using value_type = float;
  using location = longmem::Device;
  explicit StubDeviceBank(longmem::MemoryGeometry g) : g_(g) {}
  longmem::MemoryGeometry geometry() const { return g_; }
  longmem::index_t num_chunks() const { return 0; }
  longmem::index_t size_tokens() const { return 0; }
  longmem::index_t pending_tokens() const { return 0; }
  longmem::index_t capacity_tokens() const { return g_.capacity_tokens(); }
  std::size_t bytes_used() const { return 0; }
  longmem::index_t chunks_appended() const { return 0; }
  longmem::index_t chunk_sequence(longmem::index_t) const { return 0; }
  longmem::index_t chunk_position(longmem::index_t) const { return 0; }
  longmem::TensorView<const float, longmem::Device> chunk_keys() const { return {}; }
  longmem::TensorView<const float, longmem::Device> keys() const { return {}; }
  longmem::TensorView<const float, longmem::Device> values() const { return {}; }
  template <class T>
  void append(longmem::TensorView<const T, longmem::Device>, longmem::TensorView<const T, longmem::Device>) {}
  void reset() {}

 private:
  longmem::MemoryGeometry g_;
};
static_assert(longmem::MemoryBank<StubDeviceBank>);
