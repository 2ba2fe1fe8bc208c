#include "kvfabric/coordinator/coordinator.h"

#include <algorithm>
#include <functional>
#include <limits>
#include <set>
#include <string>
#include <tuple>

#include "common/host_memory.h"
#include "common/log.h"
#include "common/slot_map.h"
#include "coordinator/seen_blocks.h"

namespace kvfabric {
namespace {

// SeqIds from 2^63 up are reserved (none are issued today); refusing them keeps room for internal
// sequences without a clash with a scheduler's ids.
constexpr uint64_t kMaxUserSeqId = uint64_t{1} << 63;

// A replica that holds none of the looked-up prompt, in questions asked of any such one.
constexpr uint32_t kNoReplica = std::numeric_limits<uint32_t>::max();

size_t blocks_for(size_t tokens, size_t block_size) { return (tokens + block_size - 1) / block_size; }

// The block tables of every replica are allocated up front: refuse a config whose tables this
// host cannot hold (dp <= 2^16 and pools < 2^32 blocks: the product fits in 64 bits).
Status check_bookkeeping_memory(const Config& config) {
  KVF_ASSIGN_OR_RETURN(const uint64_t device_blocks, resolved_num_blocks(config));
  const uint64_t host_blocks = config.cache.host_num_blocks;
  const uint64_t per_replica =
      device_blocks * (BlockAllocator::kBytesPerBlock + GlobalPrefixIndex::kBytesPerBlock) +
      host_blocks * BlockAllocator::kBytesPerBlock;
  return detail::check_host_memory(
      per_replica * config.topology.dp +
          detail::SeenBlocks::bytes_for(device_blocks * config.topology.dp),
      "the coordinator's block tables (topology.dp " + std::to_string(config.topology.dp) +
          " x cache.num_blocks " + std::to_string(device_blocks) + " device + cache.host_num_blocks " +
          std::to_string(host_blocks) + " host blocks)");
}

// The salt a request's prefix is indexed under: the tenant's own, or a salt within the tenant.
// Lengths make the text unambiguous; the default tenant without a salt has none (shared).
CacheSalt salt_of(const AdmitOptions& options) {
  if (!options.cache_salt && options.tenant.empty()) return {};
  std::string text = std::to_string(options.tenant.size()) + ":" + options.tenant;
  if (options.cache_salt) text += ":" + *options.cache_salt;
  return CacheSalt::of(text);
}

std::string sequence_limit_text(uint32_t limit) {
  return std::to_string(limit) + " sequences (coordinator.max_sequences_per_replica)";
}

}  // namespace

// Live sequences in stable slots, by id; nothing is decided by their order.
struct Coordinator::SequenceMap : detail::SlotMap<Sequence> {};

// (load, replica), least loaded first.
struct Coordinator::LoadOrder : std::set<std::pair<double, uint32_t>> {};

struct Coordinator::Replica {
  PagedKvCache pool;  // its retainer is the global prefix index
  BlockAllocator host;
  uint32_t running = 0;
  std::map<uint32_t, uint32_t> swapped_by_priority = {};  // waiting swapped sequences per priority
  bool relieved_this_step = false;  // swapped, parked or preempted a sequence in this step
  double load = 0;                  // its key in by_load_
  bool load_stale = false;          // listed in stale_loads_

  // Running and swapped sequences (what coordinator.max_sequences_per_replica bounds).
  [[nodiscard]] uint64_t sequences() const {
    uint64_t total = running;
    for (const auto& [priority, count] : swapped_by_priority) total += count;
    return total;
  }
};

Coordinator::Coordinator(const Config& config)
    : config_(config),
      by_load_(std::make_unique<LoadOrder>()),
      seqs_(std::make_unique<SequenceMap>()) {}
Coordinator::Coordinator(Coordinator&&) noexcept = default;
Coordinator& Coordinator::operator=(Coordinator&&) noexcept = default;
Coordinator::~Coordinator() = default;

Result<Coordinator> Coordinator::create(const Config& config) {
  KVF_RETURN_IF_ERROR(validate(config));
  // Layer groups are views of the ranks' one pool (PyramidKV), each a whole number of layers.
  const uint32_t per_group = config.cache.layers_per_group;
  if (per_group != 0 && config.model.num_layers % per_group != 0) {
    return invalid_argument("cache.layers_per_group " + std::to_string(per_group) +
                            " must divide the " + std::to_string(config.model.num_layers) +
                            " layers of the model (0: one group of all of them)");
  }
  KVF_RETURN_IF_ERROR(check_bookkeeping_memory(config));
  KVF_ASSIGN_OR_RETURN(const uint64_t device_blocks, resolved_num_blocks(config));
  Coordinator c(config);
  (void)c.tenant_index("");  // the default tenant: index 0
  KVF_ASSIGN_OR_RETURN(c.index_,
                       GlobalPrefixIndex::create({config.cache.block_size, config.topology.dp,
                                                  static_cast<uint32_t>(device_blocks)}));
  c.seen_ = std::make_unique<detail::SeenBlocks>(device_blocks * config.topology.dp);
  for (uint32_t r = 0; r < config.topology.dp; ++r) {
    KVF_ASSIGN_OR_RETURN(PagedKvCache pool, PagedKvCache::create(config));
    KVF_RETURN_IF_ERROR(pool.set_block_retainer(&c.index_->retainer(r)));
    c.block_bytes_ = pool.block_memory_bytes();
    c.replicas_.push_back(
        Replica{std::move(pool), BlockAllocator(static_cast<uint32_t>(config.cache.host_num_blocks))});
    c.replicas_.back().load = c.load_of(r);
    c.by_load_->emplace(c.replicas_.back().load, r);
  }
  return c;
}

bool Coordinator::is_full(uint32_t replica) const {
  return replicas_[replica].sequences() >= config_.coordinator.max_sequences_per_replica;
}

Status Coordinator::check_new_sequence(SeqId seq, std::string_view role) const {
  if (seq.value >= kMaxUserSeqId) {
    return invalid_argument(to_string(seq) + " is in the reserved range (ids must be < 2^63)");
  }
  if (seqs_->contains(seq.value)) return invalid_operation(std::string(role) + to_string(seq) + " already exists");
  return ok_status();
}

Status Coordinator::no_room(const std::string& request, uint32_t replica, size_t needed,
                            const Relief& relief) const {
  const PagedKvCache& pool = replicas_[replica].pool;
  std::string why = request + ": needs " + std::to_string(needed) + " blocks on replica " +
                    std::to_string(replica) + ", which ";
  if (needed > pool.total_blocks()) {
    why += "holds " + std::to_string(pool.total_blocks()) + " in all";
  } else {
    why += "has " + std::to_string(pool.available_block_count()) + " available and could free " +
           std::to_string(relief.reachable - pool.available_block_count()) +
           " more from the sequences it may displace";
  }
  return Status(ErrorCode::kOutOfMemory, why + "; nothing was changed");
}

Coordinator::Sequence* Coordinator::find(SeqId seq) {
  const uint32_t slot = seqs_->find(seq.value);
  return slot == SequenceMap::kNone ? nullptr : &seqs_->at(slot);
}

const Coordinator::Sequence* Coordinator::find(SeqId seq) const {
  const uint32_t slot = seqs_->find(seq.value);
  return slot == SequenceMap::kNone ? nullptr : &seqs_->at(slot);
}

const SequenceInfo* Coordinator::running_info(SeqId seq, const Sequence& s) const {
  return replicas_[s.replica].pool.get_sequence(seq, s.slot);
}

PagedKvCache& Coordinator::pool_of(uint32_t replica) { return replicas_[replica].pool; }

uint32_t Coordinator::num_replicas() const { return static_cast<uint32_t>(replicas_.size()); }

std::optional<uint32_t> Coordinator::replica_of(SeqId seq) const {
  const Sequence* s = find(seq);
  if (s == nullptr) return std::nullopt;
  return s->replica;
}

bool Coordinator::is_swapped(SeqId seq) const {
  const Sequence* s = find(seq);
  return s != nullptr && s->swapped;
}

ReplicaStats Coordinator::replica_stats(uint32_t replica) const {
  const Replica& rep = replicas_.at(replica);
  ReplicaStats stats;
  stats.device_blocks = rep.pool.total_blocks();
  stats.used_blocks = rep.pool.used_block_count();
  stats.cached_blocks = rep.pool.cached_block_count();
  stats.free_blocks = rep.pool.free_block_count();
  stats.indexed_blocks = index_->cached_blocks(replica);
  stats.sequences = rep.pool.num_sequences();
  for (const auto& [priority, count] : rep.swapped_by_priority) stats.swapped += count;
  stats.host_blocks = rep.host.total();
  stats.host_free_blocks = rep.host.free_count();
  return stats;
}

size_t Coordinator::cached_tokens(uint32_t replica, std::span<const TokenId> prompt,
                                  const AdmitOptions& options) const {
  if (replica >= replicas_.size()) return 0;
  PrefixLookup lookup;
  index_->lookup(RadixKey(prompt, config_.cache.block_size, {salt_of(options), options.public_tokens}),
                 lookup);
  return index_->prefix_on(lookup, replica).tokens;
}

size_t Coordinator::host_memory_bytes() const {
  size_t bytes = index_->memory_bytes() + seqs_->memory_bytes() + seen_->memory_bytes() +
                 replicas_.size() * sizeof(Replica) + by_load_->size() * 24;
  for (const Replica& rep : replicas_) {
    bytes += rep.pool.host_memory_bytes() + rep.host.total() * BlockAllocator::kBytesPerBlock;
  }
  seqs_->for_each([&](uint32_t, const Sequence& s) {
    bytes += s.host_blocks.capacity() * sizeof(BlockId);
  });
  return bytes;
}

size_t Coordinator::host_free_blocks(uint32_t replica) const { return replicas_.at(replica).host.free_count(); }

std::vector<BlockId> Coordinator::blocks_of(SeqId seq) const {
  const Sequence* s = find(seq);
  if (s == nullptr || s->swapped) return {};
  return running_info(seq, *s)->block_ids;
}

void Coordinator::collect_copies(uint32_t replica) {
  // Taken right away so they keep their place among the step's ops (plan order is meaning).
  for (const TokenCopy& c : replicas_[replica].pool.take_pending_copies()) {
    plan_.ops.push_back(StepPlan::Op::token_copy(replica, c));
  }
}

void Coordinator::forget_swapped(uint32_t replica, uint32_t priority) {
  auto& waiting = replicas_[replica].swapped_by_priority;
  const auto it = waiting.find(priority);
  KVF_CHECK(it != waiting.end() && it->second > 0, "swapped-sequence count out of step");
  if (--it->second == 0) waiting.erase(it);
}

void Coordinator::mark_table(Sequence& s) {
  if (s.in_plan) return;
  s.in_plan = true;
  dirty_.emplace_back(s.record_slot, s.incarnation);
}

void Coordinator::migrate(uint32_t src_replica, std::span<const BlockId> src, uint32_t dst_replica,
                          std::span<const BlockId> dst) {
  for (size_t i = 0; i < src.size(); ++i) {
    plan_.ops.push_back(StepPlan::Op::migrate(src_replica, src[i], dst_replica, dst[i]));
  }
  stats_.migrated_blocks += src.size();
}

// Victims in the order relief takes them, among the replica's running sequences below
// `below_priority`: each next one from the tenant holding the most blocks on the replica once the
// victims before it are gone (ties: the tenant's name), and within a tenant the lowest priority,
// then least recently used, then lowest SeqId. The order depends only on the replica's state, so
// it is known up front.
std::vector<const SequenceInfo*> Coordinator::victim_order(uint32_t replica,
                                                           const ReliefRequest& request) const {
  // Per tenant: the blocks it holds on the replica, and its candidates in their own order.
  struct Queue {
    uint64_t held = 0;
    std::vector<const SequenceInfo*> candidates;
    size_t next = 0;
  };
  std::map<uint32_t, Queue> queues;
  // Any visiting order: each tenant's candidates are sorted by a total order below.
  seqs_->for_each([&](uint32_t slot, const Sequence& state) {
    const SeqId seq{seqs_->id_at(slot)};
    if (state.swapped || state.replica != replica) return;
    const SequenceInfo* info = running_info(seq, state);
    Queue& q = queues[state.tenant];
    q.held += info->block_ids.size();
    if (seq != request.exclude && info->priority < request.below_priority) {
      q.candidates.push_back(info);
    }
  });
  for (auto& [tenant, q] : queues) {
    std::sort(q.candidates.begin(), q.candidates.end(),
              [](const SequenceInfo* a, const SequenceInfo* b) {
                return std::tie(a->priority, a->last_access, a->seq_id) <
                       std::tie(b->priority, b->last_access, b->seq_id);
              });
  }
  // Fairness: each next victim comes from the tenant that then holds the most blocks here.
  std::vector<const SequenceInfo*> order;
  for (;;) {
    Queue* from = nullptr;
    uint32_t from_tenant = 0;
    for (auto& [tenant, q] : queues) {
      if (q.next == q.candidates.size()) continue;
      const bool better =
          from == nullptr || q.held > from->held ||
          (q.held == from->held && tenants_[tenant].name < tenants_[from_tenant].name);
      if (better) {
        from = &q;
        from_tenant = tenant;
      }
    }
    if (from == nullptr) return order;
    const SequenceInfo* victim = from->candidates[from->next++];
    from->held -= victim->block_ids.size();
    order.push_back(victim);
  }
}

// What displacing victims in victim_order() makes free: each victim's blocks that no other
// sequence holds (reused blocks excepted: the request takes them itself).
Coordinator::Relief Coordinator::plan_relief(uint32_t replica, const ReliefRequest& request) const {
  const PagedKvCache& pool = replicas_[replica].pool;
  Relief relief;
  relief.reachable = pool.available_block_count();
  if (request.needed > pool.total_blocks() + (request.copied_tail ? 1 : 0)) return relief;
  const std::vector<const SequenceInfo*> candidates = victim_order(replica, request);
  const std::set<BlockId> reused(request.reused.begin(), request.reused.end());
  std::map<BlockId, uint32_t> released;  // references the victims so far give up, per block
  // Blocks the victims free outright, and cached ones they stop using: those come back only as
  // the index counts them idle (a holding with a used block below it stays in use).
  size_t freed = 0;
  std::vector<BlockId> unused_cached;
  const size_t free_now = pool.free_block_count();
  size_t needed = request.needed;
  for (const SequenceInfo* victim : candidates) {
    if (relief.reachable >= needed) break;
    relief.victims.push_back(victim->seq_id);
    for (BlockId block : victim->block_ids) {
      const uint32_t left = pool.block_ref_count(block) - ++released[block];
      const bool retained = pool.is_retained(block);
      if (left == (retained ? 1u : 0u) && reused.count(block) == 0) {
        if (retained) {
          unused_cached.push_back(block);
        } else {
          ++freed;
        }
      }
      // The requester alone holds its shared tail now: it writes there instead of copying it.
      if (request.copied_tail == block && left == 1) --needed;
    }
    relief.reachable =
        free_now + freed + index_->idle_blocks_after(replica, unused_cached, request.reused);
  }
  relief.enough = relief.reachable >= needed;
  return relief;
}

void Coordinator::relieve(uint32_t replica, std::span<const SeqId> victims) {
  if (!victims.empty()) replicas_[replica].relieved_this_step = true;
  for (SeqId victim : victims) {
    if (!swap_out(victim) && !park(victim)) preempt(victim);
  }
}

bool Coordinator::swap_out(SeqId seq) {
  Sequence& s = *find(seq);
  Replica& rep = replicas_[s.replica];
  const SequenceInfo* info = rep.pool.get_sequence(seq);
  Tenant& tenant = tenants_[s.tenant];
  const uint64_t host_quota = quota_of(tenant).max_host_blocks;
  if (host_quota != 0 && tenant.stats.host_blocks + info->block_ids.size() > host_quota) {
    return false;  // the tenant's host tier is full: parked or preempted instead
  }
  auto host = rep.host.allocate(info->block_ids.size());
  if (!host.ok()) return false;
  tenant.stats.host_blocks += info->block_ids.size();
  for (size_t i = 0; i < info->block_ids.size(); ++i) {
    plan_.ops.push_back(StepPlan::Op::swap_out(s.replica, info->block_ids[i], host.value()[i]));
  }
  s.host_blocks = std::move(host).value();
  s.num_tokens = info->num_tokens;
  s.priority = info->priority;
  s.swapped = true;
  s.in_plan = false;  // its table goes with this plan's release; a swap-in publishes it whole
  s.swap_order = next_swap_order_++;
  swap_queue_.emplace(s.swap_order, seq);
  ++rep.swapped_by_priority[s.priority];
  const Status freed = rep.pool.free(seq);
  KVF_CHECK(freed.ok(), freed.message());
  --rep.running;
  mark_load(s.replica);
  plan_.released.push_back(seq);
  forget_scores(seq);
  ++stats_.swapped_out;
  KVF_LOG_DEBUG(kCoordinator, "swapped {} out of replica {}", to_string(seq), s.replica);
  return true;
}

bool Coordinator::park(SeqId seq) {
  Sequence& s = *find(seq);
  const PagedKvCache& from_pool = replicas_[s.replica].pool;
  const SequenceInfo* info = from_pool.get_sequence(seq);
  // The peer with the most room that can take the whole sequence (ties: lowest replica id).
  std::optional<uint32_t> peer;
  for (uint32_t p = 0; p < replicas_.size(); ++p) {
    if (p == s.replica || is_full(p)) continue;
    const size_t room = replicas_[p].pool.available_block_count();
    if (room >= info->block_ids.size() &&
        (!peer || room > replicas_[*peer].pool.available_block_count())) {
      peer = p;
    }
  }
  if (!peer) return false;
  PagedKvCache& to_pool = replicas_[*peer].pool;
  if (!to_pool.allocate(seq, info->num_tokens).ok()) return false;
  const std::vector<BlockId> from = info->block_ids;
  const uint32_t priority = info->priority;
  const SequenceSlot to_slot = *to_pool.find_slot(seq);
  migrate(s.replica, from, *peer, to_pool.get_sequence(seq, to_slot)->block_ids);
  (void)to_pool.set_priority(seq, priority);
  const Status freed = replicas_[s.replica].pool.free(seq);
  KVF_CHECK(freed.ok(), freed.message());
  --replicas_[s.replica].running;
  ++replicas_[*peer].running;
  mark_load(s.replica);
  mark_load(*peer);
  KVF_LOG_DEBUG(kCoordinator, "parked {} from replica {} on replica {}", to_string(seq), s.replica, *peer);
  s.replica = *peer;
  s.slot = to_slot;
  s.published_blocks = 0;  // a table new to its replica
  mark_table(s);
  forget_scores(seq);
  ++stats_.parked;
  return true;
}

void Coordinator::preempt(SeqId seq) {
  Sequence& s = *find(seq);
  const Status freed = replicas_[s.replica].pool.free(seq);
  KVF_CHECK(freed.ok(), freed.message());
  --replicas_[s.replica].running;
  mark_load(s.replica);
  ++tenants_[s.tenant].stats.preempted;
  erase_sequence(seq);
  plan_.released.push_back(seq);
  plan_.preempted.push_back(seq);
  ++stats_.preempted;
}

Result<Placement> Coordinator::admit(SeqId seq, std::span<const TokenId> prompt, uint32_t priority) {
  return admit(seq, std::vector<TokenId>(prompt.begin(), prompt.end()), priority);
}

Result<Placement> Coordinator::admit(SeqId seq, std::vector<TokenId>&& prompt, uint32_t priority) {
  AdmitOptions options;
  options.priority = priority;
  return admit(seq, std::move(prompt), options);
}

Result<Placement> Coordinator::admit(SeqId seq, std::span<const TokenId> prompt,
                                     const AdmitOptions& options) {
  return admit(seq, std::vector<TokenId>(prompt.begin(), prompt.end()), options);
}

Result<Placement> Coordinator::admit(SeqId seq, std::vector<TokenId>&& prompt,
                                     const AdmitOptions& options) {
  const uint32_t tenant = tenant_index(options.tenant);
  auto placed = admit_for(seq, std::move(prompt), tenant, options);
  if (!placed.ok()) note_refusal(tenant, placed.status());
  return placed;
}

Status Coordinator::check_pending_room(const std::function<std::string()>& request) const {
  const uint64_t pending = plan_.ops.size() + dirty_.size() + plan_.released.size() +
                           admitted_now_blocks_;
  const uint32_t limit = config_.coordinator.max_pending_plan_entries;
  if (pending < limit) return ok_status();
  return Status(
      ErrorCode::kResourceExhausted,
      request() + ": the next plan holds " + std::to_string(pending) + " entries, at most " +
          std::to_string(limit) +
          " (coordinator.max_pending_plan_entries); call step first; nothing was changed");
}

Result<Placement> Coordinator::admit_for(SeqId seq, std::vector<TokenId>&& prompt, uint32_t tenant,
                                         const AdmitOptions& options) {
  const auto request = [&] { return "admit " + to_string(seq); };
  KVF_RETURN_IF_ERROR(check_new_sequence(seq, "Sequence "));
  KVF_RETURN_IF_ERROR(check_pending_room(request));
  if (prompt.empty()) return invalid_argument(request() + ": the prompt is empty");
  const uint32_t priority = options.priority;
  KVF_RETURN_IF_ERROR(check_priority(seq, priority));
  KVF_RETURN_IF_ERROR(check_tenant_priority(request, tenant, priority));
  KVF_RETURN_IF_ERROR(check_compression(seq, options, prompt.size()));
  const auto check_quota_for = [&](size_t tokens) {
    return check_quota(request, tenant, 1, blocks_for(tokens, config_.cache.block_size));
  };
  const CacheSalt salt = salt_of(options);
  std::optional<uint64_t> probe;
  if (options.compression) {
    // An identical compressed request may have left its compacted prompt: nothing to compute.
    const quant::CompressionPolicy& policy = *options.compression;
    const uint64_t budget = budget_of(policy, prompt.size());
    probe = compressed_prompt_probe(policy, budget, salt, prompt);
    // A kept prompt takes its own blocks from the tenant's quota, not the full prompt's.
    if (probe && compressed_probe_seen(*probe) && check_quota_for(budget).ok()) {
      std::optional<Placement> served =
          admit_compressed(seq, prompt.size(), compressed_prompt_identity(policy, budget, salt, prompt),
                           budget, priority, tenant);
      if (served) {
        record_compression(seq, options, prompt.size(), probe, /*served_compacted=*/true);
        return *std::move(served);
      }
    }
  }
  KVF_RETURN_IF_ERROR(check_quota_for(prompt.size()));
  // One walk of the global tree; every replica's share of the prompt is read off its path. The
  // key keeps the unit hashes it computes for indexing the prompt at step().
  RadixKey key(prompt, config_.cache.block_size, {salt, options.public_tokens});
  index_->lookup(key, lookup_);
  KVF_ASSIGN_OR_RETURN(AdmitChoice choice,
                       choose_replica(seq, match_of(lookup_, prompt.size()), priority));
  if (!choice.victims.empty()) {
    relieve(choice.replica, choice.victims);
    index_->lookup(key, lookup_);  // making room may have evicted or moved cached blocks
  }
  const size_t best_tokens = lookup_.tokens();
  const size_t prompt_tokens = prompt.size();
  KVF_ASSIGN_OR_RETURN(Placement placed,
                       place(seq, std::move(prompt), std::move(key), priority, tenant, choice));
  admitted_now_.back().best_tokens = best_tokens;
  admitted_now_.back().served_tokens = placed.cached_tokens;
  record_compression(seq, options, prompt_tokens, probe, /*served_compacted=*/false);
  return placed;
}

const CoordinatorStats& Coordinator::stats() const {
  count_pending_misses();
  return stats_;
}

void Coordinator::count_pending_misses() const {
  for (; misses_counted_ < admitted_now_.size(); ++misses_counted_) {
    count_misses(admitted_now_[misses_counted_]);
  }
}

void Coordinator::count_misses(const AdmittedPrompt& admitted) const {
  const RadixKey& key = admitted.key;
  const size_t bs = config_.cache.block_size;
  const size_t length = key.tokens().size();
  const size_t full = length - length % bs;
  MissedTokens& missed = stats_.missed;
  missed.partial_block += length - full;
  const size_t served = admitted.served_tokens;
  const size_t covered = std::max(admitted.best_tokens, served);
  missed.other_replica += covered - served;
  // Past what any replica holds: blocks seen before were evicted; then, for a salted prompt,
  // blocks seen under another salt; the rest are new. Each run stops at the first block that is
  // not seen, as the blocks after it extend a prefix nobody cached.
  const std::span<const TokenId> tokens = key.tokens();
  using detail::SeenBlocks;
  size_t pos = covered;
  while (pos < full &&
         seen_->contains(SeenBlocks::key(tokens.subspan(pos, bs), pos / bs, key.salt_at(pos), false))) {
    pos += bs;
  }
  missed.evicted += pos - covered;
  const size_t salted_from = pos;
  if (!key.scope().salt.empty()) {
    while (pos < full &&
           seen_->contains(SeenBlocks::key(tokens.subspan(pos, bs), pos / bs, {}, /*any_salt=*/true))) {
      pos += bs;
    }
  }
  missed.other_salt += pos - salted_from;
  missed.never_seen += full - pos;
}

void Coordinator::remember_blocks(const RadixKey& key, size_t fresh) {
  const size_t bs = config_.cache.block_size;
  const std::span<const TokenId> tokens = key.tokens();
  const size_t full = tokens.size() / bs * bs;
  for (size_t pos = full - fresh * bs; pos < full; pos += bs) {
    const uint64_t sampled = detail::SeenBlocks::sample(tokens.subspan(pos, bs));
    seen_->add(detail::SeenBlocks::key(sampled, pos / bs, key.salt_at(pos), false));
    seen_->add(detail::SeenBlocks::key(sampled, pos / bs, {}, /*any_salt=*/true));
  }
}

Coordinator::PromptMatch Coordinator::match_of(const PrefixLookup& lookup, size_t tokens) const {
  PromptMatch m;
  m.tokens = tokens;
  m.blocks = blocks_for(tokens, config_.cache.block_size);
  m.best_tokens = lookup.tokens();
  if (!lookup.steps.empty()) m.best_source = index_->holders(lookup, lookup.steps.size() - 1).front();
  return m;
}

bool Coordinator::migrates(const PromptMatch& prompt, uint32_t replica, size_t local) const {
  const CoordinatorConfig& w = config_.coordinator;
  return replica != prompt.best_source && prompt.best_tokens > local &&
         w.migration_token_cost < w.prefill_token_cost;
}

double Coordinator::prefix_cost(const PromptMatch& prompt, size_t local, bool migrate) const {
  const CoordinatorConfig& w = config_.coordinator;
  const size_t covered = migrate ? prompt.best_tokens : local;
  double cost = w.prefill_token_cost * static_cast<double>(prompt.tokens - covered);
  if (migrate) cost += w.migration_token_cost * static_cast<double>(prompt.best_tokens - local);
  return cost;
}

Coordinator::Candidate Coordinator::evaluate(const PrefixLookup& lookup, const PromptMatch& prompt,
                                             uint32_t replica, double load) const {
  const ReplicaPrefix local = index_->prefix_on(lookup, replica);
  const bool migrate = migrates(prompt, replica, local.tokens);
  return Candidate{replica, prefix_cost(prompt, local.tokens, migrate) + load, migrate,
                   prompt.blocks - local.blocks + local.idle_blocks};
}

std::optional<uint32_t> cheapest_with_room(std::span<const AdmissionCost> costs) {
  const AdmissionCost* best = nullptr;
  for (const AdmissionCost& c : costs) {
    if (!c.accepts || !c.has_room()) continue;
    if (best == nullptr || std::tie(c.cost, c.replica) < std::tie(best->cost, best->replica)) {
      best = &c;
    }
  }
  return best == nullptr ? std::nullopt : std::optional(best->replica);
}

Result<std::vector<AdmissionCost>> Coordinator::admission_costs(std::span<const TokenId> prompt,
                                                                const AdmitOptions& options) const {
  const auto request = [] { return std::string("admission costs"); };
  if (prompt.empty()) return invalid_argument(request() + ": the prompt is empty");
  KVF_RETURN_IF_ERROR(check_priority_level(options.priority, "the request"));
  const auto known = tenant_ids_.find(options.tenant);
  KVF_RETURN_IF_ERROR(check_tenant_priority(
      request, known == tenant_ids_.end() ? nullptr : &tenants_[known->second], options.priority));
  const size_t bs = config_.cache.block_size;
  PrefixLookup lookup;
  index_->lookup(RadixKey(prompt, bs, {salt_of(options), options.public_tokens}), lookup);
  const PromptMatch match = match_of(lookup, prompt.size());
  std::vector<AdmissionCost> costs;
  costs.reserve(replicas_.size());
  for (uint32_t r = 0; r < replicas_.size(); ++r) {
    // The load as it is now; admit() reads the same, refreshed for what changed since.
    const double load = load_of(r);
    const Candidate c = evaluate(lookup, match, r, load);
    AdmissionCost& cost = costs.emplace_back();
    cost.replica = r;
    cost.accepts = accepts(r, options.priority);
    cost.cached_tokens = index_->prefix_on(lookup, r).tokens;
    if (c.migrate_prefix) {
      cost.migration_source = match.best_source;
      cost.migrated_tokens = match.best_tokens - cost.cached_tokens;
    }
    cost.load = load;
    cost.cost = c.cost;
    cost.blocks_needed = c.needed;
    cost.blocks_available = replicas_[r].pool.available_block_count();
  }
  return costs;
}

bool Coordinator::accepts(uint32_t replica, uint32_t priority) const {
  // Swapped sequences that rank with the newcomer return first (as vLLM schedules swap-ins
  // before new prefills): their replica takes no newcomer until they are back.
  const auto& waiting = replicas_[replica].swapped_by_priority;
  return !is_full(replica) && waiting.lower_bound(priority) == waiting.end();
}

std::optional<uint32_t> Coordinator::least_loaded_with_room(size_t blocks, uint32_t priority) {
  refresh_loads();
  for (const auto& [load, r] : *by_load_) {
    if (accepts(r, priority) && replicas_[r].pool.available_block_count() >= blocks) return r;
  }
  return std::nullopt;
}

bool Coordinator::has_room(const Candidate& c) const {
  return c.needed <= replicas_[c.replica].pool.available_block_count();
}

// The cheapest candidate with room offered so far; ties go to the lower replica id.
class Coordinator::Cheapest {
 public:
  void offer(const Candidate& c) {
    if (!best_ || c.cost < best_->cost || (c.cost == best_->cost && c.replica < best_->replica)) {
      best_ = c;
    }
  }
  // Whether a replica costing at least `bound` can no longer win. Replicas come in load order,
  // equal loads in replica order, so past the best's id an equal bound loses too. (Two unequal
  // loads whose bounds round to the same value could hide a lower id behind the stop: loads
  // differ by at least a running sequence's or a block's weight, far above a rounding step.)
  [[nodiscard]] bool beats(double bound, uint32_t replica) const {
    return best_ && (bound > best_->cost || (bound == best_->cost && replica > best_->replica));
  }
  [[nodiscard]] const std::optional<Candidate>& best() const { return best_; }

 private:
  std::optional<Candidate> best_;
};

Result<Coordinator::AdmitChoice> Coordinator::choose_replica(SeqId seq, const PromptMatch& prompt,
                                                             uint32_t priority) {
  refresh_loads();
  Cheapest cheapest;
  auto rank = [&](uint32_t r) {
    if (!accepts(r, priority)) return;
    const Candidate c = evaluate(lookup_, prompt, r, replicas_[r].load);
    if (has_room(c)) cheapest.offer(c);
  };
  // The holders of the prompt's deepest steps are few: each is ranked on its own.
  constexpr size_t kFewHolders = 16;
  size_t few_from = 0;
  while (few_from < lookup_.steps.size() && index_->holders(lookup_, few_from).size() > kFewHolders) {
    ++few_from;
  }
  const std::span<const uint32_t> few =
      few_from < lookup_.steps.size() ? index_->holders(lookup_, few_from) : std::span<const uint32_t>{};
  for (uint32_t r : few) rank(r);
  // Every other replica caches the steps before few_from or fewer, down to none of the prompt,
  // so none costs less than a floor plus its load: they are searched in load order while one
  // still could win. Once even a replica caching nothing could not, only the holders of the
  // first step are left to rank, and where they are not many they are ranked directly.
  const size_t shallow = few_from == 0 ? 0 : lookup_.steps[few_from - 1].end;
  const double floor_none = prefix_cost(prompt, 0, migrates(prompt, kNoReplica, 0));
  const double floor = std::min({floor_none, prefix_cost(prompt, shallow, false),
                                 prefix_cost(prompt, shallow, true)});
  constexpr size_t kRankedDirectly = 64;
  const bool holders_ranked_directly =
      few_from > 0 && index_->holders(lookup_, 0).size() <= kRankedDirectly;
  std::optional<std::pair<double, uint32_t>> stopped;  // the first replica the scan left
  for (const auto& [load, r] : *by_load_) {
    if (cheapest.beats(floor + load, r)) break;
    if (holders_ranked_directly && cheapest.beats(floor_none + load, r)) {
      stopped = {load, r};
      break;
    }
    if (!std::binary_search(few.begin(), few.end(), r)) rank(r);
  }
  if (stopped) {
    // The holders left, in load order, while one could still win.
    std::vector<std::pair<double, uint32_t>>& left = holders_left_;
    left.clear();
    for (uint32_t r : index_->holders(lookup_, 0)) {
      const auto key = std::pair(replicas_[r].load, r);
      if (key >= *stopped && !std::binary_search(few.begin(), few.end(), r)) left.push_back(key);
    }
    std::sort(left.begin(), left.end());
    const double floor_holding =
        std::min(prefix_cost(prompt, shallow, false), prefix_cost(prompt, shallow, true));
    for (const auto& [load, r] : left) {
      if (cheapest.beats(floor_holding + load, r)) break;
      rank(r);
    }
  }
  if (!cheapest.best()) return choose_under_pressure(seq, prompt, priority);
  const Candidate& best = *cheapest.best();
  return AdmitChoice{best.replica,
                     best.migrate_prefix ? std::optional(prompt.best_source) : std::nullopt, {}};
}

Result<Coordinator::AdmitChoice> Coordinator::choose_under_pressure(SeqId seq,
                                                                    const PromptMatch& prompt,
                                                                    uint32_t priority) const {
  std::vector<Candidate> options;
  uint32_t full = 0;
  for (uint32_t r = 0; r < replicas_.size(); ++r) {
    if (is_full(r)) {
      ++full;
    } else if (accepts(r, priority)) {
      options.push_back(evaluate(lookup_, prompt, r, replicas_[r].load));
    }
  }
  if (full == replicas_.size()) {
    return Status(ErrorCode::kResourceExhausted,
                  "admit " + to_string(seq) + ": every replica holds " +
                      sequence_limit_text(config_.coordinator.max_sequences_per_replica));
  }
  if (options.empty()) {
    return Status(ErrorCode::kOutOfMemory, "admit " + to_string(seq) +
                                               ": every replica is bringing back swapped "
                                               "sequences of the same or a higher priority first");
  }
  // The cheapest replica that can make room (ties: the lower replica id). A newcomer displaces
  // only sequences of lower priority: others keep running; the scheduler retries it.
  std::sort(options.begin(), options.end(), [](const Candidate& a, const Candidate& b) {
    return std::tie(a.cost, a.replica) < std::tie(b.cost, b.replica);
  });
  std::optional<Relief> first_refusal;
  for (const Candidate& o : options) {
    AdmitChoice choice{o.replica, o.migrate_prefix ? std::optional(prompt.best_source) : std::nullopt, {}};
    if (has_room(o)) return choice;
    std::vector<BlockId> reused;
    index_->blocks_on(lookup_, o.replica, index_->prefix_on(lookup_, o.replica).blocks, reused);
    Relief relief = plan_relief(o.replica, {o.needed, seq, priority, reused, {}});
    if (relief.enough) {
      choice.victims = std::move(relief.victims);
      return choice;
    }
    if (!first_refusal) first_refusal = std::move(relief);
  }
  const Candidate& cheapest = options.front();
  return no_room("admit " + to_string(seq), cheapest.replica, cheapest.needed, *first_refusal);
}

std::vector<BlockId> Coordinator::migration_blocks(const AdmitChoice& choice,
                                                   const ReplicaPrefix& local) const {
  if (!choice.migration_source) return {};
  const ReplicaPrefix source = index_->prefix_on(lookup_, *choice.migration_source);
  if (source.blocks <= local.blocks) return {};
  std::vector<BlockId> blocks;
  index_->blocks_on(lookup_, *choice.migration_source, source.blocks, blocks);
  // The source's blocks after the target's own prefix fill the target's next blocks.
  blocks.erase(blocks.begin(), blocks.begin() + static_cast<ptrdiff_t>(local.blocks));
  return blocks;
}

Result<Placement> Coordinator::place(SeqId seq, std::vector<TokenId>&& prompt, RadixKey&& key,
                                     uint32_t priority, uint32_t tenant,
                                     const AdmitChoice& choice) {
  const uint32_t r = choice.replica;
  Replica& rep = replicas_[r];
  // Everything is read off the lookup before use() reshapes the tree.
  const ReplicaPrefix local = index_->prefix_on(lookup_, r);
  std::vector<BlockId> shared;
  index_->blocks_on(lookup_, r, local.blocks, shared);
  const std::vector<BlockId> moved = migration_blocks(choice, local);
  const size_t fresh = blocks_for(prompt.size(), config_.cache.block_size) - local.blocks;
  if (fresh + local.idle_blocks > rep.pool.available_block_count()) {
    return Status(ErrorCode::kInternal, "admit " + to_string(seq) + ": replica " + std::to_string(r) +
                                            " had room made but has " +
                                            std::to_string(rep.pool.available_block_count()) +
                                            " blocks for " + std::to_string(fresh) + " new ones");
  }
  index_->use(lookup_, r);
  const Status allocated = rep.pool.allocate_shared(seq, prompt.size(), shared);
  KVF_CHECK(allocated.ok(), "allocation failed after its room check: " + allocated.to_string());
  if (priority != 0) {
    const Status p = rep.pool.set_priority(seq, priority);
    KVF_CHECK(p.ok(), p.message());  // check_priority() admitted it
  }
  const std::vector<BlockId>& table = rep.pool.get_sequence(seq)->block_ids;
  Placement placement;
  placement.replica = r;
  placement.cached_tokens = local.tokens;
  if (!moved.empty()) {
    migrate(*choice.migration_source, moved, r, std::span(table).subspan(local.blocks, moved.size()));
    placement.migrated_tokens = moved.size() * config_.cache.block_size;
    placement.cached_tokens += placement.migrated_tokens;
    stats_.migrated_tokens += placement.migrated_tokens;
  }
  placement.blocks = table;
  collect_copies(r);
  const size_t n = prompt.size();
  const Sequence& s = record_admission(seq, n, n, priority, tenant, placement);
  admitted_now_.emplace_back(seq, s.incarnation, std::move(prompt), std::move(key));
  return placement;
}

Coordinator::Sequence& Coordinator::record_admission(SeqId seq, size_t prompt_tokens, size_t tokens,
                                                     uint32_t priority, uint32_t tenant,
                                                     const Placement& placement) {
  Sequence& s = add_sequence(seq,
               Sequence{.replica = placement.replica,
                        .num_tokens = tokens,
                        .priority = priority,
                        .incarnation = next_incarnation_++,
                        .tenant = tenant,
                        .computed_tokens = std::min(placement.cached_tokens, tokens),
                        .slot = *replicas_[placement.replica].pool.find_slot(seq)},
               placement.blocks.size());
  ++replicas_[placement.replica].running;
  mark_load(placement.replica);
  mark_table(s);
  admitted_now_blocks_ += placement.blocks.size();
  ++stats_.admitted;
  stats_.prompt_tokens += prompt_tokens;
  stats_.local_hit_tokens += placement.cached_tokens - placement.migrated_tokens;
  TenantStats& t = tenants_[tenant].stats;
  ++t.admitted;
  t.prompt_tokens += prompt_tokens;
  t.cached_tokens += placement.cached_tokens;
  t.migrated_tokens += placement.migrated_tokens;
  return s;
}

void Coordinator::mark_load(uint32_t replica) {
  Replica& rep = replicas_[replica];
  if (rep.load_stale) return;
  rep.load_stale = true;
  stale_loads_.push_back(replica);
}

double Coordinator::load_of(uint32_t replica) const {
  const CoordinatorConfig& w = config_.coordinator;
  const Replica& rep = replicas_[replica];
  return w.queue_weight * rep.running + w.memory_weight * rep.pool.utilization();
}

void Coordinator::refresh_loads() {
  for (uint32_t r : index_->idle_changes()) mark_load(r);
  index_->clear_idle_changes();
  for (uint32_t r : stale_loads_) {
    Replica& rep = replicas_[r];
    rep.load_stale = false;
    const double load = load_of(r);
    if (load == rep.load) continue;
    auto node = by_load_->extract({rep.load, r});  // moved, not freed and allocated again
    KVF_CHECK(!node.empty(), "replica " + std::to_string(r) + " is missing from the load order");
    node.value().first = rep.load = load;
    by_load_->insert(std::move(node));
  }
  stale_loads_.clear();
}

Status Coordinator::append(SeqId seq, size_t num_tokens) {
  const Status status = append_blocks(seq, num_tokens);
  if (const Sequence* s = find(seq); !status.ok() && s != nullptr) note_refusal(s->tenant, status);
  return status;
}

Coordinator::BatchResult Coordinator::append(std::span<const SeqId> seqs, size_t num_tokens) {
  constexpr size_t kAhead = 8;  // enough lookups in flight to hide a cache miss each
  BatchResult result;
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (i + kAhead < seqs.size()) seqs_->prefetch(seqs[i + kAhead].value);
    result.status = append(seqs[i], num_tokens);
    if (!result.status.ok()) return result;
    ++result.done;
  }
  return result;
}

Status Coordinator::append_blocks(SeqId seq, size_t num_tokens) {
  Sequence* s = find(seq);
  if (s == nullptr) return sequence_not_found(seq);
  // Messages are built only for a refusal: this runs for every decoded token.
  const auto request = [&] { return "append " + to_string(seq); };
  KVF_RETURN_IF_ERROR(check_pending_room(request));
  if (s->swapped) {
    return invalid_operation(to_string(seq) + " is swapped out; it returns at a step with room");
  }
  PagedKvCache& pool = replicas_[s->replica].pool;
  if (num_tokens > std::numeric_limits<size_t>::max() - s->num_tokens) {
    return invalid_argument("appending " + std::to_string(num_tokens) + " tokens to " +
                            to_string(seq) + " overflows its length");
  }
  if (s->grouped) return append_grouped(seq, *s, num_tokens);
  const size_t bs = config_.cache.block_size;
  const size_t grown = blocks_for(s->num_tokens + num_tokens, bs) - blocks_for(s->num_tokens, bs);
  KVF_RETURN_IF_ERROR(check_quota(request, s->tenant, 0, grown));
  // The free list covers even a copy of a shared tail: no need to look at the table (the usual
  // decode step). Otherwise count exactly, and make room if the pool cannot.
  if (pool.free_block_count() <= grown) {
    const SequenceInfo* info = running_info(seq, *s);
    const bool shared_tail = num_tokens > 0 && info->num_tokens % bs != 0 &&
                             pool.block_ref_count(info->block_ids.back()) > 1;
    const size_t needed = grown + (shared_tail ? 1 : 0);
    if (pool.available_block_count() < needed) {
      const std::optional<BlockId> copied_tail =
          shared_tail ? std::optional(info->block_ids.back()) : std::nullopt;
      const Relief relief = plan_relief(s->replica, {needed, seq, kAnyPriority, {}, copied_tail});
      if (!relief.enough) return no_room(request(), s->replica, needed, relief);
      relieve(s->replica, relief.victims);
    }
  }
  KVF_RETURN_IF_ERROR(pool.append(seq, s->slot, num_tokens));
  mark_load(s->replica);
  if (!pool.pending_copies().empty()) {
    // The shared tail was copied before the write: the ranks get the table from that block on.
    const size_t tail = blocks_for(s->num_tokens, bs) - 1;
    s->published_blocks = std::min(s->published_blocks, static_cast<uint32_t>(tail));
  }
  collect_copies(s->replica);
  const SequenceInfo* grown_info = running_info(seq, *s);
  s->num_tokens = grown_info->num_tokens;
  charge(*s, grown_info->num_blocks());
  mark_table(*s);
  return ok_status();
}

Status Coordinator::fork(SeqId src, SeqId dst, std::optional<uint32_t> replica) {
  const Status status = fork_sequence(src, dst, replica);
  if (const Sequence* s = find(src); !status.ok() && s != nullptr) note_refusal(s->tenant, status);
  return status;
}

Status Coordinator::fork_sequence(SeqId src, SeqId dst, std::optional<uint32_t> replica) {
  KVF_RETURN_IF_ERROR(check_new_sequence(dst, "Destination sequence "));
  Sequence* s = find(src);
  if (s == nullptr) return sequence_not_found(src);
  const auto request = [&] { return "fork " + to_string(src) + " -> " + to_string(dst); };
  if (replica && *replica >= replicas_.size()) {
    return invalid_argument(request() + ": replica " + std::to_string(*replica) +
                            " does not exist (dp " + std::to_string(replicas_.size()) +
                            "); nothing was changed");
  }
  KVF_RETURN_IF_ERROR(check_pending_room(request));
  if (s->swapped) return invalid_operation(to_string(src) + " is swapped out and cannot be forked now");
  KVF_RETURN_IF_ERROR(check_quota(request, s->tenant, 1, s->charged_blocks));
  const uint32_t tenant = s->tenant;
  // The child's K/V is its source's: what is computed of it (shared or migrated) and no more.
  const uint64_t computed = s->computed_tokens;
  const uint32_t from = s->replica;
  const uint32_t to = replica.value_or(from);
  if (is_full(to)) {
    return Status(ErrorCode::kResourceExhausted,
                  "fork " + to_string(src) + " -> " + to_string(dst) + ": replica " +
                      std::to_string(to) + " holds " +
                      sequence_limit_text(config_.coordinator.max_sequences_per_replica));
  }
  PagedKvCache& src_pool = replicas_[from].pool;
  if (to == from && s->grouped) {
    KVF_RETURN_IF_ERROR(fork_grouped(src, *s, dst));
  } else if (to == from) {
    KVF_RETURN_IF_ERROR(src_pool.fork(src, dst));
  } else {
    const SequenceInfo* info = src_pool.get_sequence(src);
    PagedKvCache& dst_pool = replicas_[to].pool;
    const size_t needed = info->num_blocks();
    if (dst_pool.available_block_count() < needed) {
      const Relief relief = plan_relief(to, {needed, dst, info->priority, {}, {}});
      if (!relief.enough) {
        return no_room("fork " + to_string(src) + " -> " + to_string(dst), to, needed, relief);
      }
      relieve(to, relief.victims);
    }
    KVF_RETURN_IF_ERROR(dst_pool.allocate(dst, info->num_tokens));
    (void)dst_pool.set_priority(dst, info->priority);
    migrate(from, info->block_ids, to, dst_pool.get_sequence(dst)->block_ids);
  }
  const SequenceSlot child_slot = *replicas_[to].pool.find_slot(dst);
  const SequenceInfo* child = replicas_[to].pool.get_sequence(dst, child_slot);
  Sequence& child_record = add_sequence(dst,
               Sequence{.replica = to,
                        .num_tokens = child->num_tokens,
                        .priority = child->priority,
                        .incarnation = next_incarnation_++,
                        .tenant = tenant,
                        .computed_tokens = computed,
                        .slot = child_slot,
                        .grouped = s->grouped},
               child->num_blocks());
  ++replicas_[to].running;
  mark_load(to);
  mark_table(child_record);
  if (const auto parent = compressed_.find(src); parent != compressed_.end()) {
    Compressed& child_compression = compressed_[dst] = parent->second;
    child_compression.scores.clear();  // the ranks score the child from now on
    child_compression.has_scores = false;
    child_compression.request.reset();
    if (!child_compression.settled()) compacting_[dst] = &child_compression;
  }
  return ok_status();
}

Status Coordinator::free(SeqId seq) {
  Sequence* s = find(seq);
  if (s == nullptr) return sequence_not_found(seq);
  if (s->swapped) {
    for (BlockId b : s->host_blocks) host_blocks_to_free_.emplace_back(s->replica, b);
    forget_swapped(s->replica, s->priority);
    swap_queue_.erase(s->swap_order);
  } else {
    KVF_RETURN_IF_ERROR(replicas_[s->replica].pool.free(seq));
    --replicas_[s->replica].running;
    mark_load(s->replica);
  }
  erase_sequence(seq);
  plan_.released.push_back(seq);
  return ok_status();
}

Coordinator::Sequence& Coordinator::add_sequence(SeqId seq, Sequence record, uint64_t blocks) {
  const uint32_t slot = seqs_->insert(seq.value);
  Sequence& s = seqs_->at(slot) = std::move(record);
  s.record_slot = slot;
  ++tenants_[s.tenant].stats.sequences;
  charge(s, blocks);
  return s;
}

void Coordinator::erase_sequence(SeqId seq) {
  Sequence& s = *find(seq);
  TenantStats& t = tenants_[s.tenant].stats;
  if (const auto c = compressed_.find(seq); c != compressed_.end()) {
    forget_kept_prompt(c->second);
    compacting_.erase(seq);
    compressed_.erase(c);
  }
  charge(s, 0);
  if (s.swapped) t.host_blocks -= s.host_blocks.size();
  --t.sequences;
  seqs_->erase(s.record_slot);
}

void Coordinator::charge(Sequence& s, uint64_t blocks) {
  TenantStats& t = tenants_[s.tenant].stats;
  t.blocks = t.blocks - s.charged_blocks + blocks;
  s.charged_blocks = blocks;
}

uint32_t Coordinator::tenant_index(std::string_view name) {
  const auto it = tenant_ids_.find(name);
  if (it != tenant_ids_.end()) return it->second;
  const auto id = static_cast<uint32_t>(tenants_.size());
  tenants_.push_back(Tenant{std::string(name), std::nullopt, {}});
  tenant_ids_.emplace(std::string(name), id);
  return id;
}

const TenantQuota& Coordinator::quota_of(const Tenant& tenant) const {
  return tenant.own_quota ? *tenant.own_quota : config_.tenants;
}

const char* Coordinator::quota_source(const Tenant& tenant) {
  return tenant.own_quota ? "its own quota" : "the tenants section";
}

Status Coordinator::check_quota(const std::function<std::string()>& request, uint32_t tenant,
                                uint64_t sequences, uint64_t blocks) const {
  const Tenant& t = tenants_[tenant];
  const TenantQuota& quota = quota_of(t);
  const bool too_many = sequences > 0 && quota.max_sequences != 0 &&
                        t.stats.sequences + sequences > quota.max_sequences;
  const bool too_large =
      blocks > 0 && quota.max_blocks != 0 && t.stats.blocks + blocks > quota.max_blocks;
  if (!too_many && !too_large) return ok_status();
  const std::string source = quota_source(t);
  const std::string who = t.name.empty() ? "the default tenant" : "tenant '" + t.name + "'";
  if (too_many) {
    return Status(ErrorCode::kResourceExhausted,
                  request() + ": " + who + " holds " + std::to_string(t.stats.sequences) +
                      " sequences, at most " + std::to_string(quota.max_sequences) +
                      " (max_sequences, " + source + "); nothing was changed");
  }
  return Status(ErrorCode::kResourceExhausted,
                request() + ": " + who + " holds " + std::to_string(t.stats.blocks) +
                    " blocks and asks for " + std::to_string(blocks) + " more, at most " +
                    std::to_string(quota.max_blocks) + " (max_blocks, " + source +
                    "); nothing was changed");
}

Status Coordinator::check_tenant_priority(const std::function<std::string()>& request,
                                          uint32_t tenant, uint32_t priority) const {
  return check_tenant_priority(request, &tenants_[tenant], priority);
}

Status Coordinator::check_tenant_priority(const std::function<std::string()>& request,
                                          const Tenant* tenant, uint32_t priority) const {
  const uint32_t highest = tenant ? quota_of(*tenant).max_priority : config_.tenants.max_priority;
  if (priority <= highest) return ok_status();
  return invalid_argument(request() + ": priority " + std::to_string(priority) + " is above " +
                          std::to_string(highest) +
                          ", the highest this tenant may give (max_priority, " +
                          (tenant ? quota_source(*tenant) : "the tenants section") + ")");
}

void Coordinator::note_refusal(uint32_t tenant, const Status& status) {
  if (status.code() == ErrorCode::kOutOfMemory || status.code() == ErrorCode::kResourceExhausted) {
    ++tenants_[tenant].stats.refused;
  }
}

std::optional<std::string_view> Coordinator::tenant_of(SeqId seq) const {
  const Sequence* s = find(seq);
  if (s == nullptr) return std::nullopt;
  return tenants_[s->tenant].name;
}

Status Coordinator::set_tenant_quota(const std::string& tenant, const TenantQuota& quota) {
  if (const std::string conflict = quota_conflict(quota); !conflict.empty()) {
    return invalid_argument("set_tenant_quota '" + tenant + "': " + conflict +
                            "; nothing was changed");
  }
  tenants_[tenant_index(tenant)].own_quota = quota;
  return ok_status();
}

TenantQuota Coordinator::tenant_quota(std::string_view tenant) const {
  const auto it = tenant_ids_.find(tenant);
  return it == tenant_ids_.end() ? config_.tenants : quota_of(tenants_[it->second]);
}

TenantStats Coordinator::tenant_stats(std::string_view tenant) const {
  const auto it = tenant_ids_.find(tenant);
  return it == tenant_ids_.end() ? TenantStats{} : tenants_[it->second].stats;
}

std::vector<std::string> Coordinator::tenants() const {
  std::vector<std::string> names;
  for (const auto& [name, id] : tenant_ids_)
    names.push_back(name);
  return names;
}

Status Coordinator::check_priority(SeqId seq, uint32_t priority) const {
  return check_priority_level(priority, to_string(seq));
}

Status Coordinator::check_priority_level(uint32_t priority, const std::string& subject) const {
  const EvictionConfig& eviction = config_.cache.eviction;
  if (eviction.strategy == EvictionPolicy::kPriority && priority >= eviction.priority_levels) {
    return invalid_argument("priority " + std::to_string(priority) + " for " + subject +
                            " is out of range (cache.eviction.priority_levels is " +
                            std::to_string(eviction.priority_levels) + ")");
  }
  return ok_status();
}

Status Coordinator::set_priority(SeqId seq, uint32_t priority) {
  Sequence* s = find(seq);
  if (s == nullptr) return sequence_not_found(seq);
  KVF_RETURN_IF_ERROR(check_priority(seq, priority));
  KVF_RETURN_IF_ERROR(
      check_tenant_priority([&] { return "set_priority " + to_string(seq); }, s->tenant, priority));
  if (s->swapped) {
    forget_swapped(s->replica, s->priority);
    ++replicas_[s->replica].swapped_by_priority[priority];
  } else {
    KVF_RETURN_IF_ERROR(replicas_[s->replica].pool.set_priority(seq, priority));
  }
  s->priority = priority;
  return ok_status();
}

void Coordinator::index_planned_prompts() {
  count_pending_misses();  // before remember_blocks() changes what they read
  // This step's plan is issued next and its forward pass computes these prompts, so a request of
  // the next step may share them; none of this step's requests could (they are all placed).
  for (const AdmittedPrompt& admitted : admitted_now_) {
    const Sequence* s = find(admitted.seq);
    // Gone, swapped out (its slots stay uncomputed), or a new sequence under the same id: its
    // blocks will not hold this prompt.
    if (s == nullptr || s->swapped || s->incarnation != admitted.incarnation) continue;
    const SequenceInfo* info = running_info(admitted.seq, *s);
    if (info == nullptr || info->num_tokens < admitted.tokens.size()) continue;  // compacted
    const Result<size_t> added = index_blocks(s->replica, admitted.key, info->block_ids);
    if (!added.ok()) {
      KVF_LOG_WARN(kCoordinator, "not indexing {}: {}", to_string(admitted.seq),
                   added.status().message());
      continue;
    }
    remember_blocks(admitted.key, *added);
  }
  name_compressed_prompts();
  admitted_now_.clear();
  misses_counted_ = 0;
  admitted_now_blocks_ = 0;
}

Result<size_t> Coordinator::index_blocks(uint32_t replica, const RadixKey& key,
                                         std::span<const BlockId> blocks) {
  KVF_ASSIGN_OR_RETURN(const std::vector<BlockId> added, index_->insert(replica, key, blocks));
  PagedKvCache& pool = replicas_[replica].pool;
  for (BlockId block : added) {
    const Status retained = pool.retain_block(block);
    KVF_CHECK(retained.ok(), "retaining a newly indexed block failed: " + retained.to_string());
  }
  // Blocks hung under an idle cached prefix make it used: the replica's load moves.
  mark_load(replica);
  return added.size();
}

void Coordinator::refill_free_blocks() {
  const uint32_t watermark = config_.coordinator.free_watermark_blocks;
  if (watermark == 0) return;
  for (Replica& rep : replicas_) {
    const size_t free = rep.pool.free_block_count();
    if (free < watermark) (void)rep.pool.free_cached_blocks(watermark - free);
  }
}

void Coordinator::swap_back_in() {
  // Oldest first; a sequence that does not fit waits (and so do the ones behind it, in order).
  for (auto it = swap_queue_.begin(); it != swap_queue_.end();) {
    const SeqId seq = it->second;
    Sequence& s = *find(seq);
    // A replica that had to make room in this step is still under pressure: no ping-pong.
    if (replicas_[s.replica].relieved_this_step) {
      ++it;
      continue;
    }
    PagedKvCache& pool = replicas_[s.replica].pool;
    if (pool.available_block_count() < s.host_blocks.size() || !pool.allocate(seq, s.num_tokens).ok()) {
      break;
    }
    (void)pool.set_priority(seq, s.priority);
    s.slot = *pool.find_slot(seq);
    s.published_blocks = 0;  // new blocks
    const std::vector<BlockId>& table = running_info(seq, s)->block_ids;
    for (size_t i = 0; i < table.size(); ++i) {
      plan_.ops.push_back(StepPlan::Op::swap_in(s.replica, s.host_blocks[i], table[i]));
      // Freed after this step, so no later op of the step can reuse the block before it is read.
      host_blocks_to_free_.emplace_back(s.replica, s.host_blocks[i]);
    }
    tenants_[s.tenant].stats.host_blocks -= s.host_blocks.size();
    s.host_blocks.clear();
    s.swapped = false;
    forget_swapped(s.replica, s.priority);
    ++replicas_[s.replica].running;
    mark_load(s.replica);
    mark_table(s);
    ++stats_.swapped_in;
    it = swap_queue_.erase(it);
  }
}

Result<StepPlan> Coordinator::step() {
  index_planned_prompts();
  compact_due_sequences();  // after indexing: a cached prompt block is copied, never written
  swap_back_in();
  // Tables in the order their sequences first changed in this step (deterministic, as every
  // call is); a sequence marked twice is published once.
  plan_.tables.reserve(plan_.tables.size() + dirty_.size());
  for (const auto& [slot, incarnation] : dirty_) {
    if (!seqs_->alive(slot)) continue;
    Sequence& s = seqs_->at(slot);
    if (s.incarnation != incarnation || s.swapped || !s.in_plan) continue;
    s.in_plan = false;
    const SeqId seq{seqs_->id_at(slot)};
    if (s.grouped) {
      publish_group_tables(seq, s);
      continue;
    }
    // The record knows the table's length (its charged blocks); the pool's table is read only
    // for blocks the ranks do not hold yet.
    const auto length = static_cast<uint32_t>(s.charged_blocks);
    const uint32_t first = std::min(s.published_blocks, length);
    StepPlan::Table& table = plan_.tables.emplace_back(
        StepPlan::Table{seq, s.replica, s.num_tokens, s.computed_tokens, first, {}});
    if (first < length) {
      const std::vector<BlockId>& blocks = running_info(seq, s)->block_ids;
      table.blocks.assign(blocks.begin() + first, blocks.end());
    }
    s.published_blocks = length;
    // The forward pass after this plan computes the rest. A sequence that still has slots to
    // compute is always in the plan: admit, append, fork, park and swap-in mark its table.
    s.computed_tokens = s.num_tokens;
  }
  dirty_.clear();
  request_scores();
  for (Replica& rep : replicas_) rep.relieved_this_step = false;
  refill_free_blocks();
  for (const auto& [replica, block] : host_blocks_to_free_) {
    const auto freed = replicas_[replica].host.release(block);
    KVF_CHECK(freed.ok(), freed.status().message());
  }
  host_blocks_to_free_.clear();
  StepPlan plan = std::move(plan_);
  plan_ = StepPlan{};
  plan.step = stats_.steps++;
  plan_.step = stats_.steps;
  publish_kv_events(plan.step);
  return plan;
}

Result<uint64_t> Coordinator::reset_prefix_cache(std::optional<uint32_t> replica) {
  if (replica && *replica >= replicas_.size()) {
    return invalid_argument("reset_prefix_cache: replica " + std::to_string(*replica) +
                            " does not exist (dp " + std::to_string(replicas_.size()) + ")");
  }
  const uint32_t first = replica.value_or(0);
  const uint32_t last = replica ? *replica + 1 : num_replicas();
  uint64_t freed = 0;
  std::vector<uint32_t> emptied;  // replicas that cached something and now cache nothing
  for (uint32_t r = first; r < last; ++r) {
    const size_t cached = index_->cached_blocks(r);
    freed += replicas_[r].pool.free_cached_blocks(index_->idle_blocks(r));
    if (cached > 0 && index_->cached_blocks(r) == 0) emptied.push_back(r);
    mark_load(r);
  }
  if (kv_event_sink_) {
    // An emptied replica's removals say less than "it caches nothing": one event instead.
    KvEventBatch batch{plan_.step, index_->take_events()};
    std::erase_if(batch.events, [&](const KvEvent& e) {
      return e.type == KvEventType::kBlockRemoved &&
             std::find(emptied.begin(), emptied.end(), e.replica) != emptied.end();
    });
    for (uint32_t r : emptied) {
      KvEvent cleared;
      cleared.type = KvEventType::kAllBlocksCleared;
      cleared.replica = r;
      batch.events.push_back(std::move(cleared));
    }
    if (!batch.events.empty()) kv_event_sink_(batch);
  }
  return freed;
}

void Coordinator::set_kv_event_sink(std::function<void(const KvEventBatch&)> sink) {
  kv_event_sink_ = std::move(sink);
  index_->record_events(kv_event_sink_ != nullptr);
}

KvEventBatch Coordinator::kv_event_snapshot() const {
  return KvEventBatch{plan_.step, index_->holdings_as_events()};
}

void Coordinator::flush_kv_events() { publish_kv_events(plan_.step); }

void Coordinator::publish_kv_events(uint64_t step) {
  if (!kv_event_sink_) return;
  KvEventBatch batch{step, index_->take_events()};
  if (!batch.events.empty()) kv_event_sink_(batch);
}

Status Coordinator::verify_replica(uint32_t r) const {
  const PagedKvCache& pool = replicas_[r].pool;
  KVF_RETURN_IF_ERROR(pool.verify_integrity());
  const std::string name = "replica " + std::to_string(r);
  size_t retained = 0, used = 0;
  for (uint32_t b = 0; b < pool.total_blocks(); ++b) {
    const BlockId block{b};
    if (pool.is_retained(block) != index_->is_indexed(r, block)) {
      return Status(ErrorCode::kInternal, name + ": " + to_string(block) + " is " +
                                              (pool.is_retained(block) ? "" : "not ") +
                                              "retained but " +
                                              (index_->is_indexed(r, block) ? "" : "not ") +
                                              "indexed");
    }
    retained += pool.is_retained(block) ? 1 : 0;
    used += pool.is_retained(block) && pool.block_ref_count(block) > 1 ? 1 : 0;
  }
  if (retained != index_->cached_blocks(r) || used != index_->used_blocks(r)) {
    return Status(ErrorCode::kInternal,
                  name + ": the pool retains " + std::to_string(retained) + " blocks (" +
                      std::to_string(used) + " in use), the index holds " +
                      std::to_string(index_->cached_blocks(r)) + " (" +
                      std::to_string(index_->used_blocks(r)) + ")");
  }
  const Replica& rep = replicas_[r];
  const bool stale = rep.load_stale || index_->idle_changed(r);
  if (by_load_->count({rep.load, r}) == 0 || (!stale && rep.load != load_of(r))) {
    return Status(ErrorCode::kInternal, name + " is out of place in the load order");
  }
  return ok_status();
}

Status Coordinator::verify_sequence(SeqId seq, const Sequence& s, std::vector<uint32_t>& running,
                                    std::vector<TenantStats>& held) const {
  const SequenceInfo* info = replicas_[s.replica].pool.get_sequence(seq);
  if (s.swapped != (info == nullptr)) {
    return Status(ErrorCode::kInternal, to_string(seq) + " is " + (s.swapped ? "swapped" : "running") +
                                            " but replica " + std::to_string(s.replica) +
                                            (info ? " holds it" : " does not hold it"));
  }
  if (!s.swapped && running_info(seq, s) != info) {
    return Status(ErrorCode::kInternal, to_string(seq) + " has a stale slot on replica " +
                                            std::to_string(s.replica));
  }
  if (!s.swapped && s.num_tokens != info->num_tokens) {
    return Status(ErrorCode::kInternal, to_string(seq) + " counts " + std::to_string(s.num_tokens) +
                                            " tokens, its table " + std::to_string(info->num_tokens));
  }
  if (!s.swapped) ++running[s.replica];
  const uint64_t table = s.swapped ? s.host_blocks.size() : info->num_blocks();
  if (s.charged_blocks != table) {
    return Status(ErrorCode::kInternal, to_string(seq) + " is charged " +
                                            std::to_string(s.charged_blocks) + " blocks, holds " +
                                            std::to_string(table));
  }
  TenantStats& t = held[s.tenant];
  ++t.sequences;
  t.blocks += table;
  if (s.swapped) t.host_blocks += table;
  return ok_status();
}

Status Coordinator::verify_integrity() const {
  std::vector<uint32_t> running(replicas_.size(), 0);
  std::vector<TenantStats> held(tenants_.size());
  KVF_RETURN_IF_ERROR(index_->verify());
  for (uint32_t r = 0; r < replicas_.size(); ++r) {
    KVF_RETURN_IF_ERROR(verify_replica(r));
  }
  Status status;
  seqs_->for_each([&](uint32_t slot, const Sequence& s) {
    if (!status.ok()) return;
    status = verify_sequence(SeqId{seqs_->id_at(slot)}, s, running, held);
  });
  KVF_RETURN_IF_ERROR(status);
  KVF_RETURN_IF_ERROR(verify_compression());
  for (size_t i = 0; i < tenants_.size(); ++i) {
    const TenantStats& want = held[i];
    const TenantStats& have = tenants_[i].stats;
    if (want.sequences != have.sequences || want.blocks != have.blocks ||
        want.host_blocks != have.host_blocks) {
      return Status(ErrorCode::kInternal,
                    "tenant '" + tenants_[i].name + "' counts " + std::to_string(have.sequences) +
                        " sequences, " + std::to_string(have.blocks) + " blocks (" +
                        std::to_string(have.host_blocks) + " on the host); its sequences hold " +
                        std::to_string(want.sequences) + ", " + std::to_string(want.blocks) + " (" +
                        std::to_string(want.host_blocks) + ")");
    }
  }
  for (uint32_t r = 0; r < replicas_.size(); ++r) {
    if (running[r] != replicas_[r].running ||
        running[r] != replicas_[r].pool.num_sequences()) {
      return Status(ErrorCode::kInternal, "replica " + std::to_string(r) + " counts " +
                                              std::to_string(replicas_[r].running) + " running sequences, its pool " +
                                              std::to_string(replicas_[r].pool.num_sequences()) +
                                              ", the records " + std::to_string(running[r]));
    }
  }
  return ok_status();
}

}  // namespace kvfabric
