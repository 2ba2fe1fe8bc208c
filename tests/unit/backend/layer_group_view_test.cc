// PyramidKV's storage across ranks: one arena whose blocks are seen either whole (every layer,
// block_size tokens) or as one layer group's (its layers, groups x block_size tokens). A
// regrouping copy moves a token's rows of one group's layers from the whole view to the group's;
// the group's view then reads back exactly those rows and attends over exactly those tokens.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <tuple>
#include <vector>

#include "kvfabric/backend/kv_storage.h"
#include "testing/backend_fixture.h"
#include "testing/kv_reference.h"

namespace kvfabric {
namespace {

constexpr uint32_t kLayers = 4, kLayersPerGroup = 2, kGroups = kLayers / kLayersPerGroup;
constexpr uint32_t kHeads = 2, kQueryHeads = 4, kHeadDim = 64, kBlockSize = 4, kBlocks = 24;
constexpr uint32_t kTokens = 12;  // written whole, in blocks kWholeTable

const std::vector<uint32_t> kWholeTable = {5, 9, 2};

// The tokens each group keeps, in their new order, and the group blocks that hold them.
const std::vector<std::vector<uint32_t>> kKept = {{0, 1, 2, 5, 7, 8, 10, 11, 3, 4},
                                                  {11, 2, 7, 0}};
const std::vector<std::vector<uint32_t>> kGroupTables = {{12, 17}, {3}};

class LayerGroupView : public ::testing::TestWithParam<std::tuple<CpuIsa, DType>> {
 protected:
  void SetUp() override {
    const auto [isa, dtype] = GetParam();
    backend_ = testing::cpu_backend(isa);
    pool_ = testing::TestPool::create(*backend_, kLayers, kHeads, kBlockSize, kHeadDim, dtype,
                                      is_integer_quantized(dtype) ? 32 : 0, kBlocks);
    for (uint32_t g = 0; g < kGroups; ++g) {
      auto view = layer_group_view(pool_.view, kLayersPerGroup, g);
      ASSERT_TRUE(view.ok()) << view.status();
      views_.push_back(*view);
    }
    std::vector<int64_t> slots;
    for (uint32_t t = 0; t < kTokens; ++t)
      slots.push_back(int64_t{kWholeTable[t / kBlockSize]} * kBlockSize + t % kBlockSize);
    for (uint32_t layer = 0; layer < kLayers; ++layer) {
      const auto k = testing::random_normal(kTokens * kHeads * kHeadDim, rng_);
      const auto v = testing::random_normal(kTokens * kHeads * kHeadDim, rng_);
      ASSERT_TRUE(backend_
                      ->append_kv(pool_.view, {layer, k.data(), v.data(), DType::kF32, kTokens,
                                               slots.data()})
                      .ok());
    }
  }

  // The stored K and V of `tokens` of `layer` of `pool`, read through `table`: [token][heads*hd].
  std::pair<std::vector<float>, std::vector<float>> gather(const PagedKvView& pool,
                                                          uint32_t layer,
                                                          const std::vector<uint32_t>& table,
                                                          uint32_t tokens) {
    std::vector<float> k(uint64_t{tokens} * kHeads * kHeadDim),
        v(uint64_t{tokens} * kHeads * kHeadDim);
    const Status s = backend_->gather_kv(pool, {layer, table.data(), tokens, k.data(), v.data()});
    EXPECT_TRUE(s.ok()) << s;
    return {k, v};
  }

  // The copies that put group g's kept tokens into its blocks, one run of source slots each.
  static std::vector<TokenCopy> regrouping(uint32_t g) {
    std::vector<TokenCopy> copies;
    const uint32_t group_block_tokens = kGroups * kBlockSize;
    for (uint32_t i = 0; i < kKept[g].size(); ++i) {
      const uint32_t t = kKept[g][i];
      copies.push_back({BlockId{kWholeTable[t / kBlockSize]}, t % kBlockSize,
                        BlockId{kGroupTables[g][i / group_block_tokens]}, i % group_block_tokens,
                        1, CopyReason::kCompaction});
    }
    return copies;
  }

  void regroup_all() {
    std::vector<std::vector<TokenCopy>> copies;
    std::vector<GroupTokenCopies> batch;
    for (uint32_t g = 0; g < kGroups; ++g) copies.push_back(regrouping(g));
    for (uint32_t g = 0; g < kGroups; ++g) batch.push_back({views_[g], copies[g], pool_.view});
    const Status s = backend_->compact_tokens(batch);
    ASSERT_TRUE(s.ok()) << s;
  }

  std::mt19937 rng_{29};
  std::unique_ptr<Backend> backend_;
  testing::TestPool pool_;
  std::vector<PagedKvView> views_;
};

TEST_P(LayerGroupView, SpansTheWholePoolsBytesWithItsLayersAndMoreTokensPerBlock) {
  for (uint32_t g = 0; g < kGroups; ++g) {
    EXPECT_EQ(views_[g].base, pool_.view.base);
    EXPECT_EQ(views_[g].block_bytes, pool_.view.block_bytes);
    EXPECT_EQ(views_[g].num_blocks, pool_.view.num_blocks);
    EXPECT_EQ(views_[g].num_layers, kLayersPerGroup);
    EXPECT_EQ(views_[g].first_layer, g * kLayersPerGroup);
    EXPECT_EQ(views_[g].block_size, kGroups * kBlockSize);
    EXPECT_EQ(views_[g].layer_group, g);
  }
}

TEST_P(LayerGroupView, RegroupedTokensReadBackBitExactInTheirGroupsLayers) {
  regroup_all();
  for (uint32_t g = 0; g < kGroups; ++g) {
    const uint32_t kept = static_cast<uint32_t>(kKept[g].size());
    for (uint32_t l = 0; l < kLayersPerGroup; ++l) {
      const auto whole = gather(pool_.view, g * kLayersPerGroup + l, kWholeTable, kTokens);
      const auto grouped = gather(views_[g], l, kGroupTables[g], kept);
      const uint64_t row = uint64_t{kHeads} * kHeadDim;
      for (uint32_t i = 0; i < kept; ++i) {
        for (uint64_t e = 0; e < row; ++e) {
          ASSERT_EQ(grouped.first[i * row + e], whole.first[kKept[g][i] * row + e])
              << "K of group " << g << " layer " << l << " kept token " << i;
          ASSERT_EQ(grouped.second[i * row + e], whole.second[kKept[g][i] * row + e])
              << "V of group " << g << " layer " << l << " kept token " << i;
        }
      }
    }
  }
}

TEST_P(LayerGroupView, DecodeOverAGroupsViewAttendsToExactlyItsKeptTokens) {
  regroup_all();
  // The reference: the same kept rows copied into whole blocks of the same arena, attended
  // through the whole view (the same stored codes, block_size tokens a tile).
  const std::vector<std::vector<uint32_t>> whole_tables = {{20, 21, 22}, {23}};
  for (uint32_t g = 0; g < kGroups; ++g) {
    std::vector<TokenCopy> copies;
    for (uint32_t i = 0; i < kKept[g].size(); ++i) {
      const uint32_t t = kKept[g][i];
      copies.push_back({BlockId{kWholeTable[t / kBlockSize]}, t % kBlockSize,
                        BlockId{whole_tables[g][i / kBlockSize]}, i % kBlockSize, 1,
                        CopyReason::kCompaction});
    }
    const std::vector<GroupTokenCopies> batch = {{pool_.view, copies}};
    ASSERT_TRUE(backend_->compact_tokens(batch).ok());
  }
  for (uint32_t g = 0; g < kGroups; ++g) {
    const uint32_t kept = static_cast<uint32_t>(kKept[g].size());
    for (uint32_t l = 0; l < kLayersPerGroup; ++l) {
      const auto query = testing::random_normal(kQueryHeads * kHeadDim, rng_);
      auto run = [&](const PagedKvView& pool, uint32_t layer, const std::vector<uint32_t>& table,
                     std::vector<float>& out, std::vector<float>& mass) {
        out.assign(kQueryHeads * kHeadDim, 0.0f);
        mass.assign(kept, 0.0f);
        DecodeAttentionArgs args;
        args.layer = layer;
        args.query = query.data();
        args.output = out.data();
        args.num_seqs = 1;
        args.num_q_heads = kQueryHeads;
        args.block_tables = table.data();
        args.max_blocks_per_seq = static_cast<uint32_t>(table.size());
        args.context_lens = &kept;
        args.softmax_scale = 0.125f;
        args.attention_mass = mass.data();
        args.mass_stride = kept;
        const Status s = backend_->paged_decode_attention(pool, args);
        ASSERT_TRUE(s.ok()) << s;
      };
      std::vector<float> got, got_mass, want, want_mass;
      run(views_[g], l, kGroupTables[g], got, got_mass);
      run(pool_.view, g * kLayersPerGroup + l, whole_tables[g], want, want_mass);
      for (size_t i = 0; i < got.size(); ++i) {
        ASSERT_NEAR(got[i], want[i], 1e-5 + 1e-5 * std::fabs(want[i]))
            << "group " << g << " layer " << l << " output " << i;
      }
      for (uint32_t t = 0; t < kept; ++t) {
        ASSERT_NEAR(got_mass[t], want_mass[t], 1e-5) << "group " << g << " mass of token " << t;
      }
    }
  }
}

TEST_P(LayerGroupView, RefusesARegroupingThatCannotBeRead) {
  const std::vector<uint8_t> before = pool_.snapshot();
  // A block read and written through two views whose rows sit at different places.
  const std::vector<TokenCopy> same_block = {
      {BlockId{5}, 0, BlockId{5}, 0, 1, CopyReason::kCompaction}};
  Status s = backend_->compact_tokens(std::vector<GroupTokenCopies>{
      {views_[0], same_block, pool_.view}});
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(s.message().find("same block"), std::string::npos) << s;
  // Group 1's layers are not in group 0's view.
  const std::vector<TokenCopy> copy = {{BlockId{5}, 0, BlockId{6}, 0, 1, CopyReason::kCompaction}};
  s = backend_->compact_tokens(std::vector<GroupTokenCopies>{{views_[1], copy, views_[0]}});
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(s.message().find("must hold the layers written"), std::string::npos) << s;
  // A source slot past the whole view's block, though inside the group's larger one.
  const std::vector<TokenCopy> past = {
      {BlockId{5}, kBlockSize, BlockId{6}, 0, 1, CopyReason::kCompaction}};
  s = backend_->compact_tokens(std::vector<GroupTokenCopies>{{views_[0], past, pool_.view}});
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(s.message().find("read from layer group"), std::string::npos) << s;
  EXPECT_EQ(pool_.snapshot(), before);
}

INSTANTIATE_TEST_SUITE_P(IsasAndDtypes, LayerGroupView,
                         ::testing::Combine(::testing::ValuesIn(testing::cpu_isas()),
                                            ::testing::ValuesIn(kAllDTypes)));

TEST(LayerGroupViewShape, RefusesGroupsThatDoNotDivideTheLayers) {
  auto backend = testing::cpu_backend(CpuIsa::kGeneric);
  auto pool = testing::TestPool::create(*backend, 6, 1, 16, 64, DType::kF16, 0, 2);
  auto view = layer_group_view(pool.view, 4, 0);
  ASSERT_FALSE(view.ok());
  EXPECT_NE(view.status().message().find("cache.layers_per_group 4 must divide the 6 layers"),
            std::string::npos)
      << view.status();
  view = layer_group_view(pool.view, 3, 2);
  ASSERT_FALSE(view.ok());
  EXPECT_NE(view.status().message().find("layer group 2 of 2"), std::string::npos)
      << view.status();
  ASSERT_TRUE(layer_group_view(pool.view, 6, 0).ok());
}

}  // namespace
}  // namespace kvfabric
