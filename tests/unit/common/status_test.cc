#include <gtest/gtest.h>

#include <sstream>
#include <string>
#include <unordered_set>

#include "kvfabric/common/ids.h"
#include "kvfabric/common/status.h"

namespace kvfabric {
namespace {

TEST(Status, DefaultIsOk) {
  const Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), ErrorCode::kOk);
  EXPECT_EQ(s.to_string(), "OK");
}

TEST(Status, SeedErrorMessages) {
  EXPECT_EQ(out_of_memory(13, 10).message(), "Out of memory: requested 13 blocks, 10 available");
  EXPECT_EQ(out_of_memory(13, 10).code(), ErrorCode::kOutOfMemory);
  EXPECT_EQ(sequence_not_found(SeqId{999}).message(), "Sequence not found: S999");
  EXPECT_EQ(block_not_found(BlockId{7}).message(), "Block not found: B7");
  EXPECT_EQ(invalid_operation("x").message(), "Invalid operation: x");
  EXPECT_EQ(invalid_operation("x").code(), ErrorCode::kInvalidOperation);
  EXPECT_EQ(invalid_argument("bad").code(), ErrorCode::kInvalidArgument);
}

// A message that already says its error in words is not prefixed with the code name again.
TEST(Status, ToStringNamesTheErrorOnce) {
  EXPECT_EQ(sequence_not_found(SeqId{1}).to_string(), "Sequence not found: S1");
  EXPECT_EQ(out_of_memory(3, 2).to_string(), "Out of memory: requested 3 blocks, 2 available");
  const Status wrapped(ErrorCode::kOutOfMemory, "step 4: " + out_of_memory(3, 2).message());
  EXPECT_EQ(wrapped.to_string(), "step 4: Out of memory: requested 3 blocks, 2 available");
  EXPECT_EQ(invalid_argument("cache.block_size: 0 is not a power of two").to_string(),
            "InvalidArgument: cache.block_size: 0 is not a power of two");
  EXPECT_EQ(Status(ErrorCode::kOutOfMemory, "replica 2 is full").to_string(),
            "OutOfMemory: replica 2 is full");
  EXPECT_EQ(Status(ErrorCode::kUnavailable, "rank 3 did not answer").to_string(),
            "Unavailable: rank 3 did not answer");
  // The words inside a quoted name are not the message's own.
  EXPECT_EQ(Status(ErrorCode::kInvalidOperation, "tenant 'Invalid operation: x' is paused").to_string(),
            "InvalidOperation: tenant 'Invalid operation: x' is paused");
}

Result<int> half(int x) {
  if (x % 2 != 0) return invalid_argument(std::to_string(x) + " is odd");
  return x / 2;
}

Status quarter(int x, int* out) {
  KVF_ASSIGN_OR_RETURN(const int h, half(x));
  KVF_ASSIGN_OR_RETURN(*out, half(h));
  return ok_status();
}

TEST(Result, ValueAndError) {
  const Result<int> good = half(8);
  ASSERT_TRUE(good.ok());
  EXPECT_EQ(good.value(), 4);
  EXPECT_TRUE(good.status().ok());
  const Result<int> bad = half(3);
  EXPECT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().message(), "3 is odd");
  EXPECT_EQ(bad.value_or(-1), -1);
}

TEST(Result, MacrosPropagate) {
  int out = 0;
  EXPECT_TRUE(quarter(8, &out).ok());
  EXPECT_EQ(out, 2);
  const Status s = quarter(6, &out);  // 6 -> 3 is odd
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(s.message().find("3 is odd"), std::string::npos);
}

TEST(ResultDeathTest, ValueOfErrorAborts) {
  EXPECT_DEATH({ (void)half(3).value(); }, "3 is odd");
}

TEST(Ids, PrintWithPrefix) {
  std::ostringstream os;
  os << SeqId{42} << " " << BlockId{7} << " " << RankId{3};
  EXPECT_EQ(os.str(), "S42 B7 R3");
  EXPECT_EQ(to_string(SeqId{1}), "S1");
  EXPECT_EQ(to_string(BlockId{0}), "B0");
}

TEST(Ids, CompareAndHash) {
  EXPECT_LT(SeqId{1}, SeqId{2});
  EXPECT_EQ(BlockId{3}, BlockId{3});
  std::unordered_set<SeqId> ids{SeqId{1}, SeqId{2}, SeqId{1}};
  EXPECT_EQ(ids.size(), 2u);
  EXPECT_EQ(kInvalidBlockId.value, 0xFFFFFFFFu);
}

}  // namespace
}  // namespace kvfabric
