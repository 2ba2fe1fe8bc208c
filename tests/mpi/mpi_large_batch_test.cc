// mpi label, 2 ranks: batches above 2^31 bytes (the int count of MPI), as many blocks in one
// message, as a message per block (the default for large blocks) and as one block larger than
// 2 GiB, arrive bit-exact. About 2 GiB of host memory per rank.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <vector>

#include "mpi/mpi_env.h"

namespace kvfabric {
namespace {

// A pattern cheap enough for gigabytes (one multiply-add per 8 bytes; every word of a block
// differs from every other word of all blocks of the test), written or checked in the same pass
// that computes the block's checksum.
uint64_t word(uint64_t block, uint64_t i) {
  return (block + 1) * 0x9e3779b97f4a7c15ull + i * 0xbf58476d1ce4e5b9ull;
}
uint64_t fill_and_sum(uint8_t* p, uint64_t bytes, uint64_t block) {
  auto* w = reinterpret_cast<uint64_t*>(p);  // blocks start page-aligned
  uint64_t h = 0;
  for (uint64_t i = 0; i < bytes / 8; ++i) {
    w[i] = word(block, i);
    h = (h ^ w[i]) * 0x100000001b3ull;
  }
  for (uint64_t i = bytes / 8 * 8; i < bytes; ++i) {
    p[i] = static_cast<uint8_t>(i);
    h = (h ^ p[i]) * 0x100000001b3ull;
  }
  return h;
}
// Returns the checksum; `wrong` counts the 8-byte words (and tail bytes) not as written.
uint64_t check_and_sum(const uint8_t* p, uint64_t bytes, uint64_t block, uint64_t& wrong) {
  const auto* w = reinterpret_cast<const uint64_t*>(p);
  uint64_t h = 0;
  for (uint64_t i = 0; i < bytes / 8; ++i) {
    wrong += w[i] != word(block, i);
    h = (h ^ w[i]) * 0x100000001b3ull;
  }
  for (uint64_t i = bytes / 8 * 8; i < bytes; ++i) {
    wrong += p[i] != static_cast<uint8_t>(i);
    h = (h ^ p[i]) * 0x100000001b3ull;
  }
  return h;
}

class MpiLargeBatchTest : public ::testing::Test {
 protected:
  // R0 sends `count` blocks of `block_bytes` to R1, placed in reverse order in both arenas so no
  // two blocks merge into one run; R1 checks every byte and each block's checksum against R0's.
  void move(uint64_t count, uint64_t block_bytes, Transport& t = testing::mpi_transport()) {
    const int me = t.rank().value;
    if (me > 1) {
      EXPECT_TRUE(t.barrier().ok());
      return;
    }
    const uint64_t stride = (block_bytes + 4095) / 4096 * 4096;
    std::unique_ptr<uint8_t[]> arena(new uint8_t[count * stride]);
    std::vector<uint8_t*> blocks;
    for (uint64_t i = 0; i < count; ++i)
      blocks.push_back(arena.get() + (count - 1 - i) * stride);
    std::vector<uint64_t> sums(count);
    if (me == 0) {
      for (uint64_t i = 0; i < count; ++i)
        sums[i] = fill_and_sum(blocks[i], block_bytes, i);
    }
    const BlockBatch batch{RankId{1 - me}, blocks, block_bytes};
    const Status s =
        me == 0 ? t.exchange_blocks({&batch, 1}, {}) : t.exchange_blocks({}, {&batch, 1});
    EXPECT_TRUE(s.ok()) << s;
    // R0's checksums go to R1 through the transport's broadcast.
    std::vector<uint8_t> bytes(count * sizeof(uint64_t));
    std::memcpy(bytes.data(), sums.data(), bytes.size());
    EXPECT_TRUE(t.broadcast(bytes, RankId{0}).ok());
    if (me == 1) {
      std::memcpy(sums.data(), bytes.data(), bytes.size());
      for (uint64_t i = 0; i < count; ++i) {
        uint64_t wrong = 0;
        EXPECT_EQ(check_and_sum(blocks[i], block_bytes, i, wrong), sums[i]) << "block " << i;
        EXPECT_EQ(wrong, 0u) << "block " << i;
      }
    }
    EXPECT_TRUE(t.barrier().ok());
  }
};

TEST_F(MpiLargeBatchTest, TwoGiBOfBlocksInOneBatch) {
  // 2^31 + 128 bytes in one message: the default sends blocks of 1 MiB and more one by one.
  auto one_message = make_mpi_transport(testing::mpi_runtime(), {.block_message_min_bytes = 0});
  ASSERT_TRUE(one_message.ok()) << one_message.status();
  move(2, (uint64_t{1} << 30) + 64, **one_message);
}

TEST_F(MpiLargeBatchTest, OneBlockAboveTwoGiB) {
  move(1, (uint64_t{1} << 31) + 4096 + 24);  // a block type built from 2^30-byte chunks
}

TEST_F(MpiLargeBatchTest, TwoGiBOfBlocksOneMessageEach) {
  move(2, (uint64_t{1} << 30) + 64);  // the default: a message per block of 1 MiB or more
}

}  // namespace
}  // namespace kvfabric
