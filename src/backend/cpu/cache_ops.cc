// Writing, reading and moving KV slots on the CPU.
#include <atomic>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#include "backend/cpu/kernels.h"
#include "kvfabric/quant/quantize.h"

namespace kvfabric::cpu {
namespace {

// Codes an append writes beyond which they bypass the caches (about the last-level cache of a
// small machine; a decode step of even hundreds of sequences stays far below).
constexpr uint64_t kStreamingAppendBytes = uint64_t{8} << 20;

// Orders this thread's non-temporal stores before its later stores (and the region's barrier).
void store_fence() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_sfence();
#else
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

size_t activation_bytes(DType dtype) {
  return dtype == DType::kF32 ? 4 : 2;
}

// Moves token rows [src_offset, +n) of every (layer, K|V, head) tile of `dst`'s layers, with
// their scale and zero records, from the same model layer of `src` (`dst` itself, or another
// view of its arena); memmove because a compaction may shift rows inside one block.
void copy_token_range(const PagedKvView& src, const PagedKvView& dst, const TokenCopy& c) {
  const uint32_t tiles = dst.num_layers * 2 * dst.num_kv_heads;
  const uint32_t src_layer_offset = dst.first_layer - src.first_layer;
  const uint64_t gpr = dst.groups_per_row;
  for (uint32_t tile = 0; tile < tiles; ++tile) {
    const uint32_t layer = tile / (2 * dst.num_kv_heads);
    const uint32_t kv = (tile / dst.num_kv_heads) % 2;
    const uint32_t head = tile % dst.num_kv_heads;
    const uint32_t src_layer = src_layer_offset + layer;
    std::memmove(dst.codes(c.dst_block.value, layer, kv, head) + c.dst_offset * dst.row_bytes,
                 src.codes(c.src_block.value, src_layer, kv, head) + c.src_offset * dst.row_bytes,
                 c.num_tokens * dst.row_bytes);
    if (gpr == 0) continue;
    std::memmove(dst.scales(c.dst_block.value, layer, kv, head) + c.dst_offset * gpr,
                 src.scales(c.src_block.value, src_layer, kv, head) + c.src_offset * gpr,
                 c.num_tokens * gpr * sizeof(float));
    if (!is_integer_quantized(dst.dtype)) continue;
    std::memmove(dst.zeros(c.dst_block.value, layer, kv, head) + c.dst_offset * gpr,
                 src.zeros(c.src_block.value, src_layer, kv, head) + c.src_offset * gpr,
                 c.num_tokens * gpr);
  }
}

}  // namespace

void append_kv(const SimdOps& ops, const PagedKvView& pool, const AppendKvArgs& args, int threads) {
  const uint32_t heads = pool.num_kv_heads;
  const uint32_t hd = pool.head_dim;
  const size_t in_row_bytes = activation_bytes(args.input_dtype) * hd;
  const auto* key = static_cast<const uint8_t*>(args.key);
  const auto* value = static_cast<const uint8_t*>(args.value);
  const int64_t n = args.num_tokens;
  // An append that writes more than the caches hold (a long prompt) does not need its codes in
  // cache: the encoders may store them around it, saving the read of each line before its write.
  // A decode step's few tokens stay cached for the attention that reads them next.
  const bool stream = uint64_t(n) * heads * 2 * pool.row_bytes >= kStreamingAppendBytes;
#pragma omp parallel num_threads(threads) if (n * heads * hd > (1 << 16))
  {
#pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < n; ++t) {
      const int64_t slot = args.slot_mapping[t];
      if (slot < 0) continue;
      const uint64_t block = static_cast<uint64_t>(slot) / pool.block_size;
      const uint64_t offset = static_cast<uint64_t>(slot) % pool.block_size;
      // One call per token for K and one for V: all its heads, so that the integer encoders can
      // compute the parameters of several groups (of different heads) at once.
      const uint64_t in_row = static_cast<uint64_t>(t) * heads;
      for (uint32_t kv = 0; kv < 2; ++kv) {
        ops.encode_rows(pool, (kv == 0 ? key : value) + in_row * in_row_bytes, args.input_dtype,
                        heads, pool.codes(block, args.layer, kv, 0) + offset * pool.row_bytes,
                        pool.scales(block, args.layer, kv, 0) + offset * pool.groups_per_row,
                        pool.zeros(block, args.layer, kv, 0) + offset * pool.groups_per_row,
                        stream);
      }
    }
    if (stream) store_fence();  // each thread's non-temporal stores, before the region's end
  }
}

void gather_kv(const SimdOps& ops, const PagedKvView& pool, const GatherKvArgs& args) {
  const uint32_t heads = pool.num_kv_heads;
  const uint32_t hd = pool.head_dim;
  std::vector<float> tile(uint64_t{pool.block_size} * hd);
  for (uint32_t first = 0; first < args.num_tokens; first += pool.block_size) {
    const uint32_t block = args.block_table[first / pool.block_size];
    const uint32_t n = std::min(pool.block_size, args.num_tokens - first);
    for (uint32_t h = 0; h < heads; ++h) {
      for (uint32_t kv = 0; kv < 2; ++kv) {
        const TileRef ref{pool.codes(block, args.layer, kv, h),
                          pool.scales(block, args.layer, kv, h),
                          pool.zeros(block, args.layer, kv, h)};
        ops.decode_rows(pool, ref, n, tile.data());
        float* out = kv == 0 ? args.key_out : args.value_out;
        for (uint32_t t = 0; t < n; ++t) {
          std::memcpy(out + ((uint64_t{first} + t) * heads + h) * hd,
                      tile.data() + uint64_t{t} * hd, sizeof(float) * hd);
        }
      }
    }
  }
}

void copy_blocks(std::span<const GroupBlockCopies> batch) {
  for (const GroupBlockCopies& group : batch) {
    for (const BlockMove& m : group.copies) {
      std::memmove(group.pool.block(m.dst_block), group.pool.block(m.src_block),
                   group.pool.block_bytes);
    }
  }
}

void compact_tokens(std::span<const GroupTokenCopies> batch) {
  for (const GroupTokenCopies& group : batch) {
    for (const TokenCopy& c : group.copies)
      copy_token_range(group.read_pool(), group.pool, c);
  }
}

void swap_blocks(const PagedKvView& src, const PagedKvView& dst, std::span<const BlockMove> moves) {
  for (const BlockMove& m : moves) {
    std::memmove(dst.block(m.dst_block), src.block(m.src_block), src.block_bytes);
  }
}

}  // namespace kvfabric::cpu
