#include "kvfabric/common/logging.h"

#include <spdlog/sinks/base_sink.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/log.h"

namespace kvfabric {
namespace {

constexpr size_t kNumSubsystems = static_cast<size_t>(Subsystem::kCount);
constexpr LogLevel kDefaultLevel = LogLevel::kWarn;

constexpr std::array<std::string_view, kNumSubsystems> kSubsystemNames = {
    "common",  "config",    "block",       "quant",   "prefix", "backend",
    "kernels", "transport", "coordinator", "runtime", "server", "bench"};

spdlog::level::level_enum to_spdlog(LogLevel level) {
  switch (level) {
    case LogLevel::kTrace:
      return spdlog::level::trace;
    case LogLevel::kDebug:
      return spdlog::level::debug;
    case LogLevel::kInfo:
      return spdlog::level::info;
    case LogLevel::kWarn:
      return spdlog::level::warn;
    case LogLevel::kError:
      return spdlog::level::err;
    case LogLevel::kOff:
      return spdlog::level::off;
  }
  return spdlog::level::warn;
}

LogLevel from_spdlog(spdlog::level::level_enum level) {
  switch (level) {
    case spdlog::level::trace:
      return LogLevel::kTrace;
    case spdlog::level::debug:
      return LogLevel::kDebug;
    case spdlog::level::info:
      return LogLevel::kInfo;
    case spdlog::level::warn:
      return LogLevel::kWarn;
    case spdlog::level::err:
    case spdlog::level::critical:
      return LogLevel::kError;
    default:
      return LogLevel::kOff;
  }
}

std::optional<LogLevel> parse_level(std::string_view name) {
  static constexpr std::pair<std::string_view, LogLevel> kLevels[] = {
      {"trace", LogLevel::kTrace}, {"debug", LogLevel::kDebug},  {"info", LogLevel::kInfo},
      {"warn", LogLevel::kWarn},   {"warning", LogLevel::kWarn}, {"error", LogLevel::kError},
      {"off", LogLevel::kOff},     {"none", LogLevel::kOff}};
  for (const auto& [text, level] : kLevels) {
    if (text == name) return level;
  }
  return std::nullopt;
}

std::optional<Subsystem> parse_subsystem(std::string_view name) {
  for (size_t i = 0; i < kNumSubsystems; ++i) {
    if (kSubsystemNames[i] == name) return static_cast<Subsystem>(i);
  }
  return std::nullopt;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t'))
    s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t'))
    s.remove_suffix(1);
  return s;
}

struct LevelSpec {
  std::optional<LogLevel> default_level;
  std::vector<std::pair<Subsystem, LogLevel>> overrides;
};

// Parses "info,block=debug" completely before anything is applied, so a bad spec changes nothing.
Result<LevelSpec> parse_level_spec(std::string_view spec) {
  LevelSpec parsed;
  while (!spec.empty()) {
    const size_t comma = spec.find(',');
    const std::string_view item = trim(spec.substr(0, comma));
    spec = comma == std::string_view::npos ? std::string_view() : spec.substr(comma + 1);
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    if (eq == std::string_view::npos) {
      const auto level = parse_level(item);
      if (!level) {
        return invalid_argument("KVF_LOG: unknown level '" + std::string(item) +
                                "' (expected trace, debug, info, warn, error or off)");
      }
      parsed.default_level = level;
      continue;
    }
    const std::string_view name = trim(item.substr(0, eq));
    const std::string_view level_text = trim(item.substr(eq + 1));
    const auto subsystem = parse_subsystem(name);
    if (!subsystem) {
      return invalid_argument("KVF_LOG: unknown subsystem '" + std::string(name) + "'");
    }
    const auto level = parse_level(level_text);
    if (!level) {
      return invalid_argument("KVF_LOG: unknown level '" + std::string(level_text) + "' for " +
                              std::string(name));
    }
    parsed.overrides.emplace_back(*subsystem, *level);
  }
  return parsed;
}

// Hands every line to the LogObserver, if one is set (the base sink's mutex guards it).
class ObserverSink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  void set(LogObserver observer) {
    std::lock_guard<std::mutex> lock(mutex_);
    observer_ = std::move(observer);
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    if (!observer_) return;
    const std::string_view name(msg.logger_name.data(), msg.logger_name.size());
    const auto subsystem = parse_subsystem(name.substr(name.find('.') + 1));
    observer_(subsystem.value_or(Subsystem::kCommon), from_spdlog(msg.level),
              std::string_view(msg.payload.data(), msg.payload.size()));
  }
  void flush_() override {}

 private:
  LogObserver observer_;
};

// All subsystem loggers share one stderr sink and the observer sink; they are not registered
// with spdlog's global registry so that an embedding application's own loggers are left alone.
class LoggerTable {
 public:
  static LoggerTable& instance() {
    static LoggerTable table;
    return table;
  }

  spdlog::logger& get(Subsystem subsystem) { return *loggers_[static_cast<size_t>(subsystem)]; }
  void observe(LogObserver observer) { observer_->set(std::move(observer)); }

  void apply(const LevelSpec& spec) {
    if (spec.default_level) {
      for (auto& logger : loggers_)
        logger->set_level(to_spdlog(*spec.default_level));
    }
    for (const auto& [subsystem, level] : spec.overrides)
      get(subsystem).set_level(to_spdlog(level));
  }

 private:
  LoggerTable() {
    auto sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
    for (size_t i = 0; i < kNumSubsystems; ++i) {
      auto logger = std::make_shared<spdlog::logger>(
          "kvf." + std::string(kSubsystemNames[i]), spdlog::sinks_init_list{sink, observer_});
      logger->set_pattern("[%H:%M:%S.%e] [%n] [%l] %v");
      logger->set_level(to_spdlog(kDefaultLevel));
      loggers_[i] = std::move(logger);
    }
    // KVF_LOG applies once, before any explicit set_log_level call can be overridden by it.
    if (const char* env = std::getenv("KVF_LOG"); env != nullptr) {
      auto parsed = parse_level_spec(env);
      if (parsed.ok()) {
        apply(parsed.value());
      } else {
        std::fprintf(stderr, "kvfabric: ignoring %s\n", parsed.status().message().c_str());
      }
    }
  }

  std::shared_ptr<ObserverSink> observer_ = std::make_shared<ObserverSink>();
  std::array<std::shared_ptr<spdlog::logger>, kNumSubsystems> loggers_;
};

}  // namespace

std::string_view subsystem_name(Subsystem subsystem) {
  const auto index = static_cast<size_t>(subsystem);
  return index < kNumSubsystems ? kSubsystemNames[index] : "unknown";
}

std::string_view log_level_name(LogLevel level) {
  switch (level) {
    case LogLevel::kTrace:
      return "trace";
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarn:
      return "warn";
    case LogLevel::kError:
      return "error";
    case LogLevel::kOff:
      return "off";
  }
  return "unknown";
}

Status configure_logging(std::string_view spec) {
  KVF_ASSIGN_OR_RETURN(const LevelSpec parsed, parse_level_spec(spec));
  LoggerTable::instance().apply(parsed);
  return ok_status();
}

Status configure_logging_from_env() {
  const char* spec = std::getenv("KVF_LOG");
  if (spec == nullptr) return ok_status();
  return configure_logging(spec);
}

void set_log_level(Subsystem subsystem, LogLevel level) {
  LoggerTable::instance().get(subsystem).set_level(to_spdlog(level));
}

LogLevel log_level(Subsystem subsystem) {
  return from_spdlog(LoggerTable::instance().get(subsystem).level());
}

void set_log_observer(LogObserver observer) { LoggerTable::instance().observe(std::move(observer)); }

namespace detail {

spdlog::logger& subsystem_logger(Subsystem subsystem) {
  return LoggerTable::instance().get(subsystem);
}

}  // namespace detail
}  // namespace kvfabric
