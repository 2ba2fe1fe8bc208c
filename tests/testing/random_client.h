// A seeded random client of the Coordinator for property tests: admissions of prompts that share
// prefixes (some repeated whole, some compressed, some under a tenant, salt or public prefix),
// decode appends, forks onto any replica, frees, priority changes, prefix-cache resets and steps,
// on a small pool where room runs out, with priority eviction and an optional host tier.
#pragma once

#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "kvfabric/coordinator/coordinator.h"
#include "testing/token_run.h"

namespace kvfabric::testing {

struct ClientCall {
  enum class Kind { kAdmit, kAppend, kFork, kFree, kSetPriority, kResetPrefixCache, kStep };
  Kind kind = Kind::kStep;
  SeqId seq, dst;                   // dst: a fork's child
  std::vector<TokenId> prompt;      // admit
  AdmitOptions options;             // admit
  size_t tokens = 0;                // append
  std::optional<uint32_t> replica;  // fork
  uint32_t priority = 0;            // set_priority

  [[nodiscard]] std::string describe() const {
    switch (kind) {
      case Kind::kAdmit:
        return "admit " + to_string(seq) + " (" + std::to_string(prompt.size()) + " tokens)";
      case Kind::kAppend:
        return "append " + to_string(seq) + " " + std::to_string(tokens);
      case Kind::kFork:
        return "fork " + to_string(seq) + " -> " + to_string(dst);
      case Kind::kFree:
        return "free " + to_string(seq);
      case Kind::kSetPriority:
        return "set_priority " + to_string(seq);
      case Kind::kResetPrefixCache:
        return "reset_prefix_cache";
      case Kind::kStep:
        return "step";
    }
    return "?";
  }
};

class RandomClient {
 public:
  static constexpr uint32_t kBlockSize = 4;
  static constexpr uint64_t kSequences = 16;

  explicit RandomClient(uint64_t seed) : rng_(seed) {
    config_.model.name = "random-client";
    config_.model.num_layers = 2;
    config_.model.num_query_heads = 4;
    config_.model.num_kv_heads = 2;
    config_.model.head_dim = 64;
    config_.model.dtype = DType::kF32;
    config_.cache.block_size = kBlockSize;
    config_.cache.kv_dtype = DType::kF16;
    config_.cache.num_blocks = 10 + below(14);
    config_.cache.host_num_blocks = below(2) == 0 ? 0 : 4 + below(8);
    config_.cache.eviction.strategy = EvictionPolicy::kPriority;
    config_.cache.eviction.priority_levels = 4;
    config_.topology.dp = 1 + static_cast<uint32_t>(below(3));
    config_.topology.tp = 1;
    if (below(2) == 0) config_.coordinator.migration_token_cost = 0.01;  // migrations pay
    for (TokenId i = 1; i <= 3; ++i) {
      prefixes_.push_back(token_run(kBlockSize * (1 + below(3)), 1000 * i));
    }
    for (TokenId i = 0; i < 2; ++i) {
      std::vector<TokenId> whole = prefixes_[below(prefixes_.size())];
      const auto tail = token_run(5 + below(14), 7000 + 100 * i);
      whole.insert(whole.end(), tail.begin(), tail.end());
      repeated_.push_back(std::move(whole));
    }
  }

  [[nodiscard]] const Config& config() const { return config_; }
  [[nodiscard]] uint64_t below(uint64_t n) { return rng_() % n; }

  ClientCall next() {
    ClientCall call;
    call.seq = SeqId{below(kSequences)};
    const uint64_t roll = below(100);
    if (roll < 30) {
      call.kind = ClientCall::Kind::kAdmit;
      call.prompt = prompt();
      call.options = options();
    } else if (roll < 55) {
      call.kind = ClientCall::Kind::kAppend;
      call.tokens = 1 + below(5);
    } else if (roll < 63) {
      call.kind = ClientCall::Kind::kFork;
      call.dst = SeqId{below(kSequences)};
      if (below(2) == 0) call.replica = static_cast<uint32_t>(below(config_.topology.dp));
    } else if (roll < 72) {
      call.kind = ClientCall::Kind::kFree;
    } else if (roll < 75) {
      call.kind = ClientCall::Kind::kSetPriority;
      call.priority = static_cast<uint32_t>(below(4));
    } else if (roll < 77) {
      call.kind = ClientCall::Kind::kResetPrefixCache;
    } else {
      call.kind = ClientCall::Kind::kStep;
    }
    return call;
  }

  //! Runs every call but a step on `c`.
  static Status apply(const ClientCall& call, Coordinator& c) {
    switch (call.kind) {
      case ClientCall::Kind::kAdmit:
        return c.admit(call.seq, call.prompt, call.options).status();
      case ClientCall::Kind::kAppend:
        return c.append(call.seq, call.tokens);
      case ClientCall::Kind::kFork:
        return c.fork(call.seq, call.dst, call.replica);
      case ClientCall::Kind::kFree:
        return c.free(call.seq);
      case ClientCall::Kind::kSetPriority:
        return c.set_priority(call.seq, call.priority);
      case ClientCall::Kind::kResetPrefixCache:
        return c.reset_prefix_cache().status();
      case ClientCall::Kind::kStep:
        break;
    }
    return Status(ErrorCode::kInvalidArgument, "a step is the caller's");
  }

 private:
  // Shared prefixes, one or two, then a short tail; a third of the time a prompt repeated whole.
  std::vector<TokenId> prompt() {
    if (below(3) == 0) return repeated_[below(repeated_.size())];
    std::vector<TokenId> p = prefixes_[below(prefixes_.size())];
    if (below(2) == 0) {
      const auto& more = prefixes_[below(prefixes_.size())];
      p.insert(p.end(), more.begin(), more.end());
    }
    const auto tail = token_run(below(9), 50000 + static_cast<TokenId>(below(4)) * 100);
    p.insert(p.end(), tail.begin(), tail.end());
    return p.empty() ? token_run(1, 1) : p;
  }

  AdmitOptions options() {
    AdmitOptions o;
    o.priority = static_cast<uint32_t>(below(4));
    if (below(4) == 0) o.tenant = "t1";
    if (below(4) == 0) o.public_tokens = kBlockSize * below(3);
    if (below(3) == 0) {
      quant::CompressionPolicy policy;
      policy.kind = static_cast<quant::CompressionPolicy::Kind>(below(3));
      policy.budget_tokens = 8;
      policy.window_tokens = 4;
      policy.recent_tokens = 0;
      policy.sink_tokens = 2;
      o.compression = policy;
    }
    return o;
  }

  std::mt19937_64 rng_;
  Config config_;
  std::vector<std::vector<TokenId>> prefixes_, repeated_;
};

}  // namespace kvfabric::testing
