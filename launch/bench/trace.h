// Request traces for the benchmarks: the Azure 2023 code trace (CSV) and the traces embedded into
// the kvfabric-bench binary so the demo needs no data path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kvfabric/common/status.h"
#include "kvfabric/common/text_file.h"

namespace kvfabric::bench {

//! A trace file is read whole (read_text_file) whatever its size: a scale study's can be large.
inline constexpr size_t kAnyTraceSize = SIZE_MAX;

//! One request of an arrival trace.
struct TraceRequest {
  double arrival_s = 0;  //!< seconds since the first request of the trace
  uint32_t prompt_tokens = 0;
  uint32_t output_tokens = 0;
};

//! One request of a Mooncake trace (FAST'25 format): its prompt is a chain of blocks, each named
//! by a hash id that covers the block and everything before it.
struct MooncakeRequest {
  double timestamp_ms = 0;
  uint32_t input_length = 0;
  uint32_t output_length = 0;
  std::vector<uint64_t> hash_ids;
  //! An optional "priority" field (not in the published traces; an extension for replays).
  std::optional<uint32_t> priority;
};

//! Parses JSON lines {"timestamp", "input_length", "output_length", "hash_ids"[, "priority"]}
//! (nlohmann/json). Errors name the line; timestamps must not go backwards.
Result<std::vector<MooncakeRequest>> parse_mooncake_trace(std::string_view jsonl,
                                                          std::string_view source);

//! `copies` copies of a Mooncake trace interleaved by arrival, for replays of more replicas than
//! the trace has users: copy k renames every hash id h to h + k * (1 + the largest id), so copies
//! share no prefix, and keeps the timestamps (arrivals come `copies` times as fast). Ties in
//! time keep copy order, then trace order.
std::vector<MooncakeRequest> scale_out_trace(const std::vector<MooncakeRequest>& trace,
                                             uint32_t copies);

//! Parses "TIMESTAMP,ContextTokens,GeneratedTokens" CSV (header first, timestamps like
//! "2023-11-16 18:17:03.9799600"). Errors name the line. Rows must be in arrival order.
Result<std::vector<TraceRequest>> parse_azure_trace(std::string_view csv, std::string_view source);

//! The Azure LLM inference trace 2023, code (8,819 requests), as shipped in launch/traces/.
std::string_view embedded_azure_code_trace();
//! The Mooncake FAST'25 conversation trace (12,031 requests, JSON lines).
std::string_view embedded_mooncake_conversation_trace();

}  // namespace kvfabric::bench
