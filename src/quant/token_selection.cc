#include "kvfabric/quant/token_selection.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>

namespace kvfabric::quant {

namespace {

// H2O over tokens whose arrival order is `arrival(i)` (distinct, larger = newer; the newest is
// `newest`): the tokens among the newest `window` arrivals stay, then the highest scores up to
// `budget` in all, newer first on ties. Ascending indices.
template <typename Arrival>
std::vector<size_t> heaviest_and_recent(std::span<const double> scores, size_t budget,
                                        uint64_t window, Arrival arrival, uint64_t newest) {
  const size_t n = scores.size();
  if (n <= budget) {
    std::vector<size_t> all(n);
    std::iota(all.begin(), all.end(), size_t{0});
    return all;
  }
  const auto in_window = [&](size_t i) { return uint64_t{arrival(i)} + window > newest; };
  std::vector<uint8_t> chosen(n, 0);
  std::vector<size_t> candidates;
  candidates.reserve(n);
  size_t kept_count = 0;
  for (size_t i = 0; i < n; ++i) {
    if (in_window(i)) {
      chosen[i] = 1;
      ++kept_count;
    } else {
      candidates.push_back(i);
    }
  }
  // Rank the older tokens by score, newer first on ties; keep the first `heavy`. One partial
  // selection instead of the seed's repeated minimum search (O(n) instead of O(n^2)).
  const size_t heavy = std::min(budget - std::min(kept_count, budget), candidates.size());
  const auto heavier = [&](size_t a, size_t b) {
    return scores[a] != scores[b] ? scores[a] > scores[b] : arrival(a) > arrival(b);
  };
  std::nth_element(candidates.begin(), candidates.begin() + static_cast<ptrdiff_t>(heavy),
                   candidates.end(), heavier);
  // Back to ascending order by marking the chosen ones: O(n), where sorting them was O(k log k)
  // and most of a compaction's selection time.
  for (size_t k = 0; k < heavy; ++k) chosen[candidates[k]] = 1;
  std::vector<size_t> kept(kept_count + heavy);
  size_t next = 0;
  for (size_t i = 0; i < n; ++i) {
    if (chosen[i] != 0) kept[next++] = i;
  }
  return kept;
}

}  // namespace

std::vector<size_t> select_heavy_hitters(std::span<const double> scores, size_t budget,
                                         size_t recent) {
  const auto index = [](size_t i) { return i; };
  return heaviest_and_recent(scores, budget, std::min(recent, budget), index,
                             scores.empty() ? 0 : scores.size() - 1);
}

std::vector<size_t> select_heavy_hitters(std::span<const double> scores,
                                         std::span<const uint32_t> arrival, uint64_t newest,
                                         size_t budget, size_t recent) {
  const auto arrived = [&](size_t i) { return arrival[i]; };
  return heaviest_and_recent(scores, budget, recent, arrived, newest);
}

std::vector<size_t> select_sliding_window(size_t num_tokens, size_t budget, size_t sink,
                                          size_t window) {
  const size_t keep = std::min({num_tokens, budget, sink + window});
  const size_t kept_sink = std::min(sink, keep);
  std::vector<size_t> kept(keep);
  std::iota(kept.begin(), kept.begin() + static_cast<ptrdiff_t>(kept_sink), size_t{0});
  std::iota(kept.begin() + static_cast<ptrdiff_t>(kept_sink), kept.end(),
            num_tokens - (keep - kept_sink));
  return kept;
}

namespace {

Status check_snapkv_arguments(std::span<const double> window_attention, size_t num_heads,
                              size_t num_tokens, const SnapKvOptions& o) {
  if (num_heads == 0) return invalid_argument("SnapKV num_heads must be >= 1");
  if (o.window == 0) return invalid_argument("SnapKV window must be >= 1 (the queries that vote)");
  if (o.window > num_tokens) {
    return invalid_argument("SnapKV window " + std::to_string(o.window) +
                            " is longer than the prompt (num_tokens " + std::to_string(num_tokens) +
                            ")");
  }
  if (o.kernel % 2 == 0) {
    return invalid_argument("SnapKV kernel " + std::to_string(o.kernel) +
                            " must be odd and >= 1 (centred on the token)");
  }
  const size_t expected = num_heads * o.window * num_tokens;
  if (window_attention.size() != expected) {
    return invalid_argument(
        "SnapKV window_attention holds " + std::to_string(window_attention.size()) +
        " weights; num_heads x window x num_tokens is " + std::to_string(expected));
  }
  for (size_t i = 0; i < window_attention.size(); ++i) {
    if (!(std::isfinite(window_attention[i]) && window_attention[i] >= 0.0)) {
      return invalid_argument("SnapKV window_attention[" + std::to_string(i) + "] is " +
                              std::to_string(window_attention[i]) +
                              "; weights must be finite and >= 0");
    }
  }
  return ok_status();
}

// One head's votes: the window's weights summed per token before the window.
std::vector<double> head_votes(std::span<const double> head_attention, size_t window,
                               size_t num_tokens) {
  std::vector<double> votes(num_tokens - window, 0.0);
  for (size_t q = 0; q < window; ++q) {
    const double* row = head_attention.data() + q * num_tokens;
    for (size_t t = 0; t < votes.size(); ++t)
      votes[t] += row[t];
  }
  return votes;
}

// 1-D pooling with stride 1, centred, clipped at the ends (no padding value enters).
std::vector<double> pool(const std::vector<double>& votes, size_t kernel, SnapKvPooling pooling) {
  const size_t n = votes.size();
  const size_t half = kernel / 2;
  std::vector<double> pooled(n);
  for (size_t t = 0; t < n; ++t) {
    const size_t first = t >= half ? t - half : 0;
    const size_t last = std::min(n - 1, t + half);
    const auto begin = votes.begin() + static_cast<ptrdiff_t>(first);
    const auto end = votes.begin() + static_cast<ptrdiff_t>(last + 1);
    pooled[t] = pooling == SnapKvPooling::kMax
                    ? *std::max_element(begin, end)
                    : std::accumulate(begin, end, 0.0) / static_cast<double>(last + 1 - first);
  }
  return pooled;
}

}  // namespace

Result<std::vector<double>> snapkv_scores(std::span<const double> window_attention,
                                          size_t num_heads, size_t num_tokens,
                                          const SnapKvOptions& options) {
  KVF_RETURN_IF_ERROR(check_snapkv_arguments(window_attention, num_heads, num_tokens, options));
  std::vector<double> scores(num_tokens - options.window, 0.0);
  if (scores.empty()) return scores;
  const size_t per_head = options.window * num_tokens;
  for (size_t h = 0; h < num_heads; ++h) {
    const auto votes =
        head_votes(window_attention.subspan(h * per_head, per_head), options.window, num_tokens);
    const auto pooled = pool(votes, options.kernel, options.pooling);
    for (size_t t = 0; t < scores.size(); ++t)
      scores[t] += pooled[t];
  }
  return scores;
}

Result<std::vector<size_t>> select_snapkv(std::span<const double> window_attention,
                                          size_t num_heads, size_t num_tokens,
                                          const SnapKvOptions& options) {
  KVF_ASSIGN_OR_RETURN(std::vector<double> scores,
                       snapkv_scores(window_attention, num_heads, num_tokens, options));
  if (options.budget < options.window) {
    return invalid_argument("SnapKV budget " + std::to_string(options.budget) +
                            " is smaller than its window " + std::to_string(options.window) +
                            " (the window is always kept)");
  }
  // The window's own scores never compete: select_heavy_hitters protects the newest `window`.
  scores.resize(num_tokens, 0.0);
  return select_heavy_hitters(scores, options.budget, options.window);
}

Result<std::vector<size_t>> pyramid_layer_budgets(size_t average_budget, size_t num_layers,
                                                  double beta) {
  if (num_layers == 0) return invalid_argument("PyramidKV needs at least one layer");
  if (average_budget == 0) return invalid_argument("PyramidKV needs a positive token budget");
  // Twice the average, and the layers' total, must be counts.
  if (average_budget > std::numeric_limits<size_t>::max() / 2 / std::max<size_t>(num_layers, 2)) {
    return invalid_argument("PyramidKV's token budget " + std::to_string(average_budget) +
                            " over " + std::to_string(num_layers) + " layers is too large");
  }
  if (!(std::isfinite(beta) && beta >= 1.0)) {
    return invalid_argument("PyramidKV beta " + std::to_string(beta) +
                            " must be a finite value >= 1");
  }
  const double average = static_cast<double>(average_budget);
  const double last = std::max(1.0, average / beta);
  const double first = 2.0 * average - last;  // the arithmetic sequence averages `average`
  const double step = num_layers > 1 ? (first - last) / static_cast<double>(num_layers - 1) : 0.0;

  std::vector<size_t> budgets(num_layers);
  std::vector<double> fraction(num_layers);
  size_t assigned = 0;
  for (size_t l = 0; l < num_layers; ++l) {
    const double exact = num_layers > 1 ? first - step * static_cast<double>(l) : average;
    budgets[l] = static_cast<size_t>(std::floor(exact));
    fraction[l] = exact - std::floor(exact);
    assigned += budgets[l];
  }
  // Largest remainders get the tokens the floors left over; a stable sort keeps ties in layer
  // order, which also keeps the budgets non-increasing.
  std::vector<size_t> order(num_layers);
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return fraction[a] > fraction[b]; });
  const size_t total = average_budget * num_layers;
  for (size_t i = 0; assigned < total; ++i, ++assigned)
    ++budgets[order[i % num_layers]];
  return budgets;
}

}  // namespace kvfabric::quant
