// The whole LongMem model on the GPU:
//   Model<Gpt2Backbone<float, Device>, DeviceMemoryBank<float>, FusedChunkRetriever, Fusion>
// built from host-loaded parts moved with to_device(), checked three ways:
//   1. fixtures   the committed longmem_gpt2star and longmem_gpt2 folders (the float64 PyTorch port of
//                 the reference), streamed exactly as tests/unit/test_model.cpp streams them on the
//                 host (same segments, same memory config, B streams together): GatedFusion with memory,
//                 JointFusion with memory, memory off; every segment's logits within 1e-4 x max |ref|
//   2. host       a random-weights model (GPT-2* and GPT-2) on the device against the same model on the
//                 host (HostMemoryBank + ExactChunkRetriever), 3 streams of different and changing
//                 lengths, enough segments to fill and wrap every bank (odd lengths leave pending
//                 chunks): logits, retrieved chunk counts, the chunks chosen, losses, bank counters
//   3. batching   the device model with 3 streams run together against 3 one-stream device models
//                 run one at a time: the same logits within float tolerance
// plus: memory off then on again, read-only memory, perplexity, refused segments change no bank,
// result buffers are reused across calls. Every comparison prints what was compared and its max
// abs error.
//
// Tolerances: max |dev - ref| <= 1e-4 * max |ref| per (segment, stream) (fp32 throughout: cuBLASLt
// computes in CUBLAS_COMPUTE_32F, so only the summation order differs from the host).
// The fixtures again with a bf16 model (Gpt2Backbone<bfloat16, Device>, bf16 bank) and an fp16 one
// (half, __half bank): every op's output rounded to the type, 20u of max |ref| as below (bf16 7.8e-2,
// fp16 u = 2^-11: 9.8e-3). With memory, an fp32 device model runs the same segments beside it:
// where 16-bit rounding of the queries turns a near-tie of two chunks' scores the other way, the
// 16-bit model retrieves other memory from that row on; the rows before the first such row in each
// (segment, stream) are held to the bound, the rest are counted and reported.
// The fixtures again under the reduced-precision device modes (longmem::DeviceMath): each of the
// chained tensor-core products (the fixtures' backbone and SideNet: ~20 GEMMs and attention
// products from token to logit) adds about u of relative error to what it passes on, so the bound
// is 20u of max |ref|: tf32 (u = 2^-11) 9.8e-3, bf16 (u = 2^-8) 7.8e-2; and each mode must move the
// logits by more than 2^-18 of max |ref| (else it was not applied).
//
// Exit status: 0 all passed, 1 something failed, 77 no CUDA device (ctest: skipped; then only the
// refusal without a device is checked: to_device() must throw BackendError naming what was asked).
// LONGMEM_TEST_SEED=<n> draws other random models and tokens; LONGMEM_FIXTURE_DIR overrides the
// fixture folder compiled in.

// The host backend (Eigen) is compiled here as plain host code.
#define EIGEN_NO_CUDA

#include <longmem/cpu/exact_chunk_retriever.hpp>
#include <longmem/cpu/host_memory_bank.hpp>
#include <longmem/cpu/ops.hpp>
#include <longmem/cuda/chunk_retriever.cuh>
#include <longmem/cuda/device_memory_bank.cuh>
#include <longmem/cuda/ops.cuh>
#include <longmem/cuda/storage.hpp>
#include <longmem/model.hpp>
#include <longmem/perplexity.hpp>
#include <longmem/safetensors.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <limits>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef LONGMEM_FIXTURE_DIR
#define LONGMEM_FIXTURE_DIR "tests/fixtures"
#endif

#include "gpu_check.hpp"

namespace {

using namespace longmem;

constexpr double tolerance = 1e-4;  // of max |ref|

template <class F>
using DevModel = Model<Gpt2Backbone<float, Device>, DeviceMemoryBank<float>, FusedChunkRetriever, F>;
// The 16-bit models: weights and activations in bf16 (fp16) buffers, bf16 (fp16) bank storage.
template <class F>
using Bf16Model = Model<Gpt2Backbone<bfloat16, Device>, DeviceMemoryBank<__nv_bfloat16>, FusedChunkRetriever, F>;
template <class F>
using F16Model = Model<Gpt2Backbone<longmem::half, Device>, DeviceMemoryBank<__half>, FusedChunkRetriever, F>;
template <class F>
using HostModel = Model<Gpt2Backbone<float>, HostMemoryBank<float>, ExactChunkRetriever, F>;

std::uint64_t base_seed() {
  if (const char* s = std::getenv("LONGMEM_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  return 20231107;
}

std::filesystem::path fixture_dir() {
  if (const char* s = std::getenv("LONGMEM_FIXTURE_DIR")) return s;
  return LONGMEM_FIXTURE_DIR;
}

/// max |a - b| over n paired elements and max |b|; NaN anywhere gives an infinite error.
struct Err {
  double max_abs_err = 0;
  double max_abs_ref = 0;
  double relative() const { return max_abs_ref > 0 ? max_abs_err / max_abs_ref : max_abs_err; }
  void merge(const Err& o) {
    max_abs_err = std::max(max_abs_err, o.max_abs_err);
    max_abs_ref = std::max(max_abs_ref, o.max_abs_ref);
  }
};

Err compare(const float* a, const float* b, std::int64_t n) {
  Err e;
  for (std::int64_t i = 0; i < n; ++i) {
    const double x = a[i], y = b[i];
    const double d = std::isnan(x) || std::isnan(y) ? std::numeric_limits<double>::infinity() : std::abs(x - y);
    e.max_abs_err = std::max(e.max_abs_err, d);
    e.max_abs_ref = std::max(e.max_abs_ref, std::abs(y));
  }
  return e;
}

template <class F>
const char* fusion_name() {
  return F::name;
}

/// Runs fn and reports whether it threw E with `part` in its message (the message goes to *msg).
template <class E, class Fn>
bool throws_with(Fn&& fn, const std::string& part, std::string* msg) {
  try {
    fn();
  } catch (const E& e) {
    *msg = e.what();
    return msg->find(part) != std::string::npos;
  } catch (const std::exception& e) {
    *msg = std::string("another exception: ") + e.what();
    return false;
  }
  *msg = "nothing thrown";
  return false;
}

// ---------------------------------------------------------------- 1. fixtures

// Mirrors check_longmem_fixture in tests/unit/test_model.cpp, on the device.
/// The bound of check_fixture under a device math mode (see the header); a bf16 model (bf16
/// buffers) has the bf16 mode's bound: every op's output is rounded to bf16 (u = 2^-8) where the
/// bf16 mode rounds every GEMM's inputs, about as many roundings on the way to a logit.
double fixture_tolerance(DeviceMath math) {
  switch (math) {
    case DeviceMath::tf32: return 20 * std::ldexp(1.0, -11);
    case DeviceMath::bf16: return 20 * std::ldexp(1.0, -8);
    case DeviceMath::fp32: break;
  }
  return tolerance;
}

/// The first row t of two retrievals (T, H, k') whose chosen chunks differ, as sets, in some head;
/// T when none does (or the shapes differ: then 0).
template <class A, class B>
int first_row_with_other_chunks(const Retrieved<A, Device>& x, const Retrieved<B, Device>& y) {
  if (!(x.slots.shape() == y.slots.shape()) || x.slots.rank() != 3) return 0;
  const Tensor<std::int32_t, Host> a = to_host(x.slots), b = to_host(y.slots);
  const index_t T = a.dim(0), H = a.dim(1), k = a.dim(2);
  for (index_t t = 0; t < T; ++t) {
    for (index_t h = 0; h < H; ++h) {
      std::vector<std::int32_t> sa(a.data() + (t * H + h) * k, a.data() + (t * H + h + 1) * k);
      std::vector<std::int32_t> sb(b.data() + (t * H + h) * k, b.data() + (t * H + h + 1) * k);
      std::sort(sa.begin(), sa.end());
      std::sort(sb.begin(), sb.end());
      if (sa != sb) return static_cast<int>(t);
    }
  }
  return static_cast<int>(T);
}

template <class F, class E = float>
void check_fixture(const std::string& name, const std::string& expected_name, bool memory_on,
                   DeviceMath math = DeviceMath::fp32) {
  constexpr bool half_width_model = HalfWidthType<E>;  // 16-bit buffers ignore the device math mode
  constexpr bool f16_model = std::is_same_v<E, longmem::half>;
  const auto dir = fixture_dir() / name;
  const std::string what = name + " '" + expected_name + "' (" + fusion_name<F>() + ", memory " + (memory_on ? "on" : "off") +
                           (f16_model                  ? ", fp16 model"
                            : half_width_model         ? ", bf16 model"
                            : math == DeviceMath::fp32 ? ""
                                                       : std::string(", ") + to_string(math)) +
                           ")";
  const DeviceMathScope scope(half_width_model ? DeviceMath::fp32 : math);
  const double bound = f16_model ? 20 * std::ldexp(1.0, -11) : fixture_tolerance(half_width_model ? DeviceMath::bf16 : math);
  const bool reduced = half_width_model || math != DeviceMath::fp32;
  if (!std::filesystem::exists(dir / "expected.safetensors")) {
    EXPECT(false, "%s: %s is missing (set LONGMEM_FIXTURE_DIR)", what.c_str(), (dir / "expected.safetensors").c_str());
    return;
  }
  auto expected = SafetensorsFile::open(dir / "expected.safetensors");
  MetadataReader md(expected.metadata(), expected.name());
  const int T = md.require_int("segment_length"), S = md.require_int("num_segments"), B = md.require_int("streams");
  MemoryConfig mem;
  mem.memory_tokens = md.require_int("memory_tokens");
  mem.chunk_size = md.require_int("chunk_size");
  mem.retrieved_tokens = md.require_int("retrieved_tokens");
  mem.enabled = memory_on;

  const auto backbone = Gpt2Backbone<float>::load(dir / "backbone.safetensors");
  const auto side_net = SideNet<float>::load(dir / "sidenet.safetensors");
  const int V = backbone.config().vocab_size;
  using M = std::conditional_t<f16_model, F16Model<F>, std::conditional_t<half_width_model, Bf16Model<F>, DevModel<F>>>;
  M model(backbone.template to<Device, E>(), side_net.template to<Device, E>(), mem, B);
  // A 16-bit model with memory: its queries carry 16-bit rounding, so where two chunks' scores nearly
  // tie it may retrieve another chunk than the fp32 model, and from that row on (the SideNet's
  // causal layers carry a row's memory output to the later rows) its logits follow other memory.
  // The fp32 twin runs in lockstep; rows before the first one whose chunks differ (as sets per
  // head) are held to the bound; the rest are counted and reported.
  std::optional<DevModel<F>> twin;
  if (half_width_model && memory_on) twin.emplace(backbone.to_device(), side_net.to_device(), mem, B);
  auto tokens = expected.read<std::int32_t>("tokens", {B, S * T});
  auto want = expected.read<float>(expected_name, {B, S * T, V});
  bool memory_was_used = false;
  Err worst, after_flip;
  int rows_with_memory_checked = 0, rows_after_flip = 0;
  for (int s = 0; s < S; ++s) {
    std::vector<std::span<const std::int32_t>> segs;
    for (int b = 0; b < B; ++b) segs.emplace_back(tokens[b].data() + s * T, static_cast<std::size_t>(T));
    const auto& out = model.forward(segs);
    if (twin) twin->forward(segs);
    for (int b = 0; b < B; ++b) {
      const auto& dev = out.logits[static_cast<std::size_t>(b)];
      EXPECT((dev.shape() == Shape{T, V}), "%s segment %d stream %d: logits have shape %s, expected (%d, %d)", what.c_str(), s,
             b, dev.shape().str().c_str(), T, V);
      if (!(dev.shape() == Shape{T, V})) continue;
      const int chunks = out.retrieved_chunks[static_cast<std::size_t>(b)];
      memory_was_used |= chunks > 0;
      int rows = T;  // rows held to the bound
      if (twin && chunks > 0) {
        rows = first_row_with_other_chunks(model.retrieval(b), twin->retrieval(b));
        rows_with_memory_checked += rows;
        rows_after_flip += T - rows;
      }
      const Tensor<float, Host> got = converted<float>(cview(to_host(dev)));
      const float* ref = want[b].data() + static_cast<std::int64_t>(s) * T * V;
      const Err e = compare(got.data(), ref, static_cast<std::int64_t>(rows) * V);
      if (rows < T) after_flip.merge(compare(got.data() + rows * V, ref + rows * V, static_cast<std::int64_t>(T - rows) * V));
      worst.merge(e);
      EXPECT(e.relative() <= bound,
             "%s segment %d stream %d (%d retrieved chunks, rows 0..%d): max |err| %.3g, max |ref| %.3g: %.3g of max |ref| > %.2g",
             what.c_str(), s, b, chunks, rows - 1, e.max_abs_err, e.max_abs_ref, e.relative(), bound);
    }
  }
  if (twin) {
    EXPECT(rows_with_memory_checked > 0, "%s: no row with memory kept the fp32 model's chunks: nothing was checked", what.c_str());
    std::printf("  %s: %d rows with memory checked; %d rows at or after a row whose chunks differ from the fp32 model's "
                "(near-ties under 16-bit rounding): max |err| %.3g there, not bounded\n",
                what.c_str(), rows_with_memory_checked, rows_after_flip, after_flip.max_abs_err);
  }
  EXPECT(memory_was_used == memory_on, "%s: memory %s used", what.c_str(), memory_was_used ? "was" : "was not");
  if (memory_on) {
    // The fixtures are sized so that the bank filled up and evicted.
    EXPECT(model.bank(0).chunks_appended() > model.bank(0).num_chunks(), "%s: bank 0 did not wrap (%lld chunks appended, %lld held)",
           what.c_str(), static_cast<long long>(model.bank(0).chunks_appended()), static_cast<long long>(model.bank(0).num_chunks()));
  }
  std::printf("fixture %-36s %d streams x %d segments of %d, V %d: max |err| %.3g, max |ref| %.3g (%.3g of max |ref|, bound %.2g)\n",
              what.c_str(), B, S, T, V, worst.max_abs_err, worst.max_abs_ref, worst.relative(), bound);
  if (reduced) {
    EXPECT(worst.relative() > std::ldexp(1.0, -18), "%s: the logits are as exact as fp32's (%.3g of max |ref|): the mode was not applied",
           what.c_str(), worst.relative());
  }
  std::fflush(stdout);
}

// ---------------------------------------------------------------- random models

struct Parts {
  Gpt2Backbone<float> backbone;
  SideNet<float> side_net;
};

// A random backbone (4 layers, d 32, 4 heads of 8, V 64, 48 positions) and a SideNet initialised
// from it (memory at backbone layer 2, SideNet layer 1), with non-zero gates so both branches count.
Parts random_parts(std::uint64_t seed, const std::string& arch) {
  auto cfg = arch == "gpt2" ? BackboneConfig::gpt2(4, 32, 4, 64, 48) : BackboneConfig::gpt2_star(4, 32, 4, 64, 48);
  auto bb = Gpt2Backbone<float>::random(cfg, seed, 0.2);
  auto sn = SideNet<float>::from_backbone(bb, 2);
  auto& gate = sn.layer(sn.config().memory_augmented_layer()).gate;
  for (index_t h = 0; h < gate.numel(); ++h) gate(h) = static_cast<float>(h) - 1.5f;
  return {std::move(bb), std::move(sn)};
}

// 12 chunks of 2 tokens per bank, 3 chunks retrieved per query.
MemoryConfig small_memory() {
  MemoryConfig m;
  m.memory_tokens = 24;
  m.chunk_size = 2;
  m.retrieved_tokens = 6;
  return m;
}

constexpr int n_streams = 3;
constexpr int n_segments = 7;

// Stream b's segment s: lengths differ between streams and change between segments (odd ones leave
// a pending token), up to 20 (< 48 positions). Over 7 segments every stream brings at least 37
// tokens (stream 1: 7, 5, 3, ...): more than the 24-token bank, so every bank wraps.
int segment_length(int b, int s) {
  static constexpr int base[n_streams] = {13, 7, 20};
  return std::max(1, base[b] - (s % 3) * (b + 1));
}

struct StreamData {
  std::vector<std::vector<std::int32_t>> tokens;   // [stream * n_segments + segment]
  std::vector<std::vector<std::int32_t>> targets;  // the next token, -1 at a segment's end sometimes
};

StreamData random_streams(std::uint64_t seed, int vocab) {
  StreamData d;
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> u(0, vocab - 1);
  for (int b = 0; b < n_streams; ++b) {
    for (int s = 0; s < n_segments; ++s) {
      const int n = segment_length(b, s);
      std::vector<std::int32_t> t(static_cast<std::size_t>(n)), y(static_cast<std::size_t>(n));
      for (auto& x : t) x = u(rng);
      for (int i = 0; i < n; ++i) y[static_cast<std::size_t>(i)] = (i + s) % 5 == 4 ? -1 : u(rng);
      d.tokens.push_back(std::move(t));
      d.targets.push_back(std::move(y));
    }
  }
  return d;
}

std::vector<std::span<const std::int32_t>> spans(const std::vector<std::vector<std::int32_t>>& v, int s,
                                                 const std::vector<int>& streams) {
  std::vector<std::span<const std::int32_t>> out;
  for (int b : streams) out.emplace_back(v[static_cast<std::size_t>(b * n_segments + s)]);
  return out;
}

// How many (t, h, rank) slots two retrievals disagree on (-1 when the shapes differ).
std::int64_t slot_differences(const Retrieved<float, Host>& host, const Retrieved<float, Device>& dev) {
  if (!(host.slots.shape() == dev.slots.shape())) return -1;
  const Tensor<std::int32_t, Host> d = to_host(dev.slots);
  std::int64_t n = 0;
  for (index_t i = 0; i < d.numel(); ++i) n += d.data()[i] != host.slots.data()[i];
  return n;
}

// ---------------------------------------------------------------- 2. device against host

template <class F>
void device_vs_host(const std::string& arch, bool memory_on, bool stacked = true) {
  const std::string what = "random " + arch + " (" + fusion_name<F>() + ", memory " + (memory_on ? "on" : "off") +
                           (stacked ? "" : ", retrieval stream by stream") + ")";
  const std::uint64_t seed = base_seed();
  Parts p = random_parts(seed, arch);
  MemoryConfig mem = small_memory();
  mem.enabled = memory_on;
  DevModel<F> dev(p.backbone.to_device(), p.side_net.to_device(), mem, n_streams);
  dev.set_stacked_retrieval(stacked);
  HostModel<F> host(std::move(p.backbone), std::move(p.side_net), mem, n_streams);
  const StreamData data = random_streams(seed + 1, 64);
  const std::vector<int> all{0, 1, 2};
  Err worst;
  double worst_loss = 0;
  int stacked_calls = 0;  // segments whose memory layer read one stacked retrieval of all streams
  for (int s = 0; s < n_segments; ++s) {
    const auto segs = spans(data.tokens, s, all), tgts = spans(data.targets, s, all);
    const SegmentResult<float, Host> d = to_host(dev.forward(segs, tgts));
    const auto& h = host.forward(segs, tgts);
    if (!dev.stacked_offsets().empty()) {
      ++stacked_calls;
      std::vector<index_t> rows{0};
      for (const auto& seg : segs) rows.push_back(rows.back() + static_cast<index_t>(seg.size()));
      EXPECT(std::equal(rows.begin(), rows.end(), dev.stacked_offsets().begin(), dev.stacked_offsets().end()),
             "%s segment %d: the stacked retrieval's row offsets are not the segments'", what.c_str(), s);
    }
    // The host model's last retrieval is its last stream's; the device keeps every stream's.
    const std::int64_t slot_diff =
        memory_on && h.retrieved_chunks[n_streams - 1] > 0 ? slot_differences(host.last_retrieval(), dev.retrieval(n_streams - 1)) : 0;
    for (int b = 0; b < n_streams; ++b) {
      const auto ub = static_cast<std::size_t>(b);
      EXPECT(d.retrieved_chunks[ub] == h.retrieved_chunks[ub], "%s segment %d stream %d: %d chunks retrieved on the device, %d on the host",
             what.c_str(), s, b, d.retrieved_chunks[ub], h.retrieved_chunks[ub]);
      EXPECT(d.logits[ub].shape() == h.logits[ub].shape(), "%s segment %d stream %d: logits %s on the device, %s on the host",
             what.c_str(), s, b, d.logits[ub].shape().str().c_str(), h.logits[ub].shape().str().c_str());
      if (!(d.logits[ub].shape() == h.logits[ub].shape())) continue;
      const Err e = compare(d.logits[ub].data(), h.logits[ub].data(), h.logits[ub].numel());
      worst.merge(e);
      EXPECT(e.relative() <= tolerance,
             "%s segment %d stream %d (T %d, %d chunks retrieved): max |err| %.3g, max |ref| %.3g: %.3g of max |ref| > %.0e%s",
             what.c_str(), s, b, segment_length(b, s), h.retrieved_chunks[ub], e.max_abs_err, e.max_abs_ref, e.relative(), tolerance,
             b == n_streams - 1 && slot_diff != 0 ? " (the device chose other chunks than the host for this stream: a near-tie of "
                                                    "scores? try another LONGMEM_TEST_SEED)"
                                                  : "");
    }
    EXPECT(slot_diff == 0, "%s segment %d stream %d: device and host chose different chunks in %lld (t, h, rank) places",
           what.c_str(), s, n_streams - 1, static_cast<long long>(slot_diff));
    EXPECT(d.loss_tokens == h.loss_tokens, "%s segment %d: %lld targets counted on the device, %lld on the host", what.c_str(), s,
           static_cast<long long>(d.loss_tokens), static_cast<long long>(h.loss_tokens));
    const double loss_err = std::abs(d.loss_sum - h.loss_sum) / std::max(1.0, std::abs(h.loss_sum));
    worst_loss = std::max(worst_loss, loss_err);
    EXPECT(loss_err <= 1e-5, "%s segment %d: loss sum %.9g on the device, %.9g on the host", what.c_str(), s, d.loss_sum, h.loss_sum);
  }
  // Full banks give every stream the same k', so a memory-on run must take the stacked path in its
  // later segments (and the per-stream one while the banks fill unevenly); off, never.
  EXPECT(stacked && memory_on ? stacked_calls > 0 : stacked_calls == 0, "%s: %d of %d segments used the stacked retrieval",
         what.c_str(), stacked_calls, n_segments);
  if (stacked && memory_on) std::printf("  %s: %d of %d segments retrieved stacked\n", what.c_str(), stacked_calls, n_segments);
  for (int b = 0; b < n_streams; ++b) {
    const auto& db = dev.bank(b);
    const auto& hb = host.bank(b);
    EXPECT(db.chunks_appended() == hb.chunks_appended() && db.num_chunks() == hb.num_chunks() &&
               db.pending_tokens() == hb.pending_tokens(),
           "%s bank %d: device (appended %lld, held %lld, pending %lld) vs host (%lld, %lld, %lld)", what.c_str(), b,
           static_cast<long long>(db.chunks_appended()), static_cast<long long>(db.num_chunks()),
           static_cast<long long>(db.pending_tokens()), static_cast<long long>(hb.chunks_appended()),
           static_cast<long long>(hb.num_chunks()), static_cast<long long>(hb.pending_tokens()));
    if (memory_on) {
      EXPECT(db.chunks_appended() > db.num_chunks(), "%s bank %d did not wrap (%lld chunks appended, capacity %lld)", what.c_str(), b,
             static_cast<long long>(db.chunks_appended()), static_cast<long long>(db.geometry().capacity_chunks));
    } else {
      EXPECT(db.chunks_appended() == 0 && db.pending_tokens() == 0, "%s bank %d: memory off but something was remembered",
             what.c_str(), b);
    }
  }
  std::printf("device vs host %-34s %d streams x %d segments: logits max |err| %.3g, max |ref| %.3g (%.3g of max |ref|, bound %.0e); "
              "loss sums within %.3g relative\n",
              what.c_str(), n_streams, n_segments, worst.max_abs_err, worst.max_abs_ref, worst.relative(), tolerance, worst_loss);
  std::fflush(stdout);
}

// ---------------------------------------------------------------- 3. together or one at a time

template <class F>
void together_vs_alone() {
  const std::string what = std::string("random gpt2-star (") + fusion_name<F>() + ", memory on)";
  const std::uint64_t seed = base_seed() + 10;
  const Parts p = random_parts(seed, "gpt2-star");
  DevModel<F> together(p.backbone.to_device(), p.side_net.to_device(), small_memory(), n_streams);
  std::vector<DevModel<F>> alone;
  alone.reserve(n_streams);
  for (int b = 0; b < n_streams; ++b) alone.emplace_back(p.backbone.to_device(), p.side_net.to_device(), small_memory(), 1);
  const StreamData data = random_streams(seed + 1, 64);
  Err worst;
  for (int s = 0; s < n_segments; ++s) {
    const SegmentResult<float, Host> t = to_host(together.forward(spans(data.tokens, s, {0, 1, 2})));
    for (int b = 0; b < n_streams; ++b) {
      const auto ub = static_cast<std::size_t>(b);
      const SegmentResult<float, Host> a = to_host(alone[ub].forward(spans(data.tokens, s, {b})));
      EXPECT(t.retrieved_chunks[ub] == a.retrieved_chunks[0], "%s segment %d stream %d: %d chunks retrieved together, %d alone",
             what.c_str(), s, b, t.retrieved_chunks[ub], a.retrieved_chunks[0]);
      EXPECT(t.logits[ub].shape() == a.logits[0].shape(), "%s segment %d stream %d: shapes %s together, %s alone", what.c_str(), s, b,
             t.logits[ub].shape().str().c_str(), a.logits[0].shape().str().c_str());
      if (!(t.logits[ub].shape() == a.logits[0].shape())) continue;
      const Err e = compare(t.logits[ub].data(), a.logits[0].data(), a.logits[0].numel());
      worst.merge(e);
      EXPECT(e.relative() <= tolerance, "%s segment %d stream %d: together vs alone max |err| %.3g, max |ref| %.3g: %.3g of max |ref| > %.0e",
             what.c_str(), s, b, e.max_abs_err, e.max_abs_ref, e.relative(), tolerance);
    }
  }
  for (int b = 0; b < n_streams; ++b) {
    EXPECT(together.bank(b).tokens_appended() == alone[static_cast<std::size_t>(b)].bank(0).tokens_appended(),
           "%s bank %d: %lld tokens together, %lld alone", what.c_str(), b,
           static_cast<long long>(together.bank(b).tokens_appended()),
           static_cast<long long>(alone[static_cast<std::size_t>(b)].bank(0).tokens_appended()));
  }
  std::printf("together vs alone %-31s %d streams x %d segments: max |err| %.3g, max |ref| %.3g (%.3g of max |ref|, bound %.0e)\n",
              what.c_str(), n_streams, n_segments, worst.max_abs_err, worst.max_abs_ref, worst.relative(), tolerance);
  std::fflush(stdout);
}

// ---------------------------------------------------------------- 4. behaviour

void behaviour() {
  const std::uint64_t seed = base_seed() + 20;
  {
    // Memory off, then on again: resumes from the banks as they were; read-only memory retrieves
    // without appending (the host model's semantics).
    Parts p = random_parts(seed, "gpt2-star");
    DevModel<GatedFusion> dev(p.backbone.to_device(), p.side_net.to_device(), small_memory(), 1);
    HostModel<GatedFusion> host(std::move(p.backbone), std::move(p.side_net), small_memory(), 1);
    const StreamData data = random_streams(seed + 1, 64);
    Err worst;
    for (int s = 0; s < n_segments; ++s) {
      const bool on = s != 2 && s != 3, remember = s != 5;
      dev.set_memory_enabled(on);
      host.set_memory_enabled(on);
      dev.set_remember(remember);
      host.set_remember(remember);
      const auto seg = spans(data.tokens, s, {0});
      const SegmentResult<float, Host> d = to_host(dev.forward(seg));
      const auto& h = host.forward(seg);
      EXPECT(d.retrieved_chunks[0] == h.retrieved_chunks[0], "memory toggles segment %d (memory %s, remember %s): %d chunks on the device, %d on the host",
             s, on ? "on" : "off", remember ? "on" : "off", d.retrieved_chunks[0], h.retrieved_chunks[0]);
      const Err e = compare(d.logits[0].data(), h.logits[0].data(), h.logits[0].numel());
      worst.merge(e);
      EXPECT(e.relative() <= tolerance, "memory toggles segment %d: max |err| %.3g, max |ref| %.3g", s, e.max_abs_err, e.max_abs_ref);
      EXPECT(dev.bank(0).tokens_appended() == host.bank(0).tokens_appended(), "memory toggles segment %d: %lld tokens in the device bank, %lld in the host's",
             s, static_cast<long long>(dev.bank(0).tokens_appended()), static_cast<long long>(host.bank(0).tokens_appended()));
    }
    std::printf("memory off/on, read-only memory (device vs host): max |err| %.3g, max |ref| %.3g\n", worst.max_abs_err,
                worst.max_abs_ref);
  }
  {
    // Perplexity (loss only, one stream) on both.
    Parts p = random_parts(seed + 2, "gpt2");
    DevModel<GatedFusion> dev(p.backbone.to_device(), p.side_net.to_device(), small_memory(), 1);
    HostModel<GatedFusion> host(std::move(p.backbone), std::move(p.side_net), small_memory(), 1);
    std::mt19937_64 rng(seed + 3);
    std::uniform_int_distribution<int> u(0, 63);
    std::vector<std::int32_t> stream(120);
    for (auto& x : stream) x = u(rng);
    const auto pd = perplexity(dev, stream, 16), ph = perplexity(host, stream, 16);
    const double rel = std::abs(pd.nll_sum - ph.nll_sum) / std::abs(ph.nll_sum);
    EXPECT(pd.tokens == ph.tokens && rel <= 1e-5, "perplexity: device %.9g nats over %lld tokens, host %.9g over %lld", pd.nll_sum,
           static_cast<long long>(pd.tokens), ph.nll_sum, static_cast<long long>(ph.tokens));
    std::printf("perplexity over 119 predicted tokens: device %.6f, host %.6f (nll sums within %.3g relative)\n", pd.perplexity(),
                ph.perplexity(), rel);
  }
  {
    // Refused segments change no bank; result buffers are reused when shapes do not grow.
    Parts p = random_parts(seed + 4, "gpt2-star");
    DevModel<GatedFusion> dev(p.backbone.to_device(), p.side_net.to_device(), small_memory(), 2);
    std::vector<std::int32_t> ok(9, 1), shorter(5, 2), empty, bad{1, 64};
    const std::span<const std::int32_t> one[1] = {ok};
    std::string msg;
    EXPECT(throws_with<InputError>([&] { dev.forward(std::span<const std::span<const std::int32_t>>(one)); }, "2 streams", &msg),
           "one segment for two streams: '%s'", msg.c_str());
    const std::span<const std::int32_t> with_empty[2] = {ok, empty};
    EXPECT(throws_with<InputError>([&] { dev.forward(std::span<const std::span<const std::int32_t>>(with_empty)); }, "stream 1", &msg),
           "an empty segment: '%s'", msg.c_str());
    const std::span<const std::int32_t> with_bad[2] = {ok, bad};
    EXPECT(throws_with<InputError>([&] { dev.forward(std::span<const std::span<const std::int32_t>>(with_bad)); }, "vocabulary", &msg),
           "a token outside the vocabulary: '%s'", msg.c_str());
    EXPECT(dev.bank(0).tokens_appended() == 0 && dev.bank(1).tokens_appended() == 0, "refused calls appended %lld and %lld tokens",
           static_cast<long long>(dev.bank(0).tokens_appended()), static_cast<long long>(dev.bank(1).tokens_appended()));
    const std::span<const std::int32_t> first[2] = {ok, ok};
    const auto& r1 = dev.forward(std::span<const std::span<const std::int32_t>>(first));
    const float* p0 = r1.logits[0].data();
    const float* p1 = r1.logits[1].data();
    const std::span<const std::int32_t> second[2] = {shorter, ok};
    const auto& r2 = dev.forward(std::span<const std::span<const std::int32_t>>(second));
    EXPECT(r2.logits[0].data() == p0 && r2.logits[1].data() == p1, "result logits were reallocated for shapes that did not grow");
    EXPECT((r2.logits[0].shape() == Shape{5, 64}), "logits of a 5-token segment have shape %s", r2.logits[0].shape().str().c_str());
    EXPECT(r2.retrieved_chunks[0] == 3 && r2.retrieved_chunks[1] == 3, "second call retrieved %d and %d chunks, expected 3 each",
           r2.retrieved_chunks[0], r2.retrieved_chunks[1]);
    std::printf("refusals and buffer reuse: checked\n");
  }
  std::fflush(stdout);
}

// Without a device: the move to the GPU is refused with a BackendError that names it.
void refusals_without_device() {
  Parts p = random_parts(base_seed(), "gpt2-star");
  std::string msg;
  EXPECT(throws_with<BackendError>([&] { (void)p.backbone.to_device(); }, "Gpt2Backbone::to_device", &msg),
         "backbone to_device without a device: '%s'", msg.c_str());
  std::printf("without a device, backbone.to_device(): %s\n", msg.c_str());
  EXPECT(msg.find("needs a CUDA device") != std::string::npos, "the message does not say a CUDA device is needed: '%s'", msg.c_str());
  EXPECT(throws_with<BackendError>([&] { (void)p.side_net.to_device(); }, "SideNet::to_device", &msg),
         "SideNet to_device without a device: '%s'", msg.c_str());
  std::printf("without a device, side_net.to_device(): %s\n", msg.c_str());
}

}  // namespace

int main() {
  if (!cuda_device_available()) {
    run_part("refusals without a device", [] { refusals_without_device(); });
    if (failures) return finish("device model");
    std::printf("no CUDA device: checked the refusals only (%d checks); skipping the device model tests\n", checks);
    return 77;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  std::printf("seed %llu, fixtures in %s\n", static_cast<unsigned long long>(base_seed()), fixture_dir().c_str());
  // Each part runs on its own, so one that throws does not hide the others' results.
  const std::pair<const char*, std::function<void()>> parts[] = {
      {"fixture longmem_gpt2star gated", [] { check_fixture<GatedFusion>("longmem_gpt2star", "logits", true); }},
      {"fixture longmem_gpt2star joint", [] { check_fixture<JointFusion>("longmem_gpt2star", "logits_joint", true); }},
      {"fixture longmem_gpt2star off", [] { check_fixture<GatedFusion>("longmem_gpt2star", "logits_no_memory", false); }},
      {"fixture longmem_gpt2 gated", [] { check_fixture<GatedFusion>("longmem_gpt2", "logits", true); }},
      {"fixture longmem_gpt2 joint", [] { check_fixture<JointFusion>("longmem_gpt2", "logits_joint", true); }},
      {"fixture longmem_gpt2 off", [] { check_fixture<GatedFusion>("longmem_gpt2", "logits_no_memory", false); }},
      {"fixture longmem_gpt2star gated tf32",
       [] { check_fixture<GatedFusion>("longmem_gpt2star", "logits", true, DeviceMath::tf32); }},
      {"fixture longmem_gpt2star gated bf16",
       [] { check_fixture<GatedFusion>("longmem_gpt2star", "logits", true, DeviceMath::bf16); }},
      {"fixture longmem_gpt2star off bf16",
       [] { check_fixture<GatedFusion>("longmem_gpt2star", "logits_no_memory", false, DeviceMath::bf16); }},
      {"fixture longmem_gpt2 gated bf16", [] { check_fixture<GatedFusion>("longmem_gpt2", "logits", true, DeviceMath::bf16); }},
      {"fixture longmem_gpt2star gated bf16 model",
       [] { check_fixture<GatedFusion, bfloat16>("longmem_gpt2star", "logits", true); }},
      {"fixture longmem_gpt2star joint bf16 model",
       [] { check_fixture<JointFusion, bfloat16>("longmem_gpt2star", "logits_joint", true); }},
      {"fixture longmem_gpt2star off bf16 model",
       [] { check_fixture<GatedFusion, bfloat16>("longmem_gpt2star", "logits_no_memory", false); }},
      {"fixture longmem_gpt2 gated bf16 model", [] { check_fixture<GatedFusion, bfloat16>("longmem_gpt2", "logits", true); }},
      {"fixture longmem_gpt2 joint bf16 model",
       [] { check_fixture<JointFusion, bfloat16>("longmem_gpt2", "logits_joint", true); }},
      {"fixture longmem_gpt2star gated fp16 model",
       [] { check_fixture<GatedFusion, longmem::half>("longmem_gpt2star", "logits", true); }},
      {"fixture longmem_gpt2star joint fp16 model",
       [] { check_fixture<JointFusion, longmem::half>("longmem_gpt2star", "logits_joint", true); }},
      {"fixture longmem_gpt2star off fp16 model",
       [] { check_fixture<GatedFusion, longmem::half>("longmem_gpt2star", "logits_no_memory", false); }},
      {"fixture longmem_gpt2 gated fp16 model",
       [] { check_fixture<GatedFusion, longmem::half>("longmem_gpt2", "logits", true); }},
      {"device vs host gpt2-star gated", [] { device_vs_host<GatedFusion>("gpt2-star", true); }},
      {"device vs host gpt2-star joint", [] { device_vs_host<JointFusion>("gpt2-star", true); }},
      {"device vs host gpt2-star off", [] { device_vs_host<GatedFusion>("gpt2-star", false); }},
      {"device vs host gpt2-star gated per stream", [] { device_vs_host<GatedFusion>("gpt2-star", true, false); }},
      {"device vs host gpt2 joint per stream", [] { device_vs_host<JointFusion>("gpt2", true, false); }},
      {"device vs host gpt2 gated", [] { device_vs_host<GatedFusion>("gpt2", true); }},
      {"device vs host gpt2 joint", [] { device_vs_host<JointFusion>("gpt2", true); }},
      {"together vs alone gated", [] { together_vs_alone<GatedFusion>(); }},
      {"together vs alone joint", [] { together_vs_alone<JointFusion>(); }},
      {"behaviour", [] { behaviour(); }},
  };
  for (const auto& [name, fn] : parts) run_part(name, fn);
  return finish("device model");
}
