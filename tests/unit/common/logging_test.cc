#include <gtest/gtest.h>

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

}  // namespace
}  // namespace kvfabric
