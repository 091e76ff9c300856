#pragma once
// Reads a model's tensors from a safetensors file by name, checking shapes, and
// refusing files that hold tensors the model does not know (nothing the user gave is
// silently ignored). Used by every loader.
#include <algorithm>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "longmem/error.hpp"
#include "longmem/safetensors.hpp"
#include "longmem/tensor.hpp"

namespace longmem {

class WeightReader {
 public:
  /// `prefixes` are tried in order in front of every name (e.g. "" and "transformer.").
  WeightReader(const SafetensorsFile& file, std::vector<std::string> prefixes = {""})
      : file_(file), prefixes_(std::move(prefixes)) {}

  const SafetensorsFile& file() const { return file_; }

  /// The stored name of `name` under the first prefix that has it, or "" if none.
  std::string resolve(std::string_view name) const {
    for (const auto& p : prefixes_) {
      std::string full = p + std::string(name);
      if (file_.contains(full)) return full;
    }
    return {};
  }

  bool has(std::string_view name) const { return !resolve(name).empty(); }

  /// Reads `name` as T with exactly `expected` shape; ShapeError when absent or different.
  template <class T>
  Tensor<T, Host> read(std::string_view name, const Shape& expected) {
    const std::string full = resolve(name);
    if (full.empty()) {
      detail::fail<ShapeError>(file_.name(), ": tensor '", name, "' is missing (expected shape ", expected.str(), ")");
    }
    used_.insert(full);
    return file_.read<T>(full, expected);
  }

  /// Marks a tensor as known without reading it (buffers such as attention masks).
  void ignore(std::string_view name) {
    const std::string full = resolve(name);
    if (!full.empty()) used_.insert(full);
  }

  /// Throws FormatError listing every tensor of the file that nobody read or ignored.
  void expect_all_used(std::string_view what) const {
    std::vector<std::string> unused;
    for (const auto& n : file_.names()) {
      if (!used_.count(n)) unused.push_back(n);
    }
    if (unused.empty()) return;
    std::string list;
    for (std::size_t i = 0; i < unused.size() && i < 8; ++i) list += (i ? ", " : "") + unused[i];
    if (unused.size() > 8) list += detail::concat(", ... (", unused.size(), " in all)");
    detail::fail<FormatError>(file_.name(), ": tensors a ", what, " does not use: ", list,
                              " (is this the right file, or do its hyper-parameters match its tensors?)");
  }

 private:
  const SafetensorsFile& file_;
  std::vector<std::string> prefixes_;
  std::set<std::string> used_;
};

namespace detail {

/// Refuses a file whose metadata `key` states a layer count other than the number of layers
/// whose tensors the file holds (names `prefix` N `suffix`, e.g. "h." N ".ln_1.weight", with or
/// without a "transformer." prefix), before anything is sized from that count: a hostile count
/// cannot make the loader allocate. The N present must be exactly 0 .. count-1, so the count is
/// at most the number of tensors in the file (a lone "h.999999999.ln_1.weight" is refused too).
inline void check_layer_count(const SafetensorsFile& file, const char* key, long long stated, const std::string& prefix,
                              const std::string& suffix, const char* source = "metadata") {
  std::set<long long> present;  // every N with prefix N suffix in the file
  for (const auto& name : file.names()) {
    const std::string_view n(name);
    std::string_view rest;
    if (n.substr(0, prefix.size()) == prefix) {
      rest = n.substr(prefix.size());
    } else if (n.substr(0, 12) == "transformer." && n.substr(12, prefix.size()) == prefix) {
      rest = n.substr(12 + prefix.size());
    } else {
      continue;
    }
    const auto digits = rest.find_first_not_of("0123456789");
    if (digits == 0 || digits == std::string_view::npos || digits > 9 || rest.substr(digits) != suffix) continue;
    if (digits > 1 && rest[0] == '0') continue;  // "h.01." names no layer the loader reads
    present.insert(std::stoll(std::string(rest.substr(0, digits))));
  }
  const auto count = static_cast<long long>(present.size());
  if (present.empty()) {
    fail<ConfigError>(file.name(), ": ", source, " '", key, "' = ", stated, " but the file holds no ", prefix, "N", suffix,
                      " tensors (0 layers)");
  }
  if (*present.rbegin() != count - 1) {
    long long gap = 0;
    while (present.count(gap)) ++gap;
    fail<ConfigError>(file.name(), ": ", source, " '", key, "' = ", stated, " but the file holds ", count, " ", prefix, "N",
                      suffix, " tensors numbered up to ", *present.rbegin(), ", without ", prefix, gap, suffix,
                      " (layers must be numbered 0 .. n-1)");
  }
  if (stated == count) return;
  fail<ConfigError>(file.name(), ": ", source, " '", key, "' = ", stated, " but the file holds ", count, " layers (", prefix,
                    "0", suffix, " .. ", prefix, count - 1, suffix, ")");
}

/// Refuses a file whose hyper-parameter `key` = `stated` (from `source`: "metadata" or
/// "config.json") differs from extent `axis` of tensor `tensor` (looked up with each of
/// `prefixes`), naming the key, the value and the tensor's shape; before anything is read or
/// sized from it. An absent tensor passes (the loader reports it as missing).
inline void check_extent(const SafetensorsFile& file, const std::vector<std::string>& prefixes, const char* source,
                         const char* key, long long stated, const std::string& tensor, int axis, const char* what) {
  for (const auto& p : prefixes) {
    if (!file.contains(p + tensor)) continue;
    const Shape& s = file.info(p + tensor).shape;
    if (axis < s.rank() && s[axis] == stated) return;
    fail<ConfigError>(file.name(), ": ", source, " '", key, "' = ", stated, " but ", p + tensor, " has shape ", s.str(),
                      axis < s.rank() ? detail::concat(" (", s[axis], " ", what, ")") : std::string(" (rank ") +
                                                                                       std::to_string(s.rank()) + ")");
  }
}

/// 64-bit FNV-1a over bytes, continuing from `h`.
inline std::uint64_t fnv1a64(const void* data, std::size_t n, std::uint64_t h = 14695981039346656037ull) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

/// "fnv1a64:<16 hex digits>" of a token embedding as float32 little-endian bytes,
/// identifying the backbone a SideNet was made for.
template <class T>
std::string embedding_fingerprint(TensorView<const T, Host> wte) {
  std::uint64_t h = 14695981039346656037ull;
  for (const T& x : wte) {
    const float f = to_float(x);
    h = fnv1a64(&f, sizeof f, h);
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "fnv1a64:%016llx", static_cast<unsigned long long>(h));
  return buf;
}

}  // namespace detail
}  // namespace longmem
