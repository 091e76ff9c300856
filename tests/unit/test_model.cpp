// The composed LongMem model: against the PyTorch port of the reference math
// (tests/fixtures/longmem_reference.py), SideNet files, properties of the stream, and
// the errors of bad configurations.
#include <catch2/catch.hpp>

#include <algorithm>
#include <deque>

#include "longmem/cpu/exact_chunk_retriever.hpp"
#include "longmem/cpu/host_memory_bank.hpp"
#include "longmem/cpu/ops.hpp"
#include "longmem/model.hpp"
#include "longmem/perplexity.hpp"
#include "model_test_support.hpp"

using namespace longmem;
using longmem::test::compare;
using longmem::test::TempDir;

namespace {

template <class Fusion = GatedFusion, class Bank = HostMemoryBank<float>, class Retriever = ExactChunkRetriever>
using HostModel = Model<Gpt2Backbone<float>, Bank, Retriever, Fusion>;

// Runs a fixture through a model with fusion F, optionally with the memory off, and
// compares every segment's logits with the tensor `expected_name`.
template <class F>
void check_longmem_fixture(const std::string& name, const std::string& expected_name, bool memory_on) {
  const auto dir = std::filesystem::path(LONGMEM_FIXTURE_DIR) / name;
  CAPTURE(dir.string(), expected_name, memory_on);
  REQUIRE(std::filesystem::exists(dir / "expected.safetensors"));
  auto expected = SafetensorsFile::open(dir / "expected.safetensors");
  MetadataReader md(expected.metadata(), expected.name());
  const int T = md.require_int("segment_length"), S = md.require_int("num_segments"), B = md.require_int("streams");
  MemoryConfig mem;
  mem.memory_tokens = md.require_int("memory_tokens");
  mem.chunk_size = md.require_int("chunk_size");
  mem.retrieved_tokens = md.require_int("retrieved_tokens");
  mem.enabled = memory_on;

  auto backbone = Gpt2Backbone<float>::load(dir / "backbone.safetensors");
  auto side_net = SideNet<float>::load(dir / "sidenet.safetensors");
  const int V = backbone.config().vocab_size;
  HostModel<F> model(std::move(backbone), std::move(side_net), mem, B);
  auto tokens = expected.read<std::int32_t>("tokens", {B, S * T});
  auto want = expected.read<float>(expected_name, {B, S * T, V});
  bool memory_was_used = false;
  for (int s = 0; s < S; ++s) {
    std::vector<std::span<const std::int32_t>> segs;
    for (int b = 0; b < B; ++b) segs.emplace_back(tokens[b].data() + s * T, static_cast<std::size_t>(T));
    const auto& out = model.forward(segs);
    for (int b = 0; b < B; ++b) {
      CAPTURE(s, b);
      memory_was_used |= out.retrieved_chunks[static_cast<std::size_t>(b)] > 0;
      auto e = compare(out.logits[static_cast<std::size_t>(b)].data(), want[b].data() + static_cast<std::int64_t>(s) * T * V,
                       static_cast<std::int64_t>(T) * V);
      CAPTURE(e.max_abs_err, e.max_abs_ref);
      CHECK(e.relative() <= 1e-4);
    }
  }
  CHECK(memory_was_used == memory_on);
  if (memory_on) {
    // The fixtures are sized so that the bank filled up and evicted.
    CHECK(model.bank(0).chunks_appended() > model.bank(0).num_chunks());
  }
}

}  // namespace

TEST_CASE("model: matches the PyTorch port of the reference (GPT-2*, ALiBi, 2 streams)", "[model][reference]") {
  check_longmem_fixture<GatedFusion>("longmem_gpt2star", "logits", true);
  check_longmem_fixture<JointFusion>("longmem_gpt2star", "logits_joint", true);
  check_longmem_fixture<GatedFusion>("longmem_gpt2star", "logits_no_memory", false);
}

TEST_CASE("model: matches the PyTorch port of the reference (GPT-2, learned positions, biased SideNet)",
          "[model][reference]") {
  check_longmem_fixture<GatedFusion>("longmem_gpt2", "logits", true);
  check_longmem_fixture<JointFusion>("longmem_gpt2", "logits_joint", true);
  check_longmem_fixture<GatedFusion>("longmem_gpt2", "logits_no_memory", false);
}

namespace {

struct Parts {
  Gpt2Backbone<float> backbone;
  SideNet<float> side_net;
};

// A random GPT-2* backbone and a SideNet initialised from it, with non-zero gates.
Parts random_parts(std::uint64_t seed, int memory_layer = 2, const std::string& arch = "gpt2-star") {
  auto cfg = arch == "gpt2" ? BackboneConfig::gpt2(4, 32, 4, 64, 48) : BackboneConfig::gpt2_star(4, 32, 4, 64, 48);
  auto bb = Gpt2Backbone<float>::random(cfg, seed, 0.2);
  auto sn = SideNet<float>::from_backbone(bb, memory_layer);
  auto& gate = sn.layer(sn.config().memory_augmented_layer()).gate;
  for (index_t h = 0; h < gate.numel(); ++h) gate(h) = static_cast<float>(h) - 1.5f;
  return {std::move(bb), std::move(sn)};
}

MemoryConfig small_memory() {
  MemoryConfig m;
  m.memory_tokens = 24;
  m.chunk_size = 2;
  m.retrieved_tokens = 6;
  return m;
}

// A retriever policy that checks, at retrieval time, that every chunk it returns
// ended before the segment being processed: nothing from the current or a later
// segment can be retrieved.
struct CheckingRetriever {
  using location = Host;
  ExactChunkRetriever inner;
  std::int64_t segment_start = 0;
  std::int64_t checked = 0;
  bool violated = false;

  template <MemoryBank M, ComputeType T>
  void retrieve(const M& bank, TensorView<const T, Host> q, int k, Retrieved<T, Host>& out) {
    inner.retrieve(bank, q, k, out);
    const int csz = bank.geometry().chunk_size;
    for (std::int32_t slot : out.slots) {
      violated |= bank.chunk_position(slot) + csz > segment_start;
      ++checked;
    }
  }
};

// A second storage policy: keeps chunks oldest-first and shifts on eviction (O(C), as
// the reference implementation rebuilds its index), instead of a ring. It plugs into
// the model unchanged and must give the same results.
template <class S>
class ShiftingMemoryBank {
 public:
  using value_type = S;
  using location = Host;

  explicit ShiftingMemoryBank(MemoryGeometry g)
      : g_(g),
        chunk_keys_({g.n_head, g.capacity_chunks, g.head_dim}),
        keys_({g.n_head, g.capacity_chunks, g.chunk_size, g.head_dim}),
        values_({g.n_head, g.capacity_chunks, g.chunk_size, g.head_dim}) {}

  MemoryGeometry geometry() const { return g_; }
  index_t num_chunks() const { return static_cast<index_t>(seq_.size()); }
  index_t size_tokens() const { return num_chunks() * g_.chunk_size; }
  index_t pending_tokens() const { return static_cast<index_t>(pending_k_.size()) / (g_.n_head * g_.head_dim); }
  index_t capacity_tokens() const { return g_.capacity_tokens(); }
  std::size_t bytes_used() const { return static_cast<std::size_t>(size_tokens()) * 2 * g_.n_head * g_.head_dim * sizeof(S); }
  index_t chunks_appended() const { return appended_; }
  index_t chunk_sequence(index_t slot) const { return seq_.at(static_cast<std::size_t>(slot)); }
  index_t chunk_position(index_t slot) const { return seq_.at(static_cast<std::size_t>(slot)) * g_.chunk_size; }
  TensorView<const float, Host> chunk_keys() const { return chunk_keys_.view(); }
  TensorView<const S, Host> keys() const { return keys_.view(); }
  TensorView<const S, Host> values() const { return values_.view(); }
  void reset() {
    seq_.clear();
    pending_k_.clear();
    pending_v_.clear();
    appended_ = 0;
  }

  template <ComputeType T>
  void append(TensorView<const T, Host> k, TensorView<const T, Host> v) {
    const index_t HD = g_.n_head * g_.head_dim;
    for (index_t t = 0; t < k.dim(0); ++t) {
      for (index_t i = 0; i < HD; ++i) {
        pending_k_.push_back(static_cast<double>(k.data()[t * HD + i]));
        pending_v_.push_back(static_cast<double>(v.data()[t * HD + i]));
      }
      if (pending_tokens() == g_.chunk_size) commit();
    }
  }

 private:
  void commit() {
    const index_t H = g_.n_head, dh = g_.head_dim, csz = g_.chunk_size, C = g_.capacity_chunks;
    if (num_chunks() == C) {  // shift everything one slot towards the front
      for (index_t h = 0; h < H; ++h)
        for (index_t c = 1; c < C; ++c) {
          for (index_t e = 0; e < dh; ++e) chunk_keys_(h, c - 1, e) = chunk_keys_(h, c, e);
          for (index_t j = 0; j < csz; ++j)
            for (index_t e = 0; e < dh; ++e) {
              keys_(h, c - 1, j, e) = keys_(h, c, j, e);
              values_(h, c - 1, j, e) = values_(h, c, j, e);
            }
        }
      seq_.pop_front();
    }
    const index_t slot = num_chunks();
    for (index_t h = 0; h < H; ++h)
      for (index_t e = 0; e < dh; ++e) {
        double mean = 0;
        for (index_t j = 0; j < csz; ++j) {
          const auto idx = static_cast<std::size_t>((j * H + h) * dh + e);
          mean += pending_k_[idx];
          keys_(h, slot, j, e) = from_float<S>(static_cast<float>(pending_k_[idx]));
          values_(h, slot, j, e) = from_float<S>(static_cast<float>(pending_v_[idx]));
        }
        chunk_keys_(h, slot, e) = static_cast<float>(mean / static_cast<double>(csz));
      }
    seq_.push_back(appended_++);
    pending_k_.clear();
    pending_v_.clear();
  }

  MemoryGeometry g_;
  Tensor<float, Host> chunk_keys_;  // (H, C, dh)
  Tensor<S, Host> keys_, values_;   // (H, C, csz, dh)
  std::deque<index_t> seq_;         // completion number per slot, oldest first
  std::vector<double> pending_k_, pending_v_;
  index_t appended_ = 0;
};
static_assert(MemoryBank<ShiftingMemoryBank<float>>);

std::vector<std::vector<std::int32_t>> random_segments(int n, int len, int vocab, std::uint64_t seed) {
  std::vector<std::vector<std::int32_t>> s;
  for (int i = 0; i < n; ++i) s.push_back(test::random_tokens(static_cast<std::size_t>(len), vocab, seed + static_cast<std::uint64_t>(i)));
  return s;
}

}  // namespace

TEST_CASE("model: nothing from the current or a later segment is ever retrieved", "[model][property]") {
  auto p = random_parts(21);
  const int T = GENERATE(5, 16);
  CAPTURE(T);
  HostModel<GatedFusion, HostMemoryBank<float>, CheckingRetriever> model(std::move(p.backbone), std::move(p.side_net),
                                                                         small_memory());
  auto segs = random_segments(6, T, 64, 22);
  for (int s = 0; s < 6; ++s) {
    model.retriever().segment_start = static_cast<std::int64_t>(s) * T;
    model.forward(segs[static_cast<std::size_t>(s)]);
  }
  CHECK(model.retriever().checked > 0);
  CHECK_FALSE(model.retriever().violated);
}

TEST_CASE("model: a second storage policy slots in and gives the same results", "[model][property]") {
  auto a = random_parts(31), b = random_parts(31);
  HostModel<> ring(std::move(a.backbone), std::move(a.side_net), small_memory());
  HostModel<GatedFusion, ShiftingMemoryBank<float>> shifting(std::move(b.backbone), std::move(b.side_net), small_memory());
  auto segs = random_segments(7, 9, 64, 32);
  for (const auto& s : segs) {
    const auto& x = ring.forward(s);
    const auto& y = shifting.forward(s);
    auto e = compare(x.logits[0].data(), y.logits[0].data(), x.logits[0].numel());
    CHECK(e.max_abs_err <= 1e-6 * e.max_abs_ref);
  }
  CHECK(ring.bank(0).chunks_appended() > ring.bank(0).num_chunks());  // it evicted
}

TEST_CASE("model: per-stream banks never mix", "[model][property]") {
  auto a = random_parts(41), b = random_parts(41);
  HostModel<> two(std::move(a.backbone), std::move(a.side_net), small_memory(), 2);
  HostModel<> one(std::move(b.backbone), std::move(b.side_net), small_memory(), 1);
  auto s0 = random_segments(5, 11, 64, 42), s1 = random_segments(5, 7, 64, 142);
  for (int s = 0; s < 5; ++s) {
    const std::span<const std::int32_t> both[2] = {s0[static_cast<std::size_t>(s)], s1[static_cast<std::size_t>(s)]};
    const auto& x = two.forward(std::span<const std::span<const std::int32_t>>(both));
    const auto& y = one.forward(s1[static_cast<std::size_t>(s)]);
    REQUIRE(x.logits[1].shape() == y.logits[0].shape());
    CHECK(compare(x.logits[1].data(), y.logits[0].data(), y.logits[0].numel()).max_abs_err == 0.0);
  }
  CHECK(two.bank(0).tokens_appended() == 55);
  CHECK(two.bank(1).tokens_appended() == 35);
}

TEST_CASE("model: memory changes the output only once something is remembered", "[model][property]") {
  auto a = random_parts(51), b = random_parts(51);
  HostModel<> with(std::move(a.backbone), std::move(a.side_net), small_memory());
  HostModel<> without(std::move(b.backbone), std::move(b.side_net), small_memory());
  without.set_memory_enabled(false);
  auto segs = random_segments(3, 10, 64, 52);
  for (int s = 0; s < 3; ++s) {
    const auto& x = with.forward(segs[static_cast<std::size_t>(s)]);
    const auto& y = without.forward(segs[static_cast<std::size_t>(s)]);
    const double err = compare(x.logits[0].data(), y.logits[0].data(), y.logits[0].numel()).max_abs_err;
    CAPTURE(s, err);
    if (s == 0) {
      CHECK(err == 0.0);
      CHECK(x.retrieved_chunks[0] == 0);
    } else {
      CHECK(err > 1e-4);
      CHECK(x.retrieved_chunks[0] == 3);
    }
  }
  CHECK(without.bank(0).tokens_appended() == 0);
  // Read-only memory retrieves but remembers nothing new.
  with.set_remember(false);
  const auto& ro = with.forward(segs[0]);
  CHECK(ro.retrieved_chunks[0] == 3);
  CHECK(with.bank(0).tokens_appended() == 30);
  with.set_remember(true);
  CHECK(with.bank(0).tokens_appended() == 30);
  with.reset();
  CHECK(with.bank(0).num_chunks() == 0);
}

TEST_CASE("model: eviction keeps the newest chunks", "[model][property]") {
  auto p = random_parts(61);
  HostModel<> model(std::move(p.backbone), std::move(p.side_net), small_memory());
  auto segs = random_segments(5, 13, 64, 62);
  for (const auto& s : segs) model.forward(s);
  const auto& bank = model.bank(0);
  // 65 tokens: 32 complete chunks of 2, 1 pending; capacity 12 chunks: chunks 20..31 remain.
  REQUIRE(bank.num_chunks() == 12);
  CHECK(bank.pending_tokens() == 1);
  std::vector<index_t> seqs;
  for (index_t slot = 0; slot < 12; ++slot) seqs.push_back(bank.chunk_sequence(slot));
  std::sort(seqs.begin(), seqs.end());
  for (index_t i = 0; i < 12; ++i) CHECK(seqs[static_cast<std::size_t>(i)] == 20 + i);
}

TEST_CASE("model: loss and perplexity agree with the logits", "[model]") {
  auto p = random_parts(71);
  HostModel<> model(std::move(p.backbone), std::move(p.side_net), small_memory());
  auto stream = test::random_tokens(50, 64, 72);
  auto r = perplexity(model, stream, 16);
  CHECK(r.tokens == 49);
  CHECK(r.segment_mean_nll.size() == 4);
  // Recompute the first segment's loss by hand from its logits.
  model.reset();
  const auto& out = model.forward(std::span<const std::int32_t>(stream).subspan(0, 16),
                                  std::span<const std::int32_t>(stream).subspan(1, 16));
  double nll = 0;
  for (int t = 0; t < 16; ++t) {
    double mx = -1e300;
    for (int v = 0; v < 64; ++v) mx = std::max(mx, static_cast<double>(out.logits[0](t, v)));
    double z = 0;
    for (int v = 0; v < 64; ++v) z += std::exp(static_cast<double>(out.logits[0](t, v)) - mx);
    nll += std::log(z) + mx - static_cast<double>(out.logits[0](t, stream[static_cast<std::size_t>(t + 1)]));
  }
  CHECK(out.loss_tokens == 16);
  CHECK(out.loss_sum == Approx(nll).epsilon(1e-9));
  CHECK(r.segment_mean_nll[0] == Approx(nll / 16).epsilon(1e-9));
  CHECK(std::isfinite(r.perplexity()));
}

TEST_CASE("side net: save and load round-trip, and the initialisation copies the backbone", "[sidenet]") {
  TempDir dir;
  auto p = random_parts(81, 3);
  const auto& sn = p.side_net;
  CHECK(sn.config().n_layer == 2);
  CHECK(sn.config().memory_augmented_layer() == 1);
  CHECK(sn.config().backbone_fingerprint == p.backbone.fingerprint());
  // Layer i copies backbone block 2i+1.
  for (int i = 0; i < 2; ++i) {
    const auto& blk = p.backbone.block(2 * i + 1);
    CHECK(compare(sn.layer(i).q_weight.data(), blk.q_weight.data(), blk.q_weight.numel()).max_abs_err == 0.0);
    CHECK(compare(sn.layer(i).fc2_weight.data(), blk.fc_out_weight.data(), blk.fc_out_weight.numel()).max_abs_err == 0.0);
    CHECK(compare(sn.layer(i).ln_weight.data(), blk.ln_1_weight.data(), blk.ln_1_weight.numel()).max_abs_err == 0.0);
  }
  auto fresh = SideNet<float>::from_backbone(p.backbone, 3);
  for (float g : fresh.layer(1).gate) CHECK(g == 0.0f);
  CHECK(fresh.layer(0).gate.empty());

  MemoryConfig rec = small_memory();
  sn.save(dir / "side.safetensors", rec);
  auto loaded = SideNet<float>::load(dir / "side.safetensors");
  CHECK(loaded.config() == sn.config());
  REQUIRE(loaded.recommended_memory().has_value());
  CHECK(*loaded.recommended_memory() == rec);
  for (int i = 0; i < 2; ++i) {
    CHECK(compare(loaded.layer(i).k_weight.data(), sn.layer(i).k_weight.data(), sn.layer(i).k_weight.numel()).max_abs_err == 0.0);
  }
  CHECK(compare(loaded.layer(1).gate.data(), sn.layer(1).gate.data(), 4).max_abs_err == 0.0);
}

TEST_CASE("model: bad configurations are refused with a clear error", "[model][errors]") {
  SECTION("csz does not divide K") {
    auto p = random_parts(91);
    MemoryConfig m = small_memory();
    m.retrieved_tokens = 5;
    REQUIRE_THROWS_WITH(HostModel<>(std::move(p.backbone), std::move(p.side_net), m), Catch::Contains("divide"));
  }
  SECTION("msz not a multiple of csz") {
    auto p = random_parts(92);
    MemoryConfig m = small_memory();
    m.memory_tokens = 25;
    REQUIRE_THROWS_WITH(HostModel<>(std::move(p.backbone), std::move(p.side_net), m), Catch::Contains("multiple"));
  }
  SECTION("m outside the backbone") {
    auto cfg = BackboneConfig::gpt2_star(4, 32, 4, 64, 48);
    auto bb = Gpt2Backbone<float>::random(cfg, 93, 0.2);
    REQUIRE_THROWS_WITH(SideNet<float>::from_backbone(bb, 4), Catch::Contains("memory_layer"));
    REQUIRE_THROWS_AS(SideNet<float>::from_backbone(bb, -1), ConfigError);
  }
  SECTION("a SideNet made for another backbone") {
    auto p = random_parts(94), q = random_parts(95);
    REQUIRE_THROWS_WITH(HostModel<>(std::move(q.backbone), SideNet<float>::from_backbone(p.backbone, 2), small_memory()),
                        Catch::Contains("fingerprint"));
    REQUIRE_NOTHROW(HostModel<>(std::move(p.backbone), std::move(q.side_net), small_memory(), 1, {}, true));
  }
  SECTION("widths or head counts differ") {
    auto p = random_parts(96);
    auto other = Gpt2Backbone<float>::random(BackboneConfig::gpt2_star(4, 32, 8, 64, 48), 97, 0.2);
    auto wide = Gpt2Backbone<float>::random(BackboneConfig::gpt2_star(4, 48, 4, 64, 48), 98, 0.2);
    REQUIRE_THROWS_WITH(HostModel<>(std::move(other), SideNet<float>::from_backbone(p.backbone, 2), small_memory(), 1, {}, true),
                        Catch::Contains("n_head"));
    REQUIRE_THROWS_WITH(HostModel<>(std::move(wide), SideNet<float>::from_backbone(p.backbone, 2), small_memory(), 1, {}, true),
                        Catch::Contains("n_embd"));
  }
  SECTION("a backbone file given as the SideNet") {
    TempDir dir;
    auto p = random_parts(99);
    p.backbone.save(dir / "bb.safetensors");
    REQUIRE_THROWS_WITH(SideNet<float>::load(dir / "bb.safetensors"), Catch::Contains("longmem-sidenet"));
  }
  SECTION("bad segments") {
    auto p = random_parts(100);
    HostModel<> model(std::move(p.backbone), std::move(p.side_net), small_memory(), 2);
    std::vector<std::int32_t> ok(4, 1), empty;
    const std::span<const std::int32_t> one[1] = {ok};
    REQUIRE_THROWS_WITH(model.forward(std::span<const std::span<const std::int32_t>>(one)), Catch::Contains("2 streams"));
    const std::span<const std::int32_t> with_empty[2] = {ok, empty};
    REQUIRE_THROWS_WITH(model.forward(std::span<const std::span<const std::int32_t>>(with_empty)),
                        Catch::Contains("stream 1") && Catch::Contains("empty"));
    std::vector<std::int32_t> bad_ids{1, 64};
    const std::span<const std::int32_t> with_bad[2] = {ok, bad_ids};
    REQUIRE_THROWS_AS(model.forward(std::span<const std::span<const std::int32_t>>(with_bad)), InputError);
    // Nothing was remembered by the refused calls.
    CHECK(model.bank(0).tokens_appended() == 0);
  }
}

TEST_CASE("model: half-precision memory storage stays close to float storage", "[model][property]") {
  auto a = random_parts(111), b = random_parts(111);
  HostModel<> f32(std::move(a.backbone), std::move(a.side_net), small_memory());
  HostModel<GatedFusion, HostMemoryBank<half>> f16(std::move(b.backbone), std::move(b.side_net), small_memory());
  auto segs = random_segments(4, 12, 64, 112);
  double worst = 0;
  for (const auto& s : segs) {
    const auto& x = f32.forward(s);
    const auto& y = f16.forward(s);
    worst = std::max(worst, compare(y.logits[0].data(), x.logits[0].data(), x.logits[0].numel()).relative());
  }
  // Chunk keys are kept in float, so the same chunks are retrieved; only the gathered
  // keys/values carry half rounding (2^-11 relative).
  CAPTURE(worst);
  CHECK(worst > 0.0);
  CHECK(worst < 1e-3);
  CHECK(f16.bank(0).bytes_used() < f32.bank(0).bytes_used());
}

namespace {

// Stream b's segment s in the batched-mode test: lengths differ between streams and change between
// segments (odd ones leave a pending token); every bank wraps over 7 segments.
int batched_length(int b, int s) {
  static constexpr int base[3] = {13, 7, 20};
  return std::max(1, base[b] - (s % 3) * (b + 1));
}

// The batched composition (the device model's default) on the host, against the per-stream loop:
// same logits, retrievals, losses and banks, through memory off, read-only memory and eviction.
template <class F>
void check_batched_matches_per_stream(const std::string& arch) {
  auto a = random_parts(131, 2, arch), b = random_parts(131, 2, arch);
  HostModel<F> per(std::move(a.backbone), std::move(a.side_net), small_memory(), 3);
  HostModel<F> batched(std::move(b.backbone), std::move(b.side_net), small_memory(), 3);
  REQUIRE_FALSE(per.batched_streams());
  batched.set_batched_streams(true);
  for (int s = 0; s < 7; ++s) {
    CAPTURE(arch, F::name, s);
    const bool memory_on = s != 3, remember = s != 5;
    for (auto* m : {&per, &batched}) {
      m->set_memory_enabled(memory_on);
      m->set_remember(remember);
    }
    std::vector<std::vector<std::int32_t>> toks, tgts;
    for (int st = 0; st < 3; ++st) {
      const auto n = static_cast<std::size_t>(batched_length(st, s));
      toks.push_back(test::random_tokens(n, 64, 1000 + static_cast<std::uint64_t>(10 * s + st)));
      auto y = test::random_tokens(n, 64, 2000 + static_cast<std::uint64_t>(10 * s + st));
      for (std::size_t i = 0; i < n; i += 4) y[i] = -1;
      tgts.push_back(std::move(y));
    }
    const std::vector<std::span<const std::int32_t>> segs(toks.begin(), toks.end()), targets(tgts.begin(), tgts.end());
    const auto& x = per.forward(segs, targets);
    const auto& y = batched.forward(segs, targets);
    for (std::size_t st = 0; st < 3; ++st) {
      CAPTURE(st);
      CHECK(x.retrieved_chunks[st] == y.retrieved_chunks[st]);
      REQUIRE(x.logits[st].shape() == y.logits[st].shape());
      auto e = compare(y.logits[st].data(), x.logits[st].data(), x.logits[st].numel());
      CAPTURE(e.max_abs_err, e.max_abs_ref);
      CHECK(e.max_abs_err <= 1e-5 * e.max_abs_ref);
    }
    CHECK(x.loss_tokens == y.loss_tokens);
    CHECK(y.loss_sum == Approx(x.loss_sum).epsilon(1e-6));
    if (memory_on && x.retrieved_chunks[2] > 0) {
      // The per-stream model keeps its last stream's retrieval; the batched one every stream's.
      const auto& rx = per.last_retrieval();
      const auto& ry = batched.retrieval(2);
      REQUIRE(rx.slots.shape() == ry.slots.shape());
      CHECK(std::equal(rx.slots.begin(), rx.slots.end(), ry.slots.begin()));
      CHECK(&batched.last_retrieval() == &ry);
    }
  }
  for (int st = 0; st < 3; ++st) {
    CAPTURE(st);
    CHECK(per.bank(st).chunks_appended() == batched.bank(st).chunks_appended());
    CHECK(per.bank(st).pending_tokens() == batched.bank(st).pending_tokens());
    CHECK(batched.bank(st).chunks_appended() > batched.bank(st).num_chunks());  // it evicted
  }
}

}  // namespace

TEST_CASE("model: all streams in one batched pass give the per-stream results", "[model][property]") {
  check_batched_matches_per_stream<GatedFusion>("gpt2-star");
  check_batched_matches_per_stream<JointFusion>("gpt2-star");
  check_batched_matches_per_stream<GatedFusion>("gpt2");
}

TEST_CASE("model: to<Host>() copies a backbone and SideNet that give the same results", "[model]") {
  auto p = random_parts(141);
  auto bb = p.backbone.to<Host>();
  auto sn = p.side_net.to<Host>();
  CHECK(bb.fingerprint() == p.backbone.fingerprint());
  HostModel<> a(std::move(p.backbone), std::move(p.side_net), small_memory());
  HostModel<> b(std::move(bb), std::move(sn), small_memory());
  for (const auto& s : random_segments(4, 9, 64, 142)) {
    const auto& x = a.forward(s);
    const auto& y = b.forward(s);
    CHECK(compare(x.logits[0].data(), y.logits[0].data(), x.logits[0].numel()).max_abs_err == 0.0);
    const SegmentResult<float> h = to_host(y);
    CHECK(compare(h.logits[0].data(), y.logits[0].data(), y.logits[0].numel()).max_abs_err == 0.0);
    CHECK(h.retrieved_chunks == y.retrieved_chunks);
  }
}
