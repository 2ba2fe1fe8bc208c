// The kernels' description of one layer group's block pool on one tier. Plain data, usable from
// host and device code; the CPU backend and the CUDA kernels take the same view.
#pragma once

#include <cstdint>

#include "kvfabric/common/block_layout.h"
#include "kvfabric/common/dtype.h"
#include "kvfabric/common/host_device.h"

namespace kvfabric {

enum class Tier : uint8_t {
  kDevice,  //!< GPU memory (host memory for the CPU backend): what attention reads
  kHost,    //!< (pinned) host memory: the swap tier
};

//! \brief A pool of `num_blocks` blocks laid out as BlockLayout describes (DESIGN.md §3):
//! block b starts at base + b * block_bytes; inside it
//!   codes  [layer][K|V][head][token][head_dim]  at tile_bytes per (layer, K|V, head)
//!   scales [layer][K|V][head][token][group] f32 at scales_offset
//!   zeros  [layer][K|V][head][token][group] u8  at zeros_offset
struct PagedKvView {
  uint8_t* base = nullptr;
  uint64_t num_blocks = 0;
  uint64_t block_bytes = 0;
  uint64_t tile_bytes = 0;  //!< one [block_size][head_dim] code tile
  uint64_t row_bytes = 0;   //!< one token's codes for one head
  uint64_t scales_offset = 0;
  uint64_t zeros_offset = 0;
  uint32_t num_layers = 0;    //!< layers in this group
  uint32_t first_layer = 0;   //!< model index of the group's first layer
  uint32_t num_kv_heads = 0;  //!< local KV heads
  uint32_t block_size = 0;
  uint32_t head_dim = 0;
  uint32_t group_size = 0;      //!< integer formats: elements per scale/zero record
  uint32_t groups_per_row = 0;  //!< records per (token, head): 0, 1 (fp8) or head_dim/group_size
  uint32_t layer_group = 0;
  DType dtype = DType::kF16;

  //! A view over `base` (num_blocks * layout.block_bytes() bytes) for one layer group.
  static PagedKvView make(const BlockLayout& layout, uint8_t* base, uint64_t num_blocks,
                          uint32_t layer_group = 0, uint32_t first_layer = 0) {
    PagedKvView v;
    v.base = base;
    v.num_blocks = num_blocks;
    v.block_bytes = layout.block_bytes();
    v.tile_bytes = layout.tile_bytes();
    v.row_bytes = uint64_t{layout.head_dim} * dtype_bits(layout.dtype) / 8;
    v.scales_offset = layout.scales_offset();
    v.zeros_offset = layout.zeros_offset();
    v.num_layers = layout.num_layers;
    v.first_layer = first_layer;
    v.num_kv_heads = layout.num_kv_heads;
    v.block_size = layout.block_size;
    v.head_dim = layout.head_dim;
    v.group_size = layout.group_size;
    v.groups_per_row = layout.groups_per_row();
    v.layer_group = layer_group;
    v.dtype = layout.dtype;
    return v;
  }

  KVF_HOST_DEVICE uint8_t* block(uint64_t b) const { return base + b * block_bytes; }
  //! Index of the (layer, K|V, head) tile inside a block; kv is 0 for K, 1 for V.
  KVF_HOST_DEVICE uint64_t tile(uint32_t layer, uint32_t kv, uint32_t head) const {
    return (uint64_t{layer} * 2 + kv) * num_kv_heads + head;
  }
  //! Codes of token 0 of the tile; token t's row is at + t * row_bytes.
  KVF_HOST_DEVICE uint8_t* codes(uint64_t b, uint32_t layer, uint32_t kv, uint32_t head) const {
    return block(b) + tile(layer, kv, head) * tile_bytes;
  }
  //! Scales of token 0 of the tile; token t's records are at + t * groups_per_row.
  KVF_HOST_DEVICE float* scales(uint64_t b, uint32_t layer, uint32_t kv, uint32_t head) const {
    return reinterpret_cast<float*>(block(b) + scales_offset) +
           tile(layer, kv, head) * block_size * groups_per_row;
  }
  KVF_HOST_DEVICE uint8_t* zeros(uint64_t b, uint32_t layer, uint32_t kv, uint32_t head) const {
    return block(b) + zeros_offset + tile(layer, kv, head) * block_size * groups_per_row;
  }
  //! Bytes the whole pool spans.
  KVF_HOST_DEVICE uint64_t bytes() const { return num_blocks * block_bytes; }
};

}  // namespace kvfabric
