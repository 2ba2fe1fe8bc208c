// A transport for blocks in a backend's memory over a transport that moves host memory only: a
// CUDA rank on the MPI transport (several ranks sharing a GPU, or a cluster without NCCL) stages
// its blocks through pinned host memory (DESIGN.md §1, §3).
#pragma once

#include <memory>

#include "kvfabric/backend/backend.h"
#include "kvfabric/common/status.h"
#include "kvfabric/transport/transport.h"

namespace kvfabric {

//! \brief Wraps `host` (a host-memory transport, e.g. MPI) so that exchange_blocks takes blocks
//! in `backend`'s memory. Each exchange checks the batches (the Transport::exchange_blocks rules,
//! on the callers' addresses: a refused exchange copies and sends nothing), copies every sent
//! block into one staging buffer of pinned host memory (allocate_arena, Tier::kHost), exchanges
//! the staged copies over `host`, then copies every received block to its place; adjacent blocks
//! move as one copy, and each direction waits for the backend once. The staging buffer grows to
//! the largest exchange and is kept. Every other call is `host`'s own.
//!
//! Borrows both: `host` and `backend` must outlive the returned transport. Not thread-safe, like
//! every transport.
Result<std::unique_ptr<Transport>> make_host_staged_transport(Transport& host, Backend& backend);

}  // namespace kvfabric
