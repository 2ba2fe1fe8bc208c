// The single-process transport: world size 1, every exchange is a copy from this rank's sent
// blocks into its received blocks (host memory, memcpy).
#include <cstring>
#include <string>

#include "kvfabric/transport/transport.h"
#include "transport/batch_check.h"

namespace kvfabric {
namespace {

class LocalTransport final : public Transport {
 public:
  std::string_view name() const override { return "local"; }
  RankId rank() const override { return RankId{0}; }
  int world_size() const override { return 1; }

  Status exchange_blocks(std::span<const BlockBatch> sends,
                         std::span<const BlockBatch> recvs) override {
    // check_exchange pairs the self batches and refuses overlaps, so the copies below are the
    // whole exchange and each reads a block no earlier copy wrote.
    KVF_RETURN_IF_ERROR(detail::check_exchange("local transport R0", rank(), 1, sends, recvs));
    for (size_t s = 0, r = 0; s < sends.size(); ++s, ++r) {
      const BlockBatch& from = sends[s];
      const BlockBatch& to = recvs[r];
      for (size_t i = 0; i < from.blocks.size(); ++i)
        std::memcpy(to.blocks[i], from.blocks[i], from.block_bytes);
    }
    return ok_status();
  }

  Status broadcast(std::vector<uint8_t>&, RankId root) override { return check_root(root); }
  Status barrier() override { return ok_status(); }
  Status all_gather(uint64_t value, std::vector<uint64_t>& out) override {
    out.assign(1, value);
    return ok_status();
  }
  Status gather(std::span<const uint8_t> bytes, RankId root,
                std::vector<std::vector<uint8_t>>& out) override {
    KVF_RETURN_IF_ERROR(check_root(root, "gather"));
    out.assign(1, std::vector<uint8_t>(bytes.begin(), bytes.end()));
    return ok_status();
  }
  void set_timeout(std::optional<std::chrono::milliseconds>) override {}

 private:
  static Status check_root(RankId root, std::string_view op = "broadcast") {
    if (root.value != 0) {
      return invalid_argument("local transport R0: " + std::string(op) + " root " +
                              to_string(root) + " is not a rank (world size 1)");
    }
    return ok_status();
  }
};

}  // namespace

std::unique_ptr<Transport> make_local_transport() {
  return std::make_unique<LocalTransport>();
}

}  // namespace kvfabric
