// The storage backend interface: arenas and the KV operations a serving step performs.
// The CPU backend (always built) is the reference; the CUDA backend implements the same calls.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string_view>

#include "kvfabric/backend/paged_kv_view.h"
#include "kvfabric/block/token_copy.h"
#include "kvfabric/common/status.h"

namespace kvfabric {

//! \brief Memory owned by a backend (host memory for the CPU backend; device or pinned host memory
//! for the CUDA backend). Move-only; freed with the backend's release function.
class KvArena {
 public:
  using Release = std::function<void(uint8_t* data, uint64_t bytes)>;

  KvArena() = default;
  KvArena(uint8_t* data, uint64_t bytes, Tier tier, Release release)
      : data_(data), bytes_(bytes), tier_(tier), release_(std::move(release)) {}
  KvArena(KvArena&& other) noexcept { *this = std::move(other); }
  KvArena& operator=(KvArena&& other) noexcept;
  KvArena(const KvArena&) = delete;
  KvArena& operator=(const KvArena&) = delete;
  ~KvArena() { reset(); }

  [[nodiscard]] uint8_t* data() const { return data_; }
  [[nodiscard]] uint64_t bytes() const { return bytes_; }
  [[nodiscard]] Tier tier() const { return tier_; }
  void reset();

 private:
  uint8_t* data_ = nullptr;
  uint64_t bytes_ = 0;
  Tier tier_ = Tier::kDevice;
  Release release_;
};

//! Writes new tokens' K and V into their slots, quantizing to the pool's dtype on the way.
struct AppendKvArgs {
  uint32_t layer = 0;               //!< layer within the pool's layer group
  const void* key = nullptr;        //!< [num_tokens, num_kv_heads, head_dim] in input_dtype
  const void* value = nullptr;      //!< [num_tokens, num_kv_heads, head_dim] in input_dtype
  DType input_dtype = DType::kF32;  //!< f32, f16 or bf16
  uint32_t num_tokens = 0;
  const int64_t* slot_mapping = nullptr;  //!< [num_tokens] block * block_size + offset; -1 skips
};

//! Reads a sequence's tokens back into contiguous f32 tensors (dequantized).
struct GatherKvArgs {
  uint32_t layer = 0;
  const uint32_t* block_table = nullptr;  //!< [ceil(num_tokens / block_size)]
  uint32_t num_tokens = 0;
  float* key_out = nullptr;    //!< [num_tokens, num_kv_heads, head_dim]
  float* value_out = nullptr;  //!< [num_tokens, num_kv_heads, head_dim]
};

//! One query token per sequence over its whole context (the decode step).
struct DecodeAttentionArgs {
  uint32_t layer = 0;
  const void* query = nullptr;      //!< [num_seqs, num_q_heads, head_dim] in query_dtype
  DType query_dtype = DType::kF32;  //!< f32, f16 or bf16; the output has the same dtype
  void* output = nullptr;           //!< [num_seqs, num_q_heads, head_dim]
  uint32_t num_seqs = 0;
  uint32_t num_q_heads = 0;  //!< local query heads, a multiple of the pool's KV heads (GQA)
  const uint32_t* block_tables =
      nullptr;  //!< [num_seqs, max_blocks_per_seq]; padding kInvalidBlockId
  uint32_t max_blocks_per_seq = 0;
  const uint32_t* context_lens = nullptr;  //!< [num_seqs], >= 1
  float softmax_scale = 1.0f;
  //! Optional [num_seqs, mass_stride] f32: each context token's softmax weight summed over the
  //! query heads (H2O scores). Entries past a sequence's context are left untouched.
  float* attention_mass = nullptr;
  uint32_t mass_stride = 0;
};

//! New tokens of each sequence attend causally to the cached prefix and to themselves. The new
//! tokens' K/V must already be appended: query i of a sequence with q_len new tokens and context
//! length n attends to positions [0, n - q_len + i].
struct PrefillAttentionArgs {
  uint32_t layer = 0;
  const void* query = nullptr;  //!< [total_query_tokens, num_q_heads, head_dim]
  DType query_dtype = DType::kF32;
  void* output = nullptr;  //!< [total_query_tokens, num_q_heads, head_dim]
  uint32_t num_seqs = 0;
  uint32_t num_q_heads = 0;
  const uint32_t* query_start = nullptr;   //!< [num_seqs + 1] offsets of each sequence's queries
  const uint32_t* context_lens = nullptr;  //!< [num_seqs] cached + new tokens
  const uint32_t* block_tables = nullptr;  //!< [num_seqs, max_blocks_per_seq]
  uint32_t max_blocks_per_seq = 0;
  float softmax_scale = 1.0f;
};

//! A whole-block move or copy between two pools (or within one).
struct BlockMove {
  uint32_t src_block = 0;
  uint32_t dst_block = 0;
};

//! The token-range copies of one layer group (block manager CoW and compaction output).
struct GroupTokenCopies {
  PagedKvView pool;
  std::span<const TokenCopy> copies;
};

//! Whole-block copies inside one layer group's pool.
struct GroupBlockCopies {
  PagedKvView pool;
  std::span<const BlockMove> copies;
};

//! \brief Executes KV storage operations on one device. Every call validates its arguments first
//! (shapes, dtypes, block ids, slots, finite inputs) and on error changes nothing.
//!
//! Memory: tensors (key, value, query, output, attention_mass, key_out, value_out) live in the
//! backend's memory (host memory for the CPU backend, device memory for CUDA); the step metadata
//! (slot_mapping, block_tables, context_lens, query_start, copy lists) is host memory, built by the
//! scheduler for each step and uploaded by device backends themselves.
class Backend {
 public:
  virtual ~Backend() = default;

  [[nodiscard]] virtual std::string_view name() const = 0;
  //! Zero-initialized memory for one pool on `tier`.
  virtual Result<KvArena> allocate_arena(uint64_t bytes, Tier tier) = 0;

  virtual Status append_kv(const PagedKvView& pool, const AppendKvArgs& args) = 0;
  virtual Status gather_kv(const PagedKvView& pool, const GatherKvArgs& args) = 0;
  //! Whole-block copies (one contiguous copy per block), all groups in one call, in order.
  virtual Status copy_blocks(std::span<const GroupBlockCopies> batch) = 0;
  //! Token-range copies with the block manager's semantics (in order, each like memmove), all
  //! groups in one call: executes PagedKvCache::take_pending_copies() output.
  virtual Status compact_tokens(std::span<const GroupTokenCopies> batch) = 0;
  //! Moves whole blocks between two pools of the same layout (device <-> host tier) in one call.
  virtual Status swap_blocks(const PagedKvView& src, const PagedKvView& dst,
                             std::span<const BlockMove> moves) = 0;
  virtual Status paged_decode_attention(const PagedKvView& pool,
                                        const DecodeAttentionArgs& args) = 0;
  virtual Status paged_prefill_attention(const PagedKvView& pool,
                                         const PrefillAttentionArgs& args) = 0;
  //! Copies host memory into backend memory (a tensor an engine hands to the kernels).
  virtual Status upload(void* dst, const void* src_host, uint64_t bytes) = 0;
  //! Copies backend memory into host memory; waits for queued work first.
  virtual Status download(void* dst_host, const void* src, uint64_t bytes) = 0;
  //! One bulk copy between any two addresses the backend can reach (its memory, its pinned host
  //! tier): the baseline the block-copy kernels are measured against.
  virtual Status copy_bytes(void* dst, const void* src, uint64_t bytes) = 0;
  //! Waits for queued work (a no-op for the CPU backend, whose calls complete synchronously).
  virtual Status synchronize() { return ok_status(); }
};

//! Vector instruction set of the CPU kernels.
enum class CpuIsa : uint8_t {
  kAuto,     //!< the best the processor supports (KVF_CPU_ISA=generic|avx2 overrides)
  kGeneric,  //!< portable C++
  kAvx2,     //!< AVX2 + FMA + F16C
};

struct CpuBackendOptions {
  CpuIsa isa = CpuIsa::kAuto;
  int num_threads = 0;  //!< 0 = all available cores (OpenMP)
};

//! The CPU backend: host-memory arenas, multithreaded kernels. Fails only when the requested ISA
//! is not supported by this processor.
Result<std::unique_ptr<Backend>> make_cpu_backend(const CpuBackendOptions& options = {});

//! The ISA make_cpu_backend picks for kAuto on this machine.
CpuIsa best_cpu_isa();
std::string_view cpu_isa_name(CpuIsa isa);

}  // namespace kvfabric
