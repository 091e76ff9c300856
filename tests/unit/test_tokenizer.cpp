// The byte-level tokenizer of the demo models.
#include <catch2/catch.hpp>

#include <random>

#include "longmem/tokenizer.hpp"

using longmem::ByteTokenizer;

TEST_CASE("tokenizer: bytes round-trip, including UTF-8 and NUL", "[tokenizer]") {
  const std::string text = std::string("Review: caf\xc3\xa9 \xe2\x9c\x93\n", 18) + std::string(1, '\0') + "end";
  const auto ids = ByteTokenizer::encode(text);
  REQUIRE(ids.size() == text.size());
  for (std::size_t i = 0; i < text.size(); ++i) CHECK(ids[i] == static_cast<unsigned char>(text[i]));
  CHECK(ByteTokenizer::decode(ids) == text);
  std::mt19937 rng(7);
  std::string random(1000, '\0');
  for (auto& c : random) c = static_cast<char>(rng() & 0xff);
  CAPTURE(7);
  CHECK(ByteTokenizer::decode(ByteTokenizer::encode(random)) == random);
  CHECK(ByteTokenizer::encode("").empty());
}

TEST_CASE("tokenizer: ids outside 0..255 are refused", "[tokenizer][errors]") {
  CHECK_THROWS_WITH(ByteTokenizer::decode({65, 256}), Catch::Contains("256") && Catch::Contains("position 1"));
  CHECK_THROWS_AS(ByteTokenizer::decode({-1}), longmem::InputError);
}
