// Internal logging macros. Only kvfabric's own sources include this (it pulls in spdlog).
#pragma once

#include <spdlog/logger.h>

#include "kvfabric/common/logging.h"

namespace kvfabric::detail {

//! The logger of one subsystem, created (and KVF_LOG applied) on first use.
spdlog::logger& subsystem_logger(Subsystem subsystem);

}  // namespace kvfabric::detail

// The level is checked before the arguments are formatted, so a disabled line costs one load.
#define KVF_LOG(lvl, subsystem, ...)                                                            \
  do {                                                                                          \
    auto& kvf_logger_ = ::kvfabric::detail::subsystem_logger(::kvfabric::Subsystem::subsystem); \
    if (kvf_logger_.should_log(::spdlog::level::lvl)) {                                         \
      kvf_logger_.log(::spdlog::level::lvl, __VA_ARGS__);                                       \
    }                                                                                           \
  } while (0)

#define KVF_LOG_TRACE(subsystem, ...) KVF_LOG(trace, subsystem, __VA_ARGS__)
#define KVF_LOG_DEBUG(subsystem, ...) KVF_LOG(debug, subsystem, __VA_ARGS__)
#define KVF_LOG_INFO(subsystem, ...) KVF_LOG(info, subsystem, __VA_ARGS__)
#define KVF_LOG_WARN(subsystem, ...) KVF_LOG(warn, subsystem, __VA_ARGS__)
#define KVF_LOG_ERROR(subsystem, ...) KVF_LOG(err, subsystem, __VA_ARGS__)
