// The forward op table on every backend: OpsBackend<Device> (cuda/ops.cuh) and OpsBackend<Host>
// (cpu/ops.hpp) in float, each against the float64 reference (reference/ops.hpp), on fresh random
// inputs at odd shapes, every output NaN-poisoned before the call so an unwritten element fails.
//
// The table is backend-agnostic: each op case states its sizes, how to draw inputs, how to run the
// op on a location L (one generic lambda, instantiated for Host and Device) and the reference.
// Adding a kernel adds no test code; adding an op adds one case. Then behaviour checks (K = 0 is
// exactly causal attention, saturated gates, no leak from the future, scores in the thousands) and
// refusals (the same exception types and message parts as the host backend; nothing written).
//
// Tolerances, max |out - ref| <= atol + rtol * max |ref| per output (inputs are rounded to float
// first, so only the computation is compared):
//   embedding, add, add_difference   rtol 1e-6   one float rounding per element
//   layer_norm                       rtol 1e-5   statistics in double, one rounding (device and host)
//   gelu                             rtol 1e-5   CUDA tanhf / erff are within a few ulp
//   linear                           rtol 1e-4   fp32 sums of up to 256 terms in cuBLASLt's order (split-K
//                                                or not): worst case ~I * 6e-8 of sum |x w|
//   linear_gelu                      rtol 1e-4   linear's sums, then gelu (slope <= 1.13) in float
//   attention                        rtol 1e-4   float scores and exps, online rescaling once per 32-key
//                                                tile, up to 300 keys + 64 memory tokens per softmax
//   cross_entropy                    losses 1e-6 abs + rel (exp in float, sums in double, stored as
//                                    float); the sum 1e-6 per counted row; the count exactly
//
// The backward ops (cases named "backward: ..."): each runs in float on both backends and, as the
// reference, in double on the host backend (whose backwards tests/unit/test_ops_backward.cpp checks
// against float64 finite differences). Parameter gradients start from random values, so the cases
// check that they accumulate:
//   embedding          rtol 1e-6   one float addition per repeated id, in position order
//   layer_norm         rtol 1e-5   row statistics in double; column sums over up to 300 rows in float
//   linear             rtol 1e-4   as linear; d_bias 1e-5 (a float column sum)
//   gelu               rtol 1e-5   as gelu
//   causal_attention   rtol 1e-4   five float GEMMs (cuBLASLt) and a float softmax per head
//   memory_attention   rtol 1e-4   as causal_attention, plus float sums over up to 64 retrieved
//                                  tokens per row; d_gate a double sum over T of float terms
//   cross_entropy      rtol 1e-5, atol 1e-7 (one float rounding of scale <= 1: a V = 1 row is 0 only in double)
// Backward cases run in the fp32 mode only (training uses it).
//
// Then linear and the attention ops again on the device under the reduced-precision modes
// (longmem::DeviceMath, cuda/math_mode.hpp), against the same float64 references. u is the unit
// roundoff of the inputs' rounding: 2^-11 for tf32 (11 significant bits), 2^-8 for bf16 (8 bits).
//   linear     rtol 8u (GEMM's u)   each product of two rounded inputs is off by <= 2u |x w|, so
//                                   a sum by <= 2u sum |x w|; with inputs uniform in [-1, 1] and up
//                                   to 256 terms, sum |x w| ~ I/4 is ~4x max |ref| ~ sqrt(I)
//   attention  rtol 16u (tf32's u, the attention kernel's in both modes)   a score q.k/sqrt(dh) is
//                                   off by <= 2u sum |q k| / sqrt(dh) <= ~4u (dh 64), which its exp
//                                   carries as a relative error; P and V add u each; the output is
//                                   an average of v rows, and max |ref| >= ~1 (row 0 is v_0)
// and each mode must visibly take effect: its worst error relative to max |ref| over the sizes
// must exceed 2^-18 (the fp32 mode stays near 2^-24 x a few), else the mode was ignored.
//
// Then every forward case on the device with bfloat16 buffers (the bf16 model's ops), and again
// with half buffers (the fp16 model's), inputs rounded to that type first so that only the op is
// compared, against the float64 reference of those inputs: the float tolerance plus u = 2^-8 (bf16)
// or 2^-11 (fp16) of max |ref| for the output's rounding (<= u / 2 of |out|); linear 2u (cuBLASLt
// may round between product, accumulation and bias); attention also 4u (its probabilities go to
// the tensor cores in the 16-bit type); cross_entropy reads 16-bit logits exactly and writes float,
// so its float tolerance.
//
// Exit status: 0 all passed, 1 something failed, 77 no CUDA device (ctest: skipped; the table
// then runs on the host backend alone, so the cases themselves are still checked).
// Arguments: an optional substring of op names to run only those. LONGMEM_TEST_SEED=<n> draws
// other inputs, LONGMEM_TEST_STRIDE=<n> runs every n-th size; every failure prints the op, backend,
// sizes, seed and the errors.

// The host backend (Eigen) is compiled here as plain host code.
#define EIGEN_NO_CUDA

#include <longmem/cpu/ops.hpp>
#include <longmem/cuda/ops.cuh>
#include <longmem/cuda/storage.hpp>
#include <longmem/reference/ops.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "gpu_check.hpp"

namespace {

using namespace longmem;
using HostD = Tensor<double, Host>;
using Outputs = std::vector<HostD>;

bool device_present = false;

// ---------------------------------------------------------------- backends

// DeviceBf16 / DeviceF16: the device backend on bfloat16 / half buffers (forward cases only;
// run_table's 16-bit passes).
enum class Backend { Host, Device, DeviceBf16, DeviceF16 };
const char* name(Backend b) {
  switch (b) {
    case Backend::Host: return "host";
    case Backend::Device: return "device";
    case Backend::DeviceBf16: return "device bf16";
    case Backend::DeviceF16: return "device fp16";
  }
  return "?";
}
constexpr Backend backends[] = {Backend::Host, Backend::Device};

/// LONGMEM_TEST_STRIDE=<n> runs every n-th size of each op case (quick runs, sanitizers).
std::size_t size_stride() {
  const char* s = std::getenv("LONGMEM_TEST_STRIDE");
  const unsigned long long n = s ? std::strtoull(s, nullptr, 10) : 1;
  return n < 1 ? 1 : static_cast<std::size_t>(n);
}

std::uint64_t base_seed() {
  if (const char* s = std::getenv("LONGMEM_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  return 20230612;
}

/// A tensor of E (float, or bfloat16 / half on the device) at L holding x (absent stays absent).
template <class L, class E = float>
Tensor<E, L> to(const HostD& x) {
  if (x.data() == nullptr) return {};
  Tensor<E, Host> h(x.shape());
  for (index_t i = 0; i < x.numel(); ++i) h.data()[i] = from_float<E>(static_cast<float>(x.data()[i]));
  if constexpr (std::is_same_v<L, Host>) {
    return h;
  } else {
    Tensor<E, Device> d(x.shape());
    copy<E>(cview(h), d.view());
    return d;
  }
}

/// A tensor of E at L of shape s, every element NaN.
template <class L, class E = float>
Tensor<E, L> poisoned(Shape s) {
  Tensor<E, L> t(s);
  fill<E>(t.view(), from_float<E>(std::numeric_limits<float>::quiet_NaN()));
  return t;
}

/// The contents of a view at L, in double on the host.
template <class L, class E>
HostD back(TensorView<const E, L> v) {
  Tensor<E, Host> h(v.shape());
  if (v.numel() > 0) copy<E>(v, h.view());
  HostD x(v.shape());
  for (index_t i = 0; i < h.numel(); ++i) x.data()[i] = static_cast<double>(to_float(h.data()[i]));
  return x;
}
template <class L, class E>
HostD back(const Tensor<E, L>& t) {
  return back<L, E>(t.view());
}

/// A view of `n` elements that starts one element into a larger buffer: aligned to one element only.
template <class L, class E = float>
struct Offset {
  Tensor<E, L> buffer;
  TensorView<E, L> view;
};
template <class L, class E = float>
Offset<L, E> offset_copy(const HostD& x) {
  HostD padded(Shape{x.numel() + 1});
  padded.data()[0] = 0;
  std::copy(x.data(), x.data() + x.numel(), padded.data() + 1);
  Offset<L, E> o{to<L, E>(padded), {}};
  o.view = TensorView<E, L>(o.buffer.data() + 1, x.shape());
  return o;
}

HostD random_tensor(Shape s, std::mt19937_64& rng, double lo = -1, double hi = 1) {
  std::uniform_real_distribution<double> u(lo, hi);
  HostD x(s);
  for (double& e : x) e = static_cast<double>(static_cast<float>(u(rng)));  // representable in float
  return x;
}

HostD scalar(double v) {
  HostD x(Shape{1});
  x(0) = v;
  return x;
}

HostD reshaped(const HostD& x, Shape s) {
  HostD y(s);
  copy<double>(cview(x).reshape(s), y.view());
  return y;
}

template <class... X>
Outputs outputs(X&&... x) {
  Outputs v;
  (v.push_back(std::move(x)), ...);
  return v;
}

struct Tolerance {
  double atol = 0, rtol = 0;
};

struct Comparison {
  double max_err = 0, max_ref = 0, bound = 0;
  index_t worst = -1, nan_at = -1;
  bool shape_ok = true, ok = false;
  std::string str() const {
    std::ostringstream os;
    if (!shape_ok) return "shapes differ";
    os << "max|out-ref| = " << max_err << " at " << worst << ", max|ref| = " << max_ref << ", bound = " << bound;
    if (nan_at >= 0) os << ", first NaN/unwritten element at flat index " << nan_at;
    return os.str();
  }
};

Comparison compare(const HostD& got, const HostD& ref, Tolerance t) {
  Comparison c;
  if (!(got.shape() == ref.shape())) {
    c.shape_ok = false;
    return c;
  }
  for (index_t i = 0; i < ref.numel(); ++i) c.max_ref = std::max(c.max_ref, std::abs(ref.data()[i]));
  c.bound = t.atol + t.rtol * c.max_ref;
  for (index_t i = 0; i < got.numel(); ++i) {
    const double e = std::abs(got.data()[i] - ref.data()[i]);
    if (!(e == e)) {
      if (c.nan_at < 0) c.nan_at = i;
      continue;
    }
    if (e > c.max_err) c.max_err = e, c.worst = i;
  }
  c.ok = c.nan_at < 0 && c.max_err <= c.bound;
  return c;
}

bool bitwise_equal(const HostD& a, const HostD& b) {
  if (!(a.shape() == b.shape())) return false;
  for (index_t i = 0; i < a.numel(); ++i) {
    if (!(a.data()[i] == b.data()[i])) return false;
  }
  return true;
}

/// Waits for the device and turns an asynchronous fault into a message naming where it surfaced.
std::string device_error() {
  const cudaError_t e = cudaDeviceSynchronize();
  if (e == cudaSuccess) return {};
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

// ---------------------------------------------------------------- the op table

struct Params {
  index_t T = 1, H = 1, dh = 1, K = 0, N = 1, I = 1, O = 1, V = 1, C = 1;
  PositionScheme pos = PositionScheme::Learned;
  int variant = 0;  // op-specific switch
  int fusion = 0;   // 0 gated, 1 joint
  std::string str() const {
    std::ostringstream os;
    os << "T=" << T << " H=" << H << " dh=" << dh << " K=" << K << " N=" << N << " I=" << I << " O=" << O << " V=" << V
       << " C=" << C << " pos=" << to_string(pos) << " variant=" << variant << " fusion=" << (fusion ? "joint" : "gated");
    return os.str();
  }
};

struct Inputs {
  std::vector<HostD> x;
  std::vector<std::int32_t> ids;
};

using RunFn = std::function<Outputs(Backend, const Params&, const Inputs&)>;

struct OpCase {
  std::string name;
  std::vector<Params> sizes;
  std::function<Inputs(const Params&, std::mt19937_64&)> make;
  RunFn run;
  std::function<Outputs(const Params&, const Inputs&)> reference;
  std::vector<Tolerance> tolerance;  // one per output
};

/// Turns one generic lambda f(location, element, params, inputs) into a run for every backend:
/// float on the host and the device, and bfloat16 or half buffers on the device (16-bit models').
template <class F>
RunFn on_every_backend(F f) {
  return [f](Backend b, const Params& p, const Inputs& in) -> Outputs {
    if (b == Backend::Host) return f(Host{}, float{}, p, in);
    if (b == Backend::DeviceBf16) return f(Device{}, bfloat16{}, p, in);
    if (b == Backend::DeviceF16) return f(Device{}, longmem::half{}, p, in);
    return f(Device{}, float{}, p, in);
  };
}

/// Backward cases run the same generic lambda f(location, value, params, inputs) in float on every
/// backend and, as the reference, in double on the host backend, whose backward ops are checked
/// against float64 finite differences of the reference ops (tests/unit/test_ops_backward.cpp).
template <class T, class L>
Tensor<T, L> tensor_at(const HostD& x) {
  if (x.data() == nullptr) return {};
  if constexpr (std::is_same_v<T, double>) {
    static_assert(std::is_same_v<L, Host>, "double tensors live on the host");
    HostD h(x.shape());
    std::copy(x.data(), x.data() + x.numel(), h.data());
    return h;
  } else {
    return to<L>(x);
  }
}
template <class T, class L>
HostD read_back(const Tensor<T, L>& t) {
  if (t.data() == nullptr) return {};
  if constexpr (std::is_same_v<T, double>) {
    HostD h(t.shape());
    std::copy(t.data(), t.data() + t.numel(), h.data());
    return h;
  } else {
    return back<L>(t);
  }
}
template <class T, class L>
Tensor<T, L> poisoned_at(Shape s) {
  Tensor<T, L> t(s);
  fill<T>(t.view(), std::numeric_limits<T>::quiet_NaN());
  return t;
}
template <class F>
void backward_case(OpCase& c, F f) {
  c.run = [f](Backend b, const Params& p, const Inputs& in) -> Outputs {
    if (b == Backend::Host) return f(Host{}, float{}, p, in);
    return f(Device{}, float{}, p, in);
  };
  c.reference = [f](const Params& p, const Inputs& in) { return f(Host{}, double{}, p, in); };
}

constexpr index_t seq[] = {1, 7, 64, 129, 300};

struct HeadShape {
  index_t H, dh;
};
// 4x16 and 12x64 (the model shapes), dh = 1, an odd dh in the 128 bucket, and the widest head (256).
constexpr HeadShape head_shapes[] = {{4, 16}, {12, 64}, {2, 1}, {3, 100}, {1, 256}};

HostD gate_logits(const Params& p, std::mt19937_64& rng) {
  HostD g = random_tensor(Shape{p.H}, rng, -3, 3);
  if (p.variant % 3 != 0) {  // saturated gates, both signs
    const double sign = p.variant % 3 == 1 ? 1 : -1;
    for (index_t h = 0; h < p.H; ++h) g(h) = sign * (h % 2 == 0 ? 35.0 : -30.0);
  }
  return g;
}

std::vector<OpCase> op_table() {
  std::vector<OpCase> table;

  {  // embedding, with and without learned positions
    OpCase c;
    c.name = "embedding";
    for (index_t T : seq)
      for (index_t d : {1, 16, 65, 768})
        for (int with_wpe : {0, 1}) {
          Params p;
          p.T = T, p.C = d, p.V = d == 768 ? 1000 : 50, p.variant = with_wpe;
          c.sizes.push_back(p);
        }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      in.x.push_back(random_tensor(Shape{p.V, p.C}, rng));
      in.x.push_back(p.variant ? random_tensor(Shape{p.T + 3, p.C}, rng) : HostD());
      std::uniform_int_distribution<std::int32_t> tok(0, static_cast<std::int32_t>(p.V - 1));
      for (index_t t = 0; t < p.T; ++t) in.ids.push_back(tok(rng));
      return in;
    };
    c.run = on_every_backend([](auto loc, auto elem, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using E = decltype(elem);
      auto wte = to<L, E>(in.x[0]);
      auto wpe = to<L, E>(in.x[1]);
      auto out = poisoned<L, E>(Shape{p.T, p.C});
      ops::embedding(out.view(), std::span<const std::int32_t>(in.ids), cview(wte),
                     p.variant ? cview(wpe) : TensorView<const E, L>{});
      return outputs(back(out));
    });
    c.reference = [](const Params&, const Inputs& in) { return outputs(reference::embedding(in.ids, in.x[0], in.x[1])); };
    c.tolerance = {{0, 1e-6}};
    table.push_back(std::move(c));
  }

  {  // layer_norm: 0 bias, 1 no bias, 2 (N, C/4, 4) view with a large mean, 3 in place
    OpCase c;
    c.name = "layer_norm";
    for (index_t N : seq)
      for (index_t C : {1, 16, 67, 768, 3072})
        for (int variant : {0, 1, 2, 3}) {
          if (variant == 2 && C % 4 != 0) continue;
          Params p;
          p.N = N, p.C = C, p.variant = variant;
          c.sizes.push_back(p);
        }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      const double offset = p.variant == 2 ? 30 : 0;  // a large mean tests the two-pass variance
      in.x.push_back(random_tensor(Shape{p.N, p.C}, rng, offset - 2, offset + 2));
      in.x.push_back(random_tensor(Shape{p.C}, rng, 0.5, 1.5));
      in.x.push_back(p.variant == 1 ? HostD() : random_tensor(Shape{p.C}, rng));
      return in;
    };
    c.run = on_every_backend([](auto loc, auto elem, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using E = decltype(elem);
      using CV = TensorView<const E, L>;
      auto x = to<L, E>(in.x[0]);
      auto w = to<L, E>(in.x[1]);
      auto b = to<L, E>(in.x[2]);
      const CV bias = p.variant == 1 ? CV{} : cview(b);
      if (p.variant == 3) {
        ops::layer_norm(x.view(), cview(x), cview(w), bias, 1e-5);
        return outputs(back(x));
      }
      const Shape s = p.variant == 2 ? Shape{p.N, p.C / 4, 4} : Shape{p.N, p.C};
      auto out = poisoned<L, E>(s);
      ops::layer_norm(out.view(), cview(x).reshape(s), cview(w), bias, 1e-5);
      return outputs(reshaped(back(out), Shape{p.N, p.C}));
    });
    c.reference = [](const Params& p, const Inputs& in) {
      HostD zero(Shape{p.C});
      fill<double>(zero.view(), 0.0);
      return outputs(reference::layer_norm(in.x[0], in.x[1], p.variant == 1 ? cview(zero) : cview(in.x[2]), 1e-5));
    };
    c.tolerance = {{1e-6, 1e-5}};
    table.push_back(std::move(c));
  }

  {  // linear: bit 0 bias, bit 1 accumulate into a non-zero out from an (N, 1, I) view, bit 2 views
     // that start one element into their buffers (4-byte alignment only for float, 2 for bf16).
     // O 1, 33, 129 and 65,537 have rows of no whole 16-byte units: the device computes them in
     // padded row blocks (linear_padded); (400, 8, 65537) takes several blocks (128 rows in float,
     // 384 in bf16), as the tied head at V 50,257 does.
    OpCase c;
    c.name = "linear";
    const std::pair<index_t, index_t> io[] = {{1, 1}, {16, 33}, {67, 129}, {256, 768}};
    for (index_t N : seq)
      for (auto [I, O] : io)
        for (int variant = 0; variant < 8; ++variant) {
          Params p;
          p.N = N, p.I = I, p.O = O, p.variant = variant;
          c.sizes.push_back(p);
        }
    for (int variant = 0; variant < 8; ++variant) {
      Params p;
      p.N = 400, p.I = 8, p.O = 65537, p.variant = variant;
      c.sizes.push_back(p);
    }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      in.x.push_back(random_tensor(Shape{p.N, p.I}, rng));
      in.x.push_back(random_tensor(Shape{p.O, p.I}, rng));
      in.x.push_back(random_tensor(Shape{p.O}, rng));
      in.x.push_back(random_tensor(Shape{p.N, p.O}, rng));  // start value when accumulating
      return in;
    };
    c.run = on_every_backend([](auto loc, auto elem, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using E = decltype(elem);
      using CV = TensorView<const E, L>;
      const bool bias = p.variant & 1, acc = p.variant & 2, shifted = p.variant & 4;
      HostD start = acc ? reshaped(in.x[3], Shape{p.N, p.O}) : HostD(Shape{p.N, p.O});
      if (!acc) fill<double>(start.view(), std::numeric_limits<double>::quiet_NaN());
      auto x = offset_copy<L, E>(in.x[0]);
      auto w = offset_copy<L, E>(in.x[1]);
      auto b = offset_copy<L, E>(in.x[2]);
      auto out = offset_copy<L, E>(start);
      Tensor<E, L> xa = to<L, E>(in.x[0]), wa = to<L, E>(in.x[1]), ba = to<L, E>(in.x[2]), outa = to<L, E>(start);
      const CV xv = shifted ? CV(x.view) : cview(xa), wv = shifted ? CV(w.view) : cview(wa),
               bv = shifted ? CV(b.view) : cview(ba);
      const TensorView<E, L> ov = shifted ? out.view : outa.view();
      const CV xin = acc ? xv.reshape(Shape{p.N, 1, p.I}) : xv;
      ops::linear(ov, xin, wv, bias ? bv : CV{}, acc ? Accumulate::Yes : Accumulate::No);
      return outputs(back<L, E>(CV(ov)));
    });
    c.reference = [](const Params& p, const Inputs& in) {
      const bool bias = p.variant & 1, acc = p.variant & 2;
      return outputs(reference::linear(in.x[0], in.x[1], bias ? cview(in.x[2]) : reference::View{},
                                       acc ? cview(in.x[3]) : reference::View{}));
    };
    c.tolerance = {{1e-6, 1e-4}};
    table.push_back(std::move(c));
  }

  {  // linear_gelu (the fused MLP input layer): bit 0 bias, bit 1 erf form; O 4096 is the paper's
     // MLP width (16-bit buffers take cuBLASLt's GELU epilogue there), 33 and 65537 take linear + gelu
    OpCase c;
    c.name = "linear_gelu";
    const std::pair<index_t, index_t> io[] = {{1, 1}, {16, 33}, {64, 4096}, {8, 65537}};
    for (index_t N : {1, 67, 256})
      for (auto [I, O] : io)
        for (int variant = 0; variant < 4; ++variant) {
          Params p;
          p.N = N, p.I = I, p.O = O, p.variant = variant;
          c.sizes.push_back(p);
        }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      in.x.push_back(random_tensor(Shape{p.N, p.I}, rng, -2, 2));  // pre-activations across GELU's bend
      in.x.push_back(random_tensor(Shape{p.O, p.I}, rng));
      in.x.push_back(random_tensor(Shape{p.O}, rng));
      return in;
    };
    auto kind = [](const Params& p) { return p.variant & 2 ? Activation::GeluErf : Activation::GeluTanh; };
    c.run = on_every_backend([kind](auto loc, auto elem, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using E = decltype(elem);
      auto x = to<L, E>(in.x[0]);
      auto w = to<L, E>(in.x[1]);
      auto b = to<L, E>(in.x[2]);
      auto out = poisoned<L, E>(Shape{p.N, p.O});
      ops::linear_gelu(out.view(), cview(x), cview(w), p.variant & 1 ? cview(b) : TensorView<const E, L>{}, kind(p));
      return outputs(back(out));
    });
    c.reference = [kind](const Params& p, const Inputs& in) {
      const HostD pre = reference::linear(in.x[0], in.x[1], p.variant & 1 ? cview(in.x[2]) : reference::View{});
      return outputs(reference::gelu(cview(pre), kind(p)));
    };
    c.tolerance = {{1e-6, 1e-4}};
    table.push_back(std::move(c));
  }

  {  // gelu: bit 0 erf form, bit 1 out of place
    OpCase c;
    c.name = "gelu";
    for (index_t N : {1, 7, 257, 9000, 100003})
      for (int variant = 0; variant < 4; ++variant) {
        Params p;
        p.N = N, p.variant = variant;
        c.sizes.push_back(p);
      }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      in.x.push_back(random_tensor(Shape{p.N}, rng, -6, 6));
      return in;
    };
    auto kind = [](const Params& p) { return p.variant & 1 ? Activation::GeluErf : Activation::GeluTanh; };
    c.run = on_every_backend([kind](auto loc, auto elem, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using E = decltype(elem);
      auto x = to<L, E>(in.x[0]);
      if (p.variant & 2) {
        auto out = poisoned<L, E>(Shape{p.N});
        ops::gelu(out.view(), cview(x), kind(p));
        return outputs(back(out));
      }
      ops::gelu(x.view(), kind(p));
      return outputs(back(x));
    });
    c.reference = [kind](const Params& p, const Inputs& in) { return outputs(reference::gelu(in.x[0], kind(p))); };
    c.tolerance = {{1e-6, 1e-5}};
    table.push_back(std::move(c));
  }

  {  // add (bit 0 clear) and add_difference (set); bit 1 gives the inputs as (N, 4, C/4)
    OpCase c;
    c.name = "add / add_difference";
    for (index_t N : seq)
      for (index_t C : {1, 16, 67, 1024})
        for (int variant = 0; variant < 4; ++variant) {
          if ((variant & 2) && C % 4 != 0) continue;
          Params p;
          p.N = N, p.C = C, p.variant = variant;
          c.sizes.push_back(p);
        }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      for (int i = 0; i < 3; ++i) in.x.push_back(random_tensor(Shape{p.N, p.C}, rng));
      return in;
    };
    c.run = on_every_backend([](auto loc, auto elem, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using E = decltype(elem);
      auto out = to<L, E>(in.x[0]);
      auto a = to<L, E>(in.x[1]);
      auto b = to<L, E>(in.x[2]);
      const Shape s = (p.variant & 2) ? Shape{p.N, 4, p.C / 4} : Shape{p.N, p.C};
      if (p.variant & 1) {
        ops::add_difference(out.view(), cview(a).reshape(s), cview(b).reshape(s));
      } else {
        ops::add(out.view(), cview(a).reshape(s));
      }
      return outputs(back(out));
    });
    c.reference = [](const Params& p, const Inputs& in) {
      return outputs((p.variant & 1) ? reference::add_difference(in.x[0], in.x[1], in.x[2])
                                     : reference::add(in.x[0], in.x[1]));
    };
    c.tolerance = {{0, 1e-6}};
    table.push_back(std::move(c));
  }

  auto attention_inputs = [](const Params& p, std::mt19937_64& rng) {
    Inputs in;
    in.x.push_back(random_tensor(Shape{p.T, p.H, p.dh}, rng, -3, 3));  // q: scores of a few units
    in.x.push_back(random_tensor(Shape{p.T, p.H, p.dh}, rng));
    in.x.push_back(random_tensor(Shape{p.T, p.H, p.dh}, rng));
    in.x.push_back(random_tensor(Shape{p.T, p.H, p.K, p.dh}, rng));
    in.x.push_back(random_tensor(Shape{p.T, p.H, p.K, p.dh}, rng));
    in.x.push_back(gate_logits(p, rng));
    return in;
  };

  // Stacked sequences for the memory-attention segment cases (layout index in Params::C): runs of
  // one length (the device batches them), uneven lengths, an empty sequence, more than one
  // tensor-core launch's 64 sequences.
  static const std::vector<std::vector<index_t>> memory_layouts = {
      {7}, {64, 64, 64}, {129, 1, 300}, {5, 0, 5}, std::vector<index_t>(70, 3), {100, 100, 17, 100}};
  auto memory_offsets = [](const Params& p) {
    std::vector<index_t> o{0};
    for (index_t n : memory_layouts[static_cast<std::size_t>(p.C)]) o.push_back(o.back() + n);
    return o;
  };
  auto memory_segment_sizes = [](bool backward) {
    std::vector<Params> sizes;
    int n = 0;
    for (int layout = 0; layout < static_cast<int>(memory_layouts.size()); ++layout)
      for (auto hs : {HeadShape{4, 16}, HeadShape{12, 64}, HeadShape{3, 100}})
        for (index_t K : {0, 5, 64})
          for (int fusion : {0, 1}) {
            Params p;
            p.H = hs.H, p.dh = hs.dh, p.K = K, p.fusion = fusion, p.C = layout, p.variant = n++;
            p.pos = p.variant % 2 ? PositionScheme::Alibi : PositionScheme::Learned;
            p.T = 0;
            for (index_t len : memory_layouts[static_cast<std::size_t>(layout)]) p.T += len;
            if (backward && hs.dh == 100 && K == 5) continue;  // run time: the FMA fallback is one call per sequence
            sizes.push_back(p);
          }
    return sizes;
  };

  {  // causal_attention; odd variants write a (T, H*dh) output
    OpCase c;
    c.name = "causal_attention";
    int n = 0;
    for (index_t T : seq)
      for (auto hs : head_shapes)
        for (auto pos : {PositionScheme::Learned, PositionScheme::Alibi}) {
          Params p;
          p.T = T, p.H = hs.H, p.dh = hs.dh, p.pos = pos, p.variant = n++;
          c.sizes.push_back(p);
        }
    c.make = attention_inputs;
    c.run = on_every_backend([](auto loc, auto elem, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using E = decltype(elem);
      auto q = to<L, E>(in.x[0]);
      auto k = to<L, E>(in.x[1]);
      auto v = to<L, E>(in.x[2]);
      auto out = poisoned<L, E>(p.variant % 2 ? Shape{p.T, p.H * p.dh} : Shape{p.T, p.H, p.dh});
      ops::causal_attention(out.view(), cview(q), cview(k), cview(v), p.pos);
      return outputs(reshaped(back(out), Shape{p.T, p.H, p.dh}));
    });
    c.reference = [](const Params& p, const Inputs& in) {
      return outputs(reference::causal_attention(in.x[0], in.x[1], in.x[2], p.pos));
    };
    c.tolerance = {{1e-6, 1e-4}};
    table.push_back(std::move(c));
  }

  {  // causal_attention over stacked sequences (offsets): uneven lengths, an empty one, and more
     // sequences (70) than one tensor-core launch takes (64)
    OpCase c;
    c.name = "causal_attention segments";
    static const std::vector<std::vector<index_t>> layouts = {
        {7}, {64, 64}, {129, 1, 300}, {5, 0, 5}, std::vector<index_t>(70, 3), {300, 17, 64}};
    for (int layout = 0; layout < static_cast<int>(layouts.size()); ++layout)
      for (auto hs : {HeadShape{4, 16}, HeadShape{12, 64}, HeadShape{2, 1}, HeadShape{3, 100}})
        for (auto pos : {PositionScheme::Learned, PositionScheme::Alibi}) {
          Params p;
          p.H = hs.H, p.dh = hs.dh, p.pos = pos, p.variant = layout;
          p.T = 0;
          for (index_t n : layouts[static_cast<std::size_t>(layout)]) p.T += n;
          c.sizes.push_back(p);
        }
    auto offsets_of = [](const Params& p) {
      std::vector<index_t> o{0};
      for (index_t n : layouts[static_cast<std::size_t>(p.variant)]) o.push_back(o.back() + n);
      return o;
    };
    c.make = attention_inputs;
    c.run = on_every_backend([offsets_of](auto loc, auto elem, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using E = decltype(elem);
      auto q = to<L, E>(in.x[0]);
      auto k = to<L, E>(in.x[1]);
      auto v = to<L, E>(in.x[2]);
      auto out = poisoned<L, E>(Shape{p.T, p.H, p.dh});
      const std::vector<index_t> offsets = offsets_of(p);
      ops::causal_attention(out.view(), cview(q), cview(k), cview(v), p.pos, std::span<const index_t>(offsets));
      return outputs(back(out));
    });
    c.reference = [offsets_of](const Params& p, const Inputs& in) {
      const std::vector<index_t> o = offsets_of(p);
      HostD out(Shape{p.T, p.H, p.dh});
      for (std::size_t b = 0; b + 1 < o.size(); ++b) {
        if (o[b] == o[b + 1]) continue;
        const HostD part = reference::causal_attention(cview(in.x[0]).slice(o[b], o[b + 1]), cview(in.x[1]).slice(o[b], o[b + 1]),
                                                       cview(in.x[2]).slice(o[b], o[b + 1]), p.pos);
        copy<double>(cview(part), out.view().slice(o[b], o[b + 1]));
      }
      return outputs(std::move(out));
    };
    c.tolerance = {{1e-6, 1e-4}};
    table.push_back(std::move(c));
  }

  {  // memory_attention, both fusions, K in {0, 4, 5, 64}, gates moderate and saturated
    OpCase c;
    c.name = "memory_attention";
    int n = 0;
    for (index_t T : seq)
      for (auto hs : head_shapes)
        for (index_t K : {0, 4, 5, 64})
          for (auto pos : {PositionScheme::Learned, PositionScheme::Alibi})
            for (int fusion : {0, 1}) {
              Params p;
              p.T = T, p.H = hs.H, p.dh = hs.dh, p.K = K, p.pos = pos, p.fusion = fusion, p.variant = n++;
              // T > 64 keeps one (position, fusion) pair of four per (H, dh, K), in rotation: run time.
              if (T > 64 && (p.variant / 4) % 4 != p.variant % 4) continue;
              c.sizes.push_back(p);
            }
    c.make = attention_inputs;
    c.run = on_every_backend([](auto loc, auto elem, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using E = decltype(elem);
      auto q = to<L, E>(in.x[0]);
      auto k = to<L, E>(in.x[1]);
      auto v = to<L, E>(in.x[2]);
      auto mk = to<L, E>(in.x[3]);
      auto mv = to<L, E>(in.x[4]);
      auto g = to<L, E>(in.x[5]);
      // K = 0 memory is given as a (T, H, 0, dh) view over no data, as the bank hands it over
      const TensorView<const E, L> mkv(mk.data(), Shape{p.T, p.H, p.K, p.dh}), mvv(mv.data(), Shape{p.T, p.H, p.K, p.dh});
      auto out = poisoned<L, E>(Shape{p.T, p.H, p.dh});
      if (p.fusion == 0) {
        ops::memory_attention<GatedFusion>(out.view(), cview(q), cview(k), cview(v), mkv, mvv, cview(g), p.pos);
      } else {
        ops::memory_attention<JointFusion>(out.view(), cview(q), cview(k), cview(v), mkv, mvv, cview(g), p.pos);
      }
      return outputs(back(out));
    });
    c.reference = [](const Params& p, const Inputs& in) {
      const auto& x = in.x;
      return outputs(p.fusion == 0 ? reference::memory_attention_gated(x[0], x[1], x[2], x[3], x[4], x[5], p.pos)
                                   : reference::memory_attention_joint(x[0], x[1], x[2], x[3], x[4], p.pos));
    };
    c.tolerance = {{1e-6, 1e-4}};
    table.push_back(std::move(c));
  }

  {  // memory_attention over stacked sequences (offsets), every row with its own memory (N, H, K, dh)
    OpCase c;
    c.name = "memory_attention segments";
    c.sizes = memory_segment_sizes(false);
    c.make = attention_inputs;
    c.run = on_every_backend([memory_offsets](auto loc, auto elem, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using E = decltype(elem);
      auto q = to<L, E>(in.x[0]);
      auto k = to<L, E>(in.x[1]);
      auto v = to<L, E>(in.x[2]);
      auto mk = to<L, E>(in.x[3]);
      auto mv = to<L, E>(in.x[4]);
      auto g = to<L, E>(in.x[5]);
      const TensorView<const E, L> mkv(mk.data(), Shape{p.T, p.H, p.K, p.dh}), mvv(mv.data(), Shape{p.T, p.H, p.K, p.dh});
      auto out = poisoned<L, E>(Shape{p.T, p.H, p.dh});
      const std::vector<index_t> offsets = memory_offsets(p);
      const std::span<const index_t> o(offsets);
      if (p.fusion == 0) {
        ops::memory_attention<GatedFusion>(out.view(), cview(q), cview(k), cview(v), mkv, mvv, cview(g), p.pos, o);
      } else {
        ops::memory_attention<JointFusion>(out.view(), cview(q), cview(k), cview(v), mkv, mvv, cview(g), p.pos, o);
      }
      return outputs(back(out));
    });
    c.reference = [memory_offsets](const Params& p, const Inputs& in) {
      const std::vector<index_t> o = memory_offsets(p);
      HostD out(Shape{p.T, p.H, p.dh});
      for (std::size_t b = 0; b + 1 < o.size(); ++b) {
        if (o[b] == o[b + 1]) continue;
        auto rows = [&](int i) { return cview(in.x[static_cast<std::size_t>(i)]).slice(o[b], o[b + 1]); };
        const HostD part = p.fusion == 0
                               ? reference::memory_attention_gated(rows(0), rows(1), rows(2), rows(3), rows(4), cview(in.x[5]), p.pos)
                               : reference::memory_attention_joint(rows(0), rows(1), rows(2), rows(3), rows(4), p.pos);
        copy<double>(cview(part), out.view().slice(o[b], o[b + 1]));
      }
      return outputs(std::move(out));
    };
    c.tolerance = {{1e-6, 1e-4}};
    table.push_back(std::move(c));
  }

  {  // cross_entropy: outputs {sum}, {count}, per-token losses; bit 0 ignores every third target,
     // bit 1 passes no losses view
    OpCase c;
    c.name = "cross_entropy";
    for (index_t T : seq)
      for (index_t V : {1, 5, 1000, 50257})
        for (int variant = 0; variant < 4; ++variant) {
          Params p;
          p.T = T, p.V = V, p.variant = variant;
          c.sizes.push_back(p);
        }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      in.x.push_back(random_tensor(Shape{p.T, p.V}, rng, -8, 8));
      std::uniform_int_distribution<std::int32_t> tok(0, static_cast<std::int32_t>(p.V - 1));
      for (index_t t = 0; t < p.T; ++t) in.ids.push_back((p.variant & 1) && t % 3 == 1 ? -1 : tok(rng));
      return in;
    };
    c.run = on_every_backend([](auto loc, auto elem, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using E = decltype(elem);
      auto logits = to<L, E>(in.x[0]);
      const bool with_losses = !(p.variant & 2);
      auto losses = with_losses ? poisoned<L, float>(Shape{p.T}) : Tensor<float, L>{};
      auto [sum, count] = ops::cross_entropy<E, L>(cview(logits), in.ids, losses.view());
      return outputs(scalar(sum), scalar(double(count)), with_losses ? back(losses) : HostD());
    });
    c.reference = [](const Params& p, const Inputs& in) {
      auto r = reference::cross_entropy(in.x[0], in.ids);
      HostD losses;
      if (!(p.variant & 2)) {
        losses.resize(Shape{p.T});
        std::copy(r.losses.begin(), r.losses.end(), losses.begin());
      }
      return outputs(scalar(r.sum), scalar(double(r.count)), std::move(losses));
    };
    c.tolerance = {{1e-6 * 300, 1e-6}, {0, 0}, {1e-6, 1e-6}};
    table.push_back(std::move(c));
  }

  // ---------------------------------------------------------------- backward ops
  // Parameter gradients start from random values (they accumulate); activation gradients are
  // poisoned unless the variant accumulates into them.

  {  // embedding_backward: bit 0 with d_wpe, bit 1 without d_wte (positions only)
    OpCase c;
    c.name = "backward: embedding";
    for (index_t T : seq)
      for (index_t d : {1, 16, 65, 768})
        for (int variant : {0, 1, 3}) {
          Params p;
          p.T = T, p.C = d, p.V = d == 768 ? 1000 : 50, p.variant = variant;
          c.sizes.push_back(p);
        }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      in.x.push_back(random_tensor(Shape{p.T, p.C}, rng));       // d_out
      in.x.push_back(random_tensor(Shape{p.V, p.C}, rng));       // d_wte start
      in.x.push_back(random_tensor(Shape{p.T + 3, p.C}, rng));   // d_wpe start
      std::uniform_int_distribution<std::int32_t> tok(0, static_cast<std::int32_t>(p.V - 1));
      for (index_t t = 0; t < p.T; ++t) in.ids.push_back(tok(rng));  // V 50: many repeats
      return in;
    };
    backward_case(c, [](auto loc, auto value, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using T = decltype(value);
      auto g = tensor_at<T, L>(in.x[0]);
      auto wte = tensor_at<T, L>(in.x[1]);
      auto wpe = tensor_at<T, L>(in.x[2]);
      const bool table = !(p.variant & 2), positions = p.variant & 1;
      ops::embedding_backward(table ? wte.view() : TensorView<T, L>{}, positions ? wpe.view() : TensorView<T, L>{},
                              cview(g), std::span<const std::int32_t>(in.ids));
      return outputs(read_back(wte), read_back(wpe));
    });
    c.tolerance = {{1e-6, 1e-6}, {1e-6, 1e-6}};
    table.push_back(std::move(c));
  }

  {  // layer_norm_backward: bit 0 accumulates into d_in, bit 1 no d_in (parameters only)
    OpCase c;
    c.name = "backward: layer_norm";
    for (index_t N : seq)
      for (index_t C : {1, 16, 67, 768, 3072})
        for (int variant : {0, 1, 2}) {
          Params p;
          p.N = N, p.C = C, p.variant = variant;
          c.sizes.push_back(p);
        }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      in.x.push_back(random_tensor(Shape{p.N, p.C}, rng, -2, 2));     // in
      in.x.push_back(random_tensor(Shape{p.C}, rng, 0.5, 1.5));       // weight
      in.x.push_back(random_tensor(Shape{p.N, p.C}, rng));            // d_out
      in.x.push_back(random_tensor(Shape{p.N, p.C}, rng));            // d_in start
      in.x.push_back(random_tensor(Shape{p.C}, rng));                 // d_weight start
      in.x.push_back(random_tensor(Shape{p.C}, rng));                 // d_bias start
      return in;
    };
    backward_case(c, [](auto loc, auto value, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using T = decltype(value);
      auto x = tensor_at<T, L>(in.x[0]);
      auto w = tensor_at<T, L>(in.x[1]);
      auto g = tensor_at<T, L>(in.x[2]);
      const bool acc = p.variant == 1, want_in = p.variant != 2;
      auto d_in = acc ? tensor_at<T, L>(in.x[3]) : poisoned_at<T, L>(Shape{p.N, p.C});
      auto d_w = tensor_at<T, L>(in.x[4]);
      auto d_b = tensor_at<T, L>(in.x[5]);
      ops::layer_norm_backward(want_in ? d_in.view() : TensorView<T, L>{}, d_w.view(), d_b.view(), cview(g), cview(x),
                               cview(w), 1e-5, acc ? Accumulate::Yes : Accumulate::No);
      return outputs(want_in ? read_back(d_in) : HostD(), read_back(d_w), read_back(d_b));
    });
    c.tolerance = {{1e-6, 1e-5}, {1e-6, 1e-5}, {1e-6, 1e-5}};
    table.push_back(std::move(c));
  }

  {  // linear_backward: bit 0 accumulates into d_in, bit 1 no d_in, bit 2 no d_bias
    OpCase c;
    c.name = "backward: linear";
    const std::pair<index_t, index_t> io[] = {{1, 1}, {16, 33}, {67, 129}, {256, 768}};
    for (index_t N : seq)
      for (auto [I, O] : io)
        for (int variant = 0; variant < 6; ++variant) {
          Params p;
          p.N = N, p.I = I, p.O = O, p.variant = variant;
          c.sizes.push_back(p);
        }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      in.x.push_back(random_tensor(Shape{p.N, p.I}, rng));  // in
      in.x.push_back(random_tensor(Shape{p.O, p.I}, rng));  // weight
      in.x.push_back(random_tensor(Shape{p.N, p.O}, rng));  // d_out
      in.x.push_back(random_tensor(Shape{p.N, p.I}, rng));  // d_in start
      in.x.push_back(random_tensor(Shape{p.O, p.I}, rng));  // d_weight start
      in.x.push_back(random_tensor(Shape{p.O}, rng));       // d_bias start
      return in;
    };
    backward_case(c, [](auto loc, auto value, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using T = decltype(value);
      auto x = tensor_at<T, L>(in.x[0]);
      auto w = tensor_at<T, L>(in.x[1]);
      auto g = tensor_at<T, L>(in.x[2]);
      const bool acc = p.variant & 1, want_in = !(p.variant & 2), want_b = !(p.variant & 4);
      auto d_in = acc ? tensor_at<T, L>(in.x[3]) : poisoned_at<T, L>(Shape{p.N, p.I});
      auto d_w = tensor_at<T, L>(in.x[4]);
      auto d_b = tensor_at<T, L>(in.x[5]);
      ops::linear_backward(want_in ? d_in.view() : TensorView<T, L>{}, d_w.view(), want_b ? d_b.view() : TensorView<T, L>{},
                           cview(g), cview(x), cview(w), acc ? Accumulate::Yes : Accumulate::No);
      return outputs(want_in ? read_back(d_in) : HostD(), read_back(d_w), read_back(d_b));
    });
    c.tolerance = {{1e-6, 1e-4}, {1e-6, 1e-4}, {1e-6, 1e-5}};
    table.push_back(std::move(c));
  }

  {  // gelu_backward: bit 0 erf form, bit 1 in place (d_in is d_out)
    OpCase c;
    c.name = "backward: gelu";
    for (index_t N : {1, 7, 257, 9000, 100003})
      for (int variant = 0; variant < 4; ++variant) {
        Params p;
        p.N = N, p.variant = variant;
        c.sizes.push_back(p);
      }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      in.x.push_back(random_tensor(Shape{p.N}, rng, -6, 6));
      in.x.push_back(random_tensor(Shape{p.N}, rng));
      return in;
    };
    backward_case(c, [](auto loc, auto value, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using T = decltype(value);
      const Activation kind = p.variant & 1 ? Activation::GeluErf : Activation::GeluTanh;
      auto x = tensor_at<T, L>(in.x[0]);
      auto g = tensor_at<T, L>(in.x[1]);
      if (p.variant & 2) {
        ops::gelu_backward(g.view(), cview(g), cview(x), kind);
        return outputs(read_back(g));
      }
      auto d_in = poisoned_at<T, L>(Shape{p.N});
      ops::gelu_backward(d_in.view(), cview(g), cview(x), kind);
      return outputs(read_back(d_in));
    });
    c.tolerance = {{1e-6, 1e-5}};
    table.push_back(std::move(c));
  }

  {  // causal_attention_backward; odd variants pass (T, H*dh) gradient views
    OpCase c;
    c.name = "backward: causal_attention";
    int n = 0;
    for (index_t T : seq)
      for (auto hs : head_shapes)
        for (auto pos : {PositionScheme::Learned, PositionScheme::Alibi}) {
          Params p;
          p.T = T, p.H = hs.H, p.dh = hs.dh, p.pos = pos, p.variant = n++;
          c.sizes.push_back(p);
        }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      in.x.push_back(random_tensor(Shape{p.T, p.H, p.dh}, rng, -3, 3));  // q
      in.x.push_back(random_tensor(Shape{p.T, p.H, p.dh}, rng));         // k
      in.x.push_back(random_tensor(Shape{p.T, p.H, p.dh}, rng));         // v
      in.x.push_back(random_tensor(Shape{p.T, p.H, p.dh}, rng));         // d_out
      return in;
    };
    backward_case(c, [](auto loc, auto value, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using T = decltype(value);
      auto q = tensor_at<T, L>(in.x[0]);
      auto k = tensor_at<T, L>(in.x[1]);
      auto v = tensor_at<T, L>(in.x[2]);
      auto g = tensor_at<T, L>(in.x[3]);
      const Shape s = p.variant % 2 ? Shape{p.T, p.H * p.dh} : Shape{p.T, p.H, p.dh};
      auto dq = poisoned_at<T, L>(s), dk = poisoned_at<T, L>(s), dv = poisoned_at<T, L>(s);
      ops::causal_attention_backward(dq.view(), dk.view(), dv.view(), cview(g), cview(q), cview(k), cview(v), p.pos);
      const Shape heads{p.T, p.H, p.dh};
      return outputs(reshaped(read_back(dq), heads), reshaped(read_back(dk), heads), reshaped(read_back(dv), heads));
    });
    c.tolerance = {{1e-6, 1e-4}, {1e-6, 1e-4}, {1e-6, 1e-4}};
    table.push_back(std::move(c));
  }

  {  // causal_attention_backward over stacked sequences (offsets): runs of one length batched
     // together (70 of 3 rows; three of 64), uneven lengths, an empty one, and a run of 10 x 512
     // rows at 16 heads that the device splits (its scratch budget takes 8 such sequences)
    OpCase c;
    c.name = "backward: causal_attention segments";
    static const std::vector<std::vector<index_t>> layouts = {
        {7}, {64, 64, 64}, {129, 1, 300}, {5, 0, 5}, std::vector<index_t>(70, 3), {300, 300, 17, 300},
        std::vector<index_t>(10, 512)};
    for (int layout = 0; layout < static_cast<int>(layouts.size()); ++layout) {
      const bool long_run = layout + 1 == static_cast<int>(layouts.size());
      for (auto hs : long_run ? std::vector<HeadShape>{{16, 16}}
                              : std::vector<HeadShape>{{4, 16}, {12, 64}, {2, 1}, {3, 100}})
        for (auto pos : {PositionScheme::Learned, PositionScheme::Alibi}) {
          Params p;
          p.H = hs.H, p.dh = hs.dh, p.pos = pos, p.variant = layout;
          p.T = 0;
          for (index_t n : layouts[static_cast<std::size_t>(layout)]) p.T += n;
          c.sizes.push_back(p);
        }
    }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      in.x.push_back(random_tensor(Shape{p.T, p.H, p.dh}, rng, -3, 3));  // q
      in.x.push_back(random_tensor(Shape{p.T, p.H, p.dh}, rng));         // k
      in.x.push_back(random_tensor(Shape{p.T, p.H, p.dh}, rng));         // v
      in.x.push_back(random_tensor(Shape{p.T, p.H, p.dh}, rng));         // d_out
      return in;
    };
    // the reference: the host backend in double, one sequence at a time
    backward_case(c, [](auto loc, auto value, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using T = decltype(value);
      std::vector<index_t> offsets{0};
      for (index_t n : layouts[static_cast<std::size_t>(p.variant)]) offsets.push_back(offsets.back() + n);
      auto q = tensor_at<T, L>(in.x[0]);
      auto k = tensor_at<T, L>(in.x[1]);
      auto v = tensor_at<T, L>(in.x[2]);
      auto g = tensor_at<T, L>(in.x[3]);
      const Shape s{p.T, p.H, p.dh};
      auto dq = poisoned_at<T, L>(s), dk = poisoned_at<T, L>(s), dv = poisoned_at<T, L>(s);
      if (std::is_same_v<T, double>) {
        for (std::size_t b = 0; b + 1 < offsets.size(); ++b) {
          const index_t o0 = offsets[b], o1 = offsets[b + 1];
          if (o0 == o1) continue;
          ops::causal_attention_backward(dq.view().slice(o0, o1), dk.view().slice(o0, o1), dv.view().slice(o0, o1),
                                         cview(g).slice(o0, o1), cview(q).slice(o0, o1), cview(k).slice(o0, o1),
                                         cview(v).slice(o0, o1), p.pos);
        }
      } else {
        ops::causal_attention_backward(dq.view(), dk.view(), dv.view(), cview(g), cview(q), cview(k), cview(v), p.pos,
                                       std::span<const index_t>(offsets));
      }
      return outputs(read_back(dq), read_back(dk), read_back(dv));
    });
    c.tolerance = {{1e-6, 1e-4}, {1e-6, 1e-4}, {1e-6, 1e-4}};
    table.push_back(std::move(c));
  }

  {  // memory_attention_backward, both fusions, K in {0, 5, 64}, gates moderate and saturated;
     // d_gate starts from random values (it accumulates); odd variants pass no d_gate
    OpCase c;
    c.name = "backward: memory_attention";
    int n = 0;
    for (index_t T : seq)
      for (auto hs : head_shapes)
        for (index_t K : {0, 5, 64})
          for (auto pos : {PositionScheme::Learned, PositionScheme::Alibi})
            for (int fusion : {0, 1}) {
              Params p;
              p.T = T, p.H = hs.H, p.dh = hs.dh, p.K = K, p.pos = pos, p.fusion = fusion, p.variant = n++;
              // T > 64 keeps one (position, fusion) pair of four per (H, dh, K), in rotation: run time.
              if (T > 64 && (p.variant / 4) % 4 != p.variant % 4) continue;
              c.sizes.push_back(p);
            }
    c.make = [attention_inputs](const Params& p, std::mt19937_64& rng) {
      Inputs in = attention_inputs(p, rng);                               // q, k, v, mem_k, mem_v, gate
      in.x.push_back(random_tensor(Shape{p.T, p.H, p.dh}, rng));         // d_out
      in.x.push_back(random_tensor(Shape{p.H}, rng));                    // d_gate start
      return in;
    };
    backward_case(c, [](auto loc, auto value, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using T = decltype(value);
      auto q = tensor_at<T, L>(in.x[0]);
      auto k = tensor_at<T, L>(in.x[1]);
      auto v = tensor_at<T, L>(in.x[2]);
      auto mk = tensor_at<T, L>(in.x[3]);
      auto mv = tensor_at<T, L>(in.x[4]);
      auto gate = tensor_at<T, L>(in.x[5]);
      auto g = tensor_at<T, L>(in.x[6]);
      const bool with_gate = p.variant % 2 == 0;
      auto d_gate = with_gate ? tensor_at<T, L>(in.x[7]) : Tensor<T, L>{};
      // K = 0 memory is given as a (T, H, 0, dh) view over no data, as the bank hands it over
      const TensorView<const T, L> mkv(mk.data(), Shape{p.T, p.H, p.K, p.dh}), mvv(mv.data(), Shape{p.T, p.H, p.K, p.dh});
      const Shape s{p.T, p.H, p.dh};
      auto dq = poisoned_at<T, L>(s), dk = poisoned_at<T, L>(s), dv = poisoned_at<T, L>(s);
      const TensorView<T, L> dg = with_gate ? d_gate.view() : TensorView<T, L>{};
      if (p.fusion == 0) {
        ops::memory_attention_backward<GatedFusion>(dq.view(), dk.view(), dv.view(), dg, cview(g), cview(q), cview(k),
                                                    cview(v), mkv, mvv, cview(gate), p.pos);
      } else {
        ops::memory_attention_backward<JointFusion>(dq.view(), dk.view(), dv.view(), dg, cview(g), cview(q), cview(k),
                                                    cview(v), mkv, mvv, cview(gate), p.pos);
      }
      return outputs(read_back(dq), read_back(dk), read_back(dv), with_gate ? read_back(d_gate) : HostD());
    });
    c.tolerance = {{1e-6, 1e-4}, {1e-6, 1e-4}, {1e-6, 1e-4}, {1e-6, 1e-4}};
    table.push_back(std::move(c));
  }

  {  // memory_attention_backward over stacked sequences (offsets); the reference is the host backend
     // in double, which takes one sequence at a time; d_gate sums over every sequence
    OpCase c;
    c.name = "backward: memory_attention segments";
    c.sizes = memory_segment_sizes(true);
    c.make = [attention_inputs](const Params& p, std::mt19937_64& rng) {
      Inputs in = attention_inputs(p, rng);                               // q, k, v, mem_k, mem_v, gate
      in.x.push_back(random_tensor(Shape{p.T, p.H, p.dh}, rng));         // d_out
      in.x.push_back(random_tensor(Shape{p.H}, rng));                    // d_gate start
      return in;
    };
    backward_case(c, [memory_offsets](auto loc, auto value, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using T = decltype(value);
      auto q = tensor_at<T, L>(in.x[0]);
      auto k = tensor_at<T, L>(in.x[1]);
      auto v = tensor_at<T, L>(in.x[2]);
      auto mk = tensor_at<T, L>(in.x[3]);
      auto mv = tensor_at<T, L>(in.x[4]);
      auto gate = tensor_at<T, L>(in.x[5]);
      auto g = tensor_at<T, L>(in.x[6]);
      auto d_gate = tensor_at<T, L>(in.x[7]);
      const TensorView<const T, L> mkv(mk.data(), Shape{p.T, p.H, p.K, p.dh}), mvv(mv.data(), Shape{p.T, p.H, p.K, p.dh});
      const Shape s{p.T, p.H, p.dh};
      auto dq = poisoned_at<T, L>(s), dk = poisoned_at<T, L>(s), dv = poisoned_at<T, L>(s);
      const std::vector<index_t> offsets = memory_offsets(p);
      const std::span<const index_t> o(offsets);
      if (p.fusion == 0) {
        ops::memory_attention_backward<GatedFusion>(dq.view(), dk.view(), dv.view(), d_gate.view(), cview(g), cview(q),
                                                    cview(k), cview(v), mkv, mvv, cview(gate), p.pos, o);
      } else {
        ops::memory_attention_backward<JointFusion>(dq.view(), dk.view(), dv.view(), d_gate.view(), cview(g), cview(q),
                                                    cview(k), cview(v), mkv, mvv, cview(gate), p.pos, o);
      }
      return outputs(read_back(dq), read_back(dk), read_back(dv), read_back(d_gate));
    });
    c.tolerance = {{1e-6, 1e-4}, {1e-6, 1e-4}, {1e-6, 1e-4}, {1e-6, 1e-4}};
    table.push_back(std::move(c));
  }

  {  // cross_entropy_backward: bit 0 ignores every third target, bit 1 in place
    OpCase c;
    c.name = "backward: cross_entropy";
    for (index_t T : seq)
      for (index_t V : {1, 5, 1000, 50257})
        for (int variant = 0; variant < 4; ++variant) {
          Params p;
          p.T = T, p.V = V, p.variant = variant;
          c.sizes.push_back(p);
        }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      in.x.push_back(random_tensor(Shape{p.T, p.V}, rng, -8, 8));
      std::uniform_int_distribution<std::int32_t> tok(0, static_cast<std::int32_t>(p.V - 1));
      for (index_t t = 0; t < p.T; ++t) in.ids.push_back((p.variant & 1) && t % 3 == 1 ? -1 : tok(rng));
      return in;
    };
    backward_case(c, [](auto loc, auto value, const Params& p, const Inputs& in) {
      using L = decltype(loc);
      using T = decltype(value);
      auto logits = tensor_at<T, L>(in.x[0]);
      const double scale = 1.0 / static_cast<double>(p.T);
      if (p.variant & 2) {
        ops::cross_entropy_backward(logits.view(), cview(logits), std::span<const std::int32_t>(in.ids), scale);
        return outputs(read_back(logits));
      }
      auto d = poisoned_at<T, L>(Shape{p.T, p.V});
      ops::cross_entropy_backward(d.view(), cview(logits), std::span<const std::int32_t>(in.ids), scale);
      return outputs(read_back(d));
    });
    c.tolerance = {{1e-7, 1e-5}};  // atol: one float rounding of scale (<= 1), e.g. V = 1 rows are 0 only in double
    table.push_back(std::move(c));
  }

  return table;
}

/// The reduced-precision tolerance of an op under a device math mode (see the header), or none
/// when the mode does not touch the op.
std::optional<Tolerance> reduced_tolerance(const std::string& op, DeviceMath math) {
  if (op.starts_with("backward")) return std::nullopt;  // training runs in the fp32 mode only (for now)
  const double u_tf32 = std::ldexp(1.0, -11), u_bf16 = std::ldexp(1.0, -8);
  if (op == "linear" || op == "linear_gelu") return Tolerance{1e-6, 8 * (math == DeviceMath::bf16 ? u_bf16 : u_tf32)};
  if (op.find("attention") != std::string::npos) return Tolerance{1e-6, 16 * u_tf32};
  return std::nullopt;
}

/// The buffers a table pass runs on: float, or a 16-bit type on the device.
enum class Buffers { Float, Bf16, F16 };

/// u of a 16-bit type: 2^-8 for bf16 (8 significant bits), 2^-11 for fp16 (11).
double unit_roundoff(Buffers b) { return std::ldexp(1.0, b == Buffers::Bf16 ? -8 : -11); }

/// The tolerance of a forward op on 16-bit buffers (see the header), output o: the inputs are
/// rounded to the type first, so what remains is the op's own arithmetic (fp32, as on float buffers:
/// the float tolerance) plus the rounding of its output (<= u / 2 of |out|, so u of max |ref| leaves
/// a factor 2); linear 2u: cuBLASLt may round between the product, the accumulation into out and the
/// bias epilogue (measured on an H100 in bf16: up to 1.5u of max |ref| with bias or accumulation,
/// within u without), three roundings of u / 2; attention adds 4u for its probabilities, rounded to
/// the type (<= u / 2 relative) before P V on the tensor cores: <= u / 2 max |v| per output, and max
/// |ref| is about max |v| (row 0 is v_0). linear_gelu 3u: linear's 2u, and u for cuBLASLt's GELU
/// epilogue, whose arithmetic is not documented (were its tanh the hardware's approximate one,
/// relative error 2^-11, the output would move by <= 2^-12 |pre-activation|: u / 2 in fp16, and
/// max |pre-activation| is about max |ref|). cross_entropy reads 16-bit logits exactly and writes
/// float: the float tolerance. nullopt: no 16-bit form (the backward ops).
std::optional<Tolerance> half_width_tolerance(const OpCase& op, std::size_t o, Buffers b) {
  if (op.name.starts_with("backward")) return std::nullopt;
  const double u = unit_roundoff(b);
  Tolerance t = op.tolerance[o];
  if (op.name == "cross_entropy") return t;
  t.rtol += op.name == "linear" ? 2 * u : op.name == "linear_gelu" ? 3 * u : u;
  if (op.name.find("attention") != std::string::npos) t.rtol += 4 * u;
  return t;
}

/// Every input of a case rounded to bf16 or fp16 (absent inputs stay absent).
Inputs rounded_to(Inputs in, Buffers b) {
  for (HostD& x : in.x) {
    for (index_t i = 0; i < x.numel(); ++i) {
      const float f = static_cast<float>(x.data()[i]);
      x.data()[i] = b == Buffers::Bf16 ? to_float(from_float<bfloat16>(f)) : to_float(from_float<longmem::half>(f));
    }
  }
  return in;
}

/// Runs every size of every case on every backend; prints one summary line per (case, backend).
/// Under a reduced-precision `math` mode: only the ops it touches, on the device, with
/// reduced_tolerance, plus the check that the mode took effect. With 16-bit `buffers`: every forward
/// case on the device with bfloat16 or half buffers (Backend::DeviceBf16 / DeviceF16), inputs
/// rounded to the type, against the float64 reference of the rounded inputs within
/// half_width_tolerance.
void run_table(const std::string& filter, DeviceMath math = DeviceMath::fp32, Buffers buffers = Buffers::Float) {
  const auto table = op_table();
  const bool half_width = buffers != Buffers::Float;
  const bool reduced = math != DeviceMath::fp32 || half_width;
  if (reduced && !device_present) return;
  const DeviceMathScope scope(math);
  const std::size_t n_backends = device_present ? 2 : 1;
  for (std::size_t which = 0; which < table.size(); ++which) {
    const OpCase& op = table[which];
    if (!filter.empty() && op.name.find(filter) == std::string::npos) continue;
    const std::optional<Tolerance> reduced_tol =
        half_width ? half_width_tolerance(op, 0, buffers) : reduced ? reduced_tolerance(op.name, math) : std::nullopt;
    if (reduced && !reduced_tol) continue;
    double worst[2] = {0, 0};  // max over sizes and outputs of max_err / bound
    double worst_rel = 0;      // reduced modes: max over sizes and outputs of max_err / max_ref
    double host_device = 0;    // max |device - host| over everything
    int failed[2] = {0, 0};
    std::size_t run = 0;
    for (std::size_t i = 0; i < op.sizes.size(); i += size_stride()) {
      const Params& p = op.sizes[i];
      ++run;
      const std::uint64_t seed = base_seed() + 1000003 * which + i;
      std::mt19937_64 rng(seed);
      const Inputs in = half_width ? rounded_to(op.make(p, rng), buffers) : op.make(p, rng);
      const Outputs ref = op.reference(p, in);
      Outputs got[2];
      for (std::size_t bi = reduced ? 1 : 0; bi < n_backends; ++bi) {
        const Backend b = !half_width ? backends[bi] : buffers == Buffers::Bf16 ? Backend::DeviceBf16 : Backend::DeviceF16;
        std::string error;
        try {
          got[bi] = op.run(b, p, in);
          if (b == Backend::Device) error = device_error();
        } catch (const std::exception& e) {
          error = e.what();
        }
        ++checks;
        if (!error.empty()) {
          ++failures, ++failed[bi];
          std::printf("FAILED %s on %s, %s, seed %llu: threw or faulted: %s\n", op.name.c_str(), name(b),
                      p.str().c_str(), static_cast<unsigned long long>(seed), error.c_str());
          got[bi].clear();
          continue;
        }
        if (got[bi].size() != ref.size() || op.tolerance.size() != ref.size()) {
          ++failures, ++failed[bi];
          std::printf("FAILED %s on %s: %zu outputs, %zu references, %zu tolerances\n", op.name.c_str(), name(b),
                      got[bi].size(), ref.size(), op.tolerance.size());
          got[bi].clear();
          continue;
        }
        for (std::size_t o = 0; o < ref.size(); ++o) {
          const Comparison cmp =
              compare(got[bi][o], ref[o],
                      half_width ? *half_width_tolerance(op, o, buffers) : reduced ? *reduced_tol : op.tolerance[o]);
          if (cmp.bound > 0) worst[bi] = std::max(worst[bi], cmp.max_err / cmp.bound);
          if (cmp.max_ref > 0) worst_rel = std::max(worst_rel, cmp.max_err / cmp.max_ref);
          if (!cmp.ok) {
            ++failures, ++failed[bi];
            std::printf("FAILED %s on %s, %s, seed %llu, output %zu: %s\n", op.name.c_str(), name(b), p.str().c_str(),
                        static_cast<unsigned long long>(seed), o, cmp.str().c_str());
          }
        }
      }
      if (got[0].size() == ref.size() && got[1].size() == ref.size()) {
        for (std::size_t o = 0; o < ref.size(); ++o) {
          const Comparison d = compare(got[1][o], got[0][o], {0, 0});
          if (d.shape_ok && d.nan_at < 0) host_device = std::max(host_device, d.max_err);
        }
      }
    }
    if (half_width) {  // the element type is fixed at compile time: nothing to prove applied
      std::printf("%-22s device %s buffers %4zu sizes: %s, worst error %.3g of the bound (rtol %.3g), %.3g of max|ref|\n",
                  op.name.c_str(), buffers == Buffers::Bf16 ? "bf16" : "fp16", run, failed[1] ? "FAILED" : "ok",
                  worst[1], reduced_tol->rtol, worst_rel);
      std::fflush(stdout);
      continue;
    }
    if (reduced) {
      std::printf("%-22s device %s %4zu sizes: %s, worst error %.3g of the bound (rtol %.3g), %.3g of max|ref|\n",
                  op.name.c_str(), to_string(math), run, failed[1] ? "FAILED" : "ok", worst[1], reduced_tol->rtol,
                  worst_rel);
      EXPECT(worst_rel > std::ldexp(1.0, -18), "%s under DeviceMath::%s is as exact as fp32 (worst %.3g of max|ref|): "
             "the mode was not applied", op.name.c_str(), to_string(math), worst_rel);
      std::fflush(stdout);
      continue;
    }
    for (std::size_t bi = 0; bi < n_backends; ++bi) {
      std::printf("%-22s %-6s %4zu sizes: %s, worst error %.3g of the bound\n", op.name.c_str(), bi ? "device" : "host",
                  run, failed[bi] ? "FAILED" : "ok", worst[bi]);
    }
    if (device_present) std::printf("%-22s max |device - host| = %.3g\n", op.name.c_str(), host_device);
    std::fflush(stdout);
  }
}

// ---------------------------------------------------------------- behaviour on the device

using DV = TensorView<const float, Device>;

void attention_behaviour() {
  const std::uint64_t seed0 = base_seed() + 7;
  // K = 0 (absent memory and a (T, H, 0, dh) view) is bit for bit the device's causal_attention.
  for (index_t T : {1, 7, 129})
    for (auto hs : {HeadShape{4, 16}, HeadShape{12, 64}})
      for (auto pos : {PositionScheme::Learned, PositionScheme::Alibi}) {
        std::mt19937_64 rng(seed0 + static_cast<std::uint64_t>(T * 131 + hs.H));
        auto q = to<Device>(random_tensor(Shape{T, hs.H, hs.dh}, rng, -3, 3));
        auto k = to<Device>(random_tensor(Shape{T, hs.H, hs.dh}, rng));
        auto v = to<Device>(random_tensor(Shape{T, hs.H, hs.dh}, rng));
        auto g = to<Device>(random_tensor(Shape{hs.H}, rng, -3, 3));
        auto a = poisoned<Device>(Shape{T, hs.H, hs.dh});
        ops::causal_attention(a.view(), cview(q), cview(k), cview(v), pos);
        const HostD A = back(a);
        const DV empty(nullptr, Shape{T, hs.H, 0, hs.dh});
        for (int fusion : {0, 1})
          for (bool absent_memory : {false, true}) {
            const DV mk = absent_memory ? DV{} : empty;
            auto out = poisoned<Device>(Shape{T, hs.H, hs.dh});
            if (fusion == 0) {
              ops::memory_attention<GatedFusion>(out.view(), cview(q), cview(k), cview(v), mk, mk, cview(g), pos);
            } else {
              ops::memory_attention<JointFusion>(out.view(), cview(q), cview(k), cview(v), mk, mk, DV{}, pos);
            }
            EXPECT(bitwise_equal(back(out), A), "K = 0 differs from causal_attention: T=%lld H=%lld dh=%lld %s %s %s",
                   static_cast<long long>(T), static_cast<long long>(hs.H), static_cast<long long>(hs.dh),
                   to_string(pos), fusion ? "joint" : "gated", absent_memory ? "absent memory" : "(T,H,0,dh) memory");
          }
      }

  // Saturated gates: -inf/-200 give the local branch, +200/+inf the memory branch.
  for (double gate : {-std::numeric_limits<double>::infinity(), -200.0, 200.0, std::numeric_limits<double>::infinity()}) {
    const index_t T = 64, H = 4, dh = 16, K = 8;
    std::mt19937_64 rng(seed0 + 99);
    const HostD q = random_tensor(Shape{T, H, dh}, rng, -3, 3), k = random_tensor(Shape{T, H, dh}, rng),
                v = random_tensor(Shape{T, H, dh}, rng), mk = random_tensor(Shape{T, H, K, dh}, rng),
                mv = random_tensor(Shape{T, H, K, dh}, rng);
    HostD g(Shape{H});
    fill<double>(g.view(), gate);
    auto bq = to<Device>(q), bk = to<Device>(k), bv = to<Device>(v), bmk = to<Device>(mk), bmv = to<Device>(mv),
         bg = to<Device>(g);
    auto out = poisoned<Device>(Shape{T, H, dh});
    ops::memory_attention<GatedFusion>(out.view(), cview(bq), cview(bk), cview(bv), cview(bmk), cview(bmv), cview(bg),
                                       PositionScheme::Alibi);
    const HostD ref = gate < 0 ? reference::causal_attention(q, k, v, PositionScheme::Alibi) : reference::memory_branch(q, mk, mv);
    const Comparison c = compare(back(out), ref, {1e-6, 1e-4});
    EXPECT(c.ok, "gate %g: %s", gate, c.str().c_str());
  }

  // A future key, value or later query's memory never changes an earlier output.
  for (index_t T : {7, 129, 300})
    for (int kind : {0, 1, 2}) {
      const index_t H = 4, dh = 16, K = 8;
      std::mt19937_64 rng(seed0 + static_cast<std::uint64_t>(T) * 3 + static_cast<std::uint64_t>(kind));
      const index_t cut = std::uniform_int_distribution<index_t>(0, T - 2)(rng);
      const HostD q = random_tensor(Shape{T, H, dh}, rng, -3, 3), g = random_tensor(Shape{H}, rng, -2, 2);
      HostD k = random_tensor(Shape{T, H, dh}, rng), v = random_tensor(Shape{T, H, dh}, rng);
      HostD mk = random_tensor(Shape{T, H, K, dh}, rng), mv = random_tensor(Shape{T, H, K, dh}, rng);
      auto run = [&](const HostD& k_, const HostD& v_, const HostD& mk_, const HostD& mv_) {
        auto bq = to<Device>(q), bk = to<Device>(k_), bv = to<Device>(v_), bmk = to<Device>(mk_), bmv = to<Device>(mv_),
             bg = to<Device>(g);
        auto out = poisoned<Device>(Shape{T, H, dh});
        if (kind == 0) ops::causal_attention(out.view(), cview(bq), cview(bk), cview(bv), PositionScheme::Alibi);
        if (kind == 1)
          ops::memory_attention<GatedFusion>(out.view(), cview(bq), cview(bk), cview(bv), cview(bmk), cview(bmv),
                                             cview(bg), PositionScheme::Alibi);
        if (kind == 2)
          ops::memory_attention<JointFusion>(out.view(), cview(bq), cview(bk), cview(bv), cview(bmk), cview(bmv),
                                             cview(bg), PositionScheme::Alibi);
        return back(out);
      };
      const HostD before = run(k, v, mk, mv);
      const index_t row = H * dh, mem_row = H * K * dh;
      for (index_t i = (cut + 1) * row; i < T * row; ++i) k.data()[i] *= 50, v.data()[i] *= -50;
      for (index_t i = (cut + 1) * mem_row; i < T * mem_row; ++i) mk.data()[i] *= 3, mv.data()[i] *= -2;
      const HostD after = run(k, v, mk, mv);
      bool prefix_same = true, last_moved = false;
      for (index_t i = 0; i < (cut + 1) * row; ++i) prefix_same &= before.data()[i] == after.data()[i];
      for (index_t i = (T - 1) * row; i < T * row; ++i) last_moved |= before.data()[i] != after.data()[i];
      EXPECT(prefix_same && last_moved, "causality, kind %d T=%lld cut=%lld: prefix same %d, last row moved %d", kind,
             static_cast<long long>(T), static_cast<long long>(cut), prefix_same, last_moved);
    }

  // Scores in the thousands: memory keys aligned with the query, local scores of a few hundred.
  // Float rounding of scores that large moves exponents by ~1e-5, hence rtol 1e-4 as on the host.
  for (index_t T : {1, 7, 64}) {
    const index_t H = 4, dh = 16, K = 8;
    std::mt19937_64 rng(seed0 + 77 * static_cast<std::uint64_t>(T));
    const HostD q = random_tensor(Shape{T, H, dh}, rng, -3, 3), k = random_tensor(Shape{T, H, dh}, rng, -60, 60),
                v = random_tensor(Shape{T, H, dh}, rng), mv = random_tensor(Shape{T, H, K, dh}, rng),
                g = random_tensor(Shape{H}, rng, -2, 2);
    HostD mk(Shape{T, H, K, dh});
    for (index_t t = 0; t < T; ++t)
      for (index_t h = 0; h < H; ++h)
        for (index_t j = 0; j < K; ++j)
          for (index_t c = 0; c < dh; ++c) mk(t, h, j, c) = static_cast<double>(static_cast<float>((100.0 + j) * q(t, h, c)));
    auto bq = to<Device>(q), bk = to<Device>(k), bv = to<Device>(v), bmk = to<Device>(mk), bmv = to<Device>(mv),
         bg = to<Device>(g);
    for (int kind : {0, 1, 2}) {
      auto out = poisoned<Device>(Shape{T, H, dh});
      HostD ref;
      const auto pos = PositionScheme::Alibi;
      if (kind == 0) {
        ops::causal_attention(out.view(), cview(bq), cview(bk), cview(bv), pos);
        ref = reference::causal_attention(q, k, v, pos);
      } else if (kind == 1) {
        ops::memory_attention<GatedFusion>(out.view(), cview(bq), cview(bk), cview(bv), cview(bmk), cview(bmv), cview(bg), pos);
        ref = reference::memory_attention_gated(q, k, v, mk, mv, g, pos);
      } else {
        ops::memory_attention<JointFusion>(out.view(), cview(bq), cview(bk), cview(bv), cview(bmk), cview(bmv), cview(bg), pos);
        ref = reference::memory_attention_joint(q, k, v, mk, mv, pos);
      }
      const Comparison c = compare(back(out), ref, {1e-5, 1e-4});
      EXPECT(c.ok, "large scores, kind %d T=%lld: %s", kind, static_cast<long long>(T), c.str().c_str());
    }
  }
  const std::string err = device_error();
  EXPECT(err.empty(), "device fault in the behaviour checks: %s", err.c_str());
}

// ---------------------------------------------------------------- refusals on the device

template <class E, class F>
void expect_throws(const char* what, F&& f, std::vector<std::string> parts) {
  std::string message;
  bool thrown = false;
  try {
    f();
  } catch (const E& e) {
    thrown = true;
    message = e.what();
  } catch (const std::exception& e) {
    message = std::string("another exception: ") + e.what();
  }
  bool has_parts = thrown;
  for (const auto& part : parts) has_parts = has_parts && message.find(part) != std::string::npos;
  EXPECT(thrown && has_parts, "%s: message '%s'", what, message.c_str());
}

bool all_nan(const Tensor<float, Device>& t) {
  const HostD h = back(t);
  for (double x : h)
    if (!std::isnan(x)) return false;
  return true;
}

void refusals() {
  std::mt19937_64 rng(base_seed());
  auto make = [&](Shape s) { return to<Device>(random_tensor(s, rng)); };

  {  // embedding
    auto wte = make(Shape{50, 8}), wpe = make(Shape{4, 8});
    auto out = poisoned<Device>(Shape{5, 8});
    std::vector<std::int32_t> tokens = {1, 2, 3, 50, 4};
    expect_throws<InputError>("embedding id 50", [&] { ops::embedding(out.view(), tokens, cview(wte), DV{}); },
                              {"embedding", "token id 50", "position 3", "[0, 50)"});
    tokens[3] = -2;
    expect_throws<InputError>("embedding id -2", [&] { ops::embedding(out.view(), tokens, cview(wte), DV{}); },
                              {"token id -2", "position 3"});
    EXPECT(all_nan(out), "embedding wrote before refusing a bad id");
    tokens[3] = 7;
    expect_throws<InputError>("embedding past wpe", [&] { ops::embedding(out.view(), tokens, cview(wte), cview(wpe)); },
                              {"embedding", "5 tokens", "4 positions"});
    expect_throws<InputError>(
        "embedding empty",
        [&] { ops::embedding(out.view().slice(0, 0), std::span<const std::int32_t>(), cview(wte), DV{}); },
        {"embedding", "empty"});
    auto wrong = poisoned<Device>(Shape{4, 8});
    expect_throws<ShapeError>("embedding out shape", [&] { ops::embedding(wrong.view(), tokens, cview(wte), DV{}); },
                              {"embedding: out", "(5, 8)", "(4, 8)"});
    EXPECT(all_nan(out) && all_nan(wrong), "embedding wrote before a refusal");
  }
  {  // linear, layer_norm, add, add_difference, gelu
    auto x = make(Shape{3, 6}), w = make(Shape{5, 6}), b = make(Shape{5});
    auto w_bad = make(Shape{5, 7}), b_bad = make(Shape{4}), w66 = make(Shape{6, 6});
    auto y = poisoned<Device>(Shape{3, 5}), y_bad = poisoned<Device>(Shape{2, 5});
    expect_throws<ShapeError>("linear weight", [&] { ops::linear(y.view(), cview(x), cview(w_bad), cview(b)); },
                              {"linear: in", "(3, 6)", "7"});
    expect_throws<ShapeError>("linear bias", [&] { ops::linear(y.view(), cview(x), cview(w), cview(b_bad)); },
                              {"linear: bias", "(5)", "(4)"});
    expect_throws<ShapeError>("linear out", [&] { ops::linear(y_bad.view(), cview(x), cview(w), cview(b)); },
                              {"linear: out", "(3, 5)", "(2, 5)"});
    expect_throws<InputError>("linear overlap", [&] { ops::linear(x.view(), cview(x), cview(w66), DV{}); },
                              {"linear", "overlaps"});
    expect_throws<ShapeError>("linear_gelu weight",
                              [&] { ops::linear_gelu(y.view(), cview(x), cview(w_bad), cview(b), Activation::GeluTanh); },
                              {"linear_gelu: in", "(3, 6)", "7"});
    expect_throws<ShapeError>("linear_gelu out",
                              [&] { ops::linear_gelu(y_bad.view(), cview(x), cview(w), cview(b), Activation::GeluTanh); },
                              {"linear_gelu: out", "(3, 5)", "(2, 5)"});
    expect_throws<InputError>("linear_gelu overlap",
                              [&] { ops::linear_gelu(x.view(), cview(x), cview(w66), DV{}, Activation::GeluTanh); },
                              {"linear_gelu", "overlaps"});
    expect_throws<InputError>("linear_gelu kind",
                              [&] { ops::linear_gelu(y.view(), cview(x), cview(w), cview(b), static_cast<Activation>(7)); },
                              {"linear_gelu", "unknown activation"});
    EXPECT(all_nan(y) && all_nan(y_bad), "linear wrote before a refusal");

    auto g6 = make(Shape{6}), g5 = make(Shape{5});
    expect_throws<ShapeError>("layer_norm bias", [&] { ops::layer_norm(x.view(), cview(x), cview(g6), cview(g5), 1e-5); },
                              {"layer_norm: bias", "(6)", "(5)"});
    expect_throws<ShapeError>("layer_norm out", [&] { ops::layer_norm(y.view(), cview(x), cview(g6), cview(g6), 1e-5); },
                              {"layer_norm: out"});
    expect_throws<InputError>("layer_norm eps", [&] { ops::layer_norm(x.view(), cview(x), cview(g6), cview(g6), -1.0); },
                              {"layer_norm", "eps"});
    expect_throws<ShapeError>("add", [&] { ops::add(x.view(), cview(y)); }, {"add", "(3, 5)", "(3, 6)"});
    expect_throws<ShapeError>("add_difference", [&] { ops::add_difference(x.view(), cview(x), cview(y)); },
                              {"add_difference", "b"});
    expect_throws<ShapeError>("gelu", [&] { ops::gelu(y.view(), cview(x), Activation::GeluErf); }, {"gelu", "in"});
    expect_throws<InputError>("gelu kind", [&] { ops::gelu(x.view(), static_cast<Activation>(7)); },
                              {"gelu", "unknown activation"});
    EXPECT(all_nan(y), "an elementwise op wrote before a refusal");
  }
  {  // attention
    auto q = make(Shape{4, 2, 3}), k_bad = make(Shape{4, 2, 2}), x = make(Shape{3, 6});
    auto o = poisoned<Device>(Shape{4, 2, 3});
    auto mk = make(Shape{4, 2, 5, 3}), mk_bad = make(Shape{4, 3, 5, 3}), mv_bad = make(Shape{4, 2, 6, 3});
    auto gate = make(Shape{2}), gate_bad = make(Shape{3});
    const auto A = PositionScheme::Alibi;
    expect_throws<ShapeError>("causal k", [&] { ops::causal_attention(o.view(), cview(q), cview(k_bad), cview(q), A); },
                              {"causal_attention: k", "(4, 2, 3)", "(4, 2, 2)"});
    expect_throws<ShapeError>("causal q", [&] { ops::causal_attention(o.view(), cview(x), cview(x), cview(x), A); },
                              {"causal_attention: q", "(T, H, dh)", "(3, 6)"});
    expect_throws<ShapeError>(
        "memory mem_k",
        [&] { ops::memory_attention<GatedFusion>(o.view(), cview(q), cview(q), cview(q), cview(mk_bad), cview(mk), cview(gate), A); },
        {"memory_attention: mem_k", "(4, 2, K, 3)", "(4, 3, 5, 3)"});
    expect_throws<ShapeError>(
        "memory mem_v",
        [&] { ops::memory_attention<JointFusion>(o.view(), cview(q), cview(q), cview(q), cview(mk), cview(mv_bad), cview(gate), A); },
        {"memory_attention: mem_v", "(4, 2, 5, 3)", "(4, 2, 6, 3)"});
    expect_throws<ShapeError>(
        "memory gate shape",
        [&] { ops::memory_attention<GatedFusion>(o.view(), cview(q), cview(q), cview(q), cview(mk), cview(mk), cview(gate_bad), A); },
        {"memory_attention: gate", "(2)", "(3)"});
    expect_throws<ShapeError>(
        "memory gate missing",
        [&] { ops::memory_attention<GatedFusion>(o.view(), cview(q), cview(q), cview(q), cview(mk), cview(mk), DV{}, A); },
        {"memory_attention: gate"});
    expect_throws<InputError>("causal overlap",
                              [&] { ops::causal_attention(o.view(), cview(o), cview(q), cview(q), A); },
                              {"causal_attention", "overlaps q"});
    auto wide = make(Shape{2, 1, 300});
    auto wide_out = poisoned<Device>(Shape{2, 1, 300});
    expect_throws<ShapeError>("causal dh 300",
                              [&] { ops::causal_attention(wide_out.view(), cview(wide), cview(wide), cview(wide), A); },
                              {"causal_attention", "head dim 300", "256"});
    EXPECT(all_nan(o) && all_nan(wide_out), "attention wrote before a refusal");
  }
  {  // cross_entropy
    auto logits = make(Shape{3, 7});
    auto losses = poisoned<Device>(Shape{3});
    std::vector<std::int32_t> targets = {0, 7, -1};
    expect_throws<InputError>("cross_entropy 7", [&] { ops::cross_entropy<float, Device>(cview(logits), targets, losses.view()); },
                              {"cross_entropy", "target 7", "position 1", "[0, 7)"});
    targets = {0, -3, 1};
    expect_throws<InputError>("cross_entropy -3", [&] { ops::cross_entropy<float, Device>(cview(logits), targets, losses.view()); },
                              {"target -3"});
    targets = {0, 1};
    expect_throws<ShapeError>("cross_entropy shape", [&] { ops::cross_entropy<float, Device>(cview(logits), targets, losses.view()); },
                              {"cross_entropy: logits", "(2, V)", "(3, 7)"});
    auto losses_bad = poisoned<Device>(Shape{4});
    targets = {0, 1, 2};
    expect_throws<ShapeError>("cross_entropy losses", [&] { ops::cross_entropy<float, Device>(cview(logits), targets, losses_bad.view()); },
                              {"cross_entropy: losses"});
    EXPECT(all_nan(losses) && all_nan(losses_bad), "cross_entropy wrote before a refusal");
  }
  const std::string err = device_error();
  EXPECT(err.empty(), "device fault in the refusal checks: %s", err.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  device_present = cuda_device_available();
  if (!device_present) {
    // The table still runs on the host backend, which checks the cases and tolerances themselves.
    std::printf("no CUDA device: running the op table on the host backend only\n");
    run_table(filter);
    if (failures) {
      std::printf("%d of %d host checks failed\n", failures, checks);
      return 1;
    }
    std::printf("host backend passed %d checks; the device checks are skipped\n", checks);
    return 77;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  std::printf("seed %llu%s%s\n", static_cast<unsigned long long>(base_seed()), filter.empty() ? "" : ", ops matching ",
              filter.c_str());
  run_part("op table", [&] {
    run_table(filter);
    run_table(filter, DeviceMath::tf32);
    run_table(filter, DeviceMath::bf16);
    run_table(filter, DeviceMath::fp32, Buffers::Bf16);
    run_table(filter, DeviceMath::fp32, Buffers::F16);
  });
  if (filter.empty() || filter == "behaviour") run_part("behaviour", [] { attention_behaviour(); });
  if (filter.empty() || filter == "refusals") run_part("refusals", [] { refusals(); });
  return finish("device op");
}
