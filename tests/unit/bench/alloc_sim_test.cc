#include <gtest/gtest.h>

#include "bench/alloc_sim.h"
#include "bench/trace.h"

namespace kvfabric::bench {
namespace {

TEST(AzureTrace, EmbeddedTraceParses) {
  const auto trace = parse_azure_trace(embedded_azure_code_trace(), "embedded");
  ASSERT_TRUE(trace.ok()) << trace.status();
  ASSERT_EQ(trace->size(), 8819u);
  EXPECT_EQ(trace->front().arrival_s, 0.0);
  EXPECT_EQ(trace->front().prompt_tokens, 4808u);
  EXPECT_EQ(trace->front().output_tokens, 10u);
  EXPECT_NEAR((*trace)[1].arrival_s, 0.052, 1e-6);
  EXPECT_NEAR(trace->back().arrival_s, 3435.9, 0.1);
}

TEST(AzureTrace, ErrorsNameTheLine) {
  const std::string header = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
  auto bad = parse_azure_trace(header + "2023-11-16 18:17:03.97,12,3\n2023-11-16 18:17:04.0,x,1\n",
                               "t.csv");
  EXPECT_EQ(bad.status().code(), ErrorCode::kParseError);
  EXPECT_NE(bad.status().message().find("t.csv:3"), std::string::npos) << bad.status();
  EXPECT_FALSE(parse_azure_trace("a,b,c\n", "t.csv").ok());
  EXPECT_FALSE(parse_azure_trace(header + "2023-11-16 18:17,1,1\n", "t.csv").ok());
  EXPECT_FALSE(parse_azure_trace(header, "t.csv").ok());
  // Days past the month's end; 29 February only in leap years.
  for (const char* date : {"2023-02-31", "2023-04-31", "2023-02-29", "1900-02-29"})
    EXPECT_FALSE(parse_azure_trace(header + date + " 10:00:00,1,1\n", "t.csv").ok()) << date;
  for (const char* date : {"2024-02-29", "2000-02-29", "2023-12-31"})
    EXPECT_TRUE(parse_azure_trace(header + date + " 10:00:00,1,1\n", "t.csv").ok()) << date;
  EXPECT_FALSE(
      parse_azure_trace(header + "2023-11-16 18:17:05,1,1\n2023-11-16 18:17:04,1,1\n", "t.csv")
          .ok());
}

TEST(AllocSim, UnconstrainedReplayCompletesWithoutPreemption) {
  std::vector<TraceRequest> trace;
  for (int i = 0; i < 50; ++i)
    trace.push_back({i * 0.1, 100u + i, 20u + i % 7});
  AllocSimOptions options;
  options.num_blocks = 10000;
  const auto r = run_alloc_sim(trace, options).value();
  EXPECT_EQ(r.completed, 50u);
  EXPECT_EQ(r.preemptions, 0u);
  EXPECT_EQ(r.leaked_blocks, 0u);
  EXPECT_GT(r.mean_fragmentation, 0.0);
  EXPECT_LT(r.mean_fragmentation, 0.5);
}

TEST(AllocSim, TightPoolPreemptsAndStillFinishesEverything) {
  std::vector<TraceRequest> trace;
  for (int i = 0; i < 40; ++i)
    trace.push_back({0.0, 60u + 3 * i, 40u + i});
  trace.push_back({0.0, 5000, 10});  // can never fit in 64 blocks of 16
  AllocSimOptions options;
  options.num_blocks = 64;
  options.admit_watermark = 0.0;
  const auto first = run_alloc_sim(trace, options).value();
  EXPECT_EQ(first.completed, 40u);
  EXPECT_EQ(first.rejected, 1u);
  EXPECT_GT(first.preemptions, 0u);
  EXPECT_EQ(first.leaked_blocks, 0u);
  EXPECT_LE(first.peak_blocks_used, 64u);
  // Deterministic: a second replay makes the same decisions.
  const auto second = run_alloc_sim(trace, options).value();
  EXPECT_EQ(second.preemptions, first.preemptions);
  EXPECT_EQ(second.steps, first.steps);
  EXPECT_EQ(second.operations, first.operations);
}

TEST(AllocSim, RejectsBadOptions) {
  std::vector<TraceRequest> trace{{0, 10, 10}};
  AllocSimOptions options;
  options.time_scale = 0;
  EXPECT_EQ(run_alloc_sim(trace, options).status().code(), ErrorCode::kInvalidArgument);
  options.time_scale = 1;
  options.block_size = 0;
  EXPECT_EQ(run_alloc_sim(trace, options).status().code(), ErrorCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvfabric::bench
