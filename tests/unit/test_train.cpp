// Training: whole-model gradients against PyTorch float64 autograd and against finite
// differences, the data streams, AdamW and its schedule, checkpoints (resume bit for bit, refused
// mismatches), bad input, and a task only memory can solve.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "longmem/train.hpp"
#include "model_test_support.hpp"

namespace {

using namespace longmem;
using test::TempDir;

const std::filesystem::path fixtures = LONGMEM_FIXTURE_DIR;

template <class T>
using Adaptation = SideNetAdaptation<HostMemoryBank<T>, ExactChunkRetriever, GatedFusion, T>;
template <class T>
using JointAdaptation = SideNetAdaptation<HostMemoryBank<T>, ExactChunkRetriever, JointFusion, T>;

/// One document per stream row of the fixture's tokens (B, S*T).
std::vector<Document> fixture_documents(const SafetensorsFile& expected) {
  auto tokens = expected.read<std::int32_t>("tokens");
  std::vector<Document> docs;
  for (index_t b = 0; b < tokens.dim(0); ++b) {
    Document d{"stream " + std::to_string(b), {}, {}};
    for (index_t i = 0; i < tokens.dim(1); ++i) d.tokens.push_back(tokens(b, i));
    docs.push_back(std::move(d));
  }
  return docs;
}

int metadata_int(const SafetensorsFile& f, const std::string& key) {
  return std::stoi(f.metadata().at(key));
}

/// Every segment of every stream once, as the fixture script streams them; returns the loss.
template <class Task>
LossSum run_stream_once(Task& task, const std::vector<Document>& docs, int segment_length) {
  DocumentStreams data(docs, static_cast<int>(docs.size()), segment_length);
  const auto n = static_cast<std::int64_t>(docs[0].tokens.size());
  LossSum loss;
  for (std::int64_t s = 0; s * segment_length < n; ++s) loss += task.forward_backward(data.next());
  return loss;
}

struct GradientComparison {
  double worst = 0;  // max over tensors of max |got - want| / max |want| (absolute / global scale for zero tensors)
  std::string where;
  int tensors = 0;
};

/// Compares a gradients file we wrote with the fixture's `prefix`-ed tensors of the same names.
GradientComparison compare_gradient_files(const std::filesystem::path& ours, const SafetensorsFile& want,
                                          const std::string& prefix) {
  SafetensorsFile got = SafetensorsFile::open(ours);
  GradientComparison c;
  double global = 0;
  for (const auto& n : got.names()) {
    auto w = want.read<double>(prefix + n);
    for (double x : w) global = std::max(global, std::abs(x));
  }
  for (const auto& n : got.names()) {
    auto g = got.read<double>(n);
    auto w = want.read<double>(prefix + n, g.shape());
    double err = 0, ref = 0;
    for (index_t i = 0; i < g.numel(); ++i) {
      err = std::max(err, std::abs(g.data()[i] - w.data()[i]));
      ref = std::max(ref, std::abs(w.data()[i]));
    }
    // A tensor whose exact gradient is 0 (a key bias under a causal softmax) is compared with
    // the largest gradient of the model as the scale.
    const double rel = ref > 1e-12 * global ? err / ref : err / global;
    if (rel > c.worst) {
      c.worst = rel;
      c.where = n;
    }
    ++c.tensors;
  }
  return c;
}

}  // namespace

TEST_CASE("train: whole-model gradients equal PyTorch float64 autograd (adaptation and from scratch)", "[train][reference]") {
  for (const char* folder : {"longmem_gpt2star", "longmem_gpt2"}) {
    const auto dir = fixtures / folder;
    SafetensorsFile expected = SafetensorsFile::open(dir / "expected.safetensors");
    SafetensorsFile want = SafetensorsFile::open(dir / "gradients.safetensors");
    const auto docs = fixture_documents(expected);
    const int T = metadata_int(expected, "segment_length");
    MemoryConfig mem;
    mem.memory_tokens = metadata_int(expected, "memory_tokens");
    mem.chunk_size = metadata_int(expected, "chunk_size");
    mem.retrieved_tokens = metadata_int(expected, "retrieved_tokens");
    const int B = static_cast<int>(docs.size());
    TempDir tmp;
    CAPTURE(folder);

    auto check = [&](auto& task, const char* prefix, const char* loss_key) {
      const LossSum loss = run_stream_once(task, docs, T);
      CHECK(loss.count == std::stoll(want.metadata().at("targets")));
      CHECK(std::abs(loss.mean() - std::stod(want.metadata().at(loss_key))) < 1e-10);
      const auto path = tmp / (std::string(prefix) + "safetensors");
      task.save_gradients(path, 1.0 / static_cast<double>(loss.count));
      const auto c = compare_gradient_files(path, want, prefix);
      CAPTURE(prefix, c.where, c.worst, c.tensors);
      int expected_tensors = 0;
      for (const auto& n : want.names()) expected_tensors += n.starts_with(prefix);
      CHECK(c.tensors == expected_tensors);
      CHECK(c.worst <= 1e-6);
    };
    {
      Adaptation<double> task(Gpt2Backbone<double>::load(dir / "backbone.safetensors"),
                              SideNet<double>::load(dir / "sidenet.safetensors"), mem, B);
      check(task, "sidenet_gated.", "loss_sidenet_gated");
    }
    {
      JointAdaptation<double> task(Gpt2Backbone<double>::load(dir / "backbone.safetensors"),
                                   SideNet<double>::load(dir / "sidenet.safetensors"), mem, B);
      check(task, "sidenet_joint.", "loss_sidenet_joint");
    }
    {
      Adaptation<double> task(Gpt2Backbone<double>::load(dir / "backbone.safetensors"),
                              SideNet<double>::load(dir / "sidenet.safetensors"), mem, B);
      task.set_memory_enabled(false);
      check(task, "sidenet_no_memory.", "loss_sidenet_no_memory");
    }
    {
      BackbonePretraining<double> task(Gpt2Backbone<double>::load(dir / "backbone.safetensors"), B);
      check(task, "backbone.", "loss_backbone");
    }
  }
}
