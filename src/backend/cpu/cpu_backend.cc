// The CPU backend: host-memory arenas and the CPU kernels, every call validated first.
#include <sys/mman.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include "backend/cpu/kernels.h"
#include "backend/validate.h"
#include "common/host_memory.h"
#include "common/log.h"

namespace kvfabric {
namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  // F16C through cpuid: clang's __builtin_cpu_supports does not know it.
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
#else
  return false;
#endif
}

bool cpu_has_avx512_vnni() {
#if defined(__x86_64__) || defined(__i386__)
  // BW and DQ for append_kv's 512-bit encoder: every processor with AVX512-VNNI has them.
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool supported(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx2:
      return cpu::avx2_simd_ops() != nullptr && cpu_has_avx2();
    case CpuIsa::kAvx2Vnni:
      return cpu::avx2_vnni_simd_ops() != nullptr && cpu_has_avx2() && cpu_has_avx512_vnni();
    default:
      return true;
  }
}

const cpu::SimdOps& simd_ops(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx2:
      return *cpu::avx2_simd_ops();
    case CpuIsa::kAvx2Vnni:
      return *cpu::avx2_vnni_simd_ops();
    default:
      return cpu::generic_simd_ops();
  }
}

class CpuBackend final : public Backend {
 public:
  CpuBackend(const cpu::SimdOps& ops, int threads)
      : ops_(ops), threads_(threads), name_(std::string("cpu/") + ops.name) {}

  std::string_view name() const override { return name_; }

  Result<KvArena> allocate_arena(uint64_t bytes, Tier tier) override {
    if (bytes == 0) return KvArena(nullptr, 0, tier, nullptr);
    // This backend's tiers are both host memory: a pool the host cannot hold would only fail
    // later, when its pages are touched (the OOM killer), so it is refused here.
    KVF_RETURN_IF_ERROR(detail::check_host_memory(
        bytes, std::string("cpu backend: the ") + (tier == Tier::kDevice ? "device" : "host") +
                   " tier's arena"));
    // Anonymous mappings are page aligned and zero-filled lazily, so a large pool costs nothing
    // until its blocks are written.
    void* data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data == MAP_FAILED) {
      return Status(ErrorCode::kOutOfMemory, "cpu backend: cannot map " + std::to_string(bytes) +
                                                 " bytes for the " +
                                                 (tier == Tier::kDevice ? "device" : "host") +
                                                 " tier: " + std::strerror(errno));
    }
#ifdef MADV_HUGEPAGE
    // Paged attention jumps between scattered blocks; 2 MiB pages keep those jumps out of the
    // TLB's way. Advisory: without transparent huge pages the mapping works as before.
    if (bytes >= (2u << 20)) madvise(data, bytes, MADV_HUGEPAGE);
#endif
    return KvArena(static_cast<uint8_t*>(data), bytes, tier,
                   [](uint8_t* p, uint64_t n) { munmap(p, n); });
  }

  Status append_kv(const PagedKvView& pool, const AppendKvArgs& args) override {
    KVF_RETURN_IF_ERROR(detail::validate_append(pool, args));
    if (args.num_tokens > 0) {
      KVF_RETURN_IF_ERROR(detail::validate_finite_kv(
          args.key, args.value, args.input_dtype, args.num_tokens, pool.num_kv_heads,
          pool.head_dim, "append_kv: key", "append_kv: value", pool.dtype, threads_));
    }
    cpu::append_kv(ops_, pool, args, threads_);
    return ok_status();
  }

  Status gather_kv(const PagedKvView& pool, const GatherKvArgs& args) override {
    KVF_RETURN_IF_ERROR(detail::validate_gather(pool, args));
    cpu::gather_kv(ops_, pool, args);
    return ok_status();
  }

  Status copy_blocks(std::span<const GroupBlockCopies> batch) override {
    KVF_RETURN_IF_ERROR(detail::validate_block_copies(batch));
    cpu::copy_blocks(batch);
    return ok_status();
  }

  Status compact_tokens(std::span<const GroupTokenCopies> batch) override {
    KVF_RETURN_IF_ERROR(detail::validate_token_copies(batch));
    cpu::compact_tokens(batch);
    return ok_status();
  }

  Status swap_blocks(const PagedKvView& src, const PagedKvView& dst,
                     std::span<const BlockMove> moves) override {
    KVF_RETURN_IF_ERROR(detail::validate_swap(src, dst, moves));
    cpu::swap_blocks(src, dst, moves);
    return ok_status();
  }

  Status upload(void* dst, const void* src_host, uint64_t bytes) override {
    std::memcpy(dst, src_host, bytes);
    return ok_status();
  }
  Status download(void* dst_host, const void* src, uint64_t bytes) override {
    std::memcpy(dst_host, src, bytes);
    return ok_status();
  }
  Status copy_bytes(void* dst, const void* src, uint64_t bytes) override {
    std::memmove(dst, src, bytes);
    return ok_status();
  }

  Status paged_decode_attention(const PagedKvView& pool, const DecodeAttentionArgs& args) override {
    KVF_RETURN_IF_ERROR(detail::validate_decode(pool, args));
    if (args.num_seqs == 0) return ok_status();
    // A NaN or infinite query makes its outputs NaN: refused by name, as K and V are.
    KVF_RETURN_IF_ERROR(detail::validate_finite(args.query, args.query_dtype, args.num_seqs,
                                                args.num_q_heads, pool.head_dim,
                                                "paged_decode_attention: query", threads_));
    cpu::decode_attention(ops_, pool, args, threads_);
    return ok_status();
  }

  Status paged_prefill_attention(const PagedKvView& pool,
                                 const PrefillAttentionArgs& args) override {
    KVF_RETURN_IF_ERROR(detail::validate_prefill(pool, args));
    if (args.num_seqs == 0) return ok_status();
    KVF_RETURN_IF_ERROR(detail::validate_finite(args.query, args.query_dtype,
                                                args.query_start[args.num_seqs], args.num_q_heads,
                                                pool.head_dim, "paged_prefill_attention: query",
                                                threads_));
    cpu::prefill_attention(ops_, pool, args, threads_);
    return ok_status();
  }

 private:
  const cpu::SimdOps& ops_;
  int threads_;
  std::string name_;
};

}  // namespace

CpuIsa best_cpu_isa() {
  for (CpuIsa isa : {CpuIsa::kAvx2Vnni, CpuIsa::kAvx2}) {
    if (supported(isa)) return isa;
  }
  return CpuIsa::kGeneric;
}

std::string_view cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAuto:
      return "auto";
    case CpuIsa::kGeneric:
      return "generic";
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kAvx2Vnni:
      return "avx2-vnni";
  }
  return "unknown";
}

Result<std::unique_ptr<Backend>> make_cpu_backend(const CpuBackendOptions& options) {
  CpuIsa isa = options.isa;
  if (isa == CpuIsa::kAuto) {
    isa = best_cpu_isa();
    if (const char* forced = std::getenv("KVF_CPU_ISA"); forced != nullptr) {
      const std::string_view name(forced);
      if (name == "generic") {
        isa = CpuIsa::kGeneric;
      } else if (name == "avx2") {
        isa = CpuIsa::kAvx2;
      } else if (name == "avx2-vnni") {
        isa = CpuIsa::kAvx2Vnni;
      } else {
        return invalid_argument("KVF_CPU_ISA='" + std::string(forced) +
                                "' (expected generic, avx2 or avx2-vnni)");
      }
    }
  }
  if (!supported(isa)) {
    return Status(ErrorCode::kUnavailable,
                  isa == CpuIsa::kAvx2 ? "this processor lacks AVX2, FMA or F16C"
                                       : "this processor lacks AVX2, FMA, F16C, AVX512-VNNI or "
                                         "AVX512VL");
  }
  if (options.num_threads < 0 || options.num_threads > CpuBackendOptions::kMaxThreads) {
    return invalid_argument("num_threads must be in [0, " +
                            std::to_string(CpuBackendOptions::kMaxThreads) + "] (got " +
                            std::to_string(options.num_threads) + ")");
  }
  const cpu::SimdOps& ops = simd_ops(isa);
  int threads = options.num_threads;
#ifdef _OPENMP
  if (threads == 0) threads = omp_get_num_procs();
#else
  threads = 1;
#endif
  KVF_LOG_DEBUG(kBackend, "cpu backend: {} kernels, {} threads", ops.name, threads);
  return std::unique_ptr<Backend>(std::make_unique<CpuBackend>(ops, threads));
}

}  // namespace kvfabric
