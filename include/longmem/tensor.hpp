#pragma once
// Buffers that know where they live.
//
//   Location tags   Host, Device        where the bytes are
//   Shape           up to 5 extents, row-major
//   TensorView<T,L> non-owning, contiguous, row-major view
//   Tensor<T,L>     owning buffer; allocation is dispatched on L through
//                   detail::Allocator<L> (Host here, Device in longmem/cuda/storage.hpp)
//
// Ops take views, never Eigen types, so a CUDA backend can specialise the same
// signatures; element access through operator() exists only for Host views.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <new>
#include <string>
#include <type_traits>
#include <utility>

#include "longmem/detail/host_memory.hpp"
#include "longmem/dtype.hpp"
#include "longmem/error.hpp"

namespace longmem {

using index_t = std::int64_t;

/// Buffers in ordinary host memory.
struct Host {
  static constexpr const char* name = "host";
};
/// Buffers in GPU memory (allocation needs <longmem/cuda/storage.hpp>).
struct Device {
  static constexpr const char* name = "device";
};

template <class L>
concept Location = std::is_same_v<L, Host> || std::is_same_v<L, Device>;

/// Element types a model (backbone, SideNet, Model) holds its weights and activations in at
/// location L: float or double anywhere; bfloat16 or half on the device only, where every op reads
/// and writes 16-bit values but computes in fp32 (GEMMs accumulate in fp32, LayerNorm and softmax
/// statistics in fp32 or double), as PyTorch's bf16 and fp16 modules do.
template <class T>
concept HalfWidthType = std::is_same_v<T, bfloat16> || std::is_same_v<T, half>;
template <class T, class L>
concept ModelValueType = Location<L> && (ComputeType<T> || (HalfWidthType<T> && std::is_same_v<L, Device>));

/// Extents of a row-major tensor, rank 0..max_rank.
class Shape {
 public:
  static constexpr int max_rank = 5;

  constexpr Shape() = default;
  constexpr Shape(std::initializer_list<index_t> dims) {
    if (dims.size() > static_cast<std::size_t>(max_rank)) {
      detail::fail<ShapeError>("a shape has at most ", max_rank, " dimensions, got ", dims.size());
    }
    for (index_t d : dims) {
      if (d < 0) detail::fail<ShapeError>("a shape extent must be >= 0, got ", d);
      dims_[static_cast<std::size_t>(rank_++)] = d;
    }
  }

  constexpr int rank() const { return rank_; }
  constexpr index_t operator[](int i) const { return dims_[static_cast<std::size_t>(i)]; }
  constexpr index_t& operator[](int i) { return dims_[static_cast<std::size_t>(i)]; }

  /// Number of elements (1 for rank 0).
  constexpr index_t numel() const {
    index_t n = 1;
    for (int i = 0; i < rank_; ++i) n *= dims_[static_cast<std::size_t>(i)];
    return n;
  }

  /// The shape without its first extent.
  constexpr Shape drop_front() const {
    Shape s;
    for (int i = 1; i < rank_; ++i) s.push_back(dims_[static_cast<std::size_t>(i)]);
    return s;
  }

  constexpr void push_back(index_t d) {
    if (rank_ == max_rank) detail::fail<ShapeError>("a shape has at most ", max_rank, " dimensions");
    dims_[static_cast<std::size_t>(rank_++)] = d;
  }

  friend constexpr bool operator==(const Shape& a, const Shape& b) {
    if (a.rank_ != b.rank_) return false;
    for (int i = 0; i < a.rank_; ++i) {
      if (a.dims_[static_cast<std::size_t>(i)] != b.dims_[static_cast<std::size_t>(i)]) return false;
    }
    return true;
  }

  /// "(2, 3, 4)"
  std::string str() const {
    std::string s = "(";
    for (int i = 0; i < rank_; ++i) {
      if (i) s += ", ";
      s += std::to_string(dims_[static_cast<std::size_t>(i)]);
    }
    return s + ")";
  }

 private:
  std::array<index_t, max_rank> dims_{};
  int rank_ = 0;
};

/// Non-owning view of a contiguous row-major tensor at location L.
template <class T, class L = Host>
class TensorView {
  static_assert(Location<L>, "the second argument of TensorView must be longmem::Host or longmem::Device");

 public:
  using value_type = T;
  using location = L;

  constexpr TensorView() = default;
  constexpr TensorView(T* data, Shape shape) : data_(data), shape_(shape) {}

  /// A view of T converts to a view of const T.
  template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  constexpr TensorView(TensorView<U, L> other) : data_(other.data()), shape_(other.shape()) {}

  constexpr T* data() const { return data_; }
  constexpr const Shape& shape() const { return shape_; }
  constexpr int rank() const { return shape_.rank(); }
  constexpr index_t dim(int i) const { return shape_[i]; }
  /// Elements viewed; 0 for a view over no data (a default-constructed view).
  constexpr index_t numel() const { return data_ ? shape_.numel() : 0; }
  /// No elements: a default-constructed view (rank 0, no data) or a zero extent.
  constexpr bool empty() const { return numel() == 0; }
  constexpr std::size_t bytes() const { return static_cast<std::size_t>(numel()) * sizeof(T); }

  /// Sub-tensor i along the first dimension (rank - 1).
  constexpr TensorView operator[](index_t i) const {
    check_index(i);
    Shape inner = shape_.drop_front();
    return TensorView(data_ + i * inner.numel(), inner);
  }

  /// Rows [begin, end) along the first dimension.
  constexpr TensorView slice(index_t begin, index_t end) const {
    if (rank() == 0 || begin < 0 || end < begin || end > dim(0)) {
      detail::fail<ShapeError>("slice [", begin, ", ", end, ") is outside a tensor of shape ", shape_.str());
    }
    Shape s = shape_;
    s[0] = end - begin;
    return TensorView(data_ + begin * shape_.drop_front().numel(), s);
  }

  /// The same elements under another shape with the same element count.
  constexpr TensorView reshape(Shape s) const {
    if (s.numel() != numel()) {
      detail::fail<ShapeError>("cannot reshape ", shape_.str(), " to ", s.str(), ": element counts differ");
    }
    return TensorView(data_, s);
  }

  /// Element access, host views only: v(t, h, d).
  template <class... I>
  T& operator()(I... idx) const {
    static_assert(std::is_same_v<L, Host>, "element access is for host views; copy device data to the host first");
    const index_t ids[] = {static_cast<index_t>(idx)...};
    index_t off = 0;
    for (std::size_t k = 0; k < sizeof...(I); ++k) off = off * shape_[static_cast<int>(k)] + ids[k];
    return data_[off];
  }

  /// Iteration over all elements, host views only.
  T* begin() const {
    static_assert(std::is_same_v<L, Host>, "iteration is for host views");
    return data_;
  }
  T* end() const { return data_ + numel(); }

 private:
  constexpr void check_index(index_t i) const {
    if (rank() == 0 || i < 0 || i >= dim(0)) {
      detail::fail<ShapeError>("index ", i, " is outside the first dimension of a tensor of shape ", shape_.str());
    }
  }

  T* data_ = nullptr;
  Shape shape_;
};

namespace detail {

/// Allocation policy per location. The Device specialisation lives in
/// <longmem/cuda/storage.hpp>; using Device without it is a compile error there.
template <class L>
struct Allocator {};

template <>
struct Allocator<Host> {
  static constexpr std::size_t alignment = 64;  // one cache line; enough for AVX-512 loads
  static void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    const std::size_t rounded = (bytes + alignment - 1) / alignment * alignment;
    void* p = std::aligned_alloc(alignment, rounded);
    if (!p) fail<BackendError>("out of host memory allocating ", describe_bytes(bytes));
    return p;
  }
  static void deallocate(void* p) noexcept { std::free(p); }
  /// Host memory is always there (Allocator<Device>::require_usable checks for a GPU).
  static void require_usable(const char* /*what*/) {}
};

template <class L>
concept HasAllocator = requires(std::size_t n, void* p) {
  { Allocator<L>::allocate(n) } -> std::same_as<void*>;
  Allocator<L>::deallocate(p);
};

}  // namespace detail

/// Owning, contiguous, row-major buffer at location L. Move-only; clone() copies.
template <class T, class L = Host>
class Tensor {
  static_assert(Location<L>, "the second argument of Tensor must be longmem::Host or longmem::Device");
  static_assert(std::is_trivially_copyable_v<T>, "Tensor elements must be trivially copyable");

 public:
  using value_type = T;
  using location = L;

  Tensor() = default;
  explicit Tensor(Shape shape) { resize(shape); }
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;
  Tensor(Tensor&& o) noexcept : data_(std::exchange(o.data_, nullptr)), shape_(o.shape_), capacity_(std::exchange(o.capacity_, 0)) {}
  Tensor& operator=(Tensor&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      shape_ = o.shape_;
      capacity_ = std::exchange(o.capacity_, 0);
    }
    return *this;
  }
  ~Tensor() { release(); }

  /// Sets the shape; reallocates only when the element count exceeds the capacity.
  /// Contents are unspecified afterwards.
  void resize(Shape shape) {
    static_assert(detail::HasAllocator<L>, "Tensor<T, longmem::Device> needs #include <longmem/cuda/storage.hpp>");
    const index_t n = shape.numel();
    if (n > capacity_) {
      if (static_cast<std::size_t>(n) > std::numeric_limits<std::size_t>::max() / sizeof(T)) {
        detail::fail<BackendError>("a tensor of shape ", shape.str(), " is too large to allocate");
      }
      if constexpr (std::is_same_v<L, Host>) {
        // Refused up front rather than left to overcommit (pages that cannot be backed kill the
        // process when touched) or to a failure deep inside a forward.
        const std::uint64_t need = static_cast<std::uint64_t>(n) * sizeof(T), have = detail::physical_memory_bytes();
        if (have > 0 && need > have) {
          detail::fail<BackendError>("a host tensor of shape ", shape.str(), " needs ", detail::describe_bytes(need),
                                     " but this machine has ", detail::describe_bytes(have), " of memory");
        }
      }
      release();
      data_ = static_cast<T*>(detail::Allocator<L>::allocate(static_cast<std::size_t>(n) * sizeof(T)));
      capacity_ = n;
    }
    shape_ = shape;
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  const Shape& shape() const { return shape_; }
  int rank() const { return shape_.rank(); }
  index_t dim(int i) const { return shape_[i]; }
  /// Elements held; 0 when nothing is allocated (a default-constructed tensor).
  index_t numel() const { return data_ ? shape_.numel() : 0; }
  /// No elements: default-constructed (rank 0, nothing allocated) or a zero extent.
  bool empty() const { return numel() == 0; }
  std::size_t bytes() const { return static_cast<std::size_t>(numel()) * sizeof(T); }
  /// Bytes allocated (>= bytes()).
  std::size_t capacity_bytes() const { return static_cast<std::size_t>(capacity_) * sizeof(T); }

  TensorView<T, L> view() { return {data_, shape_}; }
  TensorView<const T, L> view() const { return {data_, shape_}; }
  operator TensorView<T, L>() { return view(); }
  operator TensorView<const T, L>() const { return view(); }

  TensorView<T, L> operator[](index_t i) { return view()[i]; }
  TensorView<const T, L> operator[](index_t i) const { return view()[i]; }

  template <class... I>
  T& operator()(I... idx) {
    return view()(idx...);
  }
  template <class... I>
  const T& operator()(I... idx) const {
    return view()(idx...);
  }

  T* begin() { return view().begin(); }
  T* end() { return view().end(); }
  const T* begin() const { return view().begin(); }
  const T* end() const { return view().end(); }

 private:
  void release() noexcept {
    if (data_) detail::Allocator<L>::deallocate(data_);
    data_ = nullptr;
    capacity_ = 0;
  }

  T* data_ = nullptr;
  Shape shape_;
  index_t capacity_ = 0;
};

/// Fills a host view with one value (tests poison outputs with NaN this way).
template <class T>
void fill(TensorView<T, Host> v, T value) {
  std::fill(v.begin(), v.end(), value);
}

/// Host-to-host copy; shapes must match exactly. Device copies live in cuda/storage.hpp.
template <class T>
void copy(TensorView<const T, Host> src, TensorView<T, Host> dst) {
  if (!(src.shape() == dst.shape())) {
    detail::fail<ShapeError>("copy: source shape ", src.shape().str(), " differs from destination shape ", dst.shape().str());
  }
  if (src.numel() > 0) std::memcpy(dst.data(), src.data(), src.bytes());
}

/// A host copy of a view or tensor at any location (device data needs <longmem/cuda/storage.hpp>).
template <class T, class L>
Tensor<std::remove_const_t<T>, Host> to_host(TensorView<T, L> v) {
  using U = std::remove_const_t<T>;
  Tensor<U, Host> h(v.shape());
  if (v.numel() > 0) copy(TensorView<const U, L>(v), h.view());
  return h;
}
template <class T, class L>
Tensor<T, Host> to_host(const Tensor<T, L>& t) {
  return to_host(t.view());
}

/// A host copy of a host view with every element converted to U (through float for the 16-bit
/// types, round to nearest even; double -> float rounds once).
/// A finite value beyond half's range (65,504) is an InputError, not a silent infinity.
template <class U, class T>
Tensor<U, Host> converted(TensorView<const T, Host> v) {
  Tensor<U, Host> out(v.shape());
  const T* src = v.data();
  U* dst = out.data();
  for (index_t i = 0; i < v.numel(); ++i) {
    if constexpr (std::is_same_v<U, T>) {
      dst[i] = src[i];
    } else if constexpr (std::is_same_v<U, double> && std::is_same_v<T, float>) {
      dst[i] = src[i];
    } else {
      const float x = to_float(src[i]);
      dst[i] = from_float<U>(x);
      if constexpr (std::is_same_v<U, half>) {
        if (std::isfinite(x) && !std::isfinite(to_float(dst[i]))) {
          detail::fail<InputError>("converting to fp16: element ", i, " of a ", v.shape().str(), " tensor is ", x,
                                   ", beyond fp16's largest finite value 65504");
        }
      }
    }
  }
  return out;
}

/// dst := src's elements as U, resized to src's shape, at dst's location: a plain copy when the
/// types agree, else converted on the host first (converted<U>: src must be a host view). What a
/// backbone's or SideNet's to<L2, T2>() does for each of its tensors.
template <class U, class LD, class T, class LS>
void assign_converted(TensorView<const T, LS> src, Tensor<U, LD>& dst) {
  dst.resize(src.shape());
  if constexpr (std::is_same_v<U, T>) {
    copy(src, dst.view());
  } else {
    const Tensor<U, Host> host = converted<U>(src);
    copy(host.view(), dst.view());
  }
}

/// Throws ShapeError unless v has exactly the expected shape; `what` names the tensor.
template <class V>
void expect_shape(const V& v, const Shape& expected, const char* what) {
  if (!(v.shape() == expected)) {
    detail::fail<ShapeError>(what, ": expected shape ", expected.str(), ", got ", v.shape().str());
  }
}

}  // namespace longmem

namespace longmem {
/// The const view of a tensor or view: cview(t) for inputs of ops that deduce from it.
template <class T, class L>
TensorView<const T, L> cview(const Tensor<T, L>& t) {
  return t.view();
}
template <class T, class L>
TensorView<const T, L> cview(TensorView<T, L> v) {
  return v;
}
}  // namespace longmem
