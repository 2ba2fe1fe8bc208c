// KV events: what the prefix index of a job stores and drops, per replica, for routers and
// caches outside the process (the shape of vLLM's KV events: BlockStored, BlockRemoved,
// AllBlocksCleared).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "kvfabric/prefix/cache_salt.h"
#include "kvfabric/prefix/radix_tree.h"

namespace kvfabric {

enum class KvEventType : uint8_t {
  kBlockStored,       //!< a replica caches these blocks now (their K/V is computed by the plan)
  kBlockRemoved,      //!< a replica no longer caches these blocks (evicted)
  kAllBlocksCleared,  //!< a replica caches nothing any more (a reset emptied it)
};
//! "BlockStored", "BlockRemoved", "AllBlocksCleared".
std::string_view kv_event_type_name(KvEventType type);

//! \brief One change to what a replica caches. Blocks are named by their chained block hash
//! (kv_block_hash): a hash names a block's tokens, every token before it, and its salt, so a
//! router can compute the hashes of a request's prompt itself and look them up.
struct KvEvent {
  KvEventType type = KvEventType::kBlockStored;
  uint32_t replica = 0;
  //! Stored: a run of consecutive blocks of one prefix, in prompt order. Removed: blocks in no
  //! particular order. Cleared: empty.
  std::vector<uint64_t> block_hashes;
  //! Stored: the hash of the block before the first one (none when it starts the prompt).
  std::optional<uint64_t> parent_block_hash;
  uint32_t num_tokens = 0;  //!< stored: tokens of the blocks (block_hashes.size() × block_size)
  CacheSalt salt;           //!< stored: the salt of the blocks (empty: public)
};

//! \brief Events in the order they happened, with the number of the step plan they belong to.
struct KvEventBatch {
  uint64_t step = 0;
  std::vector<KvEvent> events;
};

//! The chained hash of a block of `tokens` (one block's tokens) after the block `parent` (none
//! for a prompt's first block), under `salt` (empty for a public block): the first 8 bytes,
//! read little-endian, of SHA-256 over the parent hash (8 bytes little-endian, 0 for none), the
//! salt's 16 identity bytes (only for a salted block; see CacheSalt) and each token as 4 bytes
//! little-endian.
uint64_t kv_block_hash(std::optional<uint64_t> parent, std::span<const TokenId> tokens,
                       const CacheSalt& salt);

}  // namespace kvfabric
