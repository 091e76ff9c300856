// Tests of <longmem/cuda/storage.hpp>.
//   Always: shape checks of the device copies (they throw before any CUDA call).
//   Without a device: allocation must throw BackendError naming cudaMalloc and the bytes;
//     then the program exits 77, which ctest reports as skipped.
//   With a device: host -> device -> device -> host round trips of random data, sizes 1, odd
//     and large, into NaN-poisoned destinations, and fill() with byte-uniform and other values.
#include <longmem/cuda/storage.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

int failures = 0;

#define CHECK(cond, ...)                                          \
  do {                                                            \
    if (!(cond)) {                                                \
      ++failures;                                                 \
      std::printf("FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                   \
      std::printf("\n");                                          \
    }                                                             \
  } while (0)

// Runs f and reports whether it threw E with a message containing `needle`.
template <class E, class F>
bool throws_with(F&& f, const std::string& needle, std::string* message = nullptr) {
  try {
    f();
  } catch (const E& e) {
    if (message) *message = e.what();
    return std::string(e.what()).find(needle) != std::string::npos;
  } catch (...) {
    return false;
  }
  return false;
}

template <class T>
bool bitwise_equal(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

void test_shape_errors() {
  // Views over null pointers: the shape check must throw before any CUDA call touches them.
  using longmem::Shape;
  longmem::TensorView<const float, longmem::Host> h(nullptr, Shape{2, 3});
  longmem::TensorView<float, longmem::Device> d(nullptr, Shape{3, 2});
  longmem::TensorView<const float, longmem::Device> dc(nullptr, Shape{6});
  longmem::TensorView<float, longmem::Host> hm(nullptr, Shape{2, 3});
  std::string msg;
  CHECK(throws_with<longmem::ShapeError>([&] { longmem::copy(h, d); }, "differs from destination shape (3, 2)", &msg),
        "host->device: %s", msg.c_str());
  CHECK(throws_with<longmem::ShapeError>([&] { longmem::copy(dc, hm); }, "source shape (6)", &msg),
        "device->host: %s", msg.c_str());
  CHECK(throws_with<longmem::ShapeError>([&] { longmem::copy(dc, d); }, "copy device -> device", &msg),
        "device->device: %s", msg.c_str());
}

void test_without_device() {
  std::string msg;
  CHECK(throws_with<longmem::BackendError>(
            [] { longmem::Tensor<float, longmem::Device> t(longmem::Shape{5, 7}); },
            "cudaMalloc of 140 bytes failed", &msg),
        "allocation without a device: '%s'", msg.c_str());
  // Empty tensors allocate nothing, so they work without a device.
  longmem::Tensor<float, longmem::Device> empty(longmem::Shape{0, 3});
  CHECK(empty.data() == nullptr && empty.numel() == 0, "empty device tensor");
}

template <class T>
void round_trip(std::int64_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> dist(-10.0, 10.0);
  // (n) viewed as (n, 1) on the device, to exercise reshape on device views too.
  longmem::Tensor<T> src(longmem::Shape{n});
  for (auto& x : src) x = static_cast<T>(dist(rng));

  longmem::Tensor<T, longmem::Device> a(longmem::Shape{n});
  longmem::Tensor<T, longmem::Device> b(longmem::Shape{n, 1});
  longmem::fill(a.view(), std::numeric_limits<T>::quiet_NaN());
  longmem::fill(b.view(), std::numeric_limits<T>::quiet_NaN());
  longmem::copy(src, a.view());
  longmem::copy(longmem::cview(a).reshape(longmem::Shape{n, 1}), b.view());

  longmem::Tensor<T> back(longmem::Shape{n, 1});
  longmem::fill(back.view(), std::numeric_limits<T>::quiet_NaN());
  longmem::copy(longmem::cview(b), back.view());
  std::int64_t bad = 0;
  for (std::int64_t i = 0; i < n; ++i) bad += !bitwise_equal(back(i, 0), src(i));
  CHECK(bad == 0, "round trip n=%lld seed=%u: %lld elements differ", static_cast<long long>(n), seed,
        static_cast<long long>(bad));

  // fill(): 0 goes through cudaMemset, 1.5 and NaN through staging and doubling copies.
  for (T value : {T(0), T(1.5), std::numeric_limits<T>::quiet_NaN()}) {
    longmem::fill(a.view(), value);
    longmem::Tensor<T> h(longmem::Shape{n});
    longmem::fill(h.view(), T(-3));
    longmem::copy(longmem::cview(a), h.view());
    std::int64_t wrong = 0;
    for (std::int64_t i = 0; i < n; ++i) wrong += !bitwise_equal(h(i), value);
    CHECK(wrong == 0, "fill n=%lld value=%g: %lld elements differ", static_cast<long long>(n),
          static_cast<double>(value), static_cast<long long>(wrong));
  }
}

}  // namespace

int main() {
  test_shape_errors();
  if (!longmem::cuda_device_available()) {
    test_without_device();
    if (failures) return 1;
    std::printf("no CUDA device: checked shape errors and allocation errors only; skipping the round trips\n");
    return 77;
  }
  const std::uint32_t seed = 20240611u;
  std::printf("seed %u\n", seed);
  // 1, odd, just above the 64 Ki staging block, and large (tens of MB).
  for (std::int64_t n : {1LL, 7LL, 1001LL, 65537LL, 3000017LL}) {
    round_trip<float>(n, seed + static_cast<std::uint32_t>(n));
    round_trip<double>(n, seed + 1u + static_cast<std::uint32_t>(n));
  }
  // Moving a device tensor hands over the buffer without copying.
  longmem::Tensor<float, longmem::Device> x(longmem::Shape{16});
  const float* p = x.data();
  longmem::Tensor<float, longmem::Device> y(std::move(x));
  CHECK(y.data() == p && x.data() == nullptr, "move of a device tensor");
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all storage checks passed\n");
  return 0;
}
