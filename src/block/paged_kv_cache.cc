#include "kvfabric/block/paged_kv_cache.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

#include "block/compaction_plan.h"
#include "block/sequence_table.h"
#include "block/victim_index.h"
#include "common/host_memory.h"
#include "common/log.h"

namespace kvfabric {
namespace {

// The first block listed twice, found without allocating for the usual short lists.
std::optional<BlockId> duplicate_in(std::span<const BlockId> blocks) {
  if (blocks.size() < 2) return std::nullopt;
  constexpr size_t kOnStack = 256;
  std::array<BlockId, kOnStack> stack;
  std::vector<BlockId> heap;
  std::span<BlockId> sorted;
  if (blocks.size() <= kOnStack) {
    sorted = std::span(stack).first(blocks.size());
  } else {
    heap.resize(blocks.size());
    sorted = heap;
  }
  std::copy(blocks.begin(), blocks.end(), sorted.begin());
  std::sort(sorted.begin(), sorted.end());
  const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
  if (dup == sorted.end()) return std::nullopt;
  return *dup;
}

std::string describe_bad_threshold(double threshold) {
  return "eviction threshold must be in [0, 1] (got " + std::to_string(threshold) + ")";
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Construction

Result<BlockLayout> PagedKvCache::seed_layout(size_t block_size, size_t num_heads,
                                              size_t head_dim) {
  constexpr size_t kMax = std::numeric_limits<uint32_t>::max();
  if (block_size > kMax || num_heads > kMax || head_dim > kMax) {
    return invalid_argument("block_size, num_heads and head_dim must fit in 32 bits");
  }
  return BlockLayout::create(1, static_cast<uint32_t>(num_heads), static_cast<uint32_t>(block_size),
                             static_cast<uint32_t>(head_dim), DType::kF16);
}

PagedKvCache::PagedKvCache(BlockLayout layout, uint64_t num_blocks, Status init_status)
    : layout_(layout),
      block_shift_(std::has_single_bit(layout.block_size) ? std::countr_zero(layout.block_size) : -1),
      allocator_(init_status.ok() ? static_cast<uint32_t>(num_blocks) : 0),
      table_(std::make_unique<detail::SequenceTable>()),
      victims_(std::make_unique<detail::VictimIndex>(EvictionPolicy::kLru, *table_)),
      init_status_(std::move(init_status)) {
  if (!init_status_.ok())
    KVF_LOG_ERROR(kBlock, "PagedKvCache unusable: {}", init_status_.message());
}

Result<PagedKvCache> PagedKvCache::create(size_t num_blocks, size_t block_size, size_t num_heads,
                                          size_t head_dim) {
  if (num_blocks > kMaxBlocksPerPool) {
    return invalid_argument("num_blocks " + std::to_string(num_blocks) + " exceeds " +
                            std::to_string(kMaxBlocksPerPool));
  }
  KVF_ASSIGN_OR_RETURN(const BlockLayout layout, seed_layout(block_size, num_heads, head_dim));
  KVF_RETURN_IF_ERROR(detail::check_host_memory(num_blocks * BlockAllocator::kBytesPerBlock,
                                                "a block manager of " +
                                                    std::to_string(num_blocks) + " blocks"));
  return PagedKvCache(layout, num_blocks, ok_status());
}

Result<PagedKvCache> PagedKvCache::create(const Config& config) {
  KVF_RETURN_IF_ERROR(validate(config));
  KVF_ASSIGN_OR_RETURN(const BlockLayout layout, kvfabric::block_layout(config));
  KVF_ASSIGN_OR_RETURN(const uint64_t num_blocks, resolved_num_blocks(config));
  KVF_RETURN_IF_ERROR(detail::check_host_memory(
      num_blocks * BlockAllocator::kBytesPerBlock,
      "the block manager of cache.num_blocks " + std::to_string(num_blocks)));
  PagedKvCache cache(layout, num_blocks, ok_status());
  KVF_RETURN_IF_ERROR(
      cache.set_eviction_strategy(EvictionStrategy::from_config(config.cache.eviction)));
  KVF_RETURN_IF_ERROR(cache.set_eviction_threshold(config.cache.eviction.threshold));
  return cache;
}

PagedKvCache::PagedKvCache(size_t num_blocks, size_t block_size, size_t num_heads, size_t head_dim)
    : PagedKvCache(BlockLayout{}, 0, ok_status()) {
  auto created = create(num_blocks, block_size, num_heads, head_dim);
  if (created.ok()) {
    *this = std::move(created).value();
  } else {
    *this = PagedKvCache(BlockLayout{}, 0, created.status());
  }
}

PagedKvCache::PagedKvCache(const Config& config) : PagedKvCache(BlockLayout{}, 0, ok_status()) {
  auto created = create(config);
  if (created.ok()) {
    *this = std::move(created).value();
  } else {
    *this = PagedKvCache(BlockLayout{}, 0, created.status());
  }
}

PagedKvCache::PagedKvCache(PagedKvCache&&) noexcept = default;
PagedKvCache& PagedKvCache::operator=(PagedKvCache&&) noexcept = default;
PagedKvCache::~PagedKvCache() = default;

// ---------------------------------------------------------------------------------------------
// Settings

Status PagedKvCache::set_eviction_strategy(EvictionStrategy strategy) {
  KVF_RETURN_IF_ERROR(strategy.validate());
  strategy_ = strategy;
  auto index = std::make_unique<detail::VictimIndex>(strategy.policy(), *table_);
  // Ranked in access order, as an LRU queue must be filled.
  std::vector<uint32_t> live;
  for (uint32_t slot = 0; slot < table_->slot_limit(); ++slot) {
    if (table_->alive(slot)) live.push_back(slot);
  }
  std::sort(live.begin(), live.end(), [&](uint32_t a, uint32_t b) {
    return table_->at(a).last_access < table_->at(b).last_access;
  });
  for (uint32_t slot : live) index->insert(slot);
  victims_ = std::move(index);
  return ok_status();
}

Status PagedKvCache::set_eviction_threshold(double threshold) {
  if (!(threshold >= 0.0 && threshold <= 1.0))
    return invalid_argument(describe_bad_threshold(threshold));
  threshold_ = threshold;
  return ok_status();
}

PagedKvCache& PagedKvCache::with_eviction_strategy(EvictionStrategy strategy) & {
  const Status status = set_eviction_strategy(strategy);
  if (!status.ok()) KVF_LOG_ERROR(kBlock, "with_eviction_strategy ignored: {}", status.message());
  return *this;
}

PagedKvCache&& PagedKvCache::with_eviction_strategy(EvictionStrategy strategy) && {
  return std::move(with_eviction_strategy(strategy));
}

PagedKvCache& PagedKvCache::with_eviction_threshold(double threshold) & {
  if (std::isnan(threshold)) {
    KVF_LOG_ERROR(kBlock, "with_eviction_threshold ignored: {}", describe_bad_threshold(threshold));
    return *this;
  }
  threshold_ = std::clamp(threshold, 0.0, 1.0);
  return *this;
}

PagedKvCache&& PagedKvCache::with_eviction_threshold(double threshold) && {
  return std::move(with_eviction_threshold(threshold));
}

// ---------------------------------------------------------------------------------------------
// Queries

double PagedKvCache::utilization() const {
  if (total_blocks() == 0) return 0.0;
  return static_cast<double>(used_block_count()) / static_cast<double>(total_blocks());
}

size_t PagedKvCache::cached_block_count() const {
  return retainer_ != nullptr ? retainer_->idle_blocks() : 0;
}

bool PagedKvCache::needs_eviction() const {
  return utilization() > threshold_;
}

size_t PagedKvCache::num_sequences() const { return table_->size(); }

uint32_t PagedKvCache::slot_of(SeqId seq) const { return table_->slot_of(seq); }

const SequenceInfo* PagedKvCache::get_sequence(SeqId seq) const {
  const uint32_t slot = slot_of(seq);
  return slot == detail::SequenceTable::kNoSlot ? nullptr : &table_->at(slot);
}

bool PagedKvCache::holds(uint32_t slot, SeqId seq) const {
  return table_->alive(slot) && table_->at(slot).seq_id == seq;
}

std::optional<SequenceSlot> PagedKvCache::find_slot(SeqId seq) const {
  const uint32_t slot = slot_of(seq);
  if (slot == detail::SequenceTable::kNoSlot) return std::nullopt;
  return SequenceSlot{slot};
}

const SequenceInfo* PagedKvCache::get_sequence(SeqId seq, SequenceSlot slot) const {
  return holds(slot.value, seq) ? &table_->at(slot.value) : nullptr;
}

std::vector<SeqId> PagedKvCache::sequence_ids() const {
  std::vector<SeqId> ids;
  ids.reserve(table_->size());
  for (uint32_t slot = 0; slot < table_->slot_limit(); ++slot) {
    if (table_->alive(slot)) ids.push_back(table_->at(slot).seq_id);
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

std::optional<SeqId> PagedKvCache::select_eviction_target() const {
  const std::optional<uint32_t> slot = victims_->first();
  if (!slot) return std::nullopt;
  return table_->at(*slot).seq_id;
}

// ---------------------------------------------------------------------------------------------
// Helpers



void PagedKvCache::touch(uint32_t slot, const VictimKey& key_before_change) {
  SequenceInfo& info = table_->at(slot);
  info.last_access = ++clock_;
  info.access_count += 1;
  victims_->update(key_before_change, slot);
}

template <typename Fill>
void PagedKvCache::add_sequence(SeqId seq, Fill&& fill) {
  const uint32_t slot = table_->insert(seq);
  SequenceInfo& info = table_->at(slot);
  fill(info);
  info.last_access = ++clock_;
  info.access_count = 1;
  victims_->insert(slot);
}

uint32_t PagedKvCache::sequence_refs(BlockId block) const {
  return allocator_.ref_count(block) - (is_retained(block) ? 1 : 0);
}

void PagedKvCache::share_blocks(std::span<const BlockId> blocks) {
  notify_.clear();
  for (BlockId block : blocks) {
    if (is_retained(block) && allocator_.ref_count(block) == 1) notify_.push_back(block);
    const Status status = allocator_.add_ref(block);
    KVF_CHECK(status.ok(), status.message());
  }
  if (!notify_.empty()) retainer_->on_blocks_used(notify_);
}

void PagedKvCache::drop_retained(BlockId block) {
  retained_[block.value] = false;
  --retained_count_;
  auto freed = allocator_.release(block);
  KVF_CHECK(freed.ok(), freed.status().message());
  if (freed.value()) stats_.total_frees += 1;
}

void PagedKvCache::reclaim_for(size_t count) {
  if (count <= free_block_count()) return;
  const size_t missing = count - free_block_count();
  const std::vector<BlockId> released = retainer_->release_idle(missing);
  KVF_CHECK(released.size() == missing, "the retainer gave back " +
                                            std::to_string(released.size()) + " of " +
                                            std::to_string(missing) + " idle blocks");
  for (BlockId block : released) {
    KVF_CHECK(is_retained(block) && allocator_.ref_count(block) == 1,
              "the retainer gave back " + to_string(block) + ", which is not idle");
    drop_retained(block);
    stats_.cached_blocks_reclaimed += 1;
  }
  KVF_LOG_DEBUG(kBlock, "reclaimed {} cached blocks", missing);
}

size_t PagedKvCache::free_cached_blocks(size_t count) {
  if (!init_status_.ok()) return 0;
  const size_t freed = std::min(count, cached_block_count());
  reclaim_for(free_block_count() + freed);
  return freed;
}

BlockId PagedKvCache::take_block() {
  auto block = allocator_.allocate();
  KVF_CHECK(block.ok(), "free blocks were counted before allocating");
  stats_.total_allocations += 1;
  stats_.peak_blocks_used = allocator_.peak_used();
  return block.value();
}

void PagedKvCache::release_blocks(std::span<const BlockId> blocks) {
  notify_.clear();
  for (BlockId block : blocks) {
    auto freed = allocator_.release(block);
    KVF_CHECK(freed.ok(), "a block table referenced " + to_string(block) + " without a reference");
    if (freed.value()) {
      stats_.total_frees += 1;
    } else if (is_retained(block) && allocator_.ref_count(block) == 1) {
      notify_.push_back(block);  // cached from now on
    }
  }
  if (!notify_.empty()) retainer_->on_blocks_idle(notify_);
}

bool PagedKvCache::frees_a_block(const SequenceInfo& info) const {
  return std::any_of(info.block_ids.begin(), info.block_ids.end(),
                     [this](BlockId b) { return sequence_refs(b) == 1; });
}

void PagedKvCache::remove_sequence(uint32_t slot) {
  victims_->erase(slot);
  release_blocks(table_->at(slot).block_ids);
  table_->erase(slot);
}

// ---------------------------------------------------------------------------------------------
// Mutations

Status PagedKvCache::allocate(SeqId seq, size_t num_tokens) {
  return allocate_shared(seq, num_tokens, {});
}

Status PagedKvCache::allocate_shared(SeqId seq, size_t num_tokens,
                                     std::span<const BlockId> shared) {
  KVF_RETURN_IF_ERROR(init_status_);
  if (table_->contains(seq)) {
    return invalid_operation("Sequence " + to_string(seq) + " already exists");
  }
  const size_t needed = blocks_for(num_tokens);
  if (shared.size() > needed) {
    return invalid_argument(std::to_string(shared.size()) + " shared blocks for " +
                            std::to_string(num_tokens) + " tokens of " + to_string(seq) +
                            " (at most " + std::to_string(needed) + ")");
  }
  for (BlockId block : shared) {
    if (allocator_.ref_count(block) == 0) return block_not_found(block);
  }
  if (const std::optional<BlockId> dup = duplicate_in(shared)) {
    return invalid_argument(to_string(*dup) + " appears twice in the shared prefix of " +
                            to_string(seq));
  }

  // Sharing first: a shared block that was cached is no longer available for the new blocks.
  share_blocks(shared);
  const size_t fresh = needed - shared.size();
  if (fresh > available_block_count()) {
    const size_t available = available_block_count();
    release_blocks(shared);
    return out_of_memory(fresh, available);
  }
  reclaim_for(fresh);

  add_sequence(seq, [&](SequenceInfo& info) {
    info.num_tokens = num_tokens;
    info.block_ids.assign(shared.begin(), shared.end());
    for (size_t i = 0; i < fresh; ++i)
      info.block_ids.push_back(take_block());
  });
  stats_.shared_prefix_blocks += shared.size();
  KVF_LOG_TRACE(kBlock, "allocate {} tokens={} blocks={} shared={}", to_string(seq), num_tokens,
                needed, shared.size());
  return ok_status();
}

Status PagedKvCache::set_block_retainer(BlockRetainer* retainer) {
  KVF_RETURN_IF_ERROR(init_status_);
  if (retained_count_ > 0) {
    return invalid_operation("cannot change the block retainer while " +
                             std::to_string(retained_count_) + " blocks are retained");
  }
  retainer_ = retainer;
  retained_.assign(retainer != nullptr ? total_blocks() : 0, false);
  return ok_status();
}

Status PagedKvCache::retain_block(BlockId block) {
  KVF_RETURN_IF_ERROR(init_status_);
  if (retainer_ == nullptr) return invalid_operation("no block retainer is attached");
  if (allocator_.ref_count(block) == 0) return block_not_found(block);
  if (retained_[block.value]) {
    return invalid_operation(to_string(block) + " is already retained");
  }
  const Status status = allocator_.add_ref(block);
  KVF_CHECK(status.ok(), status.message());
  retained_[block.value] = true;
  ++retained_count_;
  return ok_status();
}

Status PagedKvCache::release_retained_block(BlockId block) {
  KVF_RETURN_IF_ERROR(init_status_);
  if (!is_retained(block)) return block_not_found(block);
  drop_retained(block);
  return ok_status();
}

Status PagedKvCache::append(SeqId seq, size_t num_new_tokens) {
  KVF_RETURN_IF_ERROR(init_status_);
  const uint32_t slot = slot_of(seq);
  if (slot == detail::SequenceTable::kNoSlot) return sequence_not_found(seq);
  return append_in_slot(slot, num_new_tokens);
}

Status PagedKvCache::append(SeqId seq, SequenceSlot slot, size_t num_new_tokens) {
  KVF_RETURN_IF_ERROR(init_status_);
  if (!holds(slot.value, seq)) return sequence_not_found(seq);
  return append_in_slot(slot.value, num_new_tokens);
}

Status PagedKvCache::append_in_slot(uint32_t slot, size_t num_new_tokens) {
  SequenceInfo* info = &table_->at(slot);
  if (num_new_tokens == 0) return ok_status();
  if (num_new_tokens > std::numeric_limits<size_t>::max() - info->num_tokens) {
    return invalid_argument("appending " + std::to_string(num_new_tokens) + " tokens to " +
                            to_string(info->seq_id) + " overflows its length");
  }
  const VictimKey old_key = victims_->key_of(slot);
  const size_t old_tokens = info->num_tokens;
  const size_t filled = tail_tokens(old_tokens);
  // Writing into a partly filled block that another sequence also holds would corrupt it.
  const bool copy_tail = filled != 0 && allocator_.ref_count(info->block_ids.back()) > 1;
  const size_t extra = blocks_for(old_tokens + num_new_tokens) - blocks_for(old_tokens);
  const size_t needed = extra + (copy_tail ? 1 : 0);
  if (needed > free_block_count()) {  // the free list is short: the retainer's idle blocks count
    if (needed > available_block_count()) return out_of_memory(needed, available_block_count());
    reclaim_for(needed);
  }

  if (copy_tail) {
    const BlockId shared = info->block_ids.back();
    const BlockId private_copy = take_block();
    pending_copies_.push_back(TokenCopy{shared, 0, private_copy, 0, static_cast<uint32_t>(filled),
                                        CopyReason::kCopyOnWrite});
    release_blocks(std::span(&shared, 1));
    info->block_ids.back() = private_copy;
    stats_.cow_copies += 1;
    stats_.cow_copied_tokens += filled;
  }
  for (size_t i = 0; i < extra; ++i)
    info->block_ids.push_back(take_block());
  info->num_tokens = old_tokens + num_new_tokens;
  touch(slot, old_key);
  return ok_status();
}

Status PagedKvCache::free(SeqId seq) {
  KVF_RETURN_IF_ERROR(init_status_);
  const uint32_t slot = slot_of(seq);
  if (slot == detail::SequenceTable::kNoSlot) return sequence_not_found(seq);
  remove_sequence(slot);
  return ok_status();
}

Status PagedKvCache::replace_table(SeqId seq, size_t num_tokens) {
  KVF_RETURN_IF_ERROR(init_status_);
  const uint32_t slot = slot_of(seq);
  if (slot == detail::SequenceTable::kNoSlot) return sequence_not_found(seq);
  const size_t needed = blocks_for(num_tokens);
  if (needed > available_block_count()) return out_of_memory(needed, available_block_count());
  reclaim_for(needed);
  const VictimKey old_key = victims_->key_of(slot);
  SequenceInfo& info = table_->at(slot);
  std::vector<BlockId> old_table = std::move(info.block_ids);
  info.block_ids.clear();
  for (size_t i = 0; i < needed; ++i) info.block_ids.push_back(take_block());
  release_blocks(old_table);
  info.num_tokens = num_tokens;
  touch(slot, old_key);
  return ok_status();
}

Status PagedKvCache::fork(SeqId src, SeqId dst) {
  KVF_RETURN_IF_ERROR(init_status_);
  if (table_->contains(dst)) {
    return invalid_operation("Destination sequence " + to_string(dst) + " already exists");
  }
  const uint32_t source = slot_of(src);
  if (source == detail::SequenceTable::kNoSlot) return sequence_not_found(src);

  share_blocks(table_->at(source).block_ids);
  add_sequence(dst, [&](SequenceInfo& child) {  // records stay in place: `source` stays valid
    const SequenceInfo& parent = table_->at(source);
    child.num_tokens = parent.num_tokens;
    child.block_ids.assign(parent.block_ids.begin(), parent.block_ids.end());
    child.priority = parent.priority;
  });
  stats_.total_forks += 1;
  return ok_status();
}

Status PagedKvCache::set_priority(SeqId seq, uint32_t priority) {
  KVF_RETURN_IF_ERROR(init_status_);
  const uint32_t slot = slot_of(seq);
  if (slot == detail::SequenceTable::kNoSlot) return sequence_not_found(seq);
  if (strategy_.policy() == EvictionPolicy::kPriority && priority >= strategy_.levels()) {
    return invalid_argument("priority " + std::to_string(priority) + " for " + to_string(seq) +
                            " is out of range for " + strategy_.to_string() + " (valid 0.." +
                            std::to_string(strategy_.levels() - 1) + ")");
  }
  const VictimKey old_key = victims_->key_of(slot);
  table_->at(slot).priority = priority;
  victims_->update(old_key, slot);
  return ok_status();
}

Result<SeqId> PagedKvCache::evict() {
  KVF_RETURN_IF_ERROR(init_status_);
  const std::optional<uint32_t> slot = victims_->first();
  if (!slot) return Status(ErrorCode::kNothingToEvict, "No sequences to evict");
  const SeqId target = table_->at(*slot).seq_id;
  remove_sequence(*slot);
  stats_.total_evictions += 1;
  return target;
}

Result<std::vector<SeqId>> PagedKvCache::evict_to_threshold(double target_util) {
  KVF_RETURN_IF_ERROR(init_status_);
  if (!(target_util >= 0.0 && target_util <= 1.0)) {
    return invalid_argument("evict_to_threshold target must be in [0, 1] (got " +
                            std::to_string(target_util) + ")");
  }
  std::vector<SeqId> evicted;
  while (utilization() > target_util && num_sequences() > 0) {
    // Evicting a sequence whose blocks are all shared frees nothing; take the first victim in
    // strategy order that frees memory, and fall back to the first one only when none does.
    std::optional<uint32_t> victim;
    victims_->visit_in_order([&](uint32_t slot) {
      if (frees_a_block(table_->at(slot))) victim = slot;
      return victim.has_value();
    });
    if (!victim) victim = victims_->first();
    evicted.push_back(table_->at(*victim).seq_id);
    remove_sequence(*victim);
    stats_.total_evictions += 1;
  }
  return evicted;
}

Result<std::vector<SeqId>> PagedKvCache::evict_to_threshold() {
  return evict_to_threshold(threshold_);
}

Result<size_t> PagedKvCache::apply_streaming_llm(SeqId seq) {
  if (strategy_.policy() != EvictionPolicy::kStreamingLlm) {
    return invalid_operation("apply_streaming_llm without sizes needs the StreamingLLM strategy (" +
                             strategy_.to_string() + " is configured)");
  }
  return apply_streaming_llm(seq, strategy_.sink_tokens(), strategy_.window_tokens());
}

Result<size_t> PagedKvCache::apply_streaming_llm(SeqId seq, size_t sink_tokens,
                                                 size_t window_tokens, size_t uncomputed_from) {
  KVF_RETURN_IF_ERROR(init_status_);
  const uint32_t slot = slot_of(seq);
  if (slot == detail::SequenceTable::kNoSlot) return sequence_not_found(seq);
  const SequenceInfo* info = &table_->at(slot);
  if (sink_tokens > std::numeric_limits<size_t>::max() - window_tokens) {
    return invalid_argument("sink_tokens + window_tokens overflows");
  }
  const size_t keep = sink_tokens + window_tokens;
  if (info->num_tokens <= keep) return size_t{0};

  const detail::CompactionPlan plan = detail::plan_streaming_compaction(
      info->num_tokens, layout_.block_size, sink_tokens, window_tokens);
  const size_t dropped = info->num_tokens - keep;
  KVF_RETURN_IF_ERROR(compact(slot, plan, keep, 0, uncomputed_from));
  stats_.streaming_evicted_tokens += dropped;
  return dropped;
}

Result<size_t> PagedKvCache::retain_tokens(SeqId seq, std::span<const size_t> positions,
                                           size_t own_blocks, size_t uncomputed_from) {
  KVF_RETURN_IF_ERROR(init_status_);
  const uint32_t slot = slot_of(seq);
  if (slot == detail::SequenceTable::kNoSlot) return sequence_not_found(seq);
  const SequenceInfo* info = &table_->at(slot);
  std::vector<uint8_t> listed(info->num_tokens, 0);
  for (size_t i = 0; i < positions.size(); ++i) {
    if (positions[i] >= info->num_tokens) {
      return invalid_argument("position " + std::to_string(positions[i]) + " past the " +
                              std::to_string(info->num_tokens) + " tokens of " + to_string(seq));
    }
    if (listed[positions[i]] != 0) {
      return invalid_argument("position " + std::to_string(positions[i]) +
                              " is kept twice; positions to keep must be distinct");
    }
    if (positions[i] < i) {
      return invalid_argument("position " + std::to_string(positions[i]) +
                              " would move to later slot " + std::to_string(i) +
                              "; kept tokens only move to earlier slots");
    }
    listed[positions[i]] = 1;
  }
  if (positions.size() == info->num_tokens) return size_t{0};  // every token stays

  const detail::CompactionPlan plan =
      detail::plan_token_retention(info->num_tokens, layout_.block_size, positions);
  const size_t dropped = info->num_tokens - positions.size();
  KVF_RETURN_IF_ERROR(compact(slot, plan, positions.size(), own_blocks, uncomputed_from));
  stats_.selection_evicted_tokens += dropped;
  return dropped;
}

Status PagedKvCache::compact(uint32_t seq_slot, const detail::CompactionPlan& plan, size_t keep,
                             size_t own_blocks, size_t uncomputed_from) {
  SequenceInfo& info = table_->at(seq_slot);
  const std::vector<BlockId>& old_table = info.block_ids;
  // A block that receives moved tokens must be private to this sequence, and so must the first
  // `own_blocks` and those the next forward pass writes into; a shared one is replaced by a fresh
  // block that first gets the computed tokens the shared block kept in place.
  const size_t bs = layout_.block_size;
  std::vector<bool> must_own(plan.base_index.size(), false);
  for (const auto& move : plan.moves)
    must_own[move.dst_index] = true;
  std::fill_n(must_own.begin(), std::min(own_blocks, must_own.size()), true);
  const size_t computed = std::min(keep, uncomputed_from);
  if (computed < keep) {  // the blocks from the one holding the first uncomputed slot
    std::fill(must_own.begin() + static_cast<ptrdiff_t>(computed / bs), must_own.end(), true);
  }
  size_t fresh_needed = 0;
  for (size_t k = 0; k < plan.base_index.size(); ++k) {
    if (must_own[k] && allocator_.ref_count(old_table[plan.base_index[k]]) > 1) ++fresh_needed;
  }
  if (fresh_needed > available_block_count()) {
    return out_of_memory(fresh_needed, available_block_count());
  }
  reclaim_for(fresh_needed);
  // The slots the moves fill, marked in one pass; needed only to fill replaced blocks.
  std::vector<bool> moved_slot;
  if (fresh_needed > 0) {
    moved_slot.assign(keep, false);
    for (const auto& move : plan.moves) {
      const size_t first = move.dst_index * bs + move.dst_offset;
      std::fill_n(moved_slot.begin() + static_cast<ptrdiff_t>(first), move.num_tokens, true);
    }
  }

  std::vector<BlockId> new_table(plan.base_index.size());
  std::vector<BlockId> released;
  uint64_t copied_tokens = 0;
  for (size_t k = 0; k < plan.base_index.size(); ++k) {
    const BlockId base = old_table[plan.base_index[k]];
    new_table[k] = base;
    if (!must_own[k] || allocator_.ref_count(base) == 1) continue;
    const BlockId fresh = take_block();
    new_table[k] = fresh;
    released.push_back(base);
    // The computed slots of new block k that no move fills: those kept in place in the base
    // block (the forward pass fills the others).
    const size_t block_end = std::min(computed, (k + 1) * bs);
    for (size_t slot = k * bs; slot < block_end;) {
      if (moved_slot[slot]) {
        ++slot;
        continue;
      }
      size_t end = slot;
      while (end < block_end && !moved_slot[end])
        ++end;
      const auto offset = static_cast<uint32_t>(slot - k * bs);
      pending_copies_.push_back(TokenCopy{
          base, offset, fresh, offset, static_cast<uint32_t>(end - slot), CopyReason::kCompaction});
      copied_tokens += end - slot;
      slot = end;
    }
  }
  for (const auto& move : plan.moves) {
    pending_copies_.push_back(TokenCopy{old_table[move.src_index], move.src_offset,
                                        new_table[move.dst_index], move.dst_offset, move.num_tokens,
                                        CopyReason::kCompaction});
    copied_tokens += move.num_tokens;
  }
  for (size_t index : plan.dropped_index)
    released.push_back(old_table[index]);
  release_blocks(released);

  const VictimKey old_key = victims_->key_of(seq_slot);
  info.block_ids = std::move(new_table);
  info.num_tokens = keep;
  touch(seq_slot, old_key);
  stats_.compactions += 1;
  stats_.compaction_copied_tokens += copied_tokens;
  return ok_status();
}

size_t PagedKvCache::host_memory_bytes() const {
  return allocator_.total() * BlockAllocator::kBytesPerBlock + retained_.capacity() / 8 +
         table_->memory_bytes() + victims_->memory_bytes() +
         pending_copies_.capacity() * sizeof(TokenCopy);
}

std::vector<TokenCopy> PagedKvCache::take_pending_copies() {
  std::vector<TokenCopy> copies;
  copies.swap(pending_copies_);
  return copies;
}

// ---------------------------------------------------------------------------------------------
// Integrity and display

Status PagedKvCache::verify_integrity() const {
  std::vector<uint32_t> refs(total_blocks(), 0);
  for (uint32_t slot = 0; slot < table_->slot_limit(); ++slot) {
    if (!table_->alive(slot)) continue;
    const SequenceInfo& info = table_->at(slot);
    const SeqId seq = info.seq_id;
    if (table_->slot_of(seq) != slot) {
      return Status(ErrorCode::kInternal, to_string(seq) + " is not found in its own slot");
    }
    if (info.block_ids.size() != blocks_for(info.num_tokens)) {
      return Status(ErrorCode::kInternal,
                    to_string(seq) + " has " + std::to_string(info.block_ids.size()) +
                        " blocks for " + std::to_string(info.num_tokens) + " tokens");
    }
    for (BlockId block : info.block_ids) {
      if (block.value >= refs.size()) return block_not_found(block);
      ++refs[block.value];
    }
  }
  KVF_RETURN_IF_ERROR(victims_->verify());
  size_t free_blocks = 0;
  size_t idle_retained = 0;
  size_t retained = 0;
  for (uint32_t b = 0; b < refs.size(); ++b) {
    const BlockId block{b};
    const uint32_t retainer_refs = is_retained(block) ? 1 : 0;
    if (refs[b] + retainer_refs != allocator_.ref_count(block)) {
      return Status(ErrorCode::kInternal,
                    to_string(block) + " has " + std::to_string(allocator_.ref_count(block)) +
                        " references but " + std::to_string(refs[b]) + " tables hold it" +
                        (retainer_refs ? " and the retainer one" : ""));
    }
    if (allocator_.ref_count(block) == 0) ++free_blocks;
    retained += retainer_refs;
    if (retainer_refs && refs[b] == 0) ++idle_retained;
  }
  if (retained != retained_count_) {
    return Status(ErrorCode::kInternal, std::to_string(retained) + " blocks are retained but " +
                                            std::to_string(retained_count_) + " are counted");
  }
  // The retainer may hold idle blocks it cannot give back yet, never more than exist.
  if (cached_block_count() > idle_retained) {
    return Status(ErrorCode::kInternal,
                  "the retainer reports " + std::to_string(cached_block_count()) +
                      " idle blocks but only " + std::to_string(idle_retained) +
                      " retained blocks have no sequence");
  }
  if (free_blocks != free_block_count()) {
    return Status(ErrorCode::kInternal, "free list holds " + std::to_string(free_block_count()) +
                                            " blocks but " + std::to_string(free_blocks) +
                                            " are unreferenced");
  }
  return ok_status();
}

std::ostream& operator<<(std::ostream& os, const PagedKvCache& cache) {
  char line[160];
  os << "PagedKvCache\n";
  os << "  Strategy: " << cache.strategy_ << " (block_size=" << cache.block_size() << ")\n";
  std::snprintf(line, sizeof(line), "  Blocks: %zu/%zu (%.1f%% used)\n", cache.used_block_count(),
                cache.total_blocks(), cache.utilization() * 100.0);
  os << line;
  std::snprintf(line, sizeof(line), "  Memory: %.2f MB / %.2f MB\n",
                static_cast<double>(cache.used_memory_bytes()) / 1e6,
                static_cast<double>(cache.total_memory_bytes()) / 1e6);
  os << line;
  os << "  Sequences: " << cache.num_sequences() << " active\n";
  if (cache.retainer_ != nullptr) os << "  Cached: " << cache.cached_block_count() << " blocks\n";
  const CacheStats& s = cache.stats_;
  os << "  Stats: allocs=" << s.total_allocations << ", frees=" << s.total_frees
     << ", evictions=" << s.total_evictions << ", forks=" << s.total_forks << "\n";
  return os;
}

}  // namespace kvfabric
