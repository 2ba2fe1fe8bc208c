#include "serve/rank_metrics.h"

#include <fmt/format.h>

#include <vector>

#include "kvfabric/server/metrics.h"

namespace kvfabric::serve {

std::string rank_metrics_text(std::span<const RankCacheStats> ranks, uint32_t tp) {
  std::string text;
  const auto family = [&](std::string_view name, std::string_view help,
                          uint64_t RankCacheStats::*field) {
    std::vector<MetricSample> samples;
    for (size_t r = 0; r < ranks.size(); ++r) {
      samples.push_back({fmt::format("rank=\"{}\",replica=\"{}\",shard=\"{}\"", r, r / tp, r % tp),
                         static_cast<double>(ranks[r].*field)});
    }
    append_metric_family(text, name, "counter", help, samples);
  };
  family("kvfabric_rank_steps_total", "Step plans a rank executed.", &RankCacheStats::steps);
  family("kvfabric_rank_waves_total", "Waves of step plans a rank ran.", &RankCacheStats::waves);
  family("kvfabric_rank_swapped_out_blocks_total", "Blocks a rank copied to its host tier.",
         &RankCacheStats::swapped_out_blocks);
  family("kvfabric_rank_swapped_in_blocks_total", "Blocks a rank copied back from its host tier.",
         &RankCacheStats::swapped_in_blocks);
  family("kvfabric_rank_migrated_blocks_sent_total", "Blocks a rank sent to another replica.",
         &RankCacheStats::migrated_blocks_sent);
  family("kvfabric_rank_migrated_blocks_received_total",
         "Blocks a rank received from another replica.", &RankCacheStats::migrated_blocks_received);
  family("kvfabric_rank_token_copies_total", "Copy-on-write token copies a rank made.",
         &RankCacheStats::token_copies);
  family("kvfabric_rank_overlapped_waves_total",
         "Waves whose block transfer ran while the wave's swaps or copies were queued.",
         &RankCacheStats::overlapped_waves);
  family("kvfabric_rank_scores_sent_total",
         "Attention scores (one per token) a rank sent to rank 0 for token compression.",
         &RankCacheStats::scores_sent);
  return text;
}

}  // namespace kvfabric::serve
