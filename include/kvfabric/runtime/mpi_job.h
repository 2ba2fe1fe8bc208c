// A tool's place in a job that an MPI launcher started (kvfabric-serve, kvfabric-bench replay):
// MPI, this rank's placement (the runtime config section), its backend and transport, and its
// RankJob.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "kvfabric/backend/backend.h"
#include "kvfabric/config/config.h"
#include "kvfabric/runtime/rank_job.h"
#include "kvfabric/runtime/rank_placement.h"
#include "kvfabric/transport/mpi_transport.h"
#include "kvfabric/transport/transport.h"

namespace kvfabric {

//! Whether an MPI launcher started this process (Open MPI, MPICH/Hydra, PMIx, Slurm's srun).
bool under_mpi_launcher();

//! \brief MPI for the tool, this rank's backend and transport as runtime.* asks, and its
//! RankJob. Start-up is agreed: when any rank cannot have what it asked for or cannot start its
//! transport, or the ranks would use different backends or transports, every rank's launch()
//! fails (each naming what it knows), so no rank waits for a peer that gave up.
class MpiJob {
 public:
  //! Null when no MPI launcher started this process or kvfabric was built without MPI (the
  //! coordinator then runs alone). InvalidArgument when the job does not have dp x tp ranks
  //! (agreed like the placement: a rank whose own config gives another count fails every rank).
  //! Errors name the rank, its host, the device and the CUDA, NCCL or MPI error string.
  static Result<std::unique_ptr<MpiJob>> launch(const Config& config);

  //! This rank's plan loop for `config`, replacing the previous one (a new RankCache).
  Status start(const Config& config);
  [[nodiscard]] RankJob& ranks() { return *ranks_; }
  //! The transport plans and blocks travel on.
  [[nodiscard]] Transport& transport() { return *transport_; }
  [[nodiscard]] const RankPlacement& placement() const { return placement_; }
  //! This rank in MPI_COMM_WORLD.
  [[nodiscard]] int rank() const { return mpi_.rank().value; }
  //! "rank 3 on node-b".
  [[nodiscard]] std::string who() const;
  //! Collective: every rank's placement, described, in rank order at rank 0 (empty elsewhere).
  Result<std::vector<std::string>> gather_placements();
  //! Ends every rank of the job with `code` (see MpiRuntime::abort).
  [[noreturn]] void abort(int code) const { mpi_.abort(code); }

 private:
  explicit MpiJob(MpiRuntime mpi) : mpi_(std::move(mpi)) {}
  Status place_this_rank(const RuntimeConfig& runtime);
  Result<std::vector<uint64_t>> agree(std::string_view stage, const Status& mine, uint64_t value);
  Status agree_on_placement(const Status& mine);
  Status make_transport();
  // `status` of starting `what` on this rank's device, naming rank, host and device.
  Status on_device(std::string_view what, const Status& status) const;

  // Destroyed bottom-up: the rank job, then the transports, then the backend, then MPI.
  MpiRuntime mpi_;
  RankPlacement placement_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Transport> host_transport_;  // MPI: NCCL's bootstrap
  std::unique_ptr<Transport> gpu_transport_;   // NCCL, or MPI staged for a CUDA rank; null on CPU
  Transport* transport_ = nullptr;             // gpu_transport_ when there is one, else MPI
  std::unique_ptr<RankJob> ranks_;
};

}  // namespace kvfabric
