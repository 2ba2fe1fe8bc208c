// Host launchers of the CUDA kernels. Only src/backend/cuda and src/transport/nccl include this
// header. Every pointer argument is device memory; launchers enqueue on `stream`, never allocate
// and never synchronize. The kernels see plain data only: the pool view and the operations'
// arguments, never the Backend interface (tests/kernel_includes.cmake enforces it).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kvfabric/backend/kernel_args.h"
#include "kvfabric/backend/paged_kv_view.h"
#include "kvfabric/block/token_copy.h"
#include "kvfabric/common/dtype.h"

namespace kvfabric::kernels {

//! Query heads sharing one KV head that the attention kernels support (GQA group).
inline constexpr uint32_t kMaxGroup = 8;
//! Context tokens one attention CTA handles (split-K over longer contexts).
inline constexpr uint32_t kSplitTokens = 512;
//! Head dimensions with compiled attention kernels (one translation unit per dtype x head_dim).
inline constexpr uint32_t kHeadDims[] = {64, 128, 256};

//! One attention work item is one query token: decode has one per sequence, prefill one per new
//! token (each with its own causal context length).
struct AttentionLaunch {
  uint32_t layer = 0;
  const void* query = nullptr;  // [rows, num_q_heads, head_dim]
  DType query_dtype = DType::kF32;
  void* output = nullptr;  // [rows, num_q_heads, head_dim]
  uint32_t num_q_heads = 0;
  float softmax_scale = 1.0f;
  uint32_t num_items = 0;
  const uint32_t* item_row = nullptr;      // [num_items] row of query/output
  const uint32_t* item_table = nullptr;    // [num_items] row of block_tables
  const uint32_t* item_context = nullptr;  // [num_items] visible context tokens
  uint32_t max_context = 0;                // max of item_context (sizes the split grid)
  const uint32_t* block_tables = nullptr;  // [*, max_blocks_per_seq]
  uint32_t max_blocks_per_seq = 0;
  float* workspace = nullptr;  // attention_workspace_floats(...) floats
  float* mass = nullptr;       // optional [num_items, mass_stride]
  uint32_t mass_stride = 0;
};

//! Floats of workspace an attention launch needs.
uint64_t attention_workspace_floats(const PagedKvView& pool, const AttentionLaunch& args,
                                    bool with_mass);

cudaError_t launch_attention(const PagedKvView& pool, const AttentionLaunch& args,
                             cudaStream_t stream);

//! Writes rows of K and V: [num_tokens, heads, head_dim] in `input_dtype` to their slots.
cudaError_t launch_append_kv(const PagedKvView& pool, uint32_t layer, const void* key,
                             const void* value, DType input_dtype, uint32_t num_tokens,
                             const int64_t* slots, cudaStream_t stream);
//! Reads `num_tokens` tokens through a block table into f32 [num_tokens, heads, head_dim].
cudaError_t launch_gather_kv(const PagedKvView& pool, uint32_t layer, const uint32_t* table,
                             uint32_t num_tokens, float* key_out, float* value_out,
                             cudaStream_t stream);
//! flag = the smallest index of an element of `data` that is NaN, infinite or at least `abs_bits`
//! in magnitude (quant::find_unstorable; stays UINT64_MAX when there is none).
cudaError_t launch_find_unstorable(const void* data, DType dtype, uint64_t n, uint32_t abs_bits,
                                   unsigned long long* flag, cudaStream_t stream);

//! A whole-block copy between two pools (or within one), in device-visible memory.
struct BlockCopyOp {
  const uint8_t* src;
  uint8_t* dst;
};
//! Copies `count` blocks of `block_bytes` in one launch (ops must not overlap each other).
cudaError_t launch_copy_blocks(const BlockCopyOp* ops, uint32_t count, uint64_t block_bytes,
                               cudaStream_t stream);
//! Executes token-range copies into the rows of `dst`'s layers, read from the same model layers
//! of `src` (`dst` itself, or another view of its arena: a regrouping), in one launch; ops in
//! one launch must not touch a block another op of the launch writes (the backend splits the
//! list into such waves). Each op may overlap itself (a row shift inside one block): it is
//! staged through shared memory.
cudaError_t launch_token_copies(const PagedKvView& src, const PagedKvView& dst,
                                const TokenCopy* ops, uint32_t count, cudaStream_t stream);

//! One contiguous byte range to copy: a block into a staging buffer (pack) or back (unpack).
struct SpanCopy {
  const uint8_t* src;
  uint8_t* dst;
  uint64_t bytes;
};
//! Copies `count` ranges of any sizes in one launch (`max_bytes` = the largest, for the grid);
//! ranges must not overlap each other. Device or mapped pinned host memory. The NCCL
//! transport's pack and unpack (DESIGN.md §6 gather_blocks / scatter_blocks).
cudaError_t launch_span_copies(const SpanCopy* ops, uint32_t count, uint64_t max_bytes,
                               cudaStream_t stream);

}  // namespace kvfabric::kernels
