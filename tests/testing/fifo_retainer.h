// A minimal BlockRetainer for the block tests: it gives idle blocks back oldest-idle first and
// checks every notification it receives against its own record.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "kvfabric/block/block_retainer.h"

namespace kvfabric::testing {

class FifoRetainer final : public BlockRetainer {
 public:
  // The test calls these next to PagedKvCache::retain_block / release_retained_block.
  void retained(BlockId block) { held_.insert(block); }  // a sequence holds it: used
  void released(BlockId block) {
    held_.erase(block);
    forget_idle(block);
  }

  [[nodiscard]] size_t idle_blocks() const override { return idle_by_time_.size(); }
  std::vector<BlockId> release_idle(size_t count) override {
    std::vector<BlockId> out;
    while (out.size() < count && !idle_by_time_.empty()) {
      const BlockId block = idle_by_time_.begin()->second;
      released(block);
      out.push_back(block);
    }
    return out;
  }
  void on_block_used(BlockId block) override {
    if (!held_.count(block) || !idle_since_.count(block)) fail("used", block);
    forget_idle(block);
    ++used_events;
  }
  void on_block_idle(BlockId block) override {
    if (!held_.count(block) || idle_since_.count(block)) fail("idle", block);
    idle_since_[block] = ++clock_;
    idle_by_time_.emplace(clock_, block);
    ++idle_events;
  }

  [[nodiscard]] const std::set<BlockId>& held() const { return held_; }
  [[nodiscard]] bool is_idle(BlockId block) const { return idle_since_.count(block) > 0; }

  uint64_t used_events = 0;
  uint64_t idle_events = 0;

 private:
  [[noreturn]] static void fail(const char* what, BlockId block) {
    throw std::logic_error(std::string("unexpected ") + what + " notification for " +
                           to_string(block));
  }
  void forget_idle(BlockId block) {
    const auto it = idle_since_.find(block);
    if (it == idle_since_.end()) return;
    idle_by_time_.erase({it->second, block});
    idle_since_.erase(it);
  }

  std::set<BlockId> held_;
  std::map<BlockId, uint64_t> idle_since_;
  std::set<std::pair<uint64_t, BlockId>> idle_by_time_;
  uint64_t clock_ = 0;
};

}  // namespace kvfabric::testing
