#include "bench/mpi_job.h"

#include <fmt/format.h>

#include <cstdlib>
#include <vector>

#include "kvfabric/server/metrics.h"

namespace kvfabric::bench {

bool under_mpi_launcher() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"}) {
    if (std::getenv(var) != nullptr) return true;
  }
  return false;
}

Result<std::unique_ptr<MpiPlanJob>> MpiPlanJob::launch(const TopologyConfig& topology) {
  if (!under_mpi_launcher() || !mpi_transport_built()) return std::unique_ptr<MpiPlanJob>();
  KVF_ASSIGN_OR_RETURN(MpiRuntime runtime, MpiRuntime::init(nullptr, nullptr));
  const uint32_t world = topology.dp * topology.tp;
  if (runtime.world_size() != static_cast<int>(world)) {
    return invalid_argument(fmt::format("dp {} x tp {} needs {} MPI ranks, this job has {}",
                                        topology.dp, topology.tp, world, runtime.world_size()));
  }
  std::unique_ptr<MpiPlanJob> job(new MpiPlanJob(std::move(runtime)));
  KVF_ASSIGN_OR_RETURN(job->transport_, make_mpi_transport(job->mpi_));
  KVF_ASSIGN_OR_RETURN(job->backend_, make_cpu_backend(CpuBackendOptions{best_cpu_isa(), 1}));
  return job;
}

Status MpiPlanJob::start(const Config& config) {
  ranks_.reset();  // its arenas go before the next ones are allocated
  KVF_ASSIGN_OR_RETURN(ranks_, RankJob::create(config, *transport_, *backend_));
  return ok_status();
}

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
  return text;
}

}  // namespace kvfabric::bench
