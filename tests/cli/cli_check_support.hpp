#pragma once
// What the command-line checks (check_cli.cpp, check_train_cli.cpp) share: running a shell command
// for its exit status, quoting paths, and counting failed checks.
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>

namespace longmem::cli_check {

namespace fs = std::filesystem;

inline int failures = 0;

inline void check(bool ok, const std::string& what) {
  std::cout << (ok ? "ok    " : "FAIL  ") << what << "\n";
  failures += ok ? 0 : 1;
}

/// Exit status of `cmd` run by the shell (-1 when it did not exit normally).
inline int run(const std::string& cmd) {
  std::cout << "$ " << cmd << "\n" << std::flush;
  const int status = std::system(cmd.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

inline std::string quote(const fs::path& p) { return "'" + p.string() + "'"; }

}  // namespace longmem::cli_check
