// The control plane's KV-event subscribers: a bounded queue each, filled by the request thread and
// drained by each subscriber's connection, so that a slow subscriber never holds up a step.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace kvfabric {

//! \brief One subscriber's queue of event batches (each a JSON object's text). Thread-safe.
class KvEventSubscription {
 public:
  explicit KvEventSubscription(size_t queue_limit) : limit_(queue_limit) {}

  //! Queues a batch, or drops it (counted) when queue_limit batches wait already. Returns
  //! whether it was queued.
  bool offer(std::shared_ptr<const std::string> batch);
  //! Every waiting batch as lines `{"kv_events": BATCH, "dropped": D}\n`, D the batches dropped
  //! for this subscriber before that one; empty when none waits.
  std::string take();
  //! Runs after each batch queued (on the publishing thread): the connection's wake-up.
  void set_notify(std::function<void()> notify);
  //! The connection went away: later batches are not queued and the hub forgets it.
  void close();
  [[nodiscard]] bool closed() const;
  [[nodiscard]] uint64_t dropped() const;
  [[nodiscard]] size_t queue_limit() const { return limit_; }

 private:
  struct Waiting {
    std::shared_ptr<const std::string> batch;
    uint64_t dropped_before = 0;
  };
  const size_t limit_;
  mutable std::mutex mutex_;
  std::deque<Waiting> queue_;
  uint64_t dropped_ = 0;
  bool closed_ = false;
  std::function<void()> notify_;
};

//! \brief Hands each published batch to every open subscription (serialized once, shared). The
//! hub does not keep a subscription alive: it ends when its holder (the connection) lets go.
class KvEventHub {
 public:
  explicit KvEventHub(size_t queue_limit) : limit_(queue_limit) {}

  std::shared_ptr<KvEventSubscription> subscribe();
  void publish(const std::string& batch);
  //! Open subscriptions (closed and released ones are forgotten here).
  size_t subscribers();
  //! Batches published, and those dropped for slow subscribers (each drop counted once per
  //! subscriber), since creation.
  [[nodiscard]] uint64_t published() const;
  [[nodiscard]] uint64_t dropped() const;

 private:
  const size_t limit_;
  mutable std::mutex mutex_;
  std::vector<std::weak_ptr<KvEventSubscription>> subscriptions_;
  uint64_t published_ = 0;
  uint64_t dropped_ = 0;
};

}  // namespace kvfabric
