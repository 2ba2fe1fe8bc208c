// The MPI runtime and transport for builds without MPI: they are absent and say so.
#include "kvfabric/transport/mpi_transport.h"

#include <cstdlib>

namespace kvfabric {
namespace {

Status not_built(std::string_view what) {
  return Status(ErrorCode::kUnimplemented,
                std::string(what) +
                    ": kvfabric was built without MPI (none found at configure time, or "
                    "KVF_ENABLE_MPI=OFF)");
}

}  // namespace

Result<MpiRuntime> MpiRuntime::init(int*, char***, MpiThreadLevel) {
  return not_built("MpiRuntime::init");
}

MpiRuntime::MpiRuntime(MpiRuntime&& other) noexcept {
  *this = std::move(other);
}

MpiRuntime& MpiRuntime::operator=(MpiRuntime&& other) noexcept {
  active_ = other.active_;
  owns_ = other.owns_;
  rank_ = other.rank_;
  world_size_ = other.world_size_;
  thread_level_ = other.thread_level_;
  other.active_ = false;
  return *this;
}

MpiRuntime::~MpiRuntime() = default;

void MpiRuntime::release() {}

void MpiRuntime::abort(int code) const { std::_Exit(code); }  // no runtime can exist

Result<std::unique_ptr<Transport>> make_mpi_transport(const MpiRuntime&,
                                                      const MpiTransportOptions&) {
  return not_built("make_mpi_transport");
}

Status mpi_raw_transfer(Transport&, const MpiRawTransfer&) {
  return not_built("mpi_raw_transfer");
}

bool mpi_transport_built() {
  return false;
}

}  // namespace kvfabric
