// Request traces for the benchmarks: the Azure 2023 code trace (CSV) and the traces embedded into
// the kvfabric-bench binary so the demo needs no data path.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "kvfabric/common/status.h"

namespace kvfabric::bench {

//! One request of an arrival trace.
struct TraceRequest {
  double arrival_s = 0;  //!< seconds since the first request of the trace
  uint32_t prompt_tokens = 0;
  uint32_t output_tokens = 0;
};

//! Parses "TIMESTAMP,ContextTokens,GeneratedTokens" CSV (header first, timestamps like
//! "2023-11-16 18:17:03.9799600"). Errors name the line. Rows must be in arrival order.
Result<std::vector<TraceRequest>> parse_azure_trace(std::string_view csv, std::string_view source);

//! The Azure LLM inference trace 2023, code (8,819 requests), as shipped in launch/traces/.
std::string_view embedded_azure_code_trace();
//! The Mooncake FAST'25 conversation trace (12,031 requests, JSON lines).
std::string_view embedded_mooncake_conversation_trace();

//! Reads a whole file; IoError names the path.
Result<std::string> read_text_file(const std::string& path);

}  // namespace kvfabric::bench
