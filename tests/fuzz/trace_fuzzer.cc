// Request-trace text, as both trace formats: the parsers refuse malformed lines with an error
// naming the line (never a crash), and what they accept keeps its promises (time never goes
// backwards).
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "bench/trace.h"
#include "fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace kvfabric::bench;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  if (const auto mooncake = parse_mooncake_trace(text, "fuzz"); mooncake.ok()) {
    for (size_t i = 1; i < mooncake->size(); ++i) {
      kvfabric::fuzz::require((*mooncake)[i].timestamp_ms >= (*mooncake)[i - 1].timestamp_ms,
                              "mooncake timestamps do not go backwards");
    }
  }
  if (const auto azure = parse_azure_trace(text, "fuzz"); azure.ok()) {
    for (size_t i = 1; i < azure->size(); ++i) {
      kvfabric::fuzz::require((*azure)[i].arrival_s >= (*azure)[i - 1].arrival_s,
                              "azure arrivals do not go backwards");
    }
  }
  return 0;
}
