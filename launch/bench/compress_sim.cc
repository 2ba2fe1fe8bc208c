#include "bench/compress_sim.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <numeric>
#include <random>
#include <utility>

#include "kvfabric/quant/token_selection.h"

namespace kvfabric::bench {
namespace {

constexpr std::array<std::pair<CompressWorkload, std::string_view>, 2> kWorkloads = {{
    {CompressWorkload::kPlanted, "planted"},
    {CompressWorkload::kPowerLaw, "power-law"},
}};
constexpr std::array<std::pair<CompressPolicy, std::string_view>, 5> kPolicies = {{
    {CompressPolicy::kFull, "full"},
    {CompressPolicy::kStreaming, "streaming"},
    {CompressPolicy::kH2o, "h2o"},
    {CompressPolicy::kSnapKv, "snapkv"},
    {CompressPolicy::kPyramid, "pyramid"},
}};

template <typename Enum, size_t N>
Result<Enum> parse_name(const std::array<std::pair<Enum, std::string_view>, N>& names,
                        std::string_view name, std::string_view option) {
  std::string known;
  for (const auto& [value, text] : names) {
    if (text == name) return value;
    known += (known.empty() ? "" : ", ") + std::string(text);
  }
  return invalid_argument(fmt::format("{} \"{}\" is not one of {}", option, name, known));
}

// --- the synthetic model ----------------------------------------------------------------------

// Logit scales of the workloads (a logit is q.k / sqrt(head_dim)).
constexpr double kPlantedStrength = 5.0;  // planted keys' extra logit under an aligned query
constexpr double kQueryNoise = 0.5;       // logit noise from a query's spread around its direction
constexpr double kHeadJitter = 0.5;       // power-law: heads disagree by this much (logit sd)
constexpr double kSinkMass = 0.25;        // power-law: the sinks' share of the attention

// 0 for the first layer, 1 for the last: deeper layers attend more sharply.
double depth(size_t layer, size_t layers) {
  return layers > 1 ? static_cast<double>(layer) / static_cast<double>(layers - 1) : 0.5;
}

// One layer's K, V and queries for every head: T prompt tokens then D decode tokens.
struct Layer {
  size_t prompt = 0;
  size_t total = 0;
  size_t heads = 0;
  size_t dim = 0;
  std::vector<float> keys;     // [head][dim][token]: one query's logits vectorize over tokens
  std::vector<float> values;   // [head][token][dim]
  std::vector<float> queries;  // [head][token][dim]: the prompt's queries, then the decode steps'
  std::vector<bool> planted;   // per prompt token

  float& key(size_t h, size_t c, size_t t) { return keys[(h * dim + c) * total + t]; }
  const float* key_row(size_t h, size_t c) const { return keys.data() + (h * dim + c) * total; }
  const float* value(size_t h, size_t t) const { return values.data() + (h * total + t) * dim; }
  float* query(size_t h, size_t t) { return queries.data() + (h * total + t) * dim; }
  const float* query(size_t h, size_t t) const { return queries.data() + (h * total + t) * dim; }
};

std::mt19937_64 layer_rng(uint64_t seed, CompressWorkload workload, size_t layer) {
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(workload), static_cast<uint32_t>(layer)};
  return std::mt19937_64(seq);
}

std::vector<float> gaussian(size_t n, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(n);
  for (float& v : x)
    v = normal(rng);
  return x;
}

// One random unit vector per head: the direction its queries point to.
std::vector<std::vector<double>> head_directions(size_t heads, size_t dim, std::mt19937_64& rng) {
  std::vector<std::vector<double>> directions(heads);
  for (auto& u : directions) {
    const auto x = gaussian(dim, rng);
    double norm = 0;
    for (const float v : x)
      norm += double{v} * v;
    norm = std::sqrt(norm);
    for (const float v : x)
      u.push_back(v / norm);
  }
  return directions;
}

// Queries around each head's direction: scale * (sqrt(d) u + noise), so an aligned key's logit
// is scale * (its component along u) plus noise of sd ~ scale * kQueryNoise.
void make_queries(Layer& L, const std::vector<std::vector<double>>& u, double scale,
                  std::mt19937_64& rng) {
  std::normal_distribution<double> noise(0.0, kQueryNoise);
  const double sqrt_d = std::sqrt(static_cast<double>(L.dim));
  for (size_t h = 0; h < L.heads; ++h) {
    for (size_t t = 0; t < L.total; ++t) {
      float* q = L.query(h, t);
      for (size_t c = 0; c < L.dim; ++c)
        q[c] = static_cast<float>(scale * (sqrt_d * u[h][c] + noise(rng)));
    }
  }
}

// Spans of kPlantedSpan consecutive prompt tokens, `fraction` of the prompt, at random
// span-aligned places: phrases a query keeps returning to.
std::vector<bool> plant_spans(size_t prompt, double fraction, std::mt19937_64& rng) {
  const size_t slots = prompt / kPlantedSpan;
  const double wanted = fraction * static_cast<double>(prompt) / kPlantedSpan;
  const size_t spans = std::min(slots, std::max<size_t>(1, std::lround(wanted)));
  std::vector<size_t> order(slots);
  std::iota(order.begin(), order.end(), size_t{0});
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<bool> planted(prompt, false);
  for (size_t s = 0; s < spans; ++s) {
    for (size_t i = 0; i < kPlantedSpan; ++i)
      planted[order[s] * kPlantedSpan + i] = true;
  }
  return planted;
}

// Gaussian keys; planted prompt keys get kPlantedStrength along their head's direction.
// PyramidKV's premise, deeper layers attend to fewer tokens more sharply: the planted share
// falls with depth (1.6x to 0.4x kPlantedFraction, 8 % to 2 %, 5 % on average) while the
// attention scale grows (0.5 to 1.5).
void fill_planted(Layer& L, const std::vector<std::vector<double>>& u, double layer_depth,
                  std::mt19937_64& rng) {
  L.planted = plant_spans(L.prompt, kPlantedFraction * (1.6 - 1.2 * layer_depth), rng);
  for (size_t h = 0; h < L.heads; ++h) {
    for (size_t t = 0; t < L.prompt; ++t) {
      if (!L.planted[t]) continue;
      for (size_t c = 0; c < L.dim; ++c)
        L.key(h, c, t) += static_cast<float>(kPlantedStrength * u[h][c]);
    }
  }
  make_queries(L, u, 0.5 + layer_depth, rng);
}

// The attention share each prompt token should get: kSinkMass over the first kAttentionSinks,
// the rest Zipf(exponent) over a random permutation of the other positions.
std::vector<double> power_law_mass(size_t prompt, double exponent, std::mt19937_64& rng) {
  const size_t sinks = std::min(kAttentionSinks, prompt);
  std::vector<size_t> rank(prompt - sinks);
  std::iota(rank.begin(), rank.end(), size_t{1});
  std::shuffle(rank.begin(), rank.end(), rng);
  std::vector<double> mass(prompt, kSinkMass / static_cast<double>(sinks));
  double total = 0;
  for (size_t i = 0; i < rank.size(); ++i)
    total += std::pow(static_cast<double>(rank[i]), -exponent);
  for (size_t i = 0; i < rank.size(); ++i)
    mass[sinks + i] = (1.0 - kSinkMass) * std::pow(static_cast<double>(rank[i]), -exponent) / total;
  return mass;
}

// Prompt keys whose component along the head's direction is the log of their target mass (plus
// a head's own jitter), so softmax(q.k / sqrt(d)) follows the mass; the orthogonal part stays
// Gaussian. The Zipf exponent grows with depth (0.6 to 1.4). Decode tokens keep Gaussian keys.
void fill_power_law(Layer& L, const std::vector<std::vector<double>>& u, double layer_depth,
                    std::mt19937_64& rng) {
  const auto mass = power_law_mass(L.prompt, 0.6 + 0.8 * layer_depth, rng);
  std::normal_distribution<double> jitter(0.0, kHeadJitter);
  for (size_t h = 0; h < L.heads; ++h) {
    std::vector<double> logit(L.prompt);
    for (size_t t = 0; t < L.prompt; ++t)
      logit[t] = std::log(mass[t]) + jitter(rng);
    const double mean = std::accumulate(logit.begin(), logit.end(), 0.0) / L.prompt;
    for (size_t t = 0; t < L.prompt; ++t) {
      double along = 0;
      for (size_t c = 0; c < L.dim; ++c)
        along += u[h][c] * L.key(h, c, t);
      for (size_t c = 0; c < L.dim; ++c)
        L.key(h, c, t) += static_cast<float>((logit[t] - mean - along) * u[h][c]);
    }
  }
  make_queries(L, u, 1.0, rng);
}

Layer make_layer(const CompressOptions& o, CompressWorkload workload, size_t layer) {
  auto rng = layer_rng(o.seed, workload, layer);
  Layer L;
  L.prompt = o.tokens;
  L.total = o.tokens + o.decode_steps;
  L.heads = o.heads;
  L.dim = o.head_dim;
  L.keys = gaussian(L.heads * L.dim * L.total, rng);
  L.values = gaussian(L.heads * L.total * L.dim, rng);
  L.queries.resize(L.heads * L.total * L.dim);
  const auto u = head_directions(L.heads, L.dim, rng);
  if (workload == CompressWorkload::kPlanted) {
    fill_planted(L, u, depth(layer, o.layers), rng);
  } else {
    L.planted.assign(L.prompt, false);
    fill_power_law(L, u, depth(layer, o.layers), rng);
  }
  return L;
}

// --- attention ---------------------------------------------------------------------------------

// q.k / sqrt(d) of tokens [0, n) of head h (float; the prompt pass only ranks tokens with it).
void prompt_logits(const Layer& L, size_t h, const float* q, size_t n, std::vector<float>& out) {
  out.assign(n, 0.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(L.dim));
  for (size_t c = 0; c < L.dim; ++c) {
    const float qc = q[c] * scale;
    const float* k = L.key_row(h, c);
    for (size_t j = 0; j < n; ++j)
      out[j] += qc * k[j];
  }
}

// What the prompt's causal attention gives the selection policies.
struct PromptScores {
  // Per prompt token: the softmax weight it received from every prompt query of every head.
  std::vector<double> received;
  // Per head, the rows of the last `window` = min(kSnapKvWindow, T) queries: [head][window][T],
  // zero after each query's own position.
  size_t window = 0;
  std::vector<double> window_attention;
};

PromptScores prompt_pass(const Layer& L) {
  const size_t T = L.prompt;
  PromptScores P;
  P.window = std::min(kSnapKvWindow, T);
  P.window_attention.assign(L.heads * P.window * T, 0.0);
  std::vector<std::vector<double>> received(L.heads, std::vector<double>(T, 0.0));
#pragma omp parallel for schedule(static)
  for (size_t h = 0; h < L.heads; ++h) {
    std::vector<float> logits;
    for (size_t i = 0; i < T; ++i) {
      prompt_logits(L, h, L.query(h, i), i + 1, logits);
      const float top = *std::max_element(logits.begin(), logits.end());
      std::vector<double> weight(i + 1);
      double sum = 0;
      for (size_t j = 0; j <= i; ++j)
        sum += weight[j] = std::exp(double{logits[j]} - top);
      const bool in_window = i >= T - P.window;
      double* row = in_window
                        ? P.window_attention.data() + (h * P.window + (i - (T - P.window))) * T
                        : nullptr;
      for (size_t j = 0; j <= i; ++j) {
        received[h][j] += weight[j] / sum;
        if (row) row[j] = weight[j] / sum;
      }
    }
  }
  P.received.assign(T, 0.0);
  for (size_t h = 0; h < L.heads; ++h) {  // in head order: the sum is the same on every run
    for (size_t j = 0; j < T; ++j)
      P.received[j] += received[h][j];
  }
  return P;
}

// The last `window` rows of every head: the observation window SnapKV reads.
std::vector<double> observation_window(const PromptScores& P, size_t heads, size_t tokens,
                                       size_t window) {
  std::vector<double> rows;
  rows.reserve(heads * window * tokens);
  for (size_t h = 0; h < heads; ++h) {
    const auto first = P.window_attention.begin() +
                       static_cast<ptrdiff_t>((h * P.window + P.window - window) * tokens);
    rows.insert(rows.end(), first, first + static_cast<ptrdiff_t>(window * tokens));
  }
  return rows;
}

// One decode query of one head: exp(logit - max) of each token so far, in double precision.
struct DecodeQuery {
  std::vector<double> weights;
  double total = 0;            // sum of weights, as attend() sums them over all tokens
  std::vector<double> output;  // the full attention output
};

// The softmax-weighted values of the held tokens (ascending), and their weight: over all tokens
// it reproduces the full output bit for bit, so `full` has exactly zero error.
double attend(const Layer& L, size_t h, const std::vector<double>& weights,
              const std::vector<size_t>& held, std::vector<double>& out) {
  out.assign(L.dim, 0.0);
  double sum = 0;
  for (const size_t j : held) {
    const float* v = L.value(h, j);
    for (size_t c = 0; c < L.dim; ++c)
      out[c] += weights[j] * v[c];
    sum += weights[j];
  }
  for (double& x : out)
    x /= sum;
  return sum;
}

// Decode step t's query attends to the prompt and the t + 1 tokens decoded so far (its own
// included). [step][head].
std::vector<std::vector<DecodeQuery>> decode_pass(const Layer& L) {
  const size_t steps = L.total - L.prompt;
  std::vector<std::vector<DecodeQuery>> queries(steps, std::vector<DecodeQuery>(L.heads));
  const double scale = 1.0 / std::sqrt(static_cast<double>(L.dim));
#pragma omp parallel for schedule(static)
  for (size_t t = 0; t < steps; ++t) {
    const size_t n = L.prompt + t + 1;
    std::vector<size_t> all(n);
    std::iota(all.begin(), all.end(), size_t{0});
    for (size_t h = 0; h < L.heads; ++h) {
      DecodeQuery& d = queries[t][h];
      const float* q = L.query(h, L.prompt + t);
      std::vector<double> logits(n, 0.0);
      for (size_t c = 0; c < L.dim; ++c) {
        const double qc = q[c] * scale;
        const float* k = L.key_row(h, c);
        for (size_t j = 0; j < n; ++j)
          logits[j] += qc * k[j];
      }
      const double top = *std::max_element(logits.begin(), logits.end());
      d.weights.resize(n);
      for (size_t j = 0; j < n; ++j)
        d.weights[j] = std::exp(logits[j] - top);
      d.total = attend(L, h, d.weights, all, d.output);
    }
  }
  return queries;
}

// --- the policies ------------------------------------------------------------------------------

struct LayerOutcome {
  double error2 = 0;      // sum ||held output - full output||^2
  double reference2 = 0;  // sum ||full output||^2
  double mass = 0;        // sum of the held share of each query's softmax
  size_t queries = 0;
  size_t held_at_end = 0;
  size_t planted_held = 0;
  size_t planted = 0;
  double seconds = 0;
};

std::vector<size_t> pick(const std::vector<size_t>& tokens, const std::vector<size_t>& positions) {
  std::vector<size_t> picked;
  picked.reserve(positions.size());
  for (const size_t p : positions)
    picked.push_back(tokens[p]);
  return picked;
}

size_t streaming_window(size_t budget) {
  return budget > kStreamingSink ? budget - kStreamingSink : 0;
}

// The prompt tokens a policy keeps when prefill ends. `prompt_budget`: snapkv and pyramid
// compress the prompt to it once (budget - D: room for the decode tokens they keep).
Result<std::vector<size_t>> select_prompt(CompressPolicy policy, const Layer& L,
                                          const PromptScores& P, size_t budget,
                                          size_t prompt_budget) {
  switch (policy) {
    case CompressPolicy::kFull: {
      std::vector<size_t> all(L.prompt);
      std::iota(all.begin(), all.end(), size_t{0});
      return all;
    }
    case CompressPolicy::kStreaming:
      return quant::select_sliding_window(L.prompt, budget, kStreamingSink,
                                          streaming_window(budget));
    case CompressPolicy::kH2o:
      return quant::select_heavy_hitters(P.received, budget, budget / 2);
    case CompressPolicy::kSnapKv:
    case CompressPolicy::kPyramid: {
      const size_t window = std::min({kSnapKvWindow, prompt_budget, P.window});
      const auto rows = observation_window(P, L.heads, L.prompt, window);
      return quant::select_snapkv(
          rows, L.heads, L.prompt,
          {prompt_budget, window, kSnapKvKernel, quant::SnapKvPooling::kMax});
    }
  }
  return invalid_argument("unknown compression policy");
}

// After a decode token is appended: streaming and H2O evict back to the budget (H2O by the
// attention mass accumulated so far, its newest budget / 2 protected); the others never need to.
void evict(CompressPolicy policy, std::vector<size_t>& held, size_t budget,
           const std::vector<double>& accumulated) {
  if (held.size() <= budget) return;
  if (policy == CompressPolicy::kStreaming) {
    held = pick(held, quant::select_sliding_window(held.size(), budget, kStreamingSink,
                                                   streaming_window(budget)));
  } else if (policy == CompressPolicy::kH2o) {
    std::vector<double> scores;
    scores.reserve(held.size());
    for (const size_t j : held)
      scores.push_back(accumulated[j]);
    held = pick(held, quant::select_heavy_hitters(scores, budget, budget / 2));
  }
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

Result<LayerOutcome> simulate(CompressPolicy policy, const Layer& L, const PromptScores& P,
                              const std::vector<std::vector<DecodeQuery>>& decode, size_t budget,
                              size_t prompt_budget) {
  LayerOutcome out;
  auto start = std::chrono::steady_clock::now();
  KVF_ASSIGN_OR_RETURN(std::vector<size_t> held,
                       select_prompt(policy, L, P, budget, prompt_budget));
  out.seconds += seconds_since(start);
  std::vector<double> accumulated = P.received;  // H2O's scores, prompt then decode
  accumulated.resize(L.total, 0.0);
  std::vector<double> output;
  for (size_t t = 0; t < decode.size(); ++t) {
    held.push_back(L.prompt + t);
    start = std::chrono::steady_clock::now();
    evict(policy, held, budget, accumulated);
    out.seconds += seconds_since(start);
    for (size_t h = 0; h < L.heads; ++h) {
      const DecodeQuery& d = decode[t][h];
      const double held_weight = attend(L, h, d.weights, held, output);
      for (size_t c = 0; c < L.dim; ++c) {
        out.error2 += (output[c] - d.output[c]) * (output[c] - d.output[c]);
        out.reference2 += d.output[c] * d.output[c];
      }
      out.mass += held_weight / d.total;
      ++out.queries;
      if (policy == CompressPolicy::kH2o) {  // the attention this step gave each held token
        for (const size_t j : held)
          accumulated[j] += d.weights[j] / held_weight;
      }
    }
  }
  out.held_at_end = held.size();
  for (size_t t = 0; t < L.prompt; ++t)
    out.planted += L.planted[t];
  for (const size_t j : held)
    out.planted_held += j < L.prompt && L.planted[j];
  return out;
}

// --- the runs ----------------------------------------------------------------------------------

struct Run {
  CompressPolicy policy;
  double budget;
  size_t budget_tokens;
  std::vector<size_t> prompt_budgets;  // per layer
  LayerOutcome total;
  // Each layer's relative error counts alike: a deep layer's sharper attention averages fewer
  // values into a larger output, which would otherwise outweigh the shallow layers.
  double layer_errors = 0;
};

// As PyramidKV's code: every layer keeps the observation window, and the pyramid splits the
// rest of the average prompt budget (shallow layers get more).
Result<std::vector<size_t>> pyramid_prompt_budgets(const CompressOptions& o, size_t prompt_budget) {
  const size_t window = std::min(kSnapKvWindow, prompt_budget);
  if (prompt_budget == window) return std::vector<size_t>(o.layers, prompt_budget);
  KVF_ASSIGN_OR_RETURN(
      std::vector<size_t> per_layer,
      quant::pyramid_layer_budgets(prompt_budget - window, o.layers, kPyramidBeta));
  for (size_t& b : per_layer)
    b = std::min(o.tokens, window + b);  // a shallow layer cannot keep more than the prompt
  return per_layer;
}

Result<std::vector<Run>> plan_runs(const CompressOptions& o) {
  std::vector<Run> runs;
  const size_t all = o.tokens + o.decode_steps;
  for (const CompressPolicy policy : o.policies) {
    if (policy == CompressPolicy::kFull) {
      runs.push_back({policy, 1.0, all, std::vector<size_t>(o.layers, o.tokens), {}, 0.0});
      continue;
    }
    for (const double fraction : o.budgets) {
      const size_t budget = budget_tokens(o, fraction);
      const size_t prompt_budget = std::min(o.tokens, budget - o.decode_steps);
      std::vector<size_t> per_layer(o.layers, prompt_budget);
      if (policy == CompressPolicy::kPyramid) {
        KVF_ASSIGN_OR_RETURN(per_layer, pyramid_prompt_budgets(o, prompt_budget));
      }
      runs.push_back({policy, fraction, budget, per_layer, {}, 0.0});
    }
  }
  return runs;
}

void add(LayerOutcome& total, const LayerOutcome& layer) {
  total.error2 += layer.error2;
  total.reference2 += layer.reference2;
  total.mass += layer.mass;
  total.queries += layer.queries;
  total.held_at_end += layer.held_at_end;
  total.planted_held += layer.planted_held;
  total.planted += layer.planted;
  total.seconds += layer.seconds;
}

CompressPoint to_point(const CompressOptions& o, CompressWorkload workload, const Run& run) {
  const LayerOutcome& r = run.total;
  CompressPoint p;
  p.workload = workload;
  p.policy = run.policy;
  p.budget = run.budget;
  p.budget_tokens = run.budget_tokens;
  p.relative_error = run.layer_errors / static_cast<double>(o.layers);
  p.mass_kept = r.mass / static_cast<double>(r.queries);
  p.kept_tokens = static_cast<double>(r.held_at_end) / static_cast<double>(o.layers);
  p.memory_saved = 1.0 - p.kept_tokens / static_cast<double>(o.tokens + o.decode_steps);
  p.kv_bytes_f16 = uint64_t{r.held_at_end} * o.heads * o.head_dim * 2 * 2;
  if (workload == CompressWorkload::kPlanted)
    p.planted_kept = static_cast<double>(r.planted_held) / static_cast<double>(r.planted);
  p.selection_seconds = r.seconds;
  return p;
}

}  // namespace

std::string_view workload_name(CompressWorkload workload) {
  for (const auto& [value, name] : kWorkloads) {
    if (value == workload) return name;
  }
  return "?";
}

std::string_view policy_name(CompressPolicy policy) {
  for (const auto& [value, name] : kPolicies) {
    if (value == policy) return name;
  }
  return "?";
}

Result<CompressWorkload> parse_compress_workload(std::string_view name) {
  return parse_name(kWorkloads, name, "--workloads");
}

Result<CompressPolicy> parse_compress_policy(std::string_view name) {
  return parse_name(kPolicies, name, "--policies");
}

size_t budget_tokens(const CompressOptions& options, double budget) {
  return static_cast<size_t>(
      std::llround(budget * static_cast<double>(options.tokens + options.decode_steps)));
}

Status check_compress_options(const CompressOptions& o) {
  if (o.tokens < 2 * kPlantedSpan)
    return invalid_argument(fmt::format("--tokens {} must be >= {}", o.tokens, 2 * kPlantedSpan));
  if (o.heads == 0) return invalid_argument("--heads must be >= 1");
  if (o.head_dim == 0) return invalid_argument("--head-dim must be >= 1");
  if (o.layers == 0) return invalid_argument("--layers must be >= 1");
  if (o.decode_steps == 0)
    return invalid_argument("--decode-steps must be >= 1 (the errors are measured on them)");
  if (o.budgets.empty()) return invalid_argument("--budgets needs at least one fraction");
  if (o.workloads.empty()) return invalid_argument("--workloads needs at least one workload");
  if (o.policies.empty()) return invalid_argument("--policies needs at least one policy");
  for (const double b : o.budgets) {
    if (!(b > 0.0 && b <= 1.0))
      return invalid_argument(fmt::format("--budgets {} must be a fraction in (0, 1]", b));
    const size_t tokens = budget_tokens(o, b);
    if (tokens <= o.decode_steps) {
      return invalid_argument(fmt::format(
          "--budgets {} holds {} of the {} tokens, not more than --decode-steps {} (snapkv and "
          "pyramid keep every decode token)",
          b, tokens, o.tokens + o.decode_steps, o.decode_steps));
    }
  }
  return ok_status();
}

Result<std::vector<CompressPoint>> run_compress_sim(
    const CompressOptions& o, const std::function<void(size_t done, size_t total)>& progress) {
  KVF_RETURN_IF_ERROR(check_compress_options(o));
  std::vector<CompressPoint> points;
  const size_t total_layers = o.workloads.size() * o.layers;
  size_t done = 0;
  for (const CompressWorkload workload : o.workloads) {
    KVF_ASSIGN_OR_RETURN(std::vector<Run> runs, plan_runs(o));
    for (size_t layer = 0; layer < o.layers; ++layer) {
      const Layer L = make_layer(o, workload, layer);
      const PromptScores P = prompt_pass(L);
      const auto decode = decode_pass(L);
      for (Run& run : runs) {
        KVF_ASSIGN_OR_RETURN(
            const LayerOutcome outcome,
            simulate(run.policy, L, P, decode, run.budget_tokens, run.prompt_budgets[layer]));
        add(run.total, outcome);
        run.layer_errors += std::sqrt(outcome.error2 / outcome.reference2);
      }
      if (progress) progress(++done, total_layers);
    }
    for (const Run& run : runs)
      points.push_back(to_point(o, workload, run));
  }
  return points;
}

nlohmann::json compress_json(const CompressOptions& o, const std::vector<CompressPoint>& points) {
  nlohmann::json results;
  results["routine"] = "compress";
  std::vector<std::string> workloads, policies;
  for (const CompressWorkload w : o.workloads)
    workloads.emplace_back(workload_name(w));
  for (const CompressPolicy p : o.policies)
    policies.emplace_back(policy_name(p));
  results["options"] = {{"tokens", o.tokens},     {"heads", o.heads},
                        {"head_dim", o.head_dim}, {"decode_steps", o.decode_steps},
                        {"layers", o.layers},     {"seed", o.seed},
                        {"budgets", o.budgets},   {"workloads", workloads},
                        {"policies", policies}};
  results["parameters"] = {{"streaming_sink", kStreamingSink},
                           {"h2o_recent", "half the budget"},
                           {"snapkv_window", kSnapKvWindow},
                           {"snapkv_kernel", kSnapKvKernel},
                           {"snapkv_pooling", "max"},
                           {"pyramid_beta", kPyramidBeta},
                           {"planted_fraction", kPlantedFraction},
                           {"planted_span", kPlantedSpan},
                           {"attention_sinks", kAttentionSinks}};
  results["full_tokens"] = o.tokens + o.decode_steps;
  results["runs"] = nlohmann::json::array();
  for (const CompressPoint& p : points) {
    nlohmann::json run = {{"workload", workload_name(p.workload)},
                          {"policy", policy_name(p.policy)},
                          {"budget", p.budget},
                          {"budget_tokens", p.budget_tokens},
                          {"relative_error", p.relative_error},
                          {"mass_kept", p.mass_kept},
                          {"kept_tokens", p.kept_tokens},
                          {"memory_saved", p.memory_saved},
                          {"kv_bytes_f16", p.kv_bytes_f16},
                          {"selection_us", p.selection_seconds * 1e6}};
    if (p.planted_kept >= 0) run["planted_kept"] = p.planted_kept;
    results["runs"].push_back(std::move(run));
  }
  return results;
}

}  // namespace kvfabric::bench
