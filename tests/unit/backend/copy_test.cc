// compact_tokens / copy_blocks / swap_blocks execute what the block manager emits: on random
// workloads (appends, forks, StreamingLLM and token-selection compaction) every sequence keeps
// reading back exactly the K/V it wrote.
#include <gtest/gtest.h>

#include <map>
#include <numeric>
#include <random>

#include "backend/validate.h"
#include "kvfabric/block/paged_kv_cache.h"
#include "testing/backend_fixture.h"
#include "testing/kv_reference.h"
#include "testing/property_env.h"

namespace kvfabric {
namespace {

constexpr uint32_t kHeads = 2, kHeadDim = 64;

// One layer group: its pool, its block manager and what each sequence must read back.
struct Group {
  uint32_t layers;
  testing::TestPool pool;
  PagedKvCache manager;
  // Per sequence, per token: the gathered (stored) K and V of every layer, [layer][heads*hd].
  std::map<SeqId, std::vector<std::vector<float>>> expected;
};

class CopyWorkload : public ::testing::TestWithParam<std::tuple<DType, uint32_t>> {
 protected:
  void SetUp() override {
    const auto [dtype, block_size] = GetParam();
    backend_ = testing::cpu_backend(CpuIsa::kAuto);
    for (uint32_t layers : {1u, 2u}) {
      groups_.push_back(
          Group{layers,
                testing::TestPool::create(*backend_, layers, kHeads, block_size, kHeadDim, dtype,
                                          is_integer_quantized(dtype) ? 32 : 0, 48),
                PagedKvCache(48, block_size, kHeads, kHeadDim),
                {}});
    }
  }

  // Writes fresh random K/V for positions [first, first + n) of a sequence in every layer and
  // records the stored values as gathered right after writing.
  void write_tokens(Group& g, SeqId seq, size_t first, size_t n) {
    const SequenceInfo* info = g.manager.get_sequence(seq);
    const uint32_t bs = g.pool.view.block_size;
    std::vector<int64_t> slots(n);
    for (size_t i = 0; i < n; ++i) {
      const size_t pos = first + i;
      slots[i] = int64_t{info->block_ids[pos / bs].value} * bs + pos % bs;
    }
    auto& tokens = g.expected[seq];
    tokens.resize(first + n, std::vector<float>(uint64_t{g.layers} * 2 * kHeads * kHeadDim));
    for (uint32_t layer = 0; layer < g.layers; ++layer) {
      const auto k = testing::random_normal(n * kHeads * kHeadDim, rng_);
      const auto v = testing::random_normal(n * kHeads * kHeadDim, rng_);
      ASSERT_TRUE(backend_
                      ->append_kv(g.pool.view, {layer, k.data(), v.data(), DType::kF32,
                                                static_cast<uint32_t>(n), slots.data()})
                      .ok());
    }
    const auto now = read_back(g, seq);
    for (size_t i = first; i < first + n; ++i)
      tokens[i] = now[i];
  }

  std::vector<std::vector<float>> read_back(Group& g, SeqId seq) {
    const SequenceInfo* info = g.manager.get_sequence(seq);
    std::vector<uint32_t> table;
    for (BlockId b : info->block_ids)
      table.push_back(b.value);
    const uint32_t n = static_cast<uint32_t>(info->num_tokens);
    const uint64_t row = uint64_t{kHeads} * kHeadDim;
    std::vector<std::vector<float>> tokens(n, std::vector<float>(uint64_t{g.layers} * 2 * row));
    std::vector<float> k(n * row), v(n * row);
    for (uint32_t layer = 0; layer < g.layers; ++layer) {
      EXPECT_TRUE(
          backend_->gather_kv(g.pool.view, {layer, table.data(), n, k.data(), v.data()}).ok());
      for (uint32_t t = 0; t < n; ++t) {
        std::copy(k.begin() + t * row, k.begin() + (t + 1) * row,
                  tokens[t].begin() + layer * 2 * row);
        std::copy(v.begin() + t * row, v.begin() + (t + 1) * row,
                  tokens[t].begin() + (layer * 2 + 1) * row);
      }
    }
    return tokens;
  }

  // Executes every group's queued copies in one batched call, as a step does.
  void flush() {
    std::vector<std::vector<TokenCopy>> lists;
    std::vector<GroupTokenCopies> batch;
    for (Group& g : groups_)
      lists.push_back(g.manager.take_pending_copies());
    for (size_t i = 0; i < groups_.size(); ++i)
      batch.push_back({groups_[i].pool.view, lists[i]});
    ASSERT_TRUE(backend_->compact_tokens(batch).ok());
  }

  void verify_all() {
    for (Group& g : groups_) {
      for (const auto& [seq, tokens] : g.expected) {
        ASSERT_EQ(read_back(g, seq), tokens) << seq << " in a " << g.layers << "-layer group";
      }
    }
  }

  std::unique_ptr<Backend> backend_;
  std::vector<Group> groups_;
  std::mt19937 rng_{2026};
};

TEST_P(CopyWorkload, RandomCowAndCompactionKeepEveryToken) {
  uint64_t next_seq = 1;
  size_t copies_executed = 0;
  for (int op = 0; op < 600; ++op) {
    Group& g = groups_[rng_() % groups_.size()];
    std::vector<SeqId> live;
    for (const auto& [seq, tokens] : g.expected)
      live.push_back(seq);
    const SeqId pick = live.empty() ? SeqId{0} : live[rng_() % live.size()];
    const int kind = static_cast<int>(rng_() % 11);
    if (live.empty() || kind < 2) {
      const SeqId seq{next_seq++};
      const size_t n = 1 + rng_() % 20;
      if (g.manager.allocate(seq, n).ok()) {
        flush();
        write_tokens(g, seq, 0, n);
      }
    } else if (kind < 6) {
      const size_t old = g.manager.get_sequence(pick)->num_tokens;
      const size_t n = 1 + rng_() % 5;
      if (g.manager.append(pick, n).ok()) {
        copies_executed += g.manager.pending_copies().size();
        flush();  // copies run before the step writes its new tokens
        write_tokens(g, pick, old, n);
      }
    } else if (kind < 7) {
      const SeqId child{next_seq++};
      if (g.manager.fork(pick, child).ok()) g.expected[child] = g.expected[pick];
    } else if (kind < 9) {
      const size_t sink = rng_() % 6, window = rng_() % 12;
      auto dropped = g.manager.apply_streaming_llm(pick, sink, window);
      if (dropped.ok() && dropped.value() > 0) {
        auto& tokens = g.expected[pick];
        std::vector<std::vector<float>> kept(tokens.begin(), tokens.begin() + sink);
        kept.insert(kept.end(), tokens.end() - window, tokens.end());
        tokens = kept;
        copies_executed += g.manager.pending_copies().size();
      }
    } else if (kind < 10) {  // token selection (H2O-like): a random subset stays, in order
      auto& tokens = g.expected[pick];
      std::vector<size_t> keep;
      std::vector<std::vector<float>> kept;
      for (size_t p = 0; p < tokens.size(); ++p) {
        if (rng_() % 3 != 0) {
          keep.push_back(p);
          kept.push_back(tokens[p]);
        }
      }
      auto dropped = g.manager.retain_tokens(pick, keep);
      if (dropped.ok()) {
        tokens = kept;
        copies_executed += g.manager.pending_copies().size();
      }
    } else {
      ASSERT_TRUE(g.manager.free(pick).ok());
      g.expected.erase(pick);
    }
    if (op % 5 == 0) {
      flush();
      ASSERT_NO_FATAL_FAILURE(verify_all()) << "after operation " << op;
    }
  }
  flush();
  verify_all();
  EXPECT_GT(copies_executed, 20u);
}

INSTANTIATE_TEST_SUITE_P(Formats, CopyWorkload,
                         ::testing::Combine(::testing::Values(DType::kF32, DType::kF16,
                                                              DType::kFP8E4M3, DType::kInt8,
                                                              DType::kInt4, DType::kInt2),
                                            ::testing::Values(4u, 16u)));

TEST(SwapBlocks, DeviceToHostAndBackIsBitExact) {
  auto backend = testing::cpu_backend(CpuIsa::kAuto);
  auto device = testing::TestPool::create(*backend, 2, 2, 16, 64, DType::kInt4, 32, 8);
  auto host = testing::TestPool::create(*backend, 2, 2, 16, 64, DType::kInt4, 32, 8);
  std::mt19937 rng(1);
  for (uint64_t i = 0; i < device.arena.bytes(); ++i)
    device.arena.data()[i] = static_cast<uint8_t>(rng());
  const auto original = device.snapshot();
  const std::vector<BlockMove> out = {{1, 6}, {4, 0}, {7, 3}};
  ASSERT_TRUE(backend->swap_blocks(device.view, host.view, out).ok());
  std::fill(device.arena.data(), device.arena.data() + device.arena.bytes(), 0);
  const std::vector<BlockMove> in = {{6, 1}, {0, 4}, {3, 7}};
  ASSERT_TRUE(backend->swap_blocks(host.view, device.view, in).ok());
  const uint64_t bb = device.view.block_bytes;
  for (uint32_t b : {1u, 4u, 7u}) {
    EXPECT_TRUE(std::equal(original.begin() + b * bb, original.begin() + (b + 1) * bb,
                           device.arena.data() + b * bb))
        << "block " << b;
  }
  const std::vector<BlockMove> bad = {{1, 8}};
  EXPECT_NE(backend->swap_blocks(device.view, host.view, bad).message().find("B8"),
            std::string::npos);
  auto other = testing::TestPool::create(*backend, 2, 2, 16, 64, DType::kInt8, 32, 8);
  EXPECT_NE(backend->swap_blocks(device.view, other.view, out).message().find("different layouts"),
            std::string::npos);
}

TEST(CopyBlocks, WholeBlocksAcrossGroupsInOneCall) {
  auto backend = testing::cpu_backend(CpuIsa::kAuto);
  auto a = testing::TestPool::create(*backend, 1, 1, 4, 64, DType::kFP8E4M3, 0, 4);
  auto b = testing::TestPool::create(*backend, 3, 1, 4, 64, DType::kF16, 0, 4);
  for (auto* p : {&a, &b}) {
    for (uint64_t i = 0; i < p->arena.bytes(); ++i)
      p->arena.data()[i] = static_cast<uint8_t>(i * 7);
  }
  const auto a0 = a.snapshot(), b0 = b.snapshot();
  const std::vector<BlockMove> ca = {{0, 3}}, cb = {{2, 1}, {1, 0}};
  const std::vector<GroupBlockCopies> batch = {{a.view, ca}, {b.view, cb}};
  ASSERT_TRUE(backend->copy_blocks(batch).ok());
  const uint64_t ab = a.view.block_bytes, bb = b.view.block_bytes;
  EXPECT_TRUE(std::equal(a0.begin(), a0.begin() + ab, a.arena.data() + 3 * ab));
  // In order: block 1 first receives block 2, then block 0 receives the new block 1.
  EXPECT_TRUE(std::equal(b0.begin() + 2 * bb, b0.begin() + 3 * bb, b.arena.data() + bb));
  EXPECT_TRUE(std::equal(b0.begin() + 2 * bb, b0.begin() + 3 * bb, b.arena.data()));
  const std::vector<BlockMove> bad = {{0, 4}};
  const std::vector<GroupBlockCopies> bad_batch = {{a.view, ca}, {b.view, bad}};
  const auto before = b.snapshot();
  EXPECT_FALSE(backend->copy_blocks(bad_batch).ok());
  EXPECT_EQ(b.snapshot(), before);
}

// A backend that runs one launch's moves at once (CUDA) splits them with block_move_launches. Run
// each launch's moves in reverse, a schedule parallel copies may take: the blocks must end as
// running the moves one by one in list order leaves them, in one pool (chains, swaps of two
// blocks, a block read then overwritten) and between two pools (a block written twice).
TEST(CopyBlocks, LaunchesKeepTheMovesListOrder) {
  std::mt19937 rng(testing::property_seed(5));
  for (int round = 0; round < 200; ++round) {
    const bool one_pool = round % 2 == 0;
    std::vector<BlockMove> moves(1 + rng() % 12);
    for (BlockMove& m : moves) {
      m = {static_cast<uint32_t>(rng() % 6), static_cast<uint32_t>(rng() % 6)};
    }
    // Block contents are the block each one was copied from, first; the source pool's blocks
    // are 100 + their id when the moves cross pools.
    std::vector<uint32_t> in_order(6), launched(6);
    std::iota(in_order.begin(), in_order.end(), 0u);
    launched = in_order;
    const auto source = [&](const std::vector<uint32_t>& dst, uint32_t block) {
      return one_pool ? dst[block] : 100 + block;
    };
    for (const BlockMove& m : moves) in_order[m.dst_block] = source(in_order, m.src_block);
    size_t first = 0;
    for (const size_t last : detail::block_move_launches(moves, one_pool)) {
      ASSERT_GT(last, first);
      for (size_t i = last; i-- > first;) {
        launched[moves[i].dst_block] = source(launched, moves[i].src_block);
      }
      first = last;
    }
    ASSERT_EQ(first, moves.size());
    ASSERT_EQ(launched, in_order) << "round " << round << (one_pool ? ", one pool" : ", two pools");
  }
}

TEST(CompactTokens, RejectsCopiesOutsideTheBlock) {
  auto backend = testing::cpu_backend(CpuIsa::kAuto);
  auto pool = testing::TestPool::create(*backend, 1, 1, 4, 64, DType::kF16, 0, 4);
  const std::vector<TokenCopy> copies = {
      {BlockId{0}, 2, BlockId{1}, 1, 3, CopyReason::kCompaction}};
  const std::vector<GroupTokenCopies> batch = {{pool.view, copies}};
  EXPECT_NE(backend->compact_tokens(batch).message().find("does not fit"), std::string::npos);
}

}  // namespace
}  // namespace kvfabric
