#include "kvfabric/server/kv_event_hub.h"

#include <algorithm>
#include <utility>

namespace kvfabric {

bool KvEventSubscription::offer(std::shared_ptr<const std::string> batch) {
  std::function<void()> notify;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) return false;
    if (queue_.size() >= limit_) {
      ++dropped_;
      return false;
    }
    queue_.push_back(Waiting{std::move(batch), dropped_});
    notify = notify_;
  }
  if (notify) notify();
  return true;
}

std::string KvEventSubscription::take() {
  std::deque<Waiting> waiting;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    waiting.swap(queue_);
  }
  std::string lines;
  for (const Waiting& w : waiting) {
    lines += "{\"kv_events\":";
    lines += *w.batch;
    lines += ",\"dropped\":";
    lines += std::to_string(w.dropped_before);
    lines += "}\n";
  }
  return lines;
}

void KvEventSubscription::set_notify(std::function<void()> notify) {
  std::lock_guard<std::mutex> lock(mutex_);
  notify_ = std::move(notify);
}

void KvEventSubscription::close() {
  std::lock_guard<std::mutex> lock(mutex_);
  closed_ = true;
  queue_.clear();
  notify_ = nullptr;
}

bool KvEventSubscription::closed() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return closed_;
}

uint64_t KvEventSubscription::dropped() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return dropped_;
}

std::shared_ptr<KvEventSubscription> KvEventHub::subscribe() {
  auto subscription = std::make_shared<KvEventSubscription>(limit_);
  std::lock_guard<std::mutex> lock(mutex_);
  subscriptions_.push_back(subscription);
  return subscription;
}

void KvEventHub::publish(const std::string& batch) {
  const auto shared = std::make_shared<const std::string>(batch);
  std::lock_guard<std::mutex> lock(mutex_);
  ++published_;
  for (const auto& weak : subscriptions_) {
    const std::shared_ptr<KvEventSubscription> subscription = weak.lock();
    if (subscription && !subscription->offer(shared) && !subscription->closed()) ++dropped_;
  }
}

size_t KvEventHub::subscribers() {
  std::lock_guard<std::mutex> lock(mutex_);
  std::erase_if(subscriptions_, [](const std::weak_ptr<KvEventSubscription>& weak) {
    const auto subscription = weak.lock();
    return !subscription || subscription->closed();
  });
  return subscriptions_.size();
}

uint64_t KvEventHub::published() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return published_;
}

uint64_t KvEventHub::dropped() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return dropped_;
}

}  // namespace kvfabric
