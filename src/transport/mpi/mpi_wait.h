// Waiting for MPI requests without spinning a core and without waiting for ever: polls with
// back-off, a deadline, and liveness pings that tell a rank that stopped from one that waits too.
#pragma once

#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace kvfabric::detail {

// Tags of the transport's own liveness messages on its communicator.
inline constexpr int kPingTag = 0x4b5a;
inline constexpr int kPongTag = 0x4b5b;

//! \brief One wait. Waits for data that is on its way (kBusy: block transfers, the body of a
//! broadcast) poll without sleeping, as MPI's blocking calls do, since each poll moves the data
//! along; waits for a message that may be long in coming (kIdle: the next plan) spin for a few
//! microseconds, then sleep for 16 us doubling to 512 us, so an idle rank costs a fraction of a
//! core and a message is still taken within a millisecond. Every poll also answers the liveness
//! pings of other ranks (answer_pings).
class MpiPoller {
 public:
  using Clock = std::chrono::steady_clock;
  enum class Pace : uint8_t { kBusy, kIdle };

  //! A wait on `comm` that gives up `timeout` from now (never without one).
  MpiPoller(MPI_Comm comm, std::optional<std::chrono::milliseconds> timeout, Pace pace);
  void set_pace(Pace pace) { pace_ = pace; }

  //! Answers pings, then pauses before the next poll.
  void pause();
  [[nodiscard]] bool expired() const { return deadline_ && Clock::now() >= *deadline_; }

 private:
  MPI_Comm comm_;
  std::optional<Clock::time_point> deadline_;
  Pace pace_;
  uint32_t polls_ = 0;
};

//! Answers every liveness ping that has arrived on `comm` (a one-byte message, answered with one).
void answer_pings(MPI_Comm comm);

//! Of `peers`, the ranks that do not answer a ping within `grace`: they have stopped or died;
//! the others are alive (typically waiting for the same ranks).
std::vector<int> unresponsive(MPI_Comm comm, std::span<const int> peers,
                              std::chrono::milliseconds grace);

}  // namespace kvfabric::detail
