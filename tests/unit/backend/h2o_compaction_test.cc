// H2O end to end on the CPU backend: decode attention's attention mass accumulates per token,
// select_heavy_hitters picks what stays, the block manager plans the compaction and the backend
// executes it. The planted heavy hitters and the recent window survive, every retained token
// reads back bit-exact, and decode attention over the compacted sequence is attention over
// exactly the retained rows.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "kvfabric/block/paged_kv_cache.h"
#include "kvfabric/quant/token_selection.h"
#include "testing/backend_fixture.h"
#include "testing/kv_reference.h"

namespace kvfabric {
namespace {

constexpr uint32_t kKvHeads = 2, kGqa = 2, kQHeads = kKvHeads * kGqa, kHeadDim = 64;
constexpr uint32_t kBlockSize = 16, kBlocks = 32;
constexpr size_t kRow = size_t{kKvHeads} * kHeadDim;
constexpr SeqId kSeq{1};

class H2oCompaction : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    backend_ = testing::cpu_backend(CpuIsa::kAuto);
    pool_ = testing::TestPool::create(*backend_, 1, kKvHeads, kBlockSize, kHeadDim, GetParam(),
                                      is_integer_quantized(GetParam()) ? 32 : 0, kBlocks);
    direction_ = testing::random_normal(kHeadDim, rng_);
  }

  std::vector<uint32_t> table() const {
    std::vector<uint32_t> t;
    for (BlockId b : manager_.get_sequence(kSeq)->block_ids)
      t.push_back(b.value);
    return t;
  }

  // Gathered (stored) K and V rows of the sequence: [n][kRow] each.
  std::pair<std::vector<float>, std::vector<float>> gather() const {
    const auto t = table();
    const uint32_t n = static_cast<uint32_t>(manager_.get_sequence(kSeq)->num_tokens);
    std::vector<float> k(n * kRow), v(n * kRow);
    EXPECT_TRUE(backend_->gather_kv(pool_.view, {0, t.data(), n, k.data(), v.data()}).ok());
    return {k, v};
  }

  // Writes `n` new tokens; a planted token's keys point along the queries' direction, so it
  // draws most of the attention (a heavy hitter).
  void write_tokens(size_t n, bool planted) {
    const size_t first = manager_.get_sequence(kSeq)->num_tokens - n;
    const auto t = table();
    std::vector<int64_t> slots(n);
    for (size_t i = 0; i < n; ++i)
      slots[i] = int64_t{t[(first + i) / kBlockSize]} * kBlockSize + (first + i) % kBlockSize;
    auto k = testing::random_normal(n * kRow, rng_, 0.3f);
    const auto v = testing::random_normal(n * kRow, rng_);
    if (planted) {
      for (size_t i = 0; i < n; ++i)
        for (uint32_t h = 0; h < kKvHeads; ++h)
          for (uint32_t d = 0; d < kHeadDim; ++d)
            k[(i * kKvHeads + h) * kHeadDim + d] = 1.5f * direction_[d];
    }
    ASSERT_TRUE(backend_
                    ->append_kv(pool_.view, {0, k.data(), v.data(), DType::kF32,
                                             static_cast<uint32_t>(n), slots.data()})
                    .ok());
    const auto [gk, gv] = gather();
    for (size_t i = first; i < first + n; ++i) {
      stored_k_.emplace_back(gk.begin() + i * kRow, gk.begin() + (i + 1) * kRow);
      stored_v_.emplace_back(gv.begin() + i * kRow, gv.begin() + (i + 1) * kRow);
      positions_.push_back(next_position_++);
      scores_.push_back(0.0);
    }
  }

  void append(size_t n, bool planted = false) {
    ASSERT_TRUE((manager_.get_sequence(kSeq) == nullptr ? manager_.allocate(kSeq, n)
                                                        : manager_.append(kSeq, n))
                    .ok());
    flush();
    write_tokens(n, planted);
  }

  void flush() {
    const auto copies = manager_.take_pending_copies();
    const GroupTokenCopies batch[] = {{pool_.view, copies}};
    ASSERT_TRUE(backend_->compact_tokens(batch).ok());
  }

  // One decode step: a query near the planted direction; returns the output and adds each
  // token's attention mass to its score.
  std::vector<float> decode(std::vector<float>& query) {
    query = testing::random_normal(size_t{kQHeads} * kHeadDim, rng_, 0.2f);
    for (uint32_t h = 0; h < kQHeads; ++h)
      for (uint32_t d = 0; d < kHeadDim; ++d)
        query[h * kHeadDim + d] += direction_[d];
    const auto t = table();
    const uint32_t n = static_cast<uint32_t>(manager_.get_sequence(kSeq)->num_tokens);
    std::vector<float> out(query.size()), mass(n);
    DecodeAttentionArgs args;
    args.query = query.data();
    args.output = out.data();
    args.num_seqs = 1;
    args.num_q_heads = kQHeads;
    args.block_tables = t.data();
    args.max_blocks_per_seq = static_cast<uint32_t>(t.size());
    args.context_lens = &n;
    args.softmax_scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
    args.attention_mass = mass.data();
    args.mass_stride = n;
    EXPECT_TRUE(backend_->paged_decode_attention(pool_.view, args).ok());
    for (uint32_t i = 0; i < n; ++i)
      scores_[i] += mass[i];
    return out;
  }

  // H2O: keep `budget` tokens, the newest `recent` of them regardless of score.
  void compress(size_t budget, size_t recent) {
    const auto keep = quant::select_heavy_hitters(scores_, budget, recent);
    auto dropped = manager_.retain_tokens(kSeq, keep);
    ASSERT_TRUE(dropped.ok()) << dropped.status();
    ASSERT_EQ(*dropped, scores_.size() - keep.size());
    flush();
    auto pick = [&](auto& rows) {
      std::remove_reference_t<decltype(rows)> kept;
      for (size_t i : keep)
        kept.push_back(rows[i]);
      rows = std::move(kept);
    };
    pick(stored_k_);
    pick(stored_v_);
    pick(positions_);
    pick(scores_);
  }

  std::unique_ptr<Backend> backend_;
  testing::TestPool pool_;
  PagedKvCache manager_{kBlocks, kBlockSize, kKvHeads, kHeadDim};
  std::mt19937 rng_{2026};
  std::vector<float> direction_;
  // What the engine tracks per retained token, in table order.
  std::vector<std::vector<float>> stored_k_, stored_v_;
  std::vector<size_t> positions_;
  std::vector<double> scores_;
  size_t next_position_ = 0;
};

TEST_P(H2oCompaction, AttentionMassDrivesWhatStays) {
  const std::vector<size_t> planted = {3, 20, 41};
  for (size_t p = 0; p < 64; ++p)
    append(1, std::find(planted.begin(), planted.end(), p) != planted.end());

  constexpr size_t kBudget = 32, kRecent = 16, kSlack = 8;
  std::vector<float> query, out;
  for (int step = 0; step < 60; ++step) {
    out = decode(query);
    if (scores_.size() >= kBudget + kSlack) compress(kBudget, kRecent);
    append(1);
  }
  out = decode(query);

  // The planted heavy hitters and the newest kRecent tokens survived.
  for (size_t p : planted)
    EXPECT_TRUE(std::find(positions_.begin(), positions_.end(), p) != positions_.end()) << p;
  ASSERT_GE(positions_.size(), kRecent);
  for (size_t i = 0; i < kRecent; ++i)
    EXPECT_EQ(positions_[positions_.size() - 1 - i], next_position_ - 1 - i);
  EXPECT_LE(manager_.get_sequence(kSeq)->num_tokens, kBudget + kSlack);
  EXPECT_EQ(manager_.used_block_count(), manager_.get_sequence(kSeq)->num_blocks());

  // Every retained token reads back exactly as it was stored.
  const auto [k, v] = gather();
  const size_t n = positions_.size();
  for (size_t i = 0; i < n; ++i) {
    ASSERT_TRUE(std::equal(stored_k_[i].begin(), stored_k_[i].end(), k.begin() + i * kRow))
        << "K of token " << positions_[i];
    ASSERT_TRUE(std::equal(stored_v_[i].begin(), stored_v_[i].end(), v.begin() + i * kRow))
        << "V of token " << positions_[i];
  }

  // The last decode step attended over exactly those rows.
  for (uint32_t qh = 0; qh < kQHeads; ++qh) {
    const uint32_t h = qh / kGqa;
    std::vector<double> kh(n * kHeadDim), vh(n * kHeadDim);
    for (size_t t = 0; t < n; ++t)
      for (uint32_t d = 0; d < kHeadDim; ++d) {
        kh[t * kHeadDim + d] = stored_k_[t][h * kHeadDim + d];
        vh[t * kHeadDim + d] = stored_v_[t][h * kHeadDim + d];
      }
    const std::vector<double> q(query.begin() + qh * kHeadDim, query.begin() + (qh + 1) * kHeadDim);
    const auto expected = testing::ref_attention(q, kh.data(), vh.data(), static_cast<uint32_t>(n),
                                                 kHeadDim, 1.0 / std::sqrt(double{kHeadDim}));
    for (uint32_t d = 0; d < kHeadDim; ++d)
      ASSERT_NEAR(out[qh * kHeadDim + d], expected[d], 2e-5 + 2e-5 * std::fabs(expected[d]))
          << "head " << qh << " dim " << d;
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, H2oCompaction,
                         ::testing::Values(DType::kF32, DType::kF16, DType::kFP8E4M3, DType::kInt8,
                                           DType::kInt4),
                         [](const auto& param) { return std::string(dtype_name(param.param)); });

}  // namespace
}  // namespace kvfabric
