// safetensors reader and writer: round trips, conversions, hand-written files and one
// hand-made bad file per validation rule.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "longmem/safetensors.hpp"

namespace fs = std::filesystem;
using namespace longmem;
using Catch::Contains;

namespace {

/// 8-byte little-endian length + header text + data: a file written by hand.
std::vector<std::byte> make_file(const std::string& header, const std::vector<std::byte>& data = {}) {
  std::vector<std::byte> out(8);
  std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::byte>((n >> (8 * i)) & 0xff);
  for (char c : header) out.push_back(static_cast<std::byte>(c));
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

/// A file whose 8-byte length field says `n`, whatever follows.
std::vector<std::byte> with_length(std::uint64_t n, const std::string& rest) {
  std::vector<std::byte> out = make_file(rest);
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::byte>((n >> (8 * i)) & 0xff);
  return out;
}

template <class T>
void append(std::vector<std::byte>& out, T v) {
  const auto* p = reinterpret_cast<const std::byte*>(&v);
  out.insert(out.end(), p, p + sizeof v);
}

std::vector<std::byte> zeros(std::size_t n) { return std::vector<std::byte>(n); }

/// A fresh directory under the system temp directory, removed at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("longmem_st_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::vector<std::string> listing() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(path)) out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }
};

/// Independent float64 decoders of the 16-bit formats (the reference for conversions).
double ref_half(std::uint16_t b) {
  const int sign = b >> 15, exp = (b >> 10) & 0x1f, mant = b & 0x3ff;
  double mag;
  if (exp == 0x1f) mag = mant ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (exp == 0) mag = std::ldexp(mant, -24);
  else mag = std::ldexp(1024 + mant, exp - 25);
  return sign ? -mag : mag;
}
double ref_bfloat16(std::uint16_t b) {
  const int sign = b >> 15, exp = (b >> 7) & 0xff, mant = b & 0x7f;
  double mag;
  if (exp == 0xff) mag = mant ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (exp == 0) mag = std::ldexp(mant, -133);
  else mag = std::ldexp(128 + mant, exp - 134);
  return sign ? -mag : mag;
}

template <class T>
T random_value(std::mt19937_64& rng) {
  std::normal_distribution<float> nd(0.f, 3.f);
  if constexpr (std::is_same_v<T, half>) return to_half(nd(rng));
  else if constexpr (std::is_same_v<T, bfloat16>) return to_bfloat16(nd(rng));
  else if constexpr (std::is_floating_point_v<T>) return static_cast<T>(std::normal_distribution<double>(0, 3)(rng));
  else return std::uniform_int_distribution<T>(std::numeric_limits<T>::min(), std::numeric_limits<T>::max())(rng);
}

/// An element pattern no reader writes by accident: NaN for floats, a sentinel for integers.
template <class T>
T poison() {
  if constexpr (std::is_same_v<T, half> || std::is_same_v<T, bfloat16>) return T{0x7fc1};
  else if constexpr (std::is_floating_point_v<T>) return std::numeric_limits<T>::quiet_NaN();
  else return static_cast<T>(0x5a5a5a5a5a5a5a5aLL);
}

template <class T>
Tensor<T, Host> random_tensor(Shape s, std::mt19937_64& rng) {
  Tensor<T, Host> t(s);
  for (auto& v : t) v = random_value<T>(rng);
  return t;
}

template <class T>
bool same_bits(const Tensor<T, Host>& a, const Tensor<T, Host>& b) {
  return a.shape() == b.shape() && (a.bytes() == 0 || std::memcmp(a.data(), b.data(), a.bytes()) == 0);
}

const std::string kBad = "bad.safetensors";

}  // namespace

TEMPLATE_TEST_CASE("safetensors: round trip of every dtype and rank 0..5", "[safetensors]", float, double, half,
                   bfloat16, std::int32_t, std::int64_t) {
  const Shape shape = GENERATE(Shape{}, Shape{1}, Shape{7}, Shape{0}, Shape{2, 3}, Shape{3, 0, 2}, Shape{1, 5, 3},
                               Shape{2, 3, 1, 4}, Shape{2, 1, 3, 2, 3}, Shape{33, 17});
  const std::uint64_t seed = 1234 + static_cast<std::uint64_t>(shape.numel()) * 7 + shape.rank();
  CAPTURE(seed, shape.str(), dtype_name(dtype_of_v<TestType>));
  std::mt19937_64 rng(seed);
  const auto a = random_tensor<TestType>(shape, rng);
  const auto b = random_tensor<TestType>(Shape{5}, rng);  // a second tensor so offsets are not all 0

  SafetensorsWriter w;
  w.add<TestType>("a.weight", a.view());
  w.add<TestType>("b", b.view());
  const auto bytes = w.to_bytes();

  TempDir dir;
  w.write(dir.path / "x.safetensors");
  for (int from_disk = 0; from_disk < 2; ++from_disk) {
    CAPTURE(from_disk);
    const SafetensorsFile f = from_disk ? SafetensorsFile::open(dir.path / "x.safetensors")
                                        : SafetensorsFile::from_bytes(bytes, "mem");
    REQUIRE(f.names() == std::vector<std::string>{"a.weight", "b"});
    const TensorInfo& ti = f.info("a.weight");
    CHECK(ti.dtype == dtype_of_v<TestType>);
    CHECK(ti.shape == shape);
    CHECK(ti.bytes() == a.bytes());
    REQUIRE(f.raw("a.weight").size() == a.bytes());
    CHECK((a.bytes() == 0 || std::memcmp(f.raw("a.weight").data(), a.data(), a.bytes()) == 0));

    CHECK(same_bits(f.read<TestType>("a.weight"), a));
    CHECK(same_bits(f.read<TestType>("b", Shape{5}), b));
    Tensor<TestType, Host> dst(shape);
    fill(dst.view(), poison<TestType>());
    f.read_into<TestType>("a.weight", dst.view());
    CHECK(same_bits(dst, a));
  }
  // Files from disk and from memory are the same bytes.
  std::ifstream in(dir.path / "x.safetensors", std::ios::binary);
  std::vector<char> disk((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  REQUIRE(disk.size() == bytes.size());
  CHECK(std::memcmp(disk.data(), bytes.data(), bytes.size()) == 0);
  // The data section starts 8-aligned, as the reference writer pads it.
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  CHECK(n % 8 == 0);
  CHECK(dir.listing() == std::vector<std::string>{"x.safetensors"});
}

TEST_CASE("safetensors: many tensors, add_as and metadata round trip", "[safetensors]") {
  const std::uint64_t seed = 99;
  CAPTURE(seed);
  std::mt19937_64 rng(seed);
  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  w.set_metadata({{"n_layer", "2"}, {"format", "longmem"}, {"unicode \xc3\xa9\xe2\x82\xac", "\xf0\x9f\x98\x80"},
                  {"empty", ""}});
  std::vector<Tensor<float, Host>> ts;
  const int count = GENERATE(1, 3, 40);
  for (int i = 0; i < count; ++i) {
    ts.push_back(random_tensor<float>(Shape{i % 4 + 1, 3}, rng));
    const DType dt = std::array{DType::F16, DType::BF16, DType::F32, DType::F64}[static_cast<std::size_t>(i % 4)];
    w.add_as("t" + std::to_string(i), dt, ts.back().view());
  }
  const auto f = SafetensorsFile::from_bytes(w.to_bytes());
  CHECK(f.name() == "<memory>");
  const std::map<std::string, std::string> expected_meta{
      {"n_layer", "2"}, {"format", "longmem"}, {"unicode \xc3\xa9\xe2\x82\xac", "\xf0\x9f\x98\x80"}, {"empty", ""}};
  CHECK(f.metadata() == expected_meta);
  REQUIRE(f.names().size() == static_cast<std::size_t>(count));
  for (int i = 0; i < count; ++i) {
    const std::string name = "t" + std::to_string(i);
    CAPTURE(name);
    const auto got = f.read<double>(name, ts[static_cast<std::size_t>(i)].shape());
    const DType dt = f.info(name).dtype;
    for (index_t k = 0; k < got.numel(); ++k) {
      const float x = ts[static_cast<std::size_t>(i)].data()[k];
      // float64 reference of the stored value: the float rounded by the stored format.
      double ref = x;
      if (dt == DType::F16) ref = ref_half(to_half(x).bits);
      if (dt == DType::BF16) ref = ref_bfloat16(to_bfloat16(x).bits);
      CHECK(got.data()[k] == ref);
      // and the rounding is to the nearest representable value: error at most half an ulp
      const double rel = dt == DType::F16 ? std::ldexp(1.0, -11) : dt == DType::BF16 ? std::ldexp(1.0, -8) : 0.0;
      CHECK(std::abs(ref - x) <= rel * std::abs(x) + std::ldexp(1.0, -25));
    }
  }
  // No metadata: none written, none read.
  SafetensorsWriter plain;
  plain.add<float>("x", ts[0].view());
  const auto bytes = plain.to_bytes();
  CHECK(std::string(reinterpret_cast<const char*>(bytes.data()) + 8, bytes.size() - 8).find("__metadata__") ==
        std::string::npos);
  CHECK(SafetensorsFile::from_bytes(bytes).metadata().empty());
}

TEST_CASE("safetensors: conversions on read match a float64 reference", "[safetensors]") {
  const int n = GENERATE(1, 13, 1000);
  const std::uint64_t seed = 7 + static_cast<std::uint64_t>(n);
  CAPTURE(n, seed);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> bits16(0, 0xffff);

  // Stored F16/BF16 values, every finite bit pattern possible: exact in float and double.
  std::vector<std::byte> data;
  std::vector<std::uint16_t> h(static_cast<std::size_t>(n)), bf(static_cast<std::size_t>(n));
  for (auto& b : h) {
    do b = static_cast<std::uint16_t>(bits16(rng));
    while (((b >> 10) & 0x1f) == 0x1f);
    append(data, b);
  }
  for (auto& b : bf) {
    do b = static_cast<std::uint16_t>(bits16(rng));
    while (((b >> 7) & 0xff) == 0xff);
    append(data, b);
  }
  std::vector<double> f64(static_cast<std::size_t>(n));
  for (auto& v : f64) {
    v = std::ldexp(std::uniform_real_distribution<double>(-1, 1)(rng), std::uniform_int_distribution<int>(-60, 60)(rng));
    append(data, v);
  }
  std::vector<float> f32(static_cast<std::size_t>(n));
  for (auto& v : f32) {
    v = std::ldexp(std::uniform_real_distribution<float>(-1, 1)(rng), std::uniform_int_distribution<int>(-20, 20)(rng));
    append(data, v);
  }
  const std::size_t n2 = 2 * static_cast<std::size_t>(n), n4 = 2 * n2, n8 = 2 * n4;
  const std::string N = std::to_string(n);
  auto off = [](std::size_t a, std::size_t b) { return "[" + std::to_string(a) + "," + std::to_string(b) + "]"; };
  const std::string header = R"({"h":{"dtype":"F16","shape":[)" + N + R"(],"data_offsets":)" + off(0, n2) +
                             R"(},"bf":{"dtype":"BF16","shape":[)" + N + R"(],"data_offsets":)" + off(n2, 2 * n2) +
                             R"(},"d":{"dtype":"F64","shape":[)" + N + R"(],"data_offsets":)" +
                             off(2 * n2, 2 * n2 + n8) + R"(},"f":{"dtype":"F32","shape":[)" + N +
                             R"(],"data_offsets":)" + off(2 * n2 + n8, 2 * n2 + n8 + n4) + "}}";
  const auto f = SafetensorsFile::from_bytes(make_file(header, data), "conv");

  Tensor<float, Host> out_f(Shape{n});
  Tensor<double, Host> out_d(Shape{n});
  auto poisoned = [&] {
    fill(out_f.view(), std::numeric_limits<float>::quiet_NaN());
    fill(out_d.view(), std::numeric_limits<double>::quiet_NaN());
  };

  poisoned();
  f.read_into<float>("h", out_f.view());
  f.read_into<double>("h", out_d.view());
  for (int i = 0; i < n; ++i) {
    CHECK(out_f.data()[i] == ref_half(h[static_cast<std::size_t>(i)]));  // exact
    CHECK(out_d.data()[i] == ref_half(h[static_cast<std::size_t>(i)]));
  }
  poisoned();
  f.read_into<float>("bf", out_f.view());
  f.read_into<double>("bf", out_d.view());
  for (int i = 0; i < n; ++i) {
    CHECK(out_f.data()[i] == ref_bfloat16(bf[static_cast<std::size_t>(i)]));
    CHECK(out_d.data()[i] == ref_bfloat16(bf[static_cast<std::size_t>(i)]));
  }
  poisoned();
  f.read_into<float>("d", out_f.view());
  f.read_into<double>("d", out_d.view());
  for (int i = 0; i < n; ++i) {
    const double ref = f64[static_cast<std::size_t>(i)];
    CHECK(out_d.data()[i] == ref);  // exact
    // F64 -> float rounds to nearest: relative error <= 2^-24.
    CHECK(std::abs(out_f.data()[i] - ref) <= std::ldexp(std::abs(ref), -24));
  }
  poisoned();
  f.read_into<float>("f", out_f.view());
  f.read_into<double>("f", out_d.view());
  for (int i = 0; i < n; ++i) {
    CHECK(out_f.data()[i] == f32[static_cast<std::size_t>(i)]);
    CHECK(out_d.data()[i] == f32[static_cast<std::size_t>(i)]);
  }
  // F16 read as half and BF16 as bfloat16 keep the bits; F32 read as half rounds like to_half.
  const auto rh = f.read<half>("h");
  const auto rb = f.read<bfloat16>("bf");
  const auto fh = f.read<half>("f");
  for (int i = 0; i < n; ++i) {
    CHECK(rh.data()[i].bits == h[static_cast<std::size_t>(i)]);
    CHECK(rb.data()[i].bits == bf[static_cast<std::size_t>(i)]);
    CHECK(fh.data()[i].bits == to_half(f32[static_cast<std::size_t>(i)]).bits);
  }
}

TEST_CASE("safetensors: integer conversions and float/integer mismatches", "[safetensors]") {
  std::vector<std::byte> data;
  append<std::int32_t>(data, -7);
  append<std::int32_t>(data, std::numeric_limits<std::int32_t>::max());
  append<std::int64_t>(data, std::numeric_limits<std::int32_t>::min());
  append<std::int64_t>(data, 12);
  append<std::int64_t>(data, 5'000'000'000LL);
  append<float>(data, 1.5f);
  const std::string header =
      R"({"i32":{"dtype":"I32","shape":[2],"data_offsets":[0,8]},)"
      R"("fits":{"dtype":"I64","shape":[2],"data_offsets":[8,24]},)"
      R"("big":{"dtype":"I64","shape":[1,1],"data_offsets":[24,32]},)"
      R"("x":{"dtype":"F32","shape":[],"data_offsets":[32,36]}})";
  const auto f = SafetensorsFile::from_bytes(make_file(header, data), "ints.safetensors");

  const auto a = f.read<std::int64_t>("i32");
  CHECK(a(0) == -7);
  CHECK(a(1) == std::numeric_limits<std::int32_t>::max());
  const auto b = f.read<std::int32_t>("fits");
  CHECK(b(0) == std::numeric_limits<std::int32_t>::min());
  CHECK(b(1) == 12);
  CHECK(f.read<std::int64_t>("big")(0, 0) == 5'000'000'000LL);
  REQUIRE_THROWS_AS(f.read<std::int32_t>("big"), FormatError);
  REQUIRE_THROWS_WITH(f.read<std::int32_t>("big"),
                      Contains("ints.safetensors") && Contains("'big'") && Contains("5000000000") &&
                          Contains("does not fit in int32"));

  REQUIRE_THROWS_AS(f.read<float>("i32"), ShapeError);
  REQUIRE_THROWS_WITH(f.read<float>("i32"),
                      Contains("ints.safetensors: tensor 'i32' has dtype I32, expected a floating-point dtype"));
  REQUIRE_THROWS_AS(f.read<std::int64_t>("x"), ShapeError);
  REQUIRE_THROWS_WITH(f.read<std::int32_t>("x"), Contains("tensor 'x' has dtype F32, expected an integer dtype"));
  CHECK(f.read<double>("x")() == 1.5);
}

TEST_CASE("safetensors: a file written by hand, with padding and keys in any order", "[safetensors]") {
  std::vector<std::byte> data;
  for (float v : {1.f, -2.f, 3.5f, 0.25f, 1e-3f, 6.f}) append(data, v);
  append<std::uint16_t>(data, 0x3c00);  // half 1.0
  append<std::uint16_t>(data, 0xc000);  // half -2.0
  const std::string header =
      "{ \"__metadata__\" : {\"format\":\"pt\"},\n"
      "  \"w\": {\"shape\": [2, 3], \"data_offsets\": [0, 24], \"dtype\": \"F32\"},\n"
      "  \"h\": {\"data_offsets\": [24, 28], \"dtype\": \"F16\", \"shape\": [2]} }    ";
  const auto f = SafetensorsFile::from_bytes(make_file(header, data), "hand");
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.names() == std::vector<std::string>{"h", "w"});
  CHECK(f.contains("w"));
  CHECK_FALSE(f.contains("x"));
  CHECK_FALSE(f.contains("__metadata__"));
  const auto w = f.read<float>("w", Shape{2, 3});
  CHECK(w(0, 0) == 1.f);
  CHECK(w(0, 2) == 3.5f);
  CHECK(w(1, 1) == 1e-3f);
  CHECK(w(1, 2) == 6.f);
  const auto hh = f.read<double>("h");
  CHECK(hh(0) == 1.0);
  CHECK(hh(1) == -2.0);

  // Files with nothing in them are valid.
  CHECK(SafetensorsFile::from_bytes(make_file("{}")).names().empty());
  CHECK(SafetensorsFile::from_bytes(make_file(R"({"__metadata__":{}})")).metadata().empty());
  // Zero-sized tensors may share an offset with each other and with the next tensor.
  std::vector<std::byte> four;
  append<float>(four, 9.f);
  const auto z = SafetensorsFile::from_bytes(make_file(
      R"({"z1":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"z2":{"dtype":"F64","shape":[3,0],"data_offsets":[0,0]},)"
      R"("v":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"z3":{"dtype":"I32","shape":[0],"data_offsets":[4,4]}})",
      four));
  CHECK(z.read<float>("z1").numel() == 0);
  CHECK(z.read<double>("z2").shape() == Shape{3, 0});
  CHECK(z.read<float>("v")(0) == 9.f);
  CHECK(z.raw("z3").empty());
}

TEST_CASE("safetensors: misaligned data reads correctly", "[safetensors]") {
  // An odd header length puts the data section at an odd address, and a 2-byte tensor
  // first puts the F32/F64/I64 that follow off their natural alignment too.
  const int pad = GENERATE(0, 1, 2, 3, 5, 7);
  CAPTURE(pad);
  std::vector<std::byte> data;
  append<std::uint16_t>(data, 0x4200);  // half 3.0
  append<float>(data, -1.25f);
  append<float>(data, 1e30f);
  append<double>(data, 0.1);
  append<std::int64_t>(data, -123456789012345LL);
  append<std::int32_t>(data, 77);
  const std::string header =
      R"({"a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},"b":{"dtype":"F32","shape":[2],"data_offsets":[2,10]},)"
      R"("c":{"dtype":"F64","shape":[],"data_offsets":[10,18]},"d":{"dtype":"I64","shape":[1],"data_offsets":[18,26]},)"
      R"("e":{"dtype":"I32","shape":[1],"data_offsets":[26,30]}})" +
      std::string(static_cast<std::size_t>(pad), ' ');
  const auto f = SafetensorsFile::from_bytes(make_file(header, data));
  CHECK(f.read<float>("a")(0) == 3.f);
  const auto b = f.read<float>("b");
  CHECK(b(0) == -1.25f);
  CHECK(b(1) == 1e30f);
  CHECK(f.read<double>("b")(1) == static_cast<double>(1e30f));
  CHECK(f.read<double>("c")() == 0.1);
  CHECK(f.read<float>("c")() == 0.1f);
  CHECK(f.read<std::int64_t>("d")(0) == -123456789012345LL);
  CHECK(f.read<std::int32_t>("e")(0) == 77);
  CHECK(f.read<std::int64_t>("e")(0) == 77);
}

TEST_CASE("safetensors: shape checks and missing tensors are ShapeErrors naming file and tensor", "[safetensors]") {
  SafetensorsWriter w;
  Tensor<float, Host> t(Shape{2, 3});
  fill(t.view(), 1.f);
  w.add<float>("h.0.attn.c_attn.weight", t.view());
  const auto f = SafetensorsFile::from_bytes(w.to_bytes(), "model.safetensors");

  REQUIRE_THROWS_AS(f.read<float>("h.0.attn.c_attn.weight", Shape{3, 2}), ShapeError);
  REQUIRE_THROWS_WITH(f.read<float>("h.0.attn.c_attn.weight", Shape{3, 2}),
                      Contains("model.safetensors") && Contains("'h.0.attn.c_attn.weight'") &&
                          Contains("has shape (2, 3), expected (3, 2)"));
  Tensor<float, Host> wrong(Shape{6});
  REQUIRE_THROWS_AS(f.read_into<float>("h.0.attn.c_attn.weight", wrong.view()), ShapeError);
  REQUIRE_THROWS_WITH(f.read_into<float>("h.0.attn.c_attn.weight", wrong.view()),
                      Contains("destination has shape (6)"));
  SafetensorsWriter ws;
  Tensor<float, Host> scalar(Shape{});
  scalar() = 4.f;
  ws.add<float>("s", scalar.view());
  const auto fs_ = SafetensorsFile::from_bytes(ws.to_bytes());
  REQUIRE_THROWS_WITH(fs_.read_into<float>("s", TensorView<float, Host>{}), Contains("view without storage"));
  CHECK(fs_.read<float>("s")() == 4.f);
  REQUIRE_THROWS_AS(f.info("wte"), ShapeError);
  REQUIRE_THROWS_WITH(f.info("wte"), Contains("model.safetensors: no tensor 'wte'"));
  REQUIRE_THROWS_WITH(f.read<float>("wte"), Contains("no tensor 'wte'"));
  REQUIRE_THROWS_WITH(f.raw("wte"), Contains("no tensor 'wte'"));
  CHECK(f.read<float>("h.0.attn.c_attn.weight", Shape{2, 3})(1, 2) == 1.f);
}

namespace {
struct BadFile {
  const char* what;
  std::vector<std::byte> bytes;
  std::vector<std::string> message;  // substrings the error must contain
};

std::string entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  const std::string& offsets) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}";
}
std::string obj(const std::string& inside) { return "{" + inside + "}"; }
}  // namespace

TEST_CASE("safetensors: every validation rule refuses its bad file with a FormatError", "[safetensors]") {
  const std::string ok_a = entry("a", "F32", "[2]", "[0,8]");
  std::string deep = "{\"a\":";
  for (int i = 0; i < 100000; ++i) deep += "[";
  const std::vector<BadFile> cases = {
      {"empty file", {}, {"0 bytes long"}},
      {"7 bytes", zeros(7), {"7 bytes long"}},
      {"header length 0", zeros(8), {"header length is 0"}},
      {"header length past the end", with_length(100, "{}"), {"header length 100 is larger than the 2 bytes"}},
      {"header length above 100 MB", with_length(200'000'000, "{}"), {"exceeds the limit of 100000000"}},
      {"header length 2^64-1", with_length(~std::uint64_t{0}, "{}"), {"exceeds the limit"}},
      {"invalid UTF-8 byte", make_file("{\"\xff\":1}"), {"not valid UTF-8", "byte 2"}},
      {"overlong UTF-8", make_file("{\"\xc0\xaf\":1}"), {"not valid UTF-8"}},
      {"UTF-8 surrogate", make_file("{\"\xed\xa0\x80\":1}"), {"not valid UTF-8"}},
      {"truncated UTF-8", make_file("{\"a\":1}\xe2\x82"), {"not valid UTF-8", "byte 7"}},
      {"truncated JSON", make_file("{\"a\":"), {"not valid JSON"}},
      {"trailing garbage", make_file("{}x"), {"not valid JSON"}},
      {"NUL padding", make_file(std::string("{}\0\0", 4)), {"NUL byte at byte 2"}},
      {"NUL then garbage", make_file(std::string("{}\0x", 4)), {"NUL byte"}},
      {"NUL in a string", make_file(std::string("{\"a\0\":1}", 8)), {"NUL byte"}},
      {"header is an array", make_file("[]"), {"header is an array of 0 elements, expected a JSON object"}},
      {"header is a string", make_file("\"st\""), {"expected a JSON object"}},
      {"header is a number", make_file("12"), {"header is 12, expected a JSON object"}},
      {"metadata not an object", make_file(R"({"__metadata__":["a"]})"), {"__metadata__ is an array"}},
      {"metadata value not a string", make_file(R"({"__metadata__":{"k":1}})"),
       {"__metadata__ value of 'k' is 1, expected a string"}},
      {"metadata null", make_file(R"({"__metadata__":null})"), {"__metadata__ is null"}},
      {"entry not an object", make_file(R"({"a":3})"), {"tensor 'a' is 3, expected an object"}},
      {"missing dtype", make_file(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", zeros(8)),
       {"tensor 'a' has no \"dtype\""}},
      {"missing shape", make_file(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", zeros(8)),
       {"tensor 'a' has no \"shape\""}},
      {"missing data_offsets", make_file(R"({"a":{"dtype":"F32","shape":[2]}})", zeros(8)),
       {"tensor 'a' has no \"data_offsets\""}},
      {"extra key", make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", zeros(8)),
       {"tensor 'a' has the unexpected key 'x'"}},
      {"dtype U8", make_file(obj(entry("a", "U8", "[8]", "[0,8]")), zeros(8)),
       {"tensor 'a' has dtype 'U8', a safetensors dtype that longmem does not support"}},
      {"dtype F8_E4M3", make_file(obj(entry("a", "F8_E4M3", "[8]", "[0,8]")), zeros(8)), {"does not support"}},
      {"dtype BOOL", make_file(obj(entry("a", "BOOL", "[8]", "[0,8]")), zeros(8)), {"does not support"}},
      {"unknown dtype", make_file(obj(entry("a", "F17", "[2]", "[0,8]")), zeros(8)),
       {"dtype 'F17', which is not a safetensors dtype"}},
      {"lower-case dtype", make_file(obj(entry("a", "f32", "[2]", "[0,8]")), zeros(8)), {"not a safetensors dtype"}},
      {"dtype not a string", make_file(R"({"a":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", zeros(8)),
       {"has dtype 4, expected a string"}},
      {"shape not an array", make_file(R"({"a":{"dtype":"F32","shape":2,"data_offsets":[0,8]}})", zeros(8)),
       {"has shape 2, expected an array"}},
      {"negative extent", make_file(obj(entry("a", "F32", "[-2]", "[0,8]")), zeros(8)),
       {"shape extent -2, expected a non-negative integer"}},
      {"fractional extent", make_file(obj(entry("a", "F32", "[2.0]", "[0,8]")), zeros(8)), {"shape extent 2.0"}},
      {"string extent", make_file(obj(entry("a", "F32", "[\"2\"]", "[0,8]")), zeros(8)), {"shape extent the string"}},
      {"rank 6", make_file(obj(entry("a", "F32", "[1,1,1,1,1,2]", "[0,8]")), zeros(8)),
       {"tensor 'a' has rank 6; longmem supports at most 5"}},
      {"nested shape", make_file(obj(entry("a", "F32", "[[2]]", "[0,8]")), zeros(8)), {"nests", "'a'"}},
      {"100000 nested arrays", make_file(deep), {"nests"}},
      {"offsets not an array", make_file(obj(entry("a", "F32", "[2]", "8")), zeros(8)),
       {"data_offsets 8, expected an array [begin, end]"}},
      {"three offsets", make_file(obj(entry("a", "F32", "[2]", "[0,4,8]")), zeros(8)), {"expected an array"}},
      {"negative offset", make_file(obj(entry("a", "F32", "[0]", "[-8,-8]")), zeros(8)),
       {"data_offsets [-8, -8], expected non-negative integers"}},
      {"fractional offset", make_file(obj(entry("a", "F32", "[2]", "[0,8.0]")), zeros(8)), {"non-negative integers"}},
      {"begin after end", make_file(obj(entry("a", "F32", "[0]", "[8,0]")), zeros(8)), {"[8, 0] with begin after end"}},
      {"offset past the end", make_file(obj(entry("a", "F32", "[2]", "[0,8]")), zeros(4)),
       {"[0, 8], past the end of the 4-byte data section"}},
      {"huge offsets", make_file(obj(entry("a", "F32", "[2]", "[18446744073709551608,18446744073709551615]"))),
       {"past the end"}},
      {"offsets above 2^64", make_file(obj(entry("a", "F32", "[2]", "[0,18446744073709551616]"))),
       {"non-negative integers"}},
      {"size mismatch", make_file(obj(entry("a", "F32", "[2]", "[0,4]")), zeros(4)),
       {"shape (2) and dtype F32, which take 8 bytes, but data_offsets [0, 4] span 4"}},
      {"element count overflows", make_file(obj(entry("a", "F32", "[4294967296,4294967296,16]", "[0,8]")), zeros(8)),
       {"overflows 64 bits"}},
      {"bytes overflow", make_file(obj(entry("a", "F64", "[4611686018427387904]", "[0,8]")), zeros(8)),
       {"overflows 64 bits"}},
      {"extent above int64", make_file(obj(entry("a", "F32", "[9223372036854775808]", "[0,8]")), zeros(8)),
       {"overflows 64 bits"}},
      {"zero-sized but strides overflow",
       make_file(obj(entry("a", "F32", "[0,4611686018427387904,4611686018427387904]", "[0,0]"))),
       {"overflows 64 bits"}},
      {"gap at the start", make_file(obj(entry("a", "F32", "[2]", "[4,12]")), zeros(12)),
       {"gap in the data section: bytes 0..4 belong to no tensor (before 'a')"}},
      {"gap between tensors",
       make_file(obj(ok_a + "," + entry("b", "F32", "[1]", "[12,16]")), zeros(16)),
       {"bytes 8..12 belong to no tensor (before 'b')"}},
      {"overlap", make_file(obj(ok_a + "," + entry("b", "F32", "[2]", "[4,12]")), zeros(12)),
       {"tensors 'a' (bytes 0..8) and 'b' (bytes 4..12) overlap"}},
      {"same range twice", make_file(obj(ok_a + "," + entry("b", "F32", "[2]", "[0,8]")), zeros(8)), {"overlap"}},
      {"trailing bytes", make_file(obj(ok_a), zeros(9)),
       {"data section has 9 bytes but the tensors cover only 8"}},
      {"data but no tensors", make_file("{}", zeros(1)), {"data section has 1 bytes"}},
      {"duplicate tensor name", make_file(obj(ok_a + "," + entry("a", "F32", "[2]", "[0,8]")), zeros(8)),
       {"header has the key 'a' twice; tensor names must be unique"}},
      {"duplicate key in an entry",
       make_file(R"({"a":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}})", zeros(8)),
       {"header entry 'a' has the key 'dtype' twice"}},
      {"duplicate metadata key", make_file(R"({"__metadata__":{"k":"1","k":"2"}})"),
       {"entry '__metadata__' has the key 'k' twice"}},
      {"duplicate __metadata__", make_file(R"({"__metadata__":{},"__metadata__":{}})"), {"twice"}},
      {"empty name", make_file(obj(entry("", "F32", "[2]", "[0,8]")), zeros(8)), {"a tensor has an empty name"}},
  };
  for (const auto& c : cases) {
    CAPTURE(c.what);
    REQUIRE_THROWS_AS(SafetensorsFile::from_bytes(c.bytes, kBad), FormatError);
    for (const auto& m : c.message) REQUIRE_THROWS_WITH(SafetensorsFile::from_bytes(c.bytes, kBad), Contains(m));
    REQUIRE_THROWS_WITH(SafetensorsFile::from_bytes(c.bytes, kBad), Catch::StartsWith(kBad + ": "));
  }
  // The controls: the same shapes of file, made valid, are accepted.
  CHECK_NOTHROW(SafetensorsFile::from_bytes(make_file(obj(ok_a), zeros(8))));
  CHECK_NOTHROW(SafetensorsFile::from_bytes(
      make_file(obj(ok_a + "," + entry("b", "F32", "[1]", "[8,12]")), zeros(12))));
  CHECK_NOTHROW(SafetensorsFile::from_bytes(make_file(obj(entry("a", "F32", "[0,4611686018427387904]", "[0,0]")))));
  CHECK_NOTHROW(SafetensorsFile::from_bytes(make_file(obj(entry("a", "F32", "[1,1,1,1,2]", "[0,8]")), zeros(8))));
  CHECK_NOTHROW(SafetensorsFile::from_bytes(make_file(obj(entry("\xc3\xa9", "F32", "[-0]", "[0,0]")))));
}

TEST_CASE("safetensors: open refuses missing files, directories and empty files", "[safetensors]") {
  TempDir dir;
  const fs::path missing = dir.path / "nope.safetensors";
  REQUIRE_THROWS_AS(SafetensorsFile::open(missing), FormatError);
  REQUIRE_THROWS_WITH(SafetensorsFile::open(missing),
                      Contains(missing.string()) && Contains("cannot open") && Contains("No such file"));
  REQUIRE_THROWS_WITH(SafetensorsFile::open(dir.path), Contains("not a regular file"));
  std::ofstream(dir.path / "empty").close();
  REQUIRE_THROWS_WITH(SafetensorsFile::open(dir.path / "empty"), Contains("empty") && Contains("0 bytes long"));
  const auto bad = make_file(obj(entry("a", "F32", "[2]", "[0,8]")), zeros(4));
  {
    std::ofstream out(dir.path / "short", std::ios::binary);
    out.write(reinterpret_cast<const char*>(bad.data()), static_cast<std::streamsize>(bad.size()));
  }
  REQUIRE_THROWS_WITH(SafetensorsFile::open(dir.path / "short"), Contains("short: tensor 'a'") && Contains("past the end"));
}

TEST_CASE("safetensors: write is atomic and leaves nothing behind on error", "[safetensors]") {
  TempDir dir;
  Tensor<float, Host> t(Shape{3});
  fill(t.view(), 2.f);
  SafetensorsWriter w;
  w.add<float>("t", t.view());

  // Into a missing directory: an error, and no file appears.
  const fs::path inside_missing = dir.path / "missing" / "x.safetensors";
  REQUIRE_THROWS_AS(w.write(inside_missing), FormatError);
  REQUIRE_THROWS_WITH(w.write(inside_missing), Contains(inside_missing.string()) && Contains("cannot create"));
  CHECK_FALSE(fs::exists(dir.path / "missing"));
  CHECK(dir.listing().empty());

  // Over a directory: the data is fully written to the temp file, the rename fails,
  // and the temp file is removed.
  fs::create_directory(dir.path / "adir");
  REQUIRE_THROWS_WITH(w.write(dir.path / "adir"), Contains("cannot rename"));
  CHECK(dir.listing() == std::vector<std::string>{"adir"});

  // Over an existing file: replaced whole.
  {
    std::ofstream(dir.path / "m.safetensors") << "old contents";
  }
  w.write(dir.path / "m.safetensors");
  CHECK(SafetensorsFile::open(dir.path / "m.safetensors").read<float>("t")(2) == 2.f);
  CHECK(dir.listing() == std::vector<std::string>{"adir", "m.safetensors"});
}

TEST_CASE("safetensors: writer refuses bad names, sizes and dtypes", "[safetensors]") {
  Tensor<float, Host> t(Shape{2});
  fill(t.view(), 0.f);
  SafetensorsWriter w;
  w.add<float>("a", t.view());
  REQUIRE_THROWS_AS(w.add<float>("a", t.view()), InputError);
  REQUIRE_THROWS_WITH(w.add<float>("a", t.view()), Contains("'a' was already added"));
  REQUIRE_THROWS_WITH(w.add_as("a", DType::F16, t.view()), Contains("already added"));
  REQUIRE_THROWS_AS(w.add<float>("", t.view()), InputError);
  REQUIRE_THROWS_WITH(w.add<float>("__metadata__", t.view()), Contains("reserved"));
  REQUIRE_THROWS_WITH(w.add<float>("\xff", t.view()), Contains("not valid UTF-8"));
  REQUIRE_THROWS_WITH(w.set_metadata("k", "\xc0\x80"), Contains("metadata value") && Contains("not valid UTF-8"));
  REQUIRE_THROWS_WITH(w.add_as("b", DType::I32, t.view()), Contains("cannot store float data as I32"));
  const std::vector<std::byte> three(3);
  REQUIRE_THROWS_WITH(w.add_raw("c", DType::F16, Shape{2}, three), Contains("needs 4 bytes, got 3"));
  REQUIRE_THROWS_WITH(w.add<float>("d", TensorView<const float, Host>{}), Contains("view without storage"));
  REQUIRE_THROWS_WITH(w.add_as("d", DType::F16, TensorView<const float, Host>{}), Contains("view without storage"));
  // Nothing refused was added.
  CHECK(SafetensorsFile::from_bytes(w.to_bytes()).names() == std::vector<std::string>{"a"});
}

TEST_CASE("safetensors: moved files keep their data", "[safetensors]") {
  TempDir dir;
  Tensor<double, Host> t(Shape{4});
  for (index_t i = 0; i < 4; ++i) t(i) = 0.5 * static_cast<double>(i);
  SafetensorsWriter w;
  w.add<double>("t", t.view());
  w.write(dir.path / "m.safetensors");
  auto a = SafetensorsFile::open(dir.path / "m.safetensors");
  auto b = SafetensorsFile::from_bytes(w.to_bytes());
  SafetensorsFile c = std::move(a);
  SafetensorsFile d = std::move(b);
  CHECK(c.read<double>("t")(3) == 1.5);
  CHECK(d.read<double>("t")(3) == 1.5);
  c = std::move(d);
  CHECK(c.read<double>("t")(1) == 0.5);
  CHECK(c.name() == "<memory>");
}
