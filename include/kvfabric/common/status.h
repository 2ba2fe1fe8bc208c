// Status and Result<T>: how every fallible kvfabric call reports what went wrong.
#pragma once

#include <cstddef>
#include <cstdint>
#include <ostream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

#include "kvfabric/common/check.h"
#include "kvfabric/common/ids.h"

namespace kvfabric {

//! \brief Error categories. The first five mirror the seed `PagedKvError` variants.
enum class ErrorCode : uint8_t {
  kOk = 0,
  kOutOfMemory,       //!< not enough free blocks (or bytes) for the request
  kSequenceNotFound,  //!< an unknown SeqId
  kBlockNotFound,     //!< an unknown or unreferenced BlockId
  kInvalidOperation,  //!< well-formed, but not allowed in the current state
  kInvalidArgument,   //!< a malformed or out-of-range value
  kNothingToEvict,    //!< eviction was asked for but no sequence is resident
  kNotFound,          //!< another named entity (file, key, entry) does not exist
  kIoError,           //!< reading or writing a file failed
  kParseError,        //!< a config, trace or message could not be parsed
  kUnimplemented,     //!< a combination that was not compiled in
  kUnavailable,       //!< a device or peer is not reachable; may succeed later
  kDataLoss,          //!< data arrived corrupted (checksum mismatch)
  kInternal,          //!< a failure in a lower layer (CUDA, MPI, NCCL) with its message
  kResourceExhausted,  //!< a configured limit (sequences, connections, batch or reply size) is reached
  kUnauthenticated,    //!< the caller has not proven who it is (no or a wrong token)
  kPermissionDenied,   //!< the caller is known but may not do this (an admin's op)
};

//! \brief The code's name without the leading k, e.g. "OutOfMemory".
std::string_view error_code_name(ErrorCode code);

//! \brief The outcome of an operation: ok, or an error code with a message that names the rank,
//! sequence, block or value concerned. A failed operation changes nothing.
class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(ErrorCode code, std::string message) : code_(code), message_(std::move(message)) {}

  [[nodiscard]] bool ok() const { return code_ == ErrorCode::kOk; }
  [[nodiscard]] ErrorCode code() const { return code_; }
  //! The human-readable text, e.g. "Sequence not found: S7" (the seed's Display text).
  [[nodiscard]] const std::string& message() const { return message_; }
  //! "OK", or "<CodeName>: <message>"; a seed-compatible message that already opens with its
  //! error in words ("Out of memory: ...", also after a context) stands alone.
  [[nodiscard]] std::string to_string() const;

  friend bool operator==(const Status& a, const Status& b) {
    return a.code_ == b.code_ && a.message_ == b.message_;
  }
  friend std::ostream& operator<<(std::ostream& os, const Status& s) { return os << s.to_string(); }

 private:
  ErrorCode code_ = ErrorCode::kOk;
  std::string message_;
};

inline Status ok_status() {
  return Status();
}

// Constructors for the common errors. The seed's four reproduce its Display strings
// ("Out of memory: requested 3 blocks, 2 available"); invalid_argument's message is `what`.
Status out_of_memory(size_t requested_blocks, size_t available_blocks);
Status sequence_not_found(SeqId seq);
Status block_not_found(BlockId block);
Status invalid_operation(std::string_view what);
Status invalid_argument(std::string_view what);

//! \brief A value of type T, or the Status explaining why there is none.
template <typename T>
class [[nodiscard]] Result {
  static_assert(!std::is_same_v<std::remove_cv_t<T>, Status>, "use Status directly");

 public:
  Result(T value) : storage_(std::move(value)) {}        // NOLINT(google-explicit-constructor)
  Result(Status status) : storage_(std::move(status)) {  // NOLINT(google-explicit-constructor)
    KVF_CHECK(!std::get<Status>(storage_).ok(), "a Result needs a value or an error Status");
  }

  [[nodiscard]] bool ok() const { return std::holds_alternative<T>(storage_); }
  //! The error, or an OK Status when a value is present.
  [[nodiscard]] const Status& status() const {
    static const Status kOkStatus;
    return ok() ? kOkStatus : std::get<Status>(storage_);
  }

  //! The value. Calling this on an error Result is a programming error and aborts.
  [[nodiscard]] T& value() & { return checked(); }
  [[nodiscard]] const T& value() const& { return const_cast<Result*>(this)->checked(); }
  [[nodiscard]] T&& value() && { return std::move(checked()); }
  [[nodiscard]] T value_or(T fallback) const& { return ok() ? std::get<T>(storage_) : fallback; }

  T* operator->() { return &checked(); }
  const T* operator->() const { return &const_cast<Result*>(this)->checked(); }
  T& operator*() & { return checked(); }
  const T& operator*() const& { return const_cast<Result*>(this)->checked(); }

 private:
  T& checked() {
    KVF_CHECK(ok(), std::get<Status>(storage_).to_string());
    return std::get<T>(storage_);
  }

  std::variant<T, Status> storage_;
};

namespace detail {
inline const Status& as_status(const Status& s) {
  return s;
}
template <typename T>
const Status& as_status(const Result<T>& r) {
  return r.status();
}
}  // namespace detail

}  // namespace kvfabric

#define KVF_CONCAT_INNER(a, b) a##b
#define KVF_CONCAT(a, b) KVF_CONCAT_INNER(a, b)

//! Returns the Status of `expr` (a Status or Result) from the enclosing function if it is an error.
//! `expr` is a Status or a Result, not a reference into a temporary: pass `make_x()`, never
//! `make_x().status()` (the temporary Result dies before the Status is read).
#define KVF_RETURN_IF_ERROR(expr)                                               \
  do {                                                                          \
    const auto& KVF_CONCAT(kvf_status_, __LINE__) = (expr);                     \
    if (!::kvfabric::detail::as_status(KVF_CONCAT(kvf_status_, __LINE__)).ok()) \
      return ::kvfabric::detail::as_status(KVF_CONCAT(kvf_status_, __LINE__));  \
  } while (0)

//! `KVF_ASSIGN_OR_RETURN(auto x, make_x());` binds the value or returns the error.
#define KVF_ASSIGN_OR_RETURN(lhs, expr) \
  KVF_ASSIGN_OR_RETURN_IMPL(KVF_CONCAT(kvf_result_, __LINE__), lhs, expr)
#define KVF_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()
