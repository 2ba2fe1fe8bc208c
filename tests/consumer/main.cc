#include <kvfabric/kvfabric.h>

#include <cstdint>
#include <iostream>
#include <string>
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
  if (!hit.ok() || hit.value() != 32) return 1;

  // The transport module links too (MPI and NCCL privately, when kvfabric was built with them).
  std::cout << "mpi transport built: " << kvfabric::mpi_transport_built()
            << ", nccl transport built: " << kvfabric::nccl_transport_built() << "\n";
  uint8_t from[16] = {7}, to[16] = {};
  uint8_t* const sent[] = {from};
  uint8_t* const received[] = {to};
  const kvfabric::BlockBatch send{kvfabric::RankId{0}, sent, sizeof(from)};
  const kvfabric::BlockBatch recv{kvfabric::RankId{0}, received, sizeof(to)};
  if (!kvfabric::make_local_transport()->exchange_blocks({&send, 1}, {&recv, 1}).ok()) return 1;
  if (to[0] != 7) return 1;

  // The server module links too (Boost.Asio and JSON privately): a control request in process.
  kvfabric::Config config;
  config.model = {"consumer", 1, 2, 1, 64, kvfabric::DType::kF32};
  config.cache.num_blocks = 8;
  auto coordinator = kvfabric::Coordinator::create(config);
  if (!coordinator.ok()) return 1;
  kvfabric::ControlProtocol protocol(*coordinator);
  const std::string reply = protocol.handle(R"({"op": "admit", "seq": 1, "tokens": [1, 2, 3]})");
  std::cout << reply << "\n";
  return reply.find("\"ok\":true") != std::string::npos ? 0 : 1;
}
