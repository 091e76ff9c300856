#pragma once
// A byte-level tokenizer: every byte of UTF-8 text is one token id in [0, 256).
// It is the tokenizer of the demo models (GPT-2 BPE comes later).
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "longmem/error.hpp"

namespace longmem {

struct ByteTokenizer {
  static constexpr int vocab_size = 256;

  static std::vector<std::int32_t> encode(std::string_view text) {
    std::vector<std::int32_t> ids;
    ids.reserve(text.size());
    for (unsigned char c : text) ids.push_back(static_cast<std::int32_t>(c));
    return ids;
  }

  /// Throws InputError for an id outside [0, 256).
  static std::string decode(const std::vector<std::int32_t>& ids) {
    std::string s;
    s.reserve(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) {
      if (ids[i] < 0 || ids[i] >= vocab_size) {
        detail::fail<InputError>("ByteTokenizer: id ", ids[i], " at position ", i, " is outside [0, 256)");
      }
      s.push_back(static_cast<char>(static_cast<unsigned char>(ids[i])));
    }
    return s;
  }
};

}  // namespace longmem
