// The base of transports that move blocks their own way and leave every control call to a host
// transport: NCCL over its MPI bootstrap, the host-staged transport over MPI.
#pragma once

#include <chrono>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kvfabric/transport/transport.h"

namespace kvfabric {

//! \brief Rank, world, broadcast, barrier, all_gather, gather, timeouts and rank names are
//! `control`'s; a subclass provides name() and exchange_blocks(). `control` must outlive it.
class HostControlledTransport : public Transport {
 public:
  explicit HostControlledTransport(Transport& control) : control_(control) {}

  [[nodiscard]] RankId rank() const override { return control_.rank(); }
  [[nodiscard]] int world_size() const override { return control_.world_size(); }
  Status broadcast(std::vector<uint8_t>& bytes, RankId root) override {
    return control_.broadcast(bytes, root);
  }
  Status barrier() override { return control_.barrier(); }
  Status all_gather(uint64_t value, std::vector<uint64_t>& out) override {
    return control_.all_gather(value, out);
  }
  Status gather(std::span<const uint8_t> bytes, RankId root,
                std::vector<std::vector<uint8_t>>& out) override {
    return control_.gather(bytes, root, out);
  }
  //! Bounds the control calls; how a subclass bounds its own block moves is its to say.
  void set_timeout(std::optional<std::chrono::milliseconds> timeout) override {
    control_.set_timeout(timeout);
  }
  [[nodiscard]] std::string describe(RankId rank) const override {
    return control_.describe(rank);
  }

 protected:
  [[nodiscard]] Transport& control() const { return control_; }

 private:
  Transport& control_;
};

}  // namespace kvfabric
