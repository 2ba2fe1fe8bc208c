#include "kvfabric/prefix/paged_prefix_cache.h"

#include <string>
#include <vector>

#include "common/log.h"

namespace kvfabric {

PagedPrefixCache::PagedPrefixCache(PagedKvCache pool, std::unique_ptr<PrefixBlockIndex> index)
    : index_(std::move(index)), pool_(std::move(pool)) {}

Result<PagedPrefixCache> PagedPrefixCache::create(PagedKvCache pool, PrefixIndexOptions options) {
  KVF_RETURN_IF_ERROR(pool.init_status());
  if (pool.block_retainer() != nullptr) {
    return invalid_operation("the pool already has a block retainer");
  }
  const size_t block_size = pool.block_size();
  if (options.block_size != 0 && options.block_size != block_size) {
    return invalid_argument("prefix index block_size " + std::to_string(options.block_size) +
                            " differs from the pool's " + std::to_string(block_size));
  }
  options.block_size = static_cast<uint32_t>(block_size);
  if (options.block_bytes == 0) options.block_bytes = pool.block_memory_bytes();
  KVF_ASSIGN_OR_RETURN(
      auto index, PrefixBlockIndex::create(options, static_cast<uint32_t>(pool.total_blocks())));
  KVF_RETURN_IF_ERROR(pool.set_block_retainer(index.get()));
  return PagedPrefixCache(std::move(pool), std::move(index));
}

Result<size_t> PagedPrefixCache::allocate(SeqId seq, std::span<const TokenId> prompt) {
  return allocate(seq, RadixKey(prompt, pool_.block_size()));
}

Result<size_t> PagedPrefixCache::allocate(SeqId seq, const RadixKey& key) {
  const std::span<const TokenId> prompt = key.tokens();
  KVF_RETURN_IF_ERROR(pool_.init_status());
  if (pool_.get_sequence(seq) != nullptr) {
    return invalid_operation("Sequence " + to_string(seq) + " already exists");
  }
  // Check capacity before the lookup commits anything: blocks the hit makes used are no longer
  // available for the new ones.
  const size_t bs = pool_.block_size();
  const size_t needed = (prompt.size() + bs - 1) / bs;
  auto admit = [&](const PrefixMatch& cached) -> Status {
    const size_t fresh = needed - cached.blocks.size();
    const size_t available = pool_.available_block_count() - cached.idle_blocks;
    return fresh > available ? out_of_memory(fresh, available) : ok_status();
  };
  KVF_ASSIGN_OR_RETURN(const PrefixMatch hit, index_->match_if(key, admit));
  const Status status = pool_.allocate_shared(seq, prompt.size(), hit.blocks);
  KVF_CHECK(status.ok(), "allocation failed after its capacity check: " + status.to_string());
  return hit.tokens;
}

Result<size_t> PagedPrefixCache::insert(SeqId seq, std::span<const TokenId> tokens,
                                        uint32_t priority) {
  return insert(seq, RadixKey(tokens, pool_.block_size()), priority);
}

Result<size_t> PagedPrefixCache::insert(SeqId seq, const RadixKey& key, uint32_t priority) {
  const std::span<const TokenId> tokens = key.tokens();
  KVF_RETURN_IF_ERROR(pool_.init_status());
  const SequenceInfo* info = pool_.get_sequence(seq);
  if (info == nullptr) return sequence_not_found(seq);
  if (tokens.size() > info->num_tokens) {
    return invalid_argument(std::to_string(tokens.size()) + " tokens to index for " +
                            to_string(seq) + ", which holds " + std::to_string(info->num_tokens));
  }
  KVF_ASSIGN_OR_RETURN(const std::vector<BlockId> added,
                       index_->insert(key, info->block_ids, priority));
  for (BlockId block : added) {
    const Status status = pool_.retain_block(block);
    KVF_CHECK(status.ok(), "retaining a newly indexed block failed: " + status.to_string());
  }
  KVF_LOG_TRACE(kPrefix, "insert {} tokens of {}: {} new blocks", tokens.size(), to_string(seq),
                added.size());
  return added.size();
}

void PagedPrefixCache::clear_index() {
  for (BlockId block : index_->clear()) {
    const Status status = pool_.release_retained_block(block);
    KVF_CHECK(status.ok(), status.to_string());
  }
}

Status PagedPrefixCache::verify_integrity() const {
  KVF_RETURN_IF_ERROR(pool_.verify_integrity());
  KVF_RETURN_IF_ERROR(index_->verify());
  size_t retained = 0;
  for (uint32_t b = 0; b < pool_.total_blocks(); ++b) {
    const BlockId block{b};
    if (pool_.is_retained(block) != index_->is_indexed(block)) {
      return Status(ErrorCode::kInternal,
                    to_string(block) + " is " + (index_->is_indexed(block) ? "" : "not ") +
                        "indexed but " + (pool_.is_retained(block) ? "" : "not ") + "retained");
    }
    retained += pool_.is_retained(block) ? 1 : 0;
  }
  if (retained != index_->cached_blocks()) {
    return Status(ErrorCode::kInternal, "the pool retains " + std::to_string(retained) +
                                            " blocks, the index holds " +
                                            std::to_string(index_->cached_blocks()));
  }
  // Every indexed block a sequence holds is pinned as used; every other one is not.
  size_t used = 0;
  for (uint32_t b = 0; b < pool_.total_blocks(); ++b) {
    if (pool_.is_retained(BlockId{b}) && pool_.block_ref_count(BlockId{b}) > 1) ++used;
  }
  if (used != index_->used_blocks()) {
    return Status(ErrorCode::kInternal, std::to_string(used) + " cached blocks are in use but " +
                                            "the index counts " +
                                            std::to_string(index_->used_blocks()));
  }
  return ok_status();
}

}  // namespace kvfabric
