// The Mooncake trace parser and the prefix-cache replay, on the shipped conversation trace.
#include <gtest/gtest.h>

#include <algorithm>

#include <unordered_set>

#include "bench/replay_sim.h"
#include "bench/trace.h"

namespace kvfabric::bench {
namespace {

const std::vector<MooncakeRequest>& conversation_trace() {
  static const auto trace =
      parse_mooncake_trace(embedded_mooncake_conversation_trace(), "embedded").value();
  return trace;
}

TEST(MooncakeTrace, EmbeddedTraceParses) {
  const auto& trace = conversation_trace();
  ASSERT_EQ(trace.size(), 12031u);
  EXPECT_EQ(trace.front().input_length, 6758u);
  EXPECT_EQ(trace.front().output_length, 500u);
  EXPECT_EQ(trace.front().hash_ids.size(), 14u);
  EXPECT_FALSE(trace.front().priority.has_value());
  uint64_t refs = 0;
  for (const auto& r : trace)
    refs += r.hash_ids.size();
  EXPECT_EQ(refs, 288500u);  // performance-anchors.md §1.3
}

TEST(MooncakeTrace, ErrorsNameTheLine) {
  const std::string ok =
      R"({"timestamp": 5, "input_length": 3, "output_length": 1, "hash_ids": [7]})";
  EXPECT_TRUE(parse_mooncake_trace(ok + "\n", "t.jsonl").ok());
  const auto bad =
      parse_mooncake_trace(ok + "\n{\"timestamp\": 6, \"input_length\": -1}\n", "t.jsonl");
  EXPECT_EQ(bad.status().message(), "t.jsonl:2: bad \"input_length\"");
  EXPECT_EQ(parse_mooncake_trace("{not json\n", "t.jsonl").status().message(),
            "t.jsonl:1: not a JSON object");
  EXPECT_EQ(
      parse_mooncake_trace(
          ok + "\n" + R"({"timestamp": 1, "input_length": 3, "output_length": 1, "hash_ids": [7]})",
          "t.jsonl")
          .status()
          .message(),
      "t.jsonl:2: timestamp goes backwards");
  EXPECT_FALSE(
      parse_mooncake_trace(
          R"({"timestamp": 1, "input_length": 3, "output_length": 1, "hash_ids": [-7]})", "t.jsonl")
          .ok());
  EXPECT_FALSE(parse_mooncake_trace("\n\n", "t.jsonl").ok());
  const auto with_priority = parse_mooncake_trace(
      R"({"timestamp": 1, "input_length": 3, "output_length": 1, "hash_ids": [7], "priority": 2})",
      "t.jsonl");
  ASSERT_TRUE(with_priority.ok());
  EXPECT_EQ(with_priority->front().priority, 2u);
  // JSON would keep the last of two equal keys, and a misspelt key would be dropped unseen.
  EXPECT_EQ(
      parse_mooncake_trace(
          R"({"timestamp": 1, "input_length": 3, "output_length": 1, "hash_ids": [7], "input_length": 9})",
          "t.jsonl")
          .status()
          .message(),
      "t.jsonl:1: key \"input_length\" appears twice");
  EXPECT_EQ(
      parse_mooncake_trace(
          R"({"timestamp": 1, "input_length": 3, "output_length": 1, "hash_ids": [7], "prio": {"a": 1, "a": 2}})",
          "t.jsonl")
          .status()
          .message(),
      "t.jsonl:1: unknown key \"prio\" (known: timestamp, input_length, output_length, "
      "hash_ids, priority)");
}

TEST(ReplaySim, ExpandsHashIdsIntoDistinctTokenBlocks) {
  MooncakeRequest r;
  r.input_length = 10;
  r.hash_ids = {3, 5, 0};
  const auto tokens = expand_prompt(r, 4).value();
  ASSERT_EQ(tokens.size(), 10u);
  for (size_t i = 0; i < 10; ++i) {
    EXPECT_EQ(tokens[i], prompt_token(r.hash_ids[i / 4], i % 4));
    EXPECT_LT(tokens[i], 1u << 31);  // generated tokens live above
  }
  // Equal ids give equal blocks; different ones differ, far beyond 32-bit ranges of ids.
  MooncakeRequest again = r;
  again.hash_ids = {3, 6, 0};
  const auto other = expand_prompt(again, 4).value();
  EXPECT_TRUE(std::equal(tokens.begin(), tokens.begin() + 4, other.begin()));
  EXPECT_NE(tokens[4], other[4]);
  EXPECT_NE(prompt_token(uint64_t{1} << 40, 0), prompt_token(0, 0));
  r.hash_ids = {3, 5};  // 10 tokens need 3 blocks of 4
  EXPECT_EQ(expand_prompt(r, 4).status().code(), ErrorCode::kInvalidArgument);
  r.hash_ids = {3, 5, uint64_t{1} << 47};
  EXPECT_EQ(expand_prompt(r, 4).status().message(),
            "hash id 140737488355328 is above 2^47");
}

// Copies of a trace interleave by arrival and share no block.
TEST(ReplaySim, ScaledOutCopiesShareNothing) {
  std::vector<MooncakeRequest> trace(2);
  trace[0].timestamp_ms = 0;
  trace[0].hash_ids = {0, 1};
  trace[1].timestamp_ms = 10;
  trace[1].hash_ids = {0, 2};
  const auto copies = scale_out_trace(trace, 3);
  ASSERT_EQ(copies.size(), 6u);
  EXPECT_EQ(copies[0].hash_ids, (std::vector<uint64_t>{0, 1}));
  EXPECT_EQ(copies[1].hash_ids, (std::vector<uint64_t>{3, 4}));
  EXPECT_EQ(copies[2].hash_ids, (std::vector<uint64_t>{6, 7}));
  EXPECT_EQ(copies[3].hash_ids, (std::vector<uint64_t>{0, 2}));
  EXPECT_EQ(copies[5].timestamp_ms, 10);
}

// The issue's gate: with unlimited capacity the real radix tree, fed the expanded tokens, finds
// exactly the blocks whose hash id appeared earlier (0.3664 of 288,500 references).
TEST(ReplaySim, UnlimitedCapacityFindsEveryRepeatedBlock) {
  ReplaySimOptions options;
  const auto r = run_replay_sim(conversation_trace(), options).value();
  EXPECT_EQ(r.block_refs, 288500u);
  EXPECT_EQ(r.hit_blocks, 105710u);
  EXPECT_NEAR(r.block_hit_ratio, 0.3664, 5e-5);
  EXPECT_EQ(r.ideal_block_hit_ratio, r.block_hit_ratio);
  EXPECT_NEAR(r.token_hit_ratio, 0.3736, 5e-5);  // the token-weighted ideal (§1.3)
  EXPECT_EQ(r.evicted_blocks, 0u);
  EXPECT_EQ(r.unfit_requests, 0u);
  EXPECT_EQ(r.leaked_blocks, 0u);
}

// Full blocks only: a partly filled last block is never cached, so a repeated prompt recomputes
// it. The expected count comes from the hash ids alone: a reference hits when its id was seen
// before as a full block, along the leading run of full blocks.
TEST(ReplaySim, FullBlocksOnlyMissesRepeatedPartialBlocks) {
  const auto& trace = conversation_trace();
  std::unordered_set<uint64_t> full_seen;
  uint64_t expected = 0;
  for (const auto& req : trace) {
    const size_t full = req.input_length / 512;
    for (size_t b = 0; b < full && full_seen.count(req.hash_ids[b]); ++b)
      ++expected;
    full_seen.insert(req.hash_ids.begin(), req.hash_ids.begin() + static_cast<ptrdiff_t>(full));
  }
  ReplaySimOptions options;
  options.partial_blocks = false;
  const auto r = run_replay_sim(trace, options).value();
  EXPECT_EQ(r.hit_blocks, expected);
  EXPECT_LT(r.hit_blocks, 105710u);
  EXPECT_EQ(r.leaked_blocks, 0u);
}

// A finite cache evicts the least recently used leaves; block-granular LRU at 3 M tokens gives
// 0.1355 in the reference simulation (performance-anchors.md §1.3), which evicts single blocks
// in plain LRU order. Leaf-first eviction keeps every cached block reachable, hence slightly more.
TEST(ReplaySim, ThreeMillionTokensIsNearTheLruReference) {
  ReplaySimOptions options;
  options.capacity_tokens = 3'000'000;
  const auto r = run_replay_sim(conversation_trace(), options).value();
  EXPECT_EQ(r.pool_blocks, 5859u);
  EXPECT_NEAR(r.block_hit_ratio, 0.1355, 0.001);
  EXPECT_GE(r.block_hit_ratio, 0.1355);
  EXPECT_GT(r.evicted_blocks, 200'000u);
  EXPECT_LE(r.final_cached_blocks, r.pool_blocks);
  EXPECT_EQ(r.leaked_blocks, 0u);
}

TEST(ReplaySim, RejectsACapacityWithoutABlock) {
  ReplaySimOptions options;
  options.capacity_tokens = 100;
  EXPECT_EQ(run_replay_sim(conversation_trace(), options).status().code(),
            ErrorCode::kInvalidArgument);
}

TEST(ReplaySim, PromptsLargerThanThePoolAreCountedAsMisses) {
  ReplaySimOptions options;
  options.capacity_tokens = 8 * 512;
  options.max_requests = 200;
  const auto r = run_replay_sim(conversation_trace(), options).value();
  EXPECT_GT(r.unfit_requests, 0u);
  EXPECT_LT(r.unfit_requests, 200u);
  EXPECT_EQ(r.leaked_blocks, 0u);
}

}  // namespace
}  // namespace kvfabric::bench
