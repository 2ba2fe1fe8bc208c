// The CUDA backend: validates every call on the host (the step metadata is host memory), uploads
// the metadata in one copy, then launches the kernels on its stream. Nothing here synchronizes
// with the device except download(), synchronize() and the optional NaN/Inf check.
#include "kvfabric/backend/cuda_backend.h"

#include <cuda_runtime.h>

#include <cstring>
#include <string>
#include <unordered_set>
#include <vector>

#include "api.h"
#include "backend/validate.h"
#include "common/device_probe.h"
#include "common/log.h"
#include "kvfabric/quant/quantize.h"

namespace kvfabric {
namespace {

class CudaBackend final : public Backend {
 public:
  static Result<std::unique_ptr<Backend>> create(const CudaBackendOptions& options) {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
      cudaGetLastError();
      return Status(ErrorCode::kUnavailable,
                    std::string("no usable CUDA device: ") +
                        (err != cudaSuccess ? cudaGetErrorString(err) : "none visible"));
    }
    if (options.device < 0 || options.device >= count) {
      return invalid_argument("CUDA device " + std::to_string(options.device) +
                              " does not exist (" + std::to_string(count) + " visible)");
    }
    auto backend = std::unique_ptr<CudaBackend>(new CudaBackend(options));
    KVF_RETURN_IF_ERROR(backend->init());
    return std::unique_ptr<Backend>(std::move(backend));
  }

  ~CudaBackend() override {
    cudaSetDevice(options_.device);
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    for (void* p : {meta_device_, workspace_, static_cast<void*>(flag_device_)}) {
      if (p != nullptr) cudaFree(p);
    }
    for (void* p : {static_cast<void*>(staging_[0]), static_cast<void*>(staging_[1]),
                    static_cast<void*>(flag_host_)}) {
      if (p != nullptr) cudaFreeHost(p);
    }
    for (cudaEvent_t e : staged_) {
      if (e != nullptr) cudaEventDestroy(e);
    }
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  std::string_view name() const override { return name_; }

  Result<KvArena> allocate_arena(uint64_t bytes, Tier tier) override {
    if (bytes == 0) return KvArena(nullptr, 0, tier, nullptr);
    KVF_RETURN_IF_ERROR(check(cudaSetDevice(options_.device), "cudaSetDevice"));
    void* data = nullptr;
    const int device = options_.device;
    if (tier == Tier::kDevice) {
      const cudaError_t err = cudaMalloc(&data, bytes);
      if (err != cudaSuccess) {
        cudaGetLastError();
        return Status(ErrorCode::kOutOfMemory,
                      where() + ": cannot allocate " + std::to_string(bytes) +
                          " bytes for the device tier: " + cudaGetErrorString(err));
      }
      // Zeroed on our stream and waited for: a plain cudaMemset runs on the legacy default
      // stream, which our non-blocking stream does not wait for, so it could land after (and
      // erase) the first writes into the arena.
      const auto free_data = [device](uint8_t* p, uint64_t) {
        cudaSetDevice(device);
        cudaFree(p);
      };
      KvArena arena(static_cast<uint8_t*>(data), bytes, tier, free_data);
      KVF_RETURN_IF_ERROR(check(cudaMemsetAsync(data, 0, bytes, stream_), "cudaMemsetAsync"));
      KVF_RETURN_IF_ERROR(check(cudaStreamSynchronize(stream_), "cudaMemsetAsync"));
      return arena;
    }
    // Pinned and mapped: the swap kernels read and write it directly over PCIe (unified
    // addressing).
    const cudaError_t err =
        cudaHostAlloc(&data, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return Status(ErrorCode::kOutOfMemory,
                    where() + ": cannot pin " + std::to_string(bytes) +
                        " bytes of host memory for the swap tier: " + cudaGetErrorString(err));
    }
    std::memset(data, 0, bytes);
    return KvArena(static_cast<uint8_t*>(data), bytes, tier,
                   [](uint8_t* p, uint64_t) { cudaFreeHost(p); });
  }

  Status upload(void* dst, const void* src_host, uint64_t bytes) override {
    KVF_RETURN_IF_ERROR(
        check(cudaMemcpyAsync(dst, src_host, bytes, cudaMemcpyDefault, stream_), "upload"));
    return check(cudaStreamSynchronize(stream_), "upload");  // src_host may be pageable
  }

  Status download(void* dst_host, const void* src, uint64_t bytes) override {
    KVF_RETURN_IF_ERROR(
        check(cudaMemcpyAsync(dst_host, src, bytes, cudaMemcpyDefault, stream_), "download"));
    return check(cudaStreamSynchronize(stream_), "download");
  }

  Status copy_bytes(void* dst, const void* src, uint64_t bytes) override {
    return check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_), "copy_bytes");
  }

  Status synchronize() override { return check(cudaStreamSynchronize(stream_), "synchronize"); }

  Status append_kv(const PagedKvView& pool, const AppendKvArgs& args) override {
    KVF_RETURN_IF_ERROR(detail::validate_append(pool, args));
    KVF_RETURN_IF_ERROR(check_shape(pool, "append_kv"));
    if (args.num_tokens == 0) return ok_status();
    KVF_RETURN_IF_ERROR(check_device_memory(args.key, "append_kv: key"));
    KVF_RETURN_IF_ERROR(check_device_memory(args.value, "append_kv: value"));
    if (options_.check_finite) {
      const uint64_t n = uint64_t{args.num_tokens} * pool.num_kv_heads * pool.head_dim;
      // Values the pool would store as infinity or NaN are refused with the non-finite ones.
      KVF_RETURN_IF_ERROR(check_finite(args.key, args.input_dtype, n, pool.num_kv_heads,
                                       pool.head_dim, "append_kv: key", pool.dtype));
      KVF_RETURN_IF_ERROR(check_finite(args.value, args.input_dtype, n, pool.num_kv_heads,
                                       pool.head_dim, "append_kv: value", pool.dtype));
    }
    begin_staging();
    const uint64_t slots = stage(args.slot_mapping, args.num_tokens);
    KVF_RETURN_IF_ERROR(flush_staging());
    return check(kernels::launch_append_kv(pool, args.layer, args.key, args.value, args.input_dtype,
                                           args.num_tokens, staged<int64_t>(slots), stream_),
                 "append_kv");
  }

  Status gather_kv(const PagedKvView& pool, const GatherKvArgs& args) override {
    KVF_RETURN_IF_ERROR(detail::validate_gather(pool, args));
    KVF_RETURN_IF_ERROR(check_shape(pool, "gather_kv"));
    if (args.num_tokens == 0) return ok_status();
    KVF_RETURN_IF_ERROR(check_device_memory(args.key_out, "gather_kv: key_out"));
    KVF_RETURN_IF_ERROR(check_device_memory(args.value_out, "gather_kv: value_out"));
    begin_staging();
    const uint64_t table =
        stage(args.block_table, (args.num_tokens + pool.block_size - 1) / pool.block_size);
    KVF_RETURN_IF_ERROR(flush_staging());
    return check(kernels::launch_gather_kv(pool, args.layer, staged<uint32_t>(table),
                                           args.num_tokens, args.key_out, args.value_out, stream_),
                 "gather_kv");
  }

  Status paged_decode_attention(const PagedKvView& pool, const DecodeAttentionArgs& args) override {
    KVF_RETURN_IF_ERROR(detail::validate_decode(pool, args));
    KVF_RETURN_IF_ERROR(check_attention_shape(pool, args.num_q_heads, "paged_decode_attention"));
    if (args.num_seqs == 0) return ok_status();
    KVF_RETURN_IF_ERROR(check_device_memory(args.query, "paged_decode_attention: query"));
    KVF_RETURN_IF_ERROR(check_device_memory(args.output, "paged_decode_attention: output"));
    KVF_RETURN_IF_ERROR(
        check_device_memory(args.attention_mass, "paged_decode_attention: attention_mass"));
    if (options_.check_finite_queries) {  // a NaN or infinite query makes its outputs NaN
      KVF_RETURN_IF_ERROR(check_finite(args.query, args.query_dtype,
                                       uint64_t{args.num_seqs} * args.num_q_heads * pool.head_dim,
                                       args.num_q_heads, pool.head_dim,
                                       "paged_decode_attention: query"));
    }
    std::vector<uint32_t> rows(args.num_seqs);
    for (uint32_t s = 0; s < args.num_seqs; ++s)
      rows[s] = s;
    kernels::AttentionLaunch launch;
    launch.max_context = 0;
    for (uint32_t s = 0; s < args.num_seqs; ++s)
      launch.max_context = std::max(launch.max_context, args.context_lens[s]);
    begin_staging();
    const uint64_t row_at = stage(rows.data(), args.num_seqs);
    const uint64_t context_at = stage(args.context_lens, args.num_seqs);
    const uint64_t tables_at =
        stage(args.block_tables, uint64_t{args.num_seqs} * args.max_blocks_per_seq);
    KVF_RETURN_IF_ERROR(flush_staging());
    launch.item_row = staged<uint32_t>(row_at);
    launch.item_table = launch.item_row;  // sequence s uses table row s
    launch.item_context = staged<uint32_t>(context_at);
    launch.block_tables = staged<uint32_t>(tables_at);
    launch.layer = args.layer;
    launch.query = args.query;
    launch.query_dtype = args.query_dtype;
    launch.output = args.output;
    launch.num_q_heads = args.num_q_heads;
    launch.softmax_scale = args.softmax_scale;
    launch.num_items = args.num_seqs;
    launch.max_blocks_per_seq = args.max_blocks_per_seq;
    launch.mass = args.attention_mass;
    launch.mass_stride = args.mass_stride;
    return run_attention(pool, launch, "paged_decode_attention");
  }

  Status paged_prefill_attention(const PagedKvView& pool,
                                 const PrefillAttentionArgs& args) override {
    KVF_RETURN_IF_ERROR(detail::validate_prefill(pool, args));
    KVF_RETURN_IF_ERROR(check_attention_shape(pool, args.num_q_heads, "paged_prefill_attention"));
    if (args.num_seqs > 0) {
      KVF_RETURN_IF_ERROR(check_device_memory(args.query, "paged_prefill_attention: query"));
      KVF_RETURN_IF_ERROR(check_device_memory(args.output, "paged_prefill_attention: output"));
      if (options_.check_finite_queries) {
        KVF_RETURN_IF_ERROR(check_finite(
            args.query, args.query_dtype,
            uint64_t{args.query_start[args.num_seqs]} * args.num_q_heads * pool.head_dim,
            args.num_q_heads, pool.head_dim, "paged_prefill_attention: query"));
      }
    }
    // Every new token is one item, seeing its causal prefix.
    std::vector<uint32_t> rows, tables, contexts;
    uint32_t max_context = 0;
    for (uint32_t s = 0; s < args.num_seqs; ++s) {
      const uint32_t q_len = args.query_start[s + 1] - args.query_start[s];
      for (uint32_t i = 0; i < q_len; ++i) {
        rows.push_back(args.query_start[s] + i);
        tables.push_back(s);
        contexts.push_back(args.context_lens[s] - q_len + i + 1);
        max_context = std::max(max_context, contexts.back());
      }
    }
    if (rows.empty()) return ok_status();
    kernels::AttentionLaunch launch;
    begin_staging();
    const uint64_t row_at = stage(rows.data(), rows.size());
    const uint64_t table_at = stage(tables.data(), tables.size());
    const uint64_t context_at = stage(contexts.data(), contexts.size());
    const uint64_t tables_at =
        stage(args.block_tables, uint64_t{args.num_seqs} * args.max_blocks_per_seq);
    KVF_RETURN_IF_ERROR(flush_staging());
    launch.item_row = staged<uint32_t>(row_at);
    launch.item_table = staged<uint32_t>(table_at);
    launch.item_context = staged<uint32_t>(context_at);
    launch.block_tables = staged<uint32_t>(tables_at);
    launch.layer = args.layer;
    launch.query = args.query;
    launch.query_dtype = args.query_dtype;
    launch.output = args.output;
    launch.num_q_heads = args.num_q_heads;
    launch.softmax_scale = args.softmax_scale;
    launch.num_items = static_cast<uint32_t>(rows.size());
    launch.max_context = max_context;
    launch.max_blocks_per_seq = args.max_blocks_per_seq;
    return run_attention(pool, launch, "paged_prefill_attention");
  }

  Status copy_blocks(std::span<const GroupBlockCopies> batch) override {
    KVF_RETURN_IF_ERROR(detail::validate_block_copies(batch));
    for (const GroupBlockCopies& group : batch) {
      KVF_RETURN_IF_ERROR(run_block_moves(group.pool, group.pool, group.copies, "copy_blocks"));
    }
    return ok_status();
  }

  Status swap_blocks(const PagedKvView& src, const PagedKvView& dst,
                     std::span<const BlockMove> moves) override {
    KVF_RETURN_IF_ERROR(detail::validate_swap(src, dst, moves));
    return run_block_moves(src, dst, moves, "swap_blocks");
  }

  Status compact_tokens(std::span<const GroupTokenCopies> batch) override {
    KVF_RETURN_IF_ERROR(detail::validate_token_copies(batch));
    for (const GroupTokenCopies& group : batch) {
      // In order, each like memmove: the copies of one launch run at once, so one that touches
      // a block an earlier copy of the launch writes, or writes a block it reads, waits for the
      // next launch.
      size_t first = 0;
      for (const size_t last : detail::token_copy_launches(group.copies)) {
        begin_staging();
        const uint64_t ops = stage(group.copies.data() + first, last - first);
        KVF_RETURN_IF_ERROR(flush_staging());
        KVF_RETURN_IF_ERROR(
            check(kernels::launch_token_copies(group.read_pool(), group.pool,
                                               staged<TokenCopy>(ops),
                                               static_cast<uint32_t>(last - first), stream_),
                  "compact_tokens"));
        first = last;
      }
    }
    return ok_status();
  }

 private:
  explicit CudaBackend(const CudaBackendOptions& options) : options_(options) {}

  Status init() {
    KVF_RETURN_IF_ERROR(check(cudaSetDevice(options_.device), "cudaSetDevice"));
    cudaDeviceProp prop{};
    KVF_RETURN_IF_ERROR(
        check(cudaGetDeviceProperties(&prop, options_.device), "cudaGetDeviceProperties"));
    name_ = std::string("cuda:") + std::to_string(options_.device) + " " + prop.name;
    KVF_RETURN_IF_ERROR(
        check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate"));
    for (cudaEvent_t& e : staged_) {
      KVF_RETURN_IF_ERROR(
          check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate"));
    }
    KVF_RETURN_IF_ERROR(check(cudaMalloc(&flag_device_, sizeof(unsigned long long)), "cudaMalloc"));
    KVF_RETURN_IF_ERROR(
        check(cudaHostAlloc(&flag_host_, sizeof(unsigned long long), cudaHostAllocDefault),
              "cudaHostAlloc"));
    KVF_LOG_INFO(kBackend, "{} ready", name_);
    return ok_status();
  }

  std::string where() const { return name_; }

  Status check(cudaError_t err, std::string_view what) const {
    if (err == cudaSuccess) return ok_status();
    cudaGetLastError();
    return Status(ErrorCode::kInternal,
                  where() + ": " + std::string(what) + ": " + cudaGetErrorString(err));
  }

  // The kernels read rows in 8-element steps and integer groups by power-of-two lane groups.
  Status check_shape(const PagedKvView& pool, std::string_view op) const {
    if (pool.head_dim % 8 != 0 || pool.head_dim > 256) {
      return Status(ErrorCode::kUnimplemented,
                    where() + ": " + std::string(op) + ": head_dim " +
                        std::to_string(pool.head_dim) +
                        " (the CUDA kernels take multiples of 8 up to 256)");
    }
    const uint32_t g = pool.group_size;
    if (is_integer_quantized(pool.dtype) && (g < 8 || g > 256 || (g & (g - 1)) != 0)) {
      return Status(ErrorCode::kUnimplemented, where() + ": " + std::string(op) +
                                                   ": quant group_size " + std::to_string(g) +
                                                   " (the CUDA kernels take powers of two 8..256)");
    }
    return ok_status();
  }

  Status check_attention_shape(const PagedKvView& pool, uint32_t num_q_heads,
                               std::string_view op) const {
    KVF_RETURN_IF_ERROR(check_shape(pool, op));
    if (pool.head_dim != 64 && pool.head_dim != 128 && pool.head_dim != 256) {
      return Status(ErrorCode::kUnimplemented,
                    where() + ": " + std::string(op) + ": no attention kernel for head_dim " +
                        std::to_string(pool.head_dim) + " (compiled: 64, 128, 256)");
    }
    if (num_q_heads / pool.num_kv_heads > kernels::kMaxGroup) {
      return Status(ErrorCode::kUnimplemented,
                    where() + ": " + std::string(op) + ": " +
                        std::to_string(num_q_heads / pool.num_kv_heads) +
                        " query heads per KV head (the kernels take up to 8)");
    }
    return ok_status();
  }

  // Kernels can only dereference device, managed or mapped pinned memory; a pageable host pointer
  // would fault on the GPU, so it is refused here with the argument's name.
  Status check_device_memory(const void* p, std::string_view what) const {
    if (p == nullptr) return ok_status();
    cudaPointerAttributes attr{};
    const cudaError_t err = cudaPointerGetAttributes(&attr, p);
    if (err != cudaSuccess) cudaGetLastError();
    if (err != cudaSuccess || attr.type == cudaMemoryTypeUnregistered ||
        (attr.type == cudaMemoryTypeHost && attr.devicePointer == nullptr)) {
      return invalid_argument(where() + ": " + std::string(what) +
                              " is not GPU-accessible memory (allocate it with the backend's "
                              "allocate_arena and fill it with upload)");
    }
    return ok_status();
  }

  // `n` elements of [token][heads][head_dim] rows, each finite and (for K/V) storable in a pool
  // of `pool_dtype` (quant::unstorable_abs_bits; f32: finite is enough). Waits for the answer.
  Status check_finite(const void* data, DType dtype, uint64_t n, uint32_t heads,
                      uint32_t head_dim, std::string_view what, DType pool_dtype = DType::kF32) {
    const uint32_t abs_bits = quant::unstorable_abs_bits(pool_dtype);
    KVF_RETURN_IF_ERROR(
        check(cudaMemsetAsync(flag_device_, 0xFF, sizeof(unsigned long long), stream_), what));
    KVF_RETURN_IF_ERROR(
        check(kernels::launch_find_unstorable(data, dtype, n, abs_bits, flag_device_, stream_),
              what));
    KVF_RETURN_IF_ERROR(check(cudaMemcpyAsync(flag_host_, flag_device_, sizeof(unsigned long long),
                                              cudaMemcpyDeviceToHost, stream_),
                              what));
    KVF_RETURN_IF_ERROR(check(cudaStreamSynchronize(stream_), what));
    const unsigned long long bad = *flag_host_;
    if (bad == ~0ull) return ok_status();
    const uint64_t row = bad / head_dim;
    return invalid_argument(std::string(what) + "[token " + std::to_string(row / heads) +
                            ", head " + std::to_string(row % heads) + ", dim " +
                            std::to_string(bad % head_dim) + "] is not finite (NaN or Inf)" +
                            (abs_bits == quant::unstorable_abs_bits(DType::kF32)
                                 ? std::string()
                                 : " or too large for " + std::string(dtype_name(pool_dtype)) +
                                       " KV"));
  }

  Status run_attention(const PagedKvView& pool, kernels::AttentionLaunch& launch,
                       std::string_view op) {
    const uint64_t floats =
        kernels::attention_workspace_floats(pool, launch, launch.mass != nullptr);
    KVF_RETURN_IF_ERROR(ensure(&workspace_, &workspace_bytes_, floats * sizeof(float)));
    launch.workspace = static_cast<float*>(workspace_);
    return check(kernels::launch_attention(pool, launch, stream_), op);
  }

  Status run_block_moves(const PagedKvView& src, const PagedKvView& dst,
                         std::span<const BlockMove> moves, std::string_view op) {
    // In list order: the moves of one launch run at once, so one that conflicts with an earlier
    // move of the launch (detail::block_move_launches) waits for the next launch.
    size_t first = 0;
    std::vector<kernels::BlockCopyOp> ops;
    for (const size_t last : detail::block_move_launches(moves, src.base == dst.base)) {
      ops.clear();
      for (const BlockMove& m : moves.subspan(first, last - first)) {
        ops.push_back({src.block(m.src_block), dst.block(m.dst_block)});
      }
      begin_staging();
      const uint64_t device_ops = stage(ops.data(), ops.size());
      KVF_RETURN_IF_ERROR(flush_staging());
      KVF_RETURN_IF_ERROR(check(
          kernels::launch_copy_blocks(staged<kernels::BlockCopyOp>(device_ops),
                                      static_cast<uint32_t>(ops.size()), src.block_bytes, stream_),
          op));
      first = last;
    }
    return ok_status();
  }

  Status ensure(void** buffer, uint64_t* capacity, uint64_t bytes) {
    if (bytes <= *capacity) return ok_status();
    if (*buffer != nullptr) {
      KVF_RETURN_IF_ERROR(check(cudaStreamSynchronize(stream_), "workspace"));  // in use until now
      cudaFree(*buffer);
      *buffer = nullptr;
      *capacity = 0;
    }
    const uint64_t grown = std::max<uint64_t>(bytes, 2 * *capacity);
    KVF_RETURN_IF_ERROR(check(cudaMalloc(buffer, grown), "workspace allocation"));
    *capacity = grown;
    return ok_status();
  }

  // Metadata staging: the pieces of one call are packed into a pinned buffer and uploaded in one
  // copy. Two pinned buffers alternate, each refilled only after its previous upload ran; the
  // device buffer is reused in stream order.
  void begin_staging() {
    current_ = 1 - current_;
    cudaEventSynchronize(staged_[current_]);
    pieces_.clear();
    staged_bytes_ = 0;
  }

  //! Queues `count` elements for upload; returns their offset in the staged buffer.
  template <typename T>
  uint64_t stage(const T* data, uint64_t count) {
    const uint64_t offset = (staged_bytes_ + 255) / 256 * 256;
    pieces_.push_back({reinterpret_cast<const uint8_t*>(data), count * sizeof(T), offset});
    staged_bytes_ = offset + count * sizeof(T);
    return offset;
  }

  Status flush_staging() {
    if (staged_bytes_ > staging_bytes_[current_]) {
      if (staging_[current_] != nullptr) cudaFreeHost(staging_[current_]);
      staging_[current_] = nullptr;
      const uint64_t grown = std::max<uint64_t>(staged_bytes_, 2 * staging_bytes_[current_]);
      KVF_RETURN_IF_ERROR(check(
          cudaHostAlloc(reinterpret_cast<void**>(&staging_[current_]), grown, cudaHostAllocDefault),
          "staging allocation"));
      staging_bytes_[current_] = grown;
    }
    KVF_RETURN_IF_ERROR(ensure(&meta_device_, &meta_bytes_, staged_bytes_));
    for (const Piece& piece : pieces_)
      std::memcpy(staging_[current_] + piece.offset, piece.data, piece.bytes);
    KVF_RETURN_IF_ERROR(check(cudaMemcpyAsync(meta_device_, staging_[current_], staged_bytes_,
                                              cudaMemcpyHostToDevice, stream_),
                              "metadata upload"));
    return check(cudaEventRecord(staged_[current_], stream_), "metadata upload");
  }

  //! The device address of a piece staged at `offset` (valid after flush_staging).
  template <typename T>
  const T* staged(uint64_t offset) const {
    return reinterpret_cast<const T*>(static_cast<const uint8_t*>(meta_device_) + offset);
  }

  struct Piece {
    const uint8_t* data;
    uint64_t bytes;
    uint64_t offset;
  };

  CudaBackendOptions options_;
  std::string name_;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t staged_[2] = {nullptr, nullptr};
  uint8_t* staging_[2] = {nullptr, nullptr};
  uint64_t staging_bytes_[2] = {0, 0};
  int current_ = 0;
  std::vector<Piece> pieces_;
  uint64_t staged_bytes_ = 0;
  void* meta_device_ = nullptr;
  uint64_t meta_bytes_ = 0;
  void* workspace_ = nullptr;
  uint64_t workspace_bytes_ = 0;
  unsigned long long* flag_device_ = nullptr;
  unsigned long long* flag_host_ = nullptr;
};

}  // namespace

Result<std::unique_ptr<Backend>> make_cuda_backend(const CudaBackendOptions& options) {
  return CudaBackend::create(options);
}

bool cuda_backend_built() {
  return true;
}

Result<std::vector<CudaDeviceInfo>> cuda_devices() {
  KVF_ASSIGN_OR_RETURN(const std::vector<kernels::DeviceInfo> found, kernels::list_devices());
  std::vector<CudaDeviceInfo> devices;
  for (const kernels::DeviceInfo& d : found) {
    devices.push_back(CudaDeviceInfo{d.ordinal, d.name, d.memory_bytes});
  }
  return devices;
}

}  // namespace kvfabric
