// The local transport (one process) and the batch rules every transport enforces
// (src/transport/batch_check.cc): copies are bit-exact, bad batches are refused by name and
// change nothing.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <vector>

#include "kvfabric/transport/mpi_transport.h"
#include "kvfabric/transport/nccl_transport.h"
#include "kvfabric/transport/transport.h"
#include "testing/block_pattern.h"

namespace kvfabric {
namespace {

using ::testing::HasSubstr;

class LocalTransportTest : public ::testing::Test {
 protected:
  std::unique_ptr<Transport> t_ = make_local_transport();
};

TEST_F(LocalTransportTest, Identity) {
  EXPECT_EQ(t_->name(), "local");
  EXPECT_EQ(t_->rank(), RankId{0});
  EXPECT_EQ(t_->world_size(), 1);
}

TEST_F(LocalTransportTest, CopiesScatteredBlocksBitExact) {
  // Three batches to itself of different block sizes (one empty, one of odd size), each from a
  // shuffled arena into another shuffled arena.
  const std::vector<std::pair<uint64_t, uint64_t>> shapes = {{37, 4096}, {0, 64}, {11, 333}};
  std::vector<testing::ScatteredArena> src, dst;
  std::vector<std::vector<uint8_t*>> src_blocks, dst_blocks;
  for (size_t b = 0; b < shapes.size(); ++b) {
    const auto [count, bytes] = shapes[b];
    src.emplace_back(count + 5, bytes, 10 + b, 0x11);
    dst.emplace_back(count + 5, bytes, 20 + b, 0x22);
    src_blocks.push_back(src.back().blocks(0, count));
    dst_blocks.push_back(dst.back().blocks(0, count));
    for (uint64_t i = 0; i < count; ++i)
      testing::fill_pattern(src_blocks[b][i], bytes, testing::block_seed(0, 0, b, i));
  }
  std::vector<BlockBatch> sends, recvs;
  for (size_t b = 0; b < shapes.size(); ++b) {
    sends.push_back({RankId{0}, src_blocks[b], shapes[b].second});
    recvs.push_back({RankId{0}, dst_blocks[b], shapes[b].second});
  }
  ASSERT_TRUE(t_->exchange_blocks(sends, recvs).ok());
  for (size_t b = 0; b < shapes.size(); ++b) {
    const auto [count, bytes] = shapes[b];
    for (uint64_t i = 0; i < count; ++i) {
      EXPECT_TRUE(testing::has_pattern(dst_blocks[b][i], bytes, testing::block_seed(0, 0, b, i)))
          << "batch " << b << " block " << i;
      EXPECT_EQ(testing::checksum(dst_blocks[b][i], bytes),
                testing::checksum(src_blocks[b][i], bytes));
    }
    // The slots not handed out keep their marker.
    for (uint64_t i = count; i < count + 5; ++i)
      EXPECT_EQ(dst[b].block(i)[0], 0x22);
  }
}

TEST_F(LocalTransportTest, EmptyExchangeIsANoOp) {
  EXPECT_TRUE(t_->exchange_blocks({}, {}).ok());
}

TEST_F(LocalTransportTest, CollectivesAreTrivial) {
  std::vector<uint8_t> bytes = {1, 2, 3};
  EXPECT_TRUE(t_->broadcast(bytes, RankId{0}).ok());
  EXPECT_EQ(bytes, (std::vector<uint8_t>{1, 2, 3}));
  EXPECT_TRUE(t_->barrier().ok());
  std::vector<uint64_t> all = {9, 9};
  EXPECT_TRUE(t_->all_gather(0xFFFF'FFFF'FFFF'FFF0ull, all).ok());
  EXPECT_EQ(all, (std::vector<uint64_t>{0xFFFF'FFFF'FFFF'FFF0ull}));
  const Status bad = t_->broadcast(bytes, RankId{1});
  EXPECT_EQ(bad.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(bad.message(), HasSubstr("R1"));
}

// Each bad exchange is refused with InvalidArgument naming the problem, and the receive blocks
// keep their bytes.
class BadBatchTest : public LocalTransportTest {
 protected:
  void expect_refused(std::span<const BlockBatch> sends, std::span<const BlockBatch> recvs,
                      const std::string& needle) {
    const std::vector<uint8_t> before = dst_.bytes();
    const Status s = t_->exchange_blocks(sends, recvs);
    EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument) << s;
    EXPECT_THAT(s.message(), HasSubstr(needle));
    EXPECT_THAT(s.message(), HasSubstr("local transport R0"));
    EXPECT_EQ(dst_.bytes(), before) << "a refused exchange wrote a block";
  }

  testing::ScatteredArena src_{8, 256, 1, 0x33};
  testing::ScatteredArena dst_{8, 256, 2, 0x44};
  std::vector<uint8_t*> four_src_ = src_.blocks(0, 4);
  std::vector<uint8_t*> four_dst_ = dst_.blocks(0, 4);
  std::vector<uint8_t*> three_dst_ = dst_.blocks(4, 3);
};

TEST_F(BadBatchTest, UnknownPeer) {
  const BlockBatch send{RankId{1}, four_src_, 256};
  const BlockBatch recv{RankId{0}, four_dst_, 256};
  expect_refused({&send, 1}, {&recv, 1},
                 "send batch 0 to R1 (4 blocks of 256 bytes): peer out of range (world size 1");
  const BlockBatch negative{RankId{-3}, four_dst_, 256};
  expect_refused({}, {&negative, 1}, "recv batch 0 from R-3");
}

TEST_F(BadBatchTest, MismatchedSelfBatches) {
  const BlockBatch send{RankId{0}, four_src_, 256};
  const BlockBatch fewer{RankId{0}, three_dst_, 256};
  expect_refused({&send, 1}, {&fewer, 1}, "does not match its recv batch 0 from R0 (3 blocks");
  const BlockBatch smaller{RankId{0}, four_dst_, 128};
  expect_refused({&send, 1}, {&smaller, 1}, "(4 blocks of 128 bytes)");
  expect_refused({&send, 1}, {}, "sends 1 batches to itself but receives 0");
}

TEST_F(BadBatchTest, ZeroSizedAndNullBlocks) {
  const BlockBatch zero{RankId{0}, four_src_, 0};
  expect_refused({&zero, 1}, {&zero, 1}, "4 blocks of 0 bytes");
  std::vector<uint8_t*> with_null = four_dst_;
  with_null[2] = nullptr;
  const BlockBatch send{RankId{0}, four_src_, 256};
  const BlockBatch recv{RankId{0}, with_null, 256};
  expect_refused({&send, 1}, {&recv, 1},
                 "recv batch 0 from R0 (4 blocks of 256 bytes): block 2 is null");
}

TEST_F(BadBatchTest, OverlappingReceives) {
  const BlockBatch send{RankId{0}, four_src_, 256};
  // Two received blocks share bytes.
  std::vector<uint8_t*> overlapping = four_dst_;
  overlapping[3] = overlapping[1] + 100;
  const BlockBatch recv{RankId{0}, overlapping, 256};
  expect_refused({&send, 1}, {&recv, 1}, "overlaps");
  // A received block is also a sent one.
  std::vector<uint8_t*> into_send = four_dst_;
  into_send[0] = four_src_[2];
  const BlockBatch recv2{RankId{0}, into_send, 256};
  expect_refused({&send, 1}, {&recv2, 1}, "send batch 0 to R0 (4 blocks of 256 bytes) block 2");
}

TEST_F(BadBatchTest, OverlappingSendsAreFine) {
  // The same block sent twice lands twice.
  std::vector<uint8_t*> twice = {four_src_[0], four_src_[0]};
  testing::fill_pattern(four_src_[0], 256, 77);
  const std::vector<uint8_t*> two_dst = dst_.blocks(0, 2);
  const BlockBatch send{RankId{0}, twice, 256};
  const BlockBatch recv{RankId{0}, two_dst, 256};
  ASSERT_TRUE(t_->exchange_blocks({&send, 1}, {&recv, 1}).ok());
  EXPECT_TRUE(testing::has_pattern(two_dst[0], 256, 77));
  EXPECT_TRUE(testing::has_pattern(two_dst[1], 256, 77));
}

TEST(TransportBuild, AbsentTransportsSaySo) {
  // Builds with MPI and NCCL test those factories in the mpi and gpu tests.
  if (mpi_transport_built() && nccl_transport_built()) GTEST_SKIP() << "MPI and NCCL are built";
  if (!mpi_transport_built()) {
    auto mpi = MpiRuntime::init(nullptr, nullptr);
    EXPECT_EQ(mpi.status().code(), ErrorCode::kUnimplemented);
  }
  if (!nccl_transport_built()) {
    auto local = make_local_transport();
    auto nccl = make_nccl_transport(*local);
    EXPECT_EQ(nccl.status().code(), ErrorCode::kUnimplemented);
    EXPECT_THAT(nccl.status().message(), HasSubstr("without NCCL"));
  }
}

}  // namespace
}  // namespace kvfabric
