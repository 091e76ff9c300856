// The op table against the float64 reference, for every backend and compute type.
//
// Adding a backend adds no test code here beyond one Transfer<L> specialisation (how to
// move a host tensor there and back) and one entry per dtype in Combos: every op case,
// behaviour test and error test is templated on (T, L).
//
// Tolerances: max |out - ref| <= atol + rtol * max |ref| per output, stated in each case.
// Inputs are drawn in double and rounded to T first, so the reference sees exactly the
// values the backend sees and only the computation is compared. Double: atol = rtol = 1e-12.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "longmem/cpu/ops.hpp"
#include "longmem/reference/ops.hpp"
#include "op_test_support.hpp"

namespace {

using namespace longmem;
using namespace longmem::test;

const char* fusion_name(int f) { return f == 0 ? "gated" : "joint"; }

// ---------------------------------------------------------------- the op table

/// Sizes and switches of one case; each op reads the fields it needs.
struct Params {
  index_t T = 1, H = 1, dh = 1, K = 0, N = 1, I = 1, O = 1, V = 1, C = 1;
  PositionScheme pos = PositionScheme::Learned;
  int variant = 0;  // op-specific switch (bias on/off, gate pattern, input layout, ...)
  int fusion = 0;   // 0 gated, 1 joint

  std::string str() const {
    std::ostringstream os;
    os << "T=" << T << " H=" << H << " dh=" << dh << " K=" << K << " N=" << N << " I=" << I << " O=" << O
       << " V=" << V << " C=" << C << " pos=" << to_string(pos) << " variant=" << variant
       << " fusion=" << fusion_name(fusion);
    return os.str();
  }
};

/// Inputs of one run, as doubles already representable in T.
struct Inputs {
  std::vector<HostD> x;
  std::vector<std::int32_t> tokens;
};

template <class T, class L>
struct OpCase {
  std::string name;
  std::vector<Params> sizes;
  std::function<Inputs(const Params&, std::mt19937_64&)> make;
  std::function<std::vector<HostD>(const Params&, const Inputs&)> run;        // on backend L, in T
  std::function<std::vector<HostD>(const Params&, const Inputs&)> reference;  // float64 loops
  std::vector<Tolerance> tolerance;                                           // one per output
};

/// Gate logits per head: moderate random ones, or large +/- ones (saturated sigmoid).
template <class T>
HostD gate_logits(const Params& p, std::mt19937_64& rng) {
  HostD g = random_tensor<T>(Shape{p.H}, rng, -3, 3);
  if (p.variant % 3 != 0) {
    const double sign = p.variant % 3 == 1 ? 1 : -1;
    for (index_t h = 0; h < p.H; ++h) g(h) = sign * (h % 2 == 0 ? 35.0 : -30.0);
  }
  return g;
}

template <class T, class L>
std::vector<OpCase<T, L>> op_table() {
  using CV = TensorView<const T, L>;
  std::vector<OpCase<T, L>> table;
  const index_t seq[] = {1, 2, 7, 64, 257};

  {  // embedding: exact sums, one rounding in float
    OpCase<T, L> c;
    c.name = "embedding";
    for (index_t T_ : seq)
      for (index_t d : {1, 16, 65})
        for (int with_wpe : {0, 1}) {
          Params p;
          p.T = T_, p.C = d, p.V = 50, p.variant = with_wpe;
          c.sizes.push_back(p);
        }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      in.x.push_back(random_tensor<T>(Shape{p.V, p.C}, rng));
      in.x.push_back(p.variant ? random_tensor<T>(Shape{p.T + 3, p.C}, rng) : HostD());
      std::uniform_int_distribution<std::int32_t> tok(0, static_cast<std::int32_t>(p.V - 1));
      for (index_t t = 0; t < p.T; ++t) in.tokens.push_back(tok(rng));
      return in;
    };
    c.run = [](const Params& p, const Inputs& in) {
      auto wte = to_backend<T, L>(in.x[0]);
      auto wpe = to_backend<T, L>(in.x[1]);
      auto out = poisoned<T, L>(Shape{p.T, p.C});
      ops::embedding(out.view(), std::span<const std::int32_t>(in.tokens), cview(wte),
                     p.variant ? cview(wpe) : CV{});
      return outputs(to_double(out));
    };
    c.reference = [](const Params&, const Inputs& in) {
      return outputs(reference::embedding(in.tokens, in.x[0], in.x[1]));
    };
    c.tolerance = {tol<T>(0, 1e-6)};
    table.push_back(std::move(c));
  }

  {  // layer_norm: statistics in double, one rounding of the output in float
    OpCase<T, L> c;
    c.name = "layer_norm";
    for (index_t N : seq)
      for (index_t C : {1, 16, 67})
        for (int variant : {0, 1, 2}) {
          Params p;
          p.N = N, p.C = C, p.variant = variant;  // 0: bias, 1: no bias, 2: (N, C/4, 4) input, offset mean
          if (variant == 2 && C % 4 != 0) continue;
          c.sizes.push_back(p);
        }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      const double offset = p.variant == 2 ? 30 : 0;  // a large mean tests the two-pass variance
      in.x.push_back(random_tensor<T>(Shape{p.N, p.C}, rng, offset - 2, offset + 2));
      in.x.push_back(random_tensor<T>(Shape{p.C}, rng, 0.5, 1.5));
      in.x.push_back(p.variant == 1 ? HostD() : random_tensor<T>(Shape{p.C}, rng));
      return in;
    };
    c.run = [](const Params& p, const Inputs& in) {
      auto x = to_backend<T, L>(in.x[0]);
      auto w = to_backend<T, L>(in.x[1]);
      auto b = to_backend<T, L>(in.x[2]);
      const Shape s = p.variant == 2 ? Shape{p.N, p.C / 4, 4} : Shape{p.N, p.C};
      auto out = poisoned<T, L>(s);
      ops::layer_norm(out.view(), cview(x).reshape(s), cview(w), p.variant == 1 ? CV{} : cview(b), 1e-5);
      return outputs(reshaped(to_double(out), Shape{p.N, p.C}));
    };
    c.reference = [](const Params& p, const Inputs& in) {
      HostD zero(Shape{p.C});
      fill<double>(zero.view(), 0.0);
      auto r = reference::layer_norm(in.x[0], in.x[1], p.variant == 1 ? cview(zero) : cview(in.x[2]), 1e-5);
      return outputs(std::move(r));
    };
    c.tolerance = {tol<T>(1e-6, 1e-6)};
    table.push_back(std::move(c));
  }

  {  // linear: float GEMM, I up to 67 terms per output
    OpCase<T, L> c;
    c.name = "linear";
    for (index_t N : seq)
      for (index_t I : {1, 16, 67})
        for (index_t O : {1, 33})
          for (int variant : {0, 1, 2, 3}) {
            // bit 0: bias; bit 1: accumulate into a non-zero out, input given as (N, 1, I)
            Params p;
            p.N = N, p.I = I, p.O = O, p.variant = variant;
            c.sizes.push_back(p);
          }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      in.x.push_back(random_tensor<T>(Shape{p.N, p.I}, rng));
      in.x.push_back(random_tensor<T>(Shape{p.O, p.I}, rng));
      in.x.push_back(random_tensor<T>(Shape{p.O}, rng));
      in.x.push_back(random_tensor<T>(Shape{p.N, p.O}, rng));  // start value when accumulating
      return in;
    };
    c.run = [](const Params& p, const Inputs& in) {
      const bool bias = p.variant & 1, acc = p.variant & 2;
      auto x = to_backend<T, L>(in.x[0]);
      auto w = to_backend<T, L>(in.x[1]);
      auto b = to_backend<T, L>(in.x[2]);
      auto out = acc ? to_backend<T, L>(in.x[3]) : poisoned<T, L>(Shape{p.N, p.O});
      const CV xin = acc ? cview(x).reshape(Shape{p.N, 1, p.I}) : cview(x);
      ops::linear(out.view(), xin, cview(w), bias ? cview(b) : CV{}, acc ? Accumulate::Yes : Accumulate::No);
      return outputs(to_double(out));
    };
    c.reference = [](const Params& p, const Inputs& in) {
      const bool bias = p.variant & 1, acc = p.variant & 2;
      return outputs(reference::linear(in.x[0], in.x[1], bias ? cview(in.x[2]) : reference::View{},
                                           acc ? cview(in.x[3]) : reference::View{}));
    };
    c.tolerance = {tol<T>(1e-6, 1e-5)};
    table.push_back(std::move(c));
  }

  {  // linear_gelu: the fused MLP input layer; bit 0: bias, bit 1: erf form
    OpCase<T, L> c;
    c.name = "linear_gelu";
    for (index_t N : seq)
      for (index_t I : {1, 16, 67})
        for (index_t O : {1, 33})
          for (int variant : {0, 1, 2, 3}) {
            Params p;
            p.N = N, p.I = I, p.O = O, p.variant = variant;
            c.sizes.push_back(p);
          }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      in.x.push_back(random_tensor<T>(Shape{p.N, p.I}, rng, -2, 2));  // pre-activations across GELU's bend
      in.x.push_back(random_tensor<T>(Shape{p.O, p.I}, rng));
      in.x.push_back(random_tensor<T>(Shape{p.O}, rng));
      return in;
    };
    auto kind = [](const Params& p) { return p.variant & 2 ? Activation::GeluErf : Activation::GeluTanh; };
    c.run = [kind](const Params& p, const Inputs& in) {
      auto x = to_backend<T, L>(in.x[0]);
      auto w = to_backend<T, L>(in.x[1]);
      auto b = to_backend<T, L>(in.x[2]);
      auto out = poisoned<T, L>(Shape{p.N, p.O});
      ops::linear_gelu(out.view(), cview(x), cview(w), p.variant & 1 ? cview(b) : CV{}, kind(p));
      return outputs(to_double(out));
    };
    c.reference = [kind](const Params& p, const Inputs& in) {
      const auto pre = reference::linear(in.x[0], in.x[1], p.variant & 1 ? cview(in.x[2]) : reference::View{},
                                         reference::View{});
      return outputs(reference::gelu(cview(pre), kind(p)));
    };
    c.tolerance = {tol<T>(1e-6, 1e-5)};
    table.push_back(std::move(c));
  }

  {  // gelu, both forms, in place
    OpCase<T, L> c;
    c.name = "gelu";
    for (index_t N : {1, 7, 257, 9000})
      for (int kind : {0, 1}) {
        Params p;
        p.N = N, p.variant = kind;
        c.sizes.push_back(p);
      }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      in.x.push_back(random_tensor<T>(Shape{p.N}, rng, -6, 6));
      return in;
    };
    auto kind = [](const Params& p) { return p.variant ? Activation::GeluErf : Activation::GeluTanh; };
    c.run = [kind](const Params& p, const Inputs& in) {
      auto x = to_backend<T, L>(in.x[0]);
      ops::gelu(x.view(), kind(p));
      return outputs(to_double(x));
    };
    c.reference = [kind](const Params& p, const Inputs& in) { return outputs(reference::gelu(in.x[0], kind(p))); };
    c.tolerance = {tol<T>(1e-6, 1e-6)};
    table.push_back(std::move(c));
  }

  {  // add and add_difference, in place; variant 1 gives the input as (N, 4, C/4)
    OpCase<T, L> c;
    c.name = "add / add_difference";
    for (index_t N : seq)
      for (index_t C : {1, 16, 67})
        for (int variant : {0, 1, 2, 3}) {
          Params p;
          p.N = N, p.C = C, p.variant = variant;  // bit 0: add_difference; bit 1: reshaped input
          if ((variant & 2) && C % 4 != 0) continue;
          c.sizes.push_back(p);
        }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      for (int i = 0; i < 3; ++i) in.x.push_back(random_tensor<T>(Shape{p.N, p.C}, rng));
      return in;
    };
    c.run = [](const Params& p, const Inputs& in) {
      auto out = to_backend<T, L>(in.x[0]);
      auto a = to_backend<T, L>(in.x[1]);
      auto b = to_backend<T, L>(in.x[2]);
      const Shape s = (p.variant & 2) ? Shape{p.N, 4, p.C / 4} : Shape{p.N, p.C};
      if (p.variant & 1) {
        ops::add_difference(out.view(), cview(a).reshape(s), cview(b).reshape(s));
      } else {
        ops::add(out.view(), cview(a).reshape(s));
      }
      return outputs(to_double(out));
    };
    c.reference = [](const Params& p, const Inputs& in) {
      return outputs((p.variant & 1) ? reference::add_difference(in.x[0], in.x[1], in.x[2])
                                         : reference::add(in.x[0], in.x[1]));
    };
    c.tolerance = {tol<T>(0, 1e-6)};
    table.push_back(std::move(c));
  }

  auto attention_sizes = [&](bool memory) {
    std::vector<Params> sizes;
    int n = 0;
    for (index_t T_ : seq)
      for (index_t H : {1, 4})
        for (index_t dh : {1, 16, 64})
          for (index_t K : memory ? std::vector<index_t>{0, 1, 8} : std::vector<index_t>{0})
            for (auto pos : {PositionScheme::Learned, PositionScheme::Alibi})
              for (int fusion : memory ? std::vector<int>{0, 1} : std::vector<int>{0}) {
                Params p;
                p.T = T_, p.H = H, p.dh = dh, p.K = K, p.pos = pos, p.fusion = fusion;
                p.variant = n++;  // cycles the gate pattern (memory) or the out layout (causal)
                // T = 257 keeps every (H, dh, K) but only one of each 4 (position, fusion) pairs, in
                // rotation, to bound the run time under sanitizers; smaller T cover all pairs.
                if (memory && T_ > 64 && (p.variant / 4) % 4 != p.variant % 4) continue;
                sizes.push_back(p);
              }
    return sizes;
  };
  auto attention_inputs = [](const Params& p, std::mt19937_64& rng) {
    Inputs in;
    in.x.push_back(random_tensor<T>(Shape{p.T, p.H, p.dh}, rng, -3, 3));  // q: scores of a few units
    in.x.push_back(random_tensor<T>(Shape{p.T, p.H, p.dh}, rng));
    in.x.push_back(random_tensor<T>(Shape{p.T, p.H, p.dh}, rng));
    in.x.push_back(random_tensor<T>(Shape{p.T, p.H, p.K, p.dh}, rng));
    in.x.push_back(random_tensor<T>(Shape{p.T, p.H, p.K, p.dh}, rng));
    in.x.push_back(gate_logits<T>(p, rng));
    return in;
  };

  {  // causal_attention: scores and softmax in T, sums over up to 257 keys
    OpCase<T, L> c;
    c.name = "causal_attention";
    c.sizes = attention_sizes(false);
    c.make = attention_inputs;
    c.run = [](const Params& p, const Inputs& in) {
      auto q = to_backend<T, L>(in.x[0]);
      auto k = to_backend<T, L>(in.x[1]);
      auto v = to_backend<T, L>(in.x[2]);
      // odd variants write a (T, H*dh) output: the layout is the same
      auto out = poisoned<T, L>(p.variant % 2 ? Shape{p.T, p.H * p.dh} : Shape{p.T, p.H, p.dh});
      ops::causal_attention(out.view(), cview(q), cview(k), cview(v), p.pos);
      return outputs(to_double(out));
    };
    c.reference = [](const Params& p, const Inputs& in) {
      HostD r = reference::causal_attention(in.x[0], in.x[1], in.x[2], p.pos);
      return outputs(p.variant % 2 ? reshaped(r, Shape{p.T, p.H * p.dh}) : std::move(r));
    };
    c.tolerance = {tol<T>(1e-6, 1e-5)};
    table.push_back(std::move(c));
  }

  {  // memory_attention, both fusions, K in {0, 1, 8}, gates moderate and saturated
    OpCase<T, L> c;
    c.name = "memory_attention";
    c.sizes = attention_sizes(true);
    c.make = attention_inputs;
    c.run = [](const Params& p, const Inputs& in) {
      auto q = to_backend<T, L>(in.x[0]);
      auto k = to_backend<T, L>(in.x[1]);
      auto v = to_backend<T, L>(in.x[2]);
      auto mk = to_backend<T, L>(in.x[3]);
      auto mv = to_backend<T, L>(in.x[4]);
      auto g = to_backend<T, L>(in.x[5]);
      auto out = poisoned<T, L>(Shape{p.T, p.H, p.dh});
      if (p.fusion == 0) {
        ops::memory_attention<GatedFusion>(out.view(), cview(q), cview(k), cview(v), cview(mk), cview(mv), cview(g), p.pos);
      } else {
        ops::memory_attention<JointFusion>(out.view(), cview(q), cview(k), cview(v), cview(mk), cview(mv), cview(g), p.pos);
      }
      return outputs(to_double(out));
    };
    c.reference = [](const Params& p, const Inputs& in) {
      const auto& x = in.x;
      return outputs(p.fusion == 0 ? reference::memory_attention_gated(x[0], x[1], x[2], x[3], x[4], x[5], p.pos)
                                       : reference::memory_attention_joint(x[0], x[1], x[2], x[3], x[4], p.pos));
    };
    c.tolerance = {tol<T>(1e-6, 1e-5)};
    table.push_back(std::move(c));
  }

  {  // cross_entropy: outputs are {sum}, {count}, per-token losses (float storage)
    OpCase<T, L> c;
    c.name = "cross_entropy";
    for (index_t T_ : seq)
      for (index_t V : {1, 5, 1000})
        for (int variant : {0, 1}) {  // 1: some targets are -1 and no losses buffer is checked... both ways
          Params p;
          p.T = T_, p.V = V, p.variant = variant;
          c.sizes.push_back(p);
        }
    c.make = [](const Params& p, std::mt19937_64& rng) {
      Inputs in;
      in.x.push_back(random_tensor<T>(Shape{p.T, p.V}, rng, -8, 8));
      std::uniform_int_distribution<std::int32_t> tok(0, static_cast<std::int32_t>(p.V - 1));
      for (index_t t = 0; t < p.T; ++t) in.tokens.push_back(p.variant && t % 3 == 1 ? -1 : tok(rng));
      return in;
    };
    c.run = [](const Params& p, const Inputs& in) {
      auto logits = to_backend<T, L>(in.x[0]);
      auto losses = poisoned<float, L>(Shape{p.T});
      auto [sum, count] = ops::cross_entropy<T, L>(cview(logits), in.tokens, losses.view());
      return outputs(scalar_tensor({sum}), scalar_tensor({double(count)}), to_double(losses));
    };
    c.reference = [](const Params& p, const Inputs& in) {
      auto r = reference::cross_entropy(in.x[0], in.tokens);
      HostD losses(Shape{p.T});
      std::copy(r.losses.begin(), r.losses.end(), losses.begin());
      return outputs(scalar_tensor({r.sum}), scalar_tensor({double(r.count)}), std::move(losses));
    };
    // the sum is accumulated in double for both types; losses are stored as float
    c.tolerance = {{1e-12, 1e-12}, {0, 0}, {1e-6, 1e-6}};
    table.push_back(std::move(c));
  }

  return table;
}

// ---------------------------------------------------------------- error helper

template <class E, class F>
void require_throws(F&& f, std::vector<std::string> parts) {
  bool thrown = false;
  std::string what;
  try {
    f();
  } catch (const E& e) {
    thrown = true;
    what = e.what();
  }
  CAPTURE(what);
  REQUIRE(thrown);
  for (const auto& part : parts) CHECK_THAT(what, Catch::Matchers::Contains(part));
}

}  // namespace

// ================================================================ the table

TEMPLATE_LIST_TEST_CASE("ops: every op matches the float64 reference", "[ops]", Combos) {
  using T = typename TestType::T;
  using L = typename TestType::L;
  const auto table = op_table<T, L>();
  const std::size_t which = GENERATE(range<std::size_t>(0, 9));
  REQUIRE(table.size() == 9);
  const auto& op = table[which];
  for (std::size_t i = 0; i < op.sizes.size(); ++i) {
    const Params& p = op.sizes[i];
    const std::uint64_t seed = base_seed() + 1000003 * which + i;
    std::mt19937_64 rng(seed);
    const Inputs in = op.make(p, rng);
    const auto got = op.run(p, in);
    const auto ref = op.reference(p, in);
    REQUIRE(got.size() == ref.size());
    REQUIRE(op.tolerance.size() == ref.size());
    for (std::size_t o = 0; o < ref.size(); ++o) {
      const Comparison cmp = compare(got[o], ref[o], op.tolerance[o]);
      const std::string params = p.str();
      const std::string result = cmp.str();
      CAPTURE(op.name, params, seed, o, result);
      CHECK(got[o].shape() == ref[o].shape());
      CHECK(cmp.ok);
    }
  }
}

// ================================================================ behaviour

TEMPLATE_LIST_TEST_CASE("ops: memory_attention with K = 0 is exactly causal_attention", "[ops][attention]", Combos) {
  using T = typename TestType::T;
  using L = typename TestType::L;
  using CV = TensorView<const T, L>;
  const index_t n_tok = GENERATE(1, 7, 257);
  const index_t H = GENERATE(1, 4);
  const index_t dh = GENERATE(1, 64);
  const auto pos = GENERATE(PositionScheme::Learned, PositionScheme::Alibi);
  const std::uint64_t seed = base_seed() + static_cast<std::uint64_t>(n_tok * 131 + H * 7 + dh);
  CAPTURE(n_tok, H, dh, to_string(pos), seed);
  std::mt19937_64 rng(seed);
  auto q = to_backend<T, L>(random_tensor<T>(Shape{n_tok, H, dh}, rng, -3, 3));
  auto k = to_backend<T, L>(random_tensor<T>(Shape{n_tok, H, dh}, rng));
  auto v = to_backend<T, L>(random_tensor<T>(Shape{n_tok, H, dh}, rng));
  auto g = to_backend<T, L>(random_tensor<T>(Shape{H}, rng, -3, 3));
  auto empty_mem = poisoned<T, L>(Shape{n_tok, H, 0, dh});

  auto a = poisoned<T, L>(Shape{n_tok, H, dh});
  ops::causal_attention(a.view(), cview(q), cview(k), cview(v), pos);
  const HostD A = to_double(a);

  for (int fusion : {0, 1}) {
    for (bool absent_memory : {false, true}) {
      CAPTURE(fusion_name(fusion), absent_memory);
      const CV mk = absent_memory ? CV{} : cview(empty_mem);
      auto out = poisoned<T, L>(Shape{n_tok, H, dh});
      if (fusion == 0) {
        ops::memory_attention<GatedFusion>(out.view(), cview(q), cview(k), cview(v), mk, mk, cview(g), pos);
      } else {
        ops::memory_attention<JointFusion>(out.view(), cview(q), cview(k), cview(v), mk, mk, CV{}, pos);
      }
      CHECK(bitwise_equal(to_double(out), A));
    }
  }
}

TEMPLATE_LIST_TEST_CASE("ops: gated fusion at saturated gates is the local or the memory branch", "[ops][attention]",
                        Combos) {
  using T = typename TestType::T;
  using L = typename TestType::L;
  const index_t n_tok = GENERATE(1, 7, 64);
  const index_t H = GENERATE(1, 4);
  const index_t K = GENERATE(1, 8);
  const double gate = GENERATE(-std::numeric_limits<double>::infinity(), -200.0, 200.0,
                               std::numeric_limits<double>::infinity());
  const index_t dh = 16;
  const auto pos = PositionScheme::Alibi;
  const std::uint64_t seed = base_seed() + static_cast<std::uint64_t>(n_tok * 31 + H * 7 + K);
  CAPTURE(n_tok, H, K, gate, seed);
  std::mt19937_64 rng(seed);
  const HostD q = random_tensor<T>(Shape{n_tok, H, dh}, rng, -3, 3);
  const HostD k = random_tensor<T>(Shape{n_tok, H, dh}, rng);
  const HostD v = random_tensor<T>(Shape{n_tok, H, dh}, rng);
  const HostD mk = random_tensor<T>(Shape{n_tok, H, K, dh}, rng);
  const HostD mv = random_tensor<T>(Shape{n_tok, H, K, dh}, rng);
  HostD g(Shape{H});
  fill<double>(g.view(), gate);

  auto bq = to_backend<T, L>(q), bk = to_backend<T, L>(k), bv = to_backend<T, L>(v);
  auto bmk = to_backend<T, L>(mk), bmv = to_backend<T, L>(mv), bg = to_backend<T, L>(g);
  auto out = poisoned<T, L>(Shape{n_tok, H, dh});
  ops::memory_attention<GatedFusion>(out.view(), cview(bq), cview(bk), cview(bv), cview(bmk), cview(bmv), cview(bg), pos);
  const HostD got = to_double(out);

  if (gate < 0) {  // -> A: the backend's own causal attention
    auto a = poisoned<T, L>(Shape{n_tok, H, dh});
    ops::causal_attention(a.view(), cview(bq), cview(bk), cview(bv), pos);
    const Comparison c = compare(got, to_double(a), tol<T>(0, 1e-6));
    CAPTURE(c.str());
    CHECK(c.ok);
  } else {  // -> M: memory softmax only, from the reference
    const Comparison c = compare(got, reference::memory_branch(q, mk, mv), tol<T>(1e-6, 1e-5));
    CAPTURE(c.str());
    CHECK(c.ok);
  }
  // and neither branch alone would pass the other check: the two differ
  const Comparison apart = compare(reference::memory_branch(q, mk, mv), reference::causal_attention(q, k, v, pos),
                                   tol<T>(1e-6, 1e-5));
  CHECK_FALSE(apart.ok);
}

TEMPLATE_LIST_TEST_CASE("ops: a future key or value never changes an earlier output", "[ops][attention]", Combos) {
  using T = typename TestType::T;
  using L = typename TestType::L;
  const index_t n_tok = GENERATE(7, 64, 257);
  const index_t H = 4, dh = 16, K = 8;
  const auto pos = GENERATE(PositionScheme::Learned, PositionScheme::Alibi);
  const std::uint64_t seed = base_seed() + static_cast<std::uint64_t>(n_tok);
  std::mt19937_64 rng(seed);
  const index_t t_cut = std::uniform_int_distribution<index_t>(0, n_tok - 2)(rng);
  CAPTURE(n_tok, to_string(pos), seed, t_cut);

  HostD q = random_tensor<T>(Shape{n_tok, H, dh}, rng, -3, 3);
  HostD k = random_tensor<T>(Shape{n_tok, H, dh}, rng);
  HostD v = random_tensor<T>(Shape{n_tok, H, dh}, rng);
  HostD mk = random_tensor<T>(Shape{n_tok, H, K, dh}, rng);
  HostD mv = random_tensor<T>(Shape{n_tok, H, K, dh}, rng);
  HostD g = random_tensor<T>(Shape{H}, rng, -2, 2);

  // kind 0: causal, 1: gated, 2: joint; returns the output rows
  auto run = [&](int kind, const HostD& k_, const HostD& v_, const HostD& mk_, const HostD& mv_) {
    auto bq = to_backend<T, L>(q), bk = to_backend<T, L>(k_), bv = to_backend<T, L>(v_);
    auto bmk = to_backend<T, L>(mk_), bmv = to_backend<T, L>(mv_), bg = to_backend<T, L>(g);
    auto out = poisoned<T, L>(Shape{n_tok, H, dh});
    if (kind == 0) ops::causal_attention(out.view(), cview(bq), cview(bk), cview(bv), pos);
    if (kind == 1)
      ops::memory_attention<GatedFusion>(out.view(), cview(bq), cview(bk), cview(bv), cview(bmk), cview(bmv), cview(bg), pos);
    if (kind == 2)
      ops::memory_attention<JointFusion>(out.view(), cview(bq), cview(bk), cview(bv), cview(bmk), cview(bmv), cview(bg), pos);
    return to_double(out);
  };

  // perturb keys, values and the later queries' retrieved memory after t_cut, by large finite amounts
  HostD k2 = random_tensor<T>(Shape{n_tok, H, dh}, rng), v2 = random_tensor<T>(Shape{n_tok, H, dh}, rng);
  HostD mk2 = random_tensor<T>(Shape{n_tok, H, K, dh}, rng), mv2 = random_tensor<T>(Shape{n_tok, H, K, dh}, rng);
  const index_t row = H * dh, mem_row = H * K * dh;
  for (index_t i = 0; i < n_tok * row; ++i) {
    if (i / row <= t_cut) k2.data()[i] = k.data()[i], v2.data()[i] = v.data()[i];
    else k2.data()[i] *= 50, v2.data()[i] *= 50;
  }
  for (index_t i = 0; i < n_tok * mem_row; ++i) {
    if (i / mem_row <= t_cut) mk2.data()[i] = mk.data()[i], mv2.data()[i] = mv.data()[i];
  }

  for (int kind : {0, 1, 2}) {
    CAPTURE(kind);
    const HostD before = run(kind, k, v, mk, mv);
    const HostD after = run(kind, k2, v2, mk2, mv2);
    const auto prefix = Shape{t_cut + 1, H, dh};
    HostD b(prefix), a(prefix);
    copy<double>(cview(before).slice(0, t_cut + 1), b.view());
    copy<double>(cview(after).slice(0, t_cut + 1), a.view());
    CHECK(bitwise_equal(a, b));
    // the perturbation is real: the last row moves
    HostD bl(Shape{1, H, dh}), al(Shape{1, H, dh});
    copy<double>(cview(before).slice(n_tok - 1, n_tok), bl.view());
    copy<double>(cview(after).slice(n_tok - 1, n_tok), al.view());
    CHECK_FALSE(bitwise_equal(al, bl));
  }
}

TEMPLATE_LIST_TEST_CASE("ops: attention stays finite and accurate with scores in the thousands", "[ops][attention]",
                        Combos) {
  // Memory keys aligned with the query give memory scores of ~1e3, far above the local ones and
  // beyond exp's range in float (88) and double (709): only subtracting the maximum over every
  // score that shares a softmax keeps the result finite. Float rounding of scores that large
  // moves the exponents by ~1e-5 (measured max error 8e-6), hence float rtol 1e-4 here.
  using T = typename TestType::T;
  using L = typename TestType::L;
  const index_t n_tok = GENERATE(1, 7, 64);
  const auto pos = GENERATE(PositionScheme::Learned, PositionScheme::Alibi);
  const index_t H = 4, dh = 16, K = 8;
  const std::uint64_t seed = base_seed() + 77 * static_cast<std::uint64_t>(n_tok);
  CAPTURE(n_tok, to_string(pos), seed);
  std::mt19937_64 rng(seed);
  const HostD q = random_tensor<T>(Shape{n_tok, H, dh}, rng, -3, 3);
  const HostD k = random_tensor<T>(Shape{n_tok, H, dh}, rng, -60, 60);  // local scores up to a few hundred
  const HostD v = random_tensor<T>(Shape{n_tok, H, dh}, rng);
  HostD mk = random_tensor<T>(Shape{n_tok, H, K, dh}, rng);
  const HostD mv = random_tensor<T>(Shape{n_tok, H, K, dh}, rng);
  const HostD g = random_tensor<T>(Shape{H}, rng, -2, 2);
  for (index_t t = 0; t < n_tok; ++t)
    for (index_t h = 0; h < H; ++h)
      for (index_t j = 0; j < K; ++j)
        for (index_t c = 0; c < dh; ++c) mk(t, h, j, c) = static_cast<double>(static_cast<T>((100.0 + j) * q(t, h, c)));

  auto bq = to_backend<T, L>(q), bk = to_backend<T, L>(k), bv = to_backend<T, L>(v);
  auto bmk = to_backend<T, L>(mk), bmv = to_backend<T, L>(mv), bg = to_backend<T, L>(g);
  const Tolerance t = tol<T>(1e-5, 1e-4);
  for (int kind : {0, 1, 2}) {
    CAPTURE(kind);
    auto out = poisoned<T, L>(Shape{n_tok, H, dh});
    HostD ref;
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
    const Comparison c = compare(to_double(out), ref, t);
    CAPTURE(c.str());
    CHECK(c.ok);
  }
}

// ================================================================ errors

TEMPLATE_LIST_TEST_CASE("ops: causal_attention over stacked sequences is each sequence's own attention",
                        "[ops][attention]", Combos) {
  using T = typename TestType::T;
  using L = typename TestType::L;
  std::mt19937_64 rng(base_seed() + 41);
  const index_t H = 3, dh = 5;
  for (const std::vector<index_t>& offsets : {std::vector<index_t>{0, 9}, std::vector<index_t>{0, 4, 4, 17, 18}}) {
    const index_t N = offsets.back();
    const HostD qd = random_tensor<T>(Shape{N, H, dh}, rng, -3, 3), kd = random_tensor<T>(Shape{N, H, dh}, rng),
                vd = random_tensor<T>(Shape{N, H, dh}, rng);
    auto q = to_backend<T, L>(qd), k = to_backend<T, L>(kd), v = to_backend<T, L>(vd);
    auto out = poisoned<T, L>(Shape{N, H, dh});
    ops::causal_attention(out.view(), cview(q), cview(k), cview(v), PositionScheme::Alibi, std::span<const index_t>(offsets));
    const HostD got = to_double(out);
    for (std::size_t b = 0; b + 1 < offsets.size(); ++b) {
      const index_t o0 = offsets[b], o1 = offsets[b + 1];
      if (o0 == o1) continue;
      const HostD want = reference::causal_attention(cview(qd).slice(o0, o1), cview(kd).slice(o0, o1),
                                                     cview(vd).slice(o0, o1), PositionScheme::Alibi);
      HostD part(want.shape());
      copy<double>(cview(got).slice(o0, o1), part.view());
      const Comparison cmp = compare(part, want, tol<T>(1e-6, 1e-5));
      INFO("sequence " << b << " rows [" << o0 << ", " << o1 << "): " << cmp.str());
      REQUIRE(cmp.ok);
    }
  }
  // Offsets that do not cover the rows, or run backwards, are refused before anything is written.
  auto q = to_backend<T, L>(random_tensor<T>(Shape{6, H, dh}, rng));
  auto out = poisoned<T, L>(Shape{6, H, dh});
  const std::vector<index_t> short_of{0, 5}, backwards{0, 4, 3, 6}, one{0};
  require_throws<ShapeError>([&] {
    ops::causal_attention(out.view(), cview(q), cview(q), cview(q), PositionScheme::Alibi, std::span<const index_t>(short_of));
  }, {"causal_attention: offsets", "6 rows", "to 5"});
  require_throws<ShapeError>([&] {
    ops::causal_attention(out.view(), cview(q), cview(q), cview(q), PositionScheme::Alibi, std::span<const index_t>(backwards));
  }, {"causal_attention: offsets decrease", "4 then 3"});
  require_throws<ShapeError>([&] {
    ops::causal_attention(out.view(), cview(q), cview(q), cview(q), PositionScheme::Alibi, std::span<const index_t>(one));
  }, {"causal_attention: offsets", "1 offsets given"});
  const HostD untouched = to_double(out);
  for (index_t i = 0; i < untouched.numel(); ++i) REQUIRE(std::isnan(untouched.data()[i]));
}

TEMPLATE_LIST_TEST_CASE("ops: embedding refuses bad segments with a sentence", "[ops][errors]", Combos) {
  using T = typename TestType::T;
  using L = typename TestType::L;
  using CV = TensorView<const T, L>;
  std::mt19937_64 rng(base_seed());
  auto wte = to_backend<T, L>(random_tensor<T>(Shape{50, 8}, rng));
  auto wpe = to_backend<T, L>(random_tensor<T>(Shape{4, 8}, rng));
  auto out = poisoned<T, L>(Shape{5, 8});
  std::vector<std::int32_t> tokens = {1, 2, 3, 50, 4};

  require_throws<InputError>([&] { ops::embedding(out.view(), tokens, cview(wte), CV{}); },
                             {"embedding", "token id 50", "position 3", "[0, 50)"});
  tokens[3] = -2;
  require_throws<InputError>([&] { ops::embedding(out.view(), tokens, cview(wte), CV{}); },
                             {"token id -2", "position 3"});
  // nothing was written before the refusal
  CHECK(std::isnan(to_double(out).data()[0]));

  tokens[3] = 7;
  require_throws<InputError>([&] { ops::embedding(out.view(), tokens, cview(wte), cview(wpe)); },
                             {"embedding", "5 tokens", "4 positions"});
  require_throws<InputError>(
      [&] { ops::embedding(out.view().slice(0, 0), std::span<const std::int32_t>(), cview(wte), CV{}); },
      {"embedding", "empty"});
  auto wrong = poisoned<T, L>(Shape{4, 8});
  require_throws<ShapeError>([&] { ops::embedding(wrong.view(), tokens, cview(wte), CV{}); },
                             {"embedding: out", "(5, 8)", "(4, 8)"});
}

TEMPLATE_LIST_TEST_CASE("ops: wrong shapes name the op and the argument", "[ops][errors]", Combos) {
  using T = typename TestType::T;
  using L = typename TestType::L;
  using CV = TensorView<const T, L>;
  std::mt19937_64 rng(base_seed());
  auto make = [&](Shape s) { return to_backend<T, L>(random_tensor<T>(s, rng)); };

  auto x = make(Shape{3, 6}), w = make(Shape{5, 6}), b = make(Shape{5}), y = make(Shape{3, 5});
  auto w_bad = make(Shape{5, 7}), b_bad = make(Shape{4}), y_bad = make(Shape{2, 5});
  require_throws<ShapeError>([&] { ops::linear(y.view(), cview(x), cview(w_bad), cview(b)); },
                             {"linear: in", "(3, 6)", "7"});
  require_throws<ShapeError>([&] { ops::linear(y.view(), cview(x), cview(w), cview(b_bad)); },
                             {"linear: bias", "(5)", "(4)"});
  require_throws<ShapeError>([&] { ops::linear(y_bad.view(), cview(x), cview(w), cview(b)); },
                             {"linear: out", "(3, 5)", "(2, 5)"});
  require_throws<InputError>([&] { ops::linear(x.view(), cview(x), cview(make(Shape{6, 6})), CV{}); },
                             {"linear", "overlaps"});
  require_throws<ShapeError>([&] { ops::linear_gelu(y.view(), cview(x), cview(w_bad), cview(b), Activation::GeluTanh); },
                             {"linear_gelu: in", "(3, 6)", "7"});
  require_throws<ShapeError>([&] { ops::linear_gelu(y_bad.view(), cview(x), cview(w), cview(b), Activation::GeluErf); },
                             {"linear_gelu: out", "(3, 5)", "(2, 5)"});
  require_throws<InputError>(
      [&] { ops::linear_gelu(x.view(), cview(x), cview(make(Shape{6, 6})), CV{}, Activation::GeluTanh); },
      {"linear_gelu", "overlaps"});
  require_throws<InputError>(
      [&] { ops::linear_gelu(y.view(), cview(x), cview(w), cview(b), static_cast<Activation>(7)); },
      {"linear_gelu", "unknown activation"});

  auto g6 = make(Shape{6}), g5 = make(Shape{5});
  require_throws<ShapeError>([&] { ops::layer_norm(x.view(), cview(x), cview(g6), cview(g5), 1e-5); },
                             {"layer_norm: bias", "(6)", "(5)"});
  require_throws<ShapeError>([&] { ops::layer_norm(y.view(), cview(x), cview(g6), cview(g6), 1e-5); },
                             {"layer_norm: out"});
  require_throws<ShapeError>([&] { ops::add(x.view(), cview(y)); }, {"add", "(3, 5)", "(3, 6)"});
  require_throws<ShapeError>([&] { ops::add_difference(x.view(), cview(x), cview(y)); }, {"add_difference", "b"});

  auto q = make(Shape{4, 2, 3}), k_bad = make(Shape{4, 2, 2}), o = make(Shape{4, 2, 3});
  auto mk = make(Shape{4, 2, 5, 3}), mk_bad = make(Shape{4, 3, 5, 3}), mv_bad = make(Shape{4, 2, 6, 3});
  auto gate = make(Shape{2}), gate_bad = make(Shape{3});
  require_throws<ShapeError>(
      [&] { ops::causal_attention(o.view(), cview(q), cview(k_bad), cview(q), PositionScheme::Alibi); },
      {"causal_attention: k", "(4, 2, 3)", "(4, 2, 2)"});
  require_throws<ShapeError>(
      [&] { ops::causal_attention(o.view(), cview(x), cview(x), cview(x), PositionScheme::Alibi); },
      {"causal_attention: q", "(T, H, dh)", "(3, 6)"});
  require_throws<ShapeError>(
      [&] {
        ops::memory_attention<GatedFusion>(o.view(), cview(q), cview(q), cview(q), cview(mk_bad), cview(mk),
                                           cview(gate), PositionScheme::Alibi);
      },
      {"memory_attention: mem_k", "(4, 2, K, 3)", "(4, 3, 5, 3)"});
  require_throws<ShapeError>(
      [&] {
        ops::memory_attention<JointFusion>(o.view(), cview(q), cview(q), cview(q), cview(mk), cview(mv_bad),
                                           cview(gate), PositionScheme::Alibi);
      },
      {"memory_attention: mem_v", "(4, 2, 5, 3)", "(4, 2, 6, 3)"});
  require_throws<ShapeError>(
      [&] {
        ops::memory_attention<GatedFusion>(o.view(), cview(q), cview(q), cview(q), cview(mk), cview(mk),
                                           cview(gate_bad), PositionScheme::Alibi);
      },
      {"memory_attention: gate", "(2)", "(3)"});
  require_throws<ShapeError>(
      [&] {
        ops::memory_attention<GatedFusion>(o.view(), cview(q), cview(q), cview(q), cview(mk), cview(mk), CV{},
                                           PositionScheme::Alibi);
      },
      {"memory_attention: gate"});
}

TEMPLATE_LIST_TEST_CASE("ops: cross_entropy refuses targets outside the vocabulary", "[ops][errors]", Combos) {
  using T = typename TestType::T;
  using L = typename TestType::L;
  std::mt19937_64 rng(base_seed());
  auto logits = to_backend<T, L>(random_tensor<T>(Shape{3, 7}, rng));
  auto losses = poisoned<float, L>(Shape{3});
  std::vector<std::int32_t> targets = {0, 7, -1};
  require_throws<InputError>([&] { ops::cross_entropy<T, L>(cview(logits), targets, losses.view()); },
                             {"cross_entropy", "target 7", "position 1", "[0, 7)"});
  targets = {0, -3, 1};
  require_throws<InputError>([&] { ops::cross_entropy<T, L>(cview(logits), targets, losses.view()); },
                             {"target -3"});
  targets = {0, 1};
  require_throws<ShapeError>([&] { ops::cross_entropy<T, L>(cview(logits), targets, losses.view()); },
                             {"cross_entropy: logits", "(2, V)", "(3, 7)"});
}
