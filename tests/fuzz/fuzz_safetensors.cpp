// libFuzzer target for the safetensors reader: any byte string must either be refused
// with a longmem::Error or open as a file whose tensors all read back from inside the
// buffer, tile the data section, and survive a round trip through SafetensorsWriter.
// Any other exception, a sanitizer report or a broken invariant is a crash.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "longmem/safetensors.hpp"

namespace {

[[noreturn]] void broken(const char* what) {
  std::fprintf(stderr, "fuzz_safetensors: invariant broken: %s\n", what);
  std::abort();
}

void check(bool ok, const char* what) {
  if (!ok) broken(what);
}

void exercise(const std::uint8_t* data, std::size_t size) {
  using namespace longmem;
  std::vector<std::byte> bytes(size);
  if (size) std::memcpy(bytes.data(), data, size);
  const SafetensorsFile f = SafetensorsFile::from_bytes(std::move(bytes), "fuzz");

  std::uint64_t n = 0;
  std::memcpy(&n, data, 8);  // an accepted file is at least 8 bytes long
  const std::size_t data_begin = 8 + static_cast<std::size_t>(n);
  std::size_t covered = 0;
  SafetensorsWriter w;
  w.set_metadata(f.metadata());
  for (const std::string& name : f.names()) {
    const TensorInfo& ti = f.info(name);
    check(ti.begin <= ti.end && data_begin + ti.end <= size, "tensor range inside the file");
    check(ti.bytes() == static_cast<std::size_t>(ti.shape.numel()) * dtype_size(ti.dtype), "size matches shape");
    covered += ti.bytes();
    const auto raw = f.raw(name);
    check(raw.size() == ti.bytes(), "raw size");
    check(raw.empty() || std::memcmp(raw.data(), data + data_begin + ti.begin, raw.size()) == 0, "raw bytes");
    if (ti.dtype == DType::I32 || ti.dtype == DType::I64) {
      check(f.read<std::int64_t>(name).shape() == ti.shape, "int64 read shape");
      try {
        (void)f.read<std::int32_t>(name);
      } catch (const FormatError&) {
        check(ti.dtype == DType::I64, "only I64 -> int32 may refuse a value");
      }
    } else {
      const auto v = f.read<float>(name);
      const auto d = f.read<double>(name, ti.shape);
      const auto h = f.read<half>(name);
      check(v.numel() == d.numel() && h.numel() == v.numel(), "float reads agree on size");
    }
    w.add_raw(name, ti.dtype, ti.shape, raw);
  }
  check(covered == size - data_begin, "tensors tile the data section");

  // What was accepted, written again, is accepted again with the same content.
  const SafetensorsFile g = SafetensorsFile::from_bytes(w.to_bytes(), "rewritten");
  check(g.names() == f.names() && g.metadata() == f.metadata(), "round trip keeps names and metadata");
  for (const std::string& name : f.names()) {
    const auto a = f.raw(name), b = g.raw(name);
    check(a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0) &&
              f.info(name).shape == g.info(name).shape && f.info(name).dtype == g.info(name).dtype,
          "round trip keeps every tensor");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    exercise(data, size);
  } catch (const longmem::Error&) {
    // refused: the expected outcome for almost every input
  }
  return 0;
}
