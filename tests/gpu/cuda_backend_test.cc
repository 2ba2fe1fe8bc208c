// gpu label: every CUDA kernel against the CPU backend on the same inputs. Bytes written and moved
// must be identical; attention agrees within float tolerance (different summation order and the
// GPU's exp). The host-staged transport moves device blocks through pinned host memory bit-exact.
// Skips with the driver's reason when there is no device.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <tuple>

#include "kvfabric/backend/cuda_backend.h"
#include "kvfabric/quant/numeric.h"
#include "kvfabric/runtime/staged_transport.h"
#include "testing/backend_fixture.h"
#include "testing/block_pattern.h"
#include "testing/kv_reference.h"

namespace kvfabric {
namespace {

class CudaVsCpu : public ::testing::Test {
 protected:
  void SetUp() override {
    auto cuda = make_cuda_backend();
    if (!cuda.ok()) GTEST_SKIP() << "no CUDA backend: " << cuda.status().message();
    cuda_ = std::move(cuda).value();
    cpu_ = testing::cpu_backend(CpuIsa::kAuto);
  }

  // A buffer in CUDA memory holding `host`.
  template <typename T>
  KvArena to_device(const std::vector<T>& host) {
    KvArena a =
        cuda_->allocate_arena(std::max<uint64_t>(host.size() * sizeof(T), 16), Tier::kDevice)
            .value();
    EXPECT_TRUE(cuda_->upload(a.data(), host.data(), host.size() * sizeof(T)).ok());
    return a;
  }
  template <typename T>
  std::vector<T> to_host(const KvArena& a, uint64_t count) {
    std::vector<T> out(count);
    EXPECT_TRUE(cuda_->download(out.data(), a.data(), count * sizeof(T)).ok());
    return out;
  }
  std::vector<uint8_t> pool_bytes(const testing::TestPool& pool) {
    return to_host<uint8_t>(pool.arena, pool.arena.bytes());
  }

  // Fills the same random K/V into a CPU pool and a CUDA pool through append_kv.
  void fill_both(testing::TestPool& cpu, testing::TestPool& gpu, uint32_t layer,
                 const std::vector<int64_t>& slots, std::mt19937& rng, DType input = DType::kF32) {
    const uint64_t n = slots.size() * cpu.view.num_kv_heads * cpu.view.head_dim;
    auto k = testing::random_normal(n, rng), v = testing::random_normal(n, rng);
    if (input == DType::kF32) {
      auto dk = to_device(k), dv = to_device(v);
      ASSERT_TRUE(cpu_->append_kv(cpu.view, {layer, k.data(), v.data(), input,
                                             uint32_t(slots.size()), slots.data()})
                      .ok());
      const Status s = cuda_->append_kv(
          gpu.view, {layer, dk.data(), dv.data(), input, uint32_t(slots.size()), slots.data()});
      ASSERT_TRUE(s.ok()) << s;
      return;
    }
    std::vector<uint16_t> k16(n), v16(n);
    for (uint64_t i = 0; i < n; ++i) {
      k16[i] = input == DType::kF16 ? numeric::f32_to_f16(k[i]) : numeric::f32_to_bf16(k[i]);
      v16[i] = input == DType::kF16 ? numeric::f32_to_f16(v[i]) : numeric::f32_to_bf16(v[i]);
    }
    auto dk = to_device(k16), dv = to_device(v16);
    ASSERT_TRUE(cpu_->append_kv(cpu.view, {layer, k16.data(), v16.data(), input,
                                           uint32_t(slots.size()), slots.data()})
                    .ok());
    ASSERT_TRUE(cuda_
                    ->append_kv(gpu.view, {layer, dk.data(), dv.data(), input,
                                           uint32_t(slots.size()), slots.data()})
                    .ok());
  }

  std::unique_ptr<Backend> cuda_, cpu_;
};

class CudaCache : public CudaVsCpu,
                  public ::testing::WithParamInterface<std::tuple<DType, uint32_t, uint32_t>> {};

TEST_P(CudaCache, AppendWritesTheCpuBytesAndGatherReadsThemBack) {
  const auto [dtype, head_dim, block_size] = GetParam();
  const uint32_t group = is_integer_quantized(dtype) ? 32 : 0, blocks = 24;
  auto cpu = testing::TestPool::create(*cpu_, 2, 2, block_size, head_dim, dtype, group, blocks);
  auto gpu = testing::TestPool::create(*cuda_, 2, 2, block_size, head_dim, dtype, group, blocks);
  std::mt19937 rng(head_dim + block_size);
  const uint32_t tokens = 5 * block_size + 3;
  const auto table = testing::shuffled_blocks((tokens + block_size - 1) / block_size, blocks, rng);
  std::vector<int64_t> slots(tokens);
  for (uint32_t t = 0; t < tokens; ++t)
    slots[t] = int64_t{table[t / block_size]} * block_size + t % block_size;
  slots[7] = -1;  // padding tokens are skipped by both
  for (DType input : {DType::kF32, DType::kF16, DType::kBF16}) {
    fill_both(cpu, gpu, input == DType::kF32 ? 0 : 1, slots, rng, input);
  }
  ASSERT_EQ(pool_bytes(gpu), cpu.snapshot())
      << dtype_name(dtype) << " hd " << head_dim << " bs " << block_size;

  const uint64_t n = uint64_t{tokens} * 2 * head_dim;
  std::vector<float> k_cpu(n), v_cpu(n);
  ASSERT_TRUE(
      cpu_->gather_kv(cpu.view, {1, table.data(), tokens, k_cpu.data(), v_cpu.data()}).ok());
  KvArena dk = cuda_->allocate_arena(n * 4, Tier::kDevice).value(),
          dv = cuda_->allocate_arena(n * 4, Tier::kDevice).value();
  ASSERT_TRUE(
      cuda_
          ->gather_kv(gpu.view, {1, table.data(), tokens, reinterpret_cast<float*>(dk.data()),
                                 reinterpret_cast<float*>(dv.data())})
          .ok());
  EXPECT_EQ(to_host<float>(dk, n), k_cpu);
  EXPECT_EQ(to_host<float>(dv, n), v_cpu);
}

INSTANTIATE_TEST_SUITE_P(AllFormats, CudaCache,
                         ::testing::Combine(::testing::ValuesIn(kAllDTypes),
                                            ::testing::Values(64u, 128u),
                                            ::testing::Values(16u, 32u)));

class CudaAttention
    : public CudaVsCpu,
      public ::testing::WithParamInterface<std::tuple<DType, uint32_t, uint32_t, uint32_t>> {};

TEST_P(CudaAttention, DecodeAndPrefillMatchTheCpuBackend) {
  const auto [dtype, head_dim, block_size, gqa] = GetParam();
  const uint32_t heads = 2, q_heads = heads * gqa, group = is_integer_quantized(dtype) ? 32 : 0;
  // Ragged: one token, a partial block, two blocks, and contexts past one 512-token split.
  const std::vector<uint32_t> lens = {1, block_size + 3, 2 * block_size, 700, 1100};
  uint32_t max_blocks = 0, total_blocks = 0;
  for (uint32_t len : lens) {
    max_blocks = std::max(max_blocks, (len + block_size - 1) / block_size);
    total_blocks += (len + block_size - 1) / block_size;
  }
  auto cpu = testing::TestPool::create(*cpu_, 1, heads, block_size, head_dim, dtype, group,
                                       total_blocks + 2);
  auto gpu = testing::TestPool::create(*cuda_, 1, heads, block_size, head_dim, dtype, group,
                                       total_blocks + 2);
  std::mt19937 rng(head_dim * 3 + block_size + gqa);
  const auto blocks = testing::shuffled_blocks(total_blocks, total_blocks + 2, rng);
  std::vector<uint32_t> tables(lens.size() * max_blocks, kInvalidBlockId.value);
  uint32_t next = 0;
  for (uint32_t s = 0; s < lens.size(); ++s) {
    std::vector<int64_t> slots(lens[s]);
    for (uint32_t b = 0; b < (lens[s] + block_size - 1) / block_size; ++b)
      tables[s * max_blocks + b] = blocks[next++];
    for (uint32_t t = 0; t < lens[s]; ++t)
      slots[t] = int64_t{tables[s * max_blocks + t / block_size]} * block_size + t % block_size;
    fill_both(cpu, gpu, 0, slots, rng);
  }
  ASSERT_EQ(pool_bytes(gpu), cpu.snapshot());

  const uint32_t seqs = static_cast<uint32_t>(lens.size());
  const auto q = testing::random_normal(uint64_t{seqs} * q_heads * head_dim, rng);
  auto dq = to_device(q);
  std::vector<float> out_cpu(q.size());
  KvArena out_gpu = cuda_->allocate_arena(q.size() * 4, Tier::kDevice).value();
  const uint32_t mass_stride = 1104;
  std::vector<float> mass_cpu(uint64_t{seqs} * mass_stride, 0.0f);
  KvArena mass_gpu = cuda_->allocate_arena(mass_cpu.size() * 4, Tier::kDevice).value();
  DecodeAttentionArgs args;
  args.query_dtype = DType::kF32;
  args.num_seqs = seqs;
  args.num_q_heads = q_heads;
  args.block_tables = tables.data();
  args.max_blocks_per_seq = max_blocks;
  args.context_lens = lens.data();
  args.softmax_scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  args.mass_stride = mass_stride;
  args.query = q.data();
  args.output = out_cpu.data();
  args.attention_mass = mass_cpu.data();
  ASSERT_TRUE(cpu_->paged_decode_attention(cpu.view, args).ok());
  args.query = dq.data();
  args.output = out_gpu.data();
  args.attention_mass = reinterpret_cast<float*>(mass_gpu.data());
  const Status s = cuda_->paged_decode_attention(gpu.view, args);
  ASSERT_TRUE(s.ok()) << s;
  const auto out = to_host<float>(out_gpu, q.size());
  for (size_t i = 0; i < out.size(); ++i) {
    ASSERT_NEAR(out[i], out_cpu[i], 2e-4 + 2e-3 * std::fabs(out_cpu[i])) << "decode element " << i;
  }
  const auto mass = to_host<float>(mass_gpu, mass_cpu.size());
  for (uint32_t s2 = 0; s2 < seqs; ++s2) {
    for (uint32_t t = 0; t < lens[s2]; ++t) {
      ASSERT_NEAR(mass[s2 * mass_stride + t], mass_cpu[s2 * mass_stride + t], 1e-4)
          << "mass " << s2 << "," << t;
    }
  }

  // Prefill: the last q_len tokens of each sequence attend causally.
  std::vector<uint32_t> starts = {0};
  for (uint32_t len : lens)
    starts.push_back(starts.back() + std::min(len, 9u));
  const auto pq = testing::random_normal(uint64_t{starts.back()} * q_heads * head_dim, rng);
  auto dpq = to_device(pq);
  std::vector<float> pout_cpu(pq.size());
  KvArena pout_gpu = cuda_->allocate_arena(pq.size() * 4, Tier::kDevice).value();
  PrefillAttentionArgs pre;
  pre.num_seqs = seqs;
  pre.num_q_heads = q_heads;
  pre.query_start = starts.data();
  pre.context_lens = lens.data();
  pre.block_tables = tables.data();
  pre.max_blocks_per_seq = max_blocks;
  pre.softmax_scale = 0.1f;
  pre.query = pq.data();
  pre.output = pout_cpu.data();
  ASSERT_TRUE(cpu_->paged_prefill_attention(cpu.view, pre).ok());
  pre.query = dpq.data();
  pre.output = pout_gpu.data();
  ASSERT_TRUE(cuda_->paged_prefill_attention(gpu.view, pre).ok());
  const auto pout = to_host<float>(pout_gpu, pq.size());
  for (size_t i = 0; i < pout.size(); ++i) {
    ASSERT_NEAR(pout[i], pout_cpu[i], 2e-4 + 2e-3 * std::fabs(pout_cpu[i]))
        << "prefill element " << i;
  }
}

// GQA 1 and 3 pad a CTA's four query heads with zero heads; 8 takes two CTAs per KV head.
INSTANTIATE_TEST_SUITE_P(AllShapes, CudaAttention,
                         ::testing::Combine(::testing::ValuesIn(kAllDTypes),
                                            ::testing::Values(64u, 128u, 256u),
                                            ::testing::Values(16u, 32u),
                                            ::testing::Values(1u, 3u, 4u, 8u)));

TEST_F(CudaVsCpu, CopiesCompactionsAndSwapsMoveTheSameBytes) {
  for (DType dtype : {DType::kF16, DType::kInt4, DType::kFP8E4M3}) {
    const uint32_t group = is_integer_quantized(dtype) ? 32 : 0;
    auto cpu = testing::TestPool::create(*cpu_, 2, 2, 16, 64, dtype, group, 16);
    auto gpu = testing::TestPool::create(*cuda_, 2, 2, 16, 64, dtype, group, 16);
    std::mt19937 rng(9);
    std::vector<int64_t> slots(256);
    for (int t = 0; t < 256; ++t)
      slots[t] = t;
    fill_both(cpu, gpu, 0, slots, rng);
    fill_both(cpu, gpu, 1, slots, rng);
    // A chain (B1 then read back from B1), a shift inside one block (memmove), and plain copies.
    const std::vector<TokenCopy> copies = {
        {BlockId{0}, 0, BlockId{1}, 3, 5, CopyReason::kCopyOnWrite},
        {BlockId{1}, 2, BlockId{2}, 0, 9, CopyReason::kCompaction},
        {BlockId{3}, 4, BlockId{3}, 1, 12, CopyReason::kCompaction},
        {BlockId{4}, 0, BlockId{4}, 6, 10, CopyReason::kCompaction},
        {BlockId{5}, 0, BlockId{6}, 0, 16, CopyReason::kCopyOnWrite}};
    ASSERT_TRUE(cpu_->compact_tokens(std::vector<GroupTokenCopies>{{cpu.view, copies}}).ok());
    ASSERT_TRUE(cuda_->compact_tokens(std::vector<GroupTokenCopies>{{gpu.view, copies}}).ok());
    ASSERT_EQ(pool_bytes(gpu), cpu.snapshot()) << dtype_name(dtype) << " after compact_tokens";
    const std::vector<BlockMove> moves = {{7, 8}, {8, 9}, {2, 7}};
    ASSERT_TRUE(cpu_->copy_blocks(std::vector<GroupBlockCopies>{{cpu.view, moves}}).ok());
    ASSERT_TRUE(cuda_->copy_blocks(std::vector<GroupBlockCopies>{{gpu.view, moves}}).ok());
    ASSERT_EQ(pool_bytes(gpu), cpu.snapshot()) << dtype_name(dtype) << " after copy_blocks";

    // Device -> pinned host -> device in one launch each.
    KvArena host = cuda_->allocate_arena(16 * gpu.view.block_bytes, Tier::kHost).value();
    const PagedKvView host_view = PagedKvView::make(gpu.layout, host.data(), 16);
    const std::vector<BlockMove> out = {{1, 5}, {9, 0}, {3, 15}}, in = {{5, 10}, {0, 11}, {15, 12}};
    ASSERT_TRUE(cuda_->swap_blocks(gpu.view, host_view, out).ok());
    ASSERT_TRUE(cuda_->swap_blocks(host_view, gpu.view, in).ok());
    ASSERT_TRUE(cuda_->synchronize().ok());
    const auto bytes = pool_bytes(gpu);
    const uint64_t bb = gpu.view.block_bytes;
    for (auto [from, to] : std::vector<std::pair<int, int>>{{1, 10}, {9, 11}, {3, 12}}) {
      EXPECT_TRUE(std::equal(bytes.begin() + from * bb, bytes.begin() + (from + 1) * bb,
                             bytes.begin() + to * bb))
          << dtype_name(dtype) << " swap of B" << from;
    }
  }
}

// make_host_staged_transport on this backend over the local transport: device blocks (a run of
// adjacent ones and scattered ones) go to pinned host memory and back to other device blocks
// bit-exact, the sent blocks keep their bytes, and an exchange larger than the first
// staging granule grows the staging and still arrives exact.
TEST_F(CudaVsCpu, StagedTransportMovesDeviceBlocksBitExact) {
  const std::unique_ptr<Transport> local = make_local_transport();
  auto made = make_host_staged_transport(*local, *cuda_);
  ASSERT_TRUE(made.ok()) << made.status();
  Transport& staged = **made;
  for (const uint64_t block_bytes : {uint64_t{4000}, uint64_t{700} * 1024}) {
    constexpr uint64_t kBlocks = 12;  // sent from [0, 12), received into a shuffle of [12, 24)
    std::vector<uint8_t> host(2 * kBlocks * block_bytes, 0x5A);
    for (uint64_t i = 0; i < kBlocks; ++i)
      testing::fill_pattern(host.data() + i * block_bytes, block_bytes,
                            testing::block_seed(0, 0, 0, i));
    KvArena arena = to_device(host);
    std::vector<uint64_t> order(kBlocks);
    std::iota(order.begin(), order.end(), kBlocks);
    std::shuffle(order.begin(), order.end(), std::mt19937_64(block_bytes));
    // Sent: blocks 0..5 in order (one run), then 11, 7, 9, 6, 10, 8 (scattered).
    const std::vector<uint64_t> sent_index = {0, 1, 2, 3, 4, 5, 11, 7, 9, 6, 10, 8};
    std::vector<uint8_t*> sent, received;
    for (uint64_t i = 0; i < kBlocks; ++i) {
      sent.push_back(arena.data() + sent_index[i] * block_bytes);
      received.push_back(arena.data() + order[i] * block_bytes);
    }
    const BlockBatch send{RankId{0}, sent, block_bytes};
    const BlockBatch recv{RankId{0}, received, block_bytes};
    const Status s = staged.exchange_blocks({&send, 1}, {&recv, 1});
    ASSERT_TRUE(s.ok()) << s;
    const std::vector<uint8_t> after = to_host<uint8_t>(arena, host.size());
    for (uint64_t i = 0; i < kBlocks; ++i) {
      EXPECT_TRUE(testing::has_pattern(after.data() + order[i] * block_bytes, block_bytes,
                                       testing::block_seed(0, 0, 0, sent_index[i])))
          << block_bytes << "-byte block " << i;
    }
    EXPECT_TRUE(std::equal(after.begin(), after.begin() + kBlocks * block_bytes, host.begin()))
        << "the sent blocks are unchanged";
  }
}

TEST_F(CudaVsCpu, RejectsNonFiniteInputsAndUncompiledShapes) {
  auto gpu = testing::TestPool::create(*cuda_, 1, 1, 16, 64, DType::kInt8, 32, 4);
  const auto before = pool_bytes(gpu);
  std::vector<float> k(2 * 64, 1.0f);
  k[64 + 9] = NAN;
  auto dk = to_device(k);
  const std::vector<int64_t> slots = {0, 1};
  const Status s =
      cuda_->append_kv(gpu.view, {0, dk.data(), dk.data(), DType::kF32, 2, slots.data()});
  EXPECT_NE(s.message().find("key[token 1, head 0, dim 9]"), std::string::npos) << s;
  EXPECT_EQ(pool_bytes(gpu), before);

  // A host pointer would fault on the GPU: refused with the argument's name.
  const Status host_memory =
      cuda_->append_kv(gpu.view, {0, k.data(), k.data(), DType::kF32, 2, slots.data()});
  EXPECT_NE(host_memory.message().find("key is not GPU-accessible"), std::string::npos)
      << host_memory;
  EXPECT_EQ(pool_bytes(gpu), before);

  auto odd = testing::TestPool::create(*cuda_, 1, 1, 16, 96, DType::kF16, 0, 4);
  const uint32_t table[1] = {0}, len = 3;
  std::vector<float> q(96), o(96);
  auto dq = to_device(q);
  DecodeAttentionArgs args;
  args.query = dq.data();
  args.output = dq.data();
  args.num_seqs = 1;
  args.num_q_heads = 1;
  args.block_tables = table;
  args.max_blocks_per_seq = 1;
  args.context_lens = &len;
  EXPECT_EQ(cuda_->paged_decode_attention(odd.view, args).code(), ErrorCode::kUnimplemented);
}

}  // namespace
}  // namespace kvfabric
