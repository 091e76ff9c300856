#pragma once
// Reading and writing safetensors files.
//
// Format: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data
// section. The JSON object maps tensor names to {"dtype", "shape", "data_offsets"}
// (offsets relative to the data section) plus an optional "__metadata__" object of
// string -> string. Data is row-major and little-endian.
//
// SafetensorsFile validates everything on open, so a corrupted or hostile file is
// refused with a FormatError rather than crashing a reader later:
//   - header length: >= 1, <= 100 MB (as the reference implementation), inside the file;
//   - header: valid UTF-8, JSON, an object, nesting no deeper than the format needs, no
//     duplicate keys at any level (plain nlohmann::json would keep the last duplicate);
//   - each entry: exactly dtype / shape / data_offsets; a supported dtype; rank <= 5;
//     non-negative integer extents and offsets; element count * dtype size == end - begin,
//     computed without overflow;
//   - the byte ranges tile the data section exactly (sorted by begin: start at 0, no
//     gap, no overlap, end at the end of the file).
// The data section is then touched only through validated ranges, with memcpy, since
// the spec allows offsets that are not multiples of the element size.
//
// Read conversions (read<T>, read_into<T>):
//   stored F16 BF16 F32 F64  ->  float, double, half, bfloat16 (via float where narrowing)
//   stored I32 I64           ->  std::int32_t, std::int64_t (I64 -> int32 range-checked)
// A floating-point tensor read as an integer type, or the reverse, is a ShapeError.
#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "longmem/detail/mapped_file.hpp"
#include "longmem/dtype.hpp"
#include "longmem/error.hpp"
#include "longmem/tensor.hpp"

namespace longmem {

static_assert(std::endian::native == std::endian::little,
              "longmem reads safetensors data (little-endian) by copying bytes; a big-endian host needs byte swapping "
              "added to safetensors.hpp");

/// One tensor's entry in a safetensors header.
struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  std::size_t begin = 0;  // byte offset inside the data section
  std::size_t end = 0;    // one past the last byte
  std::size_t bytes() const { return end - begin; }
};

namespace detail {

/// Largest header the reader accepts, as the reference implementation (100 MB).
inline constexpr std::uint64_t safetensors_max_header = 100'000'000;

/// Offset of the first byte that breaks UTF-8 (overlong forms, surrogates and code
/// points above U+10FFFF included), or s.size() if the whole string is valid.
inline std::size_t utf8_invalid_at(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len;
    unsigned lo = 0x80, hi = 0xbf;  // allowed range of the second byte
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0) lo = 0xa0;        // overlong
      if (c == 0xed) hi = 0x9f;        // surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0) lo = 0x90;        // overlong
      if (c == 0xf4) hi = 0x8f;        // above U+10FFFF
    } else {
      return i;
    }
    if (n - i < len) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k) {
      if (p[i + k] < 0x80 || p[i + k] > 0xbf) return i;
    }
    i += len;
  }
  return n;
}

/// A string for an error message: quoted and cut to a readable length.
inline std::string quote_text(std::string_view s, std::size_t max = 80) {
  if (s.size() <= max) return "'" + std::string(s) + "'";
  return "'" + std::string(s.substr(0, max)) + "...' (" + std::to_string(s.size()) + " bytes)";
}

/// What a JSON value is, for error messages; scalars are shown, containers named.
inline std::string describe(const nlohmann::json& v) {
  switch (v.type()) {
    case nlohmann::json::value_t::string: return "the string " + quote_text(v.get_ref<const std::string&>(), 40);
    case nlohmann::json::value_t::number_integer:
    case nlohmann::json::value_t::number_unsigned:
    case nlohmann::json::value_t::number_float:
    case nlohmann::json::value_t::boolean:
    case nlohmann::json::value_t::null: return v.dump();
    case nlohmann::json::value_t::array: return "an array of " + std::to_string(v.size()) + " elements";
    case nlohmann::json::value_t::object: return "an object";
    default: return std::string("a ") + v.type_name();
  }
}

/// Reads a JSON number that must be a non-negative integer (nlohmann stores "-0" as a
/// signed 0, large or fractional numbers as floats).
inline bool json_nonneg_integer(const nlohmann::json& v, std::uint64_t& out) {
  if (v.is_number_unsigned()) {
    out = v.get<std::uint64_t>();
    return true;
  }
  if (v.is_number_integer() && v.get<std::int64_t>() >= 0) {
    out = static_cast<std::uint64_t>(v.get<std::int64_t>());
    return true;
  }
  return false;
}

/// Parses the header JSON, refusing duplicate keys (at any level) and nesting deeper
/// than the format needs (top object > entry object > shape array), so that no
/// attacker-chosen structure is ever walked recursively.
inline nlohmann::json parse_safetensors_header(std::string_view text, const std::string& file) {
  struct Frame {
    std::set<std::string> keys;
    std::string name;  // the key this object sits under ("" at the top)
  };
  std::vector<Frame> frames;
  std::string last_key;
  auto callback = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) -> bool {
    using E = nlohmann::json::parse_event_t;
    if ((event == E::object_start || event == E::array_start) && depth >= 3) {
      fail<FormatError>(file, ": header nests objects or arrays deeper than a safetensors header can (under ",
                        frames.empty() ? std::string("the top level") : quote_text(frames.back().name), ")");
    }
    if (event == E::object_start) {
      frames.push_back({{}, frames.empty() ? std::string() : last_key});
    } else if (event == E::object_end) {
      if (!frames.empty()) frames.pop_back();
    } else if (event == E::key) {
      last_key = parsed.get<std::string>();
      if (!frames.back().keys.insert(last_key).second) {
        if (frames.size() == 1) {
          fail<FormatError>(file, ": header has the key ", quote_text(last_key), " twice; tensor names must be unique");
        }
        fail<FormatError>(file, ": header entry ", quote_text(frames.back().name), " has the key ", quote_text(last_key),
                          " twice");
      }
    }
    return true;
  };
  try {
    return nlohmann::json::parse(text.begin(), text.end(), callback);
  } catch (const nlohmann::json::exception& e) {
    fail<FormatError>(file, ": header is not valid JSON: ", e.what());
  }
}

template <class T>
inline constexpr bool is_float_target_v = std::is_same_v<T, float> || std::is_same_v<T, double> ||
                                          std::is_same_v<T, half> || std::is_same_v<T, bfloat16>;
template <class T>
inline constexpr bool is_int_target_v = std::is_same_v<T, std::int32_t> || std::is_same_v<T, std::int64_t>;

/// One stored floating-point element converted to D (exact wherever D can hold it).
template <class D, class S>
D convert_float(S s) {
  if constexpr (std::is_same_v<D, S>) {
    return s;
  } else if constexpr (std::is_same_v<D, double>) {
    if constexpr (std::is_same_v<S, float>) return static_cast<double>(s);
    else return static_cast<double>(to_float(s));
  } else if constexpr (std::is_same_v<S, double>) {
    return from_float<D>(static_cast<float>(s));
  } else {
    return from_float<D>(to_float(s));
  }
}

/// Copies n stored elements of type S (possibly unaligned) into dst, converting.
template <class D, class S, class Convert>
void convert_elements(const std::byte* src, D* dst, std::size_t n, Convert convert) {
  if constexpr (std::is_same_v<D, S>) {
    if (n) std::memcpy(dst, src, n * sizeof(S));
  } else {
    for (std::size_t i = 0; i < n; ++i) {
      S s;
      std::memcpy(&s, src + i * sizeof(S), sizeof(S));
      dst[i] = convert(s, i);
    }
  }
}

}  // namespace detail

/// A read-only safetensors file, memory-mapped (or owned bytes for from_bytes), validated on open.
class SafetensorsFile {
 public:
  /// Maps and validates the file; FormatError if it cannot be read or is not a valid safetensors file.
  static SafetensorsFile open(const std::filesystem::path& path) {
    SafetensorsFile f;
    f.name_ = path.string();
    f.storage_ = detail::MappedFile::open(path);
    f.validate();
    return f;
  }

  /// Validates bytes already in memory; `name` is used in messages.
  static SafetensorsFile from_bytes(std::vector<std::byte> bytes, std::string name = "<memory>") {
    SafetensorsFile f;
    f.name_ = std::move(name);
    f.storage_ = std::move(bytes);
    f.validate();
    return f;
  }

  SafetensorsFile(SafetensorsFile&&) noexcept = default;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept = default;

  /// The path or given name, used in messages.
  const std::string& name() const { return name_; }
  /// __metadata__ (empty if absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(std::string_view tensor) const { return tensors_.find(tensor) != tensors_.end(); }

  const TensorInfo& info(std::string_view tensor) const {
    const auto it = tensors_.find(tensor);
    if (it == tensors_.end()) {
      detail::fail<ShapeError>(name_, ": no tensor ", detail::quote_text(tensor), " (the file has ", tensors_.size(),
                               " tensors)");
    }
    return it->second;
  }

  /// Tensor names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(tensors_.size());
    for (const auto& kv : tensors_) out.push_back(kv.first);
    return out;
  }

  /// The stored bytes of a tensor (little-endian, possibly unaligned).
  std::span<const std::byte> raw(std::string_view tensor) const {
    const TensorInfo& ti = info(tensor);
    return data_section().subspan(ti.begin, ti.bytes());
  }

  /// Reads a tensor converting to T (see the table at the top of this header).
  template <class T>
  Tensor<T, Host> read(std::string_view tensor) const {
    Tensor<T, Host> out(info(tensor).shape);
    read_into<T>(tensor, out.view());
    return out;
  }

  /// Same, but the stored shape must equal `expected`.
  template <class T>
  Tensor<T, Host> read(std::string_view tensor, const Shape& expected) const {
    const TensorInfo& ti = info(tensor);
    if (!(ti.shape == expected)) {
      detail::fail<ShapeError>(name_, ": tensor ", detail::quote_text(tensor), " has shape ", ti.shape.str(), ", expected ",
                               expected.str());
    }
    return read<T>(tensor);
  }

  /// Converts into an existing host view of exactly the stored shape.
  template <class T>
  void read_into(std::string_view tensor, TensorView<T, Host> dst) const {
    static_assert(detail::is_float_target_v<T> || detail::is_int_target_v<T>,
                  "SafetensorsFile reads into float, double, half, bfloat16, std::int32_t or std::int64_t");
    const TensorInfo& ti = info(tensor);
    if (!(dst.shape() == ti.shape)) {
      detail::fail<ShapeError>(name_, ": tensor ", detail::quote_text(tensor), " has shape ", ti.shape.str(),
                               ", but the destination has shape ", dst.shape().str());
    }
    const std::byte* src = data_section().data() + ti.begin;
    const auto n = static_cast<std::size_t>(ti.shape.numel());
    T* out = dst.data();
    if (n > 0 && out == nullptr) {
      detail::fail<ShapeError>(name_, ": tensor ", detail::quote_text(tensor),
                               " cannot be read into a view without storage (a default-constructed view)");
    }
    if constexpr (detail::is_float_target_v<T>) {
      auto conv = [](auto s, std::size_t) { return detail::convert_float<T>(s); };
      switch (ti.dtype) {
        case DType::F16: return detail::convert_elements<T, half>(src, out, n, conv);
        case DType::BF16: return detail::convert_elements<T, bfloat16>(src, out, n, conv);
        case DType::F32: return detail::convert_elements<T, float>(src, out, n, conv);
        case DType::F64: return detail::convert_elements<T, double>(src, out, n, conv);
        default:
          detail::fail<ShapeError>(name_, ": tensor ", detail::quote_text(tensor), " has dtype ", dtype_name(ti.dtype),
                                   ", expected a floating-point dtype (F16, BF16, F32 or F64)");
      }
    } else {
      switch (ti.dtype) {
        case DType::I32:
          return detail::convert_elements<T, std::int32_t>(src, out, n,
                                                           [](std::int32_t s, std::size_t) { return T(s); });
        case DType::I64:
          return detail::convert_elements<T, std::int64_t>(src, out, n, [&](std::int64_t s, std::size_t i) {
            if constexpr (std::is_same_v<T, std::int32_t>) {
              if (s < std::numeric_limits<std::int32_t>::min() || s > std::numeric_limits<std::int32_t>::max()) {
                detail::fail<FormatError>(name_, ": tensor ", detail::quote_text(tensor), " (I64) holds ", s,
                                          " at element ", i, ", which does not fit in int32; read it as int64");
              }
            }
            return static_cast<T>(s);
          });
        default:
          detail::fail<ShapeError>(name_, ": tensor ", detail::quote_text(tensor), " has dtype ", dtype_name(ti.dtype),
                                   ", expected an integer dtype (I32 or I64)");
      }
    }
  }

 private:
  SafetensorsFile() = default;

  std::span<const std::byte> bytes() const {
    if (const auto* m = std::get_if<detail::MappedFile>(&storage_)) return m->bytes();
    return std::get<std::vector<std::byte>>(storage_);
  }
  std::span<const std::byte> data_section() const { return bytes().subspan(data_begin_); }

  template <class... Args>
  [[noreturn]] void bad(Args&&... args) const {
    detail::fail<FormatError>(name_, ": ", std::forward<Args>(args)...);
  }

  void validate() {
    const std::span<const std::byte> all = bytes();
    if (all.size() < 8) {
      bad("file is ", all.size(), " bytes long; a safetensors file starts with an 8-byte header length");
    }
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<std::uint64_t>(all[static_cast<std::size_t>(i)]);
    if (n == 0) bad("header length is 0; expected a JSON header of at least 2 bytes");
    if (n > detail::safetensors_max_header) {
      bad("header length ", n, " exceeds the limit of ", detail::safetensors_max_header, " bytes");
    }
    if (n > all.size() - 8) {
      bad("header length ", n, " is larger than the ", all.size() - 8, " bytes that follow it");
    }
    const std::string_view text(reinterpret_cast<const char*>(all.data()) + 8, static_cast<std::size_t>(n));
    data_begin_ = 8 + static_cast<std::size_t>(n);
    const std::size_t data_size = all.size() - data_begin_;

    if (const std::size_t at = detail::utf8_invalid_at(text); at != text.size()) {
      bad("header is not valid UTF-8 (byte ", at, " of the header)");
    }
    // JSON never holds a raw NUL, and nlohmann's lexer would take one for the end of input.
    if (const std::size_t at = text.find('\0'); at != std::string_view::npos) {
      bad("header has a NUL byte at byte ", at, " of the header; JSON does not allow one");
    }
    const nlohmann::json header = detail::parse_safetensors_header(text, name_);
    if (!header.is_object()) bad("header is ", detail::describe(header), ", expected a JSON object");

    std::vector<const TensorInfo*> by_offset;
    for (const auto& [key, value] : header.items()) {
      if (key == "__metadata__") {
        read_metadata(value);
        continue;
      }
      TensorInfo ti = read_entry(key, value, data_size);
      auto [it, inserted] = tensors_.emplace(key, std::move(ti));
      if (!inserted) bad("duplicate tensor name ", detail::quote_text(key));  // guarded by the parser too
      by_offset.push_back(&it->second);
    }

    // Zero-sized tensors sort before a tensor starting at the same offset.
    std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    std::size_t expected = 0;
    const TensorInfo* prev = nullptr;
    for (const TensorInfo* t : by_offset) {
      if (t->begin < expected) {
        bad("tensors ", detail::quote_text(prev->name), " (bytes ", prev->begin, "..", prev->end, ") and ",
            detail::quote_text(t->name), " (bytes ", t->begin, "..", t->end, ") overlap");
      }
      if (t->begin > expected) {
        bad("gap in the data section: bytes ", expected, "..", t->begin, " belong to no tensor (before ",
            detail::quote_text(t->name), ")");
      }
      expected = t->end;
      prev = t;
    }
    if (expected != data_size) {
      bad("data section has ", data_size, " bytes but the tensors cover only ", expected,
          "; the last ", data_size - expected, " bytes belong to no tensor");
    }
  }

  void read_metadata(const nlohmann::json& value) {
    if (!value.is_object()) bad("__metadata__ is ", detail::describe(value), ", expected an object of strings");
    for (const auto& [k, v] : value.items()) {
      if (!v.is_string()) {
        bad("__metadata__ value of ", detail::quote_text(k), " is ", detail::describe(v), ", expected a string");
      }
      metadata_.emplace(k, v.get<std::string>());
    }
  }

  TensorInfo read_entry(const std::string& key, const nlohmann::json& value, std::size_t data_size) const {
    const std::string tname = "tensor " + detail::quote_text(key);
    if (key.empty()) bad("a tensor has an empty name");
    if (!value.is_object()) bad(tname, " is ", detail::describe(value), ", expected an object");
    for (const auto& [k, v] : value.items()) {
      (void)v;
      if (k != "dtype" && k != "shape" && k != "data_offsets") {
        bad(tname, " has the unexpected key ", detail::quote_text(k), "; expected only dtype, shape and data_offsets");
      }
    }
    for (const char* need : {"dtype", "shape", "data_offsets"}) {
      if (!value.contains(need)) bad(tname, " has no \"", need, "\"");
    }

    TensorInfo ti;
    ti.name = key;
    const nlohmann::json& dt = value["dtype"];
    if (!dt.is_string()) bad(tname, " has dtype ", detail::describe(dt), ", expected a string such as \"F32\"");
    const std::string& dts = dt.get_ref<const std::string&>();
    if (!parse_dtype(dts, ti.dtype)) {
      static constexpr std::string_view known[] = {"BOOL",  "U8",      "I8",      "I16",     "U16",
                                                   "U32",   "U64",     "F8_E4M3", "F8_E5M2", "F8_E8M0",
                                                   "F4",    "F6_E2M3", "F6_E3M2", "C64"};
      const bool valid = std::find(std::begin(known), std::end(known), dts) != std::end(known);
      bad(tname, " has dtype ", detail::quote_text(dts, 40),
          valid ? ", a safetensors dtype that longmem does not support" : ", which is not a safetensors dtype",
          "; supported: F16, BF16, F32, F64, I32, I64");
    }

    const nlohmann::json& sh = value["shape"];
    if (!sh.is_array()) bad(tname, " has shape ", detail::describe(sh), ", expected an array of integers");
    if (sh.size() > static_cast<std::size_t>(Shape::max_rank)) {
      bad(tname, " has rank ", sh.size(), "; longmem supports at most ", Shape::max_rank, " dimensions");
    }
    // The product is taken over the non-zero extents too, so that no product of
    // extents (strides included) can overflow later, even for an empty tensor.
    std::uint64_t nonzero = 1;
    bool has_zero = false, overflow = false;
    for (const auto& e : sh) {
      std::uint64_t d;
      if (!detail::json_nonneg_integer(e, d)) {
        bad(tname, " has shape extent ", detail::describe(e), ", expected a non-negative integer");
      }
      if (d == 0) has_zero = true;
      else if (__builtin_mul_overflow(nonzero, d, &nonzero)) overflow = true;
      if (d > static_cast<std::uint64_t>(std::numeric_limits<index_t>::max())) overflow = true;
      ti.shape.push_back(static_cast<index_t>(d));
    }
    if (nonzero > static_cast<std::uint64_t>(std::numeric_limits<index_t>::max())) overflow = true;
    std::uint64_t expect_bytes = 0;
    if (!overflow) {
      overflow = __builtin_mul_overflow(has_zero ? 0 : nonzero, std::uint64_t{dtype_size(ti.dtype)}, &expect_bytes);
    }
    if (overflow) bad(tname, " has shape ", ti.shape.str(), ", whose element count overflows 64 bits");

    const nlohmann::json& off = value["data_offsets"];
    if (!off.is_array() || off.size() != 2) {
      bad(tname, " has data_offsets ", detail::describe(off), ", expected an array [begin, end]");
    }
    std::uint64_t b, e;
    if (!detail::json_nonneg_integer(off[0], b) || !detail::json_nonneg_integer(off[1], e)) {
      bad(tname, " has data_offsets [", off[0].dump(), ", ", off[1].dump(), "], expected non-negative integers");
    }
    if (b > e) bad(tname, " has data_offsets [", b, ", ", e, "] with begin after end");
    if (e > data_size) {
      bad(tname, " has data_offsets [", b, ", ", e, "], past the end of the ", data_size, "-byte data section");
    }
    if (e - b != expect_bytes) {
      bad(tname, " has shape ", ti.shape.str(), " and dtype ", dtype_name(ti.dtype), ", which take ", expect_bytes,
          " bytes, but data_offsets [", b, ", ", e, "] span ", e - b);
    }
    ti.begin = static_cast<std::size_t>(b);
    ti.end = static_cast<std::size_t>(e);
    return ti;
  }

  std::string name_;
  std::variant<detail::MappedFile, std::vector<std::byte>> storage_;
  std::size_t data_begin_ = 0;  // offset of the data section in bytes()
  std::map<std::string, TensorInfo, std::less<>> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// Builds a safetensors file in memory and writes it atomically (temp file + rename).
/// Tensors are laid out in name order; the header is padded with spaces so that the
/// data section starts at a multiple of 8 bytes, as the reference implementation does.
class SafetensorsWriter {
 public:
  void set_metadata(std::string key, std::string value) {
    check_text(key, "metadata key");
    check_text(value, "metadata value");
    metadata_[std::move(key)] = std::move(value);
  }

  /// Merges: keys already set are overwritten.
  void set_metadata(const std::map<std::string, std::string>& all) {
    for (const auto& [k, v] : all) set_metadata(k, v);
  }

  /// Copies the data; DType from dtype_of_v<T>. Duplicate names are an InputError.
  template <class T>
  void add(std::string name, TensorView<const T, Host> t) {
    if (t.shape().numel() > 0 && t.data() == nullptr) {
      detail::fail<InputError>("SafetensorsWriter: tensor ", detail::quote_text(name),
                               " is a view without storage (a default-constructed view)");
    }
    const auto* p = reinterpret_cast<const std::byte*>(t.data());
    add_raw(std::move(name), dtype_of_v<T>, t.shape(), std::span<const std::byte>(p, t.bytes()));
  }

  /// Stores float data as `dtype` (F16, BF16, F32 or F64), rounding to nearest even.
  void add_as(std::string name, DType dtype, TensorView<const float, Host> t) {
    check_name(name);
    if (t.shape().numel() > 0 && t.data() == nullptr) {
      detail::fail<InputError>("SafetensorsWriter: tensor ", detail::quote_text(name),
                               " is a view without storage (a default-constructed view)");
    }
    const auto n = static_cast<std::size_t>(t.numel());
    std::vector<std::byte> bytes(n * dtype_size(dtype));
    auto store = [&](auto convert) {
      for (std::size_t i = 0; i < n; ++i) {
        const auto v = convert(t.data()[i]);
        std::memcpy(bytes.data() + i * sizeof v, &v, sizeof v);
      }
    };
    switch (dtype) {
      case DType::F16: store([](float f) { return to_half(f); }); break;
      case DType::BF16: store([](float f) { return to_bfloat16(f); }); break;
      case DType::F32: store([](float f) { return f; }); break;
      case DType::F64: store([](float f) { return static_cast<double>(f); }); break;
      default:
        detail::fail<InputError>("SafetensorsWriter::add_as: tensor ", detail::quote_text(name),
                                 " cannot store float data as ", dtype_name(dtype),
                                 "; use F16, BF16, F32 or F64, or add() with integer data");
    }
    entries_.emplace(std::move(name), Entry{dtype, t.shape(), std::move(bytes)});
  }

  /// Stores bytes as they are; their size must match shape and dtype.
  void add_raw(std::string name, DType dtype, Shape shape, std::span<const std::byte> bytes) {
    check_name(name);
    const std::size_t need = static_cast<std::size_t>(shape.numel()) * dtype_size(dtype);
    if (bytes.size() != need) {
      detail::fail<InputError>("SafetensorsWriter: tensor ", detail::quote_text(name), " of shape ", shape.str(),
                               " and dtype ", dtype_name(dtype), " needs ", need, " bytes, got ", bytes.size());
    }
    entries_.emplace(std::move(name), Entry{dtype, shape, std::vector<std::byte>(bytes.begin(), bytes.end())});
  }

  /// The complete file.
  std::vector<std::byte> to_bytes() const {
    const std::string head = header();
    std::vector<std::byte> out(8 + head.size() + data_bytes());
    put_length(out.data(), head.size());
    std::memcpy(out.data() + 8, head.data(), head.size());
    std::size_t at = 8 + head.size();
    for (const auto& [name, e] : entries_) {
      if (!e.bytes.empty()) std::memcpy(out.data() + at, e.bytes.data(), e.bytes.size());
      at += e.bytes.size();
    }
    return out;
  }

  /// Writes to a temporary file beside `path`, syncs it and renames it over `path`, so
  /// readers never see a partial file. FormatError on I/O failure (nothing is left behind).
  void write(const std::filesystem::path& path) const {
    const std::string target = path.string();
    static std::atomic<std::uint64_t> counter{0};
    const std::string tmp = target + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(++counter);
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) detail::fail<FormatError>(target, ": cannot create ", tmp, ": ", std::strerror(errno));
    auto give_up = [&](const char* what) {
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      detail::fail<FormatError>(target, ": ", what, ": ", std::strerror(err));
    };

    const std::string head = header();
    std::byte len[8];
    put_length(len, head.size());
    if (!write_all(fd, len, 8) || !write_all(fd, head.data(), head.size())) give_up("cannot write the header");
    for (const auto& [name, e] : entries_) {
      if (!write_all(fd, e.bytes.data(), e.bytes.size())) give_up("cannot write tensor data");
    }
    if (::fsync(fd) != 0) give_up("cannot sync to disk");
    if (::close(fd) != 0) {
      const int err = errno;
      ::unlink(tmp.c_str());
      detail::fail<FormatError>(target, ": cannot close ", tmp, ": ", std::strerror(err));
    }
    if (::rename(tmp.c_str(), target.c_str()) != 0) {
      const int err = errno;
      ::unlink(tmp.c_str());
      detail::fail<FormatError>(target, ": cannot rename ", tmp, " over it: ", std::strerror(err));
    }
  }

 private:
  struct Entry {
    DType dtype;
    Shape shape;
    std::vector<std::byte> bytes;
  };

  static void check_text(const std::string& s, const char* what) {
    if (detail::utf8_invalid_at(s) != s.size()) {
      detail::fail<InputError>("SafetensorsWriter: ", what, " ", detail::quote_text(s), " is not valid UTF-8");
    }
  }

  void check_name(const std::string& name) const {
    if (name.empty()) detail::fail<InputError>("SafetensorsWriter: a tensor name must not be empty");
    if (name == "__metadata__") {
      detail::fail<InputError>("SafetensorsWriter: '__metadata__' is reserved and cannot name a tensor");
    }
    check_text(name, "tensor name");
    if (entries_.count(name)) {
      detail::fail<InputError>("SafetensorsWriter: tensor ", detail::quote_text(name), " was already added");
    }
  }

  std::size_t data_bytes() const {
    std::size_t n = 0;
    for (const auto& kv : entries_) n += kv.second.bytes.size();
    return n;
  }

  /// The JSON header, padded with spaces to a multiple of 8 bytes.
  std::string header() const {
    nlohmann::json h = nlohmann::json::object();
    if (!metadata_.empty()) h["__metadata__"] = metadata_;
    std::uint64_t at = 0;
    for (const auto& [name, e] : entries_) {
      nlohmann::json shape = nlohmann::json::array();
      for (int i = 0; i < e.shape.rank(); ++i) shape.push_back(e.shape[i]);
      h[name] = {{"dtype", std::string(dtype_name(e.dtype))},
                 {"shape", std::move(shape)},
                 {"data_offsets", {at, at + e.bytes.size()}}};
      at += e.bytes.size();
    }
    std::string s = h.dump();
    s.resize((s.size() + 7) / 8 * 8, ' ');
    return s;
  }

  static void put_length(std::byte* out, std::uint64_t n) {
    for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>((n >> (8 * i)) & 0xffu);
  }

  static bool write_all(int fd, const void* data, std::size_t n) {
    const auto* p = static_cast<const char*>(data);
    while (n > 0) {
      const ::ssize_t w = ::write(fd, p, std::min<std::size_t>(n, std::size_t{1} << 30));
      if (w < 0) {
        if (errno == EINTR) continue;
        return false;
      }
      p += w;
      n -= static_cast<std::size_t>(w);
    }
    return true;
  }

  std::map<std::string, std::string> metadata_;
  std::map<std::string, Entry> entries_;
};

}  // namespace longmem
