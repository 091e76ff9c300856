// Tests of tensor.hpp: Shape, TensorView (indexing, slicing, reshape, element access),
// Tensor (resize, capacity, move, alignment), copy/fill/expect_shape and their errors.
// Offsets are checked against a plain row-major reference computed here in int64.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "longmem/tensor.hpp"

using longmem::index_t;
using longmem::Shape;
using longmem::Tensor;
using longmem::TensorView;

namespace {

// Row-major offset of idx in dims: the reference the views must agree with.
index_t reference_offset(const std::vector<index_t>& dims, const std::vector<index_t>& idx) {
  index_t off = 0;
  for (std::size_t k = 0; k < dims.size(); ++k) off = off * dims[k] + idx[k];
  return off;
}

Tensor<float> random_tensor(Shape s, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  Tensor<float> t(s);
  for (auto& x : t) x = dist(rng);
  return t;
}

bool all_nan(TensorView<const float> v) {
  for (index_t i = 0; i < v.numel(); ++i) {
    if (!std::isnan(v.data()[i])) return false;
  }
  return true;
}

}  // namespace

TEST_CASE("tensor: Shape extents, numel, drop_front, equality and str", "[tensor]") {
  const Shape s{2, 3, 4};
  CHECK(s.rank() == 3);
  CHECK(s[0] == 2);
  CHECK(s[2] == 4);
  CHECK(s.numel() == 24);
  CHECK(s.str() == "(2, 3, 4)");
  CHECK(s.drop_front() == Shape{3, 4});
  CHECK(s.drop_front().drop_front().drop_front() == Shape{});
  CHECK_FALSE(s == Shape{2, 3});
  CHECK_FALSE(s == Shape{2, 3, 5});

  const Shape scalar;
  CHECK(scalar.rank() == 0);
  CHECK(scalar.numel() == 1);
  CHECK(scalar.str() == "()");
  CHECK(Shape{0, 7}.numel() == 0);

  Shape grown;
  for (index_t d = 1; d <= Shape::max_rank; ++d) grown.push_back(d);
  CHECK(grown == Shape{1, 2, 3, 4, 5});
  CHECK(grown.numel() == 120);
}

TEST_CASE("tensor: Shape rejects negative extents and too many dimensions", "[tensor][errors]") {
  CHECK_THROWS_AS(Shape({2, -1}), longmem::ShapeError);
  CHECK_THROWS_WITH(Shape({2, -1}), Catch::Contains("extent must be >= 0, got -1"));
  CHECK_THROWS_AS(Shape({1, 1, 1, 1, 1, 1}), longmem::ShapeError);
  CHECK_THROWS_WITH(Shape({1, 1, 1, 1, 1, 1}), Catch::Contains("at most 5 dimensions, got 6"));
  Shape full{1, 2, 3, 4, 5};
  CHECK_THROWS_AS(full.push_back(6), longmem::ShapeError);
  CHECK(full == Shape{1, 2, 3, 4, 5});  // unchanged by the failed push_back
}

TEST_CASE("tensor: element access and sub-views follow row-major offsets", "[tensor]") {
  const index_t a = GENERATE(1, 3, 8);
  const index_t b = GENERATE(1, 5);
  const index_t c = GENERATE(1, 7, 64);
  CAPTURE(a, b, c);
  Tensor<float> t(Shape{a, b, c});
  for (index_t i = 0; i < t.numel(); ++i) t.data()[i] = static_cast<float>(i);
  const std::vector<index_t> dims{a, b, c};
  for (index_t i = 0; i < a; ++i) {
    TensorView<float> row = t[i];  // (b, c)
    REQUIRE(row.shape() == Shape{b, c});
    for (index_t j = 0; j < b; ++j) {
      for (index_t k = 0; k < c; ++k) {
        const index_t ref = reference_offset(dims, {i, j, k});
        REQUIRE(t(i, j, k) == static_cast<float>(ref));
        REQUIRE(row(j, k) == static_cast<float>(ref));
        REQUIRE(row[j](k) == static_cast<float>(ref));
        REQUIRE(&t.view()[i][j](k) == t.data() + ref);
      }
    }
  }
  // Iteration visits every element once, in order.
  index_t n = 0;
  for (float x : t.view()) REQUIRE(x == static_cast<float>(n++));
  CHECK(n == a * b * c);
}

TEST_CASE("tensor: slice selects rows and rejects ranges outside the tensor", "[tensor]") {
  const index_t rows = GENERATE(1, 2, 9);
  const index_t cols = GENERATE(1, 4, 33);
  const std::uint32_t seed = 1234u + static_cast<std::uint32_t>(rows * 100 + cols);
  CAPTURE(rows, cols, seed);
  Tensor<float> t = random_tensor(Shape{rows, cols}, seed);
  std::mt19937 rng(seed);
  for (int trial = 0; trial < 10; ++trial) {
    const index_t begin = std::uniform_int_distribution<index_t>(0, rows)(rng);
    const index_t end = std::uniform_int_distribution<index_t>(begin, rows)(rng);
    CAPTURE(begin, end);
    TensorView<float> s = t.view().slice(begin, end);
    REQUIRE(s.shape() == Shape{end - begin, cols});
    for (index_t i = 0; i < end - begin; ++i)
      for (index_t j = 0; j < cols; ++j) REQUIRE(s(i, j) == t(begin + i, j));
  }
  CHECK_THROWS_AS(t.view().slice(0, rows + 1), longmem::ShapeError);
  CHECK_THROWS_WITH(t.view().slice(-1, 1), Catch::Contains("slice [-1, 1) is outside a tensor of shape"));
  CHECK_THROWS_AS(t.view().slice(1, 0), longmem::ShapeError);
  CHECK_THROWS_AS(TensorView<float>(t.data(), Shape{}).slice(0, 0), longmem::ShapeError);
  CHECK_THROWS_WITH(t.view()[rows], Catch::Contains("index " + std::to_string(rows) + " is outside the first dimension"));
  CHECK_THROWS_AS(t.view()[-1], longmem::ShapeError);
}

TEST_CASE("tensor: reshape keeps the elements and rejects other element counts", "[tensor][errors]") {
  Tensor<float> t = random_tensor(Shape{2, 3, 4}, 7u);
  TensorView<float> r = t.view().reshape(Shape{6, 4});
  CHECK(r.data() == t.data());
  CHECK(r(5, 3) == t(1, 2, 3));
  CHECK(t.view().reshape(Shape{24}).shape() == Shape{24});
  CHECK_THROWS_AS(t.view().reshape(Shape{5, 5}), longmem::ShapeError);
  CHECK_THROWS_WITH(t.view().reshape(Shape{5, 5}),
                    Catch::Contains("cannot reshape (2, 3, 4) to (5, 5)") && Catch::Contains("element counts differ"));
}

TEST_CASE("tensor: views convert to const views and cview works on tensors and views", "[tensor]") {
  Tensor<float> t = random_tensor(Shape{3, 2}, 11u);
  TensorView<const float> c = t.view();
  CHECK(c.data() == t.data());
  CHECK(c.shape() == t.shape());
  const Tensor<float>& ct = t;
  TensorView<const float> c2 = ct;  // conversion operator of a const tensor
  CHECK(c2.data() == t.data());
  CHECK(longmem::cview(t).data() == t.data());
  CHECK(longmem::cview(t.view()).shape() == Shape{3, 2});
  CHECK(c.bytes() == 6 * sizeof(float));
  CHECK_FALSE(c.empty());
  // A default view is rank 0 over no data: it has no elements and is empty (the ops read
  // it as an absent optional input).
  CHECK(TensorView<const float>().data() == nullptr);
  CHECK(TensorView<const float>().rank() == 0);
  CHECK(TensorView<const float>().numel() == 0);
  CHECK(TensorView<const float>().empty());
}

TEST_CASE("tensor: resize reallocates only beyond the capacity, and memory is aligned", "[tensor]") {
  Tensor<double> t;
  CHECK(t.data() == nullptr);
  CHECK(t.numel() == 0);  // rank-0 shape, but nothing allocated: no elements
  CHECK(t.empty());
  CHECK(t.capacity_bytes() == 0);

  t.resize(Shape{0, 4});
  CHECK(t.data() == nullptr);  // zero elements allocate nothing
  CHECK(t.empty());

  const index_t n = GENERATE(1, 7, 1000);
  CAPTURE(n);
  t.resize(Shape{n, 3});
  REQUIRE(t.data() != nullptr);
  CHECK(reinterpret_cast<std::uintptr_t>(t.data()) % longmem::detail::Allocator<longmem::Host>::alignment == 0);
  CHECK(t.bytes() == static_cast<std::size_t>(3 * n) * sizeof(double));
  CHECK(t.capacity_bytes() == t.bytes());
  double* before = t.data();
  const std::size_t capacity = t.capacity_bytes();

  t.resize(Shape{n});  // smaller: same buffer, same capacity
  CHECK(t.data() == before);
  CHECK(t.capacity_bytes() == capacity);
  CHECK(t.shape() == Shape{n});

  t.resize(Shape{3, n});  // equal element count: same buffer
  CHECK(t.data() == before);

  t.resize(Shape{4, n});  // larger: a new buffer of the new size
  CHECK(t.capacity_bytes() == static_cast<std::size_t>(4 * n) * sizeof(double));
  longmem::fill(t.view(), 2.5);
  for (double x : t) REQUIRE(x == 2.5);  // the whole new buffer is writable (ASan checks it)
}

TEST_CASE("tensor: resize refuses sizes that overflow the byte count", "[tensor][errors]") {
  Tensor<double> t;
  const index_t huge = std::numeric_limits<index_t>::max() / 4;
  CHECK_THROWS_AS(t.resize(Shape{huge, 2}), longmem::BackendError);
  CHECK_THROWS_WITH(t.resize(Shape{huge, 2}), Catch::Contains("too large to allocate"));
  CHECK(t.data() == nullptr);
}

TEST_CASE("tensor: move hands over the buffer and leaves the source empty", "[tensor]") {
  Tensor<float> a = random_tensor(Shape{4, 5}, 99u);
  const float* p = a.data();
  const float first = a(0, 0);

  Tensor<float> b(std::move(a));
  CHECK(b.data() == p);
  CHECK(b.shape() == Shape{4, 5});
  CHECK(b(0, 0) == first);
  CHECK(a.data() == nullptr);  // NOLINT(bugprone-use-after-move): moved-from state is specified
  CHECK(a.capacity_bytes() == 0);

  Tensor<float> c = random_tensor(Shape{2}, 5u);
  c = std::move(b);
  CHECK(c.data() == p);
  CHECK(c.shape() == Shape{4, 5});
  CHECK(b.data() == nullptr);

  Tensor<float>& self = c;
  c = std::move(self);  // self-move keeps the buffer
  CHECK(c.data() == p);

  // A moved-from tensor can be resized and used again.
  a.resize(Shape{3});
  longmem::fill(a.view(), 1.0f);
  CHECK(a(2) == 1.0f);
}

TEST_CASE("tensor: copy writes every element and rejects shape mismatches", "[tensor]") {
  const index_t rows = GENERATE(1, 5, 130);
  const index_t cols = GENERATE(1, 3, 64);
  const std::uint32_t seed = 42u + static_cast<std::uint32_t>(rows * 1000 + cols);
  CAPTURE(rows, cols, seed);
  Tensor<float> src = random_tensor(Shape{rows, cols}, seed);
  Tensor<float> dst(Shape{rows, cols});
  longmem::fill(dst.view(), std::numeric_limits<float>::quiet_NaN());  // poison
  REQUIRE(all_nan(longmem::cview(dst)));
  longmem::copy(longmem::cview(src), dst.view());
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < cols; ++j) REQUIRE(dst(i, j) == src(i, j));

  Tensor<float> wrong(Shape{cols, rows + 1});
  CHECK_THROWS_AS(longmem::copy(longmem::cview(src), wrong.view()), longmem::ShapeError);
  CHECK_THROWS_WITH(longmem::copy(longmem::cview(src), wrong.view()),
                    Catch::Contains("copy: source shape " + src.shape().str()) &&
                        Catch::Contains("destination shape " + wrong.shape().str()));
  Tensor<float> flat(Shape{rows * cols});  // same element count, different shape: still an error
  CHECK_THROWS_AS(longmem::copy(longmem::cview(src), flat.view()), longmem::ShapeError);
}

TEST_CASE("tensor: copy of empty tensors and fill of sub-views", "[tensor]") {
  Tensor<float> a(Shape{0, 3});
  Tensor<float> b(Shape{0, 3});
  longmem::copy(longmem::cview(a), b.view());  // nothing to copy, no error
  CHECK(b.empty());

  Tensor<float> t(Shape{4, 6});
  longmem::fill(t.view(), 0.0f);
  longmem::fill(t.view().slice(1, 3), std::numeric_limits<float>::quiet_NaN());
  for (index_t i = 0; i < 4; ++i) {
    for (index_t j = 0; j < 6; ++j) {
      CAPTURE(i, j);
      REQUIRE(std::isnan(t(i, j)) == (i == 1 || i == 2));
    }
  }
}

TEST_CASE("tensor: expect_shape names the tensor, the expected and the found shape", "[tensor][errors]") {
  Tensor<float> t(Shape{2, 3});
  CHECK_NOTHROW(longmem::expect_shape(t, Shape{2, 3}, "q"));
  CHECK_NOTHROW(longmem::expect_shape(t.view(), Shape{2, 3}, "q"));
  CHECK_THROWS_AS(longmem::expect_shape(t, Shape{3, 2}, "mem_k"), longmem::ShapeError);
  CHECK_THROWS_WITH(longmem::expect_shape(t.view(), Shape{3, 2}, "mem_k"),
                    Catch::Equals("mem_k: expected shape (3, 2), got (2, 3)"));
}

TEST_CASE("tensor: integer element types and rank-5 tensors", "[tensor]") {
  Tensor<std::int32_t> t(Shape{2, 1, 3, 1, 2});
  std::int32_t n = 0;
  for (auto& x : t) x = n++;
  CHECK(t(1, 0, 2, 0, 1) == static_cast<std::int32_t>(reference_offset({2, 1, 3, 1, 2}, {1, 0, 2, 0, 1})));
  CHECK(t[1].shape() == Shape{1, 3, 1, 2});
  CHECK(t.rank() == 5);
  CHECK(t.dim(2) == 3);
}

TEST_CASE("tensor: converted rounds to 16-bit types and refuses finite values beyond fp16's range", "[tensor][errors]") {
  using longmem::bfloat16, longmem::converted, longmem::cview, longmem::half, longmem::Host, longmem::InputError,
      longmem::to_float;
  std::mt19937_64 rng(77);
  std::uniform_real_distribution<float> u(-8.0f, 8.0f);
  Tensor<float, Host> x(Shape{3, 5});
  for (index_t i = 0; i < x.numel(); ++i) x.data()[i] = u(rng);
  const auto h = converted<half>(cview(x));
  const auto b = converted<bfloat16>(cview(x));
  for (index_t i = 0; i < x.numel(); ++i) {
    // Round to nearest: within half a unit in the last place (2^-11 / 2^-8 relative).
    CHECK(std::abs(to_float(h.data()[i]) - x.data()[i]) <= std::ldexp(std::abs(x.data()[i]), -11));
    CHECK(std::abs(to_float(b.data()[i]) - x.data()[i]) <= std::ldexp(std::abs(x.data()[i]), -8));
  }
  x.data()[7] = 65504.0f;  // fp16's largest finite value stays finite
  CHECK(to_float(converted<half>(cview(x)).data()[7]) == 65504.0f);
  x.data()[7] = 7.0e4f;  // rounds to infinity in fp16: refused, naming the element
  CHECK_THROWS_AS(converted<half>(cview(x)), InputError);
  CHECK_THROWS_WITH(converted<half>(cview(x)), Catch::Contains("element 7") && Catch::Contains("65504"));
  CHECK(std::isfinite(to_float(converted<bfloat16>(cview(x)).data()[7])));  // bf16 has float's range
  x.data()[7] = std::numeric_limits<float>::infinity();  // not finite to begin with: carried over
  CHECK(std::isinf(to_float(converted<half>(cview(x)).data()[7])));
}
