// A deterministic mutation fuzzer for the safetensors reader, run in ctest.
//
// Valid files (several dtypes, metadata, many tensors, misaligned data) are mutated
// thousands of times: bit flips, interesting byte values, truncations, extensions,
// header-length edits and JSON token edits (numbers in shape / data_offsets, dtype
// names, duplicated keys and entries). Every mutant must either be refused with a
// longmem::Error, or be accepted as a file whose every tensor reads back from inside
// the buffer, whose tensors tile the data section, and which SafetensorsWriter writes
// back as an equal file. Under AddressSanitizer this also
// proves that no mutant makes the reader touch memory outside the buffer.
#include <catch2/catch.hpp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "longmem/safetensors.hpp"

using namespace longmem;

namespace {

using Bytes = std::vector<std::byte>;

Bytes hand_file(const std::string& header, const Bytes& data) {
  Bytes out(8);
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::byte>((n >> (8 * i)) & 0xff);
  for (char c : header) out.push_back(static_cast<std::byte>(c));
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

/// The valid files every mutation starts from.
std::vector<Bytes> seed_files() {
  std::vector<Bytes> seeds;
  std::mt19937_64 rng(2024);
  std::normal_distribution<float> nd;

  {  // many tensors of every dtype and rank, with metadata
    SafetensorsWriter w;
    w.set_metadata({{"format", "pt"}, {"n_layer", "2"}, {"note", "caf\xc3\xa9"}});
    const Shape shapes[] = {Shape{}, Shape{3}, Shape{0}, Shape{2, 3}, Shape{1, 2, 0}, Shape{2, 1, 2, 1}, Shape{1, 1, 2, 1, 2}};
    int i = 0;
    for (const Shape& s : shapes) {
      Tensor<float, Host> t(s);
      for (auto& v : t) v = nd(rng);
      for (DType dt : {DType::F16, DType::BF16, DType::F32, DType::F64}) w.add_as("t" + std::to_string(i++), dt, t.view());
      Tensor<std::int64_t, Host> q(s);
      for (auto& v : q) v = static_cast<std::int64_t>(rng());
      w.add<std::int64_t>("q" + std::to_string(i++), q.view());
      Tensor<std::int32_t, Host> r(s);
      for (auto& v : r) v = static_cast<std::int32_t>(rng() % 1000);
      w.add<std::int32_t>("r" + std::to_string(i++), r.view());
    }
    seeds.push_back(w.to_bytes());
  }
  {  // one small tensor
    SafetensorsWriter w;
    Tensor<float, Host> t(Shape{4});
    for (auto& v : t) v = nd(rng);
    w.add_as("wte", DType::F16, t.view());
    seeds.push_back(w.to_bytes());
  }
  {  // hand-written: odd header length, misaligned data, I64 values that fit in int32
    Bytes data;
    auto put = [&](auto v) {
      const auto* p = reinterpret_cast<const std::byte*>(&v);
      data.insert(data.end(), p, p + sizeof v);
    };
    put(std::uint16_t{0x3c00});
    put(1.5f);
    put(2.5f);
    put(std::int64_t{-3});
    put(0.25);
    seeds.push_back(hand_file(
        R"({"a":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},"b":{"dtype":"F32","shape":[2,1],"data_offsets":[2,10]},)"
        R"("c":{"dtype":"I64","shape":[1],"data_offsets":[10,18]},"d":{"dtype":"F64","shape":[],"data_offsets":[18,26]},)"
        R"("__metadata__":{"k":"v"}})",
        data));
  }
  seeds.push_back(hand_file("{}", {}));
  seeds.push_back(hand_file(R"({"__metadata__":{"a":"b"},"z":{"dtype":"BF16","shape":[0,3],"data_offsets":[0,0]}})", {}));
  return seeds;
}

class Mutator {
 public:
  explicit Mutator(std::uint64_t seed) : rng_(seed) {}

  std::size_t below(std::size_t n) { return n == 0 ? 0 : std::uniform_int_distribution<std::size_t>(0, n - 1)(rng_); }

  /// Applies one random mutation; returns its name for failure messages.
  const char* mutate(Bytes& b) {
    switch (below(11)) {
      case 0: bit_flip(b); return "bit flip";
      case 1: interesting_byte(b); return "interesting byte";
      case 2: b.resize(below(b.size() + 1)); return "truncation";
      case 3: extend(b); return "extension";
      case 4: header_length(b); return "header length";
      case 5: edit_number(b); return "number edit";
      case 6: edit_dtype(b); return "dtype edit";
      case 7: duplicate_key(b); return "duplicate key";
      case 8: splice_header(b); return "header splice";
      case 9: delete_span(b); return "span deletion";
      default: insert_token(b); return "token insertion";
    }
  }

 private:
  static constexpr std::uint8_t interesting[] = {0x00, 0x01, 0x7f, 0x80, 0xff, 0xfe, '"', '{', '}', '[', ']', ',',
                                                 ':',  '-',  '0',  '9',  ' ',  '\\', 0xc0, 0xed, 0xf4, 'e', '.'};

  /// Header position range [8, 8 + n) clamped to the buffer; mutations favour it.
  std::pair<std::size_t, std::size_t> header_range(const Bytes& b) const {
    if (b.size() < 8) return {0, b.size()};
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<std::uint64_t>(b[static_cast<std::size_t>(i)]);
    return {8, 8 + static_cast<std::size_t>(std::min<std::uint64_t>(n, b.size() - 8))};
  }
  std::size_t position(const Bytes& b) {
    const auto [lo, hi] = header_range(b);
    if (hi > lo && below(4) != 0) return lo + below(hi - lo);
    return below(b.size());
  }
  std::string header_text(const Bytes& b) const {
    const auto [lo, hi] = header_range(b);
    return std::string(reinterpret_cast<const char*>(b.data()) + lo, hi - lo);
  }
  /// Replaces the header text, fixing the length field most of the time.
  void set_header(Bytes& b, const std::string& text) {
    const auto [lo, hi] = header_range(b);
    if (b.size() < 8) return;
    Bytes out(b.begin(), b.begin() + static_cast<std::ptrdiff_t>(lo));
    for (char c : text) out.push_back(static_cast<std::byte>(c));
    out.insert(out.end(), b.begin() + static_cast<std::ptrdiff_t>(hi), b.end());
    if (below(5) != 0) {
      for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::byte>((text.size() >> (8 * i)) & 0xff);
    }
    b = std::move(out);
  }

  void bit_flip(Bytes& b) {
    if (b.empty()) return;
    b[position(b)] ^= static_cast<std::byte>(1u << below(8));
  }
  void interesting_byte(Bytes& b) {
    if (b.empty()) return;
    b[position(b)] = static_cast<std::byte>(interesting[below(sizeof interesting)]);
  }
  void extend(Bytes& b) {
    const std::size_t k = 1 + below(64);
    const bool zero = below(2);
    for (std::size_t i = 0; i < k; ++i) b.push_back(zero ? std::byte{0} : static_cast<std::byte>(below(256)));
  }
  void header_length(Bytes& b) {
    if (b.size() < 8) return;
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<std::uint64_t>(b[static_cast<std::size_t>(i)]);
    const std::uint64_t choices[] = {0, 1, 2, n - 1, n + 1, n + 8, n - 8, b.size() - 8, b.size() - 7, b.size(),
                                     100'000'000, 100'000'001, ~std::uint64_t{0}, ~std::uint64_t{0} - 7,
                                     std::uint64_t{1} << 63, n + below(64), rng_()};
    n = choices[below(std::size(choices))];
    for (int i = 0; i < 8; ++i) b[static_cast<std::size_t>(i)] = static_cast<std::byte>((n >> (8 * i)) & 0xff);
  }
  void edit_number(Bytes& b) {
    std::string h = header_text(b);
    std::vector<std::pair<std::size_t, std::size_t>> numbers;  // [begin, end) of digit runs
    for (std::size_t i = 0; i < h.size();) {
      if (h[i] >= '0' && h[i] <= '9') {
        std::size_t j = i;
        while (j < h.size() && h[j] >= '0' && h[j] <= '9') ++j;
        numbers.emplace_back(i, j);
        i = j;
      } else {
        ++i;
      }
    }
    if (numbers.empty()) return;
    const auto [lo, hi] = numbers[below(numbers.size())];
    const long long old = std::atoll(h.substr(lo, std::min<std::size_t>(hi - lo, 18)).c_str());
    const std::string choices[] = {"0", "1", "-1", std::to_string(old + 1), std::to_string(old - 1),
                                   std::to_string(old * 2), std::to_string(old + 4), std::to_string(old + 8),
                                   "18446744073709551615", "18446744073709551616", "9223372036854775807",
                                   "9223372036854775808", "4294967296", "1e3", "2.5", "-0", "00", "1E400",
                                   std::to_string(below(1000))};
    h.replace(lo, hi - lo, choices[below(std::size(choices))]);
    set_header(b, h);
  }
  void edit_dtype(Bytes& b) {
    std::string h = header_text(b);
    const std::size_t at = h.find("\"dtype\":\"", below(h.size() + 1));
    if (at == std::string::npos) return;
    const std::size_t begin = at + 9, end = h.find('"', begin);
    if (end == std::string::npos) return;
    const char* names[] = {"F16", "BF16", "F32", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "X", ""};
    h.replace(begin, end - begin, names[below(std::size(names))]);
    set_header(b, h);
  }
  void duplicate_key(Bytes& b) {
    // Copies one "key":value pair (a field or a whole entry) next to itself.
    std::string h = header_text(b);
    const std::size_t q = h.find('"', below(h.size() + 1));
    if (q == std::string::npos) return;
    const std::size_t q2 = h.find('"', q + 1);
    if (q2 == std::string::npos || q2 + 1 >= h.size() || h[q2 + 1] != ':') return;
    std::size_t end = q2 + 2;
    int depth = 0;
    for (; end < h.size(); ++end) {
      const char c = h[end];
      if (c == '{' || c == '[') ++depth;
      if (c == '}' || c == ']') {
        if (depth == 0) break;
        --depth;
      }
      if (c == ',' && depth == 0) break;
    }
    const std::string pair = h.substr(q, end - q);
    h.insert(q, pair + ",");
    set_header(b, h);
  }
  void splice_header(Bytes& b) {
    // Moves a chunk of header text elsewhere (swaps offsets, shapes, names between entries).
    std::string h = header_text(b);
    if (h.size() < 4) return;
    const std::size_t a = below(h.size()), len = 1 + below(std::min<std::size_t>(16, h.size() - a));
    const std::string piece = h.substr(a, len);
    h.erase(a, len);
    h.insert(below(h.size() + 1), piece);
    set_header(b, h);
  }
  void delete_span(Bytes& b) {
    if (b.empty()) return;
    const std::size_t a = position(b), len = 1 + below(std::min<std::size_t>(8, b.size() - a));
    b.erase(b.begin() + static_cast<std::ptrdiff_t>(a), b.begin() + static_cast<std::ptrdiff_t>(a + len));
  }
  void insert_token(Bytes& b) {
    std::string h = header_text(b);
    const char* tokens[] = {"{", "}", "[", "]", ",", ":", "\"\"", "null", "true", "[[[[", "\"__metadata__\":{}",
                            "\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}", "\\u0000", "\\ud800", " "};
    h.insert(below(h.size() + 1), tokens[below(std::size(tokens))]);
    set_header(b, h);
  }

  std::mt19937_64 rng_;
};

/// Opens a mutant; if it is accepted, reads every tensor and checks the invariants.
/// Returns true if accepted. Anything but a longmem::Error escaping fails the test.
bool exercise(const Bytes& b) {
  SafetensorsFile f = [&] { return SafetensorsFile::from_bytes(b, "mutant"); }();
  std::uint64_t n = 0;
  std::memcpy(&n, b.data(), 8);
  const std::size_t data_begin = 8 + static_cast<std::size_t>(n);
  std::size_t covered = 0;
  SafetensorsWriter w;  // what was accepted must survive a round trip through the writer
  w.set_metadata(f.metadata());
  for (const std::string& name : f.names()) {
    const TensorInfo& ti = f.info(name);
    REQUIRE(ti.name == name);
    REQUIRE(ti.begin <= ti.end);
    REQUIRE(data_begin + ti.end <= b.size());
    REQUIRE(ti.bytes() == static_cast<std::size_t>(ti.shape.numel()) * dtype_size(ti.dtype));
    covered += ti.bytes();
    const auto raw = f.raw(name);
    REQUIRE(raw.size() == ti.bytes());
    REQUIRE((raw.empty() || std::memcmp(raw.data(), b.data() + data_begin + ti.begin, raw.size()) == 0));
    if (ti.dtype == DType::I32 || ti.dtype == DType::I64) {
      const auto v = f.read<std::int64_t>(name);
      REQUIRE(v.shape() == ti.shape);
      try {
        (void)f.read<std::int32_t>(name);
      } catch (const FormatError&) {
        REQUIRE(ti.dtype == DType::I64);  // only a value outside int32 may refuse
      }
    } else {
      const auto v = f.read<float>(name);
      const auto d = f.read<double>(name, ti.shape);
      REQUIRE(v.shape() == ti.shape);
      REQUIRE(d.numel() == v.numel());
      if (ti.dtype == DType::F32) REQUIRE((v.bytes() == 0 || std::memcmp(v.data(), raw.data(), v.bytes()) == 0));
    }
    w.add_raw(name, ti.dtype, ti.shape, raw);
  }
  REQUIRE(covered == b.size() - data_begin);  // the tensors tile the data section
  const SafetensorsFile g = SafetensorsFile::from_bytes(w.to_bytes(), "rewritten");
  REQUIRE(g.names() == f.names());
  REQUIRE(g.metadata() == f.metadata());
  for (const std::string& name : f.names()) {
    const auto a = f.raw(name), c = g.raw(name);
    REQUIRE(f.info(name).shape == g.info(name).shape);
    REQUIRE(f.info(name).dtype == g.info(name).dtype);
    REQUIRE(a.size() == c.size());
    REQUIRE((a.empty() || std::memcmp(a.data(), c.data(), a.size()) == 0));
  }
  return true;
}

}  // namespace

TEST_CASE("safetensors: mutated files are refused with a longmem::Error or read safely", "[safetensors][fuzz]") {
  const std::uint64_t seed = 0x5afe7e45;
  const auto seeds = seed_files();
  for (const auto& s : seeds) REQUIRE(exercise(s));  // the seeds themselves are valid

  Mutator m(seed);
  constexpr int rounds = 4000;  // per seed file
  int total = 0, accepted = 0, refused = 0;
  for (std::size_t si = 0; si < seeds.size(); ++si) {
    for (int round = 0; round < rounds; ++round) {
      Bytes b = seeds[si];
      const int count = 1 + static_cast<int>(m.below(3));  // stacked mutations
      std::string what;
      for (int k = 0; k < count; ++k) what += std::string(k ? " + " : "") + m.mutate(b);
      CAPTURE(seed, si, round, what);
      ++total;
      try {
        if (exercise(b)) ++accepted;
      } catch (const longmem::Error&) {
        ++refused;
      } catch (const std::exception& e) {
        FAIL("a mutant escaped as a non-longmem exception: " << e.what());
      }
    }
  }
  std::printf("safetensors mutation test: %d inputs, %d accepted, %d refused (seed %#llx)\n", total, accepted, refused,
              static_cast<unsigned long long>(seed));
  CHECK(total == rounds * static_cast<int>(seeds.size()));
  // Both outcomes must occur, or the mutations are not exercising the validator.
  CHECK(accepted > total / 50);
  CHECK(refused > total / 2);
}
