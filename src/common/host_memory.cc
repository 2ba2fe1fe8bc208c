#include "common/host_memory.h"

#include <unistd.h>

#include <string>

namespace kvfabric::detail {

uint64_t host_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page_size = sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page_size <= 0) return 0;
  return static_cast<uint64_t>(pages) * static_cast<uint64_t>(page_size);
}

Status check_host_memory(uint64_t bytes, std::string_view what) {
  const uint64_t memory = host_memory_bytes();
  if (memory == 0 || bytes <= memory) return ok_status();
  return Status(ErrorCode::kResourceExhausted,
                std::string(what) + ": " + std::to_string(bytes) +
                    " bytes of host memory needed, this host has " + std::to_string(memory));
}

}  // namespace kvfabric::detail
