// make_nccl_transport for builds without CUDA or NCCL: the transport is absent and says so.
#include "kvfabric/transport/nccl_transport.h"

namespace kvfabric {

Result<std::unique_ptr<Transport>> make_nccl_transport(Transport&, const NcclTransportOptions&) {
  return Status(ErrorCode::kUnimplemented,
                "make_nccl_transport: kvfabric was built without NCCL (no CUDA compiler or no "
                "nccl.h/libnccl at configure time, or KVF_ENABLE_NCCL=OFF)");
}

bool nccl_transport_built() {
  return false;
}

}  // namespace kvfabric
