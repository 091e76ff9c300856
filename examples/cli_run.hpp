#pragma once
// What longmem-run computes, for either place: the options, a backbone run and a LongMem run, as
// templates over a placement policy P:
//   P::location    Host or Device: where the model's weights, activations and memory live
//   P::Bank        the memory bank policy (HostMemoryBank<float> / DeviceMemoryBank<float>, or
//                  DeviceMemoryBank<__nv_bfloat16> for a bf16 model)
//   P::Retriever   the chunk retriever (ExactChunkRetriever / FusedChunkRetriever)
// cli.cpp (g++) instantiates them for the host; cli_device.cu (nvcc, only in CUDA builds)
// for the device, because the device ops are CUDA kernels. Checkpoints always load on the host
// and are then copied to the device; outputs are copied back before they are written. No CLI11
// here, so that nvcc only sees the library's headers.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <longmem/longmem.hpp>

namespace longmem::cli {

struct RunOptions {
  std::string backbone, sidenet, tokens, out, format, dtype = "f32", fusion = "gated", device = "cpu";
  std::string device_math = "fp32";  // --device cuda: longmem::DeviceMath (cuda/math_mode.hpp)
  int segment_length = 0;
  bool hidden_states = false, no_memory = false, allow_other = false, quiet = false;
  std::optional<int> memory_tokens, chunk_size, retrieved_tokens;
};

/// Host placement: the CPU policies.
struct HostPlacement {
  using location = Host;
  using Bank = HostMemoryBank<float>;
  using Retriever = ExactChunkRetriever;
};

/// What checkpoints load as on the host for a model computing in T: T itself, or float for a bf16
/// or fp16 model (converted once, when it is copied to the device).
template <class T>
using LoadType = std::conditional_t<ComputeType<T>, T, float>;

/// A loaded host part (backbone or SideNet) at location L in element type T: itself for the host, a
/// device copy (converted to T) otherwise.
template <class L, class T, class Part>
auto place(Part&& host_part) {
  if constexpr (std::is_same_v<L, Host>) {
    return std::forward<Part>(host_part);
  } else {
    return host_part.template to<L, T>();
  }
}

/// "" on the host (the tool's messages as they always were), " on the device" otherwise.
template <class L>
const char* where() {
  return std::is_same_v<L, Host> ? "" : " on the device";
}

template <class T>
void write_f32(SafetensorsWriter& w, const std::string& name, TensorView<const T, Host> t) {
  Tensor<float, Host> f(t.shape());
  for (index_t i = 0; i < t.numel(); ++i) f.data()[i] = to_float(t.data()[i]);
  w.add<float>(name, f.view());
}

template <class P, class T>
int run_backbone(const RunOptions& o, const std::vector<std::int32_t>& ids) {
  using L = typename P::location;
  auto backbone = place<L, T>(Gpt2Backbone<LoadType<T>>::load(o.backbone));
  const auto& cfg = backbone.config();
  const index_t N = static_cast<index_t>(ids.size());
  const int seg = o.segment_length ? o.segment_length : static_cast<int>(N);
  if (!o.segment_length && N > cfg.n_positions) {
    detail::fail<InputError>(o.tokens, ": ", N, " tokens exceed the backbone's n_positions (", cfg.n_positions,
                             "); pass --segment-length to run independent segments");
  }
  Tensor<T, Host> logits({N, cfg.vocab_size});
  Tensor<T, Host> hidden;
  if (o.hidden_states) hidden.resize({cfg.n_layer + 1, N, cfg.n_embd});
  BackboneOutput<T, L> out;
  for (index_t b = 0; b < N; b += seg) {
    const index_t len = std::min<index_t>(seg, N - b);
    backbone.forward(std::span<const std::int32_t>(ids).subspan(static_cast<std::size_t>(b), static_cast<std::size_t>(len)),
                     BackboneRequest{true, o.hidden_states, -1}, out);
    // Into the host buffers (a device -> host copy on the device).
    copy(cview(out.logits), logits.view().slice(b, b + len));
    if (o.hidden_states) {
      for (int j = 0; j <= cfg.n_layer; ++j) copy(cview(out.hidden)[j], hidden.view()[j].slice(b, b + len));
    }
  }
  SafetensorsWriter w;
  w.set_metadata({{"generator", "longmem-run"}, {"longmem_version", version_string}, {"segment_length", std::to_string(seg)},
                  {"mode", "backbone"}});
  Tensor<std::int32_t, Host> tok({N});
  std::copy(ids.begin(), ids.end(), tok.begin());
  w.add<std::int32_t>("tokens", tok.view());
  write_f32<T>(w, "logits", logits.view());
  if (o.hidden_states) write_f32<T>(w, "hidden_states", hidden.view());
  w.write(o.out);
  if (!o.quiet) {
    std::cout << "backbone " << cfg.architecture << " (L=" << cfg.n_layer << ", d=" << cfg.n_embd << ", H=" << cfg.n_head
              << ", V=" << cfg.vocab_size << ")" << where<L>() << ": " << N << " tokens in segments of " << seg << " -> "
              << o.out << "\n";
  }
  return 0;
}

template <class P, class T, class Fusion>
int run_longmem(const RunOptions& o, const std::vector<std::int32_t>& ids) {
  using L = typename P::location;
  using M = Model<Gpt2Backbone<T, L>, typename P::Bank, typename P::Retriever, Fusion>;
  auto backbone = Gpt2Backbone<LoadType<T>>::load(o.backbone);
  auto side_net = SideNet<LoadType<T>>::load(o.sidenet);
  MemoryConfig mem = side_net.recommended_memory().value_or(MemoryConfig{});
  if (o.memory_tokens) mem.memory_tokens = *o.memory_tokens;
  if (o.chunk_size) mem.chunk_size = *o.chunk_size;
  if (o.retrieved_tokens) mem.retrieved_tokens = *o.retrieved_tokens;
  mem.enabled = !o.no_memory;
  const int seg = o.segment_length ? o.segment_length : backbone.config().n_positions;
  const index_t V = backbone.config().vocab_size;
  M model(place<L, T>(std::move(backbone)), place<L, T>(std::move(side_net)), mem, 1, typename P::Retriever{},
          o.allow_other);
  const index_t N = static_cast<index_t>(ids.size());
  Tensor<float, Host> logits({N, V});
  Tensor<T, Host> staged;  // device runs: one segment's logits copied back
  double nll = 0;
  std::int64_t counted = 0;
  std::span<const std::int32_t> all(ids);
  for (index_t b = 0; b < N; b += seg) {
    const index_t len = std::min<index_t>(seg, N - b);
    // Targets: the next token of the stream (-1 past its end).
    std::vector<std::int32_t> targets(static_cast<std::size_t>(len));
    for (index_t t = 0; t < len; ++t) targets[static_cast<std::size_t>(t)] = b + t + 1 < N ? ids[static_cast<std::size_t>(b + t + 1)] : -1;
    const auto& out = model.forward(all.subspan(static_cast<std::size_t>(b), static_cast<std::size_t>(len)), targets);
    const T* seg_logits = nullptr;
    if constexpr (std::is_same_v<L, Host>) {
      seg_logits = out.logits[0].data();
    } else {
      staged.resize(out.logits[0].shape());
      copy(cview(out.logits[0]), staged.view());
      seg_logits = staged.data();
    }
    for (index_t i = 0; i < len * V; ++i) logits.data()[b * V + i] = to_float(seg_logits[i]);
    nll += out.loss_sum;
    counted += out.loss_tokens;
  }
  SafetensorsWriter w;
  std::map<std::string, std::string> md{{"generator", "longmem-run"},
                  {"longmem_version", version_string},
                  {"mode", "longmem"},
                  {"segment_length", std::to_string(seg)},
                  {"memory", mem.enabled ? "on" : "off"},
                  {"memory_tokens", std::to_string(mem.memory_tokens)},
                  {"chunk_size", std::to_string(mem.chunk_size)},
                  {"retrieved_tokens", std::to_string(mem.retrieved_tokens)},
                  {"fusion", Fusion::name},
                  {"mean_nll", detail::format_double(counted ? nll / static_cast<double>(counted) : 0.0)}};
  if constexpr (!std::is_same_v<L, Host>) {  // host files stay as they were
    md["device"] = L::name;
    md["device_math"] = o.device_math;
    md["dtype"] = o.dtype;
  }
  w.set_metadata(md);
  Tensor<std::int32_t, Host> tok({N});
  std::copy(ids.begin(), ids.end(), tok.begin());
  w.add<std::int32_t>("tokens", tok.view());
  w.add<float>("logits", logits.view());
  w.write(o.out);
  if (!o.quiet) {
    const double mean = counted ? nll / static_cast<double>(counted) : 0.0;
    std::cout << "longmem" << where<L>() << ": " << N << " tokens in segments of " << seg << ", memory "
              << (mem.enabled ? "on" : "off") << " (msz " << mem.memory_tokens << ", csz " << mem.chunk_size << ", K "
              << mem.retrieved_tokens << ", " << Fusion::name << "), mean NLL " << mean << " nats, perplexity "
              << std::exp(mean) << " -> " << o.out << "\n";
  }
  return 0;
}

template <class P, class T>
int run(const RunOptions& o, const std::vector<std::int32_t>& ids) {
  if (o.sidenet.empty()) return run_backbone<P, T>(o, ids);
  if (o.fusion == "joint") return run_longmem<P, T, JointFusion>(o, ids);
  return run_longmem<P, T, GatedFusion>(o, ids);
}

}  // namespace longmem::cli
