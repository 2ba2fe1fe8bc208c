// gpu label: the NCCL transport on one rank (bootstrapped by the local transport) sends blocks
// to itself through the pack kernel, an NCCL send/receive pair and the unpack kernel, and they
// arrive bit-exact; a RankCache on that rank executes step plans as the CPU backend does. Skips with the reason when there is no device (or no NCCL in the build).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>

#include "kvfabric/backend/cuda_backend.h"
#include "kvfabric/runtime/rank_cache.h"
#include "kvfabric/transport/nccl_transport.h"
#include "testing/block_pattern.h"
#include "testing/serving_harness.h"

namespace kvfabric {
namespace {

using ::testing::HasSubstr;

class NcclTransportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!nccl_transport_built()) GTEST_SKIP() << "kvfabric was built without NCCL";
    auto cuda = make_cuda_backend();
    if (!cuda.ok()) GTEST_SKIP() << "no CUDA backend: " << cuda.status().message();
    cuda_ = std::move(cuda).value();
    bootstrap_ = make_local_transport();
    auto nccl = make_nccl_transport(*bootstrap_, {.device = 0});
    ASSERT_TRUE(nccl.ok()) << nccl.status();
    nccl_ = std::move(nccl).value();
  }

  // A device (or pinned host) arena of `count` blocks with shuffled block addresses.
  struct Arena {
    KvArena memory;
    uint64_t stride = 0;
    std::vector<uint8_t*> blocks;
  };
  Arena make_arena(uint64_t count, uint64_t block_bytes, Tier tier, uint64_t seed, uint8_t marker) {
    Arena a;
    a.stride = (block_bytes + 15) / 16 * 16;
    a.memory = cuda_->allocate_arena(count * a.stride, tier).value();
    std::vector<uint8_t> fill(count * a.stride, marker);
    EXPECT_TRUE(cuda_->upload(a.memory.data(), fill.data(), fill.size()).ok());
    std::vector<uint64_t> order(count);
    std::iota(order.begin(), order.end(), uint64_t{0});
    std::mt19937_64 rng(seed);
    std::shuffle(order.begin(), order.end(), rng);
    for (uint64_t i : order)
      a.blocks.push_back(a.memory.data() + i * a.stride);
    return a;
  }
  std::vector<uint8_t> read(const Arena& a) {
    std::vector<uint8_t> out(a.memory.bytes());
    EXPECT_TRUE(cuda_->download(out.data(), a.memory.data(), out.size()).ok());
    return out;
  }

  std::unique_ptr<Backend> cuda_;
  std::unique_ptr<Transport> bootstrap_;
  std::unique_ptr<Transport> nccl_;
};

TEST_F(NcclTransportTest, Identity) {
  EXPECT_EQ(nccl_->name(), "nccl");
  EXPECT_EQ(nccl_->rank(), RankId{0});
  EXPECT_EQ(nccl_->world_size(), 1);
  std::vector<uint64_t> all;
  EXPECT_TRUE(nccl_->all_gather(42, all).ok());
  EXPECT_EQ(all, (std::vector<uint64_t>{42}));
  EXPECT_TRUE(nccl_->barrier().ok());
}

TEST_F(NcclTransportTest, SelfExchangeMovesBlocksBitExact) {
  // Batches of different block sizes, one empty, one not 16-byte aligned (the byte path of the
  // kernel), the last into pinned host memory; two exchanges (the staging buffers grow).
  struct Shape {
    uint64_t count, bytes;
    Tier dst_tier;
  };
  for (const uint64_t round : {1, 2}) {
    const std::vector<Shape> shapes = {{64, 16384 * round, Tier::kDevice},
                                       {0, 64, Tier::kDevice},
                                       {7, 100, Tier::kDevice},
                                       {33, 65536, Tier::kHost}};
    std::vector<Arena> src, dst;
    std::vector<BlockBatch> sends, recvs;
    constexpr uint64_t kSpare = 2;
    for (size_t b = 0; b < shapes.size(); ++b) {
      const auto [count, bytes, tier] = shapes[b];
      src.push_back(make_arena(count + kSpare, bytes, Tier::kDevice, 10 * round + b, 0x11));
      dst.push_back(make_arena(count + kSpare, bytes, tier, 20 * round + b, 0x22));
      // Patterns written through the host, block by block.
      std::vector<uint8_t> block(bytes);
      for (uint64_t i = 0; i < count; ++i) {
        testing::fill_pattern(block.data(), bytes, testing::block_seed(0, 0, b, i, round));
        ASSERT_TRUE(cuda_->upload(src.back().blocks[i], block.data(), bytes).ok());
      }
    }
    for (size_t b = 0; b < shapes.size(); ++b) {
      sends.push_back(
          {RankId{0}, std::span(src[b].blocks).first(shapes[b].count), shapes[b].bytes});
      recvs.push_back(
          {RankId{0}, std::span(dst[b].blocks).first(shapes[b].count), shapes[b].bytes});
    }
    const Status s = nccl_->exchange_blocks(sends, recvs);
    ASSERT_TRUE(s.ok()) << s;
    for (size_t b = 0; b < shapes.size(); ++b) {
      const auto [count, bytes, tier] = shapes[b];
      const std::vector<uint8_t> got = read(dst[b]);
      const std::vector<uint8_t> sent = read(src[b]);
      for (uint64_t i = 0; i < count + kSpare; ++i) {
        const uint64_t at = dst[b].blocks[i] - dst[b].memory.data();
        if (i < count) {
          EXPECT_TRUE(
              testing::has_pattern(got.data() + at, bytes, testing::block_seed(0, 0, b, i, round)))
              << "round " << round << " batch " << b << " block " << i;
          const uint64_t from = src[b].blocks[i] - src[b].memory.data();
          EXPECT_EQ(testing::checksum(got.data() + at, bytes),
                    testing::checksum(sent.data() + from, bytes));
        } else {
          EXPECT_EQ(got[at], 0x22) << "a slot outside the batch was written";
        }
      }
    }
  }
}

TEST_F(NcclTransportTest, RefusesMemoryTheDeviceCannotAddress) {
  Arena dst = make_arena(4, 4096, Tier::kDevice, 1, 0x33);
  std::vector<uint8_t> pageable(4 * 4096, 0x44);
  std::vector<uint8_t*> host_blocks;
  for (int i = 0; i < 4; ++i)
    host_blocks.push_back(pageable.data() + i * 4096);
  const BlockBatch send{RankId{0}, host_blocks, 4096};
  const BlockBatch recv{RankId{0}, dst.blocks, 4096};
  const Status s = nccl_->exchange_blocks({&send, 1}, {&recv, 1});
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument) << s;
  EXPECT_THAT(s.message(), HasSubstr("send batch 0 to R0 (4 blocks of 4096 bytes): block 0"));
  EXPECT_THAT(s.message(), HasSubstr("pageable host memory"));
  const std::vector<uint8_t> after = read(dst);
  EXPECT_TRUE(std::all_of(after.begin(), after.end(), [](uint8_t v) { return v == 0x33; }));
}

TEST_F(NcclTransportTest, RefusesBadBatchesLikeEveryTransport) {
  Arena a = make_arena(4, 256, Tier::kDevice, 1, 0), b = make_arena(4, 256, Tier::kDevice, 2, 0);
  const BlockBatch to_peer{RankId{1}, a.blocks, 256};
  const BlockBatch from_self{RankId{0}, b.blocks, 256};
  Status s = nccl_->exchange_blocks({&to_peer, 1}, {&from_self, 1});
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("nccl transport R0 (device 0): send batch 0 to R1"));
  const BlockBatch three{RankId{0}, std::span(b.blocks).first(3), 256};
  const BlockBatch four{RankId{0}, a.blocks, 256};
  s = nccl_->exchange_blocks({&four, 1}, {&three, 1});
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("does not match"));
  // Still usable.
  EXPECT_TRUE(nccl_->exchange_blocks({&four, 1}, {&from_self, 1}).ok());
}

// A step plan on one GPU rank (CUDA backend, NCCL transport): swaps between the device pool and
// the pinned host tier, and token copies, over several waves, leave every byte of both pools as
// the CPU backend leaves them. Two steps, so the backend's staging buffers are reused.
TEST_F(NcclTransportTest, APlanRunsOnTheGpuRankAsOnTheCpu) {
  using Op = StepPlan::Op;
  const Config config = testing::serving_config(1, 1, 4, 2, 16, 8);
  auto cpu_backend = make_cpu_backend();
  ASSERT_TRUE(cpu_backend.ok());
  auto local = make_local_transport();
  auto on_cpu = RankCache::create(config, 0, **cpu_backend, *local);
  auto on_gpu = RankCache::create(config, 0, *cuda_, *nccl_);
  ASSERT_TRUE(on_cpu.ok()) << on_cpu.status();
  ASSERT_TRUE(on_gpu.ok()) << on_gpu.status();
  auto bytes_of = [](const PagedKvView& pool) { return pool.num_blocks * pool.block_bytes; };
  for (const Tier tier : {Tier::kDevice, Tier::kHost}) {
    const PagedKvView& cpu_pool = (*on_cpu)->storage().view(0, tier);
    std::vector<uint8_t> image(bytes_of(cpu_pool));
    testing::fill_pattern(image.data(), image.size(), tier == Tier::kDevice ? 7 : 8);
    std::memcpy(cpu_pool.block(0), image.data(), image.size());
    ASSERT_TRUE(cuda_->upload((*on_gpu)->storage().view(0, tier).block(0), image.data(), image.size()).ok());
  }
  const std::vector<std::vector<Op>> steps = {
      {Op::swap_out(0, BlockId{1}, BlockId{0}), Op::swap_out(0, BlockId{2}, BlockId{1}),
       Op::token_copy(0, TokenCopy{BlockId{3}, 0, BlockId{1}, 0, 16, CopyReason::kCopyOnWrite}),
       Op::swap_in(0, BlockId{0}, BlockId{5}), Op::swap_in(0, BlockId{1}, BlockId{2}),
       Op::token_copy(0, TokenCopy{BlockId{4}, 3, BlockId{6}, 5, 9, CopyReason::kCompaction}),
       Op::swap_out(0, BlockId{5}, BlockId{2})},
      {Op::swap_in(0, BlockId{2}, BlockId{9}), Op::swap_out(0, BlockId{9}, BlockId{7}),
       Op::token_copy(0, TokenCopy{BlockId{9}, 2, BlockId{9}, 0, 14, CopyReason::kCompaction}),
       Op::swap_out(0, BlockId{15}, BlockId{3})}};
  for (size_t step = 0; step < steps.size(); ++step) {
    StepPlan plan;
    plan.step = step;
    plan.ops = steps[step];
    const std::vector<uint32_t> waves = plan_waves(plan.ops);
    ASSERT_GT(*std::max_element(waves.begin(), waves.end()), 0u) << "the plan must have waves";
    ASSERT_TRUE((*on_cpu)->execute(plan).ok());
    const Status ran = (*on_gpu)->execute(plan);
    ASSERT_TRUE(ran.ok()) << ran;
    for (const Tier tier : {Tier::kDevice, Tier::kHost}) {
      const PagedKvView& cpu_pool = (*on_cpu)->storage().view(0, tier);
      std::vector<uint8_t> got(bytes_of(cpu_pool));
      ASSERT_TRUE(cuda_->download(got.data(), (*on_gpu)->storage().view(0, tier).block(0), got.size()).ok());
      EXPECT_EQ(0, std::memcmp(got.data(), cpu_pool.block(0), got.size()))
          << "step " << step << (tier == Tier::kDevice ? ", device pool" : ", host pool");
    }
  }
}

// Where no device is usable (CI), setup fails with Unavailable and the reason, on every rank
// alike, instead of crashing or waiting.
TEST(NcclTransportSetup, WithoutADeviceSaysWhy) {
  if (!nccl_transport_built()) GTEST_SKIP() << "kvfabric was built without NCCL";
  if (make_cuda_backend().ok()) GTEST_SKIP() << "a CUDA device is present";
  auto bootstrap = make_local_transport();
  auto nccl = make_nccl_transport(*bootstrap);
  ASSERT_FALSE(nccl.ok());
  EXPECT_EQ(nccl.status().code(), ErrorCode::kUnavailable) << nccl.status();
  EXPECT_THAT(nccl.status().message(), HasSubstr("nccl transport R0: no usable CUDA device"));
  EXPECT_THAT(nccl.status().message(), HasSubstr("failed ranks: R0"));
}

}  // namespace
}  // namespace kvfabric
