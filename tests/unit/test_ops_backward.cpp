// Every backward op of the table against float64 central finite differences of the float64
// reference forward (reference/ops.hpp), for every backend and compute type.
//
// For an op y = f(x1, x2, ...) and a random upstream gradient R (shaped like y), the scalar
// loss is L = sum(f(x) * R); the backward is called with d_out = R and each gradient it returns
// is compared with (L(x + h e_i) - L(x - h e_i)) / 2h, h = 1e-6, over every coordinate of small
// tensors and 40 random coordinates of large ones:
//   max |analytic - finite difference| <= rtol * max |finite difference| (+ tiny atol)
//   double: rtol 1e-6 (what the issue asks)   float: rtol 2e-4 (float arithmetic in the backend)
// Parameter gradients must accumulate into what their buffer held (pre-filled with random
// values); activation gradients are poisoned with NaN first (an unwritten element fails) and,
// where the op takes Accumulate::Yes, checked to add to a random start.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "longmem/cpu/ops.hpp"
#include "longmem/reference/ops.hpp"
#include "op_test_support.hpp"

namespace {

using namespace longmem;
using namespace longmem::test;

struct GradParams {
  index_t T = 1, H = 1, dh = 1, K = 0, N = 1, I = 1, O = 1, V = 1, C = 1;
  PositionScheme pos = PositionScheme::Learned;
  Activation act = Activation::GeluErf;
  int variant = 0;  // op-specific (bias on/off, accumulate, gate pattern)
  int fusion = 0;   // 0 gated, 1 joint

  std::string str() const {
    std::ostringstream os;
    os << "T=" << T << " H=" << H << " dh=" << dh << " K=" << K << " N=" << N << " I=" << I << " O=" << O
       << " V=" << V << " C=" << C << " pos=" << to_string(pos) << " act=" << to_string(act)
       << " variant=" << variant << " fusion=" << (fusion ? "joint" : "gated");
    return os.str();
  }
};

struct GradInputs {
  std::vector<HostD> x;              // op inputs, doubles representable in T
  std::vector<std::int32_t> tokens;  // ids or targets
  HostD d_out;                       // upstream gradient R, shaped like the output
};

/// One backward op: which inputs it differentiates, the reference forward y(x), and the
/// backend's backward returning one gradient per entry of `wrt` (already minus any start value).
template <class T, class L>
struct GradCase {
  std::string name;
  std::vector<GradParams> sizes;
  std::function<GradInputs(const GradParams&, std::mt19937_64&)> make;
  std::vector<int> wrt;  // indices into x
  std::function<HostD(const GradParams&, const GradInputs&)> forward;  // float64 reference
  std::function<std::vector<HostD>(const GradParams&, const GradInputs&, std::mt19937_64&)> backward;
};

template <class T>
double rtol() {
  return std::is_same_v<T, float> ? 2e-4 : 1e-6;
}

double weighted_sum(const HostD& y, const HostD& r) {
  double s = 0;
  for (index_t i = 0; i < y.numel(); ++i) s += y.data()[i] * r.data()[i];
  return s;
}

/// A parameter-gradient buffer pre-filled with random values; returns (buffer on L, start).
template <class T, class L>
std::pair<Tensor<T, L>, HostD> prefilled(Shape s, std::mt19937_64& rng) {
  HostD start = random_tensor<T>(s, rng);
  return {to_backend<T, L>(start), std::move(start)};
}

/// got - start, as doubles.
template <class T, class L>
HostD minus(const Tensor<T, L>& got, const HostD& start) {
  HostD g = to_double(got);
  for (index_t i = 0; i < g.numel(); ++i) g.data()[i] -= start.data()[i];
  return g;
}

template <class T, class L>
std::vector<GradCase<T, L>> grad_table() {
  std::vector<GradCase<T, L>> table;

  {  // embedding_backward: d_wte (scattered, repeated ids) and d_wpe
    GradCase<T, L> c;
    c.name = "embedding_backward";
    for (index_t T_ : {1, 9, 40})
      for (int with_wpe : {0, 1}) {
        GradParams p;
        p.T = T_, p.C = 6, p.V = 7, p.variant = with_wpe;
        c.sizes.push_back(p);
      }
    c.make = [](const GradParams& p, std::mt19937_64& rng) {
      GradInputs in;
      in.x.push_back(random_tensor<T>(Shape{p.V, p.C}, rng));
      in.x.push_back(p.variant ? random_tensor<T>(Shape{p.T + 3, p.C}, rng) : HostD{});
      std::uniform_int_distribution<std::int32_t> tok(0, static_cast<std::int32_t>(p.V - 1));
      for (index_t t = 0; t < p.T; ++t) in.tokens.push_back(tok(rng));
      in.d_out = random_tensor<T>(Shape{p.T, p.C}, rng);
      return in;
    };
    c.wrt = {0, 1};
    c.forward = [](const GradParams&, const GradInputs& in) { return reference::embedding(in.tokens, in.x[0], in.x[1]); };
    c.backward = [](const GradParams& p, const GradInputs& in, std::mt19937_64& rng) {
      auto [dwte, s0] = prefilled<T, L>(Shape{p.V, p.C}, rng);
      Tensor<T, L> dwpe;
      HostD s1;
      if (p.variant) std::tie(dwpe, s1) = prefilled<T, L>(in.x[1].shape(), rng);
      auto g = to_backend<T, L>(in.d_out);
      ops::embedding_backward(dwte.view(), dwpe.view(), cview(g), in.tokens);
      std::vector<HostD> out;
      out.push_back(minus(dwte, s0));
      out.push_back(p.variant ? minus(dwpe, s1) : HostD{});
      return out;
    };
    table.push_back(std::move(c));
  }

  {  // layer_norm_backward: d_in (overwrite or accumulate), d_weight, d_bias
    GradCase<T, L> c;
    c.name = "layer_norm_backward";
    for (index_t N : {1, 5, 33})
      for (index_t C : {1, 3, 64})
        for (int acc : {0, 1}) {
          GradParams p;
          p.N = N, p.C = C, p.variant = acc;
          c.sizes.push_back(p);
        }
    c.make = [](const GradParams& p, std::mt19937_64& rng) {
      GradInputs in;
      in.x.push_back(random_tensor<T>(Shape{p.N, p.C}, rng, -2, 2));
      in.x.push_back(random_tensor<T>(Shape{p.C}, rng, 0.5, 1.5));
      in.x.push_back(random_tensor<T>(Shape{p.C}, rng));
      in.d_out = random_tensor<T>(Shape{p.N, p.C}, rng);
      return in;
    };
    c.wrt = {0, 1, 2};
    c.forward = [](const GradParams&, const GradInputs& in) { return reference::layer_norm(in.x[0], in.x[1], in.x[2], 1e-5); };
    c.backward = [](const GradParams& p, const GradInputs& in, std::mt19937_64& rng) {
      auto x = to_backend<T, L>(in.x[0]);
      auto w = to_backend<T, L>(in.x[1]);
      auto g = to_backend<T, L>(in.d_out);
      HostD start;
      Tensor<T, L> dx;
      if (p.variant) {
        std::tie(dx, start) = prefilled<T, L>(Shape{p.N, p.C}, rng);
      } else {
        dx = poisoned<T, L>(Shape{p.N, p.C});
      }
      auto [dw, sw] = prefilled<T, L>(Shape{p.C}, rng);
      auto [db, sb] = prefilled<T, L>(Shape{p.C}, rng);
      ops::layer_norm_backward(dx.view(), dw.view(), db.view(), cview(g), cview(x), cview(w), 1e-5,
                               p.variant ? Accumulate::Yes : Accumulate::No);
      std::vector<HostD> out;
      out.push_back(p.variant ? minus(dx, start) : to_double(dx));
      out.push_back(minus(dw, sw));
      out.push_back(minus(db, sb));
      return out;
    };
    table.push_back(std::move(c));
  }

  {  // linear_backward: d_in (overwrite or accumulate), d_weight, d_bias
    GradCase<T, L> c;
    c.name = "linear_backward";
    for (index_t N : {1, 6, 70})
      for (auto [I, O] : {std::pair<index_t, index_t>{1, 1}, {5, 3}, {33, 65}})
        for (int variant : {0, 1, 2, 3}) {  // bit 0: bias, bit 1: accumulate into d_in
          GradParams p;
          p.N = N, p.I = I, p.O = O, p.variant = variant;
          c.sizes.push_back(p);
        }
    c.make = [](const GradParams& p, std::mt19937_64& rng) {
      GradInputs in;
      in.x.push_back(random_tensor<T>(Shape{p.N, p.I}, rng));
      in.x.push_back(random_tensor<T>(Shape{p.O, p.I}, rng));
      in.x.push_back(p.variant & 1 ? random_tensor<T>(Shape{p.O}, rng) : HostD{});
      in.d_out = random_tensor<T>(Shape{p.N, p.O}, rng);
      return in;
    };
    c.wrt = {0, 1, 2};
    c.forward = [](const GradParams&, const GradInputs& in) { return reference::linear(in.x[0], in.x[1], in.x[2]); };
    c.backward = [](const GradParams& p, const GradInputs& in, std::mt19937_64& rng) {
      auto x = to_backend<T, L>(in.x[0]);
      auto w = to_backend<T, L>(in.x[1]);
      auto g = to_backend<T, L>(in.d_out);
      const bool acc = p.variant & 2;
      HostD start, sb;
      Tensor<T, L> dx, db;
      if (acc) {
        std::tie(dx, start) = prefilled<T, L>(Shape{p.N, p.I}, rng);
      } else {
        dx = poisoned<T, L>(Shape{p.N, p.I});
      }
      auto [dw, sw] = prefilled<T, L>(Shape{p.O, p.I}, rng);
      if (p.variant & 1) std::tie(db, sb) = prefilled<T, L>(Shape{p.O}, rng);
      ops::linear_backward(dx.view(), dw.view(), db.view(), cview(g), cview(x), cview(w),
                           acc ? Accumulate::Yes : Accumulate::No);
      std::vector<HostD> out;
      out.push_back(acc ? minus(dx, start) : to_double(dx));
      out.push_back(minus(dw, sw));
      out.push_back(p.variant & 1 ? minus(db, sb) : HostD{});
      return out;
    };
    table.push_back(std::move(c));
  }

  {  // gelu_backward, both forms, out of place and in place
    GradCase<T, L> c;
    c.name = "gelu_backward";
    for (index_t N : {1, 7, 5000})
      for (auto act : {Activation::GeluTanh, Activation::GeluErf})
        for (int in_place : {0, 1}) {
          GradParams p;
          p.N = N, p.act = act, p.variant = in_place;
          c.sizes.push_back(p);
        }
    c.make = [](const GradParams& p, std::mt19937_64& rng) {
      GradInputs in;
      in.x.push_back(random_tensor<T>(Shape{p.N}, rng, -5, 5));
      in.d_out = random_tensor<T>(Shape{p.N}, rng);
      return in;
    };
    c.wrt = {0};
    c.forward = [](const GradParams& p, const GradInputs& in) { return reference::gelu(in.x[0], p.act); };
    c.backward = [](const GradParams& p, const GradInputs& in, std::mt19937_64&) {
      auto x = to_backend<T, L>(in.x[0]);
      auto g = to_backend<T, L>(in.d_out);
      std::vector<HostD> out;
      if (p.variant) {
        ops::gelu_backward(g.view(), cview(g), cview(x), p.act);
        out.push_back(to_double(g));
      } else {
        auto dx = poisoned<T, L>(Shape{p.N});
        ops::gelu_backward(dx.view(), cview(g), cview(x), p.act);
        out.push_back(to_double(dx));
      }
      return out;
    };
    table.push_back(std::move(c));
  }

  {  // cross_entropy_backward: the gradient of scale * (summed loss); some targets ignored
    GradCase<T, L> c;
    c.name = "cross_entropy_backward";
    for (index_t T_ : {1, 4, 37})
      for (index_t V_ : {1, 6, 300})
        for (int variant : {0, 1}) {
          GradParams p;
          p.T = T_, p.V = V_, p.variant = variant;
          c.sizes.push_back(p);
        }
    c.make = [](const GradParams& p, std::mt19937_64& rng) {
      GradInputs in;
      in.x.push_back(random_tensor<T>(Shape{p.T, p.V}, rng, -6, 6));
      std::uniform_int_distribution<std::int32_t> tok(0, static_cast<std::int32_t>(p.V - 1));
      for (index_t t = 0; t < p.T; ++t) in.tokens.push_back(p.variant && t % 3 == 1 ? -1 : tok(rng));
      in.d_out = scalar_tensor({1.0});
      return in;
    };
    c.wrt = {0};
    c.forward = [](const GradParams& p, const GradInputs& in) {
      const double scale = 1.0 / static_cast<double>(p.T);
      return scalar_tensor({scale * reference::cross_entropy(in.x[0], in.tokens).sum});
    };
    c.backward = [](const GradParams& p, const GradInputs& in, std::mt19937_64&) {
      auto logits = to_backend<T, L>(in.x[0]);
      auto d = poisoned<T, L>(Shape{p.T, p.V});
      ops::cross_entropy_backward(d.view(), cview(logits), in.tokens, 1.0 / static_cast<double>(p.T));
      std::vector<HostD> out;
      out.push_back(to_double(d));
      return out;
    };
    table.push_back(std::move(c));
  }

  // Attention: q, k, v and (memory) the gate; T crosses the 64-query block of the kernel.
  auto attention_inputs = [](const GradParams& p, std::mt19937_64& rng) {
    GradInputs in;
    in.x.push_back(random_tensor<T>(Shape{p.T, p.H, p.dh}, rng, -2, 2));
    in.x.push_back(random_tensor<T>(Shape{p.T, p.H, p.dh}, rng, -2, 2));
    in.x.push_back(random_tensor<T>(Shape{p.T, p.H, p.dh}, rng));
    in.x.push_back(random_tensor<T>(Shape{p.T, p.H, p.K, p.dh}, rng, -2, 2));  // K = 0: (T, H, 0, dh)
    in.x.push_back(random_tensor<T>(Shape{p.T, p.H, p.K, p.dh}, rng));
    in.x.push_back(random_tensor<T>(Shape{p.H}, rng, -2, 2));
    in.d_out = random_tensor<T>(Shape{p.T, p.H, p.dh}, rng);
    return in;
  };
  auto attention_sizes = [](bool memory) {
    std::vector<GradParams> sizes;
    for (index_t T_ : {1, 5, 70})
      for (index_t H : {1, 3})
        for (index_t dh : {1, 4})
          for (index_t K : memory ? std::vector<index_t>{0, 1, 6} : std::vector<index_t>{0})
            for (auto pos : {PositionScheme::Learned, PositionScheme::Alibi})
              for (int fusion : memory ? std::vector<int>{0, 1} : std::vector<int>{0}) {
                GradParams p;
                p.T = T_, p.H = H, p.dh = dh, p.K = K, p.pos = pos, p.fusion = fusion;
                sizes.push_back(p);
              }
    return sizes;
  };

  {
    GradCase<T, L> c;
    c.name = "causal_attention_backward";
    c.sizes = attention_sizes(false);
    c.make = attention_inputs;
    c.wrt = {0, 1, 2};
    c.forward = [](const GradParams& p, const GradInputs& in) {
      return reference::causal_attention(in.x[0], in.x[1], in.x[2], p.pos);
    };
    c.backward = [](const GradParams& p, const GradInputs& in, std::mt19937_64&) {
      auto q = to_backend<T, L>(in.x[0]);
      auto k = to_backend<T, L>(in.x[1]);
      auto v = to_backend<T, L>(in.x[2]);
      auto g = to_backend<T, L>(in.d_out);
      const Shape s{p.T, p.H, p.dh};
      auto dq = poisoned<T, L>(s), dk = poisoned<T, L>(s), dv = poisoned<T, L>(s);
      ops::causal_attention_backward(dq.view(), dk.view(), dv.view(), cview(g), cview(q), cview(k), cview(v), p.pos);
      std::vector<HostD> out;
      out.push_back(to_double(dq));
      out.push_back(to_double(dk));
      out.push_back(to_double(dv));
      return out;
    };
    table.push_back(std::move(c));
  }

  {
    GradCase<T, L> c;
    c.name = "memory_attention_backward";
    c.sizes = attention_sizes(true);
    c.make = attention_inputs;
    c.wrt = {0, 1, 2, 5};  // q, k, v, gate; retrieved keys/values are constants
    c.forward = [](const GradParams& p, const GradInputs& in) {
      const auto& x = in.x;
      if (p.K == 0) return reference::causal_attention(x[0], x[1], x[2], p.pos);
      return p.fusion == 0 ? reference::memory_attention_gated(x[0], x[1], x[2], x[3], x[4], x[5], p.pos)
                           : reference::memory_attention_joint(x[0], x[1], x[2], x[3], x[4], p.pos);
    };
    c.backward = [](const GradParams& p, const GradInputs& in, std::mt19937_64& rng) {
      auto q = to_backend<T, L>(in.x[0]);
      auto k = to_backend<T, L>(in.x[1]);
      auto v = to_backend<T, L>(in.x[2]);
      auto mk = to_backend<T, L>(in.x[3]);
      auto mv = to_backend<T, L>(in.x[4]);
      auto gate = to_backend<T, L>(in.x[5]);
      auto g = to_backend<T, L>(in.d_out);
      const Shape s{p.T, p.H, p.dh};
      auto dq = poisoned<T, L>(s), dk = poisoned<T, L>(s), dv = poisoned<T, L>(s);
      auto [dgate, sg] = prefilled<T, L>(Shape{p.H}, rng);
      if (p.fusion == 0) {
        ops::memory_attention_backward<GatedFusion>(dq.view(), dk.view(), dv.view(), dgate.view(), cview(g), cview(q),
                                                    cview(k), cview(v), cview(mk), cview(mv), cview(gate), p.pos);
      } else {
        ops::memory_attention_backward<JointFusion>(dq.view(), dk.view(), dv.view(), dgate.view(), cview(g), cview(q),
                                                    cview(k), cview(v), cview(mk), cview(mv), cview(gate), p.pos);
      }
      std::vector<HostD> out;
      out.push_back(to_double(dq));
      out.push_back(to_double(dk));
      out.push_back(to_double(dv));
      out.push_back(minus(dgate, sg));  // joint and K = 0: the gate is unused, its gradient 0
      return out;
    };
    table.push_back(std::move(c));
  }
  return table;
}

/// Central finite differences of L = sum(forward(x) * d_out) for the coordinates `which` of x[i].
template <class F>
std::vector<double> finite_differences(F&& forward, GradInputs& in, int i, const std::vector<index_t>& which) {
  const double h = 1e-6;
  std::vector<double> g;
  for (index_t j : which) {
    double& x = in.x[static_cast<std::size_t>(i)].data()[j];
    const double x0 = x;
    x = x0 + h;
    const double up = weighted_sum(forward(in), in.d_out);
    x = x0 - h;
    const double down = weighted_sum(forward(in), in.d_out);
    x = x0;
    g.push_back((up - down) / (2 * h));
  }
  return g;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("ops backward: every backward matches float64 finite differences of the reference", "[ops][backward]",
                        Combos) {
  using T = typename TestType::T;
  using L = typename TestType::L;
  const auto table = grad_table<T, L>();
  REQUIRE(table.size() == 7);
  const std::size_t which = GENERATE(range<std::size_t>(0, 7));
  const auto& op = table[which];
  for (std::size_t c = 0; c < op.sizes.size(); ++c) {
    const GradParams& p = op.sizes[c];
    const std::uint64_t seed = base_seed() + 7919 * which + c;
    std::mt19937_64 rng(seed);
    GradInputs in = op.make(p, rng);
    const auto got = op.backward(p, in, rng);
    REQUIRE(got.size() == op.wrt.size());
    for (std::size_t w = 0; w < op.wrt.size(); ++w) {
      const int i = op.wrt[w];
      const HostD& x = in.x[static_cast<std::size_t>(i)];
      if (x.numel() == 0) {
        CHECK(got[w].numel() == 0);
        continue;
      }
      REQUIRE(got[w].shape() == x.shape());
      std::vector<index_t> coords;
      if (x.numel() <= 40) {
        for (index_t j = 0; j < x.numel(); ++j) coords.push_back(j);
      } else {
        std::uniform_int_distribution<index_t> u(0, x.numel() - 1);
        for (int j = 0; j < 40; ++j) coords.push_back(u(rng));
      }
      const auto fd = finite_differences([&](const GradInputs& xi) { return op.forward(p, xi); }, in, i, coords);
      double max_fd = 0, max_err = 0;
      bool finite = true;
      for (std::size_t j = 0; j < coords.size(); ++j) {
        const double a = got[w].data()[coords[j]];
        finite = finite && std::isfinite(a);
        max_fd = std::max(max_fd, std::abs(fd[j]));
        max_err = std::max(max_err, std::abs(a - fd[j]));
      }
      // Every element must be written, not only the sampled ones.
      for (index_t j = 0; j < got[w].numel(); ++j) finite = finite && std::isfinite(got[w].data()[j]);
      const double bound = rtol<T>() * max_fd + 1e-9;
      const std::string params = p.str();
      CAPTURE(op.name, params, seed, i, max_err, max_fd, bound);
      CHECK(finite);
      CHECK(max_err <= bound);
    }
  }
}

TEMPLATE_LIST_TEST_CASE("ops backward: memory backward with K = 0 is exactly causal backward", "[ops][backward]", Combos) {
  using T = typename TestType::T;
  using L = typename TestType::L;
  std::mt19937_64 rng(base_seed() + 5);
  const index_t Tn = 70, H = 2, dh = 8;
  const Shape s{Tn, H, dh};
  auto q = to_backend<T, L>(random_tensor<T>(s, rng)), k = to_backend<T, L>(random_tensor<T>(s, rng));
  auto v = to_backend<T, L>(random_tensor<T>(s, rng)), g = to_backend<T, L>(random_tensor<T>(s, rng));
  auto gate = to_backend<T, L>(random_tensor<T>(Shape{H}, rng));
  for (auto pos : {PositionScheme::Learned, PositionScheme::Alibi}) {
    auto a = poisoned<T, L>(s), b = poisoned<T, L>(s), c = poisoned<T, L>(s);
    auto x = poisoned<T, L>(s), y = poisoned<T, L>(s), z = poisoned<T, L>(s);
    ops::causal_attention_backward(a.view(), b.view(), c.view(), cview(g), cview(q), cview(k), cview(v), pos);
    Tensor<T, L> empty_mem(Shape{Tn, H, 0, dh});
    ops::memory_attention_backward<GatedFusion>(x.view(), y.view(), z.view(), TensorView<T, L>{}, cview(g), cview(q),
                                                cview(k), cview(v), cview(empty_mem), cview(empty_mem), cview(gate), pos);
    CHECK(bitwise_equal(to_double(a), to_double(x)));
    CHECK(bitwise_equal(to_double(b), to_double(y)));
    CHECK(bitwise_equal(to_double(c), to_double(z)));
  }
}

TEST_CASE("ops backward: attention gradients with more threads than heads (per-group d_k, d_v) match one thread",
          "[ops][backward]") {
#if defined(_OPENMP)
  // With more threads than heads the local pass splits each head's query blocks into groups that
  // accumulate d_k and d_v in their own buffers; one thread takes the per-head path the finite-
  // difference test checks. T 300 crosses five 64-query blocks; T 64 is one block, so there is one
  // group and fewer jobs (heads) than threads: each thread needs its own scratch row (a heap
  // overflow once, seen under ASan with OpenMP). float64, so only rounding differs.
  const std::uint64_t seed = base_seed() + 11;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  const index_t Tn = GENERATE(300, 64), H = 2, dh = 16, K = 6;
  CAPTURE(Tn);
  const Shape s{Tn, H, dh}, ms{Tn, H, K, dh};
  auto q = cast<double>(random_tensor<double>(s, rng, -2, 2)), k = cast<double>(random_tensor<double>(s, rng, -2, 2));
  auto v = cast<double>(random_tensor<double>(s, rng)), go = cast<double>(random_tensor<double>(s, rng));
  auto mk = cast<double>(random_tensor<double>(ms, rng, -2, 2)), mv = cast<double>(random_tensor<double>(ms, rng));
  auto gate = cast<double>(random_tensor<double>(Shape{H}, rng, -2, 2));
  const int saved = omp_get_max_threads();
  for (int mode = 0; mode < 3; ++mode) {
    for (auto pos : {PositionScheme::Learned, PositionScheme::Alibi}) {
      std::vector<HostD> results;
      for (int threads : {1, 5}) {
        omp_set_num_threads(threads);
        auto dq = poisoned<double, Host>(s), dk = poisoned<double, Host>(s), dv = poisoned<double, Host>(s);
        HostD dgate(Shape{H});
        fill(dgate.view(), 0.0);
        if (mode == 0) {
          ops::causal_attention_backward(dq.view(), dk.view(), dv.view(), cview(go), cview(q), cview(k), cview(v), pos);
        } else if (mode == 1) {
          ops::memory_attention_backward<GatedFusion>(dq.view(), dk.view(), dv.view(), dgate.view(), cview(go), cview(q),
                                                      cview(k), cview(v), cview(mk), cview(mv), cview(gate), pos);
        } else {
          ops::memory_attention_backward<JointFusion>(dq.view(), dk.view(), dv.view(), TensorView<double, Host>{},
                                                      cview(go), cview(q), cview(k), cview(v), cview(mk), cview(mv),
                                                      cview(gate), pos);
        }
        for (auto* t : {&dq, &dk, &dv, &dgate}) results.push_back(std::move(*t));
      }
      omp_set_num_threads(saved);
      for (std::size_t i = 0; i < 4; ++i) {
        const HostD &one = results[i], &many = results[4 + i];
        double max_ref = 0, max_err = 0;
        bool finite = true;
        for (index_t j = 0; j < one.numel(); ++j) {
          finite = finite && std::isfinite(many.data()[j]) && std::isfinite(one.data()[j]);
          max_ref = std::max(max_ref, std::abs(one.data()[j]));
          max_err = std::max(max_err, std::abs(many.data()[j] - one.data()[j]));
        }
        CAPTURE(mode, static_cast<int>(pos), i, max_err, max_ref);
        CHECK(finite);
        CHECK(max_err <= 1e-12 * max_ref + 1e-300);
      }
    }
  }
#else
  SUCCEED("built without OpenMP: one thread only");
#endif
}

TEMPLATE_LIST_TEST_CASE("ops: gelu out of place equals gelu in place, bit for bit", "[ops]", Combos) {
  using T = typename TestType::T;
  using L = typename TestType::L;
  std::mt19937_64 rng(base_seed() + 3);
  for (auto act : {Activation::GeluTanh, Activation::GeluErf}) {
    const HostD x = random_tensor<T>(Shape{3, 4097}, rng, -6, 6);
    auto in_place = to_backend<T, L>(x), src = to_backend<T, L>(x);
    auto out = poisoned<T, L>(Shape{3, 4097});
    ops::gelu(in_place.view(), act);
    ops::gelu(out.view(), cview(src), act);
    CHECK(bitwise_equal(to_double(in_place), to_double(out)));
    CHECK(bitwise_equal(to_double(src), x));  // the input is left as it was
  }
}

TEMPLATE_LIST_TEST_CASE("ops backward: wrong shapes and aliased buffers are refused with a sentence", "[ops][backward][errors]",
                        Combos) {
  using T = typename TestType::T;
  using L = typename TestType::L;
  std::mt19937_64 rng(base_seed() + 11);
  auto x = to_backend<T, L>(random_tensor<T>(Shape{4, 6}, rng));
  auto w = to_backend<T, L>(random_tensor<T>(Shape{3, 6}, rng));
  auto g = to_backend<T, L>(random_tensor<T>(Shape{4, 3}, rng));
  auto dx = poisoned<T, L>(Shape{4, 5});
  auto dw = poisoned<T, L>(Shape{3, 6});
  auto dw_wrong = poisoned<T, L>(Shape{3, 5});
  auto check_throws = [](auto&& f, const char* part) {
    std::string what;
    try {
      f();
    } catch (const Error& e) {
      what = e.what();
    }
    CAPTURE(what, part);
    CHECK_THAT(what, Catch::Matchers::Contains(part));
  };
  check_throws([&] { ops::linear_backward(dx.view(), dw.view(), TensorView<T, L>{}, cview(g), cview(x), cview(w)); },
               "linear_backward: d_in");
  check_throws([&] { ops::linear_backward(TensorView<T, L>{}, dw_wrong.view(), TensorView<T, L>{}, cview(g), cview(x), cview(w)); },
               "linear_backward: d_weight");
  check_throws([&] { ops::linear_backward(TensorView<T, L>{}, x.view().slice(0, 3), TensorView<T, L>{}, cview(g), cview(x), cview(w)); },
               "overlaps");
  check_throws([&] { ops::layer_norm_backward(x.view(), TensorView<T, L>{}, TensorView<T, L>{}, cview(x), cview(x), cview(w).reshape({18}), 1e-5); },
               "layer_norm_backward");
  auto q = to_backend<T, L>(random_tensor<T>(Shape{5, 2, 3}, rng));
  auto dq = poisoned<T, L>(Shape{5, 2, 3});
  check_throws([&] { ops::causal_attention_backward(dq.view(), dq.view(), dq.view(), cview(q), cview(q), cview(q), cview(q), PositionScheme::Alibi); },
               "separate");
  auto dk = poisoned<T, L>(Shape{5, 2, 3}), dv = poisoned<T, L>(Shape{5, 2, 3});
  const std::vector<index_t> short_offsets{0, 3}, falling{0, 4, 2, 5};
  check_throws([&] { ops::causal_attention_backward(dq.view(), dk.view(), dv.view(), cview(q), cview(q), cview(q), cview(q), PositionScheme::Alibi, std::span<const index_t>(short_offsets)); },
               "causal_attention_backward: offsets must run from 0 to the 5 rows");
  check_throws([&] { ops::causal_attention_backward(dq.view(), dk.view(), dv.view(), cview(q), cview(q), cview(q), cview(q), PositionScheme::Alibi, std::span<const index_t>(falling)); },
               "offsets decrease at sequence 1");
  std::vector<std::int32_t> bad{0, 9};
  auto logits = to_backend<T, L>(random_tensor<T>(Shape{2, 4}, rng));
  auto dl = poisoned<T, L>(Shape{2, 4});
  check_throws([&] { ops::cross_entropy_backward(dl.view(), cview(logits), bad, 1.0); }, "target 9");
}
