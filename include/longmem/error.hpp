#pragma once
// The library's exceptions. Every message is a sentence that says what was wrong,
// where (file, tensor, argument) and, where it can, how to fix it.
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace longmem {

/// Base of everything the library throws on bad input or misuse.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A file (safetensors, config.json, token file) is missing, truncated, corrupted or hostile.
class FormatError : public Error {
 public:
  using Error::Error;
};

/// A tensor has the wrong shape or dtype, or a tensor the model needs is absent.
class ShapeError : public Error {
 public:
  using Error::Error;
};

/// Hyper-parameters or memory settings are missing, inconsistent or out of range.
class ConfigError : public Error {
 public:
  using Error::Error;
};

/// Run-time input is invalid: token ids outside the vocabulary, empty or too long segments.
class InputError : public Error {
 public:
  using Error::Error;
};

/// Training cannot go on: a non-finite loss or gradient. (A checkpoint that is damaged or does not
/// fit the run is a FormatError or ConfigError: it is refused before training starts.)
class TrainingError : public Error {
 public:
  using Error::Error;
};

/// A backend call failed (CUDA runtime, cuBLAS, allocation).
class BackendError : public Error {
 public:
  using Error::Error;
};

namespace detail {

/// Streams every argument into one string: concat("expected ", 3, " dims").
template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

/// Throws E with the concatenated message.
template <class E, class... Args>
[[noreturn]] void fail(Args&&... args) {
  throw E(concat(std::forward<Args>(args)...));
}

}  // namespace detail
}  // namespace longmem
