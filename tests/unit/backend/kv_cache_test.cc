// The seed ferrum KvCache (seed-semantics.md §B4, §D8, §E4, §F5) on kvfabric's layout.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

#include "kvfabric/backend/kv_cache.h"
#include "kvfabric/backend/kv_storage.h"
#include "testing/backend_fixture.h"
#include "testing/kv_reference.h"

namespace kvfabric {
namespace {

KvCacheOptions options(uint32_t heads, uint32_t head_dim, uint32_t block_size, uint32_t capacity,
                       uint64_t blocks, DType dtype = DType::kF32) {
  KvCacheOptions o;
  o.num_layers = 2;
  o.num_kv_heads = heads;
  o.head_dim = head_dim;
  o.dtype = dtype;
  o.block_size = block_size;
  o.capacity = capacity;
  o.pool_blocks = blocks;
  return o;
}

// Runs one prefill of `len` tokens and one decode step through a cache; returns the decode output.
std::vector<float> run_prefill_and_decode(KvCache& cache, uint32_t heads, uint32_t q_heads,
                                          uint32_t hd, uint32_t len, uint32_t seed) {
  std::mt19937 rng(seed);
  EXPECT_TRUE(cache.ensure(7).ok());
  std::vector<float> out;
  for (uint32_t step_tokens : {len, 1u}) {
    for (uint32_t layer = 0; layer < 2; ++layer) {
      const auto k = testing::random_normal(uint64_t{step_tokens} * heads * hd, rng);
      const auto v = testing::random_normal(uint64_t{step_tokens} * heads * hd, rng);
      // The prefill attends with its last few tokens only: the full causal square of a 2k-token
      // prompt would make this a benchmark, not a test.
      const uint32_t q_len = std::min(step_tokens, 4u);
      const auto q = testing::random_normal(uint64_t{q_len} * q_heads * hd, rng);
      EXPECT_TRUE(cache.append(7, layer, k.data(), v.data(), DType::kF32, step_tokens).ok());
      out.assign(q.size(), 0.0f);
      const Status s = cache.attention(7, layer, q.data(), DType::kF32, q_len, q_heads, out.data(),
                                       1.0f / std::sqrt(static_cast<float>(hd)));
      EXPECT_TRUE(s.ok()) << s;
    }
    EXPECT_TRUE(cache.advance(7).ok());
  }
  return out;
}

struct PagedVsContiguousCase {
  uint32_t q_heads, kv_heads, head_dim, len, block_size;
};

class PagedVsContiguous : public ::testing::TestWithParam<PagedVsContiguousCase> {};

// Seed F5 (Metal paged_attention_test): paged decode equals contiguous; here the outputs are
// identical, since both layouts run the same kernel on the same values.
TEST_P(PagedVsContiguous, IdenticalAttentionOutput) {
  const auto c = GetParam();
  auto backend = testing::cpu_backend(CpuIsa::kAuto);
  auto paged =
      KvCache::create(*backend, options(c.kv_heads, c.head_dim, c.block_size, 4096, 512)).value();
  auto contiguous = KvCache::create(*backend, options(c.kv_heads, c.head_dim, 0, 4096, 4)).value();
  EXPECT_TRUE(paged.is_paged());
  EXPECT_FALSE(contiguous.is_paged());
  const auto a = run_prefill_and_decode(paged, c.kv_heads, c.q_heads, c.head_dim, c.len, 42);
  const auto b = run_prefill_and_decode(contiguous, c.kv_heads, c.q_heads, c.head_dim, c.len, 42);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i)
    ASSERT_NEAR(a[i], b[i], 1e-6f) << i;
  EXPECT_EQ(paged.len(7).value(), c.len + 1);
  // Blocks were taken on demand: exactly ceil(len + 1 / block_size).
  EXPECT_EQ(512 - paged.free_blocks(), (c.len + 1 + c.block_size - 1) / c.block_size);
}

INSTANTIATE_TEST_SUITE_P(SeedCases, PagedVsContiguous,
                         ::testing::Values(PagedVsContiguousCase{8, 2, 128, 50, 16},
                                           PagedVsContiguousCase{32, 8, 128, 2049, 16},
                                           PagedVsContiguousCase{4, 4, 64, 33, 1}));

TEST(KvCache, ShuffledBlockTableMatchesContiguousReference) {
  // Seed F5: logical blocks 0..3 -> physical 5, 2, 7, 1 of an 8-block pool.
  auto backend = testing::cpu_backend(CpuIsa::kAuto);
  const uint32_t hd = 64, heads = 1, len = 60;
  std::mt19937 rng(3);
  const auto k = testing::random_normal(uint64_t{len} * hd, rng);
  const auto v = testing::random_normal(uint64_t{len} * hd, rng);
  const auto q = testing::random_normal(hd, rng);
  auto pool = testing::TestPool::create(*backend, 1, heads, 16, hd, DType::kF32, 0, 8);
  const uint32_t table[4] = {5, 2, 7, 1};
  std::vector<int64_t> slots(len);
  for (uint32_t t = 0; t < len; ++t)
    slots[t] = int64_t{table[t / 16]} * 16 + t % 16;
  ASSERT_TRUE(
      backend->append_kv(pool.view, {0, k.data(), v.data(), DType::kF32, len, slots.data()}).ok());
  std::vector<float> out(hd);
  DecodeAttentionArgs args;
  args.query = q.data();
  args.output = out.data();
  args.num_seqs = 1;
  args.num_q_heads = 1;
  args.block_tables = table;
  args.max_blocks_per_seq = 4;
  args.context_lens = &len;
  args.softmax_scale = 0.125f;
  ASSERT_TRUE(backend->paged_decode_attention(pool.view, args).ok());

  // The same context stored contiguously, in fp64.
  std::vector<double> qd(q.begin(), q.end());
  std::vector<double> kd(k.begin(), k.end()), vd(v.begin(), v.end());
  const auto ref = testing::ref_attention(qd, kd.data(), vd.data(), len, hd, 0.125);
  for (uint32_t d = 0; d < hd; ++d)
    EXPECT_NEAR(out[d], ref[d], 1e-5);
}

TEST(KvCache, PoolExhaustionIsAnErrorAndChangesNothing) {
  auto backend = testing::cpu_backend(CpuIsa::kAuto);
  auto cache = KvCache::create(*backend, options(1, 64, 16, 256, 3)).value();
  std::vector<float> kv(40 * 64, 0.25f);
  ASSERT_TRUE(cache.ensure(1).ok());
  ASSERT_TRUE(cache.ensure(1).ok());                                            // idempotent
  ASSERT_TRUE(cache.append(1, 0, kv.data(), kv.data(), DType::kF32, 40).ok());  // 3 blocks
  ASSERT_TRUE(cache.ensure(2).ok());
  const Status s = cache.append(2, 0, kv.data(), kv.data(), DType::kF32, 1);
  EXPECT_EQ(s.code(), ErrorCode::kOutOfMemory);
  EXPECT_EQ(cache.free_blocks(), 0u);
  EXPECT_EQ(cache.block_table(2).value()[0], kInvalidBlockId.value);
  // A failed write gives back the blocks it took.
  std::vector<float> bad(8 * 64, 1.0f);
  bad[3] = NAN;
  ASSERT_TRUE(cache.release(1).ok());
  EXPECT_EQ(cache.append(2, 0, bad.data(), bad.data(), DType::kF32, 8).code(),
            ErrorCode::kInvalidArgument);
  EXPECT_EQ(cache.free_blocks(), 3u);
}

TEST(KvCache, ResetReleasesEveryBlock) {
  auto backend = testing::cpu_backend(CpuIsa::kAuto);
  auto cache = KvCache::create(*backend, options(2, 64, 16, 512, 64)).value();
  std::vector<float> kv(100 * 2 * 64, 0.5f);
  for (uint64_t id = 0; id < 5; ++id) {
    ASSERT_TRUE(cache.ensure(id).ok());
    for (uint32_t layer = 0; layer < 2; ++layer) {
      ASSERT_TRUE(cache.append(id, layer, kv.data(), kv.data(), DType::kF32, 100).ok());
    }
    ASSERT_TRUE(cache.advance(id).ok());
  }
  EXPECT_EQ(cache.free_blocks(), 64u - 5 * 7);
  cache.reset();
  EXPECT_EQ(cache.free_blocks(), 64u);
  EXPECT_EQ(cache.num_sequences(), 0u);
  EXPECT_EQ(cache.len(0).status().code(), ErrorCode::kSequenceNotFound);
}

TEST(KvCache, StepProtocolAndTruncate) {
  auto backend = testing::cpu_backend(CpuIsa::kAuto);
  auto cache = KvCache::create(*backend, options(1, 64, 4, 32, 16)).value();
  std::vector<float> kv(20 * 64, 0.5f), q(64), out(64);
  ASSERT_TRUE(cache.ensure(1).ok());
  ASSERT_TRUE(cache.append(1, 0, kv.data(), kv.data(), DType::kF32, 10).ok());
  // Layer 1 has written nothing yet: attention and advance are refused.
  EXPECT_EQ(cache.attention(1, 1, q.data(), DType::kF32, 1, 1, out.data(), 1.0f).code(),
            ErrorCode::kInvalidArgument);
  const Status mismatch = cache.advance(1);
  EXPECT_NE(mismatch.message().find("layer 1 wrote 0"), std::string::npos) << mismatch;
  ASSERT_TRUE(cache.append(1, 1, kv.data(), kv.data(), DType::kF32, 10).ok());
  EXPECT_EQ(cache.truncate(1, 2).code(), ErrorCode::kInvalidOperation);  // mid-step
  ASSERT_TRUE(cache.advance(1).ok());
  EXPECT_EQ(cache.len(1).value(), 10u);
  EXPECT_EQ(16 - cache.free_blocks(), 3u);
  ASSERT_TRUE(cache.truncate(1, 5).ok());  // the seed never gave blocks back here
  EXPECT_EQ(cache.len(1).value(), 5u);
  EXPECT_EQ(16 - cache.free_blocks(), 2u);
  const auto table = cache.block_table(1).value();
  EXPECT_EQ(table.size(), 8u);
  EXPECT_EQ(table[2], kInvalidBlockId.value);  // padding is never a real block
  // Capacity (32 tokens) is enforced, not rounded up to whole blocks.
  EXPECT_NE(cache.append(1, 0, kv.data(), kv.data(), DType::kF32, 28).message().find("capacity"),
            std::string::npos);
  EXPECT_EQ(cache.append(9, 0, kv.data(), kv.data(), DType::kF32, 1).code(),
            ErrorCode::kSequenceNotFound);
  EXPECT_EQ(cache.append(1, 2, kv.data(), kv.data(), DType::kF32, 1).code(),
            ErrorCode::kInvalidArgument);
}

// Regression: the blocks a sequence may take were computed in 32 bits, so a capacity near 2^32
// gave 0 of them and attention wrote the sequence's blocks past a table of that size.
TEST(KvCache, ACapacityNear2To32Works) {
  auto backend = testing::cpu_backend(CpuIsa::kAuto);
  auto cache = KvCache::create(*backend, options(1, 8, 16, UINT32_MAX, 4));
  ASSERT_TRUE(cache.ok()) << cache.status();
  EXPECT_EQ(cache->max_blocks_per_seq(), uint32_t{1} << 28);
  ASSERT_TRUE(cache->ensure(1).ok());
  const std::vector<float> kv(20 * 8, 0.5f), q(8, 1.0f);
  std::vector<float> out(8, 0.0f);
  for (uint32_t layer = 0; layer < 2; ++layer) {
    ASSERT_TRUE(cache->append(1, layer, kv.data(), kv.data(), DType::kF32, 20).ok());
    ASSERT_TRUE(cache->attention(1, layer, q.data(), DType::kF32, 1, 1, out.data(), 1.0f).ok());
    EXPECT_FLOAT_EQ(out[3], 0.5f);  // every value row is 0.5
  }
}

TEST(KvStorage, LayerGroupsFromConfig) {
  Config config = load_config_file(std::string(KVF_SOURCE_DIR) + "/configs/tiny-cpu.yaml").value();
  config.model.num_layers = 5;
  config.cache.layers_per_group = 2;
  config.cache.host_num_blocks = 8;
  config.cache.kv_dtype = DType::kInt4;
  config.cache.quant_group_size = 32;
  const auto spec = KvStorageSpec::from_config(config).value();
  ASSERT_EQ(spec.groups.size(), 3u);
  EXPECT_EQ(spec.groups[2].num_layers, 1u);
  auto backend = testing::cpu_backend(CpuIsa::kAuto);
  const auto storage = KvStorage::create(*backend, spec).value();
  EXPECT_EQ(storage.num_layers(), 5u);
  const auto where = storage.locate(3).value();
  EXPECT_EQ(where.group, 1u);
  EXPECT_EQ(where.layer, 1u);
  EXPECT_EQ(storage.view(2, Tier::kDevice).first_layer, 4u);
  EXPECT_EQ(storage.view(1, Tier::kHost).num_blocks, 8u);
  EXPECT_EQ(storage.view(0, Tier::kDevice).num_blocks, 256u);
  EXPECT_EQ(storage.layout(0).block_bytes(), 2 * storage.layout(2).block_bytes());
  EXPECT_EQ(storage.bytes(Tier::kDevice), 256 * (2 + 2 + 1) * storage.layout(2).block_bytes());
  EXPECT_EQ(storage.locate(5).status().code(), ErrorCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvfabric
