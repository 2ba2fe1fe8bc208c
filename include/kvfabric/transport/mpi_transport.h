// The MPI host transport and the MPI runtime it needs. This header does not include mpi.h: only
// src/transport/mpi does (DESIGN.md §4), so engines link kvfabric without MPI's headers.
#pragma once

#include <cstdint>
#include <memory>

#include "kvfabric/common/status.h"
#include "kvfabric/transport/transport.h"

namespace kvfabric {

//! The MPI thread support a program asks for; the transports need at least kFunneled (only the
//! thread that initialized MPI calls them).
enum class MpiThreadLevel : uint8_t { kSingle, kFunneled, kSerialized, kMultiple };

//! \brief MPI for the lifetime of this object (RAII). `init` calls MPI_Init_thread unless the
//! host application already initialized MPI; the object then only borrows MPI and does not
//! finalize it. An owning runtime calls MPI_Finalize when destroyed, so every transport made
//! from it must be destroyed first.
//!
//! \code
//!   int main(int argc, char** argv) {
//!     auto mpi = kvfabric::MpiRuntime::init(&argc, &argv);
//!     if (!mpi.ok()) { /* mpi.status().message() */ }
//!     auto transport = kvfabric::make_mpi_transport(*mpi);
//!     ...
//!   }  // transport, then MPI_Finalize
//! \endcode
class MpiRuntime {
 public:
  //! Initializes MPI with at least `level` (kFunneled or better). Errors: InvalidOperation when
  //! another MpiRuntime is alive or MPI was already finalized (MPI cannot start twice); Internal
  //! with MPI's message when MPI_Init_thread fails; Unavailable when MPI provides less thread
  //! support than kFunneled (MPI is finalized again in that case); Unimplemented when kvfabric
  //! was built without MPI. `argc`/`argv` may be null.
  static Result<MpiRuntime> init(int* argc, char*** argv,
                                 MpiThreadLevel level = MpiThreadLevel::kFunneled);

  MpiRuntime(MpiRuntime&& other) noexcept;
  MpiRuntime& operator=(MpiRuntime&& other) noexcept;
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;
  ~MpiRuntime();

  //! Rank and size in MPI_COMM_WORLD.
  [[nodiscard]] RankId rank() const { return rank_; }
  [[nodiscard]] int world_size() const { return world_size_; }
  //! The thread support MPI provided.
  [[nodiscard]] MpiThreadLevel thread_level() const { return thread_level_; }
  //! Whether this object called MPI_Init_thread (and will call MPI_Finalize).
  [[nodiscard]] bool owns_mpi() const { return owns_; }

  //! Ends every process of the job with `code` (MPI_Abort on MPI_COMM_WORLD; the launcher
  //! reports it). For a job that cannot finish because a rank stopped answering: MPI_Finalize
  //! would wait for that rank for ever.
  [[noreturn]] void abort(int code) const;

 private:
  MpiRuntime() = default;
  void release();  // MPI_Finalize when owned; gives the one-per-process slot back

  bool active_ = false;  // false once moved from
  bool owns_ = false;
  RankId rank_{0};
  int world_size_ = 0;
  MpiThreadLevel thread_level_ = MpiThreadLevel::kSingle;
};

struct MpiTransportOptions {
  //! A batch whose blocks have at least this many bytes (default 1 MiB) sends each block as its
  //! own contiguous message; a batch of smaller blocks goes as one message per peer, batch and
  //! direction (0: always). Open MPI's shared-memory transport moves a contiguous message with a
  //! single copy (CMA) but copies a scattered datatype in and out of shared memory, which halves
  //! the bandwidth when both directions are busy (README, transfer figures); with blocks of
  //! 1 MiB and more the extra messages cost little. Every rank must use the same value.
  uint64_t block_message_min_bytes = uint64_t{1} << 20;
};

//! \brief The MPI host transport over a duplicate of MPI_COMM_WORLD (its messages never mix with
//! the application's), with errors returned rather than aborting the job.
//!
//! exchange_blocks sends, for each peer and batch, one nonblocking message per direction: an MPI
//! derived datatype over the blocks' absolute addresses (runs of adjacent blocks merge), so MPI
//! reads and writes the blocks in place and kvfabric packs nothing. Messages above 2^31 bytes
//! are fine (the datatype counts blocks, not bytes). It posts every send, then takes each
//! incoming message with a matched probe (MPI_Improbe, MPI_Imrecv) so that a message that does
//! not fit its batch is drained and reported (naming both ranks and sizes) instead of being
//! truncated, and waits for everything with one MPI_Waitall. Batches a rank sends to itself are
//! copied with memcpy while the messages are in flight. Blocks are host memory. Calls must come
//! from the thread that initialized MPI.
//!
//! Errors: Unavailable when `runtime` no longer holds MPI; Internal with MPI's error string.
Result<std::unique_ptr<Transport>> make_mpi_transport(const MpiRuntime& runtime,
                                                      const MpiTransportOptions& options = {});

//! Whether kvfabric was built with MPI (otherwise the functions above return Unimplemented).
bool mpi_transport_built();

//! \brief The raw-MPI baseline `kvfabric-bench transfer` compares exchange_blocks with: `bytes`
//! contiguous bytes moved by plain blocking MPI_Send / MPI_Recv (MPI_Sendrecv when both
//! directions), in messages of at most 2^30 bytes, on the communicator of `transport`.
//! Paired between the two ranks `a` and `b` (other ranks return at once): `a` sends `a_to_b` to
//! `b`'s `b_from_a`; when `both_directions`, `b` also sends `b_to_a` into `a`'s `a_from_b`.
//! Pointers a rank does not use may be null.
struct MpiRawTransfer {
  RankId a{0};
  RankId b{1};
  uint64_t bytes = 0;
  bool both_directions = false;
  const uint8_t* a_to_b = nullptr;
  uint8_t* b_from_a = nullptr;
  const uint8_t* b_to_a = nullptr;
  uint8_t* a_from_b = nullptr;
};
//! InvalidArgument when `transport` was not made by make_mpi_transport, a rank is out of range,
//! `a == b`, or a pointer this rank needs is null; Internal with MPI's error string.
Status mpi_raw_transfer(Transport& transport, const MpiRawTransfer& transfer);

}  // namespace kvfabric
