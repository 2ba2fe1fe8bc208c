// Leveled, per-subsystem logging (spdlog underneath; configured from KVF_LOG).
#pragma once

#include <functional>
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

//! Receives every line kvfabric logs (at the levels set above), besides stderr: an engine can
//! forward them to its own logger. Called from the thread that logs.
using LogObserver = std::function<void(Subsystem subsystem, LogLevel level, std::string_view line)>;
//! Sets the observer (nullptr removes it).
void set_log_observer(LogObserver observer);

}  // namespace kvfabric
