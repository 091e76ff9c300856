#pragma once
// A read-only memory mapping of a whole file (POSIX open/fstat/mmap/munmap), RAII and
// move-only. Weight files are mapped rather than read so that opening a large model
// costs no copy and tensors the model never reads are never paged in.
//
// An empty file maps to an empty span (mmap refuses length 0). If another process
// truncates the file while it is mapped, touching the lost pages raises SIGBUS; POSIX
// gives no way to refuse that, so files are expected to stay put while open.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <span>
#include <string>
#include <utility>

#include "longmem/error.hpp"

namespace longmem::detail {

class MappedFile {
 public:
  MappedFile() = default;

  /// Maps `path` read-only; FormatError if it cannot be opened, is not a regular file
  /// or cannot be mapped.
  static MappedFile open(const std::filesystem::path& path) {
    const std::string name = path.string();
    int fd;
    do {
      fd = ::open(name.c_str(), O_RDONLY | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) fail<FormatError>(name, ": cannot open for reading: ", std::strerror(errno));

    // The descriptor is only needed until the mapping exists.
    struct Closer {
      int fd;
      ~Closer() { ::close(fd); }
    } closer{fd};

    struct stat st {};
    if (::fstat(fd, &st) != 0) fail<FormatError>(name, ": cannot stat: ", std::strerror(errno));
    if (!S_ISREG(st.st_mode)) fail<FormatError>(name, ": is not a regular file");
    if (st.st_size < 0) fail<FormatError>(name, ": has a negative size");

    MappedFile m;
    m.size_ = static_cast<std::size_t>(st.st_size);
    if (m.size_ == 0) return m;
    void* p = ::mmap(nullptr, m.size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      fail<FormatError>(name, ": cannot map ", m.size_, " bytes into memory: ", std::strerror(errno));
    }
    m.data_ = static_cast<const std::byte*>(p);
    return m;
  }

  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  MappedFile& operator=(MappedFile&& o) noexcept {
    if (this != &o) {
      unmap();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~MappedFile() { unmap(); }

  /// The whole file; empty for an empty file or a default-constructed object.
  std::span<const std::byte> bytes() const { return {data_, size_}; }
  std::size_t size() const { return size_; }

 private:
  void unmap() noexcept {
    if (data_) ::munmap(const_cast<std::byte*>(data_), size_);
    data_ = nullptr;
    size_ = 0;
  }

  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace longmem::detail
