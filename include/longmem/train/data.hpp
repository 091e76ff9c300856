#pragma once
// Training data as long documents read by B independent streams, segment by segment.
//
//   Document          a name and its token ids (bytes of a text file, or an int32 file)
//   DocumentStreams   B streams; each reads one document at a time in consecutive segments of
//                     T tokens (the reference's --sample-break-mode none --data-no-shuffle, but
//                     documents are never mixed in a segment), then takes the next document in
//                     corpus order (wrapping around: epochs). A segment that starts a document
//                     tells the model to forget that stream's memory first.
//   Targets           the stream's next tokens: a segment's last token is scored against the
//                     first token of the next segment; a document's last token has no target (-1).
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "longmem/error.hpp"
#include "longmem/tokenizer.hpp"

namespace longmem {

struct Document {
  std::string name;
  std::vector<std::int32_t> tokens;
  std::vector<std::uint8_t> scored;  ///< optional: scored[i] = 0 makes token i no target (empty: all are)
};

namespace detail {
inline std::string read_file_bytes(const std::filesystem::path& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail<FormatError>(path.string(), ": cannot open the ", what);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}
}  // namespace detail

/// A text file as one document of byte tokens.
inline Document read_text_document(const std::filesystem::path& path) {
  return {path.filename().string(), ByteTokenizer::encode(detail::read_file_bytes(path, "text document")), {}};
}

/// A file of raw little-endian int32 token ids as one document.
inline Document read_int32_document(const std::filesystem::path& path) {
  const std::string bytes = detail::read_file_bytes(path, "token file");
  if (bytes.size() % 4 != 0) {
    detail::fail<FormatError>(path.string(), ": ", bytes.size(), " bytes is not a whole number of int32 token ids");
  }
  Document d{path.filename().string(), std::vector<std::int32_t>(bytes.size() / 4), {}};
  for (std::size_t i = 0; i < d.tokens.size(); ++i) {
    const auto* b = reinterpret_cast<const unsigned char*>(bytes.data() + 4 * i);
    d.tokens[i] = static_cast<std::int32_t>(static_cast<std::uint32_t>(b[0]) | static_cast<std::uint32_t>(b[1]) << 8 |
                                            static_cast<std::uint32_t>(b[2]) << 16 | static_cast<std::uint32_t>(b[3]) << 24);
  }
  return d;
}

/// The documents of a corpus folder written by examples/corpus/prepare.sh: manifest.tsv lists
/// `file split package title bytes licence`; only rows of `split` are read, in manifest order.
inline std::vector<Document> read_manifest(const std::filesystem::path& dir, const std::string& split) {
  const auto manifest = dir / "manifest.tsv";
  std::ifstream in(manifest);
  if (!in) detail::fail<FormatError>(manifest.string(), ": cannot open the corpus manifest (run examples/corpus/prepare.sh)");
  std::vector<Document> docs;
  std::string line;
  std::getline(in, line);  // header
  int row = 1;
  while (std::getline(in, line)) {
    ++row;
    if (line.empty()) continue;
    const auto tab1 = line.find('\t');
    const auto tab2 = tab1 == std::string::npos ? tab1 : line.find('\t', tab1 + 1);
    if (tab2 == std::string::npos) {
      detail::fail<FormatError>(manifest.string(), ": row ", row, " has fewer than two tab-separated columns");
    }
    if (line.substr(tab1 + 1, tab2 - tab1 - 1) != split) continue;
    docs.push_back(read_text_document(dir / line.substr(0, tab1)));
  }
  if (docs.empty()) detail::fail<FormatError>(manifest.string(), ": no documents in split '", split, "'");
  return docs;
}

/// Throws InputError naming the document and position of the first id outside [0, vocab).
inline void check_vocabulary(const std::vector<Document>& docs, int vocab) {
  for (const auto& d : docs) {
    for (std::size_t i = 0; i < d.tokens.size(); ++i) {
      if (d.tokens[i] < 0 || d.tokens[i] >= vocab) {
        detail::fail<InputError>("document ", d.name, ": token id ", d.tokens[i], " at position ", i,
                                 " is outside the model's vocabulary [0, ", vocab, ")");
      }
    }
  }
}

/// One stream's next segment.
struct StreamSegment {
  std::span<const std::int32_t> tokens;   // (T_b) inputs
  std::span<const std::int32_t> targets;  // (T_b) next tokens, -1 where the document ends
  bool starts_document = false;           // forget this stream's memory before it
  std::int64_t document = 0;              // index into the corpus
  std::int64_t offset = 0;                // position of tokens[0] in the document
};

class DocumentStreams {
 public:
  /// `docs` must outlive the streams. Refuses an empty corpus, empty documents, and a corpus
  /// with fewer tokens than one segment plus its target.
  DocumentStreams(const std::vector<Document>& docs, int streams, int segment_length)
      : docs_(&docs), segment_length_(segment_length) {
    if (streams <= 0) detail::fail<ConfigError>("data: the number of streams (batch) must be positive, got ", streams);
    if (segment_length <= 0) detail::fail<ConfigError>("data: the segment length must be positive, got ", segment_length);
    if (docs.empty()) detail::fail<InputError>("data: the corpus has no documents");
    std::int64_t total = 0;
    for (const auto& d : docs) {
      if (d.tokens.empty()) detail::fail<InputError>("data: document ", d.name, " is empty");
      if (!d.scored.empty() && d.scored.size() != d.tokens.size()) {
        detail::fail<InputError>("data: document ", d.name, " has ", d.tokens.size(), " tokens but a mask of ",
                                 d.scored.size());
      }
      total += static_cast<std::int64_t>(d.tokens.size());
    }
    if (total < static_cast<std::int64_t>(segment_length) + 1) {
      detail::fail<InputError>("data: the corpus has ", total, " tokens, fewer than one segment of ", segment_length,
                               " tokens and its next token");
    }
    positions_.assign(static_cast<std::size_t>(streams), Position{});
    targets_.resize(static_cast<std::size_t>(streams));
    segments_.resize(static_cast<std::size_t>(streams));
  }

  int streams() const { return static_cast<int>(positions_.size()); }
  int segment_length() const { return segment_length_; }
  std::int64_t epoch() const { return epoch_; }
  std::int64_t total_tokens() const {
    std::int64_t n = 0;
    for (const auto& d : *docs_) n += static_cast<std::int64_t>(d.tokens.size());
    return n;
  }

  /// The next segment of every stream; the spans stay valid until the next call.
  std::span<const StreamSegment> next() {
    const auto& docs = *docs_;
    for (std::size_t b = 0; b < positions_.size(); ++b) {
      Position& p = positions_[b];
      StreamSegment& s = segments_[b];
      s.starts_document = false;
      if (p.document < 0 || p.offset >= static_cast<std::int64_t>(docs[static_cast<std::size_t>(p.document)].tokens.size())) {
        p.document = next_document_;
        p.offset = 0;
        s.starts_document = true;
        if (++next_document_ == static_cast<std::int64_t>(docs.size())) {
          next_document_ = 0;
          ++epoch_;
        }
      }
      const auto& doc = docs[static_cast<std::size_t>(p.document)];
      const auto& tokens = doc.tokens;
      const std::int64_t n = static_cast<std::int64_t>(tokens.size());
      const std::int64_t len = std::min<std::int64_t>(segment_length_, n - p.offset);
      auto& tg = targets_[b];
      tg.resize(static_cast<std::size_t>(len));
      for (std::int64_t i = 0; i < len; ++i) {
        const std::int64_t j = p.offset + i + 1;
        const bool scored = j < n && (doc.scored.empty() || doc.scored[static_cast<std::size_t>(j)] != 0);
        tg[static_cast<std::size_t>(i)] = scored ? tokens[static_cast<std::size_t>(j)] : -1;
      }
      s.tokens = std::span<const std::int32_t>(tokens).subspan(static_cast<std::size_t>(p.offset), static_cast<std::size_t>(len));
      s.targets = tg;
      s.document = p.document;
      s.offset = p.offset;
      p.offset += len;
    }
    return segments_;
  }

  /// The read position as JSON (checkpoints): {"next_document", "epoch", "streams": [[doc, offset], ...]}.
  nlohmann::json state() const {
    nlohmann::json j;
    j["next_document"] = next_document_;
    j["epoch"] = epoch_;
    j["streams"] = nlohmann::json::array();
    for (const auto& p : positions_) j["streams"].push_back({p.document, p.offset});
    return j;
  }

  /// Restores a position from state(); refuses one that does not fit this corpus and batch.
  void restore(const nlohmann::json& j) {
    const auto& docs = *docs_;
    try {
      const auto streams = j.at("streams");
      if (!streams.is_array() || streams.size() != positions_.size()) {
        detail::fail<ConfigError>("data position: the checkpoint has ", streams.size(), " streams, this run ",
                                  positions_.size(), " (use the same batch size to resume)");
      }
      std::vector<Position> pos;
      for (const auto& s : streams) {
        Position p{s.at(0).get<std::int64_t>(), s.at(1).get<std::int64_t>()};
        if (p.document < -1 || p.document >= static_cast<std::int64_t>(docs.size()) || p.offset < 0 ||
            (p.document >= 0 && p.offset > static_cast<std::int64_t>(docs[static_cast<std::size_t>(p.document)].tokens.size()))) {
          detail::fail<ConfigError>("data position: stream at document ", p.document, " offset ", p.offset,
                                    " does not exist in this corpus of ", docs.size(), " documents (resume with the same data)");
        }
        pos.push_back(p);
      }
      const auto next = j.at("next_document").get<std::int64_t>();
      if (next < 0 || next >= static_cast<std::int64_t>(docs.size())) {
        detail::fail<ConfigError>("data position: next document ", next, " is outside this corpus of ", docs.size());
      }
      positions_ = pos;
      next_document_ = next;
      epoch_ = j.at("epoch").get<std::int64_t>();
    } catch (const nlohmann::json::exception& e) {
      detail::fail<FormatError>("data position: not a position written by DocumentStreams (", e.what(), ")");
    }
  }

 private:
  struct Position {
    std::int64_t document = -1;  // -1: no document yet
    std::int64_t offset = 0;     // next token to read
  };

  const std::vector<Document>* docs_;
  int segment_length_;
  std::vector<Position> positions_;
  std::int64_t next_document_ = 0;
  std::int64_t epoch_ = 0;
  std::vector<std::vector<std::int32_t>> targets_;
  std::vector<StreamSegment> segments_;
};

}  // namespace longmem
