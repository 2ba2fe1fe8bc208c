// A sequence's token-compression policy in a coordinated job (DESIGN.md §5): which rule picks the
// tokens its cache keeps, how many, and how often the coordinator compacts it.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvfabric/common/status.h"

namespace kvfabric::quant {

//! \brief What admit() is asked to compress a sequence's KV with (AdmitOptions::compression).
//!
//! - `streaming` (StreamingLLM): the first `sink_tokens` and the newest tokens, every
//!   `interval_steps`; needs no scores. It drops whole blocks' worth of tokens, so that the
//!   blocks after the dropped span stay in place and a compaction copies at most one block: the
//!   cache holds up to budget + block size - 1 tokens.
//! - `h2o`: the newest `recent_tokens` and the heaviest older ones by accumulated attention mass
//!   (every shard's decode mass, summed over the replica's shards), every `interval_steps`.
//! - `snapkv`: once, after the prompt is computed: the prompt's last `window_tokens` (the
//!   observation window) and the older prompt tokens with the most pooled votes from that window
//!   (quant::snapkv_scores, summed over shards). Tokens decoded after the prompt are all kept.
//! - `pyramid` (PyramidKV): SnapKV's selection once, after the prompt, with a budget per layer
//!   group: the budget is the average over the layers, each layer's falls linearly from the
//!   first to the last, whose budget is the average / `beta` (pyramid_layer_budgets), and a
//!   group keeps the mean of its layers' (at least the observation window). The selections are
//!   nested: every group keeps the prompt tokens with the most votes that its budget allows.
//!   Needs cache.layers_per_group (a table per layer group).
//!
//! The budget is `budget_tokens`, or `budget_ratio` of the prompt's length (rounded up); exactly
//! one of them is set. Tokens whose K/V the next forward pass has yet to compute are always kept.
struct CompressionPolicy {
  enum class Kind : uint8_t { kStreaming, kH2o, kSnapKv, kPyramid };
  Kind kind = Kind::kH2o;
  uint64_t budget_tokens = 0;
  double budget_ratio = 0;
  uint32_t interval_steps = 1;   //!< streaming, h2o: steps between compactions (>= 1)
  uint64_t sink_tokens = 4;      //!< streaming: leading tokens always kept
  uint64_t recent_tokens = 0;    //!< h2o: newest tokens always kept (<= budget); 0 = budget / 2
  uint64_t window_tokens = 32;   //!< snapkv, pyramid: the observation window (>= 1, <= budget)
  double beta = 20;              //!< pyramid: the average budget over the last layer's (>= 1)

  //! Whether the coordinator needs the sequence's attention scores to compact it.
  [[nodiscard]] bool needs_scores() const { return kind != Kind::kStreaming; }

  friend bool operator==(const CompressionPolicy&, const CompressionPolicy&) = default;
};

//! "streaming", "h2o", "snapkv", "pyramid".
std::string_view to_string(CompressionPolicy::Kind kind);
//! The kind named `name`; InvalidArgument naming the accepted names otherwise.
Result<CompressionPolicy::Kind> parse_compression_kind(std::string_view name);

//! Sets the numeric field `name` of `policy` (budget_tokens, budget_ratio, interval_steps,
//! sink_tokens, recent_tokens, window_tokens, beta) to `value`, as the control plane, the Python module
//! and `replay --compression` give them. InvalidArgument naming the field (nothing changes): an
//! unknown name, or a count that is not a whole number in its field's range. The policy as a
//! whole is checked by validate().
Status set_compression_field(CompressionPolicy& policy, std::string_view name, double value);

//! The checks admit() makes: exactly one of budget_tokens and budget_ratio (a ratio in (0, 1]),
//! interval_steps >= 1, recent_tokens and window_tokens within the budget, window_tokens >= 1.
//! Errors name the field ("compression.budget_ratio ...").
Status validate(const CompressionPolicy& policy);

//! The budget in tokens for a prompt of `prompt_tokens`: budget_tokens, or
//! ceil(budget_ratio * prompt_tokens) (at least 1). For snapkv and pyramid (whose budget is the
//! average over the layers) at least window_tokens.
uint64_t budget_for(const CompressionPolicy& policy, uint64_t prompt_tokens);

//! pyramid: the budget of each of the `num_layers / layers_per_group` layer groups for an
//! average `budget`: the mean of its layers' pyramid_layer_budgets (policy.beta), rounded up,
//! and at least window_tokens. Non-increasing with depth. InvalidArgument: layers_per_group 0 or
//! not dividing num_layers, or the errors of pyramid_layer_budgets.
Result<std::vector<uint64_t>> pyramid_group_budgets(const CompressionPolicy& policy,
                                                    uint64_t budget, uint32_t num_layers,
                                                    uint32_t layers_per_group);

//! \brief What a compaction keeps of a sequence (ascending positions), or all `num_tokens` of
//! them when compacting would not drop any.
//!
//! Positions at or past `computed_tokens` are always kept (their K/V is not computed yet), and
//! so are positions the scores do not cover (`scores` covers [0, scores.size())). For snapkv,
//! `prompt_tokens` is the prompt's length (the observation window ends there, and decoded tokens
//! after it stay; pyramid selects as snapkv, with one layer group's budget); for streaming the scores are ignored and `block_size` rounds the dropped span
//! down to whole blocks. Deterministic: ties keep the newer token.
//!
//! For h2o, `arrival[i]` is when the token in slot i arrived (one per slot, distinct, larger =
//! newer) when slot order is not arrival order, as after fill_dropped_slots: the recent window
//! is then the newest `recent_tokens` arrivals wherever they sit. Empty (or not one per slot):
//! slot order.
std::vector<size_t> select_kept_tokens(const CompressionPolicy& policy, uint64_t budget,
                                       size_t num_tokens, size_t computed_tokens,
                                       size_t prompt_tokens, std::span<const double> scores,
                                       size_t block_size = 1,
                                       std::span<const uint32_t> arrival = {});

//! \brief When the token in each slot of a sequence arrived, for H2O once compactions have moved
//! tokens out of arrival order (fill_dropped_slots). Empty until the first follow(): slot order
//! is arrival order until then. Arrivals are counted in 32 bits; should the count run out, the
//! listed ones are renumbered by rank (their order is all that counts).
class ArrivalOrder {
 public:
  //! `next_arrival`: the number the next arrival gets (tests start it near the limit).
  explicit ArrivalOrder(uint32_t next_arrival = 0) : next_(next_arrival) {}

  //! Per slot, or empty (slot order).
  [[nodiscard]] std::span<const uint32_t> arrival() const { return arrival_; }
  //! Slots from the listed ones up to `num_tokens` arrived after them, in slot order (tokens
  //! appended since). Does nothing while empty.
  void note_appended(size_t num_tokens);
  //! After a compaction of `tokens_before` tokens that put the token of slot order[i] in slot i.
  void follow(std::span<const size_t> order, size_t tokens_before);

 private:
  void extend(size_t num_tokens);
  std::vector<uint32_t> arrival_;
  uint32_t next_ = 0;
};

//! \brief The order in which a compaction lays out `kept` (ascending positions): the i-th listed
//! token goes to slot i. Of the tokens before `scored_tokens` (those the scores cover, all
//! computed), the kept ones below their own count stay in place and the dropped slots among them
//! take the kept ones above it, in ascending order; the kept tokens from `scored_tokens` on
//! (decoded since the scores were taken, the uncomputed among them) follow in order. A
//! compaction then moves about as many tokens as it drops instead of every token after the first
//! one dropped, the scores renumbered by it still cover a prefix of the slots, and uncomputed
//! tokens stay last. Each listed position is at or after its slot (PagedKvCache::retain_tokens'
//! condition).
std::vector<size_t> fill_dropped_slots(std::span<const size_t> kept, size_t scored_tokens);

}  // namespace kvfabric::quant
