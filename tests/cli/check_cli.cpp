// Drives the longmem-run tool as a user would and checks what it writes against the
// independent fixtures (Hugging Face outputs; the PyTorch port of LongMem).
//   longmem_cli_check <path to longmem-run> <fixture dir> <scratch dir>
// Exit 0 when every check passes; prints each failure.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <longmem/safetensors.hpp>

#include "cli_check_support.hpp"

using namespace longmem;
using namespace longmem::cli_check;

namespace {

// max |a - b| / max |b| over all elements (b = reference).
double relative_error(const float* a, const float* b, index_t n) {
  double err = 0, ref = 0;
  for (index_t i = 0; i < n; ++i) {
    const double d = std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i]));
    err = std::isnan(d) ? INFINITY : std::max(err, d);
    ref = std::max(ref, std::abs(static_cast<double>(b[i])));
  }
  return err / ref;
}

void write_text_tokens(const fs::path& path, const std::int32_t* ids, index_t n) {
  std::ofstream out(path);
  for (index_t i = 0; i < n; ++i) out << ids[i] << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: longmem_cli_check LONGMEM_RUN FIXTURE_DIR SCRATCH_DIR\n";
    return 64;
  }
  const std::string tool = argv[1];
  const fs::path fixtures = argv[2], scratch = argv[3];
  fs::create_directories(scratch);
  try {
    // 1. A Hugging Face checkpoint: logits and hidden states against transformers.
    const fs::path hf = fixtures / "hf_gpt2_small";
    auto expected = SafetensorsFile::open(hf / "expected.safetensors");
    auto tokens = expected.read<std::int32_t>("tokens");
    write_text_tokens(scratch / "hf_tokens.txt", tokens.data(), tokens.numel());
    const fs::path out1 = scratch / "hf_out.safetensors";
    check(run(quote(tool) + " --backbone " + quote(hf / "model.safetensors") + " --tokens " + quote(scratch / "hf_tokens.txt") +
              " --out " + quote(out1) + " --hidden-states --quiet") == 0,
          "backbone run exits 0");
    auto got = SafetensorsFile::open(out1);
    auto want_logits = expected.read<float>("logits");
    auto want_hidden = expected.read<float>("hidden_states");
    auto got_logits = got.read<float>("logits", want_logits.shape());
    auto got_hidden = got.read<float>("hidden_states", want_hidden.shape());
    check(relative_error(got_logits.data(), want_logits.data(), want_logits.numel()) <= 1e-4, "logits match transformers");
    check(relative_error(got_hidden.data(), want_hidden.data(), want_hidden.numel()) <= 1e-4,
          "hidden states match transformers");

    // Raw int32 input gives the same logits.
    {
      std::ofstream raw(scratch / "hf_tokens.i32", std::ios::binary);
      raw.write(reinterpret_cast<const char*>(tokens.data()), static_cast<std::streamsize>(tokens.bytes()));
    }
    const fs::path out2 = scratch / "hf_out_raw.safetensors";
    check(run(quote(tool) + " --backbone " + quote(hf / "model.safetensors") + " --tokens " + quote(scratch / "hf_tokens.i32") +
              " --out " + quote(out2) + " --quiet") == 0,
          "raw int32 token file accepted");
    auto got2 = SafetensorsFile::open(out2).read<float>("logits", want_logits.shape());
    check(relative_error(got2.data(), got_logits.data(), got_logits.numel()) == 0.0, "raw int32 input gives identical logits");

    // 2. A LongMem model streamed with memory: stream 0 of the GPT-2* fixture.
    const fs::path lm = fixtures / "longmem_gpt2star";
    auto lexp = SafetensorsFile::open(lm / "expected.safetensors");
    const auto& md = lexp.metadata();
    auto ltokens = lexp.read<std::int32_t>("tokens");  // (B, S*T)
    auto llogits = lexp.read<float>("logits");         // (B, S*T, V)
    write_text_tokens(scratch / "lm_tokens.txt", ltokens.data(), ltokens.dim(1));
    const fs::path out3 = scratch / "lm_out.safetensors";
    check(run(quote(tool) + " --backbone " + quote(lm / "backbone.safetensors") + " --sidenet " + quote(lm / "sidenet.safetensors") +
              " --tokens " + quote(scratch / "lm_tokens.txt") + " --out " + quote(out3) + " --segment-length " +
              md.at("segment_length") + " --memory-tokens " + md.at("memory_tokens") + " --chunk-size " + md.at("chunk_size") +
              " --retrieved-tokens " + md.at("retrieved_tokens") + " --quiet") == 0,
          "LongMem run exits 0");
    auto lgot = SafetensorsFile::open(out3).read<float>("logits", Shape{llogits.dim(1), llogits.dim(2)});
    check(relative_error(lgot.data(), llogits.data(), lgot.numel()) <= 1e-4,
          "LongMem per-segment logits match the PyTorch port of the reference");

    // 3. Bad input: clear errors and a non-zero exit, no output file.
    {
      std::ofstream(scratch / "bad_tokens.txt") << "1 2 99999\n";
      const fs::path bad_out = scratch / "bad_out.safetensors";
      fs::remove(bad_out);
      check(run(quote(tool) + " --backbone " + quote(hf / "model.safetensors") + " --tokens " + quote(scratch / "bad_tokens.txt") +
                " --out " + quote(bad_out)) == 2,
            "an out-of-vocabulary token id exits 2");
      check(!fs::exists(bad_out), "no output file is left after an error");
      std::ofstream(scratch / "junk_tokens.txt") << "1 two 3\n";
      check(run(quote(tool) + " --backbone " + quote(hf / "model.safetensors") + " --tokens " +
                quote(scratch / "junk_tokens.txt") + " --out " + quote(bad_out)) == 2,
            "a non-numeric token exits 2");
      check(run(quote(tool) + " --backbone " + quote(scratch / "missing.safetensors") + " --tokens " +
                quote(scratch / "hf_tokens.txt") + " --out " + quote(bad_out)) == 2,
            "a missing checkpoint exits 2");
      check(run(quote(tool) + " --backbone " + quote(hf / "model.safetensors") + " --tokens " + quote(scratch / "hf_tokens.txt") +
                " --out " + quote(bad_out) + " --chunk-size 4") == 64,
            "memory options without --sidenet are a usage error (64)");
    }

    // 4. Hostile checkpoints (issue 10): truncated, garbled or with huge sizes in their metadata,
    //    each refused with its own message and exit 2, never "unexpected".
    {
      auto rewritten = [&](const fs::path& src, const fs::path& dst, const std::map<std::string, std::string>& edits) {
        const auto f = SafetensorsFile::open(src);
        auto meta = f.metadata();
        for (const auto& [k, v] : edits) meta[k] = v;
        SafetensorsWriter w;
        w.set_metadata(meta);
        for (const auto& n : f.names()) w.add_raw(n, f.info(n).dtype, f.info(n).shape, f.raw(n));
        w.write(dst);
      };
      auto bytes_of = [](const fs::path& p) {
        std::ifstream in(p, std::ios::binary);
        return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      };
      const fs::path bb = lm / "backbone.safetensors", sn = lm / "sidenet.safetensors", h = scratch / "hostile";
      fs::create_directories(h);
      rewritten(bb, h / "n_layer.safetensors", {{"n_layer", "2147483647"}});
      rewritten(bb, h / "vocab.safetensors", {{"vocab_size", "2000000000"}});
      rewritten(bb, h / "positions.safetensors", {{"n_positions", "1000000000"}});
      rewritten(sn, h / "sn_reduction.safetensors", {{"reduction_factor", "0"}});
      rewritten(sn, h / "sn_memory.safetensors", {{"memory_tokens", "2147483646"}, {"chunk_size", "2"}, {"retrieved_tokens", "64"}});
      rewritten(sn, h / "sn_layers.safetensors", {{"n_layer", "-1"}});
      {
        std::string b = bytes_of(bb);
        std::ofstream(h / "truncated.safetensors", std::ios::binary) << b.substr(0, b.size() / 2);
        for (std::size_t i = 8; i < 200 && i < b.size(); i += 7) b[i] = static_cast<char>(b[i] ^ 0x5a);
        std::ofstream(h / "garbled.safetensors", std::ios::binary) << b;
      }
      const fs::path out = scratch / "hostile_out.safetensors", err = scratch / "hostile.err";
      auto refused = [&](const std::string& args, const std::string& expect, const std::string& what) {
        const int rc = run(quote(tool) + args + " --tokens " + quote(scratch / "lm_tokens.txt") + " --out " + quote(out) +
                           " 2> " + quote(err));
        const std::string text = bytes_of(err);
        std::cout << text;
        check(rc == 2 && text.find("unexpected") == std::string::npos && text.find(expect) != std::string::npos,
              what + ": exit 2 with a message naming " + expect);
      };
      for (const char* name : {"n_layer", "vocab", "positions", "truncated", "garbled"}) {
        const std::string file = std::string(name) + ".safetensors";
        const std::string expect = std::string(name) == "vocab"       ? "vocab_size"
                                   : std::string(name) == "positions" ? "n_positions"
                                                                      : file;
        refused(" --backbone " + quote(h / file), expect, std::string("backbone ") + name);
        refused(" --backbone " + quote(h / file) + " --sidenet " + quote(sn), expect, std::string("LongMem with backbone ") + name);
      }
      refused(" --backbone " + quote(bb) + " --sidenet " + quote(h / "sn_reduction.safetensors"), "reduction_factor",
              "a SideNet with reduction_factor 0");
      refused(" --backbone " + quote(bb) + " --sidenet " + quote(h / "sn_memory.safetensors"), "memory_tokens",
              "a SideNet recommending 2^31 - 2 memory tokens");
      refused(" --backbone " + quote(bb) + " --sidenet " + quote(h / "sn_layers.safetensors"), "n_layer",
              "a SideNet with n_layer -1");
      // A memory the machine cannot hold, asked for on the command line: refused before allocating.
      refused(" --backbone " + quote(bb) + " --sidenet " + quote(sn) + " --memory-tokens 1073741824 --chunk-size 1",
              "this machine has", "a 2^30-token memory");
    }

    // 5. --device cuda. Without CUDA compiled in: exit 2 saying so. With it: on a GPU machine the
    //    LongMem run of section 2 on the device, whose logits must match the reference as the CPU's
    //    do; on a machine without a usable GPU, exit 2 saying a CUDA device is needed.
    {
      auto text_of = [](const fs::path& p) {
        std::ifstream in(p, std::ios::binary);
        return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      };
      const fs::path out = scratch / "lm_cuda.safetensors", err = scratch / "cuda.err";
      fs::remove(out);
      const std::string lm_args = " --backbone " + quote(lm / "backbone.safetensors") + " --sidenet " +
                                  quote(lm / "sidenet.safetensors") + " --tokens " + quote(scratch / "lm_tokens.txt") +
                                  " --segment-length " + md.at("segment_length") + " --memory-tokens " + md.at("memory_tokens") +
                                  " --chunk-size " + md.at("chunk_size") + " --retrieved-tokens " + md.at("retrieved_tokens");
      const int rc = run(quote(tool) + lm_args + " --out " + quote(out) + " --device cuda --quiet 2> " + quote(err));
      const std::string text = text_of(err);
      std::cout << text;
      const bool no_unexpected = text.find("unexpected") == std::string::npos;
      if (!LONGMEM_CLI_CUDA) {
        check(rc == 2 && no_unexpected && text.find("built without CUDA") != std::string::npos && !fs::exists(out),
              "--device cuda in a build without CUDA: exit 2, 'built without CUDA', no output");
      } else if (rc == 0) {
        auto dgot = SafetensorsFile::open(out).read<float>("logits", Shape{llogits.dim(1), llogits.dim(2)});
        const double e = relative_error(dgot.data(), llogits.data(), dgot.numel());
        std::cout << "--device cuda logits: max |err| / max |ref| = " << e << "\n";
        check(e <= 1e-4, "LongMem on --device cuda matches the PyTorch port of the reference");
        // bf16 tensor-core rounding: within the model test's bound for that mode (20 u, u = 2^-8:
        // tests/gpu/test_model_device.cu), and visibly not the fp32 result.
        const fs::path out_bf16 = scratch / "lm_cuda_bf16.safetensors";
        const int rc16 = run(quote(tool) + lm_args + " --out " + quote(out_bf16) + " --device cuda --device-math bf16 --quiet");
        check(rc16 == 0, "--device cuda --device-math bf16 runs");
        if (rc16 == 0) {
          auto bgot = SafetensorsFile::open(out_bf16).read<float>("logits", Shape{llogits.dim(1), llogits.dim(2)});
          const double eb = relative_error(bgot.data(), llogits.data(), bgot.numel());
          std::cout << "--device cuda --device-math bf16 logits: max |err| / max |ref| = " << eb << "\n";
          check(eb <= 20.0 / 256 && eb > 1.0 / (1 << 18), "--device-math bf16: within 20 u of the reference, and not fp32's result");
          check(SafetensorsFile::open(out_bf16).metadata().at("device_math") == "bf16", "the output records device_math bf16");
        }
        // The 16-bit models (--dtype bf16 / f16: weights, activations and memory in bf16 / fp16),
        // memory off: within 20 u of the reference (u = 2^-8 for bf16, 2^-11 for fp16), and not
        // fp32's result. (With memory, 16-bit rounding may turn near-ties of chunk scores; the
        // device model test checks that case row by row.)
        for (const auto& [dtype, u] : {std::pair<std::string, double>{"bf16", 1.0 / 256}, {"f16", 1.0 / 2048}}) {
          const fs::path out_16 = scratch / ("lm_cuda_dtype_" + dtype + ".safetensors");
          const int rc_16 =
              run(quote(tool) + lm_args + " --out " + quote(out_16) + " --device cuda --dtype " + dtype + " --no-memory --quiet");
          check(rc_16 == 0, "--device cuda --dtype " + dtype + " runs");
          if (rc_16 != 0) continue;
          auto off = lexp.read<float>("logits_no_memory");  // (B, S*T, V)
          auto got = SafetensorsFile::open(out_16).read<float>("logits", Shape{off.dim(1), off.dim(2)});
          const double e16 = relative_error(got.data(), off.data(), got.numel());
          std::cout << "--device cuda --dtype " << dtype << " --no-memory logits: max |err| / max |ref| = " << e16 << "\n";
          check(e16 <= 20 * u && e16 > 1.0 / (1 << 21), "--dtype " + dtype + ": within 20 u of the reference, and not fp32's result");
          check(SafetensorsFile::open(out_16).metadata().at("dtype") == dtype, "the output records dtype " + dtype);
        }
      } else {
        check(rc == 2 && no_unexpected && text.find("needs a CUDA device") != std::string::npos,
              "--device cuda without a usable GPU: exit 2, 'needs a CUDA device'");
      }
      check(run(quote(tool) + lm_args + " --out " + quote(out) + " --device cuda --dtype f64") == 64,
            "--device cuda with --dtype f64 is a usage error (64)");
      for (const char* dtype : {"bf16", "f16"}) {
        check(run(quote(tool) + lm_args + " --out " + quote(out) + " --dtype " + dtype) == 64,
              std::string("--dtype ") + dtype + " without --device cuda is a usage error (64)");
        check(run(quote(tool) + lm_args + " --out " + quote(out) + " --device cuda --dtype " + dtype + " --device-math tf32") == 64,
              std::string("--dtype ") + dtype + " with --device-math is a usage error (64)");
      }
      check(run(quote(tool) + lm_args + " --out " + quote(out) + " --device gpu") == 64,
            "an unknown --device is a usage error (64)");
      check(run(quote(tool) + lm_args + " --out " + quote(out) + " --device-math bf16") == 64,
            "--device-math without --device cuda is a usage error (64)");
      check(run(quote(tool) + lm_args + " --out " + quote(out) + " --device cuda --device-math fp16") == 64,
            "an unknown --device-math is a usage error (64)");
    }
  } catch (const std::exception& e) {
    std::cout << "FAIL  unexpected exception: " << e.what() << "\n";
    return 1;
  }
  std::cout << (failures ? "FAILED: " : "all passed: ") << failures << " failure(s)\n";
  return failures ? 1 : 0;
}
