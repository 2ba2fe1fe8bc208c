// The prefix index of a whole dp-replica job (DESIGN.md §5): one radix tree over the cached blocks
// of every replica, whose nodes record which replicas hold their blocks and under which block ids.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <span>
#include <tuple>
#include <vector>

#include "kvfabric/block/block_retainer.h"
#include "kvfabric/common/status.h"
#include "kvfabric/prefix/child_key_table.h"
#include "kvfabric/prefix/kv_events.h"
#include "kvfabric/prefix/radix_tree.h"

namespace kvfabric {

//! \brief Settings of a GlobalPrefixIndex.
struct GlobalPrefixOptions {
  uint32_t block_size = 0;          //!< tokens per block: keys are compared in whole blocks
  uint32_t num_replicas = 0;
  uint32_t blocks_per_replica = 0;  //!< each replica's pool holds block ids 0 .. this - 1
};

//! \brief One walk of a prompt down a GlobalPrefixIndex: the nodes it matched, root first. The
//! deepest match over all replicas is tokens(); what one replica holds of it is the leading run
//! of steps that replica holds (GlobalPrefixIndex::prefix_on). A lookup names nodes of the index
//! that made it and is valid until that index changes; reuse one to keep its capacity.
struct PrefixLookup {
  struct Step {
    uint32_t node = 0;
    uint32_t blocks = 0;  //!< of the node's blocks matched (fewer than it has on a partial step)
    size_t end = 0;       //!< prompt tokens matched up to the end of this step
  };
  std::vector<Step> steps;

  [[nodiscard]] size_t tokens() const { return steps.empty() ? 0 : steps.back().end; }
};

//! \brief What one replica holds of a looked-up prompt.
struct ReplicaPrefix {
  size_t tokens = 0;  //!< leading prompt tokens cached on the replica (whole blocks)
  size_t blocks = 0;
  //! Of those blocks, the idle ones (no sequence on the replica uses them); sharing makes them
  //! used, so they are no longer room for new blocks.
  size_t idle_blocks = 0;
  size_t steps = 0;  //!< leading steps of the lookup the replica holds
};

//! \brief The global block-granular prefix index of a dp-replica job: one radix tree over token
//! ids at block granularity (full blocks only) whose nodes each record, per replica that holds
//! them, the block ids of their edge on that replica's pool. A prompt is compared against the tree
//! once (lookup) and every replica's cached prefix is read off the path it found, so a lookup costs
//! the same for any number of replicas.
//!
//! Per replica the index is that replica's BlockRetainer (retainer()): its pool keeps indexed
//! blocks alive when their last sequence goes (cached, idle) and asks for idle blocks back when
//! short. A replica's holdings are prefix-closed (it holds a node only with the node's parent),
//! and each replica evicts on its own, least recently used first, leaf first: an idle node no
//! deeper node of the replica depends on, trimmed from its end. A node no replica holds leaves the
//! tree. "Recently used" is a logical clock advanced by use() and insert(), per replica: the
//! eviction order of each replica is exactly that of a block index of its own
//! (PrefixBlockIndex, LRU).
//!
//! Nodes are split where one replica's holding ends inside another's, so each replica holds a
//! node's blocks whole or not at all. Keys may be salted (RadixKey): salted blocks match only keys
//! of the same salt, and no edge crosses the public/salted boundary.
//!
//! Cost: lookup is one walk, O(prompt tokens matched) plus one hash lookup per node on the path;
//! prefix_on is O(path nodes · log holders); a pool notification O(path nodes · log holders);
//! choosing an eviction victim O(log n). Not thread-safe.
class GlobalPrefixIndex {
 public:
  //! Host memory per block of each replica's pool: its node, its use flag, and its id in the
  //! node's holding when it is indexed (edges and nodes come on top, per cached prefix).
  static constexpr uint64_t kBytesPerBlock = sizeof(uint32_t) + 1 + sizeof(BlockId);

  //! InvalidArgument for a block size or replica count of 0.
  static Result<std::unique_ptr<GlobalPrefixIndex>> create(const GlobalPrefixOptions& options);
  ~GlobalPrefixIndex();
  GlobalPrefixIndex(const GlobalPrefixIndex&) = delete;
  GlobalPrefixIndex& operator=(const GlobalPrefixIndex&) = delete;

  [[nodiscard]] const GlobalPrefixOptions& options() const { return options_; }
  //! The retainer to attach to `replica`'s pool (PagedKvCache::set_block_retainer).
  [[nodiscard]] BlockRetainer& retainer(uint32_t replica);

  //! Walks `key` down the tree into `out` (whole blocks only); changes nothing.
  void lookup(const RadixKey& key, PrefixLookup& out) const;
  //! What `replica` holds of a looked-up prompt.
  [[nodiscard]] ReplicaPrefix prefix_on(const PrefixLookup& lookup, uint32_t replica) const;
  //! The replicas holding the node of step `step`, in increasing order. A deeper step's holders
  //! are a subset of a shallower one's.
  [[nodiscard]] std::span<const uint32_t> holders(const PrefixLookup& lookup, size_t step) const;
  //! Appends `replica`'s block ids of the first `blocks` blocks of the lookup (which it holds).
  void blocks_on(const PrefixLookup& lookup, uint32_t replica, size_t blocks,
                 std::vector<BlockId>& out) const;
  //! Marks what `replica` holds of the lookup as used now (LRU) and, when that ends inside a node,
  //! splits the node there so that the rest stays evictable on its own. Invalidates `lookup`.
  void use(const PrefixLookup& lookup, uint32_t replica);

  //! Indexes on `replica` the full blocks of a sequence holding `key`'s tokens: blocks[i] holds
  //! tokens [i * block_size, (i + 1) * block_size). Where the replica already holds the prefix, its
  //! cached blocks stay and the sequence's copies are not indexed. Marks the path used now.
  //! Returns the newly indexed blocks, which count as used (the sequence holds them): the caller
  //! takes a retainer reference on each (PagedKvCache::retain_block). Errors (nothing changes):
  //! an unknown replica, too few blocks, a block outside the pool, already indexed on the replica
  //! or listed twice.
  Result<std::vector<BlockId>> insert(uint32_t replica, const RadixKey& key,
                                      std::span<const BlockId> blocks);

  //! Stops indexing on `replica` what it holds of a looked-up key that eviction could take now,
  //! from the deepest node it holds up (KV events included): stops at a node the key ends
  //! inside, at a holding some sequence uses and at one a deeper holding depends on. Other
  //! replicas' holdings stay. Returns the blocks; the caller
  //! drops the pool's references (PagedKvCache::release_retained_block). Invalidates `lookup`.
  std::vector<BlockId> forget(const PrefixLookup& lookup, uint32_t replica);

  //! Blocks indexed on `replica`, those of them some sequence uses, and the idle ones that
  //! eviction could give back now.
  [[nodiscard]] size_t cached_blocks(uint32_t replica) const;
  [[nodiscard]] size_t used_blocks(uint32_t replica) const;
  [[nodiscard]] size_t idle_blocks(uint32_t replica) const;
  [[nodiscard]] bool is_indexed(uint32_t replica, BlockId block) const;
  //! What idle_blocks(replica) would be if the uses of `released` (indexed blocks in use on the
  //! replica, each listed once) ended and a new use of `pinned` (a cached prefix of the replica,
  //! root first, that a request shares) began: a holding turns idle only when nothing below it is
  //! in use either, and a pinned block never does. Changes nothing; O((released + pinned) · path
  //! length).
  [[nodiscard]] size_t idle_blocks_after(uint32_t replica, std::span<const BlockId> released,
                                         std::span<const BlockId> pinned = {}) const;
  //! The replicas whose idle_blocks() grew in a split since clear_idle_changes(), each once: a
  //! split made for one replica (use(), insert(), eviction) can leave the rest of another
  //! replica's holding idle, and that replica's owner, who did not act, learns it here.
  [[nodiscard]] std::span<const uint32_t> idle_changes() const { return idle_changes_; }
  [[nodiscard]] bool idle_changed(uint32_t replica) const;
  void clear_idle_changes();
  //! Blocks evicted on `replica` since creation.
  [[nodiscard]] uint64_t evicted_blocks(uint32_t replica) const;
  //! Starts or stops recording KV events (KvEvent): each replica's stored and evicted blocks,
  //! named by their chained hashes (kv_block_hash). While recording, every node keeps its blocks'
  //! hashes (8 bytes per cached block); starting hashes every cached block once, and stopping
  //! drops the hashes and the events not taken yet. Off by default: hashing costs a SHA-256 per
  //! new cached block.
  void record_events(bool on);
  [[nodiscard]] bool recording_events() const { return recording_; }
  //! The events recorded since the last call, in order. Blocks stored on one replica along one
  //! prefix by consecutive changes come as one event, and so do consecutive removals on one
  //! replica.
  std::vector<KvEvent> take_events();
  //! What every replica holds now, as BlockStored events: replica by replica, each node after
  //! its parent (what a subscriber that starts now needs to know). Empty when not recording.
  [[nodiscard]] std::vector<KvEvent> holdings_as_events() const;

  //! Live nodes (the root excluded).
  [[nodiscard]] size_t node_count() const { return nodes_.size() - 1 - free_slots_.size(); }
  //! Host memory the tree holds (edges, holders, block lists, child maps, per-block tables); O(n).
  [[nodiscard]] size_t memory_bytes() const;

  //! Recomputes every link, count, flag and victim set from scratch and compares. For tests.
  [[nodiscard]] Status verify() const;

 private:
  static constexpr uint32_t kNone = UINT32_MAX;
  // A node's children are found through a map of their unit keys above this many.
  static constexpr size_t kMappedChildren = 4;
  // Free slots keep the edge buffers of removed nodes for their next nodes: all of them until the
  // next insert(), which frees what is over this many blocks of tokens in all (trim_spare()).
  // Eviction then frees nothing while an admission makes room for its prompt, and the prompt's
  // own nodes, indexed at the next step, reuse the buffers of the nodes it evicted.
  static constexpr size_t kSpareBlocks = 1024;
  class Retainer;

  // One replica's copy of a node's blocks.
  struct Holding {
    std::vector<BlockId> blocks;  // one per block of the node's edge
    uint32_t own_used = 0;        // of `blocks`, those some sequence uses
    uint64_t subtree_used = 0;    // own_used plus the replica's holdings below the node
    uint32_t held_children = 0;   // children the replica also holds
    uint64_t last_access = 0;
    uint64_t serial = 0;          // creation order: the older goes first among equals
    bool in_victims = false;
  };
  struct Node {
    // The edge is tokens[edge_begin, end): a split copies the (usually short) front to the new
    // upper node and leaves the rest in place instead of moving it.
    std::vector<TokenId> tokens;
    size_t edge_begin = 0;
    [[nodiscard]] std::span<const TokenId> edge() const {
      return std::span(tokens).subspan(edge_begin);
    }
    [[nodiscard]] size_t edge_size() const { return tokens.size() - edge_begin; }
    uint32_t parent = kNone;
    size_t depth = 0;  // tokens from the root to the end of the edge
    CacheSalt salt;
    std::vector<uint32_t> children;  // in no particular order
    uint32_t child_pos = 0;          // where the parent lists this node in its children
    // Unit key -> child, kept while the node has many children (kMappedChildren); a few are
    // compared one by one, which costs less than hashing the query's block to find one.
    detail::ChildKeyTable by_key;
    std::optional<uint64_t> unit_key;  // its first block's key among its siblings, once needed
    std::vector<uint64_t> block_hashes;  // one per block of the edge, while recording events
    std::vector<uint32_t> holders;     // replicas, increasing
    std::vector<Holding> holdings;     // parallel to holders
    bool alive = false;
  };
  // (last access, serial, node): the smallest idle leaf is the next victim.
  using VictimKey = std::tuple<uint64_t, uint64_t, uint32_t>;
  struct ReplicaState;  // a replica's block map, use flags, victim order and counts

  explicit GlobalPrefixIndex(const GlobalPrefixOptions& options);

  // The walk shared by lookup and insert: whole blocks of `key`, stopping at the first mismatch.
  void walk(const RadixKey& key, size_t length, PrefixLookup& out) const;
  // The child of `parent` whose edge `rest` (the key from `pos`) enters, with the tokens they
  // share (at least a block); {kNone, 0} when none.
  [[nodiscard]] std::pair<uint32_t, size_t> find_child(uint32_t parent, const RadixKey& key,
                                                       size_t pos,
                                                       std::span<const TokenId> rest) const;
  [[nodiscard]] uint64_t unit_key_of(const Node& n) const;
  void add_child(uint32_t parent, uint32_t child);
  void remove_child(uint32_t parent, uint32_t child);
  [[nodiscard]] Holding* holding(uint32_t node, uint32_t replica);
  [[nodiscard]] const Holding* holding(uint32_t node, uint32_t replica) const;
  [[nodiscard]] size_t node_blocks(uint32_t node) const;

  // Changes a holding's clock, serial or counts with its victim-set entry kept current.
  template <typename Change>
  void update(uint32_t node, uint32_t replica, Change&& change);
  template <typename Change>
  void update(uint32_t node, Holding& h, uint32_t replica, Change&& change);
  [[nodiscard]] bool evictable(const Holding& h) const {
    return h.subtree_used == 0 && h.held_children == 0;
  }
  // Adds `count` uses (add) or removes them on the replica's holding of `node` and its subtree
  // counts up to the root, keeping the idle count and victim sets current.
  void change_used(uint32_t node, uint32_t replica, uint32_t count, bool add);
  void touch_path(uint32_t node, uint32_t replica);

  uint32_t take_slot();
  // `key`: the edge's unit key when the caller has it (else computed if the parent needs it).
  uint32_t new_node(uint32_t parent, std::span<const TokenId> edge, std::optional<uint64_t> key,
                    const CacheSalt& salt);
  // Splits a node after `blocks` blocks; returns the new upper node (the node keeps the rest).
  uint32_t split(uint32_t node, size_t blocks);
  // Gives `replica` a holding of `node` with `blocks`, all used by the inserting sequence.
  void add_holding(uint32_t node, uint32_t replica, std::span<const BlockId> blocks);
  // Drops the replica's (idle, leaf) holding of `node`, appending its blocks to `released`;
  // removes the node when nobody holds it any more.
  void drop_holding(uint32_t node, uint32_t replica, std::vector<BlockId>& released);
  // Keeps the first `keep` blocks of the replica's holding of `node` (its last, idle leaf).
  void trim_holding(uint32_t node, uint32_t replica, size_t keep, std::vector<BlockId>& released);
  void remove_node(uint32_t node);
  // Resets a removed node's slot but keeps its vectors' storage for the next node to take the
  // slot: evicting a node and indexing another then cost no trip through the allocator.
  void clear_node(Node& n);
  // Frees the edge buffers of the free slots over kSpareBlocks blocks of tokens, oldest first.
  void trim_spare();
  // Gives a node taken from the free slots its edge, in the slot's buffer unless that is more
  // than twice the edge (the bound keeps what a slot holds near what it needs).
  static void set_edge(Node& n, std::span<const TokenId> edge);

  // KV events: the hashes of a new node's blocks, and the events of holdings gained and lost.
  void hash_blocks(uint32_t node);
  void note_stored(uint32_t node, uint32_t replica);
  void note_removed(uint32_t replica, std::span<const uint64_t> hashes);

  // BlockRetainer, per replica. Blocks of one notification that lie in one node change its
  // counts together.
  std::vector<BlockId> release_idle(uint32_t replica, size_t count);
  void on_blocks_used(uint32_t replica, std::span<const BlockId> blocks, bool used);

  GlobalPrefixOptions options_;
  std::deque<Node> nodes_;  // 0 is the root; a deque keeps references stable as it grows
  std::vector<uint32_t> free_slots_;
  std::vector<uint32_t> idle_changes_;
  size_t spare_tokens_ = 0;  // edge capacity the free slots keep, in tokens
  std::vector<ReplicaState> replicas_;
  std::vector<std::unique_ptr<Retainer>> retainers_;
  uint64_t tick_ = 0;
  uint64_t serial_ = 0;
  bool recording_ = false;
  std::vector<KvEvent> events_;  // recorded, not taken yet
};

}  // namespace kvfabric
