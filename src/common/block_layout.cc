#include "kvfabric/common/block_layout.h"

#include <sstream>
#include <string>

#include "common/checked_math.h"

namespace kvfabric {
namespace {

uint64_t round_up(uint64_t value, uint64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// The bytes of one block, as block_bytes() computes them, or nullopt when a step overflows.
std::optional<uint64_t> checked_block_bytes(const BlockLayout& l) {
  using detail::checked_product;
  using detail::checked_sum;
  const auto tile_bits = checked_product({l.block_size, l.head_dim, dtype_bits(l.dtype)});
  if (!tile_bits) return std::nullopt;
  const auto data = checked_product({l.num_layers, 2, l.num_kv_heads, *tile_bits / 8});
  const auto groups =
      checked_product({l.num_layers, 2, l.num_kv_heads, l.block_size, l.groups_per_row()});
  if (!data || !groups || *data > UINT64_MAX - 16) return std::nullopt;
  if (!is_quantized(l.dtype)) return *data;
  const auto scales = checked_product({*groups, 4});
  const uint64_t zeros = is_integer_quantized(l.dtype) ? *groups : 0;
  if (!scales) return std::nullopt;
  // round_up(round_up(data, 4) + scales + zeros, 16), each step checked.
  auto total = checked_sum(round_up(*data, 4), *scales);
  if (total) total = checked_sum(*total, zeros);
  if (total) total = checked_sum(*total, 15);
  if (!total) return std::nullopt;
  return *total / 16 * 16;
}

}  // namespace

Result<BlockLayout> BlockLayout::create(uint32_t num_layers, uint32_t num_kv_heads,
                                        uint32_t block_size, uint32_t head_dim, DType dtype,
                                        uint32_t group_size) {
  auto positive = [](const char* name, uint32_t value) -> Status {
    if (value == 0) return invalid_argument(std::string(name) + " must be > 0 (got 0)");
    return ok_status();
  };
  KVF_RETURN_IF_ERROR(positive("num_layers", num_layers));
  KVF_RETURN_IF_ERROR(positive("num_kv_heads", num_kv_heads));
  KVF_RETURN_IF_ERROR(positive("block_size", block_size));
  KVF_RETURN_IF_ERROR(positive("head_dim", head_dim));

  const uint32_t bits = dtype_bits(dtype);
  if (uint64_t{head_dim} * bits % 8 != 0) {
    return invalid_argument("head_dim " + std::to_string(head_dim) + " does not pack into whole " +
                            "bytes at " + std::string(dtype_name(dtype)));
  }
  if (!is_integer_quantized(dtype)) {
    group_size = head_dim;  // one group (fp8 scale) or none per (token, head)
  } else {
    if (group_size == 0) group_size = head_dim;
    if (head_dim % group_size != 0) {
      return invalid_argument("quant group_size " + std::to_string(group_size) +
                              " does not divide head_dim " + std::to_string(head_dim));
    }
    if (uint64_t{group_size} * bits % 8 != 0) {
      return invalid_argument("quant group_size " + std::to_string(group_size) +
                              " does not end on a byte boundary at " +
                              std::string(dtype_name(dtype)));
    }
  }
  BlockLayout layout;
  layout.num_layers = num_layers;
  layout.num_kv_heads = num_kv_heads;
  layout.block_size = block_size;
  layout.head_dim = head_dim;
  layout.dtype = dtype;
  layout.group_size = group_size;
  // Every size derived from the layout is computed in 64 bits; refuse shapes that do not fit.
  const std::optional<uint64_t> bytes = checked_block_bytes(layout);
  if (!bytes || *bytes > kMaxBlockBytes) {
    std::ostringstream why;
    why << "a KV block of " << num_layers << " layers x 2 (K and V) x " << num_kv_heads
        << " KV heads x " << block_size << " tokens x head_dim " << head_dim << " at "
        << dtype_name(dtype) << " needs ";
    if (bytes) {
      why << *bytes << " bytes";
    } else {
      why << "more than 2^64 bytes";
    }
    why << ", more than the " << kMaxBlockBytes << " bytes (1 TiB) one block may take";
    return Status(ErrorCode::kInvalidArgument, why.str());
  }
  return layout;
}

uint64_t BlockLayout::tile_bytes() const {
  return uint64_t{block_size} * head_dim * dtype_bits(dtype) / 8;
}

uint64_t BlockLayout::data_bytes() const {
  return uint64_t{num_layers} * 2 * num_kv_heads * tile_bytes();
}

uint32_t BlockLayout::groups_per_row() const {
  if (dtype == DType::kFP8E4M3) return 1;
  if (is_integer_quantized(dtype)) return head_dim / group_size;
  return 0;
}

uint64_t BlockLayout::num_groups() const {
  return uint64_t{num_layers} * 2 * num_kv_heads * block_size * groups_per_row();
}

uint64_t BlockLayout::scales_offset() const {
  return round_up(data_bytes(), 4);
}

uint64_t BlockLayout::zeros_offset() const {
  return scales_offset() + num_groups() * 4;
}

uint64_t BlockLayout::block_bytes() const {
  if (!is_quantized(dtype)) return data_bytes();
  const uint64_t zero_bytes = is_integer_quantized(dtype) ? num_groups() : 0;
  return round_up(zeros_offset() + zero_bytes, 16);  // blocks stay 16-byte aligned for vector loads
}

std::string BlockLayout::to_string() const {
  std::ostringstream os;
  os << "BlockLayout{layers=" << num_layers << ", kv_heads=" << num_kv_heads
     << ", block_size=" << block_size << ", head_dim=" << head_dim << ", dtype=" << dtype;
  if (is_integer_quantized(dtype)) os << ", group_size=" << group_size;
  os << ", bytes=" << block_bytes() << "}";
  return os.str();
}

}  // namespace kvfabric
