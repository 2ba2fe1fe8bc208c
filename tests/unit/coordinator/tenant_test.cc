// Tenants in the coordinator: cache salts keep tenants' prefixes apart in every placement path
// (local hits, cost-model routing, migration), public ranges are shared, quotas refuse what would
// pass them and change nothing, victims are chosen fairly across tenants, and a seeded workload
// of several tenants keeps every invariant.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <set>
#include <random>
#include <string>
#include <vector>

#include "kvfabric/coordinator/coordinator.h"
#include "testing/property_env.h"
#include "testing/serving_harness.h"

namespace kvfabric {
namespace {

using ::testing::HasSubstr;
using testing::serving_config;
using testing::token_run;

constexpr size_t kBlock = 16;

AdmitOptions as(std::string tenant, size_t public_tokens = 0) {
  AdmitOptions o;
  o.tenant = std::move(tenant);
  o.public_tokens = public_tokens;
  return o;
}

std::vector<TokenId> concat(std::vector<TokenId> a, const std::vector<TokenId>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

Placement admit_ok(Coordinator& c, uint64_t seq, std::vector<TokenId> prompt,
                   const AdmitOptions& options) {
  auto placed = c.admit(SeqId{seq}, std::move(prompt), options);
  EXPECT_TRUE(placed.ok()) << placed.status();
  return placed.value_or(Placement{});
}

void step_ok(Coordinator& c) {
  const auto plan = c.step();
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_TRUE(c.verify_integrity().ok()) << c.verify_integrity();
}

// Admits, then steps: the plan's forward pass computes the prompt, and later requests share it.
void admit_computed(Coordinator& c, uint64_t seq, std::vector<TokenId> prompt,
                    const AdmitOptions& options) {
  admit_ok(c, seq, std::move(prompt), options);
  step_ok(c);
}

TEST(TenantTest, APromptCachedByOneTenantIsNotServedToAnother) {
  auto c = Coordinator::create(serving_config(1, 1, 4, 4, 64, 0)).value();
  const auto prompt = token_run(4 * kBlock, 100);
  admit_computed(c, 1, prompt, as("alice"));  // computed and indexed
  EXPECT_EQ(admit_ok(c, 2, prompt, as("alice")).cached_tokens, 4 * kBlock);
  EXPECT_EQ(admit_ok(c, 3, prompt, as("bob")).cached_tokens, 0u);
  // An explicit salt is a namespace within the tenant: Carol naming Alice's tenant as her salt
  // gets nothing, Alice's user "u1" is apart from Alice's default, and shares with itself.
  AdmitOptions carol = as("carol");
  carol.cache_salt = "alice";
  EXPECT_EQ(admit_ok(c, 4, prompt, carol).cached_tokens, 0u);
  AdmitOptions alice_user = as("alice");
  alice_user.cache_salt = "u1";
  EXPECT_EQ(admit_ok(c, 6, prompt, alice_user).cached_tokens, 0u);
  step_ok(c);
  step_ok(c);
  EXPECT_EQ(admit_ok(c, 7, prompt, alice_user).cached_tokens, 4 * kBlock);
  // The default tenant has no salt: it shares only with other unsalted requests.
  EXPECT_EQ(admit_ok(c, 5, prompt, AdmitOptions{}).cached_tokens, 0u);
  EXPECT_EQ(c.tenant_stats("alice").cached_tokens, 8 * kBlock);  // S2 and S7
  EXPECT_EQ(c.tenant_stats("bob").cached_tokens, 0u);
  EXPECT_EQ(c.tenant_of(SeqId{3}), std::optional<std::string_view>("bob"));
  EXPECT_EQ(c.tenant_of(SeqId{99}), std::nullopt);
}

// The oracle an attacker used: admit a guess, read cached_tokens. Across salts it reads 0 for
// a wrong guess, a right first block and the whole prompt alike.
TEST(TenantTest, CachedTokensRevealNothingAboutAnotherTenantsPrompt) {
  auto c = Coordinator::create(serving_config(1, 1, 4, 4, 64, 0)).value();
  const auto secret = token_run(3 * kBlock, 7000);
  admit_computed(c, 1, secret, as("victim"));
  const std::vector<std::vector<TokenId>> guesses = {
      token_run(3 * kBlock, 9),                                   // wrong
      concat(token_run(kBlock, 7000), token_run(2 * kBlock, 1)),  // first block right
      secret,                                                     // all right
  };
  uint64_t seq = 10;
  for (const auto& guess : guesses) {
    const Placement p = admit_ok(c, seq, guess, as("attacker"));
    EXPECT_EQ(p.cached_tokens, 0u);
    EXPECT_EQ(p.migrated_tokens, 0u);
    ASSERT_TRUE(c.free(SeqId{seq++}).ok());
  }
}

TEST(TenantTest, APublicRangeIsComputedOnceForEveryTenant) {
  auto c = Coordinator::create(serving_config(1, 1, 4, 4, 64, 0)).value();
  const auto system = token_run(2 * kBlock, 1);
  const auto question = token_run(2 * kBlock, 500);
  admit_computed(c, 1, concat(system, question), as("alice", system.size()));
  // Bob asks the same question after the same system prompt: only the public part is shared.
  EXPECT_EQ(admit_ok(c, 2, concat(system, question), as("bob", system.size())).cached_tokens,
            system.size());
  // A public range given in tokens that are not whole blocks shares the whole blocks in it.
  EXPECT_EQ(admit_ok(c, 3, concat(system, question), as("carol", system.size() + 5)).cached_tokens,
            system.size());
  // Without a public range nothing is shared.
  EXPECT_EQ(admit_ok(c, 4, concat(system, question), as("dave")).cached_tokens, 0u);
}

// dp 2: Alice's prompt is cached on replica 0 only. Bob's identical prompt is neither drawn to
// replica 0 by the cost model nor migrated; Alice's next one is, in every routing.
class TenantRoutingTest : public ::testing::TestWithParam<double> {};

TEST_P(TenantRoutingTest, RoutingAndMigrationNeverCrossSalts) {
  Config config = serving_config(2, 1, 4, 4, 64, 0);
  config.coordinator.migration_token_cost = GetParam();
  auto c = Coordinator::create(config).value();
  const auto prompt = token_run(6 * kBlock, 3000);
  ASSERT_EQ(admit_ok(c, 1, prompt, as("alice")).replica, 0u);
  step_ok(c);
  step_ok(c);
  // Load replica 0 so that a request without a cached prefix goes to replica 1.
  for (uint64_t s = 2; s < 6; ++s)
    admit_ok(c, s, token_run(kBlock, 100 * s), as("filler"));
  std::vector<uint32_t> filler_replicas;
  for (uint64_t s = 2; s < 6; ++s)
    filler_replicas.push_back(*c.replica_of(SeqId{s}));
  const Placement bob = admit_ok(c, 10, prompt, as("bob"));
  EXPECT_EQ(bob.cached_tokens, 0u);
  EXPECT_EQ(bob.migrated_tokens, 0u);
  const Placement alice = admit_ok(c, 11, prompt, as("alice"));
  EXPECT_EQ(alice.cached_tokens, prompt.size());
  if (GetParam() < config.coordinator.prefill_token_cost && alice.replica == 1) {
    EXPECT_EQ(alice.migrated_tokens, prompt.size());
  }
  step_ok(c);
  step_ok(c);
  // Bob's own copy is indexed under his salt: he hits it now, where it is or by moving it.
  const uint32_t bobs_copy = *c.replica_of(SeqId{10});
  const Placement again = admit_ok(c, 12, prompt, as("bob"));
  const bool reachable = again.replica == bobs_copy || GetParam() < 1.0;
  EXPECT_EQ(again.cached_tokens, reachable ? prompt.size() : 0u);
}

INSTANTIATE_TEST_SUITE_P(MigrationCost, TenantRoutingTest, ::testing::Values(0.1, 2.0));

TEST(TenantQuotaTest, QuotasRefuseWhatWouldPassThemAndChangeNothing) {
  Config config = serving_config(1, 1, 4, 4, 64, 0);
  config.tenants.max_sequences = 3;
  auto c = Coordinator::create(config).value();
  ASSERT_TRUE(c.set_tenant_quota("small", TenantQuota{4, 0, 0}).ok());
  EXPECT_EQ(c.tenant_quota("small").max_blocks, 4u);
  EXPECT_EQ(c.tenant_quota("anyone").max_sequences, 3u);
  // A quota that contradicts itself is refused, as in the config or a tenants file.
  const Status contradiction = c.set_tenant_quota("small", TenantQuota{4, 5, 0});
  EXPECT_EQ(contradiction.code(), ErrorCode::kInvalidArgument);
  EXPECT_EQ(contradiction.message(),
            "set_tenant_quota 'small': max_host_blocks (5) exceeds max_blocks (4), which counts "
            "host blocks too; nothing was changed");
  EXPECT_EQ(c.tenant_quota("small"), (TenantQuota{4, 0, 0}));

  // max_blocks (its own quota): 3 blocks, then 2 more would be 5 > 4.
  admit_ok(c, 1, token_run(3 * kBlock, 1), as("small"));
  const auto before = c.step();
  ASSERT_TRUE(before.ok());
  auto refused = c.admit(SeqId{2}, token_run(2 * kBlock, 900), as("small"));
  EXPECT_EQ(refused.status().code(), ErrorCode::kResourceExhausted);
  EXPECT_THAT(refused.status().message(), HasSubstr("max_blocks, its own quota"));
  EXPECT_THAT(refused.status().message(), HasSubstr("tenant 'small' holds 3 blocks"));
  // append: the 4th block fits, a 5th does not.
  ASSERT_TRUE(c.append(SeqId{1}, kBlock).ok());
  const Status append = c.append(SeqId{1}, kBlock);
  EXPECT_EQ(append.code(), ErrorCode::kResourceExhausted) << append;
  EXPECT_EQ(c.tenant_stats("small").blocks, 4u);
  // fork: the child's table counts too.
  EXPECT_EQ(c.fork(SeqId{1}, SeqId{3}).code(), ErrorCode::kResourceExhausted);
  EXPECT_FALSE(c.replica_of(SeqId{3}).has_value());
  EXPECT_EQ(c.tenant_stats("small").refused, 3u);

  // max_sequences (the tenants section) for a tenant without its own quota.
  for (uint64_t s = 10; s < 13; ++s)
    admit_ok(c, s, token_run(kBlock, 100 * s), as("big"));
  refused = c.admit(SeqId{13}, token_run(kBlock, 7), as("big"));
  EXPECT_EQ(refused.status().code(), ErrorCode::kResourceExhausted);
  EXPECT_THAT(refused.status().message(),
              HasSubstr("at most 3 (max_sequences, the tenants section)"));
  EXPECT_EQ(c.fork(SeqId{10}, SeqId{14}).code(), ErrorCode::kResourceExhausted);
  // Freeing gives the room back.
  ASSERT_TRUE(c.free(SeqId{10}).ok());
  admit_ok(c, 13, token_run(kBlock, 7), as("big"));
  EXPECT_EQ(c.tenant_stats("big").sequences, 3u);
  EXPECT_TRUE(c.verify_integrity().ok()) << c.verify_integrity();
  EXPECT_THAT(c.tenants(), ::testing::ElementsAre("", "big", "small"));
}

TEST(TenantQuotaTest, APriorityAboveTheTenantsMaximumIsRefused) {
  Config config = serving_config(1, 1, 4, 4, 64, 0);
  config.tenants.max_priority = 2;
  auto c = Coordinator::create(config).value();
  AdmitOptions high = as("t");
  high.priority = 3;
  const auto refused = c.admit(SeqId{1}, token_run(kBlock, 1), high);
  EXPECT_EQ(refused.status().code(), ErrorCode::kInvalidArgument);
  EXPECT_THAT(refused.status().message(),
              HasSubstr("priority 3 is above 2, the highest this tenant may give (max_priority, "
                        "the tenants section)"));
  high.priority = 2;
  admit_ok(c, 1, token_run(kBlock, 1), high);
  EXPECT_EQ(c.set_priority(SeqId{1}, 7).code(), ErrorCode::kInvalidArgument);
  ASSERT_TRUE(c.set_tenant_quota("t", TenantQuota{0, 0, 0, 7}).ok());
  EXPECT_TRUE(c.set_priority(SeqId{1}, 7).ok());
}

// The same state built twice; the quota refusal goes to one copy only; both then plan alike.
TEST(TenantQuotaTest, ARefusalForQuotaChangesNoPlan) {
  Config config = serving_config(1, 1, 4, 4, 8, 0);
  auto build = [&] {
    auto c = Coordinator::create(config).value();
    EXPECT_TRUE(c.set_tenant_quota("t", TenantQuota{6, 0, 0}).ok());
    admit_ok(c, 1, token_run(4 * kBlock, 1), as("t"));
    admit_ok(c, 2, token_run(4 * kBlock, 500), as("other"));
    return c;
  };
  Coordinator refused = build(), control = build();
  // The pool is full: were it admitted, the request would displace "other"; it is refused first.
  const auto r = refused.admit(SeqId{3}, token_run(3 * kBlock, 900), [] {
    AdmitOptions o = as("t");
    o.priority = 1;
    return o;
  }());
  EXPECT_EQ(r.status().code(), ErrorCode::kResourceExhausted);
  for (int i = 0; i < 2; ++i) {
    const auto a = refused.step(), b = control.step();
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(*a, *b);
  }
  EXPECT_EQ(refused.stats().preempted + refused.stats().swapped_out, 0u);
}

// Replica of 8 blocks: "hog" holds 6 in three sequences, "light" 2 in one, older and of lower
// priority. Light's append needs a block: the victim is hog's (it holds the most), not light's.
TEST(TenantFairnessTest, TheTenantHoldingTheMostBlocksGivesWayFirst) {
  auto c = Coordinator::create(serving_config(1, 1, 4, 4, 8, 16)).value();
  AdmitOptions light = as("light");
  admit_ok(c, 1, token_run(2 * kBlock, 1), light);
  AdmitOptions light2 = as("light");
  admit_ok(c, 5, token_run(kBlock - 1, 900), light2);
  AdmitOptions hog = as("hog");
  hog.priority = 1;
  for (uint64_t s = 2; s < 4; ++s)
    admit_ok(c, s, token_run(2 * kBlock, 100 * s), hog);
  admit_ok(c, 4, token_run(kBlock, 700), hog);
  step_ok(c);
  ASSERT_EQ(testing::available_blocks(c, 0), 0u);
  // Without tenants the victim would be S5 (priority 0, the older of the low ones after S1).
  ASSERT_TRUE(c.append(SeqId{1}, kBlock).ok());
  EXPECT_TRUE(c.is_swapped(SeqId{2}));  // hog's lowest-ordered sequence
  EXPECT_FALSE(c.is_swapped(SeqId{5}));
  EXPECT_EQ(c.tenant_stats("hog").host_blocks, 2u);
  step_ok(c);
}

TEST(TenantQuotaTest, AVictimAtItsHostQuotaIsPreemptedInsteadOfSwapped) {
  Config config = serving_config(1, 1, 4, 4, 4, 16);
  auto c = Coordinator::create(config).value();
  ASSERT_TRUE(c.set_tenant_quota("capped", TenantQuota{0, 1, 0}).ok());
  admit_ok(c, 1, token_run(2 * kBlock, 1), as("capped"));  // 2 blocks > its 1 host block
  admit_ok(c, 2, token_run(2 * kBlock, 500), as("growing"));
  step_ok(c);
  ASSERT_TRUE(c.append(SeqId{2}, 2 * kBlock).ok());
  EXPECT_FALSE(c.replica_of(SeqId{1}).has_value());  // dp 1: no peer to park on
  EXPECT_EQ(c.tenant_stats("capped").preempted, 1u);
  EXPECT_EQ(c.tenant_stats("capped").host_blocks, 0u);
  EXPECT_EQ(c.stats().swapped_out, 0u);
  step_ok(c);
}

// Three tenants with quotas share a dp 2 job; prompts overlap heavily across tenants. After every
// step the coordinator's integrity holds, no tenant passes its quota, and every admission's
// cached tokens are at most what its own salt (or the public range) has computed before.
TEST(TenantWorkloadTest, PropertySeededTenantsKeepEveryInvariant) {
  Config config = serving_config(2, 1, 4, 4, 24, 16);
  auto c = Coordinator::create(config).value();
  const std::vector<std::string> names = {"a", "b", "c"};
  ASSERT_TRUE(c.set_tenant_quota("a", TenantQuota{20, 6, 5}).ok());
  ASSERT_TRUE(c.set_tenant_quota("b", TenantQuota{30, 0, 0}).ok());
  ASSERT_TRUE(c.set_tenant_quota("c", TenantQuota{0, 4, 8}).ok());
  std::mt19937_64 rng(testing::property_seed(1800));
  // What each salt computed: the prompts admitted under it (the public one: their public part).
  std::map<std::string, std::vector<std::vector<TokenId>>> computed;
  auto longest_known = [&](const std::string& salt, const std::vector<TokenId>& p, size_t pub) {
    size_t best = 0;
    auto common = [&](const std::vector<TokenId>& q, size_t limit) {
      size_t n = 0;
      while (n < std::min({p.size(), q.size(), limit}) && p[n] == q[n])
        ++n;
      return n;
    };
    for (const auto& q : computed[salt])
      best = std::max(best, common(q, SIZE_MAX));
    for (const auto& q : computed[""])
      best = std::max(best, common(q, pub - pub % kBlock));
    return best;
  };
  std::map<uint64_t, std::string> live;
  uint64_t next = 1;
  const size_t steps = testing::property_count(150);
  for (size_t step = 0; step < steps; ++step) {
    std::set<uint64_t> preempted_now;  // by an earlier op of this step (an append's pressure)
    for (int op = 0; op < 4; ++op) {
      const std::string& tenant = names[rng() % names.size()];
      const uint64_t choice = rng() % 10;
      if (choice < 4) {
        std::vector<TokenId> prompt = token_run(kBlock * (1 + rng() % 3), 0);  // shared start
        for (size_t i = kBlock; i < prompt.size(); ++i)
          prompt[i] = static_cast<TokenId>(rng() % 2);
        const size_t pub = (rng() % 2) * kBlock;
        const size_t bound = longest_known(tenant, prompt, pub);
        auto placed = c.admit(SeqId{next}, prompt, as(tenant, pub));
        if (placed.ok()) {
          ASSERT_LE(placed->cached_tokens, bound) << testing::property_trace();
          computed[tenant].push_back(prompt);
          computed[""].push_back(prompt);  // only its public part counts (see longest_known)
          live[next] = tenant;
        }
        ++next;
      } else if (choice < 6 && !live.empty()) {
        auto it = live.begin();
        std::advance(it, static_cast<long>(rng() % live.size()));
        (void)c.append(SeqId{it->first}, 1 + rng() % (2 * kBlock));
      } else if (choice < 7 && !live.empty()) {
        auto it = live.begin();
        std::advance(it, static_cast<long>(rng() % live.size()));
        if (c.fork(SeqId{it->first}, SeqId{next}).ok()) live[next] = it->second;
        ++next;
      } else if (!live.empty()) {
        auto it = live.begin();
        std::advance(it, static_cast<long>(rng() % live.size()));
        const SeqId seq{it->first};
        if (c.replica_of(seq) || c.is_swapped(seq)) {
          ASSERT_TRUE(c.free(seq).ok()) << testing::property_trace();
        } else {
          preempted_now.insert(seq.value);  // the step's plan must say so
        }
        live.erase(it);
      }
    }
    const auto plan = c.step();
    ASSERT_TRUE(plan.ok()) << plan.status();
    for (SeqId gone : plan->preempted) {
      live.erase(gone.value);
      preempted_now.erase(gone.value);
    }
    ASSERT_TRUE(preempted_now.empty())
        << "S" << *preempted_now.begin() << " left without a plan saying so"
        << testing::property_trace();
    ASSERT_TRUE(c.verify_integrity().ok()) << c.verify_integrity() << testing::property_trace();
    for (const std::string& t : names) {
      const TenantQuota q = c.tenant_quota(t);
      const TenantStats s = c.tenant_stats(t);
      if (q.max_blocks) {
        ASSERT_LE(s.blocks, q.max_blocks) << t;
      }
      if (q.max_host_blocks) {
        ASSERT_LE(s.host_blocks, q.max_host_blocks) << t;
      }
      if (q.max_sequences) {
        ASSERT_LE(s.sequences, q.max_sequences) << t;
      }
    }
  }
  EXPECT_GT(c.stats().admitted, 0u);
}

}  // namespace
}  // namespace kvfabric

namespace kvfabric {
namespace {

// A client can compute 16 tokens whose salted block key equals another tenant's block key (the
// unit hash is fast, not cryptographic, and invertible). Colliding blocks must be siblings told
// apart by tokens and salt: neither reading the victim's presence (cached_tokens) nor keeping
// the victim's prompt out of the cache.
class CollidingBlockTest : public ::testing::Test {
 protected:
  static constexpr uint64_t kMul = 0xff51afd7ed558ccdULL, kSaltMul = 0x9fb21c651e98df25ULL;
  static constexpr uint64_t kTop = 1ULL << 63;
  static uint64_t inverse(uint64_t a) {  // of an odd number, mod 2^64 (Newton)
    uint64_t x = a;
    for (int i = 0; i < 6; ++i)
      x *= 2 - a * x;
    return x;
  }
  static uint64_t undo_xorshift(uint64_t y, int s) {
    uint64_t x = y;
    for (int i = 0; i < 64 / s + 1; ++i)
      x = y ^ (x >> s);
    return x;
  }
  static CacheSalt tenant_salt(const std::string& tenant) {
    return CacheSalt::of(std::to_string(tenant.size()) + ":" + tenant);
  }
  // A unit key u with radix_salted_key(u, salt) == target.
  static std::optional<uint64_t> unsalt(uint64_t target, const CacheSalt& salt) {
    for (uint64_t h2 : {target, target | kTop}) {
      const uint64_t h1 = (undo_xorshift(h2, 31) * inverse(kSaltMul)) ^ salt.lo;
      const uint64_t h = (undo_xorshift(h1, 31) * inverse(kSaltMul)) ^ salt.hi;
      if ((h & kTop) == 0) return h;
    }
    return std::nullopt;
  }
  // 16 tokens whose unit key (granularity 16) is h.
  static std::vector<TokenId> unhash(uint64_t h) {
    std::vector<TokenId> t(16, 5);
    uint64_t lanes[4] = {0x9e3779b97f4a7c15ULL, 0xc2b2ae3d27d4eb4fULL, 0x165667b19e3779f9ULL,
                         0x27d4eb2f165667c5ULL};
    auto round = [](uint64_t x) {
      x *= kMul;
      return x ^ (x >> 29);
    };
    for (int l = 0; l < 4; ++l) {
      for (int i : {0, 8}) {
        if (l == 0 && i == 8) continue;  // the word solved for below
        uint64_t w;
        std::memcpy(&w, &t[i + 2 * l], sizeof w);
        lanes[l] = round(lanes[l] ^ w);
      }
    }
    uint64_t x = h;
    for (int l = 3; l >= 1; --l)
      x = (undo_xorshift(x, 32) * inverse(kMul)) ^ lanes[l];
    const uint64_t lane0 = (undo_xorshift(x, 32) * inverse(kMul)) ^ 16;
    const uint64_t w = (undo_xorshift(lane0, 29) * inverse(kMul)) ^ lanes[0];
    t[8] = static_cast<TokenId>(w);
    t[9] = static_cast<TokenId>(w >> 32);
    return t;
  }

  void SetUp() override {
    secret_ = token_run(3 * kBlock, 7000);
    const uint64_t target = detail::radix_salted_key(
        detail::radix_unit_key(std::span(secret_).first(kBlock), kBlock), tenant_salt("alice"));
    const auto unit = unsalt(target, tenant_salt("mallory"));
    ASSERT_TRUE(unit.has_value());
    probe_ = unhash(*unit);
    // The construction follows the hash: if the hash changes, this test must change with it.
    ASSERT_EQ(
        detail::radix_salted_key(detail::radix_unit_key(probe_, kBlock), tenant_salt("mallory")),
        target);
    const auto tail = token_run(kBlock, 1);
    probe_.insert(probe_.end(), tail.begin(), tail.end());
  }

  std::vector<TokenId> secret_, probe_;
};

TEST_F(CollidingBlockTest, ACollidingBlockRevealsNothingAndBlocksNothing) {
  for (bool victim_cached : {false, true}) {
    auto c = Coordinator::create(serving_config(1, 1, 4, 4, 64, 0)).value();
    if (victim_cached) admit_computed(c, 1, secret_, as("alice"));
    admit_computed(c, 10, probe_, as("mallory"));
    EXPECT_EQ(admit_ok(c, 11, probe_, as("mallory")).cached_tokens, probe_.size())
        << "victim cached: " << victim_cached;
    if (victim_cached) {
      EXPECT_EQ(admit_ok(c, 2, secret_, as("alice")).cached_tokens, secret_.size());
    }
  }
  // Planted first, the attacker's block does not keep Alice's prompt out of the cache.
  auto c = Coordinator::create(serving_config(1, 1, 4, 4, 64, 0)).value();
  admit_computed(c, 10, probe_, as("mallory"));
  admit_computed(c, 1, secret_, as("alice"));
  EXPECT_EQ(admit_ok(c, 2, secret_, as("alice")).cached_tokens, secret_.size());
  EXPECT_EQ(admit_ok(c, 12, probe_, as("mallory")).cached_tokens, probe_.size());
  // Freed and evicted in any order, the siblings leave the index consistent.
  for (uint64_t s : {1, 2, 10, 12})
    ASSERT_TRUE(c.free(SeqId{s}).ok());
  step_ok(c);
}

}  // namespace
}  // namespace kvfabric
