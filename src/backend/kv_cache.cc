#include "kvfabric/backend/kv_cache.h"

#include <algorithm>
#include <string>

#include "common/checked_math.h"

namespace kvfabric {
namespace {

std::string id_text(uint64_t cache_id) {
  return "cache " + std::to_string(cache_id);
}

}  // namespace

Result<KvCache> KvCache::create(Backend& backend, const KvCacheOptions& options) {
  if (options.capacity == 0) return invalid_argument("KvCache capacity must be > 0");
  if (options.pool_blocks == 0) return invalid_argument("KvCache pool_blocks must be > 0");
  const bool paged = options.block_size != 0;
  const uint32_t block_size = paged ? options.block_size : options.capacity;
  KVF_ASSIGN_OR_RETURN(const BlockLayout layout,
                       BlockLayout::create(options.num_layers, options.num_kv_heads, block_size,
                                           options.head_dim, options.dtype, options.group_size));
  if (options.pool_blocks > kMaxBlocksPerPool) {
    return invalid_argument("KvCache pool_blocks exceeds " + std::to_string(kMaxBlocksPerPool));
  }
  // In 64 bits: a capacity near 2^32 wrapped to 0 blocks, and attention then wrote past a
  // table of that size. The quotient always fits in 32 bits.
  const auto max_blocks =
      static_cast<uint32_t>((uint64_t{options.capacity} + block_size - 1) / block_size);
  const auto bytes = detail::checked_product({options.pool_blocks, layout.block_bytes()});
  if (!bytes) {
    return invalid_argument("KvCache pool_blocks " + std::to_string(options.pool_blocks) + " x " +
                            std::to_string(layout.block_bytes()) +
                            "-byte blocks is more than 2^64 bytes");
  }
  KVF_ASSIGN_OR_RETURN(KvArena arena, backend.allocate_arena(*bytes, Tier::kDevice));
  const PagedKvView view = PagedKvView::make(layout, arena.data(), options.pool_blocks);
  return KvCache(backend, options, paged, max_blocks, std::move(arena), view);
}

KvCache::KvCache(Backend& backend, const KvCacheOptions& options, bool paged, uint32_t max_blocks,
                 KvArena arena, PagedKvView view)
    : backend_(&backend),
      options_(options),
      paged_(paged),
      max_blocks_per_seq_(max_blocks),
      arena_(std::move(arena)),
      view_(view),
      allocator_(static_cast<uint32_t>(options.pool_blocks)) {}

Result<KvCache::Sequence*> KvCache::find(uint64_t cache_id, std::string_view op) {
  const auto it = sequences_.find(cache_id);
  if (it == sequences_.end()) {
    return Status(ErrorCode::kSequenceNotFound, std::string(op) + ": " + id_text(cache_id) +
                                                    " does not exist (call ensure first)");
  }
  return &it->second;
}

Status KvCache::ensure(uint64_t cache_id) {
  if (sequences_.count(cache_id) > 0) return ok_status();
  Sequence seq;
  seq.pending.assign(options_.num_layers, 0);
  sequences_.emplace(cache_id, std::move(seq));
  return ok_status();
}

Status KvCache::grow(Sequence& seq, uint64_t tokens) {
  const uint64_t needed = (tokens + view_.block_size - 1) / view_.block_size;
  if (needed <= seq.blocks.size()) return ok_status();
  KVF_ASSIGN_OR_RETURN(std::vector<BlockId> fresh, allocator_.allocate(needed - seq.blocks.size()));
  for (BlockId b : fresh)
    seq.blocks.push_back(b.value);
  return ok_status();
}

void KvCache::shrink(Sequence& seq, uint64_t tokens) {
  const uint64_t keep = (tokens + view_.block_size - 1) / view_.block_size;
  while (seq.blocks.size() > keep) {
    (void)allocator_.release(BlockId{seq.blocks.back()});
    seq.blocks.pop_back();
  }
}

Status KvCache::append(uint64_t cache_id, uint32_t layer, const void* key, const void* value,
                       DType dtype, uint32_t num_tokens) {
  KVF_ASSIGN_OR_RETURN(Sequence * seq, find(cache_id, "append"));
  if (layer >= options_.num_layers) {
    return invalid_argument("append: layer " + std::to_string(layer) + " is outside the " +
                            std::to_string(options_.num_layers) + " layers");
  }
  const uint64_t first = uint64_t{seq->len} + seq->pending[layer];
  if (first + num_tokens > options_.capacity) {
    return invalid_argument("append: " + id_text(cache_id) + " would hold " +
                            std::to_string(first + num_tokens) + " tokens, over its capacity of " +
                            std::to_string(options_.capacity));
  }
  const size_t blocks_before = seq->blocks.size();
  KVF_RETURN_IF_ERROR(grow(*seq, first + num_tokens));
  std::vector<int64_t> slots(num_tokens);
  for (uint32_t t = 0; t < num_tokens; ++t) {
    const uint64_t pos = first + t;
    slots[t] =
        int64_t{seq->blocks[pos / view_.block_size]} * view_.block_size + pos % view_.block_size;
  }
  AppendKvArgs args;
  args.layer = layer;
  args.key = key;
  args.value = value;
  args.input_dtype = dtype;
  args.num_tokens = num_tokens;
  args.slot_mapping = slots.data();
  const Status status = backend_->append_kv(view_, args);
  if (!status.ok()) {
    shrink(*seq, uint64_t{blocks_before} * view_.block_size);  // undo the growth
    return status;
  }
  seq->pending[layer] += num_tokens;
  return ok_status();
}

Status KvCache::attention(uint64_t cache_id, uint32_t layer, const void* query, DType dtype,
                          uint32_t q_len, uint32_t num_q_heads, void* output, float softmax_scale) {
  KVF_ASSIGN_OR_RETURN(Sequence * seq, find(cache_id, "attention"));
  if (layer >= options_.num_layers) {
    return invalid_argument("attention: layer " + std::to_string(layer) + " is outside the " +
                            std::to_string(options_.num_layers) + " layers");
  }
  const uint32_t context = seq->len + seq->pending[layer];
  if (q_len == 0 || q_len > context) {
    return invalid_argument("attention: " + std::to_string(q_len) + " queries for " +
                            id_text(cache_id) + " whose layer " + std::to_string(layer) +
                            " holds " + std::to_string(context) + " tokens");
  }
  // One sequence: its own blocks are the whole table (a padded one of capacity / block_size
  // entries cost a gigabyte per call at a capacity near 2^32).
  const std::vector<uint32_t> table(seq->blocks.begin(), seq->blocks.end());
  const uint32_t starts[2] = {0, q_len};
  PrefillAttentionArgs args;
  args.layer = layer;
  args.query = query;
  args.query_dtype = dtype;
  args.output = output;
  args.num_seqs = 1;
  args.num_q_heads = num_q_heads;
  args.query_start = starts;
  args.context_lens = &context;
  args.block_tables = table.data();
  args.max_blocks_per_seq = static_cast<uint32_t>(table.size());
  args.softmax_scale = softmax_scale;
  return backend_->paged_prefill_attention(view_, args);
}

Status KvCache::advance(uint64_t cache_id) {
  KVF_ASSIGN_OR_RETURN(Sequence * seq, find(cache_id, "advance"));
  const uint32_t step = seq->pending[0];
  for (uint32_t layer = 1; layer < options_.num_layers; ++layer) {
    if (seq->pending[layer] != step) {
      return invalid_operation("advance: " + id_text(cache_id) + " layer 0 wrote " +
                               std::to_string(step) + " new tokens but layer " +
                               std::to_string(layer) + " wrote " +
                               std::to_string(seq->pending[layer]));
    }
  }
  seq->len += step;
  std::fill(seq->pending.begin(), seq->pending.end(), 0);
  return ok_status();
}

Status KvCache::truncate(uint64_t cache_id, uint32_t new_len) {
  KVF_ASSIGN_OR_RETURN(Sequence * seq, find(cache_id, "truncate"));
  if (std::any_of(seq->pending.begin(), seq->pending.end(), [](uint32_t p) { return p > 0; })) {
    return invalid_operation("truncate: " + id_text(cache_id) + " is in the middle of a step");
  }
  seq->len = std::min(seq->len, new_len);
  shrink(*seq, seq->len);
  return ok_status();
}

Status KvCache::release(uint64_t cache_id) {
  KVF_ASSIGN_OR_RETURN(Sequence * seq, find(cache_id, "release"));
  shrink(*seq, 0);
  sequences_.erase(cache_id);
  return ok_status();
}

void KvCache::reset() {
  for (auto& [id, seq] : sequences_)
    shrink(seq, 0);
  sequences_.clear();
}

Result<uint32_t> KvCache::len(uint64_t cache_id) const {
  const auto it = sequences_.find(cache_id);
  if (it == sequences_.end()) {
    return Status(ErrorCode::kSequenceNotFound, "len: " + id_text(cache_id) + " does not exist");
  }
  return it->second.len;
}

Result<std::vector<uint32_t>> KvCache::block_table(uint64_t cache_id) const {
  const auto it = sequences_.find(cache_id);
  if (it == sequences_.end()) {
    return Status(ErrorCode::kSequenceNotFound,
                  "block_table: " + id_text(cache_id) + " does not exist");
  }
  std::vector<uint32_t> table(max_blocks_per_seq_, kInvalidBlockId.value);
  std::copy(it->second.blocks.begin(), it->second.blocks.end(), table.begin());
  return table;
}

}  // namespace kvfabric
