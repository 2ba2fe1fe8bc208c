// Leveled, per-subsystem logging (spdlog underneath; configured from KVF_LOG).
#pragma once

#include <string_view>

#include "kvfabric/common/status.h"

namespace kvfabric {

enum class LogLevel : int { kTrace, kDebug, kInfo, kWarn, kError, kOff };

//! \brief The parts of kvfabric that log; each has its own level.
enum class Subsystem : int {
  kCommon,
  kConfig,
  kBlock,
  kQuant,
  kPrefix,
  kBackend,
  kKernels,
  kTransport,
  kCoordinator,
  kRuntime,
  kServer,
  kBench,
  kCount,
};

//! Lower-case name used in KVF_LOG and in log lines, e.g. "block".
std::string_view subsystem_name(Subsystem subsystem);
std::string_view log_level_name(LogLevel level);

//! \brief Applies a level spec: a default level and per-subsystem overrides, comma separated,
//! e.g. "info", "warn,block=debug,config=trace". Unknown names are an error and change nothing.
Status configure_logging(std::string_view spec);
//! Applies KVF_LOG again (it is applied automatically when logging is first used).
Status configure_logging_from_env();
void set_log_level(Subsystem subsystem, LogLevel level);
LogLevel log_level(Subsystem subsystem);

}  // namespace kvfabric
