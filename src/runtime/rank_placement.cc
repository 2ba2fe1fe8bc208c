#include "kvfabric/runtime/rank_placement.h"

#include <fmt/format.h>

#include <charconv>
#include <cstdlib>
#include <span>

#include "kvfabric/backend/cuda_backend.h"
#include "kvfabric/transport/nccl_transport.h"

namespace kvfabric {
namespace {

// The variables launchers set for a rank's index on its host, in the order they are trusted.
constexpr std::string_view kLocalRankVariables[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID",
                                                   "MPI_LOCALRANKID", "LOCAL_RANK"};

constexpr std::string_view kLocalSizeVariables[] = {"OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                                                   "SLURM_NTASKS_PER_NODE", "LOCAL_WORLD_SIZE"};

std::optional<uint32_t> parse_index(std::string_view text) {
  uint32_t value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || text.empty()) return std::nullopt;
  return value;
}

// What a message says about the GPUs this process sees.
std::string visible_devices_phrase(const ProcessView& view) {
  std::string phrase = view.devices.empty()
                           ? fmt::format("no CUDA device is visible ({})", view.no_device_reason)
                           : fmt::format("{} CUDA device(s) visible", view.devices.size());
  if (view.cuda_visible_devices) {
    phrase += fmt::format(", CUDA_VISIBLE_DEVICES={}", *view.cuda_visible_devices);
  }
  return phrase;
}

Result<BackendKind> resolve_backend(BackendKind asked, const ProcessView& view,
                                    std::string_view who) {
  if (asked == BackendKind::kCpu) return BackendKind::kCpu;
  if (asked == BackendKind::kAuto) {
    return view.cuda_built && !view.devices.empty() ? BackendKind::kCuda : BackendKind::kCpu;
  }
  if (!view.cuda_built) {
    return Status(ErrorCode::kUnimplemented,
                  fmt::format("{}: runtime.backend cuda, but kvfabric was built without CUDA", who));
  }
  if (view.devices.empty()) {
    return Status(ErrorCode::kUnavailable,
                  fmt::format("{}: runtime.backend cuda, but {}", who, visible_devices_phrase(view)));
  }
  return BackendKind::kCuda;
}

// Whether the host's ranks outnumber its devices, so that some must share one.
bool ranks_share_devices(const ProcessView& view) {
  return view.local_size && *view.local_size > view.devices.size();
}

Result<TransportKind> resolve_transport(TransportKind asked, BackendKind backend,
                                        const ProcessView& view, std::string_view who) {
  if (asked == TransportKind::kMpi) return TransportKind::kMpi;
  if (asked == TransportKind::kAuto) {
    return backend == BackendKind::kCuda && view.nccl_built && !ranks_share_devices(view)
               ? TransportKind::kNccl
               : TransportKind::kMpi;
  }
  if (backend != BackendKind::kCuda) {
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("{}: runtime.transport nccl moves GPU memory, but this rank runs on "
                              "the CPU backend ({})",
                              who, visible_devices_phrase(view)));
  }
  if (!view.nccl_built) {
    return Status(ErrorCode::kUnimplemented,
                  fmt::format("{}: runtime.transport nccl, but kvfabric was built without NCCL", who));
  }
  if (ranks_share_devices(view)) {
    return invalid_argument(fmt::format(
        "{}: runtime.transport nccl needs a device per rank, but {} ranks of this host share {} "
        "(NCCL refuses two ranks on one device): use runtime.transport mpi, or fewer ranks per host",
        who, *view.local_size, visible_devices_phrase(view)));
  }
  return TransportKind::kNccl;
}

Result<int> resolve_device(int32_t asked, const ProcessView& view, std::string_view who) {
  const auto visible = static_cast<uint32_t>(view.devices.size());
  if (asked == kLocalRankDevice) return static_cast<int>(view.local_rank.value_or(0) % visible);
  if (static_cast<uint32_t>(asked) >= visible) {
    return Status(ErrorCode::kInvalidArgument,
                  fmt::format("{}: runtime.device {} does not exist: {}", who, asked,
                              visible_devices_phrase(view)));
  }
  return asked;
}

// The first of `names` set in `env` to a number.
template <size_t N>
std::optional<uint32_t> first_number(const Environment& env, const std::string_view (&names)[N]) {
  for (std::string_view name : names) {
    const auto found = env.find(std::string(name));
    if (found == env.end()) continue;
    if (const auto number = parse_index(found->second)) return number;
  }
  return std::nullopt;
}

}  // namespace

std::optional<uint32_t> launcher_local_rank(const Environment& env) {
  return first_number(env, kLocalRankVariables);
}

std::optional<uint32_t> launcher_local_size(const Environment& env) {
  return first_number(env, kLocalSizeVariables);
}

ProcessView observe_process() {
  ProcessView view;
  view.cuda_built = cuda_backend_built();
  view.nccl_built = nccl_transport_built();
  if (auto devices = cuda_devices(); devices.ok()) {
    for (const CudaDeviceInfo& device : *devices) view.devices.push_back(device.name);
  } else {
    view.no_device_reason = devices.status().message();
  }
  Environment env;
  for (const auto& names : {std::span<const std::string_view>(kLocalRankVariables),
                            std::span<const std::string_view>(kLocalSizeVariables)}) {
    for (std::string_view name : names) {
      if (const char* value = std::getenv(std::string(name).c_str())) env[std::string(name)] = value;
    }
  }
  view.local_rank = launcher_local_rank(env);
  view.local_size = launcher_local_size(env);
  if (const char* visible = std::getenv("CUDA_VISIBLE_DEVICES")) {
    view.cuda_visible_devices = visible;
  }
  return view;
}

std::string RankPlacement::describe() const {
  if (backend == BackendKind::kCpu) return "cpu backend, mpi transport";
  return fmt::format("cuda backend on device {} ({}), {} transport{}", device, device_name,
                     transport_kind_name(transport),
                     staged() ? " (staged through pinned host memory)" : "");
}

Result<RankPlacement> place_rank(const RuntimeConfig& runtime, const ProcessView& view,
                                 std::string_view who) {
  RankPlacement placement;
  KVF_ASSIGN_OR_RETURN(placement.backend, resolve_backend(runtime.backend, view, who));
  KVF_ASSIGN_OR_RETURN(placement.transport,
                       resolve_transport(runtime.transport, placement.backend, view, who));
  if (placement.backend == BackendKind::kCuda) {
    KVF_ASSIGN_OR_RETURN(placement.device, resolve_device(runtime.device, view, who));
    placement.device_name = view.devices[static_cast<size_t>(placement.device)];
  }
  return placement;
}

}  // namespace kvfabric
