#include "kvfabric/common/status.h"

#include <string>

namespace kvfabric {

std::string_view error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::kOk:
      return "OK";
    case ErrorCode::kOutOfMemory:
      return "OutOfMemory";
    case ErrorCode::kSequenceNotFound:
      return "SequenceNotFound";
    case ErrorCode::kBlockNotFound:
      return "BlockNotFound";
    case ErrorCode::kInvalidOperation:
      return "InvalidOperation";
    case ErrorCode::kInvalidArgument:
      return "InvalidArgument";
    case ErrorCode::kNothingToEvict:
      return "NothingToEvict";
    case ErrorCode::kNotFound:
      return "NotFound";
    case ErrorCode::kIoError:
      return "IoError";
    case ErrorCode::kParseError:
      return "ParseError";
    case ErrorCode::kUnimplemented:
      return "Unimplemented";
    case ErrorCode::kUnavailable:
      return "Unavailable";
    case ErrorCode::kDataLoss:
      return "DataLoss";
    case ErrorCode::kInternal:
      return "Internal";
    case ErrorCode::kResourceExhausted:
      return "ResourceExhausted";
    case ErrorCode::kUnauthenticated:
      return "Unauthenticated";
    case ErrorCode::kPermissionDenied:
      return "PermissionDenied";
  }
  return "Unknown";
}

namespace {

// The words the seed's Display strings open with, for the codes that have one.
std::string_view seed_phrase(ErrorCode code) {
  switch (code) {
    case ErrorCode::kOutOfMemory:
      return "Out of memory: ";
    case ErrorCode::kSequenceNotFound:
      return "Sequence not found: ";
    case ErrorCode::kBlockNotFound:
      return "Block not found: ";
    case ErrorCode::kInvalidOperation:
      return "Invalid operation: ";
    default:
      return {};
  }
}

}  // namespace

std::string Status::to_string() const {
  if (ok()) return "OK";
  // A seed-compatible message already says what went wrong in words ("Out of memory: ..."),
  // also after a caller put its context in front; naming the code again would only stutter.
  const std::string_view phrase = seed_phrase(code_);
  if (!phrase.empty() && (message_.starts_with(phrase) ||
                          message_.find(": " + std::string(phrase)) != std::string::npos)) {
    return message_;
  }
  std::string out(error_code_name(code_));
  out += ": ";
  out += message_;
  return out;
}

Status out_of_memory(size_t requested_blocks, size_t available_blocks) {
  return Status(ErrorCode::kOutOfMemory, "Out of memory: requested " +
                                             std::to_string(requested_blocks) + " blocks, " +
                                             std::to_string(available_blocks) + " available");
}

Status sequence_not_found(SeqId seq) {
  return Status(ErrorCode::kSequenceNotFound, "Sequence not found: " + to_string(seq));
}

Status block_not_found(BlockId block) {
  return Status(ErrorCode::kBlockNotFound, "Block not found: " + to_string(block));
}

Status invalid_operation(std::string_view what) {
  return Status(ErrorCode::kInvalidOperation, "Invalid operation: " + std::string(what));
}

Status invalid_argument(std::string_view what) {
  return Status(ErrorCode::kInvalidArgument, std::string(what));
}

}  // namespace kvfabric
