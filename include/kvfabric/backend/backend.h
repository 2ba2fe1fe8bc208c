// The storage backend interface: arenas and the KV operations a serving step performs.
// The CPU backend (always built) is the reference; the CUDA backend implements the same calls.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string_view>

#include "kvfabric/backend/kernel_args.h"
#include "kvfabric/backend/paged_kv_view.h"
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
  kAuto,      //!< the best the processor supports (KVF_CPU_ISA=generic|avx2|avx2-vnni overrides)
  kGeneric,   //!< portable C++
  kAvx2,      //!< AVX2 + FMA + F16C
  kAvx2Vnni,  //!< kAvx2 with the 256-bit VNNI dot product (AVX512-VNNI + AVX512VL)
};

struct CpuBackendOptions {
  //! Threads beyond this are refused: OpenMP's runtime crashed starting 100,000.
  static constexpr int kMaxThreads = 1024;
  CpuIsa isa = CpuIsa::kAuto;
  int num_threads = 0;  //!< 0 = all available cores (OpenMP); at most kMaxThreads
};

//! The CPU backend: host-memory arenas, multithreaded kernels. Fails only when the requested ISA
//! is not supported by this processor.
Result<std::unique_ptr<Backend>> make_cpu_backend(const CpuBackendOptions& options = {});

//! The ISA make_cpu_backend picks for kAuto on this machine.
CpuIsa best_cpu_isa();
std::string_view cpu_isa_name(CpuIsa isa);

}  // namespace kvfabric
