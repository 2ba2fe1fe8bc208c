// The MPI host transport: one derived-datatype message per peer, batch and direction, posted
// nonblocking and polled to completion (with back-off, a timeout and liveness pings: mpi_wait.h).
#include "kvfabric/transport/mpi_transport.h"

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "common/log.h"
#include "transport/batch_check.h"
#include "transport/mpi/mpi_error.h"
#include "transport/mpi/mpi_wait.h"

namespace kvfabric {
namespace {

constexpr int kBlockTag = 0x4b56;   // exchange_blocks messages
constexpr int kRawTag = 0x4b57;     // mpi_raw_transfer messages
constexpr int kGatherTag = 0x4b58;  // gather messages
// A rank that timed out asks the ranks it waited for whether they are alive for this long at most.
constexpr std::chrono::milliseconds kLivenessGrace{1000};
// Largest piece one MPI count describes here: datatypes above INT_MAX bytes are built from
// chunks of this size, and broadcasts and raw transfers are sent in pieces of it.
constexpr uint64_t kChunkBytes = uint64_t{1} << 30;

// Frees the MPI datatypes it holds when it goes out of scope.
class DatatypeList {
 public:
  DatatypeList() = default;
  DatatypeList(const DatatypeList&) = delete;
  DatatypeList& operator=(const DatatypeList&) = delete;
  ~DatatypeList() {
    for (MPI_Datatype& t : types_)
      if (t != MPI_DATATYPE_NULL) MPI_Type_free(&t);
  }
  void add(MPI_Datatype t) { types_.push_back(t); }

 private:
  std::vector<MPI_Datatype> types_;
};

// One posted message of an exchange.
struct Message {
  bool send;
  size_t batch;
  int peer;
  void* buffer;  // MPI_BOTTOM for a whole batch, a block's address for a per-block message
  MPI_Datatype type;
  uint64_t bytes;         // what the message should carry
  int64_t received = -1;  // receives: what the peer sent, when that differs
};

class MpiTransport final : public Transport {
 public:
  static Result<std::unique_ptr<Transport>> create(const MpiTransportOptions& options) {
    auto transport = std::unique_ptr<MpiTransport>(new MpiTransport(options));
    int rank = 0;
    // MPI_COMM_WORLD keeps the application's error handler, so MPI_Comm_dup failing aborts as
    // the application chose; the duplicate returns errors to us.
    MPI_Comm_dup(MPI_COMM_WORLD, &transport->comm_);
    MPI_Comm_rank(transport->comm_, &rank);
    MPI_Comm_size(transport->comm_, &transport->size_);
    transport->rank_ = RankId{rank};
    transport->who_ = "mpi transport " + to_string(transport->rank_);
    KVF_RETURN_IF_ERROR(transport->call(
        MPI_Comm_set_errhandler(transport->comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler"));
    MPI_Comm_set_name(transport->comm_, "kvfabric-transport");
    KVF_RETURN_IF_ERROR(transport->learn_hosts());
    KVF_LOG_INFO(kTransport, "{}: communicator of {} ranks", transport->who_, transport->size_);
    return std::unique_ptr<Transport>(std::move(transport));
  }

  ~MpiTransport() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    // After MPI_Finalize the communicator is gone with MPI itself.
    if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }

  std::string_view name() const override { return "mpi"; }
  RankId rank() const override { return rank_; }
  int world_size() const override { return size_; }
  MPI_Comm comm() const { return comm_; }
  const std::string& who() const { return who_; }

  void set_timeout(std::optional<std::chrono::milliseconds> timeout) override { timeout_ = timeout; }

  std::string describe(RankId rank) const override {
    const bool known = rank.value >= 0 && static_cast<size_t>(rank.value) < hosts_.size();
    return "rank " + std::to_string(rank.value) + (known ? " on " + hosts_[rank.value] : "");
  }

  Status exchange_blocks(std::span<const BlockBatch> sends,
                         std::span<const BlockBatch> recvs) override {
    KVF_RETURN_IF_ERROR(failure_);
    KVF_RETURN_IF_ERROR(detail::check_exchange(who_, rank_, size_, sends, recvs));
    detail::MpiPoller poller(comm_, timeout_, detail::MpiPoller::Pace::kBusy);

    // Every message's datatype is built before the first message is posted, so a failure here
    // leaves nothing in flight.
    DatatypeList types;
    std::vector<Message> messages;
    for (const bool send : {true, false}) {
      const std::span<const BlockBatch> list = send ? sends : recvs;
      for (size_t i = 0; i < list.size(); ++i) {
        const BlockBatch& batch = list[i];
        if (batch.peer == rank_ || batch.blocks.empty()) continue;
        MPI_Datatype type = MPI_DATATYPE_NULL;
        if (per_block(batch)) {
          // Large blocks (MpiTransportOptions): each is its own contiguous message, which Open
          // MPI moves with a single copy; every block shares one datatype.
          KVF_RETURN_IF_ERROR(make_bytes_type(batch.block_bytes, &type));
          const int err = MPI_Type_commit(&type);
          types.add(type);
          KVF_RETURN_IF_ERROR(call(err, "MPI_Type_commit"));
          for (uint8_t* block : batch.blocks)
            messages.push_back({send, i, batch.peer.value, block, type, batch.block_bytes});
        } else {
          KVF_RETURN_IF_ERROR(make_batch_type(batch, &type, send, i));
          types.add(type);
          messages.push_back(
              {send, i, batch.peer.value, MPI_BOTTOM, type, detail::batch_bytes(batch)});
        }
      }
    }
    const size_t first_recv = static_cast<size_t>(
        std::find_if(messages.begin(), messages.end(), [](const Message& m) { return !m.send; }) -
        messages.begin());

    // All sends at once: one message per peer, batch and direction.
    std::vector<MPI_Request> requests(messages.size(), MPI_REQUEST_NULL);
    for (size_t m = 0; m < first_recv; ++m) {
      const int err = MPI_Isend(messages[m].buffer, 1, messages[m].type, messages[m].peer,
                                kBlockTag, comm_, &requests[m]);
      if (err != MPI_SUCCESS) {
        for (size_t k = 0; k < m; ++k)
          MPI_Request_free(&requests[k]);  // they finish on their own
        return Status(ErrorCode::kInternal, who_ + ": MPI_Isend of " +
                                                detail::describe_batch(true, messages[m].batch,
                                                                       sends[messages[m].batch]) +
                                                " failed: " + detail::mpi_error_string(err));
      }
    }

    // Batches to this rank itself: copied while the messages are in flight (check_exchange
    // paired them and ruled out overlaps).
    copy_self_batches(sends, recvs);

    // Receives: a matched probe shows each incoming message's size before it is received, so a
    // message that does not fit its batch is drained into scratch memory and reported instead of
    // being truncated (Open MPI can leave the sender of a truncated message waiting forever) and
    // the blocks stay untouched. Each peer's messages are taken in list order.
    std::vector<std::vector<uint8_t>> scratch(messages.size());
    std::vector<size_t> order(messages.size() - first_recv);
    std::iota(order.begin(), order.end(), first_recv);
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t x, size_t y) { return messages[x].peer < messages[y].peer; });
    // [begin, end) of `order` per peer still to match.
    std::vector<std::pair<size_t, size_t>> pending;
    for (size_t i = 0; i < order.size(); ++i) {
      if (i == 0 || messages[order[i]].peer != messages[order[i - 1]].peer) {
        pending.push_back({i, i});
      }
      ++pending.back().second;
    }
    Status receive_status;
    while (!pending.empty() && receive_status.ok()) {
      bool matched = false;
      for (size_t g = 0; g < pending.size() && receive_status.ok();) {
        auto& [next, end] = pending[g];
        const size_t m = order[next];
        receive_status =
            match_receive(messages[m], recvs[messages[m].batch], scratch[m], requests[m]);
        matched = matched || requests[m] != MPI_REQUEST_NULL;
        if (requests[m] != MPI_REQUEST_NULL && ++next == end) {
          pending.erase(pending.begin() + static_cast<std::ptrdiff_t>(g));
        } else {
          ++g;
        }
      }
      if (pending.empty() || matched || !receive_status.ok()) continue;
      if (poller.expired()) {
        std::vector<int> silent_peers;
        for (const auto& [next, end] : pending) silent_peers.push_back(messages[order[next]].peer);
        abandon(scratch);  // receives matched so far may still land there
        return timed_out("exchange_blocks (waiting for the messages of the peers)", silent_peers);
      }
      poller.pause();
    }

    KVF_LOG_DEBUG(kTransport, "{}: exchange_blocks: {} messages posted, waiting", who_,
                  messages.size());
    std::vector<MPI_Status> statuses(messages.size());
    std::vector<int> peers;
    for (const Message& m : messages) peers.push_back(m.peer);
    int err = MPI_SUCCESS;
    const Status waited = wait(requests, peers, "exchange_blocks", poller, &statuses, &err);
    if (!waited.ok()) {
      abandon(scratch);
      return waited;
    }
    KVF_RETURN_IF_ERROR(receive_status);
    if (err == MPI_ERR_IN_STATUS) {
      // Requests reported as pending have neither failed nor completed: wait for them too, with
      // what is left of the deadline.
      std::vector<size_t> still;
      std::vector<MPI_Request> still_requests;
      std::vector<int> still_peers;
      for (size_t m = 0; m < messages.size(); ++m) {
        if (statuses[m].MPI_ERROR != MPI_ERR_PENDING) continue;
        still.push_back(m);
        still_requests.push_back(requests[m]);
        still_peers.push_back(messages[m].peer);
      }
      std::vector<MPI_Status> still_statuses(still.size());
      int still_err = MPI_SUCCESS;
      const Status rest = wait(still_requests, still_peers, "exchange_blocks", poller,
                               &still_statuses, &still_err);
      if (!rest.ok()) {
        abandon(scratch);
        return rest;
      }
      for (size_t i = 0; i < still.size(); ++i) {
        statuses[still[i]] = still_statuses[i];
        if (still_err != MPI_ERR_IN_STATUS) statuses[still[i]].MPI_ERROR = still_err;
        if (statuses[still[i]].MPI_ERROR == MPI_ERR_PENDING) abandon(scratch);
      }
    }
    return check_completions(messages, statuses, sends, recvs, err == MPI_ERR_IN_STATUS);
  }

  // Nonblocking collectives, polled: an idle rank waiting for the next plan sleeps between polls
  // instead of spinning in a blocking MPI_Bcast, and a timeout can give up.
  Status broadcast(std::vector<uint8_t>& bytes, RankId root) override {
    KVF_RETURN_IF_ERROR(failure_);
    KVF_RETURN_IF_ERROR(check_root(root, "broadcast"));
    // Waiting for the size may take long (the next plan); the body follows right away.
    detail::MpiPoller poller(comm_, timeout_, detail::MpiPoller::Pace::kIdle);
    // In a buffer that can outlive a failed wait, as can `bytes` (then taken from the caller).
    std::vector<uint8_t> size_bytes(sizeof(uint64_t));
    const uint64_t sent_size = bytes.size();
    std::memcpy(size_bytes.data(), &sent_size, sizeof sent_size);
    const std::string what = "the broadcast from " + describe(root);
    if (Status s = collective([&](MPI_Request* r) {
          return MPI_Ibcast(size_bytes.data(), 1, MPI_UINT64_T, root.value, comm_, r);
        }, what, poller); !s.ok()) {
      abandon(std::span(&size_bytes, 1));
      return s;
    }
    uint64_t size = 0;
    std::memcpy(&size, size_bytes.data(), sizeof size);
    if (rank_ != root) bytes.resize(size);
    poller.set_pace(detail::MpiPoller::Pace::kBusy);
    for (uint64_t offset = 0; offset < size; offset += kChunkBytes) {
      const int count = static_cast<int>(std::min(kChunkBytes, size - offset));
      if (Status s = collective([&](MPI_Request* r) {
            return MPI_Ibcast(bytes.data() + offset, count, MPI_BYTE, root.value, comm_, r);
          }, what + " (" + std::to_string(size) + " bytes)", poller); !s.ok()) {
        abandon(std::span(&bytes, 1));
        return s;
      }
    }
    return ok_status();
  }

  Status barrier() override {
    KVF_RETURN_IF_ERROR(failure_);
    detail::MpiPoller poller(comm_, timeout_, detail::MpiPoller::Pace::kIdle);
    return collective([&](MPI_Request* r) { return MPI_Ibarrier(comm_, r); }, "the barrier",
                      poller);
  }

  Status all_gather(uint64_t value, std::vector<uint64_t>& out) override {
    KVF_RETURN_IF_ERROR(failure_);
    detail::MpiPoller poller(comm_, timeout_, detail::MpiPoller::Pace::kIdle);
    // Both buffers can outlive a failed wait: [0] is sent, the rest receives.
    std::vector<uint8_t> buffer((1 + static_cast<size_t>(size_)) * sizeof(uint64_t));
    std::memcpy(buffer.data(), &value, sizeof value);
    const Status gathered = collective(
        [&](MPI_Request* r) {
          return MPI_Iallgather(buffer.data(), 1, MPI_UINT64_T, buffer.data() + sizeof value, 1,
                                MPI_UINT64_T, comm_, r);
        },
        "the all-gather", poller);
    if (!gathered.ok()) {
      abandon(std::span(&buffer, 1));
      return gathered;
    }
    out.resize(static_cast<size_t>(size_));
    std::memcpy(out.data(), buffer.data() + sizeof value, out.size() * sizeof value);
    return ok_status();
  }

  Status gather(std::span<const uint8_t> bytes, RankId root,
                std::vector<std::vector<uint8_t>>& out) override {
    KVF_RETURN_IF_ERROR(failure_);
    KVF_RETURN_IF_ERROR(check_root(root, "gather"));
    if (bytes.size() > static_cast<size_t>(INT_MAX)) {
      return invalid_argument(who_ + ": gather of " + std::to_string(bytes.size()) +
                              " bytes (at most 2^31 - 1 per rank)");
    }
    // Reports are small; the ranks send them as they finish, which may take a while.
    detail::MpiPoller poller(comm_, timeout_, detail::MpiPoller::Pace::kIdle);
    out.clear();
    if (rank_ != root) {
      // A copy that can outlive a failed wait (the caller's bytes may not).
      std::vector<uint8_t> sent(bytes.begin(), bytes.end());
      MPI_Request request = MPI_REQUEST_NULL;
      KVF_RETURN_IF_ERROR(call(MPI_Isend(sent.data(), static_cast<int>(sent.size()), MPI_BYTE,
                                         root.value, kGatherTag, comm_, &request),
                               "MPI_Isend of a gather to " + to_string(root)));
      const int peer = root.value;
      const Status waited = wait(std::span(&request, 1), std::span(&peer, 1),
                                 "a gather to " + describe(root), poller);
      if (!waited.ok()) abandon(std::span(&sent, 1));
      return waited;
    }
    out.resize(static_cast<size_t>(size_));
    out[rank_.value].assign(bytes.begin(), bytes.end());
    std::vector<int> missing;
    for (int r = 0; r < size_; ++r) {
      if (r != rank_.value) missing.push_back(r);
    }
    std::vector<MPI_Request> requests;
    std::vector<int> peers;
    while (!missing.empty()) {
      for (auto it = missing.begin(); it != missing.end();) {
        int found = 0;
        MPI_Message message = MPI_MESSAGE_NULL;
        MPI_Status status;
        KVF_RETURN_IF_ERROR(call(MPI_Improbe(*it, kGatherTag, comm_, &found, &message, &status),
                                 "MPI_Improbe of a gather"));
        if (!found) {
          ++it;
          continue;
        }
        int count = 0;
        MPI_Get_count(&status, MPI_BYTE, &count);
        out[*it].resize(static_cast<size_t>(count));
        requests.push_back(MPI_REQUEST_NULL);
        peers.push_back(*it);
        KVF_RETURN_IF_ERROR(call(MPI_Imrecv(out[*it].data(), count, MPI_BYTE, &message,
                                            &requests.back()),
                                 "MPI_Imrecv of a gather"));
        it = missing.erase(it);
      }
      if (missing.empty()) break;
      if (poller.expired()) {
        abandon(out);  // the receives posted so far may still land
        out.clear();
        return timed_out("the gather to " + describe(root), missing);
      }
      poller.pause();
    }
    const Status waited = wait(requests, peers, "the gather to " + describe(root), poller);
    if (!waited.ok()) {
      abandon(out);
      out.clear();
    }
    return waited;
  }

  // Buffers of operations a failed wait left posted: MPI may still read or write them, so they
  // live as long as the transport (which refuses every call after a failure).
  void abandon(std::span<std::vector<uint8_t>> buffers) {
    for (auto& buffer : buffers) abandoned_.push_back(std::move(buffer));
  }

  Status call(int err, const std::string& what) const {
    if (err == MPI_SUCCESS) return ok_status();
    return Status(ErrorCode::kInternal,
                  who_ + ": " + what + " failed: " + detail::mpi_error_string(err));
  }

  // Polls `requests` (peers[i]: the rank request i waits for; -1 for a collective) until all
  // have completed or the poller's deadline passes. `statuses` and `mpi_error` take what
  // MPI_Testall reports, for callers that check each request.
  Status wait(std::span<MPI_Request> requests, std::span<const int> peers, const std::string& what,
              detail::MpiPoller& poller, std::vector<MPI_Status>* statuses = nullptr,
              int* mpi_error = nullptr) {
    while (true) {
      int done = 0;
      const int err = MPI_Testall(static_cast<int>(requests.size()), requests.data(), &done,
                                  statuses != nullptr ? statuses->data() : MPI_STATUSES_IGNORE);
      if (err != MPI_SUCCESS && (mpi_error == nullptr || err != MPI_ERR_IN_STATUS)) {
        return call(err, what);
      }
      if (err == MPI_ERR_IN_STATUS) {
        *mpi_error = err;
        return ok_status();
      }
      if (done) return ok_status();
      if (poller.expired()) {
        std::vector<int> waited_for;
        for (size_t i = 0; i < requests.size(); ++i) {
          int complete = 0;
          if (requests[i] != MPI_REQUEST_NULL) MPI_Request_get_status(requests[i], &complete, MPI_STATUS_IGNORE);
          if (requests[i] != MPI_REQUEST_NULL && !complete) waited_for.push_back(peers[i]);
        }
        return timed_out(what, waited_for);
      }
      poller.pause();
    }
  }

  // Starts one nonblocking collective with `start` and waits for it.
  template <typename Start>
  Status collective(Start start, const std::string& what, detail::MpiPoller& poller) {
    MPI_Request request = MPI_REQUEST_NULL;
    KVF_RETURN_IF_ERROR(call(start(&request), "starting " + what));
    const int every_rank = -1;
    return wait(std::span(&request, 1), std::span(&every_rank, 1), what, poller);
  }

  // The error of a wait that ran out of time: it names the ranks among those waited for (every
  // rank for a collective) that do not answer a liveness ping, and the transport refuses every
  // later call with it.
  Status timed_out(const std::string& what, std::vector<int> waited_for) {
    if (std::find(waited_for.begin(), waited_for.end(), -1) != waited_for.end()) {
      waited_for.clear();
      for (int r = 0; r < size_; ++r) {
        if (r != rank_.value) waited_for.push_back(r);
      }
    }
    std::sort(waited_for.begin(), waited_for.end());
    waited_for.erase(std::unique(waited_for.begin(), waited_for.end()), waited_for.end());
    const std::vector<int> silent =
        detail::unresponsive(comm_, waited_for, std::min(*timeout_, kLivenessGrace));
    auto names = [&](const std::vector<int>& ranks) {
      std::string text;
      for (int r : ranks) text += (text.empty() ? "" : ", ") + describe(RankId{r});
      return text;
    };
    std::string message = who_ + ": " + what + " did not complete within " +
                          std::to_string(timeout_->count()) + " ms: ";
    if (!silent.empty()) {
      message += names(silent) + (silent.size() == 1 ? " does" : " do") + " not answer";
    } else {
      message += names(waited_for) + (waited_for.size() == 1 ? " answers" : " answer") +
                 " but did not take part (waiting for another rank, or elsewhere)";
    }
    failure_ = Status(ErrorCode::kUnavailable, message);
    KVF_LOG_ERROR(kTransport, "{}", message);
    return failure_;
  }

  // Every rank's host name, for describe().
  Status learn_hosts() {
    char name[MPI_MAX_PROCESSOR_NAME] = {};
    int length = 0;
    KVF_RETURN_IF_ERROR(call(MPI_Get_processor_name(name, &length), "MPI_Get_processor_name"));
    std::vector<char> all(static_cast<size_t>(size_) * MPI_MAX_PROCESSOR_NAME);
    KVF_RETURN_IF_ERROR(call(MPI_Allgather(name, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, all.data(),
                                           MPI_MAX_PROCESSOR_NAME, MPI_CHAR, comm_),
                             "MPI_Allgather of the host names"));
    for (int r = 0; r < size_; ++r) {
      const char* host = all.data() + static_cast<size_t>(r) * MPI_MAX_PROCESSOR_NAME;
      hosts_.emplace_back(host, strnlen(host, MPI_MAX_PROCESSOR_NAME));
    }
    return ok_status();
  }

  Status check_rank(RankId r, std::string_view role) const {
    if (r.value < 0 || r.value >= size_) {
      return invalid_argument(who_ + ": " + std::string(role) + " " + to_string(r) +
                              " is not a rank (world size " + std::to_string(size_) + ")");
    }
    return ok_status();
  }

 private:
  explicit MpiTransport(const MpiTransportOptions& options) : options_(options) {}

  bool per_block(const BlockBatch& batch) const {
    return options_.block_message_min_bytes > 0 &&
           batch.block_bytes >= options_.block_message_min_bytes;
  }

  Status check_root(RankId root, std::string_view op) const {
    return check_rank(root, std::string(op) + " root");
  }

  // `bytes` contiguous bytes as one datatype; above INT_MAX, built from 2^30-byte chunks.
  Status make_bytes_type(uint64_t bytes, MPI_Datatype* out) const {
    if (bytes <= static_cast<uint64_t>(INT_MAX)) {
      return call(MPI_Type_contiguous(static_cast<int>(bytes), MPI_BYTE, out),
                  "MPI_Type_contiguous");
    }
    const uint64_t chunks = bytes / kChunkBytes;
    const uint64_t rest = bytes % kChunkBytes;
    if (chunks > static_cast<uint64_t>(INT_MAX)) {
      return invalid_argument(who_ + ": a block of " + std::to_string(bytes) +
                              " bytes is too large for one MPI datatype");
    }
    DatatypeList parts;
    MPI_Datatype chunk = MPI_DATATYPE_NULL, body = MPI_DATATYPE_NULL;
    KVF_RETURN_IF_ERROR(call(MPI_Type_contiguous(static_cast<int>(kChunkBytes), MPI_BYTE, &chunk),
                             "MPI_Type_contiguous"));
    parts.add(chunk);
    KVF_RETURN_IF_ERROR(
        call(MPI_Type_contiguous(static_cast<int>(chunks), chunk, &body), "MPI_Type_contiguous"));
    if (rest == 0) return ok_status_with(out, body);
    parts.add(body);
    const int lengths[2] = {1, static_cast<int>(rest)};
    const MPI_Aint displacements[2] = {0, static_cast<MPI_Aint>(chunks * kChunkBytes)};
    const MPI_Datatype members[2] = {body, MPI_BYTE};
    return call(MPI_Type_create_struct(2, lengths, displacements, members, out),
                "MPI_Type_create_struct");
  }

  static Status ok_status_with(MPI_Datatype* out, MPI_Datatype type) {
    *out = type;
    return ok_status();
  }

  // The batch's blocks at their absolute addresses (relative to MPI_BOTTOM), one entry per run
  // of adjacent blocks; committed.
  Status make_batch_type(const BlockBatch& batch, MPI_Datatype* out, bool send,
                         size_t index) const {
    MPI_Datatype block = MPI_DATATYPE_NULL;
    KVF_RETURN_IF_ERROR(make_bytes_type(batch.block_bytes, &block));
    DatatypeList block_guard;
    block_guard.add(block);
    std::vector<int> run_blocks;
    std::vector<MPI_Aint> run_starts;
    const uint8_t* run_end = nullptr;
    for (uint8_t* p : batch.blocks) {
      if (p == run_end && run_blocks.back() < INT_MAX) {
        ++run_blocks.back();
      } else {
        MPI_Aint address = 0;
        KVF_RETURN_IF_ERROR(call(MPI_Get_address(p, &address), "MPI_Get_address"));
        run_blocks.push_back(1);
        run_starts.push_back(address);
      }
      run_end = p + batch.block_bytes;
    }
    MPI_Datatype type = MPI_DATATYPE_NULL;
    KVF_RETURN_IF_ERROR(
        call(MPI_Type_create_hindexed(static_cast<int>(run_blocks.size()), run_blocks.data(),
                                      run_starts.data(), block, &type),
             "MPI_Type_create_hindexed for " + detail::describe_batch(send, index, batch)));
    const int err = MPI_Type_commit(&type);
    if (err != MPI_SUCCESS) {
      MPI_Type_free(&type);
      return call(err, "MPI_Type_commit for " + detail::describe_batch(send, index, batch));
    }
    *out = type;
    return ok_status();
  }

  // One nonblocking matched probe for the next message from `msg.peer`. When one is there, it is
  // received into the batch's blocks if its size is the batch's, else into `scratch` (and
  // `msg.received` records its size); `request` is then active.
  Status match_receive(Message& msg, const BlockBatch& batch, std::vector<uint8_t>& scratch,
                       MPI_Request& request) const {
    int found = 0;
    MPI_Message handle = MPI_MESSAGE_NULL;
    MPI_Status status;
    KVF_RETURN_IF_ERROR(call(MPI_Improbe(msg.peer, kBlockTag, comm_, &found, &handle, &status),
                             "MPI_Improbe for " + detail::describe_batch(false, msg.batch, batch)));
    if (!found) return ok_status();
    MPI_Count size = 0;
    KVF_RETURN_IF_ERROR(call(MPI_Get_elements_x(&status, MPI_BYTE, &size), "MPI_Get_elements_x"));
    if (static_cast<uint64_t>(size) == msg.bytes) {
      return call(MPI_Imrecv(msg.buffer, 1, msg.type, &handle, &request),
                  "MPI_Imrecv of " + detail::describe_batch(false, msg.batch, batch));
    }
    msg.received = size;
    scratch.resize(static_cast<size_t>(size));
    MPI_Datatype drain = MPI_DATATYPE_NULL;
    KVF_RETURN_IF_ERROR(make_bytes_type(static_cast<uint64_t>(size), &drain));
    DatatypeList guard;
    guard.add(drain);
    KVF_RETURN_IF_ERROR(call(MPI_Type_commit(&drain), "MPI_Type_commit"));
    return call(MPI_Imrecv(scratch.data(), 1, drain, &handle, &request),
                "MPI_Imrecv of a mismatched message from " + to_string(batch.peer));
  }

  void copy_self_batches(std::span<const BlockBatch> sends,
                         std::span<const BlockBatch> recvs) const {
    size_t r = 0;
    for (const BlockBatch& from : sends) {
      if (from.peer != rank_) continue;
      while (recvs[r].peer != rank_)
        ++r;
      const BlockBatch& to = recvs[r++];
      for (size_t i = 0; i < from.blocks.size(); ++i)
        std::memcpy(to.blocks[i], from.blocks[i], from.block_bytes);
    }
  }

  // Errors of completed messages, and receives whose message did not fit their batch.
  Status check_completions(const std::vector<Message>& messages, std::vector<MPI_Status>& statuses,
                           std::span<const BlockBatch> sends, std::span<const BlockBatch> recvs,
                           bool errors_in_status) const {
    std::string problems;
    int count = 0;
    bool mpi_failed = false;
    for (size_t m = 0; m < messages.size(); ++m) {
      const Message& msg = messages[m];
      const BlockBatch& batch = msg.send ? sends[msg.batch] : recvs[msg.batch];
      const std::string what = detail::describe_batch(msg.send, msg.batch, batch);
      const std::string peer = to_string(batch.peer);
      std::string problem;
      const int err = errors_in_status ? statuses[m].MPI_ERROR : MPI_SUCCESS;
      if (err != MPI_SUCCESS) {
        mpi_failed = true;
        problem = what + ": " + detail::mpi_error_string(err);
      } else if (!msg.send && msg.received >= 0) {
        problem = what + ": " + peer + " sent " + std::to_string(msg.received) + " bytes, " +
                  to_string(rank_) + " expected " + std::to_string(msg.bytes) +
                  " (the two ranks' batches do not match; the blocks were not written)";
      }
      if (problem.empty()) continue;
      if (count++ < 4) problems += (problems.empty() ? "" : "; ") + problem;
    }
    if (count == 0) return ok_status();
    if (count > 4) problems += "; and " + std::to_string(count - 4) + " more";
    // Without an MPI error, the two ranks disagreed about the exchange (a bad plan, not a bad
    // network).
    return Status(mpi_failed ? ErrorCode::kInternal : ErrorCode::kInvalidOperation,
                  who_ + ": exchange_blocks: " + problems);
  }

  MpiTransportOptions options_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  RankId rank_{0};
  int size_ = 0;
  std::string who_;
  std::vector<std::string> hosts_;  // by rank
  std::optional<std::chrono::milliseconds> timeout_;
  Status failure_;  // set by a timeout: every later call returns it
  std::vector<std::vector<uint8_t>> abandoned_;  // see abandon()
};

}  // namespace

Result<std::unique_ptr<Transport>> make_mpi_transport(const MpiRuntime& runtime,
                                                      const MpiTransportOptions& options) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (runtime.world_size() == 0 || !initialized || finalized) {
    return Status(ErrorCode::kUnavailable,
                  "make_mpi_transport: MPI is not running (the MpiRuntime was moved from or "
                  "MPI was finalized)");
  }
  return MpiTransport::create(options);
}

Status mpi_raw_transfer(Transport& transport, const MpiRawTransfer& t) {
  auto* mpi = dynamic_cast<MpiTransport*>(&transport);
  if (mpi == nullptr) {
    return invalid_argument("mpi_raw_transfer: needs a transport made by make_mpi_transport (got " +
                            std::string(transport.name()) + ")");
  }
  KVF_RETURN_IF_ERROR(mpi->check_rank(t.a, "mpi_raw_transfer: rank a"));
  KVF_RETURN_IF_ERROR(mpi->check_rank(t.b, "mpi_raw_transfer: rank b"));
  if (t.a == t.b) {
    return invalid_argument(mpi->who() + ": mpi_raw_transfer between " + to_string(t.a) +
                            " and itself");
  }
  const RankId me = mpi->rank();
  if (me != t.a && me != t.b) return ok_status();
  const bool is_a = me == t.a;
  const uint8_t* out = is_a ? t.a_to_b : t.b_to_a;
  uint8_t* in = is_a ? t.a_from_b : t.b_from_a;
  const bool sends = is_a || t.both_directions;
  const bool receives = !is_a || t.both_directions;
  if (t.bytes > 0 && ((sends && out == nullptr) || (receives && in == nullptr))) {
    return invalid_argument(mpi->who() + ": mpi_raw_transfer of " + std::to_string(t.bytes) +
                            " bytes: a buffer this rank needs is null");
  }
  const int peer = (is_a ? t.b : t.a).value;
  for (uint64_t offset = 0; offset < t.bytes; offset += kChunkBytes) {
    const int count = static_cast<int>(std::min(kChunkBytes, t.bytes - offset));
    int err = MPI_SUCCESS;
    if (sends && receives) {
      err = MPI_Sendrecv(out + offset, count, MPI_BYTE, peer, kRawTag, in + offset, count, MPI_BYTE,
                         peer, kRawTag, mpi->comm(), MPI_STATUS_IGNORE);
    } else if (sends) {
      err = MPI_Send(out + offset, count, MPI_BYTE, peer, kRawTag, mpi->comm());
    } else {
      err = MPI_Recv(in + offset, count, MPI_BYTE, peer, kRawTag, mpi->comm(), MPI_STATUS_IGNORE);
    }
    KVF_RETURN_IF_ERROR(mpi->call(err, "mpi_raw_transfer with R" + std::to_string(peer)));
  }
  return ok_status();
}

}  // namespace kvfabric
