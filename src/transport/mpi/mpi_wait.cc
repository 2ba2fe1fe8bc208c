#include "transport/mpi/mpi_wait.h"

#include <algorithm>
#include <thread>

namespace kvfabric::detail {
namespace {

constexpr uint32_t kSpinningPolls = 64;
constexpr std::chrono::microseconds kFirstSleep{16}, kLongestSleep{512};

// Sent by every ping and pong; MPI only reads it.
const uint8_t kLivenessByte = 1;

}  // namespace

MpiPoller::MpiPoller(MPI_Comm comm, std::optional<std::chrono::milliseconds> timeout, Pace pace)
    : comm_(comm), pace_(pace) {
  if (!timeout) return;
  // A deadline past what the clock can count is none at all: adding it would overflow (and
  // every wait would then fail at once).
  const Clock::time_point now = Clock::now();
  const auto headroom = std::chrono::duration_cast<std::chrono::milliseconds>(
      Clock::time_point::max() - now);
  if (*timeout < headroom) deadline_ = now + *timeout;
}

void MpiPoller::pause() {
  answer_pings(comm_);
  if (pace_ == Pace::kBusy) {
    std::this_thread::yield();  // lets an oversubscribed peer on this core run
    return;
  }
  if (++polls_ <= kSpinningPolls) return;
  const uint32_t doublings = std::min<uint32_t>(polls_ - kSpinningPolls, 5);
  std::this_thread::sleep_for(std::min(kFirstSleep * (1u << doublings), kLongestSleep));
}

void answer_pings(MPI_Comm comm) {
  while (true) {
    int arrived = 0;
    MPI_Status status;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kPingTag, comm, &arrived, &status) != MPI_SUCCESS || !arrived) {
      return;
    }
    uint8_t ping = 0;
    MPI_Recv(&ping, 1, MPI_BYTE, status.MPI_SOURCE, kPingTag, comm, MPI_STATUS_IGNORE);
    // A one-byte send completes on its own (eagerly): the request is freed, not waited for.
    MPI_Request pong = MPI_REQUEST_NULL;
    if (MPI_Isend(&kLivenessByte, 1, MPI_BYTE, status.MPI_SOURCE, kPongTag, comm, &pong) ==
        MPI_SUCCESS) {
      MPI_Request_free(&pong);
    }
  }
}

std::vector<int> unresponsive(MPI_Comm comm, std::span<const int> peers,
                              std::chrono::milliseconds grace) {
  std::vector<MPI_Request> pongs(peers.size(), MPI_REQUEST_NULL);
  std::vector<uint8_t> replies(peers.size(), 0);
  for (size_t i = 0; i < peers.size(); ++i) {
    MPI_Request ping = MPI_REQUEST_NULL;
    if (MPI_Isend(&kLivenessByte, 1, MPI_BYTE, peers[i], kPingTag, comm, &ping) == MPI_SUCCESS) {
      MPI_Request_free(&ping);
    }
    MPI_Irecv(&replies[i], 1, MPI_BYTE, peers[i], kPongTag, comm, &pongs[i]);
  }
  std::vector<bool> answered(peers.size(), false);
  MpiPoller poller(comm, grace, MpiPoller::Pace::kIdle);
  size_t waiting = peers.size();
  while (waiting > 0 && !poller.expired()) {
    for (size_t i = 0; i < peers.size(); ++i) {
      int done = 0;
      if (answered[i] || MPI_Test(&pongs[i], &done, MPI_STATUS_IGNORE) != MPI_SUCCESS || !done) {
        continue;
      }
      answered[i] = true;
      --waiting;
    }
    if (waiting > 0) poller.pause();  // answers pings too: two ranks may probe each other
  }
  std::vector<int> silent;
  for (size_t i = 0; i < peers.size(); ++i) {
    if (answered[i]) continue;
    silent.push_back(peers[i]);
    // The pong may never come: the receive is withdrawn (cancelling a receive completes at once)
    // before its buffer goes.
    MPI_Cancel(&pongs[i]);
    MPI_Wait(&pongs[i], MPI_STATUS_IGNORE);
  }
  return silent;
}

}  // namespace kvfabric::detail
