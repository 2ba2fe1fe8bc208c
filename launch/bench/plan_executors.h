// The ranks' side of a coordinated run (replay, serve): rank 0 broadcasts each step plan and every
// rank, rank 0 included, executes it on its RankCache; an empty broadcast ends the others' loop.
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include "kvfabric/backend/backend.h"
#include "kvfabric/config/config.h"
#include "kvfabric/runtime/rank_cache.h"
#include "kvfabric/transport/mpi_transport.h"
#include "kvfabric/transport/transport.h"

namespace kvfabric::bench {

//! Whether an MPI launcher started this process (Open MPI, MPICH/Hydra, PMIx).
bool under_mpi_launcher();

class PlanExecutors {
 public:
  PlanExecutors(Transport& transport, std::unique_ptr<Backend> backend)
      : transport_(&transport), backend_(std::move(backend)) {}

  //! Creates this rank's cache for `config` (replacing the previous one).
  Status start(const Config& config);
  //! Rank 0: sends `plan` to every rank and executes its own share.
  Status broadcast_and_execute(const StepPlan& plan);
  //! Rank 0: ends the other ranks' serve().
  Status finish();
  //! The other ranks: execute plans until rank 0 calls finish().
  Status serve();
  //! Every rank's received migration blocks, in rank order (collective).
  Result<std::vector<uint64_t>> received_blocks();
  //! Every rank's tables_digest(), in rank order (collective).
  Result<std::vector<uint64_t>> table_digests();

  [[nodiscard]] bool is_root() const { return transport_->rank().value == 0; }
  [[nodiscard]] int world_size() const { return transport_->world_size(); }
  [[nodiscard]] const RankCache& cache() const { return *cache_; }

 private:
  Transport* transport_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<RankCache> cache_;
};

//! \brief This process's place in a job started by mpirun: MPI, its transport and this rank's
//! PlanExecutors on the CPU backend (one thread per rank: the ranks share the node's cores).
class MpiPlanJob {
 public:
  //! Null when no MPI launcher started this process or MPI is not built (the coordinator then
  //! runs alone); InvalidArgument when the job does not have dp x tp ranks.
  static Result<std::unique_ptr<MpiPlanJob>> launch(const TopologyConfig& topology);

  [[nodiscard]] PlanExecutors& executors() { return *executors_; }

 private:
  explicit MpiPlanJob(MpiRuntime mpi) : mpi_(std::move(mpi)) {}

  MpiRuntime mpi_;  // outlives the transport made from it, which outlives the executors
  std::unique_ptr<Transport> transport_;
  std::optional<PlanExecutors> executors_;
};

}  // namespace kvfabric::bench
