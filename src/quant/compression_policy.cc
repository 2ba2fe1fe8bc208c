#include "kvfabric/quant/compression_policy.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <numeric>
#include <string>

#include "kvfabric/quant/token_selection.h"

namespace kvfabric::quant {
namespace {

// A client's number as short as it reads back exactly (1e+300, not 301 digits).
std::string number_text(double value) {
  char text[32];
  const auto [end, ec] = std::to_chars(std::begin(text), std::end(text), value);
  return ec == std::errc() ? std::string(text, end) : std::to_string(value);
}

// [from, to) appended to `kept`.
void keep_range(std::vector<size_t>& kept, size_t from, size_t to) {
  for (size_t i = from; i < to; ++i) kept.push_back(i);
}

std::vector<size_t> all_tokens(size_t n) {
  std::vector<size_t> kept(n);
  std::iota(kept.begin(), kept.end(), size_t{0});
  return kept;
}

// The heaviest of the scored slots [0, scored) (the newest `recent` of them always), then every
// slot from `scored` to `n`, kept whatever the budget: so `budget` counts them first. `arrival`
// gives each slot's arrival order when that is not slot order.
std::vector<size_t> heaviest_then_rest(std::span<const double> scores, size_t scored, size_t n,
                                       uint64_t budget, uint64_t recent,
                                       std::span<const uint32_t> arrival) {
  const size_t rest = n - scored;
  const size_t heavy_budget = budget > rest ? static_cast<size_t>(budget - rest) : 0;
  const size_t recent_left = recent > rest ? static_cast<size_t>(recent - rest) : 0;
  const size_t recent_kept = std::min(recent_left, heavy_budget);
  std::vector<size_t> kept;
  if (arrival.empty()) {
    kept = select_heavy_hitters(scores.first(scored), heavy_budget, recent_kept);
  } else {
    // The unscored slots hold the newest arrivals, so the window reaches back over them.
    const uint64_t newest = *std::max_element(arrival.begin(), arrival.end());
    kept = select_heavy_hitters(scores.first(scored), arrival.first(scored), newest, heavy_budget,
                                recent_kept + rest);
  }
  keep_range(kept, scored, n);
  return kept;
}

std::string field(std::string_view name) { return "compression." + std::string(name); }

}  // namespace

std::string_view to_string(CompressionPolicy::Kind kind) {
  switch (kind) {
    case CompressionPolicy::Kind::kStreaming:
      return "streaming";
    case CompressionPolicy::Kind::kH2o:
      return "h2o";
    case CompressionPolicy::Kind::kSnapKv:
      return "snapkv";
    case CompressionPolicy::Kind::kPyramid:
      return "pyramid";
  }
  return "unknown";
}

Result<CompressionPolicy::Kind> parse_compression_kind(std::string_view name) {
  if (name == "streaming") return CompressionPolicy::Kind::kStreaming;
  if (name == "h2o") return CompressionPolicy::Kind::kH2o;
  if (name == "snapkv") return CompressionPolicy::Kind::kSnapKv;
  if (name == "pyramid") return CompressionPolicy::Kind::kPyramid;
  return invalid_argument("compression.policy '" + std::string(name) +
                          "' is unknown; expected streaming, h2o, snapkv or pyramid");
}

Status set_compression_field(CompressionPolicy& policy, std::string_view name, double value) {
  if (name == "budget_ratio") {
    policy.budget_ratio = value;
    return ok_status();
  }
  if (name == "beta") {
    policy.beta = value;
    return ok_status();
  }
  using Policy = CompressionPolicy;
  struct Count {
    std::string_view name;
    uint64_t max;
    void (*set)(Policy&, uint64_t);
  };
  constexpr Count kCounts[] = {
      {"budget_tokens", UINT64_MAX, [](Policy& p, uint64_t n) { p.budget_tokens = n; }},
      {"interval_steps", UINT32_MAX,
       [](Policy& p, uint64_t n) { p.interval_steps = static_cast<uint32_t>(n); }},
      {"sink_tokens", UINT64_MAX, [](Policy& p, uint64_t n) { p.sink_tokens = n; }},
      {"recent_tokens", UINT64_MAX, [](Policy& p, uint64_t n) { p.recent_tokens = n; }},
      {"window_tokens", UINT64_MAX, [](Policy& p, uint64_t n) { p.window_tokens = n; }},
  };
  const auto* count = std::find_if(std::begin(kCounts), std::end(kCounts),
                                   [&](const Count& c) { return c.name == name; });
  if (count == std::end(kCounts)) {
    return invalid_argument("compression: unknown key '" + std::string(name) +
                            "' (policy, budget_tokens, budget_ratio, interval_steps, sink_tokens, "
                            "recent_tokens, window_tokens, beta)");
  }
  // Converting a double at or past 2^64 (or inf, or NaN) to an integer is undefined: such a
  // value is no count.
  if (!(value >= 0 && value < 0x1p64 && std::floor(value) == value &&
        static_cast<uint64_t>(value) <= count->max)) {
    return invalid_argument(field(name) + " " + number_text(value) +
                            " must be a whole number in [0, " + std::to_string(count->max) + "]");
  }
  count->set(policy, static_cast<uint64_t>(value));
  return ok_status();
}

Status validate(const CompressionPolicy& p) {
  const bool has_tokens = p.budget_tokens != 0;
  const bool has_ratio = p.budget_ratio != 0;
  if (!has_tokens && !has_ratio) {
    return invalid_argument("a compression budget is needed: " + field("budget_tokens") +
                            " (tokens, > 0) or " + field("budget_ratio") +
                            " (the share of the prompt kept, in (0, 1]); a 0 sets neither");
  }
  if (has_tokens && has_ratio) {
    return invalid_argument(field("budget_tokens") + " " + std::to_string(p.budget_tokens) +
                            " and " + field("budget_ratio") + " " + number_text(p.budget_ratio) +
                            ": set only one");
  }
  if (has_ratio && !(std::isfinite(p.budget_ratio) && p.budget_ratio > 0 && p.budget_ratio <= 1)) {
    return invalid_argument(field("budget_ratio") + " " + number_text(p.budget_ratio) +
                            " must be in (0, 1] (the share of the prompt kept)");
  }
  // Read by pyramid only, but a value no policy could use is refused for every policy.
  if (!(std::isfinite(p.beta) && p.beta >= 1)) {
    return invalid_argument(field("beta") + " " + number_text(p.beta) +
                            " must be a finite value >= 1 (the average budget over the last "
                            "layer's)");
  }
  if (p.interval_steps == 0) {
    return invalid_argument(field("interval_steps") + " must be >= 1 (steps between compactions)");
  }
  switch (p.kind) {
    case CompressionPolicy::Kind::kStreaming:
      break;
    case CompressionPolicy::Kind::kH2o:
      if (has_tokens && p.recent_tokens > p.budget_tokens) {
        return invalid_argument(field("recent_tokens") + " " + std::to_string(p.recent_tokens) +
                                " exceeds " + field("budget_tokens") + " " +
                                std::to_string(p.budget_tokens));
      }
      break;
    case CompressionPolicy::Kind::kPyramid:
    case CompressionPolicy::Kind::kSnapKv:
      if (p.window_tokens == 0) {
        return invalid_argument(field("window_tokens") +
                                " must be >= 1 (the prompt's last queries vote)");
      }
      if (has_tokens && p.window_tokens > p.budget_tokens) {
        const bool default_window = p.window_tokens == CompressionPolicy{}.window_tokens;
        return invalid_argument(field("window_tokens") + " " + std::to_string(p.window_tokens) +
                                (default_window ? " (the default)" : "") + " exceeds " +
                                field("budget_tokens") + " " + std::to_string(p.budget_tokens) +
                                " (the observation window is kept whole)");
      }
      break;
  }
  return ok_status();
}

uint64_t budget_for(const CompressionPolicy& policy, uint64_t prompt_tokens) {
  uint64_t budget = policy.budget_tokens;
  if (budget == 0) {
    budget = static_cast<uint64_t>(std::ceil(policy.budget_ratio * static_cast<double>(prompt_tokens)));
    budget = std::max<uint64_t>(budget, 1);
  }
  if (policy.kind == CompressionPolicy::Kind::kSnapKv ||
      policy.kind == CompressionPolicy::Kind::kPyramid) {
    budget = std::max(budget, policy.window_tokens);
  }
  return budget;
}

Result<std::vector<uint64_t>> pyramid_group_budgets(const CompressionPolicy& policy,
                                                    uint64_t budget, uint32_t num_layers,
                                                    uint32_t layers_per_group) {
  if (layers_per_group == 0 || num_layers % layers_per_group != 0) {
    return invalid_argument("PyramidKV's layer groups of " + std::to_string(layers_per_group) +
                            " layers do not divide the " + std::to_string(num_layers) + " layers");
  }
  KVF_ASSIGN_OR_RETURN(const std::vector<size_t> per_layer,
                       pyramid_layer_budgets(budget, num_layers, policy.beta));
  std::vector<uint64_t> groups;
  for (uint32_t first = 0; first < num_layers; first += layers_per_group) {
    uint64_t sum = 0;
    for (uint32_t l = first; l < first + layers_per_group; ++l) sum += per_layer[l];
    groups.push_back(std::max<uint64_t>((sum + layers_per_group - 1) / layers_per_group,
                                        policy.window_tokens));
  }
  return groups;
}

std::vector<size_t> select_kept_tokens(const CompressionPolicy& policy, uint64_t budget,
                                       size_t num_tokens, size_t computed_tokens,
                                       size_t prompt_tokens, std::span<const double> scores,
                                       size_t block_size, std::span<const uint32_t> arrival) {
  const size_t n = num_tokens;
  const size_t computed = std::min(computed_tokens, n);
  switch (policy.kind) {
    case CompressionPolicy::Kind::kStreaming: {
      if (n <= budget) return all_tokens(n);
      const size_t sink = static_cast<size_t>(std::min<uint64_t>(policy.sink_tokens, budget));
      // The newest budget - sink tokens, reaching back over any uncomputed ones, and then back
      // to a whole number of blocks dropped.
      const size_t budget_from = std::min(n - (static_cast<size_t>(budget) - sink), computed);
      if (budget_from <= sink) return all_tokens(n);
      const size_t bs = std::max<size_t>(block_size, 1);
      const size_t window_from = sink + (budget_from - sink) / bs * bs;
      if (window_from == sink) return all_tokens(n);
      std::vector<size_t> kept;
      keep_range(kept, 0, sink);
      keep_range(kept, window_from, n);
      return kept;
    }
    case CompressionPolicy::Kind::kH2o: {
      if (n <= budget) return all_tokens(n);
      const uint64_t recent = policy.recent_tokens != 0 ? policy.recent_tokens : budget / 2;
      // An arrival list that does not name every slot cannot be read: slot order then.
      const auto arrival_order = arrival.size() == n ? arrival : std::span<const uint32_t>();
      return heaviest_then_rest(scores, std::min(scores.size(), computed), n, budget, recent,
                                arrival_order);
    }
    case CompressionPolicy::Kind::kSnapKv:
    case CompressionPolicy::Kind::kPyramid: {
      const size_t prompt = std::min(prompt_tokens, computed);
      if (prompt <= budget) return all_tokens(n);
      // Budget the prompt; everything decoded after it stays.
      const size_t voters_from = prompt - static_cast<size_t>(std::min<uint64_t>(policy.window_tokens, prompt));
      const size_t scored = std::min(scores.size(), voters_from);
      std::vector<size_t> kept = heaviest_then_rest(scores, scored, prompt, budget, 0, {});
      keep_range(kept, prompt, n);
      return kept;
    }
  }
  return all_tokens(n);
}

std::vector<size_t> fill_dropped_slots(std::span<const size_t> kept, size_t scored_tokens) {
  // The scored tokens come first: those below their count stay, and the dropped slots among
  // them take the scored tokens above it, lowest slot first. The rest follow in order.
  const auto scored_end = std::lower_bound(kept.begin(), kept.end(), scored_tokens);
  const auto kept_scored = static_cast<size_t>(scored_end - kept.begin());
  const auto in_place_end = std::lower_bound(kept.begin(), scored_end, kept_scored);
  std::vector<size_t> order(kept.size());
  auto stays = kept.begin();
  auto filler = in_place_end;
  for (size_t slot = 0; slot < kept_scored; ++slot) {
    order[slot] = stays != in_place_end && *stays == slot ? *stays++ : *filler++;
  }
  std::copy(scored_end, kept.end(), order.begin() + static_cast<ptrdiff_t>(kept_scored));
  return order;
}

void ArrivalOrder::note_appended(size_t num_tokens) {
  if (!arrival_.empty()) extend(num_tokens);
}

void ArrivalOrder::follow(std::span<const size_t> order, size_t tokens_before) {
  extend(tokens_before);
  std::vector<uint32_t> after(order.size());
  for (size_t i = 0; i < order.size(); ++i) after[i] = arrival_[order[i]];
  arrival_ = std::move(after);
}

void ArrivalOrder::extend(size_t num_tokens) {
  const size_t listed = arrival_.size();
  if (listed >= num_tokens) return;
  if (num_tokens - listed > UINT32_MAX - uint64_t{next_}) {
    std::vector<uint32_t> by_arrival(listed);
    std::iota(by_arrival.begin(), by_arrival.end(), 0u);
    std::sort(by_arrival.begin(), by_arrival.end(),
              [&](uint32_t a, uint32_t b) { return arrival_[a] < arrival_[b]; });
    for (size_t rank = 0; rank < listed; ++rank) {
      arrival_[by_arrival[rank]] = static_cast<uint32_t>(rank);
    }
    next_ = static_cast<uint32_t>(listed);
  }
  arrival_.resize(num_tokens);
  for (size_t slot = listed; slot < num_tokens; ++slot) arrival_[slot] = next_++;
}

}  // namespace kvfabric::quant
