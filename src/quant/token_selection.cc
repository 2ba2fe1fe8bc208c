#include "kvfabric/quant/token_selection.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

namespace kvfabric::quant {

std::vector<size_t> select_heavy_hitters(std::span<const double> scores, size_t budget,
                                         size_t recent) {
  const size_t n = scores.size();
  if (n <= budget) {
    std::vector<size_t> all(n);
    std::iota(all.begin(), all.end(), size_t{0});
    return all;
  }
  const size_t protected_count = std::min(recent, budget);
  const size_t older = n - protected_count;
  const size_t heavy = budget - protected_count;

  // Rank the older tokens by score, newer first on ties; keep the first `heavy`. One partial
  // selection instead of the seed's repeated minimum search (O(n) instead of O(n^2)).
  std::vector<size_t> candidates(older);
  std::iota(candidates.begin(), candidates.end(), size_t{0});
  const auto heavier = [&](size_t a, size_t b) {
    return scores[a] != scores[b] ? scores[a] > scores[b] : a > b;
  };
  std::nth_element(candidates.begin(), candidates.begin() + static_cast<ptrdiff_t>(heavy),
                   candidates.end(), heavier);
  candidates.resize(heavy);
  std::sort(candidates.begin(), candidates.end());
  for (size_t i = older; i < n; ++i)
    candidates.push_back(i);
  return candidates;
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

Result<std::vector<size_t>> pyramid_layer_budgets(size_t average_budget, size_t num_layers,
                                                  double beta) {
  if (num_layers == 0) return invalid_argument("PyramidKV needs at least one layer");
  if (average_budget == 0) return invalid_argument("PyramidKV needs a positive token budget");
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
