// What this host can afford: structures sized by the config (block tables, CPU-backend arenas)
// are checked against its physical memory before they are allocated, so an unaffordable config
// is a clear error rather than std::bad_alloc or the OOM killer.
#pragma once

#include <cstdint>
#include <string_view>

#include "kvfabric/common/status.h"

namespace kvfabric::detail {

//! Physical memory of this host in bytes (0 when the system does not say).
uint64_t host_memory_bytes();

//! OK when `bytes` fit in this host's physical memory; otherwise ResourceExhausted:
//! "<what>: <bytes> bytes of host memory needed, this host has <memory>".
Status check_host_memory(uint64_t bytes, std::string_view what);

}  // namespace kvfabric::detail
