#include "kvfabric/runtime/mpi_job.h"

#include <fmt/format.h>

#include <cstdlib>

#include "kvfabric/backend/cuda_backend.h"
#include "kvfabric/runtime/staged_transport.h"
#include "kvfabric/transport/nccl_transport.h"

namespace kvfabric {
namespace {

constexpr RankId kRoot{0};
// What a rank reports in an agreement for a stage it could not get through.
constexpr uint64_t kStageFailed = 0;

std::string rank_list(const std::vector<int>& ranks) {
  return fmt::format("{}", fmt::join(ranks, ", "));
}

}  // namespace

bool under_mpi_launcher() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"}) {
    if (std::getenv(var) != nullptr) return true;
  }
  return false;
}

Result<std::unique_ptr<MpiJob>> MpiJob::launch(const Config& config) {
  if (!under_mpi_launcher() || !mpi_transport_built()) return std::unique_ptr<MpiJob>();
  KVF_ASSIGN_OR_RETURN(MpiRuntime runtime, MpiRuntime::init(nullptr, nullptr));
  std::unique_ptr<MpiJob> job(new MpiJob(std::move(runtime)));
  KVF_ASSIGN_OR_RETURN(job->host_transport_, make_mpi_transport(job->mpi_));
  // The rank count is agreed like the placement: a rank whose own config (its KVF_TOPOLOGY_*)
  // gives another count must not return alone, since the others would wait for it in the
  // agreement and its MPI_Finalize would wait for them, without a word from either.
  const uint32_t world = config.topology.dp * config.topology.tp;
  const Status mine =
      job->mpi_.world_size() != static_cast<int>(world)
          ? invalid_argument(fmt::format("{}: dp {} x tp {} needs {} MPI ranks, this job has {}",
                                         job->who(), config.topology.dp, config.topology.tp,
                                         world, job->mpi_.world_size()))
          : job->place_this_rank(config.runtime);
  KVF_RETURN_IF_ERROR(job->agree_on_placement(mine));
  KVF_RETURN_IF_ERROR(job->agree("start their transport", job->make_transport(), 0));
  return job;
}

Status MpiJob::place_this_rank(const RuntimeConfig& runtime) {
  KVF_ASSIGN_OR_RETURN(placement_, place_rank(runtime, observe_process(), who()));
  if (placement_.backend == BackendKind::kCpu) {
    // One thread per rank: the ranks of a host share its cores.
    KVF_ASSIGN_OR_RETURN(backend_, make_cpu_backend(CpuBackendOptions{best_cpu_isa(), 1}));
    return ok_status();
  }
  auto backend = make_cuda_backend(CudaBackendOptions{.device = placement_.device});
  KVF_RETURN_IF_ERROR(on_device("the CUDA backend", backend.status()));
  backend_ = std::move(*backend);
  return ok_status();
}

Status MpiJob::on_device(std::string_view what, const Status& status) const {
  if (status.ok()) return status;
  return Status(status.code(), fmt::format("{}: {} on device {} ({}) did not start: {}", who(),
                                           what, placement_.device, placement_.device_name,
                                           status.message()));
}

// Collective: every rank learns whether every other one got through start-up stage `stage`. When
// one did not, every rank fails naming it (its own message says why), so none waits for it in a
// later collective or in MPI_Finalize. On success, every rank's `value`, in rank order.
Result<std::vector<uint64_t>> MpiJob::agree(std::string_view stage, const Status& mine,
                                            uint64_t value) {
  std::vector<uint64_t> values;
  KVF_RETURN_IF_ERROR(host_transport_->all_gather(mine.ok() ? value + 1 : kStageFailed, values));
  KVF_RETURN_IF_ERROR(mine);
  std::vector<int> failed;
  for (size_t r = 0; r < values.size(); ++r) {
    if (values[r] == kStageFailed) failed.push_back(static_cast<int>(r));
    --values[r];
  }
  if (!failed.empty()) {
    return Status(ErrorCode::kUnavailable,
                  fmt::format("{}: the job cannot start: rank(s) {} could not {} (their own "
                              "messages say why)",
                              who(), rank_list(failed), stage));
  }
  return values;
}

// Every rank learns what every other one got before any of them waits on a device transport's
// setup: the ranks must agree on the transport, and on the backend, so that a node that does not
// see its GPUs (a wrong CUDA_VISIBLE_DEVICES) is not left on the CPU without a word.
Status MpiJob::agree_on_placement(const Status& mine) {
  const uint64_t choice = static_cast<uint64_t>(placement_.backend) << 8 |
                          static_cast<uint64_t>(placement_.transport);
  KVF_ASSIGN_OR_RETURN(const std::vector<uint64_t> choices,
                       agree("place themselves", mine, choice));
  for (const auto& [what, shift] : {std::pair{"backends", 8}, std::pair{"transports", 0}}) {
    std::vector<int> differ;
    for (size_t r = 0; r < choices.size(); ++r) {
      if ((choices[r] >> shift & 0xFF) != (choices[0] >> shift & 0xFF)) {
        differ.push_back(static_cast<int>(r));
      }
    }
    if (differ.empty()) continue;
    return invalid_argument(fmt::format(
        "{}: the ranks chose different {} (rank 0 and rank(s) {} differ: some see a GPU, others "
        "not); set runtime.backend and runtime.transport explicitly",
        who(), what, rank_list(differ)));
  }
  return ok_status();
}

Status MpiJob::make_transport() {
  transport_ = host_transport_.get();
  if (placement_.transport == TransportKind::kNccl) {
    auto nccl = make_nccl_transport(*host_transport_, NcclTransportOptions{placement_.device});
    KVF_RETURN_IF_ERROR(on_device("the NCCL transport", nccl.status()));
    gpu_transport_ = std::move(*nccl);
  } else if (placement_.staged()) {
    auto staged = make_host_staged_transport(*host_transport_, *backend_);
    KVF_RETURN_IF_ERROR(on_device("the staged transport", staged.status()));
    gpu_transport_ = std::move(*staged);
  }
  if (gpu_transport_) transport_ = gpu_transport_.get();
  return ok_status();
}

Status MpiJob::start(const Config& config) {
  ranks_.reset();  // its arenas go before the next ones are allocated
  KVF_ASSIGN_OR_RETURN(ranks_, RankJob::create(config, *transport_, *backend_));
  return ok_status();
}

std::string MpiJob::who() const {
  return host_transport_->describe(host_transport_->rank());
}

Result<std::vector<std::string>> MpiJob::gather_placements() {
  const std::string mine = placement_.describe();
  std::vector<std::vector<uint8_t>> all;
  KVF_RETURN_IF_ERROR(host_transport_->gather(
      std::span(reinterpret_cast<const uint8_t*>(mine.data()), mine.size()), kRoot, all));
  std::vector<std::string> described;
  for (const std::vector<uint8_t>& bytes : all) described.emplace_back(bytes.begin(), bytes.end());
  return described;
}

}  // namespace kvfabric
