// The NCCL device transport. This header has no CUDA or NCCL types: only src/transport/nccl
// includes cuda_runtime.h and nccl.h (DESIGN.md §4).
#pragma once

#include <memory>

#include "kvfabric/common/status.h"
#include "kvfabric/transport/transport.h"

namespace kvfabric {

struct NcclTransportOptions {
  //! CUDA device of this rank. -1: the rank's index among the ranks on its host (found with an
  //! all_gather of host-name hashes over the bootstrap), modulo the visible devices.
  int device = -1;
};

//! \brief Moves blocks in GPU memory between the ranks of `bootstrap` with NCCL, one CUDA device
//! and one NCCL communicator per rank.
//!
//! Setup (collective over `bootstrap`'s ranks, usually the MPI transport): every rank picks its
//! device and creates its stream; the ranks agree that all of them succeeded (so one rank
//! without a GPU fails every rank instead of hanging them); rank 0 creates the ncclUniqueId and
//! broadcasts it over `bootstrap`; then ncclCommInitRank. `bootstrap` must outlive the
//! transport; broadcast, barrier, all_gather, gather, set_timeout and describe are delegated to
//! it (host memory). A timeout bounds those host-side calls only: exchange_blocks waits for its
//! CUDA stream without a bound.
//!
//! exchange_blocks, on the transport's own CUDA stream: one kernel launch packs every sent
//! block into a contiguous device staging buffer (one contiguous region per batch); one NCCL
//! group (ncclGroupStart/End) posts one ncclRecv and one ncclSend per peer and batch, sends to
//! this rank itself included; one launch unpacks the received regions into their blocks; then
//! the call synchronizes its stream (the one host-device synchronization), so on return the
//! received blocks hold the data and every block may be reused. It does not wait for other
//! streams: finish the work that writes the sent blocks (e.g. Backend::synchronize) first.
//! Blocks are device memory of this rank's device, or pinned host memory the device can
//! address; anything else is InvalidArgument before anything runs. Staging buffers grow to the
//! largest exchange seen and are kept.
//!
//! Errors: Unimplemented when kvfabric was built without NCCL; Unavailable when a rank has no
//! usable CUDA device (the message names the ranks); Internal with the CUDA or NCCL message
//! (ncclGetErrorString and ncclGetLastError) naming this rank and its device.
Result<std::unique_ptr<Transport>> make_nccl_transport(Transport& bootstrap,
                                                       const NcclTransportOptions& options = {});

//! Whether this build contains the NCCL transport.
bool nccl_transport_built();

}  // namespace kvfabric
