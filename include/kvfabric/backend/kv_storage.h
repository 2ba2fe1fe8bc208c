// One rank's KV memory: an arena per (layer group, tier), each described by a PagedKvView.
#pragma once

#include <cstdint>
#include <vector>

#include "kvfabric/backend/backend.h"
#include "kvfabric/common/block_layout.h"
#include "kvfabric/config/config.h"

namespace kvfabric {

//! \brief Consecutive model layers that share one block pool and one set of block tables.
//! Groups are how per-layer budgets (PyramidKV) and sliding-window layers free real memory.
struct LayerGroupSpec {
  uint32_t num_layers = 0;
  uint64_t device_blocks = 0;
  uint64_t host_blocks = 0;  //!< swap tier
};

struct KvStorageSpec {
  uint32_t num_kv_heads = 0;  //!< local KV heads (this rank's shard)
  uint32_t block_size = 0;
  uint32_t head_dim = 0;
  DType dtype = DType::kF16;
  uint32_t group_size = 0;  //!< integer formats; 0 = head_dim
  std::vector<LayerGroupSpec> groups;

  //! Groups of cache.layers_per_group layers (the last may be shorter), each with the resolved
  //! device blocks and cache.host_num_blocks host blocks, for this rank's KV-head shard.
  static Result<KvStorageSpec> from_config(const Config& config);
};

//! \brief Layer group `group` of a whole-block pool regrouped by `layers_per_group` (PyramidKV
//! across ranks): a block seen this way holds the group's layers for num_groups x block_size
//! tokens, the same bytes as a whole block (every layer, block_size tokens). So one allocator
//! serves both views, and a sequence whose groups keep different numbers of tokens takes blocks
//! in proportion to what it keeps. InvalidArgument when layers_per_group does not divide the
//! pool's layers or `group` is past the last.
Result<PagedKvView> layer_group_view(const PagedKvView& whole, uint32_t layers_per_group,
                                     uint32_t group);

class KvStorage {
 public:
  //! Allocates every arena (zeroed). Errors name the group and tier that could not be allocated.
  static Result<KvStorage> create(Backend& backend, const KvStorageSpec& spec);

  struct LayerLocation {
    uint32_t group;
    uint32_t layer;  //!< index within the group
  };

  [[nodiscard]] uint32_t num_groups() const { return static_cast<uint32_t>(groups_.size()); }
  [[nodiscard]] uint32_t num_layers() const { return num_layers_; }
  [[nodiscard]] const BlockLayout& layout(uint32_t group) const { return groups_.at(group).layout; }
  [[nodiscard]] const PagedKvView& view(uint32_t group, Tier tier) const;
  //! Which group holds a model layer; InvalidArgument past the last layer.
  [[nodiscard]] Result<LayerLocation> locate(uint32_t model_layer) const;
  //! Total bytes of all arenas of a tier.
  [[nodiscard]] uint64_t bytes(Tier tier) const;

 private:
  struct Group {
    BlockLayout layout;
    KvArena device;
    KvArena host;
    PagedKvView device_view;
    PagedKvView host_view;
  };
  std::vector<Group> groups_;
  uint32_t num_layers_ = 0;
};

}  // namespace kvfabric
