#pragma once
// Helpers shared by the op-table tests (test_ops.cpp forward, test_ops_backward.cpp backward):
// moving test data to a backend and back, random inputs representable in T, NaN-poisoned
// outputs, and tolerance comparisons. Adding a backend adds one Transfer<L> specialisation
// and one entry per dtype in Combos.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "longmem/tensor.hpp"

namespace longmem::test {

using HostD = Tensor<double, Host>;

// ---------------------------------------------------------------- backends

/// How test data reaches a backend and comes back; one specialisation per location.
template <class L>
struct Transfer;

template <>
struct Transfer<Host> {
  template <class T>
  static Tensor<T, Host> upload(Tensor<T, Host>&& h) {
    return std::move(h);
  }
  template <class T>
  static Tensor<T, Host> download(const Tensor<T, Host>& d) {
    Tensor<T, Host> h(d.shape());
    if (h.numel() > 0 && d.data() != nullptr) copy<T>(d.view(), h.view());
    return h;
  }
};

template <class T_, class L_>
struct Combo {
  using T = T_;
  using L = L_;
};
using Combos = std::tuple<Combo<float, Host>, Combo<double, Host>>;

// ---------------------------------------------------------------- data helpers

inline std::uint64_t base_seed() {
  // LONGMEM_TEST_SEED=<n> reruns the table on other inputs; the default is fixed.
  if (const char* s = std::getenv("LONGMEM_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  return 20230612;
}

template <class T>
HostD random_tensor(Shape s, std::mt19937_64& rng, double lo = -1, double hi = 1) {
  std::uniform_real_distribution<double> u(lo, hi);
  HostD x(s);
  for (double& e : x) e = static_cast<double>(static_cast<T>(u(rng)));  // representable in T
  return x;
}

template <class To, class From>
Tensor<To, Host> cast(const Tensor<From, Host>& x) {
  if (x.data() == nullptr && x.numel() != 0) return {};  // absent: a default tensor has rank 0, no data
  Tensor<To, Host> y(x.shape());
  for (index_t i = 0; i < x.numel(); ++i) y.data()[i] = static_cast<To>(x.data()[i]);
  return y;
}

template <class T, class L>
Tensor<T, L> to_backend(const HostD& x) {
  return Transfer<L>::upload(cast<T>(x));
}

template <class T, class L>
Tensor<T, L> poisoned(Shape s) {
  Tensor<T, Host> h(s);
  fill<T>(h.view(), std::numeric_limits<T>::quiet_NaN());
  return Transfer<L>::upload(std::move(h));
}

template <class T, class L>
HostD to_double(const Tensor<T, L>& x) {
  return cast<double>(Transfer<L>::download(x));
}

/// The same elements under another shape (a copy: tensors own their buffers).
inline HostD reshaped(const HostD& x, Shape s) {
  HostD y(s);
  copy<double>(cview(x).reshape(s), y.view());
  return y;
}

inline HostD scalar_tensor(std::vector<double> values) {
  HostD x(Shape{static_cast<index_t>(values.size())});
  std::copy(values.begin(), values.end(), x.begin());
  return x;
}

/// The outputs of one run (tensors are move-only, so no initializer list).
template <class... X>
std::vector<HostD> outputs(X&&... x) {
  std::vector<HostD> v;
  (v.push_back(std::move(x)), ...);
  return v;
}

struct Tolerance {
  double atol = 0, rtol = 0;
};

template <class T>
Tolerance tol(double float_atol, double float_rtol) {
  if constexpr (std::is_same_v<T, float>) return {float_atol, float_rtol};
  return {1e-12, 1e-12};
}

struct Comparison {
  double max_err = 0, max_ref = 0, bound = 0;
  bool ok = false;
  std::string str() const {
    std::ostringstream os;
    os << "max|out-ref| = " << max_err << ", max|ref| = " << max_ref << ", bound = " << bound;
    return os.str();
  }
};

/// max |got - ref| <= atol + rtol * max |ref|; any NaN (an unwritten element) fails.
inline Comparison compare(const HostD& got, const HostD& ref, Tolerance t) {
  Comparison c;
  if (!(got.shape() == ref.shape())) return c;
  for (double r : ref) c.max_ref = std::max(c.max_ref, std::abs(r));
  c.bound = t.atol + t.rtol * c.max_ref;
  bool finite = true;
  for (index_t i = 0; i < got.numel(); ++i) {
    const double e = std::abs(got.data()[i] - ref.data()[i]);
    if (!(e == e)) finite = false;
    c.max_err = std::max(c.max_err, e);
  }
  c.ok = finite && c.max_err <= c.bound;
  if (!finite) c.max_err = std::numeric_limits<double>::quiet_NaN();
  return c;
}

inline bool bitwise_equal(const HostD& a, const HostD& b) {
  if (!(a.shape() == b.shape())) return false;
  for (index_t i = 0; i < a.numel(); ++i) {
    if (!(a.data()[i] == b.data()[i])) return false;  // NaN never equals
  }
  return true;
}

}  // namespace longmem::test
