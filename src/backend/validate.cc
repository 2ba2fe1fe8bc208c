#include "backend/validate.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <unordered_set>
#include <vector>

#include "kvfabric/quant/quantize.h"

namespace kvfabric::detail {
namespace {

std::string str(std::string_view s) {
  return std::string(s);
}

// Checks that the first blocks_needed entries of a block table name blocks of the pool.
Status validate_table(const PagedKvView& pool, const uint32_t* table, uint64_t blocks_needed,
                      std::string_view op, uint32_t seq) {
  for (uint64_t i = 0; i < blocks_needed; ++i) {
    if (table[i] >= pool.num_blocks) {
      return invalid_argument(str(op) + ": sequence " + std::to_string(seq) +
                              " block table entry " + std::to_string(i) + " is " +
                              to_string(BlockId{table[i]}) + ", outside the pool of " +
                              std::to_string(pool.num_blocks) + " blocks");
    }
  }
  return ok_status();
}

Status validate_heads(const PagedKvView& pool, uint32_t num_q_heads, std::string_view op) {
  if (num_q_heads == 0 || num_q_heads % pool.num_kv_heads != 0) {
    return invalid_argument(str(op) + ": num_q_heads " + std::to_string(num_q_heads) +
                            " is not a positive multiple of the pool's " +
                            std::to_string(pool.num_kv_heads) + " KV heads");
  }
  return ok_status();
}

// A NaN or infinite scale makes every output NaN: refused rather than computed.
Status validate_softmax_scale(float scale, std::string_view op) {
  if (!std::isfinite(scale)) {
    return invalid_argument(str(op) + ": softmax_scale " + std::to_string(scale) +
                            " must be finite");
  }
  return ok_status();
}

Status validate_query_dtype(DType dtype, std::string_view op) {
  if (!is_float_compute(dtype)) {
    return invalid_argument(str(op) + ": query dtype must be f32, f16 or bf16 (got " +
                            str(dtype_name(dtype)) + ")");
  }
  return ok_status();
}

bool overlaps(const void* a, uint64_t a_bytes, const void* b, uint64_t b_bytes) {
  const auto x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
  return x < y + b_bytes && y < x + a_bytes;
}

// The output may be the query itself (each work item reads its query rows before it writes the
// same rows), but not a shifted view of it: a row written early would be read as another row's
// query. The attention mass must overlap neither.
Status validate_attention_buffers(const void* query, const void* output, uint64_t rows,
                                  uint32_t head_dim, DType dtype, const float* mass,
                                  uint64_t mass_floats, std::string_view op) {
  const uint64_t bytes = rows * head_dim * (dtype == DType::kF32 ? 4 : 2);
  if (query != output && overlaps(query, bytes, output, bytes)) {
    return invalid_argument(str(op) +
                            ": output overlaps the query without being it (give the query "
                            "itself, or memory apart from it)");
  }
  if (mass != nullptr && (overlaps(mass, mass_floats * 4, query, bytes) ||
                          overlaps(mass, mass_floats * 4, output, bytes))) {
    return invalid_argument(str(op) + ": attention_mass overlaps the query or the output");
  }
  return ok_status();
}

}  // namespace

Status validate_pool(const PagedKvView& pool, uint32_t layer, std::string_view op) {
  if (pool.base == nullptr && pool.num_blocks > 0) {
    return invalid_argument(str(op) + ": the pool has no memory");
  }
  if (pool.block_size == 0 || pool.head_dim == 0 || pool.num_kv_heads == 0) {
    return invalid_argument(str(op) + ": the pool view is not initialized");
  }
  if (layer >= pool.num_layers) {
    return invalid_argument(str(op) + ": layer " + std::to_string(layer) +
                            " is outside layer group " + std::to_string(pool.layer_group) + " (" +
                            std::to_string(pool.num_layers) + " layers)");
  }
  return ok_status();
}

Status validate_finite(const void* data, DType dtype, uint32_t num_tokens, uint32_t heads,
                       uint32_t head_dim, std::string_view what, int threads) {
  const uint64_t row = uint64_t{heads} * head_dim;
  const size_t elem = dtype == DType::kF32 ? 4 : 2;
  const auto* bytes = static_cast<const uint8_t*>(data);
  // The first bad token wins, whichever thread finds it, so the message is deterministic.
  int64_t first_bad_token = -1;
  int64_t first_bad_index = -1;
#pragma omp parallel for num_threads(threads) \
    schedule(static) if (uint64_t{num_tokens} * row > (1u << 18))
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t bad = quant::find_non_finite(bytes + t * row * elem, dtype, row);
    if (bad < 0) continue;
#pragma omp critical(kvf_validate_finite)
    if (first_bad_token < 0 || t < first_bad_token) {
      first_bad_token = t;
      first_bad_index = bad;
    }
  }
  if (first_bad_token < 0) return ok_status();
  const uint64_t index = static_cast<uint64_t>(first_bad_index);
  return invalid_argument(str(what) + "[token " + std::to_string(first_bad_token) + ", head " +
                          std::to_string(index / head_dim) + ", dim " +
                          std::to_string(index % head_dim) + "] is not finite (NaN or Inf)");
}

Status validate_finite_kv(const void* key, const void* value, DType dtype, uint32_t num_tokens,
                          uint32_t heads, uint32_t head_dim, std::string_view key_what,
                          std::string_view value_what, DType pool_dtype, int threads) {
  const uint32_t abs_bits = quant::unstorable_abs_bits(pool_dtype);
  const uint64_t row = uint64_t{heads} * head_dim;
  const size_t elem = dtype == DType::kF32 ? 4 : 2;
  const auto* k = static_cast<const uint8_t*>(key);
  const auto* v = static_cast<const uint8_t*>(value);
  int64_t first_bad_token[2] = {-1, -1};
  int64_t first_bad_index[2] = {-1, -1};
  // The first bad token of each tensor wins, whichever thread finds it, so the message is
  // deterministic; a bad key is reported before a bad value, as two validate_finite calls would.
#pragma omp parallel for num_threads(threads) \
    schedule(static) if (uint64_t{num_tokens} * row > (1u << 17))
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t bad[2] = {quant::find_unstorable(k + t * row * elem, dtype, row, abs_bits),
                            quant::find_unstorable(v + t * row * elem, dtype, row, abs_bits)};
    if (bad[0] < 0 && bad[1] < 0) continue;
#pragma omp critical(kvf_validate_finite_kv)
    for (int kv = 0; kv < 2; ++kv) {
      if (bad[kv] >= 0 && (first_bad_token[kv] < 0 || t < first_bad_token[kv])) {
        first_bad_token[kv] = t;
        first_bad_index[kv] = bad[kv];
      }
    }
  }
  for (int kv = 0; kv < 2; ++kv) {
    if (first_bad_token[kv] < 0) continue;
    const uint64_t index = static_cast<uint64_t>(first_bad_index[kv]);
    float x = 0;
    quant::load_activations((kv == 0 ? k : v) + (first_bad_token[kv] * row + index) * elem, dtype,
                            1, &x);
    std::string why = "is not finite (NaN or Inf)";
    if (std::isfinite(x)) {
      std::ostringstream shown;
      shown << x;
      why = "= " + shown.str() + " is too large for " + str(dtype_name(pool_dtype)) + " KV (" +
            (is_integer_quantized(pool_dtype)
                 ? "integer KV takes |x| < 2^127, so that a group's range, max - min, stays a float"
                 : "it would be stored as infinity") +
            ")";
    }
    return invalid_argument(str(kv == 0 ? key_what : value_what) + "[token " +
                            std::to_string(first_bad_token[kv]) + ", head " +
                            std::to_string(index / head_dim) + ", dim " +
                            std::to_string(index % head_dim) + "] " + why);
  }
  return ok_status();
}

Status validate_append(const PagedKvView& pool, const AppendKvArgs& args) {
  KVF_RETURN_IF_ERROR(validate_pool(pool, args.layer, "append_kv"));
  if (args.num_tokens == 0) return ok_status();
  if (args.key == nullptr || args.value == nullptr || args.slot_mapping == nullptr) {
    return invalid_argument("append_kv: key, value and slot_mapping are required");
  }
  KVF_RETURN_IF_ERROR(validate_query_dtype(args.input_dtype, "append_kv"));
  const uint64_t slots = pool.num_blocks * pool.block_size;
  std::vector<int64_t> used;
  used.reserve(args.num_tokens);
  for (uint32_t t = 0; t < args.num_tokens; ++t) {
    const int64_t slot = args.slot_mapping[t];
    if (slot == -1) continue;
    if (slot < 0 || static_cast<uint64_t>(slot) >= slots) {
      return invalid_argument("append_kv: token " + std::to_string(t) + " maps to slot " +
                              std::to_string(slot) + ", outside the pool's " +
                              std::to_string(slots) + " slots");
    }
    used.push_back(slot);
  }
  std::sort(used.begin(), used.end());
  const auto dup = std::adjacent_find(used.begin(), used.end());
  if (dup != used.end()) {
    return invalid_argument("append_kv: two tokens map to slot " + std::to_string(*dup));
  }
  return ok_status();
}

Status validate_gather(const PagedKvView& pool, const GatherKvArgs& args) {
  KVF_RETURN_IF_ERROR(validate_pool(pool, args.layer, "gather_kv"));
  if (args.num_tokens == 0) return ok_status();
  if (args.block_table == nullptr || args.key_out == nullptr || args.value_out == nullptr) {
    return invalid_argument("gather_kv: block_table, key_out and value_out are required");
  }
  const uint64_t blocks = (uint64_t{args.num_tokens} + pool.block_size - 1) / pool.block_size;
  return validate_table(pool, args.block_table, blocks, "gather_kv", 0);
}

Status validate_decode(const PagedKvView& pool, const DecodeAttentionArgs& args) {
  constexpr std::string_view op = "paged_decode_attention";
  KVF_RETURN_IF_ERROR(validate_pool(pool, args.layer, op));
  if (args.num_seqs == 0) return ok_status();
  if (args.query == nullptr || args.output == nullptr || args.block_tables == nullptr ||
      args.context_lens == nullptr) {
    return invalid_argument(str(op) +
                            ": query, output, block_tables and context_lens are required");
  }
  KVF_RETURN_IF_ERROR(validate_heads(pool, args.num_q_heads, op));
  KVF_RETURN_IF_ERROR(validate_query_dtype(args.query_dtype, op));
  KVF_RETURN_IF_ERROR(validate_softmax_scale(args.softmax_scale, op));
  const uint64_t capacity = uint64_t{args.max_blocks_per_seq} * pool.block_size;
  for (uint32_t s = 0; s < args.num_seqs; ++s) {
    const uint32_t len = args.context_lens[s];
    if (len == 0 || len > capacity) {
      return invalid_argument(str(op) + ": sequence " + std::to_string(s) + " has context length " +
                              std::to_string(len) + " (must be in [1, " + std::to_string(capacity) +
                              "])");
    }
    if (args.attention_mass != nullptr && len > args.mass_stride) {
      return invalid_argument(str(op) + ": mass_stride " + std::to_string(args.mass_stride) +
                              " is shorter than sequence " + std::to_string(s) + "'s context " +
                              std::to_string(len));
    }
    KVF_RETURN_IF_ERROR(validate_table(pool,
                                       args.block_tables + uint64_t{s} * args.max_blocks_per_seq,
                                       (len + pool.block_size - 1) / pool.block_size, op, s));
  }
  return validate_attention_buffers(args.query, args.output,
                                    uint64_t{args.num_seqs} * args.num_q_heads, pool.head_dim,
                                    args.query_dtype, args.attention_mass,
                                    uint64_t{args.num_seqs} * args.mass_stride, op);
}

Status validate_prefill(const PagedKvView& pool, const PrefillAttentionArgs& args) {
  constexpr std::string_view op = "paged_prefill_attention";
  KVF_RETURN_IF_ERROR(validate_pool(pool, args.layer, op));
  if (args.num_seqs == 0) return ok_status();
  if (args.query == nullptr || args.output == nullptr || args.block_tables == nullptr ||
      args.context_lens == nullptr || args.query_start == nullptr) {
    return invalid_argument(str(op) +
                            ": query, output, query_start, block_tables and context_lens are "
                            "required");
  }
  KVF_RETURN_IF_ERROR(validate_heads(pool, args.num_q_heads, op));
  KVF_RETURN_IF_ERROR(validate_query_dtype(args.query_dtype, op));
  KVF_RETURN_IF_ERROR(validate_softmax_scale(args.softmax_scale, op));
  if (args.query_start[0] != 0) return invalid_argument(str(op) + ": query_start[0] must be 0");
  const uint64_t capacity = uint64_t{args.max_blocks_per_seq} * pool.block_size;
  for (uint32_t s = 0; s < args.num_seqs; ++s) {
    if (args.query_start[s + 1] < args.query_start[s]) {
      return invalid_argument(str(op) + ": query_start decreases at sequence " + std::to_string(s));
    }
    const uint32_t q_len = args.query_start[s + 1] - args.query_start[s];
    const uint32_t len = args.context_lens[s];
    if (len > capacity || q_len > len) {
      return invalid_argument(str(op) + ": sequence " + std::to_string(s) + " has " +
                              std::to_string(q_len) + " queries and context length " +
                              std::to_string(len) +
                              " (need queries <= context <= " + std::to_string(capacity) + ")");
    }
    KVF_RETURN_IF_ERROR(validate_table(pool,
                                       args.block_tables + uint64_t{s} * args.max_blocks_per_seq,
                                       (len + pool.block_size - 1) / pool.block_size, op, s));
  }
  return validate_attention_buffers(args.query, args.output,
                                    uint64_t{args.query_start[args.num_seqs]} * args.num_q_heads,
                                    pool.head_dim, args.query_dtype, nullptr, 0, op);
}

namespace {

// A regrouping copy reads another view of the same layers: it must hold the layers written, in
// the same row format, and span the same bytes (block ids then name the same memory in both).
Status validate_copy_source(const GroupTokenCopies& group) {
  const PagedKvView& pool = group.pool;
  const PagedKvView& src = group.read_pool();
  if (&src == &pool) return ok_status();
  const bool same_rows = src.dtype == pool.dtype && src.num_kv_heads == pool.num_kv_heads &&
                         src.head_dim == pool.head_dim && src.group_size == pool.group_size &&
                         src.row_bytes == pool.row_bytes;
  const bool holds_layers = src.first_layer <= pool.first_layer &&
                            pool.first_layer + pool.num_layers <= src.first_layer + src.num_layers;
  const bool same_memory = src.base == pool.base && src.block_bytes == pool.block_bytes &&
                           src.num_blocks == pool.num_blocks;
  if (!same_rows || !holds_layers || !same_memory) {
    std::ostringstream os;
    os << "compact_tokens: layer group " << pool.layer_group << " (layers " << pool.first_layer
       << "-" << pool.first_layer + pool.num_layers - 1 << ") cannot read its copies from layer "
       << "group " << src.layer_group << " (layers " << src.first_layer << "-"
       << src.first_layer + src.num_layers - 1 << "): a regrouping source must hold the layers "
       << "written, in the same rows, over the same memory";
    return invalid_argument(os.str());
  }
  return ok_status();
}

}  // namespace

Status validate_token_copies(std::span<const GroupTokenCopies> batch) {
  for (const GroupTokenCopies& group : batch) {
    const PagedKvView& pool = group.pool;
    const PagedKvView& src = group.read_pool();
    if ((pool.base == nullptr || src.base == nullptr) && !group.copies.empty()) {
      return invalid_argument("compact_tokens: layer group " + std::to_string(pool.layer_group) +
                              " has no memory");
    }
    if (!group.copies.empty()) KVF_RETURN_IF_ERROR(validate_copy_source(group));
    for (const TokenCopy& c : group.copies) {
      const bool blocks_ok =
          c.src_block.value < src.num_blocks && c.dst_block.value < pool.num_blocks;
      const bool ranges_ok = uint64_t{c.src_offset} + c.num_tokens <= src.block_size &&
                             uint64_t{c.dst_offset} + c.num_tokens <= pool.block_size;
      if (&src != &pool && c.src_block == c.dst_block) {
        std::ostringstream os;
        os << "compact_tokens: regrouping copy '" << c << "' into layer group "
           << pool.layer_group << " reads and writes the same block, whose rows the two views "
           << "place differently";
        return invalid_argument(os.str());
      }
      if (!blocks_ok || !ranges_ok) {
        std::ostringstream os;
        os << "compact_tokens: copy '" << c << "' does not fit layer group " << pool.layer_group
           << " (" << pool.num_blocks << " blocks of " << pool.block_size << " tokens)";
        if (&src != &pool) {
          os << " read from layer group " << src.layer_group << " (" << src.num_blocks
             << " blocks of " << src.block_size << " tokens)";
        }
        return invalid_argument(os.str());
      }
    }
  }
  return ok_status();
}

namespace {

// Launch ends for copies from block src(i) to block dst(i), i < n, kept in list order. When the
// source and destination are different pools, reads never meet writes.
template <typename Src, typename Dst>
std::vector<size_t> ordered_launches(size_t n, Src src, Dst dst, bool one_pool) {
  std::vector<size_t> ends;
  std::unordered_set<uint32_t> written, read;  // looked up only: its order decides nothing
  for (size_t i = 0; i < n; ++i) {
    const uint32_t from = src(i), to = dst(i);
    const bool conflicts = written.count(to) != 0 ||
                           (one_pool && (written.count(from) != 0 || read.count(to) != 0));
    if (conflicts) {
      ends.push_back(i);
      written.clear();
      read.clear();
    }
    written.insert(to);
    if (one_pool) read.insert(from);
  }
  if (n != 0) ends.push_back(n);
  return ends;
}

}  // namespace

std::vector<size_t> token_copy_launches(std::span<const TokenCopy> copies) {
  return ordered_launches(
      copies.size(), [&](size_t i) { return copies[i].src_block.value; },
      [&](size_t i) { return copies[i].dst_block.value; }, /*one_pool=*/true);
}

std::vector<size_t> block_move_launches(std::span<const BlockMove> moves, bool one_pool) {
  return ordered_launches(
      moves.size(), [&](size_t i) { return moves[i].src_block; },
      [&](size_t i) { return moves[i].dst_block; }, one_pool);
}

Status validate_block_copies(std::span<const GroupBlockCopies> batch) {
  for (const GroupBlockCopies& group : batch) {
    for (const BlockMove& m : group.copies) {
      if (m.src_block >= group.pool.num_blocks || m.dst_block >= group.pool.num_blocks) {
        return invalid_argument("copy_blocks: " + to_string(BlockId{m.src_block}) + " -> " +
                                to_string(BlockId{m.dst_block}) + " is outside layer group " +
                                std::to_string(group.pool.layer_group) + " (" +
                                std::to_string(group.pool.num_blocks) + " blocks)");
      }
    }
  }
  return ok_status();
}

Status validate_swap(const PagedKvView& src, const PagedKvView& dst,
                     std::span<const BlockMove> moves) {
  if (src.block_bytes != dst.block_bytes || src.dtype != dst.dtype ||
      src.block_size != dst.block_size || src.num_layers != dst.num_layers ||
      src.num_kv_heads != dst.num_kv_heads || src.head_dim != dst.head_dim) {
    return invalid_argument("swap_blocks: source and destination pools have different layouts");
  }
  for (const BlockMove& m : moves) {
    if (m.src_block >= src.num_blocks || m.dst_block >= dst.num_blocks) {
      return invalid_argument("swap_blocks: " + to_string(BlockId{m.src_block}) + " -> " +
                              to_string(BlockId{m.dst_block}) + " is outside the pools (" +
                              std::to_string(src.num_blocks) + " and " +
                              std::to_string(dst.num_blocks) + " blocks)");
    }
  }
  return ok_status();
}

}  // namespace kvfabric::detail
