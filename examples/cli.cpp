// longmem-run: runs a checkpoint over a token file and writes logits (and, on request,
// hidden states) to a safetensors file. With --sidenet it runs the LongMem model
// segment by segment with memory and writes every segment's logits in stream order.
//
//   longmem-run --backbone B.safetensors --tokens ids.txt --out out.safetensors [options]
//
// Token files: text ids (whitespace or one per line) or raw little-endian int32
// (--format int32, the default for *.i32 and *.bin files).
//
// --device cuda runs the same computation on the GPU (--dtype f32, or bf16 / f16: weights, activations
// and memory in bf16 / fp16). The device ops are CUDA
// kernels, which g++ cannot compile, so that path lives in cli_device.cu, compiled by nvcc and
// added to this tool by examples/CMakeLists.txt only when the CUDA backend is built
// (LONGMEM_CUDA); CMake then defines LONGMEM_RUN_CUDA here. What both paths run is in
// cli_run.hpp. Without it, --device cuda is refused (exit 2) with a message saying so.
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <longmem/longmem.hpp>

#include "cli_run.hpp"
#include "cli_support.hpp"

#if defined(LONGMEM_RUN_CUDA)
namespace longmem::cli {
/// The run on the GPU (cli_device.cu): the backbone or LongMem, in float.
int run_on_cuda(const RunOptions& o, const std::vector<std::int32_t>& ids);
}  // namespace longmem::cli
#endif

namespace {

using longmem::cli::read_tokens;
using Options = longmem::cli::RunOptions;

#if defined(LONGMEM_RUN_CUDA)
constexpr bool built_with_cuda = true;
#else
constexpr bool built_with_cuda = false;
#endif

Options parse(int argc, char** argv) {
  Options o;
  CLI::App app{"Runs a GPT-2 / GPT-2* checkpoint (safetensors; hyper-parameters from its metadata or a\n"
               "config.json beside it) over a token file and writes 'tokens' and 'logits' (N, V) to --out.\n"
               "With --sidenet it runs LongMem segment by segment with memory.",
               "longmem-run"};
  app.add_option("--backbone", o.backbone, "backbone checkpoint (safetensors)")->required();
  app.add_option("--tokens", o.tokens, "token file: text ids or raw int32")->required();
  app.add_option("--out", o.out, "output safetensors file")->required();
  app.add_option("--format", o.format, "token file format (default: int32 for *.i32/*.bin, else text)")
      ->check(CLI::IsMember({"text", "int32"}));
  app.add_option("--segment-length", o.segment_length,
                 "split the tokens into segments of N (default: the whole file for a backbone, n_positions for LongMem)")
      ->check(CLI::Range(1, 1 << 30));
  app.add_flag("--hidden-states", o.hidden_states, "also write 'hidden_states' (L+1, N, d) (backbone only)");
  app.add_option("--dtype", o.dtype,
                 "compute precision: f32, f64 (cpu), bf16 or f16 (cuda: weights, activations and memory in bf16 or fp16)")
      ->check(CLI::IsMember({"f32", "f64", "bf16", "f16"}))
      ->capture_default_str();
  app.add_option("--sidenet", o.sidenet, "run LongMem: backbone + this SideNet with memory");
  app.add_option("--memory-tokens", o.memory_tokens, "memory capacity in tokens per stream (default: the SideNet file's, else 65536)")
      ->check(CLI::Range(1, 1 << 30));
  app.add_option("--chunk-size", o.chunk_size, "tokens per memory chunk (default: file, else 4)")->check(CLI::Range(1, 1 << 30));
  app.add_option("--retrieved-tokens", o.retrieved_tokens, "tokens retrieved per query (default: file, else 64)")
      ->check(CLI::Range(1, 1 << 30));
  app.add_option("--fusion", o.fusion, "how memory and local attention mix (gated: the reference)")
      ->check(CLI::IsMember({"gated", "joint"}))
      ->capture_default_str();
  app.add_flag("--no-memory", o.no_memory, "LongMem without memory (the baseline)");
  app.add_flag("--allow-other-backbone", o.allow_other, "accept a SideNet made for another backbone");
  app.add_flag("--quiet", o.quiet, "print nothing but errors");
  app.add_option("--device", o.device,
                 built_with_cuda ? "where the model runs: cpu, or cuda (the GPU: --dtype f32, bf16 or f16)"
                                 : "where the model runs: cpu (this build has no CUDA support; cuda is refused)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  app.add_option("--device-math", o.device_math,
                 "--device cuda: how tensor-core products round their inputs: fp32 (float accuracy), tf32, bf16 "
                 "(buffers stay float; retrieval stays exact)")
      ->check(CLI::IsMember({"fp32", "tf32", "bf16"}))
      ->capture_default_str();
  longmem::cli::parse(app, "longmem-run", argc, argv);
  if (o.sidenet.empty() && (o.no_memory || o.memory_tokens || o.chunk_size || o.retrieved_tokens)) {
    longmem::cli::usage_error(app, "longmem-run", "memory options need --sidenet");
  }
  if (!o.sidenet.empty() && o.hidden_states) {
    longmem::cli::usage_error(app, "longmem-run", "--hidden-states is for backbone runs (without --sidenet)");
  }
  if (o.device == "cuda" && o.dtype == "f64") {
    longmem::cli::usage_error(app, "longmem-run",
                              "--device cuda computes in f32, bf16 or f16: use --dtype f32 (the default), bf16 or f16");
  }
  const bool half_width = o.dtype == "bf16" || o.dtype == "f16";
  if (o.device != "cuda" && half_width) {
    longmem::cli::usage_error(app, "longmem-run",
                              "--dtype " + o.dtype + " is for --device cuda (the CPU computes in f32 or f64)");
  }
  if (o.device != "cuda" && o.device_math != "fp32") {
    longmem::cli::usage_error(app, "longmem-run", "--device-math is for --device cuda (the CPU computes in --dtype)");
  }
  if (half_width && o.device_math != "fp32") {
    longmem::cli::usage_error(app, "longmem-run", "--device-math rounds the inputs of float buffers; a --dtype " + o.dtype +
                                                      " model computes in " + o.dtype + " already");
  }
  if (o.device == "cuda" && !built_with_cuda) {
    // A capability this binary lacks, not a malformed command line: exit 2 (refused), no help text.
    std::cerr << "longmem-run: --device cuda: this longmem-run was built without CUDA support; rebuild with nvcc "
                 "available and -DLONGMEM_CUDA=ON, or use --device cpu\n";
    std::exit(longmem::cli::exit_refused);
  }
  if (o.format.empty()) o.format = longmem::cli::token_format_for(o.tokens);
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  return longmem::cli::guarded("longmem-run", [&] {
    const auto ids = read_tokens(o.tokens, o.format);
#if defined(LONGMEM_RUN_CUDA)
    if (o.device == "cuda") return longmem::cli::run_on_cuda(o, ids);
#endif
    using longmem::cli::HostPlacement;
    return o.dtype == "f64" ? longmem::cli::run<HostPlacement, double>(o, ids) : longmem::cli::run<HostPlacement, float>(o, ids);
  });
}
