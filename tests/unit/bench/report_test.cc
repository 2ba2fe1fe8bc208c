// --json results: a plain file is replaced whole or not at all, keeping its permissions; links
// and files with other hard links are written in place.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "bench/report.h"

namespace kvfabric::bench {
namespace {

namespace fs = std::filesystem;

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

class JsonResults : public ::testing::Test {
 protected:
  void SetUp() override {
    folder_ = fs::temp_directory_path() /
              ("kvf_report_test_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
               "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(folder_);
    fs::create_directories(folder_);
  }
  void TearDown() override { fs::remove_all(folder_); }

  // Every file of the folder: what a run leaves behind.
  [[nodiscard]] size_t files() const {
    return static_cast<size_t>(std::distance(fs::directory_iterator(folder_), {}));
  }

  fs::path folder_;
};

TEST_F(JsonResults, ReplaceAPlainFileWholeAndLeaveNothingElse) {
  const fs::path path = folder_ / "results.json";
  ASSERT_TRUE(write_json(path.string(), {{"routine", "first"}, {"runs", {1, 2, 3}}}).ok());
  ASSERT_TRUE(write_json(path.string(), {{"routine", "second"}}).ok());
  EXPECT_EQ(nlohmann::json::parse(read_file(path)), (nlohmann::json{{"routine", "second"}}));
  EXPECT_EQ(files(), 1u);
}

TEST_F(JsonResults, AFailedWriteLeavesThePreviousResults) {
  const fs::path path = folder_ / "results.json";
  ASSERT_TRUE(write_json(path.string(), {{"routine", "first"}}).ok());
  const std::string before = read_file(path);
  // The file the new results would be written to first cannot be opened (a folder is there).
  fs::create_directory(json_scratch_path(path.string()));
  const Status failed = write_json(path.string(), {{"routine", "second"}});
  EXPECT_EQ(failed.code(), ErrorCode::kIoError);
  EXPECT_NE(failed.message().find(path.string()), std::string::npos) << failed.message();
  EXPECT_EQ(read_file(path), before);
}

TEST_F(JsonResults, AReplacedFileKeepsItsPermissions) {
  const fs::path path = folder_ / "results.json";
  ASSERT_TRUE(write_json(path.string(), {{"routine", "first"}}).ok());
  const auto shared = fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read |
                      fs::perms::group_write | fs::perms::others_read;
  fs::permissions(path, shared);
  ASSERT_TRUE(write_json(path.string(), {{"routine", "second"}}).ok());
  EXPECT_EQ(fs::status(path).permissions(), shared);
  EXPECT_EQ(nlohmann::json::parse(read_file(path)), (nlohmann::json{{"routine", "second"}}));
}

TEST_F(JsonResults, AFileWithAnotherHardLinkIsWrittenInPlace) {
  const fs::path path = folder_ / "results.json", other = folder_ / "other.json";
  ASSERT_TRUE(write_json(path.string(), {{"routine", "first"}}).ok());
  fs::create_hard_link(path, other);
  ASSERT_TRUE(write_json(path.string(), {{"routine", "second"}}).ok());
  EXPECT_EQ(fs::hard_link_count(path), 2u);
  EXPECT_EQ(nlohmann::json::parse(read_file(other)), (nlohmann::json{{"routine", "second"}}));
}

TEST_F(JsonResults, ALinkIsWrittenThroughNotReplaced) {
  const fs::path target = folder_ / "target.json", link = folder_ / "link.json";
  ASSERT_TRUE(write_json(target.string(), {{"routine", "first"}}).ok());
  fs::create_symlink(target, link);
  ASSERT_TRUE(write_json(link.string(), {{"routine", "second"}}).ok());
  EXPECT_TRUE(fs::is_symlink(link));
  EXPECT_EQ(nlohmann::json::parse(read_file(target)), (nlohmann::json{{"routine", "second"}}));
}

}  // namespace
}  // namespace kvfabric::bench
