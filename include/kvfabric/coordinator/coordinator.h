// The coordinator (rank 0): places sequences on replicas, owns their block tables and the prefix
// caches of every replica, and turns scheduler requests into one StepPlan per step.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "kvfabric/block/block_allocator.h"
#include "kvfabric/block/paged_kv_cache.h"
#include "kvfabric/config/config.h"
#include "kvfabric/plan/step_plan.h"
#include "kvfabric/prefix/global_prefix_index.h"
#include "kvfabric/quant/compression_policy.h"

namespace kvfabric {
namespace detail {
class SeenBlocks;
}  // namespace detail

//! Where admit() put a sequence.
struct Placement {
  uint32_t replica = 0;
  //! Prompt tokens whose K/V is already in place after this step's plan (cached on the replica
  //! or migrated to it); the engine prefills the rest.
  size_t cached_tokens = 0;
  size_t migrated_tokens = 0;  //!< of cached_tokens, moved from another replica's cache
  //! Non-zero when the prompt was served compressed (snapkv, see AdmitOptions::compression): the
  //! tokens the sequence starts with, the K/V an identical request's compaction kept, all
  //! computed (cached_tokens is then the whole prompt: nothing to prefill, no scores to report).
  //! Decoded tokens follow at the prompt's positions as usual.
  size_t compressed_tokens = 0;
  std::vector<BlockId> blocks;
};

//! How admit() is asked to place a prompt, beyond its tokens.
struct AdmitOptions {
  uint32_t priority = 0;
  //! Who the sequence belongs to: its quota, its statistics, and (by default) its cache salt.
  //! "" is the default tenant, whose default salt is no salt: everyone's requests share.
  std::string tenant;
  //! The namespace of its cached prefix: blocks computed under one salt serve only prompts of the
  //! same salt (see CacheSalt). A salt is the tenant's own: the same salt given by two tenants
  //! is two namespaces (a tenant uses salts to keep its own users apart). Default: the tenant.
  std::optional<std::string> cache_salt;
  //! Leading prompt tokens shared across salts (a system prompt every tenant sends), in whole
  //! blocks (rounded down).
  size_t public_tokens = 0;
  //! Token compression (StreamingLLM, H2O, SnapKV) planned by the coordinator; none by default.
  //! The prompt is cached whole before any compaction, and a request without compression is
  //! only ever served blocks holding the K/V its prompt says. A SnapKV compaction's kept prompt
  //! (a function of the prompt alone) is also indexed under a key naming the whole prompt, the
  //! namespace (tenant, salt), the budget and the window: a later request identical in all of
  //! them starts from it (Placement::compressed_tokens). The coordinator keeps a SnapKV budget
  //! in whole blocks (rounded up: the blocks are allocated whole anyway), which is what lets the
  //! kept prompt be indexed.
  std::optional<quant::CompressionPolicy> compression;
};

//! A tenant's counters and what it holds now.
struct TenantStats {
  uint64_t admitted = 0;
  uint64_t prompt_tokens = 0;
  uint64_t cached_tokens = 0;    //!< prompt tokens found cached (on the replica or migrated)
  uint64_t migrated_tokens = 0;  //!< of those, moved from another replica's cache
  uint64_t refused = 0;          //!< admit, append and fork requests refused for room or quota
  uint64_t preempted = 0;
  uint64_t sequences = 0;    //!< live now (running or swapped out)
  uint64_t blocks = 0;       //!< in their tables (TenantQuota::max_blocks counts these)
  uint64_t host_blocks = 0;  //!< of those, swapped out to the host tier
};

//! Prompt tokens no cache served, by why. With local_hit_tokens and migrated_tokens they add up
//! to prompt_tokens.
struct MissedTokens {
  //! The prompt's last, partial block: only full blocks are cached.
  uint64_t partial_block = 0;
  //! Cached on another replica but not moved here (migration would cost more, or is off).
  uint64_t other_replica = 0;
  //! Cached before and evicted since (no replica holds them now).
  uint64_t evicted = 0;
  //! Cached under another cache salt (another tenant's, or unsalted), never under this one.
  uint64_t other_salt = 0;
  //! Never cached.
  uint64_t never_seen = 0;
};

struct CoordinatorStats {
  uint64_t admitted = 0;
  uint64_t prompt_tokens = 0;
  uint64_t local_hit_tokens = 0;     //!< prompt tokens found in the chosen replica's cache
  uint64_t migrated_tokens = 0;      //!< prompt tokens moved from another replica's cache
  uint64_t migrated_blocks = 0;      //!< every migration: prefixes, cross-replica forks, parking
  uint64_t swapped_out = 0;          //!< sequences moved to the host tier
  uint64_t swapped_in = 0;
  uint64_t parked = 0;               //!< sequences moved to a peer replica under pressure
  uint64_t preempted = 0;            //!< sequences dropped for recomputation
  uint64_t steps = 0;
  uint64_t compactions = 0;       //!< token compactions planned
  uint64_t compacted_tokens = 0;  //!< tokens those compactions dropped
  uint64_t compacted_blocks = 0;  //!< blocks they gave back to their replica's pool
  uint64_t compressed_indexed = 0;  //!< compacted prompts indexed for identical requests
  //! Admissions served an indexed compacted prompt (Placement::compressed_tokens); their prompt
  //! tokens count as local hits.
  uint64_t compressed_hits = 0;
  //! Why prompt tokens missed. "Evicted" and "other salt" come from a bounded filter of the
  //! blocks cached lately (keyed by content and position; about the last one to two pool-fulls
  //! of the whole job): a block evicted before that counts as never seen, and about 1 in 10
  //! never-seen blocks may count as evicted, never the other way.
  MissedTokens missed;
};

//! What one replica's pools hold now (Coordinator::replica_stats).
struct ReplicaStats {
  uint64_t device_blocks = 0;
  uint64_t used_blocks = 0;     //!< held by sequences
  uint64_t cached_blocks = 0;   //!< indexed prefixes no sequence holds (given back on demand)
  uint64_t free_blocks = 0;
  uint64_t indexed_blocks = 0;  //!< in the prefix index, used or cached
  uint64_t sequences = 0;       //!< running on the device pool
  uint64_t swapped = 0;         //!< waiting on the host tier
  uint64_t host_blocks = 0;
  uint64_t host_free_blocks = 0;
};

//! How admit() weighs one replica for a prompt (Coordinator::admission_costs): a scheduler or
//! operator reads why a request went where it did, or what it would cost elsewhere.
struct AdmissionCost {
  uint32_t replica = 0;
  //! Takes a newcomer of the asked priority: fewer than max_sequences_per_replica sequences, and
  //! no swapped sequence of the same or a higher priority waiting to come back.
  bool accepts = false;
  size_t cached_tokens = 0;  //!< leading prompt tokens this replica caches (whole blocks)
  //! The replica a longer cached prefix would be moved from, when moving it is cheaper than
  //! computing it (migration_token_cost < prefill_token_cost).
  std::optional<uint32_t> migration_source;
  size_t migrated_tokens = 0;  //!< tokens that move
  double load = 0;  //!< queue_weight × running sequences + memory_weight × utilization
  //! prefill_token_cost × tokens to compute (+ migration_token_cost × tokens moved) + load.
  double cost = 0;
  //! Blocks the admission takes: fresh ones, plus the idle cached ones of its prefix it puts to use.
  size_t blocks_needed = 0;
  size_t blocks_available = 0;  //!< free or cached blocks (what it may take without displacing)
  [[nodiscard]] bool has_room() const { return blocks_needed <= blocks_available; }
};

//! Where admit() places a prompt whose admission_costs() are `costs` when a replica accepts it
//! and has room: the cheapest such replica (ties: the lower id); nullopt when none has room.
[[nodiscard]] std::optional<uint32_t> cheapest_with_room(std::span<const AdmissionCost> costs);

//! \brief The scheduler-facing API of a dp x tp job (DESIGN.md §5). One block pool per replica
//! (block ids are the same on every shard of the replica), one host-tier block allocator per
//! replica, and one global prefix index over all pools (GlobalPrefixIndex): admit() compares the
//! prompt against it once and reads off which replicas hold which part of it.
//!
//! Placement: the replica with the lowest cost, prefill_token_cost per uncached prompt token
//! (plus migration_token_cost per token moved) plus its load, queue_weight per running sequence
//! plus memory_weight times its utilization (CoordinatorConfig); ties go to the lower replica id.
//! When a longer prefix is cached on another replica and migration_token_cost <
//! prefill_token_cost, its blocks are migrated (shard s to shard s) and the new copy is indexed on
//! the target once computed. Replicas that hold none of the prompt differ only by load, so they
//! are searched in load order, as far as one could still win: an admission costs about the same
//! for any number of replicas.
//!
//! Memory pressure on a replica, in order: idle cached prefixes are evicted (step() keeps
//! coordinator.free_watermark_blocks free on each replica this way, and an allocation that finds
//! fewer free does it itself); then the victim (lowest priority, then least recently used, then lowest
//! SeqId) is swapped to the replica's host tier; with the host tier full it moves to the peer
//! replica with the most room (it continues there); failing both it is preempted (the engine
//! recomputes it). Swapped sequences come back,
//! oldest first, when step() finds room on a replica that did not have to make room in the same
//! step. A growing sequence (append) may displace any other; a newcomer (admit, a fork onto
//! another replica) only sequences of lower priority, so new requests never churn running ones
//! and the scheduler retries them later; and admit() skips a replica whose swapped sequences of
//! the same or a higher priority are waiting to come back. Feasibility is decided before any
//! relief: a request that displacing every sequence it may displace would not make room for is
//! refused, and a refused request changes nothing (no swap, park, preemption or eviction).
//!
//! Tenants: every sequence belongs to one (AdmitOptions; a fork to its source's). A tenant's
//! quota (TenantQuota) is checked before anything else, and a victim whose tenant is at its
//! host-block quota is parked or preempted instead of swapped. Victims are chosen fairly: the
//! next one comes from the tenant that then holds the most blocks on the replica (ties: the
//! tenant named first in byte order), and within a tenant by the order above (priority, least
//! recently used, SeqId). Prompts are indexed under their cache salt (SaltScope), so sharing,
//! placement and migration never cross salts except for public ranges.
//!
//! The plan's tables are authoritative: a placement returned by admit() can change later in the
//! same step when another request moves the sequence. The engine's contract: in each step's
//! forward pass it computes the slots of every sequence in the tables that it has not computed
//! yet (a new prompt past its cached tokens, appended slots). A sequence the plan releases
//! (swapped out) keeps its uncomputed slots, which the engine computes when it comes back.
//!
//! A step: admit/append/fork/free/set_priority calls, then step() returns the plan every rank
//! executes before the forward pass. A prompt is indexed when step() issues the plan whose forward
//! pass computes it: a request of the next step shares its blocks, and no request sees them
//! before their K/V is computed. Every decision is deterministic. Not thread-safe.
class Coordinator {
 public:
  static Result<Coordinator> create(const Config& config);

  Coordinator(Coordinator&&) noexcept;
  Coordinator& operator=(Coordinator&&) noexcept;
  ~Coordinator();

  //! Places `seq` holding `prompt`. Errors: a known sequence, an empty prompt, a SeqId >= 2^63,
  //! or OutOfMemory when no replica can make room.
  Result<Placement> admit(SeqId seq, std::span<const TokenId> prompt, uint32_t priority = 0);
  //! The same, taking over the prompt (kept until the next step() indexes it) instead of copying.
  Result<Placement> admit(SeqId seq, std::vector<TokenId>&& prompt, uint32_t priority = 0);
  //! admit() for a tenant, with a cache salt and a public range. Errors as above, and
  //! ResourceExhausted when the tenant's quota would be exceeded.
  Result<Placement> admit(SeqId seq, std::vector<TokenId>&& prompt, const AdmitOptions& options);
  Result<Placement> admit(SeqId seq, std::span<const TokenId> prompt, const AdmitOptions& options);
  //! Adds tokens to a running sequence (the slots the next forward pass writes), making room on
  //! its replica as described above.
  Status append(SeqId seq, size_t num_tokens);
  //! append() for a batch of sequences (one decode step of many): each of `seqs` gets
  //! `num_tokens` slots, in order. A refusal stops the batch: the sequences before it grew, the
  //! refused one and those after did not. Ids are looked up ahead of their turn, which makes a
  //! batch cheaper than as many append() calls.
  struct BatchResult {
    size_t done = 0;  //!< sequences appended (all of them when status is OK)
    Status status;    //!< the refusal that stopped the batch
  };
  BatchResult append(std::span<const SeqId> seqs, size_t num_tokens);
  //! Creates `dst` sharing `src`'s blocks on src's replica, or on `replica` (its blocks are then
  //! migrated there).
  Status fork(SeqId src, SeqId dst, std::optional<uint32_t> replica = std::nullopt);
  //! Drops a running or swapped sequence.
  Status free(SeqId seq);
  Status set_priority(SeqId seq, uint32_t priority);
  //! Token compression: the attention scores of `seq` that plan `plan_step`'s score request
  //! asked for, one per slot (cache position) as that plan laid the sequence out, summed over its
  //! replica's shards (RankCache::reported_scores() gathers them after running that plan). Its
  //! next h2o or snapkv compaction reads them; they replace earlier ones and are used once; an
  //! empty report changes nothing. An unanswered request is repeated each step, and a report
  //! for any of those plans is taken (a scheduler may report one step late); a report for a plan
  //! before a compaction, swap or park of the sequence, or for an earlier sequence under the same
  //! id, is numbered by other slots and refused. InvalidArgument (nothing changes): an unknown
  //! sequence, one without a policy that reads scores, `plan_step` not an outstanding request,
  //! more scores than it had tokens, a score negative or not finite.
  Status report_attention(SeqId seq, uint64_t plan_step, std::span<const double> scores);

  //! Closes the step: indexes the prompts this plan's forward pass computes, compacts the
  //! compressed sequences that are due, swaps sequences back in where there is room, collects
  //! copy-on-write copies, requests the scores the next compactions need, and returns the plan
  //! with its number.
  Result<StepPlan> step();

  //! Drops every cached prefix no sequence uses on `replica` (every replica when none), as a
  //! benchmark does between runs; what sequences use stays. Returns the blocks freed.
  //! InvalidArgument for an unknown replica (nothing changes). Emits KV events at once.
  Result<uint64_t> reset_prefix_cache(std::optional<uint32_t> replica = std::nullopt);

  //! Receives the KV events (what each replica's cache stores and drops) of each step() and
  //! reset_prefix_cache(), on the calling thread, before the call returns; step()'s batch carries
  //! the plan's number. Blocks are stored when the plan that computes them is issued; blocks
  //! evicted for an admission are reported with the next step(). Setting a sink starts recording
  //! (every cached block is hashed once), and nullptr stops it (KV events cost nothing then).
  void set_kv_event_sink(std::function<void(const KvEventBatch&)> sink);
  //! What every replica caches now as BlockStored events, for a subscriber that starts now; the
  //! events of later batches follow on from it once flush_kv_events() has delivered the changes
  //! still pending to the sink. Empty without a sink.
  [[nodiscard]] KvEventBatch kv_event_snapshot() const;
  //! Delivers the changes recorded since the last batch (evictions for admissions) to the sink
  //! now, as a batch of the coming plan's number, instead of with the next step().
  void flush_kv_events();

  [[nodiscard]] const Config& config() const { return config_; }
  [[nodiscard]] uint32_t num_replicas() const;
  [[nodiscard]] std::optional<uint32_t> replica_of(SeqId seq) const;
  [[nodiscard]] bool is_swapped(SeqId seq) const;
  //! Counters since creation. The miss causes of this step's admissions are counted here or at
  //! step(), whichever comes first, not in admit(): the figures are the same.
  [[nodiscard]] const CoordinatorStats& stats() const;
  //! The tenant a live sequence belongs to (nullopt when unknown).
  [[nodiscard]] std::optional<std::string_view> tenant_of(SeqId seq) const;
  //! Gives `tenant` its own quota instead of the config's `tenants` defaults. It bounds what the
  //! tenant asks for next; what it holds already stays. InvalidArgument (nothing changes) for a
  //! quota that contradicts itself (quota_conflict), as the config and a tenants file refuse it.
  Status set_tenant_quota(const std::string& tenant, const TenantQuota& quota);
  [[nodiscard]] TenantQuota tenant_quota(std::string_view tenant) const;
  //! A tenant's statistics (zeros for a tenant that never asked for anything).
  [[nodiscard]] TenantStats tenant_stats(std::string_view tenant) const;
  //! Every tenant that has a quota or has asked for something, in byte order.
  [[nodiscard]] std::vector<std::string> tenants() const;
  //! What `replica`'s pools hold now.
  [[nodiscard]] ReplicaStats replica_stats(uint32_t replica) const;
  //! How admit() would weigh each replica for `prompt` with `options` now, in replica order.
  //! admit() takes the cheapest replica that accepts the request and has room (ties: the lower
  //! id); when none has room, the cheapest that accepts it and can make room by displacing
  //! sequences of a lower priority. Beyond these, admit() checks the tenant's quota, and a
  //! compressed request identical to a SnapKV prompt compacted before may be served that kept
  //! prompt instead. Changes nothing. InvalidArgument, as admit() would refuse them, for an empty
  //! prompt, a priority outside cache.eviction.priority_levels (priority eviction) or above the
  //! tenant's max_priority.
  [[nodiscard]] Result<std::vector<AdmissionCost>> admission_costs(
      std::span<const TokenId> prompt, const AdmitOptions& options = {}) const;
  //! Leading tokens of `prompt` cached on `replica` under the salt `options` give (whole blocks).
  [[nodiscard]] size_t cached_tokens(uint32_t replica, std::span<const TokenId> prompt,
                                     const AdmitOptions& options = {}) const;
  [[nodiscard]] const GlobalPrefixIndex& prefix_index() const { return *index_; }
  //! Host memory of the coordinator's bookkeeping: the prefix index, every replica's pool
  //! bookkeeping and host allocator, and the sequence records. O(nodes + sequences).
  [[nodiscard]] size_t host_memory_bytes() const;
  [[nodiscard]] size_t host_free_blocks(uint32_t replica) const;
  [[nodiscard]] uint64_t block_bytes() const { return block_bytes_; }
  //! The tokens a live sequence holds (running or swapped; compaction shrinks them; of one
  //! compacted per layer group, the mean over its groups, rounded up: what a layer attends to
  //! and stores on average); 0 when unknown.
  [[nodiscard]] size_t tokens_of(SeqId seq) const;
  //! The block table of a running sequence (empty when unknown or swapped); of one compacted
  //! per layer group, every group's blocks as the coordinator lays them out (the plans carry
  //! each group's table).
  [[nodiscard]] std::vector<BlockId> blocks_of(SeqId seq) const;
  //! Every replica's pool and index checks, and that the sequences' records agree with them.
  [[nodiscard]] Status verify_integrity() const;

 private:
  //! Relief for a running sequence that grows may displace sequences of every priority.
  static constexpr uint32_t kAnyPriority = UINT32_MAX;
  struct Replica;
  struct Sequence {
    uint32_t replica = 0;
    bool swapped = false;
    size_t num_tokens = 0;
    uint32_t priority = 0;
    uint64_t swap_order = 0;
    std::vector<BlockId> host_blocks = {};
    //! Which admission or fork made this record: a SeqId the scheduler frees and uses again
    //! names a new sequence, and the old one's prompt must never be indexed onto its blocks.
    uint64_t incarnation = 0;
    uint32_t tenant = 0;          //!< index into tenants_
    uint64_t charged_blocks = 0;  //!< its table's blocks, as counted in its tenant's stats
    //! Tokens whose K/V is in place before the next forward pass (StepPlan::Table); the rest
    //! are computed by it, unless the sequence is swapped out first.
    uint64_t computed_tokens = 0;
    SequenceSlot slot;         //!< its record in its replica's pool, while running
    //! Leading blocks of its table the ranks hold already (from earlier plans): a plan sends the
    //! rest (StepPlan::Table::first_block).
    uint32_t published_blocks = 0;
    bool in_plan = false;      //!< its table is listed for the next plan
    uint32_t record_slot = 0;  //!< where this record sits among the coordinator's
    //! Compacted per layer group (pyramid): its pool table holds every group's blocks, laid
    //! out as Compressed::Groups says, and num_tokens counts that table's slots.
    bool grouped = false;
  };
  struct SequenceMap;
  struct Tenant {
    std::string name;
    std::optional<TenantQuota> own_quota;
    TenantStats stats;
  };
  //! A prompt admitted in this step, indexed when step() issues the plan that computes it. Its
  //! key borrows `tokens` (whose buffer moves with it) and keeps the unit keys the lookup hashed.
  struct AdmittedPrompt {
    //! `k` is a key over `t`'s buffer, which moving `t` keeps.
    AdmittedPrompt(SeqId s, uint64_t i, std::vector<TokenId>&& t, RadixKey&& k)
        : seq(s), incarnation(i), tokens(std::move(t)), key(std::move(k)) {}
    AdmittedPrompt(AdmittedPrompt&&) noexcept = default;
    AdmittedPrompt& operator=(AdmittedPrompt&&) noexcept = default;
    AdmittedPrompt(const AdmittedPrompt&) = delete;
    AdmittedPrompt& operator=(const AdmittedPrompt&) = delete;

    SeqId seq;
    uint64_t incarnation = 0;
    std::vector<TokenId> tokens;
    RadixKey key;
    // For counting its misses (count_misses) after placement: the deepest prefix any replica
    // cached, and what the admission served.
    size_t best_tokens = 0;
    size_t served_tokens = 0;
  };

  //! What making room on a replica would take (plan_relief()).
  struct Relief {
    std::vector<SeqId> victims;  //!< in the order they are displaced
    bool enough = false;         //!< whether displacing them makes the room asked for
    size_t reachable = 0;        //!< blocks available once every allowed victim is displaced
  };
  //! Who may be displaced to make room for a request.
  struct ReliefRequest {
    size_t needed = 0;                 //!< blocks the request takes
    SeqId exclude;                     //!< the sequence making the request
    uint32_t below_priority = 0;       //!< only victims of a lower priority
    std::span<const BlockId> reused;   //!< cached blocks the request shares (not room it gains)
    std::optional<BlockId> copied_tail;  //!< a shared tail the request copies unless freed
  };

  //! Where admit() places a prompt, and whom it displaces there first.
  struct AdmitChoice {
    uint32_t replica = 0;
    std::optional<uint32_t> migration_source;  //!< the replica whose longer prefix is moved
    std::vector<SeqId> victims;
  };
  //! The looked-up prompt as placement sees it: its length and the deepest cached prefix.
  struct PromptMatch {
    size_t tokens = 0;
    size_t blocks = 0;       //!< blocks the whole prompt takes
    size_t best_tokens = 0;  //!< the longest prefix any replica caches
    uint32_t best_source = 0;  //!< the lowest replica caching it
  };
  //! What placing the looked-up prompt on one replica would cost and take.
  struct Candidate {
    uint32_t replica = 0;
    double cost = 0;
    bool migrate_prefix = false;
    size_t needed = 0;  //!< new blocks, plus the idle cached ones of the match that become used
  };
  class Cheapest;
  //! A compressed sequence's policy, budget and the scores its next compaction reads.
  struct Compressed {
    quant::CompressionPolicy policy;
    uint64_t budget = 0;         //!< tokens (quant::budget_for)
    uint64_t prompt_tokens = 0;
    bool prefilled = false;      //!< its prompt's K/V has been computed
    bool compacted_once = false;
    uint64_t last_compaction_step = 0;  //!< the step of its admission, then of its compactions

    //! Whether its policy compacts once (snapkv, pyramid: the prompt), not every interval.
    [[nodiscard]] bool compacts_once() const {
      return policy.kind == quant::CompressionPolicy::Kind::kSnapKv ||
             policy.kind == quant::CompressionPolicy::Kind::kPyramid;
    }
    //! Whether its policy compacts it no more: its one compaction is done.
    [[nodiscard]] bool settled() const { return compacted_once && compacts_once(); }
    std::vector<double> scores;  //!< reported since its last compaction (report_attention)
    bool has_scores = false;
    //! The plans whose score requests are outstanding (asked again each step until answered;
    //! nothing renumbered the sequence since the first), and the tokens it had in the last:
    //! the reports the coordinator takes.
    struct ScoreRequest {
      uint64_t first_step = 0;
      uint64_t last_step = 0;
      uint64_t tokens = 0;
    };
    std::optional<ScoreRequest> request;
    quant::ArrivalOrder arrival;  //!< h2o: when each slot's token arrived, once compacted
    //! snapkv, for a prompt over its budget: the identity its compacted prompt is indexed
    //! under (compressed_prompt_identity), named at the step after its admission, and the
    //! cheap probe of it (compressed_prompt_probe)
    std::optional<CacheSalt> shared_as;
    std::optional<uint64_t> probe;
    //! The replica where its compaction indexed its kept prompt, if it did.
    std::optional<uint32_t> indexed_on;
    //! \brief pyramid, once compacted: the tokens each layer group keeps. The pool table holds
    //! every group's blocks but its last, group after group (full_blocks[g] each), then rounds
    //! of one block per group in group order. The groups' token counts differ by whole group
    //! blocks (groups x block_size tokens), so all fill their last block at the same token: the
    //! pool table grows a round at a time, always of whole blocks, and its last round holds
    //! each group's last block.
    struct Groups {
      std::vector<uint64_t> tokens;       //!< per group, the tokens it holds
      std::vector<uint32_t> full_blocks;  //!< per group, its blocks before the rounds
      uint64_t uncomputed = 0;  //!< every group's trailing tokens the next forward pass computes

      //! The pool table's blocks before the rounds.
      [[nodiscard]] size_t all_full() const {
        return std::accumulate(full_blocks.begin(), full_blocks.end(), size_t{0});
      }
      //! Where one group's blocks sit in the pool table, each position in O(1).
      struct Placement {
        size_t first_full, full, all_full, groups;
        uint32_t g;

        //! The position of the group's block j.
        [[nodiscard]] size_t operator[](size_t j) const {
          return j < full ? first_full + j : all_full + (j - full) * groups + g;
        }
        //! How many of the group's blocks sit before `position`.
        [[nodiscard]] size_t count_before(size_t position) const {
          if (position <= first_full) return 0;
          if (position <= first_full + full) return position - first_full;
          if (position <= all_full + g) return full;
          return full + (position - all_full - g + groups - 1) / groups;
        }
      };
      [[nodiscard]] Placement placement(uint32_t g) const {
        return {std::accumulate(full_blocks.begin(), full_blocks.begin() + g, size_t{0}),
                full_blocks[g], all_full(), tokens.size(), g};
      }
    };
    std::optional<Groups> groups;
  };

  explicit Coordinator(const Config& config);
  Sequence* find(SeqId seq);
  PagedKvCache& pool_of(uint32_t replica);
  [[nodiscard]] const Sequence* find(SeqId seq) const;
  //! The pool record of a running sequence (nullptr when swapped out).
  [[nodiscard]] const SequenceInfo* running_info(SeqId seq, const Sequence& s) const;
  [[nodiscard]] bool is_full(uint32_t replica) const;
  //! An id admit() or fork() may give a new sequence; `role` starts the "exists" message.
  Status check_new_sequence(SeqId seq, std::string_view role) const;
  Status check_priority(SeqId seq, uint32_t priority) const;
  //! check_priority() of a request `subject` names.
  Status check_priority_level(uint32_t priority, const std::string& subject) const;
  //! Where the prompt in lookup_ goes: the cheapest replica that has room, found among the
  //! replicas holding its deepest parts and, in load order, the rest; else choose_under_pressure().
  Result<AdmitChoice> choose_replica(SeqId seq, const PromptMatch& prompt, uint32_t priority);
  //! Every replica ranked by cost, the first that has room or can make it by displacing lower
  //! priorities. O(replicas): only when no replica has room.
  Result<AdmitChoice> choose_under_pressure(SeqId seq, const PromptMatch& prompt,
                                            uint32_t priority) const;
  //! The prompt `lookup` found, `tokens` long.
  [[nodiscard]] PromptMatch match_of(const PrefixLookup& lookup, size_t tokens) const;
  //! The cost of covering a prompt from `local` cached tokens on a replica (migrating the best
  //! prefix when that is cheaper), before the replica's load.
  [[nodiscard]] double prefix_cost(const PromptMatch& prompt, size_t local, bool migrate) const;
  [[nodiscard]] bool migrates(const PromptMatch& prompt, uint32_t replica, size_t local) const;
  //! The replica's cost for the prompt `lookup` found, at `load`.
  [[nodiscard]] Candidate evaluate(const PrefixLookup& lookup, const PromptMatch& prompt,
                                   uint32_t replica, double load) const;
  //! Whether a newcomer of `priority` may go to the replica at all (not full, no swapped sequence
  //! of the same or a higher priority waiting to come back).
  [[nodiscard]] bool accepts(uint32_t replica, uint32_t priority) const;
  //! The least loaded replica that accepts a newcomer of `priority` and has `blocks` blocks
  //! available without displacing anyone (ties: lowest id).
  std::optional<uint32_t> least_loaded_with_room(size_t blocks, uint32_t priority);
  [[nodiscard]] bool has_room(const Candidate& c) const;
  Result<Placement> place(SeqId seq, std::vector<TokenId>&& prompt, RadixKey&& key,
                          uint32_t priority, uint32_t tenant, const AdmitChoice& choice);
  //! The source blocks of the prefix admit() migrates onto a replica that caches `local` of it.
  [[nodiscard]] std::vector<BlockId> migration_blocks(const AdmitChoice& choice,
                                                      const ReplicaPrefix& local) const;
  //! Records an admitted sequence: its first `tokens` slots, the placement's cached ones
  //! computed (a compressed one's all), in its replica's load, its tenant's and the stats.
  Sequence& record_admission(SeqId seq, size_t prompt_tokens, size_t tokens, uint32_t priority,
                             uint32_t tenant, const Placement& placement);
  //! Marks a replica whose running count or memory changed: its place in the load order is
  //! brought up to date before the next placement.
  void mark_load(uint32_t replica);
  void refresh_loads();
  [[nodiscard]] double load_of(uint32_t replica) const;
  //! Evicts idle cached blocks until every replica has coordinator.free_watermark_blocks free.
  void refill_free_blocks();
  //! A replica's pool checks, that its pool and the index agree on every block, and its place in
  //! the load order.
  [[nodiscard]] Status verify_replica(uint32_t replica) const;
  //! One sequence's record against its pool, counted into `running` and `held`.
  [[nodiscard]] Status verify_sequence(SeqId seq, const Sequence& s, std::vector<uint32_t>& running,
                                       std::vector<TenantStats>& held) const;
  Result<Placement> admit_for(SeqId seq, std::vector<TokenId>&& prompt, uint32_t tenant,
                              const AdmitOptions& options);
  Status append_blocks(SeqId seq, size_t num_tokens);
  Status fork_sequence(SeqId src, SeqId dst, std::optional<uint32_t> replica);
  //! The tenant's index, registering it on first use.
  uint32_t tenant_index(std::string_view name);
  [[nodiscard]] const TenantQuota& quota_of(const Tenant& tenant) const;
  //! Where quota_of() took the tenant's quota from, for messages.
  static const char* quota_source(const Tenant& tenant);
  //! ResourceExhausted when `tenant` taking `sequences` more sequences and `blocks` more blocks
  //! would pass its quota; `request` names the request in the message (built only then: this
  //! runs for every decoded token).
  Status check_quota(const std::function<std::string()>& request, uint32_t tenant,
                     uint64_t sequences, uint64_t blocks) const;
  //! Sets the blocks a sequence's table holds in its tenant's count (`host`: on the host tier).
  void charge(Sequence& s, uint64_t blocks);
  Status check_tenant_priority(const std::function<std::string()>& request, uint32_t tenant,
                               uint32_t priority) const;
  //! The same for a tenant's record, or the tenants section's defaults for one never seen
  //! (nullptr), so that a query registers no tenant.
  Status check_tenant_priority(const std::function<std::string()>& request, const Tenant* tenant,
                               uint32_t priority) const;
  //! Counts a refusal of `status` (room or quota) against the tenant.
  void note_refusal(uint32_t tenant, const Status& status);
  //! Records a new sequence holding `blocks` blocks in its table, counted for its tenant.
  Sequence& add_sequence(SeqId seq, Sequence record, uint64_t blocks);
  //! Drops a sequence's record and its tenant's share.
  void erase_sequence(SeqId seq);
  //! OutOfMemory for a request that making room could not satisfy, with the numbers.
  Status no_room(const std::string& request, uint32_t replica, size_t needed,
                 const Relief& relief) const;
  [[nodiscard]] std::vector<const SequenceInfo*> victim_order(uint32_t replica,
                                                              const ReliefRequest& request) const;
  Relief plan_relief(uint32_t replica, const ReliefRequest& request) const;
  void relieve(uint32_t replica, std::span<const SeqId> victims);
  bool swap_out(SeqId seq);
  bool park(SeqId seq);
  void preempt(SeqId seq);
  void migrate(uint32_t src_replica, std::span<const BlockId> src, uint32_t dst_replica,
               std::span<const BlockId> dst);
  void mark_table(Sequence& s);
  void forget_swapped(uint32_t replica, uint32_t priority);
  void collect_copies(uint32_t replica);
  void swap_back_in();
  void index_planned_prompts();
  //! Indexes `blocks` holding `key` on `replica` (GlobalPrefixIndex::insert) and retains the
  //! newly indexed ones in its pool; returns how many were new. The index's errors as they are.
  Result<size_t> index_blocks(uint32_t replica, const RadixKey& key,
                              std::span<const BlockId> blocks);
  // Token compression (compression.cc).
  Status check_compression(SeqId seq, const AdmitOptions& options, size_t prompt_tokens) const;
  //! `served_compacted`: admitted with an identical request's kept prompt (admit_compressed).
  void record_compression(SeqId seq, const AdmitOptions& options, size_t prompt_tokens,
                          std::optional<uint64_t> probe, bool served_compacted);
  //! The budget in tokens a policy gives a prompt: quant::budget_for, for snapkv rounded up to
  //! whole blocks.
  [[nodiscard]] uint64_t budget_of(const quant::CompressionPolicy& policy, size_t prompt_tokens) const;
  //! The identity a snapkv compaction of `prompt` is shared under: a SHA-256 over the prompt,
  //! its namespace and the policy's budget and window.
  [[nodiscard]] static CacheSalt compressed_prompt_identity(const quant::CompressionPolicy& policy,
                                                            uint64_t budget,
                                                            const CacheSalt& namespace_salt,
                                                            std::span<const TokenId> prompt);
  //! A cheap stand-in for that identity (the prompt's length, first and last blocks, namespace,
  //! budget and window), so that an admission hashes its whole prompt only when some indexed
  //! compacted prompt may be its own. nullopt when nothing would be shared (not snapkv, or a
  //! prompt within its budget).
  [[nodiscard]] std::optional<uint64_t> compressed_prompt_probe(
      const quant::CompressionPolicy& policy, uint64_t budget, const CacheSalt& namespace_salt,
      std::span<const TokenId> prompt) const;
  //! Names the compacted prompts of this step's snapkv admissions (shared_as), while their
  //! prompts are at hand (index_planned_prompts).
  void name_compressed_prompts();
  //! The index key of a compacted prompt of `kept` tokens (whole blocks) shared under `identity`:
  //! the identity is the salt of every block, and the tokens are slot numbers, as an identical
  //! request can name them before knowing which tokens were kept.
  RadixKey compressed_prompt_key(const CacheSalt& identity, size_t kept);
  //! Places a snapkv request on a replica holding its compacted prompt (the least loaded that
  //! accepts it; ties: lowest id), or, when none accepts it and migrating costs less than
  //! prefilling, moves the kept prompt to least_loaded_with_room(). nullopt (nothing changed)
  //! when no replica holds it whole or none can take it.
  std::optional<Placement> admit_compressed(SeqId seq, size_t prompt_tokens,
                                            const CacheSalt& identity, uint64_t kept,
                                            uint32_t priority, uint32_t tenant);
  //! Indexes the kept prompt of a sequence that a snapkv compaction just laid out in its first
  //! `kept` slots (whole blocks, the sequence's own).
  void index_compacted_prompt(SeqId seq, const Sequence& s, Compressed& c);
  //! Whether a snapkv sequence's scores cover every token outside its observation window: a
  //! selection that depends on the prompt alone.
  [[nodiscard]] static bool voted_in_full(const Compressed& c);
  //! Whether an admitted request had `probe` (compressed_prompt_probe) before.
  [[nodiscard]] bool compressed_probe_seen(uint64_t probe) const;
  //! Counts an admitted request of `probe`.
  void count_compressed_probe(uint64_t probe);
  //! A sequence that indexed its kept prompt ends: the entry leaves with it unless its prompt
  //! was admitted again (kept prompts of one-off prompts would take the cache full prompts use).
  void forget_kept_prompt(const Compressed& c);
  //! Forgets what `replica` holds of a kept prompt that no sequence uses (GlobalPrefixIndex::
  //! forget) and frees those blocks; returns how many.
  size_t release_kept_prompt(uint32_t replica, const CacheSalt& identity, uint64_t kept);
  //! Whether the sequence's replica may index its kept prompt: it holds none of the key (what
  //! eviction left of another's is forgotten first; a whole one already serves).
  bool makes_way_for_kept_prompt(const Sequence& s, const Compressed& c);
  void compact_due_sequences();
  // PyramidKV across ranks (layer_groups.cc and compression.cc).
  //! Layer groups of the ranks' pools (cache.layers_per_group), 0 when they have none.
  [[nodiscard]] uint32_t num_layer_groups() const;
  //! pyramid: keeps SnapKV's selection of each layer group's budget, in fresh blocks laid out
  //! per group (Compressed::Groups), with the regrouping copies and a compaction per group in
  //! the plan. false when the replica has fewer blocks available than the new table takes (it
  //! waits); true, keeping it whole, when no group drops a token or the groups would take more
  //! blocks than the whole table.
  bool regroup(SeqId seq, Sequence& s, Compressed& c);
  //! pyramid: the prompt tokens each layer group keeps (its budget, at least what SnapKV keeps
  //! whatever the budget, rounded up to whole group blocks short of the prompt).
  [[nodiscard]] std::vector<size_t> pyramid_kept_prompts(const Compressed& c) const;
  //! The layout of groups holding `tokens` each (Compressed::Groups).
  [[nodiscard]] Compressed::Groups group_layout(std::span<const uint64_t> tokens,
                                                uint64_t uncomputed) const;
  //! The plan's regrouping copies: group g's kept tokens `kept[g]` (positions in the `whole`
  //! table) into their slots of the new `table` laid out as `layout`.
  void queue_regroup_copies(uint32_t replica, const Compressed::Groups& layout,
                            std::span<const BlockId> whole, std::span<const BlockId> table,
                            const std::vector<std::vector<size_t>>& kept);
  //! append_blocks() for a sequence compacted per layer group: a round of blocks each time its
  //! groups' last blocks are full.
  Status append_grouped(SeqId seq, Sequence& s, size_t num_tokens);
  //! A fork of a sequence compacted per layer group on its replica: its last round copied when
  //! partly filled (those blocks are written next), the rest shared.
  Status fork_grouped(SeqId src, const Sequence& s, SeqId dst);
  //! The plan's table of each layer group of a sequence compacted per group.
  void publish_group_tables(SeqId seq, Sequence& s);
  //! Layer group g's table within the pool table of a sequence compacted per group, from its
  //! block `first` on.
  [[nodiscard]] static std::vector<BlockId> group_table(std::span<const BlockId> pool_table,
                                                        const Compressed::Groups& groups,
                                                        uint32_t g, size_t first = 0);
  [[nodiscard]] Status verify_groups(SeqId seq, const Compressed::Groups& groups) const;
  //! Compacts one sequence to what its policy keeps; false when it keeps everything or its
  //! replica cannot give the fresh blocks a shared block's copy needs (it waits).
  bool compact(SeqId seq, Sequence& s, Compressed& c);
  [[nodiscard]] bool due(const Sequence& s, const Compressed& c, uint64_t step) const;
  void request_scores();
  //! The scores of a sequence that left its replica's ranks (swapped, parked) are gone there.
  void forget_scores(SeqId seq);
  //! verify_integrity()'s part for compression: every state names a live sequence, and its
  //! arrivals fit it, each once.
  [[nodiscard]] Status verify_compression() const;
  void publish_kv_events(uint64_t step);
  // Why an admitted prompt missed what it missed (stats_.missed).
  void count_misses(const AdmittedPrompt& admitted) const;
  // Counts the misses of the admissions not counted yet. Admissions leave it to stats() and
  // step(), off their own latency: the filter it reads changes only when step() indexes this
  // step's prompts (remember_blocks), after counting, so the counts are the same.
  void count_pending_misses() const;
  // Records the newly indexed blocks, the last `fresh` full blocks of `key`, as seen.
  void remember_blocks(const RadixKey& key, size_t fresh);
  // Refuses `request` once the next plan has gathered max_pending_plan_entries.
  [[nodiscard]] Status check_pending_room(const std::function<std::string()>& request) const;

  Config config_;
  uint64_t block_bytes_ = 0;
  std::unique_ptr<GlobalPrefixIndex> index_;  // heap: every pool points to its retainer
  std::vector<Replica> replicas_;
  struct LoadOrder;
  std::unique_ptr<LoadOrder> by_load_;             // (load, replica): least loaded first
  std::vector<uint32_t> stale_loads_;              // replicas whose load may have changed
  PrefixLookup lookup_;                            // the prompt being admitted
  PrefixLookup compressed_lookup_;                 // a compacted prompt looked up
  std::vector<TokenId> slot_numbers_;              // 0, 1, ...: compressed_prompt_key's tokens
  // SnapKV admissions per probe, saturating at 2 (seen again), forgotten all at once at a cap:
  // lookups only, never iterated.
  std::unordered_map<uint64_t, uint8_t> compressed_probe_counts_;
  std::vector<std::pair<double, uint32_t>> holders_left_;  // choose_replica's scratch
  std::vector<Tenant> tenants_;  // in registration order; Sequence::tenant indexes it
  std::map<std::string, uint32_t, std::less<>> tenant_ids_;
  std::unique_ptr<SequenceMap> seqs_;
  std::map<uint64_t, SeqId> swap_queue_;  // swapped sequences by swap order, oldest first
  StepPlan plan_;
  // Tables to publish in the next plan: (record slot, incarnation) in the order they changed.
  std::vector<std::pair<uint32_t, uint64_t>> dirty_;
  std::vector<AdmittedPrompt> admitted_now_;      // prompts of this step, indexed by step()
  uint64_t admitted_now_blocks_ = 0;  // the blocks of admitted_now_'s prompts
  std::vector<std::pair<uint32_t, BlockId>> host_blocks_to_free_;  // after this step's swap-ins
  uint64_t next_swap_order_ = 0;
  uint64_t next_incarnation_ = 0;
  // Mutable for the miss counts that stats() settles (count_pending_misses).
  mutable CoordinatorStats stats_;
  mutable size_t misses_counted_ = 0;  // admitted_now_'s leading prompts whose misses are counted
  std::function<void(const KvEventBatch&)> kv_event_sink_;
  std::unique_ptr<detail::SeenBlocks> seen_;  // every block ever cached (miss causes)
  std::map<SeqId, Compressed> compressed_;    // by id: compactions run in a fixed order
  // The entries of compressed_ not settled(), by id: what step() walks for compactions due and
  // scores to ask for, so that sequences done compacting cost a step nothing.
  std::map<SeqId, Compressed*> compacting_;
};

}  // namespace kvfabric
