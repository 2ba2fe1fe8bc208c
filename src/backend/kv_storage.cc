#include "kvfabric/backend/kv_storage.h"

#include <string>

#include "common/checked_math.h"

namespace kvfabric {

Result<KvStorageSpec> KvStorageSpec::from_config(const Config& config) {
  KVF_RETURN_IF_ERROR(validate(config));
  KVF_ASSIGN_OR_RETURN(const uint64_t blocks, resolved_num_blocks(config));
  KvStorageSpec spec;
  spec.num_kv_heads = local_kv_heads(config.model, config.topology);
  spec.block_size = config.cache.block_size;
  spec.head_dim = config.model.head_dim;
  spec.dtype = config.cache.kv_dtype;
  spec.group_size = config.cache.quant_group_size;
  const uint32_t layers = config.model.num_layers;
  const uint32_t per_group =
      config.cache.layers_per_group == 0 ? layers : config.cache.layers_per_group;
  // Blocks have the same count in every group (a group's block holds only its layers), so the
  // memory budget splits across groups in proportion to their layers.
  for (uint32_t first = 0; first < layers; first += per_group) {
    spec.groups.push_back(
        {std::min(per_group, layers - first), blocks, config.cache.host_num_blocks});
  }
  return spec;
}

Result<PagedKvView> layer_group_view(const PagedKvView& whole, uint32_t layers_per_group,
                                     uint32_t group) {
  if (layers_per_group == 0 || whole.num_layers % layers_per_group != 0) {
    return invalid_argument("cache.layers_per_group " + std::to_string(layers_per_group) +
                            " must divide the " + std::to_string(whole.num_layers) +
                            " layers of a pool viewed per layer group");
  }
  const uint32_t groups = whole.num_layers / layers_per_group;
  if (group >= groups) {
    return invalid_argument("layer group " + std::to_string(group) + " of " +
                            std::to_string(groups));
  }
  const auto tokens = detail::checked_product({whole.block_size, groups});
  if (!tokens || *tokens > UINT32_MAX) {
    return invalid_argument(std::to_string(groups) + " layer groups of " +
                            std::to_string(whole.block_size) + "-token blocks exceed 2^32 tokens");
  }
  KVF_ASSIGN_OR_RETURN(const BlockLayout layout,
                       BlockLayout::create(layers_per_group, whole.num_kv_heads,
                                           static_cast<uint32_t>(*tokens), whole.head_dim,
                                           whole.dtype, whole.group_size));
  if (layout.block_bytes() != whole.block_bytes) {
    return Status(ErrorCode::kInternal,
                  "layer group " + std::to_string(group) + "'s blocks take " +
                      std::to_string(layout.block_bytes()) + " bytes, the whole pool's " +
                      std::to_string(whole.block_bytes));
  }
  return PagedKvView::make(layout, whole.base, whole.num_blocks, group,
                           whole.first_layer + group * layers_per_group);
}

Result<KvStorage> KvStorage::create(Backend& backend, const KvStorageSpec& spec) {
  if (spec.groups.empty()) return invalid_argument("KvStorage needs at least one layer group");
  KvStorage storage;
  for (uint32_t g = 0; g < spec.groups.size(); ++g) {
    const LayerGroupSpec& gs = spec.groups[g];
    auto layout = BlockLayout::create(gs.num_layers, spec.num_kv_heads, spec.block_size,
                                      spec.head_dim, spec.dtype, spec.group_size);
    if (!layout.ok()) {
      return invalid_argument("layer group " + std::to_string(g) + ": " +
                              layout.status().message());
    }
    if (gs.device_blocks > kMaxBlocksPerPool || gs.host_blocks > kMaxBlocksPerPool) {
      return invalid_argument("layer group " + std::to_string(g) + ": more than " +
                              std::to_string(kMaxBlocksPerPool) + " blocks");
    }
    Group group{layout.value(), {}, {}, {}, {}};
    const uint64_t block_bytes = group.layout.block_bytes();
    for (Tier tier : {Tier::kDevice, Tier::kHost}) {
      const uint64_t blocks = tier == Tier::kDevice ? gs.device_blocks : gs.host_blocks;
      const auto bytes = detail::checked_product({blocks, block_bytes});
      if (!bytes) {
        return invalid_argument("layer group " + std::to_string(g) + ": " + std::to_string(blocks) +
                                " blocks of " + std::to_string(block_bytes) +
                                " bytes are more than 2^64 bytes");
      }
      auto arena = backend.allocate_arena(*bytes, tier);
      if (!arena.ok()) {
        return Status(arena.status().code(),
                      "layer group " + std::to_string(g) + ": " + arena.status().message());
      }
      PagedKvView view =
          PagedKvView::make(group.layout, arena->data(), blocks, g, storage.num_layers_);
      if (tier == Tier::kDevice) {
        group.device = std::move(arena).value();
        group.device_view = view;
      } else {
        group.host = std::move(arena).value();
        group.host_view = view;
      }
    }
    storage.num_layers_ += gs.num_layers;
    storage.groups_.push_back(std::move(group));
  }
  return storage;
}

const PagedKvView& KvStorage::view(uint32_t group, Tier tier) const {
  const Group& g = groups_.at(group);
  return tier == Tier::kDevice ? g.device_view : g.host_view;
}

Result<KvStorage::LayerLocation> KvStorage::locate(uint32_t model_layer) const {
  for (uint32_t g = 0; g < groups_.size(); ++g) {
    const PagedKvView& v = groups_[g].device_view;
    if (model_layer >= v.first_layer && model_layer < v.first_layer + v.num_layers) {
      return LayerLocation{g, model_layer - v.first_layer};
    }
  }
  return invalid_argument("layer " + std::to_string(model_layer) + " is outside the model's " +
                          std::to_string(num_layers_) + " layers");
}

uint64_t KvStorage::bytes(Tier tier) const {
  uint64_t total = 0;
  for (const Group& g : groups_)
    total += (tier == Tier::kDevice ? g.device : g.host).bytes();
  return total;
}

}  // namespace kvfabric
