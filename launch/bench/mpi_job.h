// A tool's place in a job started by mpirun (replay, serve): MPI, its transport, a CPU backend
// and this rank's RankJob.
#pragma once

#include <memory>
#include <span>
#include <string>

#include "kvfabric/backend/backend.h"
#include "kvfabric/config/config.h"
#include "kvfabric/runtime/rank_job.h"
#include "kvfabric/transport/mpi_transport.h"
#include "kvfabric/transport/transport.h"

namespace kvfabric::bench {

//! Whether an MPI launcher started this process (Open MPI, MPICH/Hydra, PMIx).
bool under_mpi_launcher();

//! \brief MPI for the tool, its transport, and this rank's RankJob on the CPU backend (one thread
//! per rank: the ranks share the node's cores).
class MpiPlanJob {
 public:
  //! Null when no MPI launcher started this process or MPI is not built (the coordinator then
  //! runs alone); InvalidArgument when the job does not have dp x tp ranks.
  static Result<std::unique_ptr<MpiPlanJob>> launch(const TopologyConfig& topology);

  //! This rank's plan loop for `config`, replacing the previous one (a new RankCache).
  Status start(const Config& config);
  [[nodiscard]] RankJob& ranks() { return *ranks_; }
  [[nodiscard]] Transport& transport() { return *transport_; }
  //! Ends every rank of the job with `code` (see MpiRuntime::abort).
  [[noreturn]] void abort(int code) const { mpi_.abort(code); }

 private:
  explicit MpiPlanJob(MpiRuntime mpi) : mpi_(std::move(mpi)) {}

  MpiRuntime mpi_;  // outlives the transport made from it, which outlives the job
  std::unique_ptr<Transport> transport_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<RankJob> ranks_;
};

//! Every rank's RankCacheStats (RankJob::rank_stats(), in rank order) as Prometheus families
//! labelled rank, replica and shard (`tp` shards per replica), for rank 0's /metrics.
std::string rank_metrics_text(std::span<const RankCacheStats> ranks, uint32_t tp);

}  // namespace kvfabric::bench
