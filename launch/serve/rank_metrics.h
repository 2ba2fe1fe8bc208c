// Every rank's counters on rank 0's /metrics (kvfabric-serve).
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "kvfabric/runtime/rank_cache.h"

namespace kvfabric::serve {

//! Every rank's RankCacheStats (RankJob::rank_stats(), in rank order) as Prometheus families
//! labelled rank, replica and shard (`tp` shards per replica).
std::string rank_metrics_text(std::span<const RankCacheStats> ranks, uint32_t tp);

}  // namespace kvfabric::serve
