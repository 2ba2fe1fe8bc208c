// The traces linked into the tools (launch/CMakeLists.txt embeds the files), so the demo needs no
// data path.
#include "bench/trace.h"

extern "C" const char kvf_trace_azure_code[];
extern "C" const char kvf_trace_azure_code_end[];
extern "C" const char kvf_trace_mooncake_conversation[];
extern "C" const char kvf_trace_mooncake_conversation_end[];

namespace kvfabric::bench {

std::string_view embedded_azure_code_trace() {
  return std::string_view(kvf_trace_azure_code,
                          static_cast<size_t>(kvf_trace_azure_code_end - kvf_trace_azure_code));
}

std::string_view embedded_mooncake_conversation_trace() {
  return std::string_view(
      kvf_trace_mooncake_conversation,
      static_cast<size_t>(kvf_trace_mooncake_conversation_end - kvf_trace_mooncake_conversation));
}

}  // namespace kvfabric::bench
