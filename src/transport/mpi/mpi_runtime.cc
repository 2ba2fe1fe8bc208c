// MpiRuntime: MPI_Init_thread / MPI_Finalize as an RAII object, one per process.
#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

#include "common/log.h"
#include "kvfabric/transport/mpi_transport.h"
#include "transport/mpi/mpi_error.h"

namespace kvfabric {
namespace {

// At most one MpiRuntime at a time: MPI starts once per process and finalizes once.
std::atomic<bool> g_runtime_alive{false};

int to_mpi_level(MpiThreadLevel level) {
  switch (level) {
    case MpiThreadLevel::kSingle:
      return MPI_THREAD_SINGLE;
    case MpiThreadLevel::kFunneled:
      return MPI_THREAD_FUNNELED;
    case MpiThreadLevel::kSerialized:
      return MPI_THREAD_SERIALIZED;
    case MpiThreadLevel::kMultiple:
      return MPI_THREAD_MULTIPLE;
  }
  return MPI_THREAD_FUNNELED;
}

MpiThreadLevel from_mpi_level(int level) {
  if (level >= MPI_THREAD_MULTIPLE) return MpiThreadLevel::kMultiple;
  if (level >= MPI_THREAD_SERIALIZED) return MpiThreadLevel::kSerialized;
  if (level >= MPI_THREAD_FUNNELED) return MpiThreadLevel::kFunneled;
  return MpiThreadLevel::kSingle;
}

const char* level_name(int level) {
  switch (from_mpi_level(level)) {
    case MpiThreadLevel::kSingle:
      return "MPI_THREAD_SINGLE";
    case MpiThreadLevel::kFunneled:
      return "MPI_THREAD_FUNNELED";
    case MpiThreadLevel::kSerialized:
      return "MPI_THREAD_SERIALIZED";
    case MpiThreadLevel::kMultiple:
      return "MPI_THREAD_MULTIPLE";
  }
  return "?";
}

}  // namespace

Result<MpiRuntime> MpiRuntime::init(int* argc, char*** argv, MpiThreadLevel level) {
  if (g_runtime_alive.exchange(true)) {
    return Status(ErrorCode::kInvalidOperation,
                  "MpiRuntime::init: another MpiRuntime is alive (MPI is initialized once per "
                  "process; pass that one around)");
  }
  // From here on, every error path gives the slot back.
  auto fail = [](Status status) -> Result<MpiRuntime> {
    g_runtime_alive.store(false);
    return status;
  };
  int finalized = 0, initialized = 0;
  MPI_Finalized(&finalized);
  if (finalized) {
    return fail(Status(ErrorCode::kInvalidOperation,
                       "MpiRuntime::init: MPI was already finalized in this process and cannot "
                       "be initialized again"));
  }
  MpiRuntime runtime;
  int provided = MPI_THREAD_SINGLE;
  MPI_Initialized(&initialized);
  if (initialized) {
    // The application owns MPI: borrow it with whatever thread support it chose. kvfabric only
    // calls MPI from the thread that calls its transports.
    MPI_Query_thread(&provided);
    if (provided < to_mpi_level(level)) {
      KVF_LOG_WARN(kTransport,
                   "MPI was initialized by the application with {}, below the requested {}; "
                   "call kvfabric's transports from the application's MPI thread only",
                   level_name(provided), level_name(to_mpi_level(level)));
    }
  } else {
    const int requested = std::max(to_mpi_level(level), static_cast<int>(MPI_THREAD_FUNNELED));
    const int err = MPI_Init_thread(argc, argv, requested, &provided);
    if (err != MPI_SUCCESS) {
      return fail(
          Status(ErrorCode::kInternal, "MPI_Init_thread failed: " + detail::mpi_error_string(err)));
    }
    if (provided < MPI_THREAD_FUNNELED) {
      MPI_Finalize();
      return fail(Status(ErrorCode::kUnavailable,
                         std::string("MPI_Init_thread provided ") + level_name(provided) +
                             "; kvfabric needs MPI_THREAD_FUNNELED or better"));
    }
    runtime.owns_ = true;
  }
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &runtime.world_size_);
  runtime.rank_ = RankId{rank};
  runtime.thread_level_ = from_mpi_level(provided);
  runtime.active_ = true;
  KVF_LOG_INFO(kTransport, "R{}: MPI {} with {} ({} ranks)", rank,
               runtime.owns_ ? "initialized" : "borrowed from the application",
               level_name(provided), runtime.world_size_);
  return runtime;
}

void MpiRuntime::abort(int code) const {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);  // MPI_Abort does not return; should it, the process ends all the same
}

MpiRuntime::MpiRuntime(MpiRuntime&& other) noexcept {
  *this = std::move(other);
}

MpiRuntime& MpiRuntime::operator=(MpiRuntime&& other) noexcept {
  if (this != &other) {
    release();
    active_ = other.active_;
    owns_ = other.owns_;
    rank_ = other.rank_;
    world_size_ = other.world_size_;
    thread_level_ = other.thread_level_;
    other.active_ = false;
    other.owns_ = false;
  }
  return *this;
}

MpiRuntime::~MpiRuntime() {
  release();
}

void MpiRuntime::release() {
  if (!active_) return;
  if (owns_) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }
  active_ = false;
  owns_ = false;
  g_runtime_alive.store(false);
}

bool mpi_transport_built() {
  return true;
}

}  // namespace kvfabric
