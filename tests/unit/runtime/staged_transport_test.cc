// The host-staged transport (src/runtime/staged_transport.cc) over the local transport and the
// CPU backend, whose copies are memcpy: blocks arrive bit-exact through the staging buffer, runs
// of adjacent blocks move as one copy, a refused exchange copies and writes nothing, and the
// staging buffer is allocated once per size it grows to, on the host tier.
#include "kvfabric/runtime/staged_transport.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <numeric>
#include <vector>

#include "testing/backend_fixture.h"
#include "testing/block_pattern.h"

namespace kvfabric {
namespace {

using ::testing::HasSubstr;

// The CPU backend, recording the calls the staged transport makes (and able to refuse arenas).
class RecordingBackend final : public Backend {
 public:
  std::string_view name() const override { return "recording cpu"; }
  Result<KvArena> allocate_arena(uint64_t bytes, Tier tier) override {
    if (refuse_arenas) return Status(ErrorCode::kOutOfMemory, "no pinned memory left");
    arenas.push_back({bytes, tier});
    return cpu_->allocate_arena(bytes, tier);
  }
  Status append_kv(const PagedKvView& pool, const AppendKvArgs& args) override {
    return cpu_->append_kv(pool, args);
  }
  Status gather_kv(const PagedKvView& pool, const GatherKvArgs& args) override {
    return cpu_->gather_kv(pool, args);
  }
  Status copy_blocks(std::span<const GroupBlockCopies> batch) override {
    return cpu_->copy_blocks(batch);
  }
  Status compact_tokens(std::span<const GroupTokenCopies> batch) override {
    return cpu_->compact_tokens(batch);
  }
  Status swap_blocks(const PagedKvView& src, const PagedKvView& dst,
                     std::span<const BlockMove> moves) override {
    return cpu_->swap_blocks(src, dst, moves);
  }
  Status paged_decode_attention(const PagedKvView& pool, const DecodeAttentionArgs& args) override {
    return cpu_->paged_decode_attention(pool, args);
  }
  Status paged_prefill_attention(const PagedKvView& pool,
                                 const PrefillAttentionArgs& args) override {
    return cpu_->paged_prefill_attention(pool, args);
  }
  Status upload(void* dst, const void* src_host, uint64_t bytes) override {
    return cpu_->upload(dst, src_host, bytes);
  }
  Status download(void* dst_host, const void* src, uint64_t bytes) override {
    return cpu_->download(dst_host, src, bytes);
  }
  Status copy_bytes(void* dst, const void* src, uint64_t bytes) override {
    copies.push_back(bytes);
    return cpu_->copy_bytes(dst, src, bytes);
  }
  Status synchronize() override {
    ++synchronizations;
    return cpu_->synchronize();
  }

  struct Arena {
    uint64_t bytes;
    Tier tier;
  };
  std::vector<Arena> arenas;
  std::vector<uint64_t> copies;  // bytes of each copy_bytes call
  int synchronizations = 0;
  bool refuse_arenas = false;

 private:
  std::unique_ptr<Backend> cpu_ = testing::cpu_backend(CpuIsa::kGeneric, 1);
};

// The local transport, failing every exchange when told to (a peer that went away).
class FlakyHost final : public Transport {
 public:
  std::string_view name() const override { return "flaky"; }
  RankId rank() const override { return local_->rank(); }
  int world_size() const override { return local_->world_size(); }
  Status exchange_blocks(std::span<const BlockBatch> sends,
                         std::span<const BlockBatch> recvs) override {
    if (fail) return Status(ErrorCode::kUnavailable, "flaky R0: R0 does not answer");
    return local_->exchange_blocks(sends, recvs);
  }
  Status broadcast(std::vector<uint8_t>& bytes, RankId root) override {
    return local_->broadcast(bytes, root);
  }
  Status barrier() override { return local_->barrier(); }
  Status all_gather(uint64_t value, std::vector<uint64_t>& out) override {
    return local_->all_gather(value, out);
  }
  Status gather(std::span<const uint8_t> bytes, RankId root,
                std::vector<std::vector<uint8_t>>& out) override {
    return local_->gather(bytes, root, out);
  }
  void set_timeout(std::optional<std::chrono::milliseconds>) override {}

  bool fail = false;

 private:
  std::unique_ptr<Transport> local_ = make_local_transport();
};

// Blocks of one size to send to this rank itself and the blocks that receive them.
struct SelfBatch {
  uint64_t count, block_bytes;
  testing::ScatteredArena src, dst;
  std::vector<uint8_t*> src_blocks, dst_blocks;

  SelfBatch(uint64_t count_, uint64_t block_bytes_, uint64_t seed, bool shuffle)
      : count(count_),
        block_bytes(block_bytes_),
        src(count_ + 3, block_bytes_, seed, 0x11, shuffle),
        dst(count_ + 3, block_bytes_, seed + 1, 0x22, shuffle),
        src_blocks(src.blocks(0, count_)),
        dst_blocks(dst.blocks(0, count_)) {}

  void fill(uint64_t batch, uint64_t round) {
    for (uint64_t i = 0; i < count; ++i)
      testing::fill_pattern(src_blocks[i], block_bytes, testing::block_seed(0, 0, batch, i, round));
  }
  // Every received block holds its sent block's pattern; the slots not handed out keep their
  // marker.
  void expect_delivered(uint64_t batch, uint64_t round) {
    for (uint64_t i = 0; i < count; ++i) {
      EXPECT_TRUE(testing::has_pattern(dst_blocks[i], block_bytes,
                                       testing::block_seed(0, 0, batch, i, round)))
          << "batch " << batch << " block " << i << " round " << round;
    }
    for (uint64_t i = count; i < count + 3; ++i)
      expect_marker(dst.block(i));
  }
  // Nothing was written to the receiving blocks.
  void expect_untouched() {
    for (uint64_t i = 0; i < count + 3; ++i)
      expect_marker(dst.block(i));
  }
  void expect_marker(const uint8_t* block) const {
    const std::vector<uint8_t> marker(block_bytes, 0x22);
    EXPECT_EQ(std::memcmp(block, marker.data(), block_bytes), 0);
  }
  BlockBatch send() const { return {RankId{0}, src_blocks, block_bytes}; }
  BlockBatch recv() const { return {RankId{0}, dst_blocks, block_bytes}; }
};

class StagedTransportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto made = make_host_staged_transport(host_, backend_);
    ASSERT_TRUE(made.ok()) << made.status();
    staged_ = std::move(made).value();
    backend_.copies.clear();
    backend_.synchronizations = 0;
  }

  Status exchange(std::vector<SelfBatch>& batches) {
    std::vector<BlockBatch> sends, recvs;
    for (const SelfBatch& b : batches) {
      sends.push_back(b.send());
      recvs.push_back(b.recv());
    }
    return staged_->exchange_blocks(sends, recvs);
  }

  RecordingBackend backend_;
  FlakyHost host_;
  std::unique_ptr<Transport> staged_;
};

TEST_F(StagedTransportTest, NamesItselfAndDelegatesEverythingButTheExchange) {
  EXPECT_EQ(staged_->name(), "flaky (staged through pinned host memory)");
  EXPECT_EQ(staged_->rank(), RankId{0});
  EXPECT_EQ(staged_->world_size(), 1);
  EXPECT_EQ(staged_->describe(RankId{0}), "rank 0");
  std::vector<uint64_t> all;
  ASSERT_TRUE(staged_->all_gather(42, all).ok());
  EXPECT_EQ(all, std::vector<uint64_t>{42});
  EXPECT_TRUE(staged_->barrier().ok());
  std::vector<uint8_t> bytes = {1, 2, 3};
  EXPECT_TRUE(staged_->broadcast(bytes, RankId{0}).ok());
  const Status refused = staged_->broadcast(bytes, RankId{1});
  EXPECT_EQ(refused.code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(refused.message(), HasSubstr("root R1 is not a rank"));
  std::vector<std::vector<uint8_t>> gathered;
  ASSERT_TRUE(staged_->gather(bytes, RankId{0}, gathered).ok());
  EXPECT_EQ(gathered, std::vector<std::vector<uint8_t>>{bytes});
  EXPECT_TRUE(backend_.copies.empty());
}

TEST_F(StagedTransportTest, StartsWithOneGranuleOfHostTierMemory) {
  ASSERT_EQ(backend_.arenas.size(), 1u);
  EXPECT_EQ(backend_.arenas[0].tier, Tier::kHost);
  EXPECT_EQ(backend_.arenas[0].bytes, uint64_t{1} << 20);
}

TEST_F(StagedTransportTest, SeveralBatchesOfScatteredBlocksArriveBitExact) {
  // Block sizes that are not multiples of the region alignment, one batch without blocks.
  std::vector<SelfBatch> batches;
  batches.emplace_back(37, 4096, 10, true);
  batches.emplace_back(0, 64, 20, true);
  batches.emplace_back(11, 336, 30, true);
  batches.emplace_back(5, 8, 40, true);
  for (uint64_t b = 0; b < batches.size(); ++b)
    batches[b].fill(b, 0);
  ASSERT_TRUE(exchange(batches).ok());
  for (uint64_t b = 0; b < batches.size(); ++b)
    batches[b].expect_delivered(b, 0);
  // One wait for the sent blocks' copies, one for the received blocks'.
  EXPECT_EQ(backend_.synchronizations, 2);
}

TEST_F(StagedTransportTest, AdjacentBlocksMoveAsOneCopyEachWay) {
  std::vector<SelfBatch> batches;
  batches.emplace_back(16, 512, 1, /*shuffle=*/false);
  batches[0].fill(0, 0);
  ASSERT_TRUE(exchange(batches).ok());
  batches[0].expect_delivered(0, 0);
  EXPECT_EQ(backend_.copies, (std::vector<uint64_t>{16 * 512, 16 * 512}));
}

TEST_F(StagedTransportTest, RunsOfAdjacentAmongScatteredBlocksMoveOneCopyPerRun) {
  testing::ScatteredArena src(12, 256, 1, 0x11, /*shuffle=*/false);
  testing::ScatteredArena dst(12, 256, 2, 0x22, /*shuffle=*/false);
  // Sent: runs {0,1,2} {7,8} {4}; received into {11} {3,4,5,6} {0}: 3 copies out, 3 back.
  std::vector<uint8_t*> from = {src.block(0), src.block(1), src.block(2),
                                src.block(7), src.block(8), src.block(4)};
  std::vector<uint8_t*> to = {dst.block(11), dst.block(3), dst.block(4),
                              dst.block(5),  dst.block(6), dst.block(0)};
  for (uint64_t i = 0; i < from.size(); ++i)
    testing::fill_pattern(from[i], 256, testing::block_seed(0, 0, 0, i));
  const BlockBatch send{RankId{0}, from, 256};
  const BlockBatch recv{RankId{0}, to, 256};
  ASSERT_TRUE(staged_->exchange_blocks({&send, 1}, {&recv, 1}).ok());
  for (uint64_t i = 0; i < to.size(); ++i)
    EXPECT_TRUE(testing::has_pattern(to[i], 256, testing::block_seed(0, 0, 0, i))) << i;
  EXPECT_EQ(backend_.copies, (std::vector<uint64_t>{3 * 256, 2 * 256, 256, 256, 4 * 256, 256}));
}

TEST_F(StagedTransportTest, EmptyExchangesCopyNothing) {
  EXPECT_TRUE(staged_->exchange_blocks({}, {}).ok());
  const BlockBatch none{RankId{0}, {}, 0};
  EXPECT_TRUE(staged_->exchange_blocks({&none, 1}, {&none, 1}).ok());
  EXPECT_TRUE(backend_.copies.empty());
  EXPECT_EQ(backend_.arenas.size(), 1u);
}

TEST_F(StagedTransportTest, RepeatedRoundsDeliverTheirOwnBytesAndReuseTheStaging) {
  std::vector<SelfBatch> batches;
  batches.emplace_back(40, 1000, 5, true);
  batches.emplace_back(9, 4096, 6, true);
  for (uint64_t round = 0; round < 4; ++round) {
    for (uint64_t b = 0; b < batches.size(); ++b)
      batches[b].fill(b, round);
    ASSERT_TRUE(exchange(batches).ok()) << "round " << round;
    for (uint64_t b = 0; b < batches.size(); ++b)
      batches[b].expect_delivered(b, round);
  }
  EXPECT_EQ(backend_.arenas.size(), 1u) << "the first granule holds every round";
}

TEST_F(StagedTransportTest, StagingGrowsToTheLargestExchangeAndIsKept) {
  // 2 x 600 KiB each way: 2.4 MiB of staging, more than the first granule.
  std::vector<SelfBatch> large;
  large.emplace_back(2, 600 * 1024, 7, true);
  large[0].fill(0, 0);
  ASSERT_TRUE(exchange(large).ok());
  large[0].expect_delivered(0, 0);
  ASSERT_EQ(backend_.arenas.size(), 2u);
  EXPECT_EQ(backend_.arenas[1].tier, Tier::kHost);
  EXPECT_GE(backend_.arenas[1].bytes, uint64_t{2} * 2 * 600 * 1024);
  EXPECT_EQ(backend_.arenas[1].bytes % (uint64_t{1} << 20), 0u);

  std::vector<SelfBatch> small;
  small.emplace_back(3, 4096, 8, true);
  for (uint64_t round = 1; round < 3; ++round) {
    small[0].fill(0, round);
    large[0].fill(0, round);
    ASSERT_TRUE(exchange(small).ok());
    ASSERT_TRUE(exchange(large).ok());
    small[0].expect_delivered(0, round);
    large[0].expect_delivered(0, round);
  }
  EXPECT_EQ(backend_.arenas.size(), 2u) << "smaller and equal exchanges reuse the staging";
}

TEST_F(StagedTransportTest, InvalidBatchesAreRefusedBeforeAnyCopy) {
  SelfBatch ok(4, 128, 3, true);
  ok.fill(0, 0);
  SelfBatch other(3, 128, 9, true);
  std::vector<uint8_t*> with_null = ok.dst_blocks;
  with_null[2] = nullptr;
  std::vector<uint8_t*> overlapping = ok.dst_blocks;
  overlapping[3] = overlapping[1] + 64;

  struct Case {
    const char* what;
    BlockBatch send, recv;
    const char* names;
  };
  const Case cases[] = {
      {"block count mismatch", ok.send(), other.recv(), "does not match"},
      {"block size mismatch", ok.send(), {RankId{0}, ok.dst_blocks, 64}, "does not match"},
      {"peer out of range", ok.send(), {RankId{1}, ok.dst_blocks, 128}, "peer out of range"},
      {"null block", ok.send(), {RankId{0}, with_null, 128}, "block 2 is null"},
      {"overlapping receives", ok.send(), {RankId{0}, overlapping, 128}, "overlap"},
      {"blocks of 0 bytes", ok.send(), {RankId{0}, ok.dst_blocks, 0}, "blocks of 0 bytes"},
  };
  for (const Case& c : cases) {
    const Status s = staged_->exchange_blocks({&c.send, 1}, {&c.recv, 1});
    EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument) << c.what;
    EXPECT_THAT(s.message(), HasSubstr("flaky transport R0 (staged)")) << c.what;
    EXPECT_THAT(s.message(), HasSubstr(c.names)) << c.what << ": " << s;
  }
  EXPECT_TRUE(backend_.copies.empty()) << "nothing was staged";
  ok.expect_untouched();
  other.expect_untouched();

  // A send to itself without its receive.
  const BlockBatch send = ok.send();
  const Status unpaired = staged_->exchange_blocks({&send, 1}, {});
  EXPECT_THAT(unpaired.message(), HasSubstr("sends 1 batches to itself but receives 0"));
  EXPECT_TRUE(backend_.copies.empty());
}

TEST_F(StagedTransportTest, AFailedHostExchangeWritesNoReceivedBlock) {
  std::vector<SelfBatch> batches;
  batches.emplace_back(6, 512, 4, true);
  batches[0].fill(0, 0);
  host_.fail = true;
  const Status s = exchange(batches);
  EXPECT_EQ(s.code(), ErrorCode::kUnavailable);
  EXPECT_THAT(s.message(), HasSubstr("R0 does not answer"));
  batches[0].expect_untouched();
  // The transport itself stays usable when its host transport recovers.
  host_.fail = false;
  ASSERT_TRUE(exchange(batches).ok());
  batches[0].expect_delivered(0, 0);
}

TEST_F(StagedTransportTest, StagingThatCannotGrowRefusesTheExchangeByName) {
  std::vector<SelfBatch> large;
  large.emplace_back(1, 3 << 20, 11, true);
  large[0].fill(0, 0);
  backend_.refuse_arenas = true;
  const Status s = exchange(large);
  EXPECT_EQ(s.code(), ErrorCode::kOutOfMemory);
  EXPECT_THAT(s.message(), HasSubstr("cannot allocate 6291456 bytes of pinned host memory"));
  EXPECT_THAT(s.message(), HasSubstr("no pinned memory left"));
  large[0].expect_untouched();
  EXPECT_TRUE(backend_.copies.empty());
  // Later exchanges allocate again.
  backend_.refuse_arenas = false;
  ASSERT_TRUE(exchange(large).ok());
  large[0].expect_delivered(0, 0);
}

TEST(StagedTransportCreateTest, NoPinnedMemoryAtStartIsAnErrorNamingIt) {
  RecordingBackend backend;
  backend.refuse_arenas = true;
  FlakyHost host;
  const auto made = make_host_staged_transport(host, backend);
  ASSERT_FALSE(made.ok());
  EXPECT_EQ(made.status().code(), ErrorCode::kOutOfMemory);
  EXPECT_THAT(made.status().message(), HasSubstr("flaky transport R0 (staged): cannot allocate"));
  EXPECT_THAT(made.status().message(), HasSubstr("recording cpu backend"));
}

}  // namespace
}  // namespace kvfabric
