// Every rank's RankCacheStats as rank 0's /metrics shows them (kvfabric-serve).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <vector>

#include "serve/rank_metrics.h"

namespace kvfabric::serve {
namespace {

using ::testing::HasSubstr;

TEST(RankMetrics, EachRankIsLabelledWithItsReplicaAndShard) {
  std::vector<RankCacheStats> ranks(4);
  ranks[3].steps = 7;
  ranks[3].migrated_blocks_received = 12;
  ranks[2].token_copies = 5;
  const std::string text = rank_metrics_text(ranks, /*tp=*/2);
  EXPECT_THAT(text, HasSubstr("# TYPE kvfabric_rank_steps_total counter\n"));
  EXPECT_THAT(text, HasSubstr("\nkvfabric_rank_steps_total{rank=\"3\",replica=\"1\",shard=\"1\"} 7\n"));
  EXPECT_THAT(text, HasSubstr("\nkvfabric_rank_steps_total{rank=\"0\",replica=\"0\",shard=\"0\"} 0\n"));
  EXPECT_THAT(text, HasSubstr(
      "\nkvfabric_rank_migrated_blocks_received_total{rank=\"3\",replica=\"1\",shard=\"1\"} 12\n"));
  EXPECT_THAT(text, HasSubstr("\nkvfabric_rank_token_copies_total{rank=\"2\",replica=\"1\",shard=\"0\"} 5\n"));
  EXPECT_EQ(rank_metrics_text({}, 1).find("{rank="), std::string::npos);  // before the first plan
}

}  // namespace
}  // namespace kvfabric::serve
