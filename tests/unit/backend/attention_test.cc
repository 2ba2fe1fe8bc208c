// Paged decode and prefill attention against fp64 references: exact math over the stored values,
// and per-dtype error bounds against attention over the original f32 inputs.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "kvfabric/quant/numeric.h"
#include "testing/backend_fixture.h"
#include "testing/kv_reference.h"

namespace kvfabric {
namespace {

using testing::RawPool;

struct Scenario {
  std::unique_ptr<Backend> backend;
  testing::TestPool pool;
  uint32_t heads, head_dim, block_size, max_blocks;
  std::vector<uint32_t> lens;
  std::vector<uint32_t> tables;          // [seqs][max_blocks], padded with kInvalidBlockId
  std::vector<std::vector<float>> keys;  // per seq [len][heads][hd] original f32
  std::vector<std::vector<float>> values;

  // Stored (dequantized) K or V of one (seq, head), read with the independent decoder: [len][hd].
  std::vector<double> stored(uint32_t s, uint32_t h, uint32_t kv) const {
    const RawPool raw(pool.arena.data(), 1, heads, block_size, head_dim, pool.layout.dtype,
                      pool.layout.group_size);
    std::vector<double> out(uint64_t{lens[s]} * head_dim);
    for (uint32_t t = 0; t < lens[s]; ++t) {
      const uint32_t b = tables[uint64_t{s} * max_blocks + t / block_size];
      for (uint32_t d = 0; d < head_dim; ++d)
        out[uint64_t{t} * head_dim + d] = raw.at(b, 0, kv, h, t % block_size, d);
    }
    return out;
  }

  std::vector<double> original(uint32_t s, uint32_t h, uint32_t kv) const {
    const auto& src = kv == 0 ? keys[s] : values[s];
    std::vector<double> out(uint64_t{lens[s]} * head_dim);
    for (uint32_t t = 0; t < lens[s]; ++t) {
      for (uint32_t d = 0; d < head_dim; ++d)
        out[uint64_t{t} * head_dim + d] = src[(uint64_t{t} * heads + h) * head_dim + d];
    }
    return out;
  }
};

// `constant_keys`: every (token, head) key row holds one value, so integer groups store all-equal
// codes.
Scenario make_scenario(CpuIsa isa, DType dtype, uint32_t head_dim, uint32_t block_size,
                       uint32_t heads, std::vector<uint32_t> lens, uint32_t seed,
                       uint32_t int_group_size = 32, bool constant_keys = false) {
  Scenario sc;
  sc.backend = testing::cpu_backend(isa);
  sc.heads = heads;
  sc.head_dim = head_dim;
  sc.block_size = block_size;
  sc.lens = std::move(lens);
  uint32_t total_blocks = 0;
  sc.max_blocks = 0;
  for (uint32_t len : sc.lens) {
    const uint32_t b = (len + block_size - 1) / block_size;
    total_blocks += b;
    sc.max_blocks = std::max(sc.max_blocks, b);
  }
  const uint32_t group = is_integer_quantized(dtype) ? int_group_size : 0;
  sc.pool = testing::TestPool::create(*sc.backend, 1, heads, block_size, head_dim, dtype, group,
                                      total_blocks + 3);
  std::mt19937 rng(seed);
  const auto blocks = testing::shuffled_blocks(total_blocks, total_blocks + 3, rng);
  sc.tables.assign(sc.lens.size() * sc.max_blocks, kInvalidBlockId.value);
  uint32_t next = 0;
  for (uint32_t s = 0; s < sc.lens.size(); ++s) {
    const uint32_t len = sc.lens[s];
    for (uint32_t b = 0; b < (len + block_size - 1) / block_size; ++b)
      sc.tables[s * sc.max_blocks + b] = blocks[next++];
    sc.keys.push_back(testing::random_normal(uint64_t{len} * heads * head_dim, rng));
    if (constant_keys) {
      auto& k = sc.keys.back();
      for (uint64_t i = 0; i < k.size(); ++i)
        k[i] = k[i - i % head_dim];
    }
    sc.values.push_back(testing::random_normal(uint64_t{len} * heads * head_dim, rng));
    std::vector<int64_t> slots(len);
    for (uint32_t t = 0; t < len; ++t)
      slots[t] =
          int64_t{sc.tables[s * sc.max_blocks + t / block_size]} * block_size + t % block_size;
    EXPECT_TRUE(sc.backend
                    ->append_kv(sc.pool.view, {0, sc.keys[s].data(), sc.values[s].data(),
                                               DType::kF32, len, slots.data()})
                    .ok());
  }
  return sc;
}

// Bound on |attention(stored) - attention(original)| for one query head: logits move by at most
// delta = scale * sum_i |q_i| * err(k_i); softmax weights by a factor e^{+-2 delta}; so
// |dO_d| <= (e^{2 delta} - 1) * max_t |v_td| + max_t err(v_td)  (+ float slack).
struct ErrorBound {
  std::vector<double> k_err;         // [n][hd] element bounds of the original K
  std::vector<double> v_max, v_err;  // [hd]

  ErrorBound(DType dtype, const std::vector<double>& k, const std::vector<double>& v, uint32_t n,
             uint32_t hd, uint32_t group)
      : k_err(uint64_t{n} * hd), v_max(hd, 0.0), v_err(hd, 0.0) {
    const uint32_t g = group == 0 ? hd : group;
    std::vector<float> row(hd);
    for (uint32_t t = 0; t < n; ++t) {
      for (uint32_t i = 0; i < hd; ++i)
        row[i] = static_cast<float>(k[uint64_t{t} * hd + i]);
      for (uint32_t i = 0; i < hd; ++i) {
        k_err[uint64_t{t} * hd + i] =
            testing::element_error_bound(dtype, row.data() + (i / g) * g, g, row[i]);
      }
      for (uint32_t i = 0; i < hd; ++i)
        row[i] = static_cast<float>(v[uint64_t{t} * hd + i]);
      for (uint32_t i = 0; i < hd; ++i) {
        v_max[i] = std::max(v_max[i], std::fabs(double{row[i]}));
        v_err[i] = std::max(
            v_err[i], testing::element_error_bound(dtype, row.data() + (i / g) * g, g, row[i]));
      }
    }
  }

  // `delta_q`: the logits' further error from quantizing the query (query_quantization_delta).
  [[nodiscard]] std::vector<double> for_query(const std::vector<double>& q, uint32_t n, uint32_t hd,
                                              double scale, double delta_q = 0) const {
    double delta = 0;
    for (uint32_t t = 0; t < n; ++t) {
      double logit_err = 0;
      for (uint32_t i = 0; i < hd; ++i)
        logit_err += std::fabs(q[i]) * k_err[uint64_t{t} * hd + i];
      delta = std::max(delta, scale * logit_err);
    }
    delta += delta_q;
    std::vector<double> bound(hd);
    for (uint32_t d = 0; d < hd; ++d)
      bound[d] = (std::exp(2 * delta) - 1) * v_max[d] + v_err[d] + 1e-4;
    return bound;
  }
};

// Integer formats read the query quantized per row to int8 (scale max|q| / 127, so each element
// moves by at most max|q| / 254; cpu::QueryRows): each logit moves by at most
// delta_q = max|q| / 254 * sum_i |k_ti| (q times the softmax scale), each softmax weight by a
// factor e^{+-2 delta_q}, and each output element by (e^{2 delta_q} - 1) * max_t |v_td|.
double query_quantization_delta(DType dtype, const std::vector<double>& q, const double* k,
                                uint32_t n, uint32_t hd, double scale) {
  if (!is_integer_quantized(dtype)) return 0.0;
  double qmax = 0, kmax = 0;
  for (double x : q)
    qmax = std::max(qmax, std::fabs(x) * scale);
  for (uint32_t t = 0; t < n; ++t) {
    double sum = 0;
    for (uint32_t i = 0; i < hd; ++i)
      sum += std::fabs(k[uint64_t{t} * hd + i]);
    kmax = std::max(kmax, sum);
  }
  return qmax / 254.0 * kmax;
}

// The query row as the integer formats' kernels use it (cpu::quantize_query, in the same float
// steps): q * scale rounded to a multiple of max|q * scale| / 127, softmax scale included.
std::vector<double> quantized_query(const float* q, uint32_t hd, float scale) {
  std::vector<float> scaled(q, q + hd);
  float absmax = 0.0f;
  for (float& x : scaled) {
    x *= scale;
    absmax = std::max(absmax, std::fabs(x));
  }
  const float inv = absmax > 0.0f ? 127.0f / absmax : 0.0f, step = absmax / 127.0f;
  std::vector<double> out(hd);
  for (uint32_t d = 0; d < hd; ++d)
    out[d] = double{step} * std::clamp(std::rint(scaled[d] * inv), -127.0f, 127.0f);
  return out;
}

double max_abs_column(const std::vector<double>& v, uint32_t n, uint32_t hd, uint32_t d) {
  double m = 0;
  for (uint32_t t = 0; t < n; ++t)
    m = std::max(m, std::fabs(v[uint64_t{t} * hd + d]));
  return m;
}

enum class QueryShape {
  kNormal,   // N(0, 1)
  kOutlier,  // N(0, 1) with one element per row at +-40 (the int8 step is then 40 / 127)
};

std::vector<float> make_query(QueryShape shape, uint64_t rows, uint32_t hd, std::mt19937& rng) {
  auto q = testing::random_normal(rows * hd, rng);
  if (shape == QueryShape::kOutlier) {
    for (uint64_t r = 0; r < rows; ++r)
      q[r * hd + (r * 7) % hd] = r % 2 == 0 ? 40.0f : -40.0f;
  }
  return q;
}

// Decode attention over ragged lengths (a single token, a partial last block, exact multiples, a
// longer context) against the exact math over the stored values and the format's error bound.
void expect_decode_matches_reference(CpuIsa isa, DType dtype, uint32_t head_dim,
                                     uint32_t block_size, uint32_t gqa,
                                     uint32_t int_group_size = 32,
                                     QueryShape query_shape = QueryShape::kNormal,
                                     bool constant_keys = false) {
  const uint32_t heads = 2, q_heads = heads * gqa;
  Scenario sc = make_scenario(
      isa, dtype, head_dim, block_size, heads, {1, block_size + 3, 2 * block_size, 97},
      head_dim + block_size + gqa + int_group_size, int_group_size, constant_keys);
  const uint32_t seqs = static_cast<uint32_t>(sc.lens.size());
  std::mt19937 rng(99);
  const auto query = make_query(query_shape, uint64_t{seqs} * q_heads, head_dim, rng);
  std::vector<float> out(query.size());
  const uint32_t mass_stride = 100;
  std::vector<float> mass(uint64_t{seqs} * mass_stride, -7.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  DecodeAttentionArgs args;
  args.query = query.data();
  args.output = out.data();
  args.num_seqs = seqs;
  args.num_q_heads = q_heads;
  args.block_tables = sc.tables.data();
  args.max_blocks_per_seq = sc.max_blocks;
  args.context_lens = sc.lens.data();
  args.softmax_scale = scale;
  args.attention_mass = mass.data();
  args.mass_stride = mass_stride;
  ASSERT_TRUE(sc.backend->paged_decode_attention(sc.pool.view, args).ok());

  for (uint32_t s = 0; s < seqs; ++s) {
    std::vector<double> mass_ref(sc.lens[s], 0.0);
    double mass_factor = 1.0;  // max over the rows of e^{2 delta_q}
    for (uint32_t h = 0; h < heads; ++h) {
      const auto k_stored = sc.stored(s, h, 0), v_stored = sc.stored(s, h, 1);
      const auto k_orig = sc.original(s, h, 0), v_orig = sc.original(s, h, 1);
      const uint32_t group = is_integer_quantized(dtype) ? sc.pool.layout.group_size : 0;
      const ErrorBound bounds(dtype, k_orig, v_orig, sc.lens[s], head_dim, group);
      for (uint32_t g = 0; g < gqa; ++g) {
        const uint32_t qh = h * gqa + g;
        const float* qp = query.data() + (uint64_t{s} * q_heads + qh) * head_dim;
        const std::vector<double> q(qp, qp + head_dim);
        const double delta_q =
            query_quantization_delta(dtype, q, k_stored.data(), sc.lens[s], head_dim, scale);
        mass_factor = std::max(mass_factor, std::exp(2 * delta_q));
        const auto bound = bounds.for_query(q, sc.lens[s], head_dim, scale, delta_q);
        std::vector<double> weights;
        const auto exact = testing::ref_attention(q, k_stored.data(), v_stored.data(), sc.lens[s],
                                                  head_dim, scale, &weights);
        const auto ideal =
            testing::ref_attention(q, k_orig.data(), v_orig.data(), sc.lens[s], head_dim, scale);
        for (uint32_t t = 0; t < sc.lens[s]; ++t)
          mass_ref[t] += weights[t];
        // Integer formats: the exact math over the stored values with the quantized query, which
        // the kernels compute up to float rounding.
        const auto exact_quantized =
            is_integer_quantized(dtype)
                ? testing::ref_attention(quantized_query(qp, head_dim, scale), k_stored.data(),
                                         v_stored.data(), sc.lens[s], head_dim, 1.0)
                : exact;
        for (uint32_t d = 0; d < head_dim; ++d) {
          const double got = out[(uint64_t{s} * q_heads + qh) * head_dim + d];
          ASSERT_NEAR(got, exact_quantized[d], 2e-5 + 2e-5 * std::fabs(exact_quantized[d]))
              << "seq " << s << " head " << qh << " dim " << d << " (with the quantized query)";
          const double query_error =
              (std::exp(2 * delta_q) - 1) * max_abs_column(v_stored, sc.lens[s], head_dim, d);
          ASSERT_NEAR(got, exact[d], 2e-5 + 2e-5 * std::fabs(exact[d]) + query_error)
              << "seq " << s << " head " << qh << " dim " << d << " (math over the stored values)";
          ASSERT_LE(std::fabs(got - ideal[d]), bound[d])
              << dtype_name(dtype) << " seq " << s << " head " << qh << " dim " << d;
        }
      }
    }
    for (uint32_t t = 0; t < sc.lens[s]; ++t) {
      ASSERT_NEAR(mass[s * mass_stride + t], mass_ref[t], 1e-5 + (mass_factor - 1) * mass_ref[t])
          << "mass of seq " << s << " token " << t;
    }
    for (uint32_t t = sc.lens[s]; t < mass_stride; ++t)
      ASSERT_EQ(mass[s * mass_stride + t], -7.0f);
  }
}

class DecodeAttention
    : public ::testing::TestWithParam<std::tuple<CpuIsa, DType, uint32_t, uint32_t, uint32_t>> {};

TEST_P(DecodeAttention, MatchesFp64Reference) {
  const auto [isa, dtype, head_dim, block_size, gqa] = GetParam();
  expect_decode_matches_reference(isa, dtype, head_dim, block_size, gqa);
}

INSTANTIATE_TEST_SUITE_P(AllShapes, DecodeAttention,
                         ::testing::Combine(::testing::ValuesIn(testing::cpu_isas()),
                                            ::testing::ValuesIn(kAllDTypes),
                                            ::testing::Values(64u, 128u),
                                            ::testing::Values(1u, 16u, 32u),
                                            ::testing::Values(1u, 4u, 8u)));

// The kernels read integer formats one scale/zero group at a time: groups smaller than the
// 16-element steps of pv, and groups as long as the whole row.
class DecodeAttentionGroups
    : public ::testing::TestWithParam<std::tuple<CpuIsa, DType, uint32_t, uint32_t>> {};

TEST_P(DecodeAttentionGroups, MatchesFp64Reference) {
  const auto [isa, dtype, group_size, gqa] = GetParam();
  expect_decode_matches_reference(isa, dtype, 128, 16, gqa, group_size);
}

INSTANTIATE_TEST_SUITE_P(
    IntegerFormats, DecodeAttentionGroups,
    ::testing::Combine(::testing::ValuesIn(testing::cpu_isas()),
                       ::testing::Values(DType::kInt8, DType::kInt4, DType::kInt2),
                       ::testing::Values(8u, 16u, 64u, 128u), ::testing::Values(1u, 4u)));

// The quantized query's bound on the integer formats' edge cases: a query with outliers (a coarse
// int8 step for the other elements), keys whose groups hold all-equal codes, groups smaller than
// the kernels' 32-element steps, head_dims that are not a multiple of 32 (the generic kernel
// then), ragged sequences.
enum class IntCase { kNormal, kQueryOutliers, kConstantKeys };

// (head_dim, group size) pairs whose groups tile the row: 8, 16 and 32 where they divide it, and
// the whole row.
std::vector<std::pair<uint32_t, uint32_t>> row_groupings() {
  std::vector<std::pair<uint32_t, uint32_t>> pairs;
  for (uint32_t head_dim : {64u, 80u, 96u, 128u, 256u}) {
    for (uint32_t group : {8u, 16u, 32u, head_dim}) {
      if (head_dim % group == 0) pairs.emplace_back(head_dim, group);
    }
  }
  return pairs;
}

class DecodeAttentionQuantizedQuery
    : public ::testing::TestWithParam<
          std::tuple<CpuIsa, DType, std::pair<uint32_t, uint32_t>, IntCase>> {};

TEST_P(DecodeAttentionQuantizedQuery, StaysWithinTheStatedBound) {
  const auto [isa, dtype, grouping, int_case] = GetParam();
  const auto [head_dim, group] = grouping;
  expect_decode_matches_reference(
      isa, dtype, head_dim, 16, 4, group,
      int_case == IntCase::kQueryOutliers ? QueryShape::kOutlier : QueryShape::kNormal,
      int_case == IntCase::kConstantKeys);
}

INSTANTIATE_TEST_SUITE_P(
    IntegerFormats, DecodeAttentionQuantizedQuery,
    ::testing::Combine(::testing::ValuesIn(testing::cpu_isas()),
                       ::testing::Values(DType::kInt8, DType::kInt4, DType::kInt2),
                       ::testing::ValuesIn(row_groupings()),
                       ::testing::Values(IntCase::kNormal, IntCase::kQueryOutliers,
                                         IntCase::kConstantKeys)));

class PrefillAttention
    : public ::testing::TestWithParam<std::tuple<CpuIsa, DType, uint32_t, uint32_t>> {};

TEST_P(PrefillAttention, CausalOverCachedPrefixAndNewTokens) {
  const auto [isa, dtype, block_size, gqa] = GetParam();
  const uint32_t heads = 2, q_heads = heads * gqa, head_dim = 64;
  Scenario sc =
      make_scenario(isa, dtype, head_dim, block_size, heads, {21, 40, 5}, block_size * 13 + gqa);
  // Sequence 0: 5 new tokens after a 16-token cached prefix; 1: all 40 new; 2: one new token.
  const std::vector<uint32_t> q_lens = {5, 40, 1};
  std::vector<uint32_t> starts = {0};
  for (uint32_t q : q_lens)
    starts.push_back(starts.back() + q);
  std::mt19937 rng(5);
  const auto query = testing::random_normal(uint64_t{starts.back()} * q_heads * head_dim, rng);
  std::vector<float> out(query.size());
  const float scale = 0.125f;
  PrefillAttentionArgs args;
  args.query = query.data();
  args.output = out.data();
  args.num_seqs = 3;
  args.num_q_heads = q_heads;
  args.query_start = starts.data();
  args.context_lens = sc.lens.data();
  args.block_tables = sc.tables.data();
  args.max_blocks_per_seq = sc.max_blocks;
  args.softmax_scale = scale;
  ASSERT_TRUE(sc.backend->paged_prefill_attention(sc.pool.view, args).ok());

  for (uint32_t s = 0; s < 3; ++s) {
    for (uint32_t h = 0; h < heads; ++h) {
      const auto k = sc.stored(s, h, 0), v = sc.stored(s, h, 1);
      for (uint32_t i = 0; i < q_lens[s]; ++i) {
        const uint32_t visible = sc.lens[s] - q_lens[s] + i + 1;
        for (uint32_t g = 0; g < gqa; ++g) {
          const uint32_t qh = h * gqa + g;
          const uint64_t row = (uint64_t{starts[s]} + i) * q_heads + qh;
          const std::vector<double> q(query.begin() + row * head_dim,
                                      query.begin() + (row + 1) * head_dim);
          const auto ref = testing::ref_attention(q, k.data(), v.data(), visible, head_dim, scale);
          const double delta_q =
              query_quantization_delta(dtype, q, k.data(), visible, head_dim, scale);
          for (uint32_t d = 0; d < head_dim; ++d) {
            const double query_error =
                (std::exp(2 * delta_q) - 1) * max_abs_column(v, visible, head_dim, d);
            ASSERT_NEAR(out[row * head_dim + d], ref[d],
                        2e-5 + 2e-5 * std::fabs(ref[d]) + query_error)
                << "seq " << s << " query " << i << " head " << qh << " dim " << d;
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllShapes, PrefillAttention,
    ::testing::Combine(::testing::ValuesIn(testing::cpu_isas()),
                       ::testing::Values(DType::kF32, DType::kBF16, DType::kFP8E4M3, DType::kInt4),
                       ::testing::Values(1u, 16u, 32u), ::testing::Values(1u, 4u, 8u)));

// The integer formats' qk sums codes times query codes exactly in int32 on every x86 ISA (AVX2's
// maddubs, VNNI's dpbusd over rows transposed in registers), and the float steps after are the
// same: decode outputs agree bit for bit (groups of 32 or more; smaller groups scale lanes apart).
TEST(Attention, IntegerFormatsDecodeBitForBitOnAvx2AndVnni) {
  const auto isas = testing::cpu_isas();
  if (std::find(isas.begin(), isas.end(), CpuIsa::kAvx2Vnni) == isas.end()) {
    GTEST_SKIP() << "the processor has no AVX512-VNNI";
  }
  for (DType dtype : {DType::kInt8, DType::kInt4, DType::kInt2}) {
    for (uint32_t group : {32u, 64u, 128u}) {
      for (uint32_t gqa : {1u, 3u, 4u, 8u}) {  // passes of 4, 2 and 1 rows
        std::vector<float> outputs[2];
        for (int i = 0; i < 2; ++i) {
          Scenario sc = make_scenario(i == 0 ? CpuIsa::kAvx2 : CpuIsa::kAvx2Vnni, dtype, 128, 16,
                                      2, {1, 19, 32, 61}, 7, group);
          std::mt19937 rng(5);
          const auto query = make_query(QueryShape::kNormal, 4ull * 2 * gqa, 128, rng);
          outputs[i].assign(query.size(), 0.0f);
          DecodeAttentionArgs args;
          args.query = query.data();
          args.output = outputs[i].data();
          args.num_seqs = 4;
          args.num_q_heads = 2 * gqa;
          args.block_tables = sc.tables.data();
          args.max_blocks_per_seq = sc.max_blocks;
          args.context_lens = sc.lens.data();
          args.softmax_scale = 0.125f;
          ASSERT_TRUE(sc.backend->paged_decode_attention(sc.pool.view, args).ok());
        }
        EXPECT_EQ(std::memcmp(outputs[0].data(), outputs[1].data(), outputs[0].size() * 4), 0)
            << dtype_name(dtype) << " group " << group << " gqa " << gqa;
      }
    }
  }
}

TEST(Attention, HalfPrecisionQueriesAndOutputs) {
  Scenario sc = make_scenario(CpuIsa::kAuto, DType::kF16, 64, 16, 1, {30}, 3);
  std::mt19937 rng(8);
  const auto qf = testing::random_normal(64, rng);
  std::vector<uint16_t> q(64), out(64);
  for (int d = 0; d < 64; ++d)
    q[d] = numeric::f32_to_bf16(qf[d]);
  DecodeAttentionArgs args;
  args.query = q.data();
  args.query_dtype = DType::kBF16;
  args.output = out.data();
  args.num_seqs = 1;
  args.num_q_heads = 1;
  args.block_tables = sc.tables.data();
  args.max_blocks_per_seq = sc.max_blocks;
  args.context_lens = sc.lens.data();
  args.softmax_scale = 0.125f;
  ASSERT_TRUE(sc.backend->paged_decode_attention(sc.pool.view, args).ok());
  std::vector<double> qd(64);
  for (int d = 0; d < 64; ++d)
    qd[d] = testing::ref_bf16(q[d]);
  const auto k = sc.stored(0, 0, 0), v = sc.stored(0, 0, 1);
  const auto ref = testing::ref_attention(qd, k.data(), v.data(), 30, 64, 0.125);
  for (int d = 0; d < 64; ++d) {
    EXPECT_NEAR(testing::ref_bf16(out[d]), ref[d], std::fabs(ref[d]) * std::ldexp(1.0, -8) + 1e-5);
  }
}

TEST(Attention, RejectsBadArguments) {
  Scenario sc = make_scenario(CpuIsa::kAuto, DType::kF16, 64, 16, 2, {20}, 4);
  std::vector<float> q(3 * 64), out(3 * 64, 1.0f);
  DecodeAttentionArgs args;
  args.query = q.data();
  args.output = out.data();
  args.num_seqs = 1;
  args.num_q_heads = 3;  // not a multiple of 2 KV heads
  args.block_tables = sc.tables.data();
  args.max_blocks_per_seq = sc.max_blocks;
  args.context_lens = sc.lens.data();
  EXPECT_NE(sc.backend->paged_decode_attention(sc.pool.view, args).message().find("num_q_heads 3"),
            std::string::npos);
  args.num_q_heads = 2;
  const uint32_t too_long = 33;
  args.context_lens = &too_long;
  EXPECT_NE(
      sc.backend->paged_decode_attention(sc.pool.view, args).message().find("context length 33"),
      std::string::npos);
  const uint32_t bad_table[2] = {0, kInvalidBlockId.value};
  const uint32_t len = 20;
  args.block_tables = bad_table;
  args.context_lens = &len;
  EXPECT_NE(sc.backend->paged_decode_attention(sc.pool.view, args).message().find("entry 1"),
            std::string::npos);
  args.layer = 1;
  EXPECT_NE(sc.backend->paged_decode_attention(sc.pool.view, args).message().find("layer 1"),
            std::string::npos);
  // Regression: a NaN or infinite scale was computed into all-NaN outputs.
  args.layer = 0;
  args.block_tables = sc.tables.data();
  for (const float scale : {NAN, INFINITY}) {
    args.softmax_scale = scale;
    EXPECT_THAT(sc.backend->paged_decode_attention(sc.pool.view, args).message(),
                ::testing::HasSubstr("softmax_scale"));
    const uint32_t starts[2] = {0, 1};
    PrefillAttentionArgs prefill;
    prefill.query = q.data();
    prefill.output = out.data();
    prefill.num_seqs = 1;
    prefill.num_q_heads = 2;
    prefill.query_start = starts;
    prefill.context_lens = &len;
    prefill.block_tables = sc.tables.data();
    prefill.max_blocks_per_seq = sc.max_blocks;
    prefill.softmax_scale = scale;
    EXPECT_THAT(sc.backend->paged_prefill_attention(sc.pool.view, prefill).message(),
                ::testing::HasSubstr("softmax_scale"));
  }
  for (float o : out)
    EXPECT_EQ(o, 1.0f);  // nothing written
}

// A decode (one query token per sequence) and a prefill (query tokens `starts`, the caller's:
// the args point into it) over every sequence of `sc`, with `q_heads` query heads.
DecodeAttentionArgs decode_args(const Scenario& sc, const float* q, float* out, uint32_t q_heads) {
  DecodeAttentionArgs args;
  args.query = q;
  args.output = out;
  args.num_seqs = static_cast<uint32_t>(sc.lens.size());
  args.num_q_heads = q_heads;
  args.block_tables = sc.tables.data();
  args.max_blocks_per_seq = sc.max_blocks;
  args.context_lens = sc.lens.data();
  return args;
}

PrefillAttentionArgs prefill_args(const Scenario& sc, const float* q, float* out,
                                  uint32_t q_heads, const uint32_t* starts) {
  PrefillAttentionArgs args;
  args.query = q;
  args.output = out;
  args.num_seqs = static_cast<uint32_t>(sc.lens.size());
  args.num_q_heads = q_heads;
  args.query_start = starts;
  args.context_lens = sc.lens.data();
  args.block_tables = sc.tables.data();
  args.max_blocks_per_seq = sc.max_blocks;
  return args;
}

// A NaN or infinite query made its outputs NaN; it is refused by name, as K and V are, and
// nothing is written.
TEST(Attention, ANonFiniteQueryIsRefusedByName) {
  Scenario sc = make_scenario(CpuIsa::kAuto, DType::kF16, 64, 16, 2, {20, 9}, 4);
  std::mt19937 rng(5);
  for (const float bad : {NAN, INFINITY, -INFINITY}) {
    std::vector<float> q = testing::random_normal(2 * 4 * 64, rng), out(q.size(), 1.0f);
    q[(1 * 4 + 3) * 64 + 7] = bad;  // sequence 1, query head 3, dim 7
    EXPECT_THAT(
        sc.backend->paged_decode_attention(sc.pool.view, decode_args(sc, q.data(), out.data(), 4))
            .message(),
        ::testing::HasSubstr("query[token 1, head 3, dim 7] is not finite"));
    const uint32_t starts[3] = {0, 1, 2};
    const auto prefill = prefill_args(sc, q.data(), out.data(), 4, starts);
    EXPECT_THAT(sc.backend->paged_prefill_attention(sc.pool.view, prefill).message(),
                ::testing::HasSubstr("query[token 1, head 3, dim 7] is not finite"));
    for (float o : out)
      EXPECT_EQ(o, 1.0f);
  }
}

// The output may be the query itself (each row is read before it is written), not a shifted view
// of it: sequence 0's output would overwrite sequence 1's query before it is read. The attention
// mass may overlap neither.
TEST(Attention, AnOutputThatPartlyOverlapsTheQueryIsRefused) {
  Scenario sc = make_scenario(CpuIsa::kAuto, DType::kF16, 64, 16, 2, {20, 9}, 4);
  std::mt19937 rng(6);
  const uint64_t rows = 2 * 4 * 64;
  const std::vector<float> q = testing::random_normal(rows, rng);
  std::vector<float> separate(rows);
  DecodeAttentionArgs args = decode_args(sc, q.data(), separate.data(), 4);
  ASSERT_TRUE(sc.backend->paged_decode_attention(sc.pool.view, args).ok());

  std::vector<float> buffer(rows + 4 * 64);  // room for the query shifted by one sequence
  std::copy(q.begin(), q.end(), buffer.begin());
  args.query = buffer.data();
  args.output = buffer.data() + 4 * 64;
  EXPECT_THAT(sc.backend->paged_decode_attention(sc.pool.view, args).message(),
              ::testing::HasSubstr("output overlaps the query without being it"));
  EXPECT_TRUE(std::equal(q.begin(), q.end(), buffer.begin()));  // nothing written
  args.output = buffer.data();  // the query itself: the same outputs
  ASSERT_TRUE(sc.backend->paged_decode_attention(sc.pool.view, args).ok());
  EXPECT_TRUE(std::equal(separate.begin(), separate.end(), buffer.begin()));

  std::copy(q.begin(), q.end(), buffer.begin());
  std::vector<float> out(rows);
  args.output = out.data();
  args.attention_mass = buffer.data();  // over the query
  args.mass_stride = 32;
  EXPECT_THAT(sc.backend->paged_decode_attention(sc.pool.view, args).message(),
              ::testing::HasSubstr("attention_mass overlaps the query or the output"));
  args.attention_mass = out.data() + 8;  // inside the output
  EXPECT_THAT(sc.backend->paged_decode_attention(sc.pool.view, args).message(),
              ::testing::HasSubstr("attention_mass overlaps the query or the output"));

  const uint32_t starts[3] = {0, 1, 2};
  const auto prefill = prefill_args(sc, buffer.data(), buffer.data() + 64,  // one head later
                                    4, starts);
  EXPECT_THAT(sc.backend->paged_prefill_attention(sc.pool.view, prefill).message(),
              ::testing::HasSubstr("output overlaps the query without being it"));
  EXPECT_TRUE(std::equal(q.begin(), q.end(), buffer.begin()));
}

}  // namespace
}  // namespace kvfabric
