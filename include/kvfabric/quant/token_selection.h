// Which tokens a compressed KV cache keeps: H2O heavy hitters with a recent window, StreamingLLM
// sink + window, SnapKV's observation-window votes, and PyramidKV per-layer budgets. Pure
// functions of scores and lengths, so every rank and every replay picks the same tokens.
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
//! The same where index order is not arrival order: token i arrived at `arrival[i]` (distinct,
//! larger = newer, one per score), and the newest arrival of the sequence is `newest` (tokens
//! not scored here included). The tokens among the newest `recent` arrivals stay, then the
//! highest scores up to `budget` in all; ties keep the newer arrival. (More than `budget` only
//! when the window's scored tokens alone are more.)
std::vector<size_t> select_heavy_hitters(std::span<const double> scores,
                                         std::span<const uint32_t> arrival, uint64_t newest,
                                         size_t budget, size_t recent);

//! StreamingLLM: of `num_tokens` tokens keeps at most min(budget, sink + window): the first
//! tokens (up to `sink`) and the newest ones. When the budget is short the window shrinks first,
//! then the sink. Returns kept indices, ascending.
std::vector<size_t> select_sliding_window(size_t num_tokens, size_t budget, size_t sink,
                                          size_t window);

//! How SnapKV smooths its votes over neighbouring positions (SnapKV's code offers both).
enum class SnapKvPooling { kMax, kAvg };

struct SnapKvOptions {
  size_t budget = 0;   //!< tokens kept, the observation window included; >= window
  size_t window = 32;  //!< the prompt's last `window` tokens, whose queries vote; >= 1
  size_t kernel = 7;   //!< pooling width over positions; odd, >= 1 (1 = no pooling)
  SnapKvPooling pooling = SnapKvPooling::kMax;
};

//! SnapKV's pooled votes for the tokens before the observation window. `window_attention` holds,
//! per head, the softmax weights of the prompt's last `window` queries over all `num_tokens`
//! prompt tokens: [num_heads][window][num_tokens], row-major. Each head sums its window's weights
//! per token (its vote) and pools them over positions (kernel centred on the token, clipped at
//! the ends; avg divides by the positions inside), so a token next to a heavy one scores too and
//! clusters survive whole; the heads' pooled votes are then summed, because the cache keeps one
//! set of tokens for all heads. Returns num_tokens - window scores, oldest first. Errors name the
//! parameter: num_heads 0, window 0 or > num_tokens, kernel even or 0, a size that does not match,
//! a weight that is negative, infinite or NaN.
Result<std::vector<double>> snapkv_scores(std::span<const double> window_attention,
                                          size_t num_heads, size_t num_tokens,
                                          const SnapKvOptions& options);

//! SnapKV: of `num_tokens` prompt tokens keeps at most `budget`: the observation window (the
//! newest `window`) and the highest pooled votes (snapkv_scores) among the older ones. Equal
//! scores keep the newer token, as in select_heavy_hitters (which it uses). Returns kept indices,
//! ascending. Errors: those of snapkv_scores, and budget < window.
Result<std::vector<size_t>> select_snapkv(std::span<const double> window_attention,
                                          size_t num_heads, size_t num_tokens,
                                          const SnapKvOptions& options);

//! PyramidKV: token budgets of `num_layers` layers whose average is `average_budget`, decreasing
//! linearly from the first layer to the last, whose budget is average / beta (at least 1). They
//! sum to exactly num_layers * average_budget (largest remainders round up, ties to the lower
//! layer) and never increase with depth. Errors: num_layers or average_budget 0, beta not a
//! finite value >= 1.
Result<std::vector<size_t>> pyramid_layer_budgets(size_t average_budget, size_t num_layers,
                                                  double beta);

}  // namespace kvfabric::quant
