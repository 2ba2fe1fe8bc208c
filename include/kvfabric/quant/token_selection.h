// Which tokens a compressed KV cache keeps: H2O heavy hitters with a recent window, StreamingLLM
// sink + window, and PyramidKV per-layer budgets. Pure functions of scores and lengths, so every
// rank and every replay picks the same tokens.
#pragma once

#include <cstddef>
#include <span>
#include <vector>

#include "kvfabric/common/status.h"

namespace kvfabric::quant {

//! H2O: of `scores.size()` tokens (oldest first) keeps at most `budget`: the newest
//! min(recent, budget), then the highest accumulated scores among the older ones. Equal scores
//! keep the newer token, so with no scores the rule is FIFO. Returns kept indices, ascending.
//! Scores must not be NaN (the caller checks; see update_attention_scores).
std::vector<size_t> select_heavy_hitters(std::span<const double> scores, size_t budget,
                                         size_t recent);

//! StreamingLLM: of `num_tokens` tokens keeps at most min(budget, sink + window): the first
//! tokens (up to `sink`) and the newest ones. When the budget is short the window shrinks first,
//! then the sink. Returns kept indices, ascending.
std::vector<size_t> select_sliding_window(size_t num_tokens, size_t budget, size_t sink,
                                          size_t window);

//! PyramidKV: token budgets of `num_layers` layers whose average is `average_budget`, decreasing
//! linearly from the first layer to the last, whose budget is average / beta (at least 1). They
//! sum to exactly num_layers * average_budget (largest remainders round up, ties to the lower
//! layer) and never increase with depth. Errors: num_layers or average_budget 0, beta not a
//! finite value >= 1.
Result<std::vector<size_t>> pyramid_layer_budgets(size_t average_budget, size_t num_layers,
                                                  double beta);

}  // namespace kvfabric::quant
