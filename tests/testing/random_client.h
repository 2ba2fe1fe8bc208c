// A seeded random client of the Coordinator for property tests: admissions of prompts that share
// prefixes (some repeated whole, some compressed, under four tenants with their own quotas and
// salts, some sharing a public prefix across tenants), decode appends, forks onto any replica,
// frees, priority changes, quota changes, prefix-cache resets and steps, on 1 to 5 small pools
// where room runs out, with priority eviction and an optional host tier.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "kvfabric/coordinator/coordinator.h"
#include "testing/serving_harness.h"
#include "testing/token_run.h"

namespace kvfabric::testing {

struct ClientCall {
  enum class Kind {
    kAdmit, kAppend, kFork, kFree, kSetPriority, kSetTenantQuota, kResetPrefixCache, kStep
  };
  Kind kind = Kind::kStep;
  SeqId seq, dst;                   // dst: a fork's child
  std::vector<TokenId> prompt;      // admit
  AdmitOptions options;             // admit
  size_t tokens = 0;                // append
  std::optional<uint32_t> replica;  // fork, reset_prefix_cache
  uint32_t priority = 0;            // set_priority
  std::string tenant;               // set_tenant_quota
  TenantQuota quota;                // set_tenant_quota

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
      case Kind::kSetTenantQuota:
        return "set_tenant_quota '" + tenant + "'";
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
  static constexpr std::array<const char*, 4> kTenants = {"", "a", "b", "c"};

  //! `layer_groups`: half the clients' models have two layer groups, and their compressed
  //! requests may be pyramid (without it, the draws are those of earlier seeds).
  explicit RandomClient(uint64_t seed, bool layer_groups = false) : rng_(seed) {
    const uint64_t device_blocks = 10 + below(14);
    const uint64_t host_blocks = below(2) == 0 ? 0 : 4 + below(8);
    const auto dp = 1 + static_cast<uint32_t>(below(5));
    config_ = serving_config(dp, 1, 4, 2, device_blocks, host_blocks);
    config_.cache.block_size = kBlockSize;
    config_.cache.eviction.strategy = EvictionPolicy::kPriority;
    config_.cache.eviction.priority_levels = 4;
    if (below(2) == 0) config_.coordinator.migration_token_cost = 0.01;  // migrations pay
    if (below(3) == 0) config_.coordinator.free_watermark_blocks = static_cast<uint32_t>(below(4));
    if (below(4) == 0) config_.coordinator.max_sequences_per_replica = 2 + static_cast<uint32_t>(below(5));
    quotas_ = below(2) == 0;  // else tenants are names and salts only, and room runs out sooner
    if (quotas_ && below(2) == 0) {
      config_.tenants = quota();
      if (!quota_conflict(config_.tenants).empty()) config_.tenants.max_host_blocks = 0;
    }
    for (TokenId i = 1; i <= 3; ++i) {
      prefixes_.push_back(token_run(kBlockSize * (1 + below(3)), 1000 * i));
    }
    if (layer_groups && below(2) == 0) {
      config_.cache.layers_per_group = 1;
      policy_kinds_ = 4;
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
      if (below(2) == 0) call.replica = static_cast<uint32_t>(below(config_.topology.dp));
    } else if (roll < 79 && quotas_) {
      call.kind = ClientCall::Kind::kSetTenantQuota;
      call.tenant = tenant();
      call.quota = quota();
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
      case ClientCall::Kind::kSetTenantQuota:
        return c.set_tenant_quota(call.tenant, call.quota);
      case ClientCall::Kind::kResetPrefixCache:
        return c.reset_prefix_cache(call.replica).status();
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

  std::string tenant() { return kTenants[below(kTenants.size())]; }

  // Some of the bounds, each at random; now and then one that contradicts itself (refused).
  TenantQuota quota() {
    TenantQuota q;
    if (below(2) == 0) q.max_blocks = 3 + below(20);
    if (below(2) == 0) q.max_host_blocks = 1 + below(8);
    if (q.max_host_blocks > q.max_blocks && below(8) != 0) q.max_host_blocks = q.max_blocks;
    if (below(2) == 0) q.max_sequences = 1 + static_cast<uint32_t>(below(6));
    if (below(3) == 0) q.max_priority = static_cast<uint32_t>(below(4));
    return q;
  }

  AdmitOptions options() {
    AdmitOptions o;
    o.priority = static_cast<uint32_t>(below(4));
    o.tenant = tenant();
    if (below(4) == 0) o.cache_salt = below(3) == 0 ? "" : (below(2) == 0 ? "x" : "y");
    if (below(3) == 0) o.public_tokens = below(16);  // whole blocks or not
    if (below(3) == 0) {
      quant::CompressionPolicy policy;
      policy.kind = static_cast<quant::CompressionPolicy::Kind>(below(policy_kinds_));
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
  bool quotas_ = false;
  uint64_t policy_kinds_ = 3;  // streaming, h2o, snapkv; and pyramid with layer groups
  std::vector<std::vector<TokenId>> prefixes_, repeated_;
};

}  // namespace kvfabric::testing
