// Drives longmem-train as a user would:
//   - --save-gradients against the PyTorch float64 autograd fixture (adapt and pretrain),
//   - a short run writes its checkpoint, model, log and plot; the model loads,
//   - an interrupted and resumed run ends with the same weights as one that was never stopped,
//   - Ctrl-C stops with a checkpoint and exit 130,
//   - adapt --device cuda: refused without CUDA or without a GPU, else the CPU run's SideNet,
//   - a full disk while saving keeps the old checkpoint; bad input gets its exit code and never
//     "unexpected".
//   longmem_train_cli_check <path to longmem-train> <fixture dir> <scratch dir>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <longmem/gpt2_backbone.hpp>
#include <longmem/safetensors.hpp>
#include <longmem/side_net.hpp>
#include <longmem/cpu/ops.hpp>

#include "cli_check_support.hpp"

using namespace longmem;
using namespace longmem::cli_check;

namespace {

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

/// max over tensors of max |got - want| / max |want| (the model's largest gradient as the scale for
/// tensors whose exact gradient is 0).
double gradient_error(const fs::path& got_path, const SafetensorsFile& want, const std::string& prefix, int& tensors) {
  SafetensorsFile got = SafetensorsFile::open(got_path);
  double global = 0, worst = 0;
  for (const auto& n : got.names())
    for (double x : want.read<double>(prefix + n)) global = std::max(global, std::abs(x));
  tensors = 0;
  for (const auto& n : got.names()) {
    auto g = got.read<double>(n);
    auto w = want.read<double>(prefix + n, g.shape());
    double err = 0, ref = 0;
    for (index_t i = 0; i < g.numel(); ++i) {
      err = std::max(err, std::abs(g.data()[i] - w.data()[i]));
      ref = std::max(ref, std::abs(w.data()[i]));
    }
    worst = std::max(worst, ref > 1e-12 * global ? err / ref : err / global);
    ++tensors;
  }
  return worst;
}

int count_lines(const fs::path& p) {
  std::ifstream in(p);
  std::string l;
  int n = 0;
  while (std::getline(in, l)) ++n;
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: longmem_train_cli_check LONGMEM_TRAIN FIXTURE_DIR SCRATCH_DIR\n";
    return 64;
  }
  const std::string tool = quote(argv[1]);
  const fs::path fixtures = argv[2], scratch = argv[3];
  fs::remove_all(scratch);
  fs::create_directories(scratch);
  try {
    // --- gradients against PyTorch autograd: the one-stream fixture ---------------------------
    const fs::path lm = fixtures / "longmem_gpt2";
    SafetensorsFile expected = SafetensorsFile::open(lm / "expected.safetensors");
    SafetensorsFile want = SafetensorsFile::open(lm / "gradients.safetensors");
    auto tokens = expected.read<std::int32_t>("tokens");  // (1, N)
    {
      std::ofstream t(scratch / "stream.txt");
      for (index_t i = 0; i < tokens.numel(); ++i) t << tokens.data()[i] << "\n";
    }
    const auto& md = expected.metadata();
    const std::string memory = " --memory-tokens " + md.at("memory_tokens") + " --chunk-size " + md.at("chunk_size") +
                               " --retrieved-tokens " + md.at("retrieved_tokens") + " --segment-length " + md.at("segment_length");
    int tensors = 0;
    check(run(tool + " adapt --dtype f64 --backbone " + quote(lm / "backbone.safetensors") + " --sidenet " +
              quote(lm / "sidenet.safetensors") + memory + " --tokens " + quote(scratch / "stream.txt") +
              " --save-gradients " + quote(scratch / "g_adapt.safetensors") + " --out " + quote(scratch / "unused")) == 0,
          "adapt --save-gradients runs");
    const double e1 = gradient_error(scratch / "g_adapt.safetensors", want, "sidenet_gated.", tensors);
    check(e1 <= 1e-6 && tensors == 31, "adapt gradients equal PyTorch float64 autograd (max rel error " + std::to_string(e1) +
                                           ", " + std::to_string(tensors) + " tensors)");
    check(run(tool + " pretrain --dtype f64 --backbone " + quote(lm / "backbone.safetensors") + " --segment-length " +
              md.at("segment_length") + " --tokens " + quote(scratch / "stream.txt") + " --save-gradients " +
              quote(scratch / "g_pretrain.safetensors") + " --out " + quote(scratch / "unused")) == 0,
          "pretrain --save-gradients runs");
    const double e2 = gradient_error(scratch / "g_pretrain.safetensors", want, "backbone.", tensors);
    check(e2 <= 1e-6 && tensors == 52, "pretrain gradients (Hugging Face names and layout) equal PyTorch float64 autograd (max rel error " +
                                           std::to_string(e2) + ", " + std::to_string(tensors) + " tensors)");

    // --- a short run -----------------------------------------------------------------------------
    std::string text;
    for (int i = 0; i < 400; ++i) text += "line " + std::to_string(i % 37) + ": the quick brown fox jumps over the lazy dog.\n";
    std::ofstream(scratch / "train.txt") << text;
    std::ofstream(scratch / "valid.txt") << text.substr(0, 3000);
    const std::string small = " --layers 2 --width 32 --heads 2 --context 64 --segment-length 64 --batch 3 --lr 3e-3 "
                              "--train " + quote(scratch / "train.txt") + " --valid " + quote(scratch / "valid.txt") +
                              " --eval-tokens 512 --quiet";
    check(run(tool + " pretrain" + small + " --steps 12 --eval-every 6 --out " + quote(scratch / "run")) == 0, "pretrain runs");
    for (const char* f : {"checkpoint.safetensors", "backbone.safetensors", "log.csv", "loss.png"}) {
      check(fs::exists(scratch / "run" / f), std::string("it wrote ") + f);
    }
    check(count_lines(scratch / "run" / "log.csv") == 13, "log.csv has a header and one row per update");
    auto trained = Gpt2Backbone<float>::load(scratch / "run" / "backbone.safetensors");
    check(trained.config().n_layer == 2 && trained.config().n_embd == 32, "the trained backbone loads");
    const std::string adapt = " adapt --backbone " + quote(scratch / "run" / "backbone.safetensors") +
                              " --memory-tokens 256 --chunk-size 4 --retrieved-tokens 16 --segment-length 32 --batch 2 --lr 1e-3 "
                              "--train " + quote(scratch / "train.txt") + " --quiet --no-plot";
    check(run(tool + adapt + " --steps 5 --out " + quote(scratch / "adapt")) == 0, "adapt runs on the trained backbone");
    auto side_net = SideNet<float>::load(scratch / "adapt" / "sidenet.safetensors");
    check(side_net.recommended_memory() && side_net.recommended_memory()->retrieved_tokens == 16,
          "the SideNet loads and records its memory settings");

    // --- --device cuda: without CUDA compiled in, exit 2 saying so; with it but no usable GPU, exit 2
    //     saying a CUDA device is needed; on a GPU, the same 5 adapt updates on the device write a
    //     SideNet within float rounding of the CPU run's (1e-3 of the largest weight: AdamW divides
    //     by sqrt(v), so a few ulp of gradient move a weight by a few ulp of lr)
    {
      const fs::path err = scratch / "adapt_cuda.err", out = scratch / "adapt_cuda";
      const int rc = run(tool + adapt + " --steps 5 --device cuda --out " + quote(out) + " 2> " + quote(err));
      const std::string text = slurp(err);
      std::cout << text;
      const bool no_unexpected = text.find("unexpected") == std::string::npos;
      if (!LONGMEM_TRAIN_CLI_CUDA) {
        check(rc == 2 && no_unexpected && text.find("built without CUDA") != std::string::npos &&
                  !fs::exists(out / "sidenet.safetensors"),
              "adapt --device cuda in a build without CUDA: exit 2, 'built without CUDA', no output");
      } else if (rc == 0) {
        const SafetensorsFile cpu = SafetensorsFile::open(scratch / "adapt" / "sidenet.safetensors");
        const SafetensorsFile gpu = SafetensorsFile::open(out / "sidenet.safetensors");
        double worst = 0, largest = 0;
        for (const auto& name : cpu.names()) {
          const auto a = cpu.read<float>(name), b = gpu.read<float>(name);
          for (index_t i = 0; i < a.numel(); ++i) {
            worst = std::max(worst, std::abs(double(a.data()[i]) - double(b.data()[i])));
            largest = std::max(largest, std::abs(double(a.data()[i])));
          }
        }
        std::cout << "adapt --device cuda: max |w_gpu - w_cpu| = " << worst << " (max |w| " << largest << ")\n";
        check(worst <= 1e-3 * largest, "adapt --device cuda writes the CPU run's SideNet within float rounding");
      } else {
        check(rc == 2 && no_unexpected && text.find("needs a CUDA device") != std::string::npos,
              "adapt --device cuda without a usable GPU: exit 2, 'needs a CUDA device'");
      }
      check(run(tool + adapt + " --steps 5 --device cuda --dtype f64 --out " + quote(out) + " 2>/dev/null") == 64,
            "--device cuda with --dtype f64 is a usage error (64)");
    }

    // --- resume: 4 + 4 updates of an 8-update run equal 8 -----------------------------------------------------------
    check(run(tool + adapt + " --steps 8 --out " + quote(scratch / "straight")) == 0, "8 updates straight");
    check(run(tool + adapt + " --steps 8 --stop-after 4 --out " + quote(scratch / "stopped")) == 0, "4 updates, then stop");
    check(run(tool + adapt + " --steps 8 --resume auto --out " + quote(scratch / "stopped")) == 0, "resumed for 4 more");
    check(slurp(scratch / "straight" / "sidenet.safetensors") == slurp(scratch / "stopped" / "sidenet.safetensors"),
          "the resumed run's SideNet is byte-identical to the uninterrupted run's");
    check(count_lines(scratch / "stopped" / "log.csv") == 9, "the resumed run appends to log.csv");

    // --- Ctrl-C -------------------------------------------------------------------------------
    {
      const fs::path out = scratch / "interrupted";
      const std::string cmd = std::string(argv[1]) + adapt + " --steps 100000 --out " + out.string();
      const pid_t pid = fork();
      if (pid == 0) {
        execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), static_cast<char*>(nullptr));
        _exit(127);
      }
      for (int i = 0; i < 600 && count_lines(out / "log.csv") < 3; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
      kill(pid, SIGINT);
      int status = 0;
      waitpid(pid, &status, 0);
      check(WIFEXITED(status) && WEXITSTATUS(status) == 130, "Ctrl-C ends with exit 130");
      check(fs::exists(out / "checkpoint.safetensors") && fs::exists(out / "sidenet.safetensors"),
            "Ctrl-C saved a checkpoint and the model");
      check(run(tool + adapt + " --steps " + std::to_string(count_lines(out / "log.csv") + 1) + " --resume auto --out " +
                quote(out)) == 0,
            "the interrupted run resumes");
    }

    // --- a full disk while saving keeps the old checkpoint -------------------------------------
    {
      const fs::path out = scratch / "full";
      check(run(tool + adapt + " --steps 2 --out " + quote(out)) == 0, "a first checkpoint");
      const std::string before = slurp(out / "checkpoint.safetensors");
      // files may not grow beyond 64 KiB: the next checkpoint cannot be written (SIGXFSZ ignored)
      const int rc = run("sh -c \"trap '' XFSZ; ulimit -f 64; " + std::string(argv[1]) + adapt +
                         " --steps 4 --resume auto --out '" + out.string() + "' 2> '" + (scratch / "full.err").string() + "'\"");
      const std::string err = slurp(scratch / "full.err");
      std::cout << err;
      check(rc == 2, "a checkpoint that cannot be written is exit 2");
      check(err.find("unexpected") == std::string::npos, "with a message, not 'unexpected'");
      check(slurp(out / "checkpoint.safetensors") == before, "the old checkpoint survives unchanged");
      check(!fs::exists(out / "checkpoint.safetensors.tmp"), "no temporary file is left behind");
    }

    // --- bad input ---------------------------------------------------------------------------
    check(run(tool + " adapt --out " + quote(scratch / "x") + " --train " + quote(scratch / "train.txt") + " 2>/dev/null") == 64,
          "adapt without --backbone is a usage error (64)");
    check(run(tool + " pretrain --out " + quote(scratch / "x") + " 2>/dev/null") == 64, "no training data is a usage error (64)");
    check(run(tool + " pretrain --recall-only --out " + quote(scratch / "x") + " --train " + quote(scratch / "train.txt") + " 2> " +
              quote(scratch / "err0")) == 64 &&
              slurp(scratch / "err0").find("--recall-practice") != std::string::npos,
          "--recall-only without recall-practice documents is a usage error (64) naming --recall-practice");
    check(run(tool + " pretrain --recall-practice 2 --recall-facts 2 --recall-min-facts 3 --out " + quote(scratch / "x") +
              " --train " + quote(scratch / "train.txt") + " 2>/dev/null") == 64,
          "--recall-min-facts above --recall-facts is a usage error (64)");
    check(run(tool + " pretrain --lr -1 --out " + quote(scratch / "x") + " --train " + quote(scratch / "train.txt") +
              " 2> " + quote(scratch / "err1")) == 2 &&
              slurp(scratch / "err1").find("learning rate") != std::string::npos,
          "a negative learning rate is refused with a sentence (2)");
    std::ofstream(scratch / "tiny.txt") << "abc";
    check(run(tool + " pretrain --out " + quote(scratch / "x") + " --train " + quote(scratch / "tiny.txt") + " 2> " +
              quote(scratch / "err2")) == 2 &&
              slurp(scratch / "err2").find("fewer than one segment") != std::string::npos,
          "a corpus shorter than one segment is refused (2)");
    {
      std::string cut = slurp(scratch / "run" / "checkpoint.safetensors");
      cut.resize(cut.size() / 3);
      fs::create_directories(scratch / "cut");
      std::ofstream(scratch / "cut" / "checkpoint.safetensors", std::ios::binary) << cut;
    }
    const int rc = run(tool + " pretrain" + small + " --steps 20 --resume auto --out " + quote(scratch / "cut") + " 2> " +
                       quote(scratch / "err3"));
    check(rc == 2 && slurp(scratch / "err3").find("unexpected") == std::string::npos,
          "a truncated checkpoint is refused with a message (2)");
    // Hostile checkpoints (issue 10): refused as files (2) naming what is wrong, never as a stopped
    // run (3) or "unexpected" (1).
    {
      const auto good = SafetensorsFile::open(scratch / "run" / "checkpoint.safetensors");
      int n = 0;
      auto hostile = [&](const std::map<std::string, std::string>& edits, const std::string& expect, const std::string& what) {
        auto meta = good.metadata();
        for (const auto& [k, v] : edits) meta[k] = v;
        SafetensorsWriter w;
        w.set_metadata(meta);
        for (const auto& name : good.names()) w.add_raw(name, good.info(name).dtype, good.info(name).shape, good.raw(name));
        const fs::path dir = scratch / ("hostile" + std::to_string(n++));
        fs::create_directories(dir);
        w.write(dir / "checkpoint.safetensors");
        const fs::path err = dir / "err";
        const int code = run(tool + " pretrain" + small + " --steps 20 --resume auto --out " + quote(dir) + " 2> " + quote(err));
        const std::string text = slurp(err);
        std::cout << text;
        check(code == 2 && text.find("unexpected") == std::string::npos && text.find(expect) != std::string::npos,
              what + " is refused (2) naming " + expect);
      };
      hostile({{"step", "99999999999999999999"}}, "step", "a checkpoint with a step beyond int64");
      hostile({{"step", "-3"}}, "step", "a checkpoint with a negative step");
      hostile({{"data", R"({"next_document": 0, "epoch": 1e300, "streams": [[0, 0], [0, 0], [0, 0]]})"}}, "data position",
              "a checkpoint with a non-integer epoch");
      hostile({{"model", R"({"n_layer": "2147483647"})"}}, "another model", "a checkpoint of another model");
      hostile({{"format", "x"}}, "not a training checkpoint", "a file that is not a checkpoint");
    }
    check(run(tool + " adapt --backbone " + quote(scratch / "run" / "backbone.safetensors") +
              " --memory-tokens 256 --chunk-size 3 --retrieved-tokens 16 --train " + quote(scratch / "train.txt") +
              " --out " + quote(scratch / "x") + " 2> " + quote(scratch / "err4")) == 2 &&
              slurp(scratch / "err4").find("chunk_size") != std::string::npos,
          "memory settings that do not divide are refused (2)");
  } catch (const std::exception& e) {
    std::cout << "FAIL  unexpected exception: " << e.what() << "\n";
    return 1;
  }
  std::cout << (failures ? std::to_string(failures) + " checks failed\n" : "all checks passed\n");
  return failures ? 1 : 0;
}
