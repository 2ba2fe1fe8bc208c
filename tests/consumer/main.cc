#include <kvfabric/kvfabric.h>

#include <iostream>
#include <vector>

int main() {
  kvfabric::PagedKvCache cache(8, 16, 4, 64);
  if (!cache.allocate(kvfabric::SeqId{1}, 40).ok()) return 1;
  std::cout << cache;
  if (cache.used_block_count() != 3) return 1;

  // The prefix module links too: a second request shares the first one's cached blocks.
  auto prefix = kvfabric::PagedPrefixCache::create(kvfabric::PagedKvCache(8, 16, 4, 64));
  if (!prefix.ok()) return 1;
  const std::vector<kvfabric::TokenId> prompt(40, 7);
  if (!prefix->allocate(kvfabric::SeqId{1}, prompt).ok()) return 1;
  if (!prefix->insert(kvfabric::SeqId{1}, prompt).ok()) return 1;
  const auto hit = prefix->allocate(kvfabric::SeqId{2}, prompt);
  return hit.ok() && hit.value() == 32 ? 0 : 1;
}
