#include <kvfabric/kvfabric.h>

#include <iostream>

int main() {
  kvfabric::PagedKvCache cache(8, 16, 4, 64);
  if (!cache.allocate(kvfabric::SeqId{1}, 40).ok()) return 1;
  std::cout << cache;
  return cache.used_block_count() == 3 ? 0 : 1;
}
