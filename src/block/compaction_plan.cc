#include "block/compaction_plan.h"

#include <algorithm>

#include "kvfabric/common/check.h"

namespace kvfabric::detail {
namespace {

size_t ceil_div(size_t a, size_t b) {
  return (a + b - 1) / b;
}

// Every old table index that no block of the compacted table reuses, ascending.
void add_dropped_blocks(CompactionPlan& plan, size_t old_blocks) {
  std::vector<bool> reused(old_blocks, false);
  for (size_t index : plan.base_index)
    reused[index] = true;
  for (size_t i = 0; i < old_blocks; ++i) {
    if (!reused[i]) plan.dropped_index.push_back(i);
  }
}

}  // namespace

CompactionPlan plan_streaming_compaction(size_t num_tokens, size_t block_size, size_t sink,
                                         size_t window) {
  KVF_CHECK(num_tokens > sink + window, "compaction needs tokens to drop");
  const size_t bs = block_size;
  const size_t keep = sink + window;
  const size_t shift = num_tokens - keep;  // old position = new position + shift, for window tokens
  const size_t new_blocks = ceil_div(keep, bs);
  const size_t old_blocks = ceil_div(num_tokens, bs);

  CompactionPlan plan;
  plan.base_index.resize(new_blocks);

  if (shift % bs == 0) {
    // Block-aligned: sink blocks stay, window blocks keep their slots under a new index.
    const size_t block_shift = shift / bs;
    const size_t mixed = sink / bs;  // new block where sink and window meet (if sink % bs != 0)
    const size_t sink_part = sink % bs;
    for (size_t k = 0; k < new_blocks; ++k) {
      plan.base_index[k] = k * bs + bs <= sink ? k : k + block_shift;
    }
    if (sink_part != 0 && mixed < new_blocks) {
      const size_t window_part = std::min(bs, keep - mixed * bs) - sink_part;
      if (window_part > 0 && window_part <= sink_part) {
        // Keep the sink block; copy the few window tokens into it.
        plan.base_index[mixed] = mixed;
        plan.moves.push_back({mixed + block_shift, static_cast<uint32_t>(sink_part), mixed,
                              static_cast<uint32_t>(sink_part),
                              static_cast<uint32_t>(window_part)});
      } else if (window_part > 0) {
        // Keep the window block; copy the sink tokens into it.
        plan.base_index[mixed] = mixed + block_shift;
        plan.moves.push_back({mixed, 0, mixed, 0, static_cast<uint32_t>(sink_part)});
      } else {
        plan.base_index[mixed] = mixed;  // window == 0: a partial sink block, nothing to move
      }
    }
  } else {
    // Unaligned: every window token changes slot. Reuse old blocks in place and move in ascending
    // order; a move's source (p + shift) is always ahead of every slot written so far.
    for (size_t k = 0; k < new_blocks; ++k)
      plan.base_index[k] = k;
    size_t p = sink;
    while (p < keep) {
      const size_t src = p + shift;
      const size_t run = std::min({bs - p % bs, bs - src % bs, keep - p});
      plan.moves.push_back({src / bs, static_cast<uint32_t>(src % bs), p / bs,
                            static_cast<uint32_t>(p % bs), static_cast<uint32_t>(run)});
      p += run;
    }
  }

  add_dropped_blocks(plan, old_blocks);
  return plan;
}

CompactionPlan plan_token_retention(size_t num_tokens, size_t block_size,
                                    std::span<const size_t> kept) {
  const size_t bs = block_size;
  CompactionPlan plan;
  plan.base_index.resize(ceil_div(kept.size(), bs));
  for (size_t k = 0; k < plan.base_index.size(); ++k)
    plan.base_index[k] = k;
  for (size_t p = 0; p < kept.size();) {
    if (kept[p] == p) {  // still in its slot (only possible before the first dropped token)
      ++p;
      continue;
    }
    // The longest run of consecutive sources that stays inside one source and one target block.
    const size_t src = kept[p];
    const size_t limit = std::min({bs - p % bs, bs - src % bs, kept.size() - p});
    size_t run = 1;
    while (run < limit && kept[p + run] == src + run)
      ++run;
    plan.moves.push_back({src / bs, static_cast<uint32_t>(src % bs), p / bs,
                          static_cast<uint32_t>(p % bs), static_cast<uint32_t>(run)});
    p += run;
  }
  add_dropped_blocks(plan, ceil_div(num_tokens, bs));
  return plan;
}

}  // namespace kvfabric::detail
