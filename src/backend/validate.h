// Argument checks shared by every backend: the metadata is host memory, so each call is validated
// completely before any byte of the pool changes.
#pragma once

#include <span>
#include <vector>

#include "kvfabric/backend/backend.h"

namespace kvfabric::detail {

Status validate_pool(const PagedKvView& pool, uint32_t layer, std::string_view op);
//! Shapes and slots only: the K/V values live in backend memory; each backend checks that they
//! are finite (validate_finite for host memory) before writing anything.
Status validate_append(const PagedKvView& pool, const AppendKvArgs& args);
Status validate_gather(const PagedKvView& pool, const GatherKvArgs& args);
Status validate_decode(const PagedKvView& pool, const DecodeAttentionArgs& args);
Status validate_prefill(const PagedKvView& pool, const PrefillAttentionArgs& args);
Status validate_token_copies(std::span<const GroupTokenCopies> batch);
Status validate_block_copies(std::span<const GroupBlockCopies> batch);
//! How a backend that runs the copies of one launch in parallel splits `copies` into launches that
//! keep their list order (each like memmove, one after another): the end index of each launch. A
//! copy starts a new launch when it reads or writes a block an earlier copy of the launch writes,
//! or writes a block an earlier copy of the launch reads.
std::vector<size_t> token_copy_launches(std::span<const TokenCopy> copies);
//! The same for whole-block moves inside one pool (copy_blocks). Between two pools (swap_blocks)
//! no move reads what another writes, and only a block written twice splits a launch.
std::vector<size_t> block_move_launches(std::span<const BlockMove> moves, bool one_pool);
Status validate_swap(const PagedKvView& src, const PagedKvView& dst,
                     std::span<const BlockMove> moves);

//! Checks that an activation tensor in host memory [num_tokens, heads, head_dim] is free of NaN
//! and Inf, scanning token ranges on `threads` threads; the error names the element.
Status validate_finite(const void* data, DType dtype, uint32_t num_tokens, uint32_t heads,
                       uint32_t head_dim, std::string_view what, int threads = 1);

//! validate_finite of append_kv's key and value in one pass (the same errors, a key's before a
//! value's), also refusing values a pool of `pool_dtype` would store as infinity or NaN
//! (quant::unstorable_abs_bits): each token's key and value rows together, one parallel region
//! instead of two. On a machine whose cores other processes share, each region's barrier can
//! wait out a scheduler slice, so one region fewer is worth a third of an append there.
Status validate_finite_kv(const void* key, const void* value, DType dtype, uint32_t num_tokens,
                          uint32_t heads, uint32_t head_dim, std::string_view key_what,
                          std::string_view value_what, DType pool_dtype, int threads = 1);

}  // namespace kvfabric::detail
