#pragma once
// Recall practice for memory-augmented adaptation: byte-level documents that state facts early
// and ask for them far later, with real text in between, so that a SideNet learns to use its
// memory for what its window cannot see (the paper's adaptation data is plain long text; small
// models and short runs need this nudge).
//
// Fixed wording (the default):
//   Remember: the number for amber falcon is 48213.\n  ... (`facts` lines, or a count in [min_facts, facts])
//   <filler: a slice of a training document, between min_gap and max_gap bytes>
//   \nRecall: the number for amber falcon is 48213.  ... (every fact, shuffled)
// Varied wording (`varied_wording`): each fact draws one of several phrasings ("the silver anchor
// code is", "Fact: copper heron = ", ...), a lead-in for its statement and another for its
// recall, and a 4- to 6-digit number, so that what is learnt is "continue a context from
// memory", not one sentence.
//
// The recall repeats the words just before the number, so the digits follow the same context as
// where they were stated: what a model learns is an induction step over memory. With
// `score_answers_only` only the recalled digits are targets (Document::scored): the statements
// and the filler carry no loss, so every gradient of a recall-only run is about memory;
// `text_targets` keeps a random fraction of the other tokens as targets, so that the model keeps
// modelling text while the recalls weigh 1 / text_targets times more than before.
// `first_digit_only` scores only the first digit of each recalled number (plus the text targets):
// the hardest step, where nothing of the number is in view yet and memory alone must supply it.
//
// Names are two words from fixed lists, numbers are random digit strings. Everything comes from
// the caller's training text and RNG: nothing of an evaluation (its template, filler or keys).
#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "longmem/error.hpp"
#include "longmem/tokenizer.hpp"
#include "longmem/train/data.hpp"

namespace longmem {

struct RecallPractice {
  int facts = 3;                 ///< facts per document, at most
  int min_facts = 0;             ///< and at least (0: exactly `facts`); the count is uniform in between
  std::int64_t min_gap = 1024;   ///< filler bytes between the facts and the questions, at least
  std::int64_t max_gap = 16384;  ///< and at most
  bool varied_wording = false;   ///< many phrasings, lead-ins and number lengths (else the fixed wording)
  bool score_answers_only = false;  ///< only the recalled digits are targets, and:
  bool first_digit_only = false;    ///< with score_answers_only: only the first digit of each recalled number
  double text_targets = 0;          ///< with score_answers_only: this fraction of the other tokens too (random)
};

namespace detail {
// Phrasings of a fact: the words before the number, shared by statement and recall ("%" = the name).
inline constexpr const char* kRecallCores[] = {
    "the number for % is ", "the % is ", "the % code is ", "% = ", "%: ", "the % has the number ",
    "the combination of the % lock is ", "% was given the number ", "the % is number ", "the % reads "};
inline constexpr const char* kStatementLeads[] = {"Remember: ", "Note: ", "", "Keep in mind that ", "For the record, ",
                                                  "Fact: ", "Write this down: ", "Listen: "};
inline constexpr const char* kRecallLeads[] = {"Recall: ", "Earlier it was said that ", "As noted before, ", "",
                                               "Again: ", "Answer: ", "From memory: ", "So "};
inline constexpr const char* kNameFirst[] = {
    "amber", "silver", "quiet", "northern", "crimson", "hollow", "golden", "bitter", "ancient", "gentle", "frozen",
    "hidden", "wild", "narrow", "distant", "iron", "copper", "pale", "velvet", "broken", "rusty", "scarlet",
    "lonely", "misty", "brave", "swift", "marble", "wooden", "eastern", "little", "heavy", "sleepy"};
inline constexpr const char* kNameSecond[] = {
    "falcon", "river", "lantern", "meadow", "harbor", "compass", "orchard", "tower", "violin", "garden", "anchor",
    "mirror", "valley", "candle", "bridge", "forest", "heron", "kettle", "chapel", "saddle", "ladder", "island",
    "cellar", "engine", "fox", "thistle", "beacon", "barrel", "quarry", "glacier", "pigeon", "window"};

inline std::string recall_sentence(const char* lead, const char* core, const std::string& name) {
  std::string s = lead;
  for (const char* c = core; *c; ++c) {
    if (*c == '%') s += name;
    else s.push_back(*c);
  }
  if (*lead == 0 && !s.empty() && s[0] >= 'a' && s[0] <= 'z') s[0] = static_cast<char>(s[0] - 'a' + 'A');
  return s;
}

// Appends `prefix` then `answer` to d; answer_mask[i] = 1 for each digit of `answer` (only its
// first digit with `first_only`).
inline void append_recall(Document& d, std::vector<std::uint8_t>& answer_mask, const std::string& prefix,
                          const std::string& answer, bool first_only = false) {
  bool first = true;
  for (const std::string* part : {&prefix, &answer}) {
    for (const std::int32_t t : ByteTokenizer::encode(*part)) {
      d.tokens.push_back(t);
      const bool digit = part == &answer && t >= '0' && t <= '9';
      answer_mask.push_back(digit && (first || !first_only));
      if (digit) first = false;
    }
  }
}

// The answer mask plus a random `fraction` of the other tokens (an RNG of its own, so the
// documents' words do not depend on it).
inline std::vector<std::uint8_t> with_text_targets(std::vector<std::uint8_t> mask, double fraction, std::uint64_t seed, int doc) {
  if (fraction <= 0) return mask;
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + 0x7F4A7C15ull + static_cast<std::uint64_t>(doc));
  std::bernoulli_distribution keep(fraction);
  for (auto& m : mask) m = m || keep(rng);
  return mask;
}
}  // namespace detail

/// `count` recall-practice documents whose filler comes from `text` (training documents).
inline std::vector<Document> recall_practice_documents(const std::vector<Document>& text, int count,
                                                       const RecallPractice& spec, std::uint64_t seed) {
  static const char* const first[] = {"amber", "silver", "quiet", "northern", "crimson", "hollow", "golden", "bitter",
                                      "ancient", "gentle", "frozen", "hidden", "wild", "narrow", "distant", "iron"};
  static const char* const second[] = {"falcon", "river", "lantern", "meadow", "harbor", "compass", "orchard", "tower",
                                       "violin", "garden", "anchor", "mirror", "valley", "candle", "bridge", "forest"};
  if (count <= 0) return {};
  if (spec.facts <= 0 || spec.min_gap < 0 || spec.max_gap < spec.min_gap) {
    detail::fail<ConfigError>("recall practice: need facts > 0 and 0 <= min_gap <= max_gap, got ", spec.facts, ", ",
                              spec.min_gap, ", ", spec.max_gap);
  }
  if (spec.min_facts < 0 || spec.min_facts > spec.facts) {
    detail::fail<ConfigError>("recall practice: need 0 <= min_facts <= facts, got ", spec.min_facts, " and ", spec.facts);
  }
  if (!(spec.text_targets >= 0 && spec.text_targets <= 1)) {
    detail::fail<ConfigError>("recall practice: text_targets is a fraction in [0, 1], got ", spec.text_targets);
  }
  // 256 distinct names exist (16 x 16 words)
  if (spec.facts > 64) detail::fail<ConfigError>("recall practice: at most 64 facts per document, got ", spec.facts);
  std::int64_t longest = 0;
  for (const auto& d : text) longest = std::max<std::int64_t>(longest, static_cast<std::int64_t>(d.tokens.size()));
  if (longest < spec.max_gap) {
    detail::fail<InputError>("recall practice: the longest training document has ", longest,
                             " tokens, fewer than the largest gap of ", spec.max_gap);
  }
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> word(0, 15), digit(0, 9);
  std::uniform_int_distribution<std::int64_t> gap(spec.min_gap, spec.max_gap);
  std::uniform_int_distribution<int> fact_count(spec.min_facts > 0 ? spec.min_facts : spec.facts, spec.facts);
  std::vector<const Document*> long_enough;
  for (const auto& d : text) {
    if (static_cast<std::int64_t>(d.tokens.size()) >= spec.max_gap) long_enough.push_back(&d);
  }
  std::uniform_int_distribution<std::size_t> pick(0, long_enough.size() - 1);
  // Document n: the statements, then a random slice of training text; the facts are shuffled
  // for their recall (the draws in this order, so that older runs' documents stay the same).
  auto statements_and_filler = [&](int n, const std::string& head, auto& facts) {
    const Document& src = *long_enough[pick(rng)];
    const std::int64_t len = gap(rng);
    std::uniform_int_distribution<std::int64_t> start(0, static_cast<std::int64_t>(src.tokens.size()) - len);
    const std::int64_t s0 = start(rng);
    std::shuffle(facts.begin(), facts.end(), rng);
    Document d;
    d.name = "recall practice " + std::to_string(n);
    d.tokens = ByteTokenizer::encode(head);
    d.tokens.insert(d.tokens.end(), src.tokens.begin() + s0, src.tokens.begin() + s0 + len);
    return d;
  };
  std::vector<Document> out;
  if (spec.varied_wording) {
    constexpr int n_cores = std::size(detail::kRecallCores), n_slead = std::size(detail::kStatementLeads),
                  n_rlead = std::size(detail::kRecallLeads), n_names = std::size(detail::kNameFirst);
    std::uniform_int_distribution<int> core(0, n_cores - 1), slead(0, n_slead - 1), rlead(0, n_rlead - 1),
        name_word(0, n_names - 1), digits(4, 6);
    struct Fact {
      std::string name, number;
      int core, statement_lead, recall_lead;
    };
    for (int n = 0; n < count; ++n) {
      std::vector<Fact> facts;
      const int wanted = spec.min_facts > 0 ? fact_count(rng) : spec.facts;
      while (static_cast<int>(facts.size()) < wanted) {
        Fact f;
        f.name = std::string(detail::kNameFirst[name_word(rng)]) + " " + detail::kNameSecond[name_word(rng)];
        if (std::any_of(facts.begin(), facts.end(), [&](const Fact& g) { return g.name == f.name; })) continue;
        for (int i = 0, len = digits(rng); i < len; ++i) f.number.push_back(static_cast<char>('0' + digit(rng)));
        f.core = core(rng);
        f.statement_lead = slead(rng);
        f.recall_lead = rlead(rng);
        facts.push_back(std::move(f));
      }
      std::string head;
      for (const Fact& f : facts) {
        head += detail::recall_sentence(detail::kStatementLeads[f.statement_lead], detail::kRecallCores[f.core], f.name) +
                f.number + ".\n";
      }
      Document d = statements_and_filler(n, head, facts);
      std::vector<std::uint8_t> answer(d.tokens.size(), 0);
      for (const Fact& f : facts) {
        detail::append_recall(d, answer,
                              "\n" + detail::recall_sentence(detail::kRecallLeads[f.recall_lead], detail::kRecallCores[f.core], f.name),
                              f.number + ".", spec.first_digit_only);
      }
      detail::append_recall(d, answer, "\n", "");
      if (spec.score_answers_only) d.scored = detail::with_text_targets(std::move(answer), spec.text_targets, seed, n);
      out.push_back(std::move(d));
    }
    return out;
  }
  for (int n = 0; n < count; ++n) {
    std::vector<std::pair<std::string, std::string>> facts;
    const int wanted = spec.min_facts > 0 ? fact_count(rng) : spec.facts;  // (no draw otherwise: old runs resume alike)
    while (static_cast<int>(facts.size()) < wanted) {
      std::string name = std::string(first[word(rng)]) + " " + second[word(rng)];
      if (std::any_of(facts.begin(), facts.end(), [&](const auto& f) { return f.first == name; })) continue;
      std::string number;
      for (int i = 0; i < 5; ++i) number.push_back(static_cast<char>('0' + digit(rng)));
      facts.emplace_back(std::move(name), std::move(number));
    }
    std::string head;
    for (std::size_t i = 0; i < facts.size(); ++i) {
      head += "Remember: the number for " + facts[i].first + " is " + facts[i].second + ".\n";
    }
    Document d = statements_and_filler(n, head, facts);
    std::vector<std::uint8_t> answer(d.tokens.size(), 0);
    for (const auto& f : facts) {
      detail::append_recall(d, answer, "\nRecall: the number for " + f.first + " is ", f.second + ".", spec.first_digit_only);
    }
    detail::append_recall(d, answer, "\n", "");
    if (spec.score_answers_only) d.scored = detail::with_text_targets(std::move(answer), spec.text_targets, seed, n);
    out.push_back(std::move(d));
  }
  return out;
}

/// `practice` interleaved into `docs` at even intervals (deterministic).
inline std::vector<Document> interleave(std::vector<Document> docs, std::vector<Document> practice) {
  if (practice.empty()) return docs;
  std::vector<Document> out;
  out.reserve(docs.size() + practice.size());
  const double every = static_cast<double>(docs.size() + practice.size()) / static_cast<double>(practice.size());
  std::size_t a = 0, b = 0;
  for (std::size_t i = 0; i < docs.size() + practice.size(); ++i) {
    const bool take_practice = b < practice.size() && (a == docs.size() || static_cast<double>(i + 1) >= every * static_cast<double>(b + 1));
    out.push_back(std::move(take_practice ? practice[b++] : docs[a++]));
  }
  return out;
}

}  // namespace longmem
