#pragma once
// What the command-line tools (longmem-run, longmem-train) share: CLI11 parsing with one exit-code
// convention, token files, and the error handling around main().
//
// Exit codes: 0 done; 64 usage (a bad or missing flag, printed with the help); 2 a file or an
// argument the library refused (its message names what and where), a path that cannot be created or
// read, or a run that does not fit this machine's memory; 3 training stopped (a non-finite
// loss; the last checkpoint is kept); 130 interrupted (Ctrl-C, after saving); 1 a bug (the exception's
// type and message: "unexpected").
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <new>
#include <string>
#include <typeinfo>
#include <vector>

#include <CLI/CLI.hpp>

#include <longmem/error.hpp>

namespace longmem::cli {

inline constexpr int exit_usage = 64;
inline constexpr int exit_refused = 2;
inline constexpr int exit_training_stopped = 3;
inline constexpr int exit_interrupted = 130;

[[noreturn]] inline void usage_error(const CLI::App& app, const std::string& tool, const std::string& message) {
  std::cerr << tool << ": " << message << "\n\n" << app.help();
  std::exit(exit_usage);
}

/// Parses argv; --help prints the help and exits 0, a parse error prints it and exits 64.
inline void parse(CLI::App& app, const std::string& tool, int argc, char** argv) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::cout << app.help();
    std::exit(0);
  } catch (const CLI::ParseError& e) {
    usage_error(app, tool, e.what());
  }
}

/// Runs the tool's body, turning exceptions into messages and the exit codes above.
inline int guarded(const std::string& tool, const std::function<int()>& body) {
  try {
    return body();
  } catch (const TrainingError& e) {
    std::cerr << tool << ": " << e.what() << "\n";
    return exit_training_stopped;
  } catch (const Error& e) {
    std::cerr << tool << ": " << e.what() << "\n";
    return exit_refused;
  } catch (const std::filesystem::filesystem_error& e) {
    // a path given on the command line that cannot be created, read or listed
    std::cerr << tool << ": " << e.what() << "\n";
    return exit_refused;
  } catch (const std::bad_alloc&) {
    std::cerr << tool << ": not enough memory for this model, memory size or batch on this machine\n";
    return exit_refused;
  } catch (const std::exception& e) {
    std::cerr << tool << ": unexpected error (" << typeid(e).name() << "): " << e.what() << "\n";
    return 1;
  }
}

/// "int32" for *.i32 / *.bin files, else "text".
inline std::string token_format_for(const std::string& path) {
  return path.ends_with(".i32") || path.ends_with(".bin") ? "int32" : "text";
}

/// Token ids from a text file (whitespace-separated ids) or raw little-endian int32.
inline std::vector<std::int32_t> read_tokens(const std::string& path, const std::string& format) {
  std::ifstream in(path, std::ios::binary);
  if (!in) detail::fail<FormatError>(path, ": cannot open the token file (", std::strerror(errno), ")");
  std::vector<std::int32_t> ids;
  if (format == "int32") {
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (bytes.size() % 4 != 0) {
      detail::fail<FormatError>(path, ": ", bytes.size(), " bytes is not a whole number of int32 token ids");
    }
    ids.resize(bytes.size() / 4);
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const auto* b = reinterpret_cast<const unsigned char*>(bytes.data()) + 4 * i;
      ids[i] = static_cast<std::int32_t>(static_cast<std::uint32_t>(b[0]) | static_cast<std::uint32_t>(b[1]) << 8 |
                                         static_cast<std::uint32_t>(b[2]) << 16 | static_cast<std::uint32_t>(b[3]) << 24);
    }
  } else {
    std::string word;
    std::size_t line = 1;
    char c;
    auto flush = [&] {
      if (word.empty()) return;
      std::size_t pos = 0;
      long long v = 0;
      try {
        v = std::stoll(word, &pos);
      } catch (const std::exception&) {
        pos = 0;
      }
      if (pos != word.size() || v < INT32_MIN || v > INT32_MAX) {
        detail::fail<FormatError>(path, ":", line, ": '", word, "' is not a token id");
      }
      ids.push_back(static_cast<std::int32_t>(v));
      word.clear();
    };
    while (in.get(c)) {
      if (std::isspace(static_cast<unsigned char>(c))) {
        flush();
        if (c == '\n') ++line;
      } else {
        word.push_back(c);
      }
    }
    flush();
  }
  if (ids.empty()) detail::fail<InputError>(path, ": the token file holds no tokens");
  return ids;
}

}  // namespace longmem::cli
