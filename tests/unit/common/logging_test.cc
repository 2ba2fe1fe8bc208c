#include <gtest/gtest.h>

#include <string>
#include <tuple>
#include <vector>

#include "common/log.h"
#include "kvfabric/common/logging.h"

namespace kvfabric {
namespace {

class LoggingTest : public ::testing::Test {
 protected:
  void TearDown() override { ASSERT_TRUE(configure_logging("warn").ok()); }
};

TEST_F(LoggingTest, DefaultAndPerSubsystemLevels) {
  ASSERT_TRUE(configure_logging("info,block=debug, config = trace").ok());
  EXPECT_EQ(log_level(Subsystem::kBlock), LogLevel::kDebug);
  EXPECT_EQ(log_level(Subsystem::kConfig), LogLevel::kTrace);
  EXPECT_EQ(log_level(Subsystem::kPrefix), LogLevel::kInfo);
}

TEST_F(LoggingTest, BadSpecChangesNothing) {
  ASSERT_TRUE(configure_logging("error").ok());
  const Status unknown_subsystem = configure_logging("debug,blocks=trace");
  EXPECT_EQ(unknown_subsystem.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(unknown_subsystem.message().find("blocks"), std::string::npos);
  EXPECT_EQ(log_level(Subsystem::kCommon), LogLevel::kError);
  EXPECT_EQ(configure_logging("verbose").code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(log_level(Subsystem::kCommon), LogLevel::kError);
}

TEST_F(LoggingTest, DisabledLevelDoesNotFormatArguments) {
  set_log_level(Subsystem::kBlock, LogLevel::kOff);
  int evaluated = 0;
  auto expensive = [&] { return ++evaluated; };
  KVF_LOG_DEBUG(kBlock, "value {}", expensive());
  EXPECT_EQ(evaluated, 0);
  set_log_level(Subsystem::kBlock, LogLevel::kDebug);
  EXPECT_EQ(log_level(Subsystem::kBlock), LogLevel::kDebug);
  EXPECT_EQ(subsystem_name(Subsystem::kCoordinator), "coordinator");
}

TEST_F(LoggingTest, AnObserverSeesEveryLoggedLineWithItsSubsystemAndLevel) {
  std::vector<std::tuple<Subsystem, LogLevel, std::string>> seen;
  set_log_observer([&](Subsystem s, LogLevel l, std::string_view line) {
    seen.emplace_back(s, l, std::string(line));
  });
  set_log_level(Subsystem::kServer, LogLevel::kInfo);
  KVF_LOG_WARN(kServer, "listening on {}", "0.0.0.0");
  KVF_LOG_DEBUG(kServer, "not logged at info");
  set_log_observer(nullptr);
  KVF_LOG_WARN(kServer, "after the observer is gone");
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(std::get<0>(seen[0]), Subsystem::kServer);
  EXPECT_EQ(std::get<1>(seen[0]), LogLevel::kWarn);
  EXPECT_EQ(std::get<2>(seen[0]), "listening on 0.0.0.0");
}

}  // namespace
}  // namespace kvfabric
