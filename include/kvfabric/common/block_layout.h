// The one place that decides how many bytes a KV block takes and where its parts live.
#pragma once

#include <cstdint>
#include <string>

#include "kvfabric/common/dtype.h"
#include "kvfabric/common/status.h"

namespace kvfabric {

//! \brief Byte layout of one KV block on one rank (DESIGN.md §3). A block is contiguous:
//!
//!   data:   [layer][K|V][local_kv_head][token_in_block][head_dim] codes, dtype_bits each, packed
//!   scales: [layer][K|V][local_kv_head][token_in_block][group]   f32   (quantized dtypes only)
//!   zeros:  [layer][K|V][local_kv_head][token_in_block][group]   u8    (integer dtypes only)
//!
//! fp8_e4m3 has one group per (token, head); the integer formats have head_dim / group_size.
//! The block manager, the storage arenas and the kernels all size blocks with this struct.
struct BlockLayout {
  //! The largest block create() accepts (1 TiB, far beyond any model), so that every size
  //! derived from one block fits in 64 bits.
  static constexpr uint64_t kMaxBlockBytes = uint64_t{1} << 40;

  uint32_t num_layers = 0;
  uint32_t num_kv_heads = 0;  //!< KV heads stored on this rank (its TP shard)
  uint32_t block_size = 0;    //!< tokens per block
  uint32_t head_dim = 0;
  DType dtype = DType::kF16;
  uint32_t group_size = 0;  //!< elements per quantization group; head_dim for non-integer types

  //! Validates the shape: all counts > 0, group_size divides head_dim, sub-byte rows and groups
  //! end on byte boundaries, and a block takes at most kMaxBlockBytes (the message gives the
  //! bytes the shape would need). group_size 0 means "one group per head" (head_dim).
  static Result<BlockLayout> create(uint32_t num_layers, uint32_t num_kv_heads, uint32_t block_size,
                                    uint32_t head_dim, DType dtype, uint32_t group_size = 0);

  //! Bytes of one [block_size][head_dim] tile of codes (one layer, K or V, one head).
  [[nodiscard]] uint64_t tile_bytes() const;
  //! Bytes of all code tiles of the block.
  [[nodiscard]] uint64_t data_bytes() const;
  //! Quantization groups per (token, head): 0 for f32/f16/bf16, 1 for fp8, head_dim/group for ints.
  [[nodiscard]] uint32_t groups_per_row() const;
  //! Number of (scale[, zero]) records in the block.
  [[nodiscard]] uint64_t num_groups() const;
  //! Byte offset of the f32 scales (4-byte aligned); equals data_bytes() rounded up.
  [[nodiscard]] uint64_t scales_offset() const;
  //! Byte offset of the u8 zero-points (integer dtypes).
  [[nodiscard]] uint64_t zeros_offset() const;
  //! Total bytes of one block, metadata included; rounded up to 16 bytes when metadata exists so
  //! that every block of a pool starts 16-byte aligned (vector loads in the kernels).
  [[nodiscard]] uint64_t block_bytes() const;

  [[nodiscard]] std::string to_string() const;
  friend bool operator==(const BlockLayout&, const BlockLayout&) = default;
};

}  // namespace kvfabric
