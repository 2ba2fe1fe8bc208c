// The CPU kernels. Arguments are validated by the backend before these run.
#pragma once

#include "backend/cpu/simd_ops.h"
#include "kvfabric/backend/backend.h"

namespace kvfabric::cpu {

void append_kv(const SimdOps& ops, const PagedKvView& pool, const AppendKvArgs& args, int threads);
void gather_kv(const SimdOps& ops, const PagedKvView& pool, const GatherKvArgs& args);
void copy_blocks(std::span<const GroupBlockCopies> batch);
void compact_tokens(std::span<const GroupTokenCopies> batch);
void swap_blocks(const PagedKvView& src, const PagedKvView& dst, std::span<const BlockMove> moves);
void decode_attention(const SimdOps& ops, const PagedKvView& pool, const DecodeAttentionArgs& args,
                      int threads);
void prefill_attention(const SimdOps& ops, const PagedKvView& pool,
                       const PrefillAttentionArgs& args, int threads);

}  // namespace kvfabric::cpu
