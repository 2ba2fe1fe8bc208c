// append_kv writes what the documented layout says and gather_kv reads it back, for every dtype,
// head_dim, block size and ISA; bad input is refused without touching the pool.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <tuple>

#include "kvfabric/quant/numeric.h"
#include "testing/backend_fixture.h"
#include "testing/kv_reference.h"

namespace kvfabric {
namespace {

using testing::RawPool;

class AppendGather
    : public ::testing::TestWithParam<std::tuple<CpuIsa, DType, uint32_t, uint32_t>> {};

TEST_P(AppendGather, StoredBytesAndGatherMatchTheReference) {
  const auto [isa, dtype, head_dim, block_size] = GetParam();
  auto backend = testing::cpu_backend(isa);
  const uint32_t layers = 2, heads = 2, group = is_integer_quantized(dtype) ? 32 : 0;
  const uint32_t tokens = 3 * block_size + 5;  // a partial last block
  const uint32_t blocks_needed = (tokens + block_size - 1) / block_size;
  auto pool = testing::TestPool::create(*backend, layers, heads, block_size, head_dim, dtype, group,
                                        blocks_needed + 7);
  std::mt19937 rng(head_dim * 7 + block_size);
  const auto table = testing::shuffled_blocks(blocks_needed, blocks_needed + 7, rng);
  std::vector<int64_t> slots(tokens);
  for (uint32_t t = 0; t < tokens; ++t)
    slots[t] = int64_t{table[t / block_size]} * block_size + t % block_size;

  for (uint32_t layer = 0; layer < layers; ++layer) {
    const auto key = testing::random_normal(uint64_t{tokens} * heads * head_dim, rng);
    const auto value = testing::random_normal(uint64_t{tokens} * heads * head_dim, rng);
    AppendKvArgs args{layer, key.data(), value.data(), DType::kF32, tokens, slots.data()};
    ASSERT_TRUE(backend->append_kv(pool.view, args).ok());

    std::vector<float> k_out(key.size()), v_out(value.size());
    GatherKvArgs gather{layer, table.data(), tokens, k_out.data(), v_out.data()};
    ASSERT_TRUE(backend->gather_kv(pool.view, gather).ok());

    const RawPool raw(pool.arena.data(), layers, heads, block_size, head_dim, dtype, group);
    ASSERT_EQ(raw.block_bytes(), pool.layout.block_bytes());
    const uint32_t g = group == 0 ? head_dim : group;
    for (uint32_t t = 0; t < tokens; ++t) {
      for (uint32_t h = 0; h < heads; ++h) {
        for (uint32_t d = 0; d < head_dim; ++d) {
          const uint64_t i = (uint64_t{t} * heads + h) * head_dim + d;
          const uint32_t b = table[t / block_size], off = t % block_size;
          const double stored_k = raw.at(b, layer, 0, h, off, d);
          const double stored_v = raw.at(b, layer, 1, h, off, d);
          ASSERT_EQ(k_out[i], stored_k) << "gather differs from the stored K at token " << t;
          ASSERT_EQ(v_out[i], stored_v) << "gather differs from the stored V at token " << t;
          const float* kg = key.data() + (i / g) * g;
          ASSERT_LE(std::fabs(stored_k - key[i]),
                    testing::element_error_bound(dtype, kg, g, key[i]))
              << dtype_name(dtype) << " K token " << t << " head " << h << " dim " << d;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllShapes, AppendGather,
                         ::testing::Combine(::testing::ValuesIn(testing::cpu_isas()),
                                            ::testing::ValuesIn(kAllDTypes),
                                            ::testing::Values(64u, 128u),
                                            ::testing::Values(1u, 16u, 32u)));

TEST(AppendKv, HalfPrecisionInputs) {
  auto backend = testing::cpu_backend(CpuIsa::kAuto);
  auto pool = testing::TestPool::create(*backend, 1, 1, 16, 64, DType::kF32, 0, 4);
  std::vector<uint16_t> k(64), v(64);
  for (int d = 0; d < 64; ++d) {
    k[d] = numeric::f32_to_f16(static_cast<float>(d) / 8);
    v[d] = numeric::f32_to_bf16(-static_cast<float>(d));
  }
  const int64_t slot = 17;
  ASSERT_TRUE(backend->append_kv(pool.view, {0, k.data(), k.data(), DType::kF16, 1, &slot}).ok());
  const testing::RawPool raw(pool.arena.data(), 1, 1, 16, 64, DType::kF32, 0);
  EXPECT_EQ(raw.at(1, 0, 0, 0, 1, 9), 9.0 / 8);
  ASSERT_TRUE(backend->append_kv(pool.view, {0, v.data(), v.data(), DType::kBF16, 1, &slot}).ok());
  EXPECT_EQ(raw.at(1, 0, 1, 0, 1, 5), -5.0);
}

class AppendRejects : public ::testing::Test {
 protected:
  void SetUp() override {
    backend_ = testing::cpu_backend(CpuIsa::kAuto);
    pool_ = testing::TestPool::create(*backend_, 2, 2, 16, 64, DType::kInt8, 32, 4);
    key_ = std::vector<float>(2 * 2 * 64, 0.5f);
    value_ = key_;
    before_ = pool_.snapshot();
  }

  Status append(std::vector<int64_t> slots, uint32_t layer = 0) {
    return backend_->append_kv(pool_.view, {layer, key_.data(), value_.data(), DType::kF32,
                                            static_cast<uint32_t>(slots.size()), slots.data()});
  }

  std::unique_ptr<Backend> backend_;
  testing::TestPool pool_;
  std::vector<float> key_, value_;
  std::vector<uint8_t> before_;
};

TEST_F(AppendRejects, NonFiniteValues) {
  value_[1 * 2 * 64 + 64 + 3] = NAN;  // token 1, head 1, dim 3
  const Status s = append({0, 1});
  EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument);
  EXPECT_NE(s.message().find("value[token 1, head 1, dim 3]"), std::string::npos) << s;
  value_[1 * 2 * 64 + 64 + 3] = 0;
  key_[5] = -INFINITY;
  EXPECT_NE(append({0, 1}).message().find("key[token 0, head 0, dim 5]"), std::string::npos);
  EXPECT_EQ(pool_.snapshot(), before_);
}

// Finite values a pool cannot hold used to be stored as infinity (f16, bf16) or as NaN (an
// integer group whose range overflows): they are refused by name, and nothing is written.
TEST(AppendKv, RejectsValuesThePoolWouldStoreAsInfinity) {
  auto backend = testing::cpu_backend(CpuIsa::kAuto);
  struct Case {
    DType pool;
    float fits, too_large;
    const char* why;
  };
  for (const Case& c : {Case{DType::kF16, 65504.0f, 1e6f, "it would be stored as infinity"},
                        Case{DType::kBF16, 3.3e38f, 3.4e38f, "it would be stored as infinity"},
                        Case{DType::kInt8, 1e38f, 2e38f, "integer KV takes |x| < 2^127"},
                        Case{DType::kInt4, 1e38f, -2e38f, "integer KV takes |x| < 2^127"}}) {
    auto pool = testing::TestPool::create(*backend, 1, 2, 16, 64, c.pool,
                                          is_integer_quantized(c.pool) ? 32 : 0, 2);
    const auto before = pool.snapshot();
    std::vector<float> key(2 * 2 * 64, 1.0f), value = key;
    std::vector<int64_t> slots = {0, 1};
    value[1 * 128 + 64 + 3] = c.too_large;  // token 1, head 1, dim 3
    value[1 * 128 + 64 + 4] = -c.fits;
    const Status s =
        backend->append_kv(pool.view, {0, key.data(), value.data(), DType::kF32, 2, slots.data()});
    EXPECT_EQ(s.code(), ErrorCode::kInvalidArgument) << dtype_name(c.pool);
    EXPECT_THAT(s.message(), ::testing::HasSubstr("value[token 1, head 1, dim 3] = "));
    EXPECT_THAT(s.message(), ::testing::HasSubstr("is too large for " +
                                                  std::string(dtype_name(c.pool)) + " KV"));
    EXPECT_THAT(s.message(), ::testing::HasSubstr(c.why));
    EXPECT_EQ(pool.snapshot(), before);
    value[1 * 128 + 64 + 3] = c.fits;  // the largest values it holds are stored finite
    ASSERT_TRUE(
        backend->append_kv(pool.view, {0, key.data(), value.data(), DType::kF32, 2, slots.data()})
            .ok());
    std::vector<float> k_out(2 * 2 * 64), v_out(k_out.size());
    const uint32_t table[1] = {0};
    ASSERT_TRUE(backend->gather_kv(pool.view, {0, table, 2, k_out.data(), v_out.data()}).ok());
    for (float x : v_out) EXPECT_TRUE(std::isfinite(x)) << dtype_name(c.pool);
  }
}

// fp8 rows of magnitudes below 448 / FLT_MAX kept their zeros as -absmax (0 * inf = NaN in the
// encoder) on every ISA; they read back within fp8's precision, zeros as zeros.
TEST(AppendKv, Fp8RowsOfTinyValuesReadBackOnEveryIsa) {
  for (const CpuIsa isa : testing::cpu_isas()) {
    auto backend = testing::cpu_backend(isa);
    auto pool = testing::TestPool::create(*backend, 1, 2, 16, 64, DType::kFP8E4M3, 0, 1);
    std::vector<float> key(2 * 64, 0.0f);
    for (uint32_t i = 0; i < key.size(); i += 3) key[i] = (i % 2 == 0 ? 1e-37f : -5e-38f);
    const std::vector<float> value = key;
    const int64_t slot = 0;
    ASSERT_TRUE(
        backend->append_kv(pool.view, {0, key.data(), value.data(), DType::kF32, 1, &slot}).ok());
    std::vector<float> k_out(key.size()), v_out(key.size());
    const uint32_t table[1] = {0};
    ASSERT_TRUE(backend->gather_kv(pool.view, {0, table, 1, k_out.data(), v_out.data()}).ok());
    for (size_t i = 0; i < key.size(); ++i) {
      EXPECT_LE(std::fabs(k_out[i] - key[i]), 1e-37f / 16) << cpu_isa_name(isa) << " " << i;
      EXPECT_EQ(k_out[i] == 0.0f, key[i] == 0.0f) << cpu_isa_name(isa) << " " << i;
    }
  }
}

// Key and value are checked in one pass over token ranges on two threads: still the first bad
// token of the key, or else of the value, whichever thread finds which.
TEST(AppendKv, RejectsTheFirstNonFiniteTokenOfLargeInputs) {
  auto backend = testing::cpu_backend(CpuIsa::kAuto, 2);
  const uint32_t tokens = 1100;  // 1100 x 2 x 64 x 2 elements: the check runs in parallel
  auto pool = testing::TestPool::create(*backend, 1, 2, 16, 64, DType::kInt8, 32, 70);
  const auto before = pool.snapshot();
  std::vector<float> key(uint64_t{tokens} * 2 * 64, 0.25f), value = key;
  std::vector<int64_t> slots(tokens);
  for (uint32_t t = 0; t < tokens; ++t)
    slots[t] = t;
  auto append = [&] {
    return backend->append_kv(pool.view,
                              {0, key.data(), value.data(), DType::kF32, tokens, slots.data()});
  };
  value[10 * 128 + 64 + 2] = NAN;   // token 10, head 1, dim 2
  value[900 * 128 + 5] = NAN;       // token 900
  key[1000 * 128 + 70] = INFINITY;  // token 1000, head 1, dim 6
  key[1050 * 128 + 1] = NAN;
  Status s = append();
  EXPECT_NE(s.message().find("key[token 1000, head 1, dim 6]"), std::string::npos) << s;
  key[1000 * 128 + 70] = 0;
  key[1050 * 128 + 1] = 0;
  s = append();
  EXPECT_NE(s.message().find("value[token 10, head 1, dim 2]"), std::string::npos) << s;
  EXPECT_EQ(pool.snapshot(), before);
  value[10 * 128 + 64 + 2] = 0;
  value[900 * 128 + 5] = 0;
  EXPECT_TRUE(append().ok());
}

TEST_F(AppendRejects, BadSlotsAndLayers) {
  EXPECT_NE(append({0, 64}).message().find("slot 64"), std::string::npos);
  EXPECT_NE(append({3, 3}).message().find("two tokens map to slot 3"), std::string::npos);
  EXPECT_NE(append({0, -2}).message().find("slot -2"), std::string::npos);
  EXPECT_NE(append({0, 1}, 2).message().find("layer 2"), std::string::npos);
  EXPECT_EQ(pool_.snapshot(), before_);
  EXPECT_TRUE(append({-1, -1}).ok());  // padding tokens are skipped
  EXPECT_EQ(pool_.snapshot(), before_);
}

TEST(GatherKv, RejectsTablesOutsideThePool) {
  auto backend = testing::cpu_backend(CpuIsa::kAuto);
  auto pool = testing::TestPool::create(*backend, 1, 1, 16, 64, DType::kF16, 0, 2);
  const uint32_t table[2] = {1, 9};
  std::vector<float> k(20 * 64), v(20 * 64);
  const Status s = backend->gather_kv(pool.view, {0, table, 20, k.data(), v.data()});
  EXPECT_NE(s.message().find("B9"), std::string::npos) << s;
}

}  // namespace
}  // namespace kvfabric

namespace kvfabric {
namespace {

// The AVX2 encoder writes exactly the bytes of the portable one (and of quant::encode_row), for
// every format and input dtype, constant groups and subnormal-range values included.
TEST(AppendKv, EveryIsaWritesIdenticalBytes) {
  if (testing::cpu_isas().size() < 2) GTEST_SKIP() << "this processor has no AVX2: one ISA only";
  std::mt19937 rng(77);
  for (DType dtype : kAllDTypes) {
    for (DType input : {DType::kF32, DType::kF16, DType::kBF16}) {
      std::vector<std::vector<uint8_t>> pools;
      for (CpuIsa isa : testing::cpu_isas()) {
        auto backend = testing::cpu_backend(isa);
        auto pool = testing::TestPool::create(*backend, 1, 2, 16, 128, dtype,
                                              is_integer_quantized(dtype) ? 32 : 0, 4);
        std::mt19937 data_rng(5);
        auto k = testing::random_normal(64 * 2 * 128, data_rng, 3.0f);
        for (int i = 0; i < 128; ++i)
          k[2 * 128 + i] = 0.75f;  // a constant row / groups
        for (int i = 0; i < 128; ++i)
          k[4 * 128 + i] *= 1e-6f;  // fp8 subnormal codes
        std::vector<uint16_t> k16(k.size());
        for (size_t i = 0; i < k.size(); ++i) {
          k16[i] = input == DType::kF16 ? numeric::f32_to_f16(k[i]) : numeric::f32_to_bf16(k[i]);
        }
        std::vector<int64_t> slots(64);
        for (int t = 0; t < 64; ++t)
          slots[t] = t;
        const void* data = input == DType::kF32 ? static_cast<const void*>(k.data()) : k16.data();
        ASSERT_TRUE(backend->append_kv(pool.view, {0, data, data, input, 64, slots.data()}).ok());
        pools.push_back(pool.snapshot());
      }
      EXPECT_EQ(pools[0], pools[1]) << dtype_name(dtype) << " from " << dtype_name(input);
    }
  }
}

// The integer encoders compute eight groups' parameters at once (and store codes around the
// caches for large appends): still the reference's bytes for groups that are constant, one-signed,
// on exact half steps (rounding ties), of f32 ranges so small that 1 / scale overflows, for group
// sizes above 32, head counts whose groups are no multiple of eight, and in streaming size.
// On a processor with one ISA only the portable encoder runs alone (nothing to compare).
TEST(AppendKv, IntegerEncodersMatchTheReferenceOnEdgeGroups) {
  struct Shape {
    uint32_t heads, head_dim, group, block, tokens;
  };
  const Shape shapes[] = {{3, 64, 32, 16, 37}, {2, 128, 64, 8, 37}, {5, 96, 32, 16, 21},
                          {1, 256, 128, 16, 19}, {8, 128, 32, 16, 40}, {2, 32, 32, 4, 9}};
  std::mt19937 rng(2024);
  auto fill = [&](std::vector<float>& x, uint32_t group, uint32_t qmax) {
    std::uniform_int_distribution<int> kind_of(0, 6);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (size_t g = 0; g < x.size() / group; ++g) {
      float* v = x.data() + g * group;
      const int kind = kind_of(rng);
      // within f16's range (65504) with the outlier below
      const float scale = std::pow(10.0f, std::uniform_real_distribution<float>(-3, 1.5f)(rng));
      std::uniform_int_distribution<int> half_steps(-static_cast<int>(qmax),
                                                    static_cast<int>(qmax));
      for (uint32_t i = 0; i < group; ++i) {
        const float n = normal(rng);
        switch (kind) {
          case 0: v[i] = n * scale; break;
          case 1: v[i] = std::fabs(n) * scale; break;
          case 2: v[i] = -std::fabs(n) * scale; break;
          case 3: v[i] = (g % 3 == 0 ? 0.0f : (g % 3 == 1 ? 1.0f : -1.0f)) * scale; break;
          case 4: v[i] = 0.5f * static_cast<float>(half_steps(rng)); break;  // scale 1: ties
          case 5: v[i] = n * 1e-39f; break;  // subnormal f32: 1 / scale overflows
          default: v[i] = i == 7 ? 1e3f * scale : n; break;
        }
      }
      if (kind == 4) {  // the range exactly [-qmax / 2, qmax / 2]
        v[0] = -0.5f * static_cast<float>(qmax);
        v[group - 1] = 0.5f * static_cast<float>(qmax);
      }
    }
  };
  auto check = [&](DType dtype, DType input, const Shape& s) {
    const uint32_t qmax = (1u << dtype_bits(dtype)) - 1u;
    const uint64_t n = uint64_t{s.tokens} * s.heads * s.head_dim;
    std::vector<float> k(n), v(n);
    fill(k, s.group, qmax);
    fill(v, s.group, qmax);
    std::vector<uint16_t> k16(n), v16(n);
    for (uint64_t i = 0; i < n; ++i) {
      k16[i] = input == DType::kF16 ? numeric::f32_to_f16(k[i]) : numeric::f32_to_bf16(k[i]);
      v16[i] = input == DType::kF16 ? numeric::f32_to_f16(v[i]) : numeric::f32_to_bf16(v[i]);
    }
    const uint32_t blocks = (s.tokens + s.block - 1) / s.block + 3;
    std::vector<int64_t> slots(s.tokens);
    for (uint32_t t = 0; t < s.tokens; ++t)  // from the middle of a block, the last one first
      slots[t] = (t + 3) % (uint64_t{blocks} * s.block);
    std::vector<std::vector<uint8_t>> pools;
    for (CpuIsa isa : testing::cpu_isas()) {
      auto backend = testing::cpu_backend(isa);
      auto pool =
          testing::TestPool::create(*backend, 1, s.heads, s.block, s.head_dim, dtype, s.group, blocks);
      const bool f32 = input == DType::kF32;
      const void* kd = f32 ? static_cast<const void*>(k.data()) : k16.data();
      const void* vd = f32 ? static_cast<const void*>(v.data()) : v16.data();
      const Status st = backend->append_kv(pool.view, {0, kd, vd, input, s.tokens, slots.data()});
      ASSERT_TRUE(st.ok()) << st;
      pools.push_back(pool.snapshot());
    }
    for (size_t i = 1; i < pools.size(); ++i) {
      EXPECT_EQ(pools[0], pools[i]) << dtype_name(dtype) << " from " << dtype_name(input)
                                    << ", heads " << s.heads << ", head_dim " << s.head_dim
                                    << ", group " << s.group << ", ISA " << i;
    }
  };
  for (DType dtype : {DType::kInt8, DType::kInt4, DType::kInt2}) {
    for (DType input : {DType::kF32, DType::kF16, DType::kBF16}) {
      for (const Shape& s : shapes)
        check(dtype, input, s);
    }
  }
  // Appends of more than 8 MiB of codes store them with non-temporal stores.
  check(DType::kInt8, DType::kF16, {8, 128, 32, 16, 4200});
  check(DType::kInt4, DType::kF32, {8, 128, 32, 16, 8400});
}

}  // namespace
}  // namespace kvfabric
