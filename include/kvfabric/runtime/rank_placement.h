// Which backend, device and transport one rank of a job gets: the `runtime` config section
// (backend, transport, device) decided against what this build contains and what the process
// sees (its GPUs, the launcher's local rank).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kvfabric/common/status.h"
#include "kvfabric/config/config.h"

namespace kvfabric {

//! \brief What a rank sees before it picks: the parts of this build and of this process that
//! the choice depends on. observe_process() fills it; tests build their own.
struct ProcessView {
  bool cuda_built = false;
  bool nccl_built = false;
  //! Names of the visible CUDA devices, by ordinal (after CUDA_VISIBLE_DEVICES); empty when none.
  std::vector<std::string> devices;
  //! Why `devices` is empty (the CUDA error string, "built without CUDA"), for messages.
  std::string no_device_reason;
  //! This rank's index among the job's ranks on its host, as the launcher says (Open MPI,
  //! Slurm, MPICH Hydra); nullopt when no launcher says it.
  std::optional<uint32_t> local_rank;
  //! How many of the job's ranks run on this host, as the launcher says; nullopt when unknown.
  std::optional<uint32_t> local_size;
  //! CUDA_VISIBLE_DEVICES as set; nullopt when unset.
  std::optional<std::string> cuda_visible_devices;
};

//! The launcher's count of the job's ranks on this host in `env`: OMPI_COMM_WORLD_LOCAL_SIZE,
//! MPI_LOCALNRANKS (Hydra), SLURM_NTASKS_PER_NODE or LOCAL_WORLD_SIZE.
std::optional<uint32_t> launcher_local_size(const Environment& env);

//! This process's view: the build's parts, cuda_devices(), and the launcher's variables.
ProcessView observe_process();

//! The launcher's local rank in `env`: OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID,
//! MPI_LOCALRANKID (Hydra) or LOCAL_RANK, the first that is set and numeric.
std::optional<uint32_t> launcher_local_rank(const Environment& env);

//! \brief A rank's resolved choice: never kAuto.
struct RankPlacement {
  BackendKind backend = BackendKind::kCpu;
  TransportKind transport = TransportKind::kMpi;
  int device = -1;          //!< CUDA ordinal; -1 on the CPU backend
  std::string device_name;  //!< the GPU's name; empty on the CPU backend
  //! A CUDA rank on the MPI transport: its blocks travel through pinned host memory.
  [[nodiscard]] bool staged() const {
    return backend == BackendKind::kCuda && transport == TransportKind::kMpi;
  }
  //! "cuda backend on device 1 (NVIDIA H100 80GB HBM3), nccl transport".
  [[nodiscard]] std::string describe() const;
};

//! \brief Resolves `runtime` for one rank. `auto` backend: CUDA when this build has it and a
//! device is visible, else CPU. `auto` transport: NCCL on the CUDA backend when this build has
//! NCCL and every rank of the host can have a device of its own (NCCL refuses two ranks on one
//! device), else MPI (staged through pinned host memory). Device: runtime.device, or the local rank modulo the visible devices (0 when
//! no launcher names a local rank). An explicit choice this build or process cannot honour is
//! an error that names `who` (rank and host), the device and the reason (the CUDA error string,
//! CUDA_VISIBLE_DEVICES): nothing falls back silently.
Result<RankPlacement> place_rank(const RuntimeConfig& runtime, const ProcessView& view,
                                 std::string_view who);

}  // namespace kvfabric
