// The NCCL device transport: pack (one launch), one NCCL group of sends and receives, unpack
// (one launch), all on the transport's stream, then one stream synchronization.
#include "kvfabric/transport/nccl_transport.h"

#include <cuda_runtime.h>
#include <nccl.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <string>
#include <vector>

#include "api.h"
#include "kvfabric/transport/host_controlled_transport.h"
#include "common/log.h"
#include "transport/batch_check.h"

namespace kvfabric {
namespace {

using detail::align_up;
using detail::kStagingGranule;
using detail::kStagingRegionAlign;

// FNV-1a of the host name: ranks with equal hashes share a host (and its GPUs).
uint64_t host_hash() {
  char name[256] = {};
  gethostname(name, sizeof(name) - 1);
  uint64_t h = 14695981039346656037ull;
  for (const char* p = name; *p != '\0'; ++p) {
    h ^= static_cast<unsigned char>(*p);
    h *= 1099511628211ull;
  }
  return h;
}

// Device memory that grows on demand and is freed on destruction.
struct DeviceBuffer {
  uint8_t* data = nullptr;
  uint64_t capacity = 0;
};

class NcclTransport final : public HostControlledTransport {
 public:
  static Result<std::unique_ptr<Transport>> create(Transport& bootstrap,
                                                   const NcclTransportOptions& options) {
    auto t = std::unique_ptr<NcclTransport>(new NcclTransport(bootstrap));
    const int world = bootstrap.world_size();

    // Every rank learns its device and prepares its stream; then all ranks agree on whether all
    // succeeded before the collective NCCL setup, so a rank without a GPU fails every rank
    // rather than leaving the others waiting in ncclCommInitRank.
    std::vector<uint64_t> hosts;
    KVF_RETURN_IF_ERROR(bootstrap.all_gather(host_hash(), hosts));
    int local_rank = 0;
    for (int r = 0; r < t->rank_.value; ++r)
      if (hosts[r] == hosts[t->rank_.value]) ++local_rank;
    const Status local = t->init_device(options, local_rank);
    KVF_RETURN_IF_ERROR(agree(bootstrap, local, "CUDA device setup"));

    // Rank 0 makes the unique id; an empty broadcast tells the others it could not.
    std::vector<uint8_t> id_bytes;
    Status id_status;
    if (t->rank_.value == 0) {
      ncclUniqueId id;
      id_status = t->check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
      if (id_status.ok()) {
        id_bytes.assign(reinterpret_cast<const uint8_t*>(&id),
                        reinterpret_cast<const uint8_t*>(&id) + sizeof(id));
      }
    }
    KVF_RETURN_IF_ERROR(bootstrap.broadcast(id_bytes, RankId{0}));
    if (id_bytes.size() != sizeof(ncclUniqueId)) {
      if (!id_status.ok()) return id_status;
      return Status(ErrorCode::kInternal, t->who_ +
                                              ": R0 could not create the NCCL unique id "
                                              "(received " +
                                              std::to_string(id_bytes.size()) + " bytes)");
    }
    ncclUniqueId id;
    std::memcpy(&id, id_bytes.data(), sizeof(id));
    const Status init =
        t->check_nccl(ncclCommInitRank(&t->comm_, world, id, t->rank_.value), "ncclCommInitRank");
    KVF_RETURN_IF_ERROR(agree(bootstrap, init, "ncclCommInitRank"));
    KVF_LOG_INFO(kTransport, "{}: NCCL {} communicator of {} ranks", t->who_, NCCL_VERSION_CODE,
                 world);
    return std::unique_ptr<Transport>(std::move(t));
  }

  ~NcclTransport() override {
    if (device_ >= 0) cudaSetDevice(device_);
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    if (comm_ != nullptr) ncclCommDestroy(comm_);
    for (DeviceBuffer* b : {&send_staging_, &recv_staging_, &ops_device_})
      if (b->data != nullptr) cudaFree(b->data);
    if (ops_host_ != nullptr) cudaFreeHost(ops_host_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  // Every control call is the bootstrap's (HostControlledTransport): set_timeout bounds those
  // host-side calls, and exchange_blocks waits for its CUDA stream without a bound.
  std::string_view name() const override { return "nccl"; }

  Status exchange_blocks(std::span<const BlockBatch> sends,
                         std::span<const BlockBatch> recvs) override {
    KVF_RETURN_IF_ERROR(detail::check_exchange(who_, rank_, world_, sends, recvs));
    KVF_RETURN_IF_ERROR(check_memory(sends, true));
    KVF_RETURN_IF_ERROR(check_memory(recvs, false));

    // Staging layout: batch after batch, each region aligned, blocks back to back in it.
    std::vector<uint64_t> send_at(sends.size()), recv_at(recvs.size());
    uint64_t send_total = 0, recv_total = 0, send_blocks = 0, recv_blocks = 0;
    uint64_t send_max = 0, recv_max = 0;
    for (size_t i = 0; i < sends.size(); ++i) {
      send_at[i] = send_total;
      send_total += align_up(detail::batch_bytes(sends[i]), kStagingRegionAlign);
      send_blocks += sends[i].blocks.size();
      if (!sends[i].blocks.empty()) send_max = std::max(send_max, sends[i].block_bytes);
    }
    for (size_t i = 0; i < recvs.size(); ++i) {
      recv_at[i] = recv_total;
      recv_total += align_up(detail::batch_bytes(recvs[i]), kStagingRegionAlign);
      recv_blocks += recvs[i].blocks.size();
      if (!recvs[i].blocks.empty()) recv_max = std::max(recv_max, recvs[i].block_bytes);
    }
    if (send_blocks > INT_MAX || recv_blocks > INT_MAX) {  // one CTA row per block
      return invalid_argument(who_ + ": " + std::to_string(std::max(send_blocks, recv_blocks)) +
                              " blocks in one exchange (at most 2^31 - 1 each way)");
    }
    if (send_blocks + recv_blocks == 0) return ok_status();
    KVF_RETURN_IF_ERROR(check_cuda(cudaSetDevice(device_), "cudaSetDevice"));
    KVF_RETURN_IF_ERROR(reserve(send_staging_, send_total, "send staging"));
    KVF_RETURN_IF_ERROR(reserve(recv_staging_, recv_total, "receive staging"));
    const uint64_t ops = send_blocks + recv_blocks;
    KVF_RETURN_IF_ERROR(reserve(ops_device_, ops * sizeof(kernels::SpanCopy), "copy table"));
    KVF_RETURN_IF_ERROR(reserve_host_ops(ops));

    // The copy table: packs first, then unpacks; uploaded in one copy.
    kernels::SpanCopy* op = ops_host_;
    for (size_t b = 0; b < sends.size(); ++b) {
      uint8_t* region = send_staging_.data + send_at[b];
      for (size_t i = 0; i < sends[b].blocks.size(); ++i)
        *op++ = {sends[b].blocks[i], region + i * sends[b].block_bytes, sends[b].block_bytes};
    }
    for (size_t b = 0; b < recvs.size(); ++b) {
      const uint8_t* region = recv_staging_.data + recv_at[b];
      for (size_t i = 0; i < recvs[b].blocks.size(); ++i)
        *op++ = {region + i * recvs[b].block_bytes, recvs[b].blocks[i], recvs[b].block_bytes};
    }
    auto* ops_device = reinterpret_cast<kernels::SpanCopy*>(ops_device_.data);
    auto enqueue = [&]() -> Status {
      KVF_RETURN_IF_ERROR(
          check_cuda(cudaMemcpyAsync(ops_device, ops_host_, ops * sizeof(kernels::SpanCopy),
                                     cudaMemcpyHostToDevice, stream_),
                     "upload of the copy table"));
      KVF_RETURN_IF_ERROR(
          check_cuda(kernels::launch_span_copies(ops_device, static_cast<uint32_t>(send_blocks),
                                                 send_max, stream_),
                     "pack of " + std::to_string(send_blocks) + " blocks"));

      // One group: NCCL pairs the i-th send to a peer with the peer's i-th receive from us.
      KVF_RETURN_IF_ERROR(check_nccl(ncclGroupStart(), "ncclGroupStart"));
      Status posted = ok_status();
      for (size_t b = 0; b < recvs.size() && posted.ok(); ++b) {
        if (recvs[b].blocks.empty()) continue;
        posted = check_nccl(ncclRecv(recv_staging_.data + recv_at[b], detail::batch_bytes(recvs[b]),
                                     ncclUint8, recvs[b].peer.value, comm_, stream_),
                            "ncclRecv of " + detail::describe_batch(false, b, recvs[b]));
      }
      for (size_t b = 0; b < sends.size() && posted.ok(); ++b) {
        if (sends[b].blocks.empty()) continue;
        posted = check_nccl(ncclSend(send_staging_.data + send_at[b], detail::batch_bytes(sends[b]),
                                     ncclUint8, sends[b].peer.value, comm_, stream_),
                            "ncclSend of " + detail::describe_batch(true, b, sends[b]));
      }
      const Status ended = check_nccl(ncclGroupEnd(), "ncclGroupEnd");
      KVF_RETURN_IF_ERROR(posted);
      KVF_RETURN_IF_ERROR(ended);

      KVF_RETURN_IF_ERROR(check_cuda(
          kernels::launch_span_copies(ops_device + send_blocks, static_cast<uint32_t>(recv_blocks),
                                      recv_max, stream_),
          "unpack of " + std::to_string(recv_blocks) + " blocks"));
      return ok_status();
    };
    const Status enqueued = enqueue();
    // NOTE: the one host-device synchronization: the exchange is complete on return. Also after
    // a failed enqueue, so nothing queued outlives the call (the next call rewrites the table).
    const cudaError_t sync = cudaStreamSynchronize(stream_);
    KVF_RETURN_IF_ERROR(enqueued);
    if (sync != cudaSuccess) {
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      cudaGetLastError();
      return Status(
          ErrorCode::kInternal,
          who_ + ": exchange of " + std::to_string(send_blocks) + " sent and " +
              std::to_string(recv_blocks) + " received blocks failed: " + cudaGetErrorString(sync) +
              (async != ncclSuccess ? std::string("; NCCL: ") + ncclGetErrorString(async) + " (" +
                                          ncclGetLastError(comm_) + ")"
                                    : std::string()));
    }
    return ok_status();
  }

 private:
  explicit NcclTransport(Transport& bootstrap)
      : HostControlledTransport(bootstrap),
        rank_(bootstrap.rank()),
        world_(bootstrap.world_size()) {
    who_ = "nccl transport " + to_string(rank_);
  }

  // Collective: every rank passes its own outcome of `step`. All ranks return OK when all
  // succeeded; otherwise a failed rank returns its own error and the others one naming the
  // failed ranks (with the first failed rank's code).
  static Status agree(Transport& bootstrap, const Status& local, std::string_view step) {
    std::vector<uint64_t> codes;
    KVF_RETURN_IF_ERROR(bootstrap.all_gather(static_cast<uint64_t>(local.code()), codes));
    std::string failed;
    ErrorCode first = ErrorCode::kOk;
    for (size_t r = 0; r < codes.size(); ++r) {
      if (codes[r] == static_cast<uint64_t>(ErrorCode::kOk)) continue;
      failed += (failed.empty() ? "R" : ", R") + std::to_string(r);
      if (first == ErrorCode::kOk) first = static_cast<ErrorCode>(codes[r]);
    }
    if (failed.empty()) return ok_status();
    if (!local.ok())
      return Status(local.code(), local.message() + " (failed ranks: " + failed + ")");
    return Status(first, "nccl transport " + to_string(bootstrap.rank()) + ": " +
                             std::string(step) + " failed on " + failed);
  }

  Status init_device(const NcclTransportOptions& options, int local_rank) {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
      cudaGetLastError();
      return Status(ErrorCode::kUnavailable,
                    who_ + ": no usable CUDA device: " +
                        (err != cudaSuccess ? cudaGetErrorString(err) : "none visible"));
    }
    const int device = options.device >= 0 ? options.device : local_rank % count;
    if (device >= count) {
      return invalid_argument(who_ + ": CUDA device " + std::to_string(device) +
                              " does not exist (" + std::to_string(count) + " visible)");
    }
    device_ = device;
    who_ += " (device " + std::to_string(device_) + ")";
    KVF_RETURN_IF_ERROR(check_cuda(cudaSetDevice(device_), "cudaSetDevice"));
    return check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                      "cudaStreamCreate");
  }

  // Blocks must be memory this rank's device can address: its own device memory, managed
  // memory, or pinned host memory (pageable host memory would fault in the pack kernel).
  Status check_memory(std::span<const BlockBatch> batches, bool send) const {
    for (size_t b = 0; b < batches.size(); ++b) {
      for (size_t i = 0; i < batches[b].blocks.size(); ++i) {
        const void* p = batches[b].blocks[i];
        cudaPointerAttributes attr{};
        const cudaError_t err = cudaPointerGetAttributes(&attr, p);
        bool usable = false;
        if (err == cudaSuccess) {
          usable = attr.type == cudaMemoryTypeManaged ||
                   (attr.type == cudaMemoryTypeDevice && attr.device == device_) ||
                   (attr.type == cudaMemoryTypeHost && attr.devicePointer == p);
        } else {
          cudaGetLastError();
        }
        if (!usable) {
          return invalid_argument(who_ + ": " + detail::describe_batch(send, b, batches[b]) +
                                  ": block " + std::to_string(i) + " is not memory device " +
                                  std::to_string(device_) + " can address (" +
                                  (err != cudaSuccess ? std::string(cudaGetErrorString(err))
                                   : attr.type == cudaMemoryTypeDevice
                                       ? "memory of device " + std::to_string(attr.device)
                                       : std::string("pageable host memory")) +
                                  ")");
        }
      }
    }
    return ok_status();
  }

  Status reserve(DeviceBuffer& buffer, uint64_t bytes, std::string_view what) {
    if (bytes <= buffer.capacity) return ok_status();
    const uint64_t capacity = align_up(bytes, kStagingGranule);
    if (buffer.data != nullptr) cudaFree(buffer.data);
    buffer.data = nullptr;
    buffer.capacity = 0;
    void* data = nullptr;
    const cudaError_t err = cudaMalloc(&data, capacity);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return Status(ErrorCode::kOutOfMemory,
                    who_ + ": cannot allocate " + std::to_string(capacity) + " bytes of " +
                        std::string(what) + ": " + cudaGetErrorString(err));
    }
    buffer.data = static_cast<uint8_t*>(data);
    buffer.capacity = capacity;
    return ok_status();
  }

  Status reserve_host_ops(uint64_t ops) {
    if (ops <= ops_host_capacity_) return ok_status();
    if (ops_host_ != nullptr) cudaFreeHost(ops_host_);
    ops_host_ = nullptr;
    ops_host_capacity_ = 0;
    const uint64_t capacity = std::max<uint64_t>(ops, 1024);
    void* data = nullptr;
    KVF_RETURN_IF_ERROR(
        check_cuda(cudaHostAlloc(&data, capacity * sizeof(kernels::SpanCopy), cudaHostAllocDefault),
                   "cudaHostAlloc of the copy table"));
    ops_host_ = static_cast<kernels::SpanCopy*>(data);
    ops_host_capacity_ = capacity;
    return ok_status();
  }

  Status check_cuda(cudaError_t err, std::string_view what) const {
    if (err == cudaSuccess) return ok_status();
    cudaGetLastError();
    return Status(ErrorCode::kInternal,
                  who_ + ": " + std::string(what) + ": " + cudaGetErrorString(err));
  }

  Status check_nccl(ncclResult_t res, std::string_view what) const {
    if (res == ncclSuccess) return ok_status();
    const char* last = comm_ != nullptr ? ncclGetLastError(comm_) : ncclGetLastError(nullptr);
    return Status(
        ErrorCode::kInternal,
        who_ + ": " + std::string(what) + ": " + ncclGetErrorString(res) +
            (last != nullptr && *last != '\0' ? std::string(" (") + last + ")" : std::string()));
  }

  RankId rank_;
  int world_ = 0;
  std::string who_;
  int device_ = -1;
  cudaStream_t stream_ = nullptr;
  ncclComm_t comm_ = nullptr;
  DeviceBuffer send_staging_;
  DeviceBuffer recv_staging_;
  DeviceBuffer ops_device_;
  kernels::SpanCopy* ops_host_ = nullptr;  // pinned, so the upload is a true async copy
  uint64_t ops_host_capacity_ = 0;
};

}  // namespace

Result<std::unique_ptr<Transport>> make_nccl_transport(Transport& bootstrap,
                                                       const NcclTransportOptions& options) {
  return NcclTransport::create(bootstrap, options);
}

bool nccl_transport_built() {
  return true;
}

}  // namespace kvfabric
