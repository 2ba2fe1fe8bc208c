// Configs this host cannot afford are refused with the bytes they would need, before anything is
// allocated: a pool of 2^32 - 1 blocks used to abort with an uncaught std::bad_alloc.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/host_memory.h"
#include "kvfabric/backend/backend.h"
#include "kvfabric/block/paged_kv_cache.h"
#include "kvfabric/coordinator/coordinator.h"
#include "testing/backend_fixture.h"
#include "testing/serving_harness.h"

namespace kvfabric {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kMaxBlocks = 4294967295;  // 2^32 - 1, the largest pool a config may ask for

// The block tables of a pool of kMaxBlocks need 32 GiB (allocator) to 68 GiB (with the prefix
// index): refused on hosts with less memory, which these checks need to be meaningful.
bool host_is_smaller_than(uint64_t bytes) {
  const uint64_t memory = detail::host_memory_bytes();
  return memory != 0 && memory < bytes;
}

// 1,024 replicas of the largest pool: 68 TiB of tables, more than any host holds.
TEST(AffordabilityTest, ACoordinatorWhoseBlockTablesDoNotFitIsRefused) {
  Config config = testing::serving_config(1024, 1, 4, 2, kMaxBlocks, 0);
  config.model.num_layers = 1;
  config.model.head_dim = 4;
  config.cache.block_size = 1;
  ASSERT_TRUE(validate(config).ok());
  const auto created = Coordinator::create(config);
  ASSERT_FALSE(created.ok());
  EXPECT_EQ(created.status().code(), ErrorCode::kResourceExhausted);
  // The tables, and 128 MiB of the filter behind the miss causes (CoordinatorStats::missed).
  EXPECT_THAT(created.status().message(),
              HasSubstr("the coordinator's block tables (topology.dp 1024 x cache.num_blocks "
                        "4294967295 device + cache.host_num_blocks 0 host blocks): 74766924889088 "
                        "bytes of host memory needed, this host has"));
}

TEST(AffordabilityTest, ABlockManagerWhoseTablesDoNotFitIsRefused) {
  if (!host_is_smaller_than(kMaxBlocks * BlockAllocator::kBytesPerBlock)) {
    GTEST_SKIP() << "this host holds the tables";
  }
  const auto seed = PagedKvCache::create(kMaxBlocks, 16, 8, 128);
  EXPECT_EQ(seed.status().code(), ErrorCode::kResourceExhausted);
  EXPECT_THAT(seed.status().message(), HasSubstr("a block manager of 4294967295 blocks: 34359738360 bytes"));
  // The seed-style constructor keeps the error instead of throwing.
  const PagedKvCache unusable(kMaxBlocks, 16, 8, 128);
  EXPECT_EQ(unusable.init_status().code(), ErrorCode::kResourceExhausted);
  EXPECT_EQ(unusable.total_blocks(), 0u);
}

TEST(AffordabilityTest, ACpuArenaLargerThanTheHostIsRefused) {
  const auto backend = testing::cpu_backend(CpuIsa::kGeneric);
  const uint64_t petabyte = uint64_t{1} << 50;
  ASSERT_TRUE(host_is_smaller_than(petabyte));
  const auto arena = backend->allocate_arena(petabyte, Tier::kHost);
  EXPECT_EQ(arena.status().code(), ErrorCode::kResourceExhausted);
  EXPECT_THAT(arena.status().message(),
              HasSubstr("cpu backend: the host tier's arena: 1125899906842624 bytes of host memory needed"));
  EXPECT_TRUE(backend->allocate_arena(1 << 20, Tier::kDevice).ok());
}

}  // namespace
}  // namespace kvfabric
