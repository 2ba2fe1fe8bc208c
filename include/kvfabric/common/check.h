// Invariant checks for programming errors (never for bad user input, which gets a Status).
#pragma once

#include <string_view>

namespace kvfabric::detail {

//! \brief Prints "file:line: check failed: expr: message" to stderr and aborts.
[[noreturn]] void check_failed(const char* file, int line, const char* expr,
                               std::string_view message);

}  // namespace kvfabric::detail

//! Aborts with a message when an internal invariant does not hold. A failing KVF_CHECK is a bug in
//! kvfabric or a misuse that the API documents as undefined (e.g. value() on an error Result).
#define KVF_CHECK(cond, message)                                                         \
  do {                                                                                   \
    if (!(cond)) ::kvfabric::detail::check_failed(__FILE__, __LINE__, #cond, (message)); \
  } while (0)
